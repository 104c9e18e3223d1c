// The trained network outside the trainer (issue #18): the PyTorch definitions of
// scripts/blpa_torch.py against blpa's own forward pass.
#include <blpa/checkpoint.h>
#include <blpa/dataset.h>
#include <blpa/imagenet.h>
#include <blpa/jpeg.h>
#include <blpa/loader.h>
#include <blpa/train.h>
#include <fmt/format.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <regex>
#include <sstream>

#include "test_support.h"

namespace fs = std::filesystem;

namespace {

fs::path temp_dir(const std::string& name) {
  auto p = fs::temp_directory_path() / ("blpa-interop-" + name + "-" + std::to_string(::getpid()));
  remove_tree(p);
  fs::create_directories(p);
  return p;
}

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

void write_bytes(const fs::path& p, const void* data, size_t n) {
  fs::create_directories(p.parent_path());
  std::ofstream out(p, std::ios::binary);
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(n));
}

struct Run {
  int code = -1;
  std::string out, err;
  std::vector<std::string> lines() const {
    std::vector<std::string> v;
    std::istringstream s(out);
    for (std::string l; std::getline(s, l);) v.push_back(l);
    return v;
  }
};

// Runs a shell command line, its stdout and stderr apart. One thread per program, and one for
// the test's own LibTorch work (OneThread): CTest runs tests side by side, and on a busy
// machine LibTorch's threads spend more time waiting for each other than working.
Run shell(const std::string& command, const fs::path& dir) {
  const fs::path out = dir / "stdout.txt", err = dir / "stderr.txt";
  std::fflush(nullptr);
  const int status = std::system(
      ("OMP_NUM_THREADS=1 bash -c '" + command + "' > " + out.string() + " 2> " + err.string()).c_str());
  Run r;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = slurp(out);
  r.err = slurp(err);
  return r;
}

struct OneThread {
  int before = torch::get_num_threads();
  OneThread() { torch::set_num_threads(1); }
  ~OneThread() { torch::set_num_threads(before); }
  OneThread(const OneThread&) = delete;
  OneThread& operator=(const OneThread&) = delete;
};

// A network with weights and BatchNorm statistics that are not the initial ones: random
// gamma (negative ones too, where `negative_gamma`) and beta, and running statistics of a
// training-mode pass over a batch of its input's kind (momentum 1 for that pass, so that
// evaluation normalises activations of a realistic scale).
blpa::ResNet scrambled(const blpa::NetConfig& c, int64_t size, bool negative_gamma) {
  blpa::ResNet net(c);
  {
    torch::NoGradGuard no_grad;
    for (auto& [name, u] : net->units()) {
      u->gamma.uniform_(negative_gamma ? -0.5 : 0.5, 1.5);
      u->beta.normal_(0, 0.2);
      u->momentum = 1.0;
    }
    for (auto& p : net->named_parameters())
      if (p.key() == "fc.bias") p.value().normal_(0, 0.5);
  }
  net->train();
  net->forward(torch::randn({8, c.in_channels, size, size}) * 2 + 0.5);
  for (auto& [name, u] : net->units()) u->momentum = 0.1;
  net->eval();
  return net;
}

}  // namespace

TEST_CASE("interop: blpa_torch.py's networks load --export strictly and give blpa's logits to 1e-5", "[interop]") {
  OneThread one_thread;
  // The Python that has torch: the set-up's LibTorch wheel is a torch package (BLPA_TORCH_SITE
  // holds it), otherwise python3's own torch, if it has one.
  const auto dir = temp_dir("torch");
  const std::string python = std::string("PYTHONWARNINGS=ignore PYTHONPATH=") + BLPA_TORCH_SITE + ":${PYTHONPATH:-} " +
                             (std::getenv("BLPA_PYTHON") ? std::getenv("BLPA_PYTHON") : "python3");
  if (shell(python + " -c \"import torch\"", dir).code != 0) {
    std::cout << "BLPA_SKIP: python3 cannot import torch (the set-up's wheel at '" << BLPA_TORCH_SITE
              << "' or python3's own; BLPA_PYTHON names another Python)" << std::endl;
    remove_tree(dir);
    return;
  }
  torch::manual_seed(3);
  struct Case {
    blpa::NetConfig net;
    int64_t size;         // input height and width: odd, so that every stride rounds
    bool negative_gamma;  // plain mode keeps negative gammas; the others keep gamma >= 1e-8
  };
  const std::vector<Case> cases{{{"cifar", 11, 1, 7, {blpa::Mode::blpa, 4}}, 19, false},
                                {{"imagenet", 50, 3, 5, {blpa::Mode::plain, 4}}, 57, true}};
  std::string args;
  std::vector<torch::Tensor> expected;
  for (size_t i = 0; i < cases.size(); ++i) {
    const Case& c = cases[i];
    auto net = scrambled(c.net, c.size, c.negative_gamma);
    const auto x = torch::randn({3, c.net.in_channels, c.size, c.size});
    torch::NoGradGuard no_grad;
    expected.push_back(net->forward(x));
    const std::string model = (dir / ("model" + std::to_string(i) + ".pt")).string();
    const std::string input = (dir / ("input" + std::to_string(i) + ".f32")).string();
    blpa::export_state_dict(model, net);  // what blpa-train --export writes
    write_bytes(input, x.data_ptr<float>(), x.nbytes());
    args += " " + model + " " + input + " " + fmt::format("{}", fmt::join(x.sizes(), "x"));
  }
  const std::string script = R"PY(
import sys, torch
sys.path.insert(0, sys.argv[1])
import blpa_torch
a = sys.argv[2:]
for model, inp, shape in zip(a[0::3], a[1::3], a[2::3]):
    net = blpa_torch.load(model).eval()  # strict load_state_dict
    x = torch.frombuffer(bytearray(open(inp, "rb").read()), dtype=torch.float32)
    with torch.no_grad():
        y = net(x.view(*map(int, shape.split("x"))))
    print(net.arch, net.depth, net.stem.in_channels, net.fc.out_features, *map(repr, y.flatten().tolist()))
)PY";
  std::ofstream(dir / "check.py") << script;
  const Run r = shell(python + " " + (dir / "check.py").string() + " " + BLPA_SOURCE_DIR "/scripts" + args, dir);
  CAPTURE(r.out, r.err);
  REQUIRE(r.code == 0);
  const auto lines = r.lines();
  REQUIRE(lines.size() == cases.size());
  for (size_t i = 0; i < cases.size(); ++i) {
    std::istringstream in(lines[i]);
    std::string arch;
    int depth = 0;
    int64_t channels = 0, classes = 0;
    in >> arch >> depth >> channels >> classes;
    CHECK(arch == cases[i].net.arch);  // read off the state dict's shapes
    CHECK(depth == cases[i].net.depth);
    CHECK(channels == cases[i].net.in_channels);
    CHECK(classes == cases[i].net.num_classes);
    std::vector<float> got;
    for (double v; in >> v;) got.push_back(static_cast<float>(v));
    const auto want = expected[i].contiguous();
    REQUIRE(static_cast<int64_t>(got.size()) == want.numel());
    const auto diff = (torch::from_blob(got.data(), want.sizes()) - want).abs().max().item<float>();
    const auto scale = want.abs().max().item<float>();
    CAPTURE(arch, diff, scale);
    std::cout << arch << "-" << depth << ": largest logit difference " << diff << ", largest logit " << scale << "\n";
    CHECK(scale > 0.1f);  // logits of a size where 1e-5 means something
    CHECK(diff <= 1e-5f);
  }
  remove_tree(dir);
}
