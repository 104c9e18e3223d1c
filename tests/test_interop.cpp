// The trained network outside the trainer (issue #18): the PyTorch definitions of
// scripts/blpa_torch.py against blpa's own forward pass, blpa-predict against blpa-eval and
// against the library, and scripts/plot.sh on the logs of real runs.
#include <blpa/checkpoint.h>
#include <blpa/dataset.h>
#include <blpa/imagenet.h>
#include <blpa/jpeg.h>
#include <blpa/loader.h>
#include <blpa/train.h>
#include <caffe2/serialize/inline_container.h>
#include <fmt/format.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <map>
#include <regex>
#include <sstream>

#include "test_support.h"

namespace fs = std::filesystem;

namespace {

fs::path temp_dir(const std::string& name) { return fresh_temp_dir("interop-" + name); }

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

Run run(const std::string& exe, const std::vector<std::string>& args, const fs::path& dir) {
  std::string cmd = exe;
  for (const auto& a : args) cmd += " \"" + a + "\"";
  return shell(cmd, dir);
}

// The Python that has torch: the set-up's LibTorch wheel is a torch package (BLPA_TORCH_SITE
// holds it), otherwise python3's own torch, if it has one; BLPA_PYTHON names another Python.
// Empty, with the skip marker printed where `skip`, where none imports torch.
std::string python_with_torch(const fs::path& dir, bool skip) {
  const std::string python = std::string("PYTHONWARNINGS=ignore PYTHONPATH=") + BLPA_TORCH_SITE + ":${PYTHONPATH:-} " +
                             (std::getenv("BLPA_PYTHON") ? std::getenv("BLPA_PYTHON") : "python3");
  if (shell(python + " -c \"import torch\"", dir).code == 0) return python;
  if (skip)
    std::cout << "BLPA_SKIP: python3 cannot import torch (the set-up's wheel at '" << BLPA_TORCH_SITE
              << "' or python3's own; BLPA_PYTHON names another Python)" << std::endl;
  return "";
}

struct OneThread {
  int before = torch::get_num_threads();
  OneThread() { torch::set_num_threads(1); }
  ~OneThread() { torch::set_num_threads(before); }
  OneThread(const OneThread&) = delete;
  OneThread& operator=(const OneThread&) = delete;
};

// A small Fashion-MNIST run of blpa-train (ResNet-11, 4 iterations of batch 32, one thread).
std::vector<std::string> small_run(std::vector<std::string> extra) {
  std::vector<std::string> a{"--depth", "11", "--batch", "32", "--train-subset", "512", "--test-subset", "64",
                             "--iterations", "4", "--warmup", "0", "--lr", "0.02", "--lr-steps", "", "--threads",
                             "1", "--log-every", "1", "--eval-every", "0", "--quiet"};
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

// A JSON line's top-k: the classes, names and probabilities in order.
struct Top {
  std::vector<int64_t> classes;
  std::vector<std::string> names;
  std::vector<double> probs;
};
Top parse_top(const std::string& line) {
  Top t;
  static const std::regex entry(R"re(\{"class": (\d+)(, "name": "([^"]*)")?, "prob": ([-0-9.e+]+)\})re");
  for (std::sregex_iterator it(line.begin(), line.end(), entry), end; it != end; ++it) {
    t.classes.push_back(std::stoll((*it)[1]));
    t.names.push_back((*it)[3]);
    t.probs.push_back(std::stod((*it)[4]));
  }
  return t;
}

int64_t field(const std::string& line, const std::string& key) {
  std::smatch m;
  if (!std::regex_search(line, m, std::regex("\"" + key + "\": (-?\\d+)"))) return -1;
  return std::stoll(m[1]);
}

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
  const auto dir = temp_dir("torch");
  const std::string python = python_with_torch(dir, true);
  if (python.empty()) {
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
    // The ImageNet-style one trained in NHWC: its convolutions' weights are channels-last, its
    // export is contiguous all the same.
    if (c.net.arch == "imagenet") net->set_numerics({blpa::Precision::fp32, at::MemoryFormat::ChannelsLast});
    const auto x = torch::randn({3, c.net.in_channels, c.size, c.size});
    torch::NoGradGuard no_grad;
    expected.push_back(net->forward(x));
    const std::string model = (dir / ("model" + std::to_string(i) + ".pt")).string();
    const std::string input = (dir / ("input" + std::to_string(i) + ".f32")).string();
    blpa::export_state_dict(model, net);  // what blpa-train --export writes
    write_bytes(input, x.data_ptr<float>(), x.nbytes());
    args += " " + model + " " + input + " " + fmt::format("{}", fmt::join(x.sizes(), "x"));
  }
  // The other depths by their state dicts' names and shapes alone (Python builds them on the
  // meta device, without weights).
  const std::vector<blpa::NetConfig> shapes_only{{"cifar", 164, 3, 100, {}},
                                                 {"imagenet", 101, 3, 1000, {}},
                                                 {"imagenet", 152, 3, 1000, {}},
                                                 {"imagenet", 200, 3, 1000, {}}};
  std::map<std::string, int64_t> expected_keys;
  {
    std::ofstream keys(dir / "keys.txt");
    for (const auto& c : shapes_only) {
      const blpa::ResNet net(c);
      keys << "net " << c.arch << " " << c.depth << " " << c.in_channels << " " << c.num_classes << "\n";
      auto tensors = net->named_parameters();
      for (const auto& b : net->named_buffers()) tensors.insert(b.key(), b.value());
      for (const auto& t : tensors) keys << t.key() << " " << fmt::format("{}", fmt::join(t.value().sizes(), ",")) << "\n";
      expected_keys[c.arch + "-" + std::to_string(c.depth)] = static_cast<int64_t>(tensors.size());
    }
  }
  const std::string script = R"PY(
import io, sys, torch
sys.path.insert(0, sys.argv[1])
import blpa_torch
nets = {}
for line in open(sys.argv[2]):
    f = line.split()
    if f[0] == "net":
        want = nets[tuple(f[1:])] = {}
    else:
        want[f[0]] = tuple(int(d) for d in f[1].split(",")) if len(f) > 1 else ()
for (arch, depth, c, k), want in nets.items():
    with torch.device("meta"):
        net = blpa_torch.ResNet(arch, int(depth), int(c), int(k))
    have = {name: tuple(t.shape) for name, t in net.state_dict().items()}
    bad = set(want.items()) ^ set(have.items())
    print("keys", f"{arch}-{depth}", len(have), len(bad), *sorted(bad)[:4])
a = sys.argv[3:]
for model, inp, shape in zip(a[0::3], a[1::3], a[2::3]):
    net = blpa_torch.load(model).eval()  # strict load_state_dict
    dense = all(t.is_contiguous() and t.dtype == torch.float32 for t in torch.load(model).values())
    # from a file object too, as torch.load: the checkpoint check leaves it where it was
    twin = blpa_torch.load(io.BytesIO(open(model, "rb").read())).eval()
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), twin.state_dict().values()))
    x = torch.frombuffer(bytearray(open(inp, "rb").read()), dtype=torch.float32)
    with torch.no_grad():
        y = net(x.view(*map(int, shape.split("x"))))
    print(net.arch, net.depth, net.stem.in_channels, net.fc.out_features, int(dense), *map(repr, y.flatten().tolist()))
)PY";
  std::ofstream(dir / "check.py") << script;
  const Run r = shell(python + " " + (dir / "check.py").string() + " " + BLPA_SOURCE_DIR "/scripts " +
                          (dir / "keys.txt").string() + args, dir);
  CAPTURE(r.out, r.err);
  REQUIRE(r.code == 0);
  auto lines = r.lines();
  REQUIRE(lines.size() == shapes_only.size() + cases.size());
  for (size_t i = 0; i < shapes_only.size(); ++i) {  // "keys NAME COUNT MISMATCHES [the first few]"
    CAPTURE(lines[i]);
    std::istringstream in(lines[i]);
    std::string tag, name;
    int64_t count = -1, bad = -1;
    in >> tag >> name >> count >> bad;
    CHECK(tag == "keys");
    CHECK(count == expected_keys[name]);
    CHECK(bad == 0);
  }
  lines.erase(lines.begin(), lines.begin() + static_cast<std::ptrdiff_t>(shapes_only.size()));
  for (size_t i = 0; i < cases.size(); ++i) {
    std::istringstream in(lines[i]);
    std::string arch;
    int depth = 0;
    int64_t channels = 0, classes = 0;
    int dense = -1;
    in >> arch >> depth >> channels >> classes >> dense;
    CHECK(dense == 1);  // every tensor of the export contiguous float32
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

// A Python user's ImageNet evaluation gives blpa-eval's numbers only with blpa-eval's input:
// the same decoded pixels (decode_scale) and the same crops, resized the same way (eval_views).
TEST_CASE("interop: blpa_torch.py's decode_scale and eval_views give blpa-eval's input bit for bit", "[interop]") {
  OneThread one_thread;
  using namespace blpa::data;
  const auto dir = temp_dir("eval-views");
  const std::string python = python_with_torch(dir, true);
  if (python.empty()) {
    remove_tree(dir);
    return;
  }
  // Shapes that shrink (landscape, portrait, long), stay (a 256 square: its centre crop is
  // taken as it is) and grow (shorter side under 256), with odd sides that make the boxes round.
  const std::vector<std::pair<int, int>> shapes{{500, 375}, {375, 500}, {256, 256},
                                                {240, 201}, {1001, 263}, {333, 777}};
  const auto norm = imagenet_normalisation();
  std::string args;
  torch::manual_seed(11);
  for (size_t i = 0; i < shapes.size(); ++i) {
    const auto [w, h] = shapes[i];
    const auto pixels = torch::randint(0, 256, {h, w, 3}, torch::kByte).contiguous();
    Image img{w, h, std::vector<uint8_t>(pixels.data_ptr<uint8_t>(), pixels.data_ptr<uint8_t>() + pixels.numel())};
    for (const bool ten : {false, true}) {
      auto views = torch::empty({ten ? 10 : 1, 3, 224, 224});
      eval_views(img, 256, 224, ten, norm, views);
      write_bytes(dir / fmt::format("views{}-{}.f32", i, int(ten)), views.data_ptr<float>(), views.nbytes());
    }
    write_bytes(dir / fmt::format("image{}.u8", i), img.rgb.data(), img.rgb.size());
    args += fmt::format(" {}x{}", w, h);
  }
  // The scale of the decode, from JPEGs of camera and web sizes (flat grey: only the size counts).
  std::ofstream scales(dir / "scales.txt");
  for (const auto& [w, h] : std::vector<std::pair<int, int>>{
           {500, 375}, {375, 500}, {640, 480}, {1024, 768}, {2000, 1500}, {3000, 2000}, {300, 299}, {257, 1000},
           {200, 150}, {4000, 2250}}) {
    const std::vector<uint8_t> grey(size_t(w) * h, 128);
    const auto jpeg = encode_jpeg(grey.data(), w, h, JpegPixels::gray, 75);
    const Decoded d = decode_jpeg(jpeg.data(), jpeg.size(), 256);
    REQUIRE(d.status == DecodeStatus::ok);
    scales << w << " " << h << " " << d.scale_num << " " << d.scale_denom << " " << d.image.width << " "
           << d.image.height << "\n";
  }
  scales.close();
  const std::string script = R"PY(
import sys, torch
sys.path.insert(0, sys.argv[1])
import blpa_torch
d = sys.argv[2]
def read(path, dtype):
    return torch.frombuffer(bytearray(open(path, "rb").read()), dtype=dtype)
for i, shape in enumerate(sys.argv[3:]):
    w, h = map(int, shape.split("x"))
    rgb = read(f"{d}/image{i}.u8", torch.uint8).view(h, w, 3)
    for ten in (0, 1):
        want = read(f"{d}/views{i}-{ten}.f32", torch.float32).view(-1, 3, 224, 224)
        got = blpa_torch.eval_views(rgb, ten_crop=bool(ten))
        same = got.shape == want.shape and torch.equal(got, want)
        diff = (got - want).abs().max().item() if got.shape == want.shape else float("inf")
        print("views", shape, ten, int(same), diff)
for line in open(f"{d}/scales.txt"):
    w, h, *want = map(int, line.split())
    print("scale", w, h, int(list(blpa_torch.decode_scale(w, h)) == want), *blpa_torch.decode_scale(w, h))
)PY";
  std::ofstream(dir / "views.py") << script;
  const Run r =
      shell(python + " " + (dir / "views.py").string() + " " BLPA_SOURCE_DIR "/scripts " + dir.string() + args, dir);
  CAPTURE(r.out, r.err);
  REQUIRE(r.code == 0);
  const auto lines = r.lines();
  REQUIRE(lines.size() == 2 * shapes.size() + 10);
  for (const auto& line : lines) {  // "views WxH TEN SAME DIFF" or "scale W H SAME NUM DENOM W' H'"
    CAPTURE(line);
    std::istringstream in(line);
    std::string tag, a, b;
    int same = -1;
    in >> tag >> a >> b >> same;
    CHECK(same == 1);
  }
  remove_tree(dir);
}

TEST_CASE("interop: blpa-eval and blpa-predict rank equal scores in class order", "[interop]") {
  // bf16 logits tie often, and topk's order among equals is unspecified: blpa-predict's first
  // class depended on --top-k (a tie of classes 0 and 3 put 3 first with k = 1, 0 with k = 10)
  // and could differ from the top-1 blpa-eval counted.
  const auto scores = torch::tensor({{0.5f, 2.0f, 2.0f, -1.0f, 2.0f}, {1.0f, 1.0f, 1.0f, 1.0f, 1.0f}});
  for (int64_t k = 1; k <= 5; ++k) {
    CAPTURE(k);
    const auto [values, classes] = blpa::top_classes(scores, k);
    const std::vector<int64_t> first{1, 2, 4, 0, 3}, second{0, 1, 2, 3, 4};
    for (int64_t j = 0; j < k; ++j) {
      CHECK(classes[0][j].item<int64_t>() == first[j]);
      CHECK(classes[1][j].item<int64_t>() == second[j]);
      CHECK(values[0][j].item<float>() == scores[0][first[j]].item<float>());
    }
  }
  CHECK(blpa::top_classes(scores[0], 9).second.size(0) == 5);  // k past the classes: all of them
  // Ten views of an image: the log of their mean probability.
  const auto logits = torch::randn({20, 5});
  const auto mean = torch::softmax(logits, 1).view({2, 10, 5}).mean(1);
  CHECK(torch::allclose(blpa::log_class_probs(logits, 10).exp(), mean, 1e-6, 1e-7));
}

// End to end, on a bf16 run's checkpoint whose classifier ties classes 3 and 7 above the rest
// (its weights zero, its bias 1 there and -1 elsewhere): blpa-eval counts class 3 as every
// image's top-1 and {3, 7, 0, 1, 2} as its top-5, and blpa-predict ranks them so, whatever
// --top-k (topk's order among equals is unspecified).
TEST_CASE("interop: blpa-eval and blpa-predict break a bf16 run's tie alike, end to end", "[interop]") {
  OneThread one_thread;
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("tie");
  const std::string ck = (dir / "run.ckpt").string(), tie = (dir / "tie.ckpt").string();
  REQUIRE(run(BLPA_TRAIN_EXE, small_run({"--iterations", "1", "--precision", "bf16", "--checkpoint", ck}), dir)
              .code == 0);
  {
    const blpa::Checkpoint c = blpa::read_checkpoint(ck);
    REQUIRE(c.config.at("precision") == "bf16");
    auto model = blpa::load_model(c);
    auto opt = blpa::make_optimizer(model, blpa::TrainConfig{});
    blpa::load_training_state(c, model, opt);
    torch::NoGradGuard no_grad;
    auto params = model->named_parameters();
    params["fc.weight"].zero_();
    params["fc.bias"].fill_(-1.0f);
    params["fc.bias"][3].fill_(1.0f);
    params["fc.bias"][7].fill_(1.0f);
    std::string config;
    for (const auto& [key, value] : c.config) config += key + "=" + value + "\n";
    blpa::save_checkpoint(tie, c.identity, config, c.state, model, opt);
  }
  constexpr int64_t n = 64;
  std::vector<int64_t> labels;
  for (const char* k : {"1", "10"}) {
    const Run p = run(BLPA_PREDICT_EXE, {"--checkpoint", tie, "--from-dataset", "0.." + std::to_string(n), "--top-k", k},
                      dir);
    CAPTURE(k, p.err);
    REQUIRE(p.code == 0);
    const auto lines = p.lines();
    REQUIRE(lines.size() == size_t(n));
    labels.clear();
    for (const auto& line : lines) {
      CAPTURE(line);
      const Top t = parse_top(line);
      REQUIRE(!t.classes.empty());
      CHECK(t.classes.front() == 3);
      if (t.classes.size() == 10) CHECK(t.classes == std::vector<int64_t>{3, 7, 0, 1, 2, 4, 5, 6, 8, 9});
      labels.push_back(field(line, "label"));
    }
  }
  const Run e = run(BLPA_EVAL_EXE, {"--checkpoint", tie, "--subset", std::to_string(n), "--json"}, dir);
  CAPTURE(e.out, e.err);
  REQUIRE(e.code == 0);
  std::smatch m;
  REQUIRE(std::regex_search(e.out, m, std::regex(R"("top1": ([0-9.]+), "top5": ([0-9.]+))")));
  int64_t top1 = 0, top5 = 0;
  for (const int64_t l : labels) {
    top1 += l == 3;
    top5 += l == 3 || l == 7 || l <= 2;
  }
  CHECK(std::llround(std::stod(m[1]) * n) == top1);
  CHECK(std::llround(std::stod(m[2]) * n) == top5);
  remove_tree(dir);
}

TEST_CASE("interop: blpa-predict on Fashion-MNIST records agrees with blpa-eval and with the network", "[interop]") {
  OneThread one_thread;
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("predict-fm");
  const std::string ck = (dir / "fm.ckpt").string(), pt = (dir / "fm.pt").string();
  const std::string log = (dir / "fm.jsonl").string(), summary = (dir / "fm.json").string();
  REQUIRE(run(BLPA_TRAIN_EXE, small_run({"--checkpoint", ck, "--export", pt, "--log", log, "--summary", summary}), dir)
              .code == 0);
  constexpr int64_t n = 100;
  // The exported weights are for Python: given as a checkpoint, they are named for what they are.
  for (const char* exe : {BLPA_EVAL_EXE, BLPA_PREDICT_EXE}) {
    const bool predict = std::string(exe) == BLPA_PREDICT_EXE;
    const Run x = run(exe, {"--checkpoint", pt, predict ? "--from-dataset" : "--subset", predict ? "0..2" : "2"}, dir);
    CAPTURE(exe, x.err);
    CHECK(x.code != 0);
    CHECK(x.err.find(pt + " is not a blpa-train checkpoint (a torch.save file, such as blpa-train --export writes") !=
          std::string::npos);
  }
  // And the other way round: blpa_torch.py given the checkpoint says what it is, in one line.
  if (const std::string python = python_with_torch(dir, false); !python.empty()) {
    const Run py = shell(python + " " BLPA_SOURCE_DIR "/scripts/blpa_torch.py " + ck, dir);
    CAPTURE(py.err);
    CHECK(py.code == 1);
    CHECK(py.err.find(ck + " is a blpa-train checkpoint, not an --export file: blpa-eval --checkpoint " + ck +
                      " --export MODEL.pt writes one from it") != std::string::npos);
    CHECK(py.err.find("Traceback") == std::string::npos);
    // An export cut short, and a file of text: torch.load's own error, in one line.
    const std::string bytes = slurp(pt), cut = (dir / "cut.pt").string(), txt = (dir / "text.pt").string();
    std::ofstream(cut, std::ios::binary) << bytes.substr(0, bytes.size() / 2);
    std::ofstream(txt) << "hello\n";
    for (const std::string& bad : {cut, txt}) {
      const Run b = shell(python + " " BLPA_SOURCE_DIR "/scripts/blpa_torch.py " + bad, dir);
      CAPTURE(b.err);
      CHECK(b.code == 1);
      CHECK(b.err.find("blpa_torch.py: " + bad + " cannot be read as a torch.save file (") != std::string::npos);
      CHECK(b.err.find("Traceback") == std::string::npos);
    }
    // A bit flipped in the largest tensor: torch.load does not check the CRCs, and the network
    // loaded "strictly", with a loss of 2.4e6 for the run's 1.1.
    size_t offset = 0, largest = 0;
    std::string largest_name;
    {
      caffe2::serialize::PyTorchStreamReader reader(pt);
      for (const auto& name : reader.getAllRecords())
        if (const size_t size = reader.getRecordSize(name); size > largest)
          largest = size, offset = reader.getRecordOffset(name) + size / 2, largest_name = name;
    }
    std::string flipped = bytes;
    REQUIRE(offset < flipped.size());
    flipped[offset] ^= 0x10;
    const std::string flip = (dir / "flip.pt").string();
    std::ofstream(flip, std::ios::binary) << flipped;
    const Run f = shell(python + " " BLPA_SOURCE_DIR "/scripts/blpa_torch.py " + flip, dir);
    CAPTURE(f.err);
    CHECK(f.code == 1);
    CHECK(f.err.find("blpa_torch.py: " + flip + " is damaged: its record ") != std::string::npos);
    CHECK(f.err.find(largest_name + " fails its CRC check") != std::string::npos);
  }

  // blpa-eval --export writes from the checkpoint what the run's --export wrote (a run trained
  // without --export, or on several ranks, had no other way to one); again over its own, but
  // not over another file, nor with an evaluation's flags, which it would ignore.
  const std::string again = (dir / "again.pt").string();
  const Run x = run(BLPA_EVAL_EXE, {"--checkpoint", ck, "--export", again, "--json"}, dir);
  CAPTURE(x.out, x.err);
  REQUIRE(x.code == 0);
  CHECK(slurp(again) == slurp(pt));
  CHECK(x.out.find("\"export\": " + blpa::json_string(again)) != std::string::npos);
  CHECK(run(BLPA_EVAL_EXE, {"--checkpoint", ck, "--export", again}, dir).code == 0);
  // Into a folder not made yet, as blpa-train's outputs (it failed at the write, exit 1), and
  // on cpu:0, which is the CPU (it was "this machine has no CUDA device").
  const std::string deep = (dir / "new" / "deeper" / "a.pt").string();
  const Run into_new = run(BLPA_EVAL_EXE, {"--checkpoint", ck, "--export", deep}, dir);
  CAPTURE(into_new.err);
  CHECK(into_new.code == 0);
  const Run cpu0 = run(BLPA_EVAL_EXE, {"--checkpoint", ck, "--device", "cpu:0", "--subset", "8"}, dir);
  CAPTURE(cpu0.err);
  CHECK(cpu0.code == 0);
  CHECK(slurp(deep) == slurp(pt));
  const Run no_folder = run(BLPA_EVAL_EXE, {"--checkpoint", ck, "--export", log + "/a.pt"}, dir);
  CHECK(no_folder.code == 2);
  CHECK(no_folder.err.find("--export " + log + "/a.pt: " + log + " is not a folder") != std::string::npos);
  const std::string made = (dir / "made.pt").string();  // mktemp's: empty
  std::ofstream(made).close();
  CHECK(run(BLPA_EVAL_EXE, {"--checkpoint", ck, "--export", made}, dir).code == 0);
  CHECK(slurp(made) == slurp(pt));
  const Run over = run(BLPA_EVAL_EXE, {"--checkpoint", ck, "--export", log}, dir);
  CHECK(over.code == 2);
  CHECK(over.err.find("--export " + log + " already exists and is not an export (not a PyTorch archive, or a "
                       "damaged one): give another path") != std::string::npos);
  // Nor over a file without a run id (a user's torch.save state dict; an export from before run
  // ids), nor over the checkpoint itself: both were replaced where the checkpoint had no run id.
  const std::string mine = (dir / "mine.pt").string();
  blpa::ResNet mine_net(blpa::NetConfig{"cifar", 11, 1, 10, {blpa::Mode::plain}});
  blpa::export_state_dict(mine, mine_net);
  const std::string mine_bytes = slurp(mine), ck_bytes = slurp(ck);
  const Run no_id = run(BLPA_EVAL_EXE, {"--checkpoint", ck, "--export", mine}, dir);
  CHECK(no_id.code == 2);
  CHECK(no_id.err.find("--export " + mine + " already exists and holds no run id") != std::string::npos);
  const Run itself = run(BLPA_EVAL_EXE, {"--checkpoint", ck, "--export", ck}, dir);
  CHECK(itself.code == 2);
  CHECK(itself.err.find("--export " + ck + " already exists and is a checkpoint (or another TorchScript archive), "
                        "not an export") != std::string::npos);
  CHECK(slurp(mine) == mine_bytes);
  CHECK(slurp(ck) == ck_bytes);
  const Run mixed = run(BLPA_EVAL_EXE, {"--checkpoint", ck, "--export", again, "--subset", "10"}, dir);
  CHECK(mixed.code == 2);
  CHECK(mixed.err.find("--subset is for an evaluation, and --export evaluates nothing") != std::string::npos);

  const Run e = run(BLPA_EVAL_EXE, {"--checkpoint", ck, "--subset", std::to_string(n), "--json"}, dir);
  CAPTURE(e.out, e.err);
  REQUIRE(e.code == 0);
  std::smatch m;
  REQUIRE(std::regex_search(e.out, m, std::regex(R"("loss": ([0-9.]+), "top1": ([0-9.]+), "top5": ([0-9.]+))")));
  const double eval_loss = std::stod(m[1]), eval_top1 = std::stod(m[2]), eval_top5 = std::stod(m[3]);
  // The checkpoint's iteration and run, for a table of scores.
  const auto trained = blpa::read_checkpoint(ck);
  CHECK(e.out.find(fmt::format("\"iteration\": {}, \"run_id\": {},", trained.state.iteration,
                               blpa::json_string(trained.config.at("run_id")))) != std::string::npos);

  const Run p =
      run(BLPA_PREDICT_EXE, {"--checkpoint", ck, "--from-dataset", "0.." + std::to_string(n), "--top-k", "10"}, dir);
  CAPTURE(p.err);
  REQUIRE(p.code == 0);
  const auto lines = p.lines();
  REQUIRE(static_cast<int64_t>(lines.size()) == n);

  // The network itself on the same images, normalised as the trainer did (its 512 training images).
  auto model = blpa::load_model(blpa::read_checkpoint(ck));
  const auto dir_fm = std::string(blpa::data::kDebianFashionMnist);
  auto train = blpa::data::load("fashion-mnist", dir_fm, true);
  train.images = train.images.narrow(0, 0, 512).contiguous();
  const auto test = blpa::data::load("fashion-mnist", dir_fm, false);
  std::vector<int64_t> idx(n);
  for (int64_t i = 0; i < n; ++i) idx[i] = i;
  const auto norm = blpa::data::channel_stats(train);
  const auto batch = blpa::data::make_batch(test, idx, norm, nullptr, 0);
  // The log's config record and the summary carry that normalisation, for the export's users.
  const std::string recorded = fmt::format("\"normalisation\": {{\"mean\": [{}], \"std\": [{}]}}}}\n",
                                           fmt::join(norm.mean, ", "), fmt::join(norm.std, ", "));
  CAPTURE(recorded);
  const std::string config_record = slurp(log).substr(0, slurp(log).find('\n') + 1);
  CHECK(config_record.find("{\"type\": \"config\"") == 0);
  CHECK(config_record.find("\"cuda_graphs\": \"off\"") != std::string::npos);  // as it acted on the CPU, not auto
  CHECK(config_record.ends_with(recorded));
  CHECK(slurp(summary).ends_with(recorded));
  torch::Tensor prob;
  {
    torch::NoGradGuard no_grad;
    prob = torch::softmax(model->forward(batch.images), 1);
  }

  int64_t top1 = 0, top5 = 0;
  double loss = 0;
  for (int64_t i = 0; i < n; ++i) {
    CAPTURE(i, lines[i]);
    REQUIRE(field(lines[i], "index") == i);
    const int64_t label = field(lines[i], "label");
    REQUIRE(label == batch.labels[i].item<int64_t>());
    const Top t = parse_top(lines[i]);
    REQUIRE(t.classes.size() == 10);
    for (size_t j = 0; j < 10; ++j) {  // the probabilities are the network's softmax, sorted
      CHECK(std::abs(t.probs[j] - prob[i][t.classes[j]].item<double>()) <= 1e-5);
      if (j > 0) CHECK(t.probs[j] <= t.probs[j - 1]);
    }
    CHECK(t.classes[0] == prob[i].argmax().item<int64_t>());
    CHECK(t.names[0] == std::vector<std::string>{"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                                 "Shirt", "Sneaker", "Bag", "Ankle boot"}[t.classes[0]]);
    const auto at = std::find(t.classes.begin(), t.classes.end(), label) - t.classes.begin();
    top1 += at == 0;
    top5 += at < 5;
    loss -= std::log(t.probs[at]);
  }
  // blpa-eval's figures from blpa-predict's per-image output.
  CHECK(top1 == std::llround(eval_top1 * n));
  CHECK(top5 == std::llround(eval_top5 * n));
  CHECK(std::abs(loss / n - eval_loss) <= 1e-4 * std::max(1.0, eval_loss));

  // Flags that do not fit the checkpoint are refused, naming what to do instead.
  const Run files = run(BLPA_PREDICT_EXE, {"--checkpoint", ck, (dir / "x.jpg").string()}, dir);
  CHECK(files.code == 2);
  CHECK(files.err.find("classify records of that data set with --from-dataset N..M") != std::string::npos);
  const Run past = run(BLPA_PREDICT_EXE, {"--checkpoint", ck, "--from-dataset", "9990..10001"}, dir);
  CHECK(past.code == 2);
  CHECK(past.err.find("has 10000 records") != std::string::npos);
  const Run range = run(BLPA_PREDICT_EXE, {"--checkpoint", ck, "--from-dataset", "5..5"}, dir);
  CHECK(range.code == 2);
  CHECK(range.err.find("needs 0 <= N < M") != std::string::npos);
  const Run resize = run(BLPA_PREDICT_EXE, {"--checkpoint", ck, "--from-dataset", "0..2", "--resize", "300"}, dir);
  CHECK(resize.code == 2);  // ignored, where blpa-eval refuses it
  CHECK(resize.err.find("--resize is for ImageNet-style images") != std::string::npos);
  // The largest --batch from a record past 0: s + batch overflowed, and the batch grew without end.
  const Run huge = run(BLPA_PREDICT_EXE, {"--checkpoint", ck, "--from-dataset", "1..3", "--batch",
                                          "9223372036854775807"}, dir);
  CAPTURE(huge.err);
  CHECK(huge.code == 0);
  CHECK(huge.lines().size() == 2);
  const Run k = run(BLPA_PREDICT_EXE, {"--checkpoint", ck, "--from-dataset", "0..2", "--top-k", "x"}, dir);
  CHECK(k.code == 2);
  CHECK(k.err.find("--top-k: 'x' is not an integer") != std::string::npos);
  // A folder given as the names file was read as a file of no names ("0 names for ...").
  const Run names = run(BLPA_PREDICT_EXE, {"--checkpoint", ck, "--from-dataset", "0..2", "--class-names",
                                           dir.string()}, dir);
  CHECK(names.code == 2);  // a bad flag, as a --checkpoint folder is
  CHECK(names.err.find("--class-names " + dir.string() + ": is a directory") != std::string::npos);
  // One that does not exist: a bad flag too (it exited 1 with "cannot be read").
  const Run none = run(BLPA_PREDICT_EXE, {"--checkpoint", ck, "--from-dataset", "0..2", "--class-names",
                                          (dir / "none.txt").string()}, dir);
  CHECK(none.code == 2);
  CHECK(none.err.find("--class-names " + (dir / "none.txt").string() + ": no such file") != std::string::npos);
  // A byte-order mark is no part of the first name; a blank line within is refused.
  std::ofstream(dir / "bom.txt") << "\xEF\xBB\xBFzero\none\ntwo\nthree\nfour\nfive\nsix\nseven\neight\nnine\n";
  const Run bom = run(BLPA_PREDICT_EXE, {"--checkpoint", ck, "--from-dataset", "0..2", "--top-k", "10",
                                         "--class-names", (dir / "bom.txt").string()}, dir);
  CAPTURE(bom.err);
  CHECK(bom.code == 0);
  CHECK(bom.out.find("\"name\": \"zero\"") != std::string::npos);
  std::ofstream(dir / "gap.txt") << "zero\n\ntwo\nthree\nfour\nfive\nsix\nseven\neight\nnine\n";
  const Run gap = run(BLPA_PREDICT_EXE, {"--checkpoint", ck, "--from-dataset", "0..2", "--class-names",
                                         (dir / "gap.txt").string()}, dir);
  CHECK(gap.code == 2);
  CHECK(gap.err.find("gap.txt: line 2 is blank") != std::string::npos);
  // Names of another data set (it exited 1, an error of the run, where the flag does not fit).
  std::ofstream(dir / "three.txt") << "a\nb\nc\n";
  const Run three = run(BLPA_PREDICT_EXE, {"--checkpoint", ck, "--from-dataset", "0..2", "--class-names",
                                           (dir / "three.txt").string()}, dir);
  CHECK(three.code == 2);
  CHECK(three.err.find("3 names for a network of 10 classes") != std::string::npos);
  remove_tree(dir);
}

TEST_CASE("interop: blpa-predict classifies JPEGs with the evaluation transform and skips bad ones", "[interop]") {
  OneThread one_thread;
  using namespace blpa::data;
  const auto dir = temp_dir("predict-jpeg");
  // An ImageNet-style checkpoint (ResNet-50, 3 classes, random weights) whose data folder
  // names the classes; no training needed for what is tested here.
  const std::vector<std::string> wnids{"n01440764", "n01443537", "n01484850"};
  for (const auto& w : wnids) fs::create_directories(dir / "data" / "train" / w);
  blpa::TrainConfig c;
  c.dataset = "imagenet";
  c.data_dir = (dir / "data").string();
  c.arch = "imagenet";
  c.depth = 50;
  torch::manual_seed(5);
  auto net = scrambled({"imagenet", 50, 3, 3, {blpa::Mode::blpa, 4}}, 40, false);
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
  const std::string ck = (dir / "in.ckpt").string();
  blpa::save_checkpoint(ck, c.identity(), c.describe(), {}, net, opt);

  // Good images of several shapes (grey too), a truncated JPEG, text under a JPEG name.
  auto image = [](int w, int h, int seed) {
    std::vector<uint8_t> rgb(size_t(w) * h * 3);
    for (size_t i = 0; i < rgb.size(); ++i) rgb[i] = static_cast<uint8_t>((i * 7 + seed * 31 + (i / 97) * 13) % 256);
    return encode_jpeg(rgb.data(), w, h, JpegPixels::rgb, 90);
  };
  const auto a = image(48, 40, 1), b = image(36, 60, 2);
  std::vector<uint8_t> grey(50 * 50);
  for (size_t i = 0; i < grey.size(); ++i) grey[i] = static_cast<uint8_t>(i % 251);
  const auto g = encode_jpeg(grey.data(), 50, 50, JpegPixels::gray, 90);
  write_bytes(dir / "img" / "a.jpg", a.data(), a.size());
  write_bytes(dir / "img" / "sub" / "b.JPEG", b.data(), b.size());
  write_bytes(dir / "img" / "c.jpeg", g.data(), g.size());
  write_bytes(dir / "img" / "cut.jpg", a.data(), a.size() / 2);
  write_bytes(dir / "img" / "notes.jpg", "not an image\n", 13);
  write_bytes(dir / "img" / "readme.txt", "not listed\n", 11);  // not a .jpg: a folder skips it
  fs::create_directory_symlink(dir / "img", dir / "img" / "sub" / "loop");  // not followed

  // What the library computes for the good ones: blpa-eval's batches (imagenet_eval_batch).
  ImageList good;
  good.root = (dir / "img").string();
  good.paths = {"a.jpg", "c.jpeg", "sub/b.JPEG"};  // the folder's order: sorted, depth first
  good.labels = {0, 0, 0};
  auto expect = [&](bool ten) {
    const auto batch = imagenet_eval_batch(good, 0, 3, 36, 32, ten, imagenet_normalisation(), nullptr);
    torch::NoGradGuard no_grad;
    return torch::softmax(net->forward(batch.images), 1).view({3, ten ? 10 : 1, -1}).mean(1);
  };
  for (const bool ten : {false, true}) {
    std::vector<std::string> args{"--checkpoint", ck, "--resize", "36", "--crop", "32", "--top-k", "2",
                                  "--workers", "2", "--batch", "2", (dir / "img").string() + (ten ? "/" : "")};
    if (ten) args.push_back("--ten-crop");
    const Run r = run(BLPA_PREDICT_EXE, args, dir);
    CAPTURE(ten, r.out, r.err);
    REQUIRE(r.code == 0);  // some images were classified
    const auto lines = r.lines();
    REQUIRE(lines.size() == 5);
    const std::vector<std::string> order{"a.jpg", "c.jpeg", "cut.jpg", "notes.jpg", "sub/b.JPEG"};
    const auto want = expect(ten);
    int64_t k = 0;
    for (size_t i = 0; i < lines.size(); ++i) {
      CAPTURE(lines[i]);
      CHECK(lines[i].find("\"file\": \"" + (dir / "img" / order[i]).string() + "\"") != std::string::npos);
      if (order[i] == "cut.jpg" || order[i] == "notes.jpg") {
        CHECK(lines[i].find(order[i] == "cut.jpg" ? "\"error\": \"truncated" : "\"error\": \"not_jpeg") !=
              std::string::npos);
        CHECK(r.err.find((dir / "img" / order[i]).string() + ": skipped (") != std::string::npos);
        continue;
      }
      const Top t = parse_top(lines[i]);
      REQUIRE(t.classes.size() == 2);
      for (size_t j = 0; j < 2; ++j) {
        CHECK(t.names[j] == wnids[t.classes[j]]);
        CHECK(std::abs(t.probs[j] - want[k][t.classes[j]].item<double>()) <= 1e-5);
      }
      CHECK(t.classes[0] == want[k].argmax().item<int64_t>());
      ++k;
    }
  }

  // A list file: relative to its folder, labels printed, a missing file reported.
  // A byte-order mark and spaces around the label are taken, as blpa-train takes them.
  std::ofstream(dir / "list.txt") << "\xEF\xBB\xBF# images\nimg/a.jpg , 2\n\nimg/missing.jpg\n"
                                  << (dir / "img" / "c.jpeg").string() << "\n";
  const Run l = run(BLPA_PREDICT_EXE, {"--checkpoint", ck, "--resize", "36", "--crop", "32", "--list",
                                       (dir / "list.txt").string()}, dir);
  CAPTURE(l.out, l.err);
  CHECK(l.code == 0);
  const auto ll = l.lines();
  REQUIRE(ll.size() == 3);
  CHECK(field(ll[0], "label") == 2);
  CHECK(parse_top(ll[0]).classes.size() == 3);  // --top-k 5, capped at the 3 classes
  CHECK(ll[1].find("\"error\": \"unreadable: cannot read ") != std::string::npos);
  CHECK(ll[1].find("missing.jpg") != std::string::npos);
  CHECK(field(ll[2], "label") == -1);

  // A label the network has no class for: another data set's list, refused.
  std::ofstream(dir / "other.txt") << "img/a.jpg,7\n";
  const Run other = run(BLPA_PREDICT_EXE, {"--checkpoint", ck, "--list", (dir / "other.txt").string()}, dir);
  CHECK(other.code == 1);
  CHECK(other.err.find("label 7 of img/a.jpg is not a class of the network, which has 3") != std::string::npos);
  // --split with a list: it chooses --from-dataset's split, and was ignored.
  const Run split = run(BLPA_PREDICT_EXE, {"--checkpoint", ck, "--split", "train", "--list",
                                           (dir / "list.txt").string()}, dir);
  CHECK(split.code == 2);
  CHECK(split.err.find("--split chooses the split that --from-dataset reads") != std::string::npos);
  // A negative label, refused as blpa-train refuses it (-1 was taken for "no label").
  std::ofstream(dir / "negative.txt") << "img/a.jpg,-1\n";
  const Run negative = run(BLPA_PREDICT_EXE, {"--checkpoint", ck, "--list", (dir / "negative.txt").string()}, dir);
  CHECK(negative.code == 1);
  CHECK(negative.err.find("label -1 of img/a.jpg is negative: labels are classes, 0 to 2") != std::string::npos);

  // A file named with a comma is one file, as a shell gives it (cxxopts split it in two), and
  // an indented comment and a line of blanks in a list are skipped.
  fs::copy_file(dir / "img" / "a.jpg", dir / "photo, beach.jpg");
  const Run comma = run(BLPA_PREDICT_EXE, {"--checkpoint", ck, "--resize", "36", "--crop", "32",
                                           (dir / "photo, beach.jpg").string()}, dir);
  CAPTURE(comma.out, comma.err);
  CHECK(comma.code == 0);
  REQUIRE(comma.lines().size() == 1);
  CHECK(comma.lines()[0].find("\"file\": \"" + (dir / "photo, beach.jpg").string() + "\"") != std::string::npos);
  // Indentation and trailing blanks are no part of a path, with a label or without (they were
  // kept without one: "cannot read   img/a.jpg"), nor around a name with a comma.
  std::ofstream(dir / "indented.txt") << "  # a comment\n \t\nimg/a.jpg,1\n  img/a.jpg\nimg/a.jpg \t\n"
                                      << " photo, beach.jpg \n";
  const Run indented = run(BLPA_PREDICT_EXE, {"--checkpoint", ck, "--resize", "36", "--crop", "32", "--list",
                                              (dir / "indented.txt").string()}, dir);
  CAPTURE(indented.out, indented.err);
  CHECK(indented.code == 0);
  CHECK(indented.lines().size() == 4);
  CHECK(indented.out.find("\"error\"") == std::string::npos);
  CHECK(indented.out.find("\"file\": \"" + (dir / "photo, beach.jpg").string() + "\"") != std::string::npos);

  // Nothing classifiable: exit 1, every file reported.
  const Run bad = run(BLPA_PREDICT_EXE, {"--checkpoint", ck, (dir / "img" / "cut.jpg").string(),
                                         (dir / "img" / "notes.jpg").string()}, dir);
  CHECK(bad.code == 1);
  CHECK(bad.lines().size() == 2);
  CHECK(bad.err.find("none of the 2 images could be classified") != std::string::npos);
  // Records are for the in-memory data sets.
  const Run rec = run(BLPA_PREDICT_EXE, {"--checkpoint", ck, "--from-dataset", "0..4"}, dir);
  CHECK(rec.code == 2);
  CHECK(rec.err.find("give image files, folders or --list") != std::string::npos);
  remove_tree(dir);
}

TEST_CASE("interop: plot.sh renders one PNG per quantity from the logs of test runs", "[interop]") {
  OneThread one_thread;
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("plot");
  if (shell("command -v gnuplot", dir).code != 0) {
    std::cout << "BLPA_SKIP: gnuplot is not installed (scripts/setup.sh installs Debian's gnuplot-nox)" << std::endl;
    remove_tree(dir);
    return;
  }
  const std::string plain = (dir / "plain.jsonl").string(), blpa4 = (dir / "blpa4.jsonl").string();
  REQUIRE(run(BLPA_TRAIN_EXE, small_run({"--mode", "plain", "--eval-every", "2", "--log", plain}), dir).code == 0);
  REQUIRE(run(BLPA_TRAIN_EXE, small_run({"--mode", "blpa", "--bits", "4", "--eval-every", "2", "--log", blpa4}), dir)
              .code == 0);
  // A log without its configuration record (as logs written before it existed).
  std::ofstream(dir / "older.jsonl") << std::regex_replace(slurp(blpa4), std::regex(".*\"type\": \"config\".*\n"), "");

  const std::string plot = BLPA_SOURCE_DIR "/scripts/plot.sh";
  const Run r =
      run(plot, {"-o", (dir / "png").string(), "-p", "run-", plain, blpa4, (dir / "older.jsonl").string()}, dir);
  CAPTURE(r.out, r.err);
  REQUIRE(r.code == 0);
  // Legends from the configurations (the mode differs), the file name where there is none.
  CHECK(r.out.find("plain: " + plain) != std::string::npos);
  CHECK(r.out.find(blpa::ModeConfig{blpa::Mode::blpa, 4}.str() + ": " + blpa4) != std::string::npos);
  CHECK(r.out.find("older: ") != std::string::npos);
  for (const char* name : {"run-loss.png", "run-error.png", "run-images-per-s.png", "run-memory.png"}) {
    const std::string png = slurp(dir / "png" / name);
    CAPTURE(name);
    CHECK(png.size() > 2000);
    CHECK(png.rfind("\x89PNG\r\n\x1a\n", 0) == 0);
  }
  // A resumed run's legend names the settings it ended with: its --iterations grew from 2 to 6
  // (an option given twice: the last wins). Both runs are blpa-4: only that differs.
  const std::string resumed = (dir / "resumed.jsonl").string(), ck = (dir / "resumed.pt").string();
  REQUIRE(run(BLPA_TRAIN_EXE, small_run({"--iterations", "2", "--checkpoint", ck, "--log", resumed}), dir).code == 0);
  REQUIRE(run(BLPA_TRAIN_EXE, small_run({"--iterations", "6", "--checkpoint", ck, "--log", resumed, "--resume"}), dir)
              .code == 0);
  const Run both = run(plot, {"-o", (dir / "png").string(), blpa4, resumed}, dir);
  CAPTURE(both.out, both.err);
  CHECK(both.code == 0);
  CHECK(both.out.find("iterations 4: " + blpa4) != std::string::npos);
  CHECK(both.out.find("iterations 6: " + resumed) != std::string::npos);
  // The mode they share is in the title, since no legend names it.
  CHECK(both.out.find("title: fashion-mnist, cifar-11, " + blpa::ModeConfig{blpa::Mode::blpa, 4}.str() + ", batch ") !=
        std::string::npos);
  // A record cut short (a run killed while writing it) is left out: its missing accuracy read
  // as 0, a point at 100% error. Here the only evaluation is cut.
  const std::string text = slurp(plain);
  const auto eval_at = text.find("{\"type\": \"eval\"");
  REQUIRE(eval_at != std::string::npos);
  const std::string train_only = std::regex_replace(text, std::regex(".*\"type\": \"eval\".*\n"), "");
  std::ofstream(dir / "cut.jsonl") << train_only << text.substr(eval_at, 60) << "\n";
  const Run cut = run(plot, {"-o", (dir / "png").string(), "-p", "cut-", (dir / "cut.jsonl").string()}, dir);
  CAPTURE(cut.out, cut.err);
  CHECK(cut.code == 0);
  CHECK(cut.out.find("cut-error.png: no log has test error (%) records; not written") != std::string::npos);
  // A title is text to gnuplot, not a command (in its double quotes it ran `...`); an older
  // plot that the new logs cannot make goes, and no plot at all is an error.
  const fs::path ran = dir / "ran";
  const Run titled = shell(plot + " -o \"" + (dir / "png").string() + "\" -t \"a \\`touch " + ran.string() +
                               "\\` title\" \"" + plain + "\"", dir);  // \`: the shell runs nothing
  CAPTURE(titled.out, titled.err);
  CHECK(titled.code == 0);
  CHECK_FALSE(fs::exists(ran));
  CHECK(fs::file_size(dir / "png" / "loss.png") > 2000);
  std::ofstream(dir / "config-only.jsonl") << slurp(plain).substr(0, slurp(plain).find('\n') + 1);
  const Run none = run(plot, {"-o", (dir / "png").string(), (dir / "config-only.jsonl").string()}, dir);
  CHECK(none.code == 1);
  CHECK(none.out.find("loss.png: no log has training loss records; not written (the older one removed)") !=
        std::string::npos);
  CHECK_FALSE(fs::exists(dir / "png" / "loss.png"));
  CHECK(run(plot, {}, dir).code == 2);
  const Run missing = run(plot, {(dir / "none.jsonl").string()}, dir);
  CHECK(missing.code == 1);
  CHECK(missing.err.find("none.jsonl: not a readable file") != std::string::npos);
  remove_tree(dir);
}
