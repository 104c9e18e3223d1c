// The trainer end to end on the real Fashion-MNIST (2,000 images), resume, interrupt,
// damaged checkpoints and a diverging loss.
#include <blpa/checkpoint.h>
#include <blpa/codec.h>
#include <blpa/dataset.h>
#include <blpa/train.h>
#include <fmt/format.h>
#include <sys/wait.h>
#include <torch/serialize.h>
#include <unistd.h>

#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <regex>
#include <thread>
#include <tuple>

#include "test_support.h"

namespace fs = std::filesystem;

namespace {

fs::path temp_dir(const std::string& name) { return fresh_temp_dir("train-" + name); }

blpa::TrainConfig small(const fs::path& dir) {
  blpa::TrainConfig c;
  c.depth = 11;
  c.train_subset = 2000;
  c.test_subset = 500;
  c.batch = 32;
  c.iterations = 60;
  c.warmup = 0;
  c.lr = 0.02;
  c.steps = {};
  c.threads = 1;
  c.log_every = 10;
  c.eval_every = 0;
  c.progress = false;
  c.log_path = (dir / "log.jsonl").string();
  return c;
}

std::vector<double> logged(const std::string& path, const std::string& key) {
  std::ifstream f(path);
  std::vector<double> out;
  const std::regex re("\"" + key + "\": ([-0-9.e+]+)");
  std::smatch m;
  for (std::string line; std::getline(f, line);)
    if (std::regex_search(line, m, re)) out.push_back(std::stod(m[1]));
  return out;
}

c10::impl::GenericDict load_export(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(f)), {});
  return torch::pickle_load(bytes).toGenericDict();
}

int run_train(const std::vector<std::string>& args, pid_t* pid_out = nullptr) {
  std::vector<char*> argv{const_cast<char*>(BLPA_TRAIN_EXE)};
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  std::fflush(nullptr);  // or the child would write this process's buffered output again
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::execv(BLPA_TRAIN_EXE, argv.data());
    ::_exit(127);
  }
  if (pid_out) {
    *pid_out = pid;
    return 0;
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

}  // namespace

// Logs and summaries carry paths and messages: whatever their bytes, the JSON is valid UTF-8.
TEST_CASE("train: json_string escapes what JSON cannot hold and keeps UTF-8", "[train]") {
  CHECK(blpa::json_string("a\"b\\c\n\x01\x7f") == "\"a\\\"b\\\\c\\u000a\\u0001\\u007f\"");
  CHECK(blpa::json_string("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80") == "\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\"");
  // Bytes of no UTF-8 character: a Latin-1 path, a lone continuation byte, a truncated
  // sequence, an overlong form, a surrogate, past U+10FFFF.
  CHECK(blpa::json_string("name\xff.ckpt") == "\"name\\ufffd.ckpt\"");
  CHECK(blpa::json_string("\x80") == "\"\\ufffd\"");
  CHECK(blpa::json_string("\xe2\x82") == "\"\\ufffd\\ufffd\"");
  CHECK(blpa::json_string("\xc0\xaf") == "\"\\ufffd\\ufffd\"");
  CHECK(blpa::json_string("\xed\xa0\x80") == "\"\\ufffd\\ufffd\\ufffd\"");
  CHECK(blpa::json_string("\xf4\x90\x80\x80") == "\"\\ufffd\\ufffd\\ufffd\\ufffd\"");
}

TEST_CASE("train: plain and blpa-4 both learn on 2,000 Fashion-MNIST images", "[train]") {
  if (!have_fashion_mnist()) return;
  for (auto mode : {blpa::ModeConfig{blpa::Mode::plain, 8}, blpa::ModeConfig{blpa::Mode::blpa, 4}}) {
    const auto dir = temp_dir("learn");
    auto c = small(dir);
    c.mode = mode;
    const auto r = blpa::train(c);
    const auto loss = logged(c.log_path, "loss");
    REQUIRE(loss.size() == 6);
    std::cout << mode.str() << ": training loss " << loss.front() << " -> " << loss.back() << ", test accuracy "
              << r.test_acc << std::endl;
    CAPTURE(mode.str(), loss.front(), loss.back(), r.test_acc);
    CHECK(loss.back() < loss.front() - 0.5);
    CHECK(r.test_acc > 0.3);  // 3x chance; after 60 steps BN running statistics still lag (measured 0.36/0.43)
    CHECK(logged(c.log_path, "test_acc").size() == 1);
    CHECK(logged(c.log_path, "images_per_s").size() == 6);
    remove_tree(dir);
  }
}

TEST_CASE("train: N iterations, then a resume for N more, equal 2N straight bit for bit", "[train]") {
  if (!have_fashion_mnist()) return;
  // In fp32 NCHW, and in bf16 with channels-last activations.
  for (const auto& [precision, layout] : {std::pair{"fp32", "nchw"}, std::pair{"bf16", "nhwc"}}) {
    CAPTURE(precision, layout);
    const auto dir = temp_dir("resume");
    auto c = small(dir);
    c.precision = precision;
    c.memory_format = layout;
    c.iterations = 20;
    c.export_path = (dir / "straight.pt").string();
    blpa::train(c);

    c.checkpoint = (dir / "ck.pt").string();
    c.iterations = 10;
    c.export_path = "";
    c.overwrite = true;  // the log of the straight run
    blpa::train(c);
    c.iterations = 20;
    c.overwrite = false;
    c.resume = true;
    c.export_path = (dir / "resumed.pt").string();
    const auto r = blpa::train(c);
    CHECK(r.iteration == 20);

    auto a = load_export(dir / "straight.pt"), b = load_export(dir / "resumed.pt");
    REQUIRE(a.size() == b.size());
    for (const auto& e : a) {
      CAPTURE(e.key().toStringRef());
      CHECK(e.value().toTensor().scalar_type() == torch::kFloat);  // bf16 trains float32 weights
      CHECK(torch::equal(e.value().toTensor(), b.at(e.key()).toTensor()));
    }
    const auto loss = logged(c.log_path, "loss");
    REQUIRE(loss.size() == 2);
    CHECK(std::isfinite(loss.back()));
    // The precision is the run's identity; the layout may change on resume.
    auto other = c;
    other.iterations = 30;
    other.export_path = "";
    other.precision = std::string(precision) == "fp32" ? "bf16" : "fp32";
    CHECK_THROWS_WITH(blpa::train(other), Catch::Contains("precision: checkpoint " + std::string(precision)));
    // --precision and --memory-format auto resume at the checkpoint's (the CPU's auto alone
    // is fp32 NHWC).
    auto same = c;
    same.iterations = 22;
    same.export_path = "";
    same.precision = "auto";
    same.memory_format = "auto";
    CHECK(blpa::train(same).iteration == 22);
    const auto kept = blpa::read_checkpoint(c.checkpoint).config;
    CHECK(kept.at("precision") == precision);
    CHECK(kept.at("memory_format") == layout);
    remove_tree(dir);
  }
}

namespace {

// The identity and settings of checkpoint `ck` as a blpa from before --precision and
// --memory-format wrote them (neither in its config or identity), its run on `device`.
std::pair<std::string, std::string> before_the_flags(const blpa::Checkpoint& ck, const std::string& device) {
  std::string config;
  for (const auto& [key, value] : ck.config)
    if (key != "precision" && key != "memory_format") config += key + "=" + (key == "device" ? device : value) + "\n";
  std::string identity = ck.identity;
  identity.erase(identity.find(" precision=fp32"), std::string(" precision=fp32").size());
  return {identity, config};
}

// A run's checkpoint with its model and optimiser loaded, to be saved again as another blpa
// wrote it.
struct Loaded {
  Loaded(const std::string& path, const blpa::TrainConfig& c)
      : ck(blpa::read_checkpoint(path)), model(blpa::load_model(ck)), opt(blpa::make_optimizer(model, c)) {
    blpa::load_training_state(ck, model, opt);
  }
  // Saves it at path as a blpa from before --precision and --memory-format wrote it on device.
  void save_before_the_flags(const std::string& path, const std::string& device) {
    const auto [identity, config] = before_the_flags(ck, device);
    blpa::save_checkpoint(path, identity, config, ck.state, model, opt);
  }
  blpa::Checkpoint ck;  // (the members in the order the constructor makes them)
  blpa::ResNet model;
  torch::optim::SGD opt;
};

}  // namespace

TEST_CASE("train: a checkpoint from before --precision resumes only as it ran (fp32, on CUDA tf32), a tf32 one on the CPU in fp32", "[train]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("old-precision");
  auto c = small(dir);
  c.iterations = 4;
  c.checkpoint = (dir / "ck.pt").string();
  blpa::train(c);
  // The same checkpoint as an older blpa wrote it: no precision or memory_format in its
  // config or identity.
  Loaded trained(c.checkpoint, c);
  const auto& ck = trained.ck;
  REQUIRE(ck.config.count("precision"));
  REQUIRE(ck.config.at("device") == "cpu");
  c.checkpoint = (dir / "old.pt").string();
  trained.save_before_the_flags(c.checkpoint, "cpu");
  REQUIRE_FALSE(blpa::read_checkpoint(c.checkpoint).config.count("precision"));

  c.resume = true;
  c.iterations = 6;
  c.precision = "bf16";
  CHECK_THROWS_WITH(blpa::train(c), Catch::Contains("precision: checkpoint fp32, command line bf16"));
  {  // one a CUDA run wrote had TF32 convolutions: it counts as tf32, which the CPU, without
     // TF32, goes on in fp32 (were it refused, only a GPU could resume it); other precisions stay refused
    auto on_cuda = c;
    on_cuda.checkpoint = (dir / "old-cuda.pt").string();
    trained.save_before_the_flags(on_cuda.checkpoint, "cuda:0");
    CHECK_THROWS_WITH(blpa::train(on_cuda), Catch::Contains("precision: checkpoint tf32, command line bf16"));
    on_cuda.precision = "auto";
    CHECK(blpa::train(on_cuda).iteration == 6);
    CHECK(blpa::read_checkpoint(on_cuda.checkpoint).config.at("precision") == "fp32");
    // A tf32 checkpoint as this blpa writes it on CUDA: the same, with auto and with fp32.
    std::string tf32_identity = ck.identity;
    tf32_identity.replace(tf32_identity.find("precision=fp32"), std::string("precision=fp32").size(), "precision=tf32");
    for (const char* given : {"auto", "fp32"}) {
      CAPTURE(given);
      on_cuda.checkpoint = (dir / (std::string("tf32-") + given + ".pt")).string();
      blpa::save_checkpoint(on_cuda.checkpoint, tf32_identity,
                            before_the_flags(ck, "cuda:0").second + "precision=tf32\nmemory_format=nchw\n", ck.state,
                            trained.model, trained.opt);
      REQUIRE(blpa::read_checkpoint(on_cuda.checkpoint).config.at("precision") == "tf32");
      on_cuda.precision = given;
      CHECK(blpa::train(on_cuda).iteration == 6);
      CHECK(blpa::read_checkpoint(on_cuda.checkpoint).config.at("precision") == "fp32");
    }
  }
  c.precision = "auto";  // fp32 on the CPU
  c.memory_format = "auto";  // the checkpoint's: NCHW, as blpa ran before the flag
  const auto older = fs::path(c.checkpoint).replace_extension("copy.pt").string();
  fs::copy_file(c.checkpoint, older);
  CHECK(blpa::train(c).iteration == 6);
  CHECK(blpa::read_checkpoint(c.checkpoint).config.at("memory_format") == "nchw");
  c.checkpoint = older;
  c.memory_format = "nhwc";  // the layout may change
  CHECK(blpa::train(c).iteration == 6);
  CHECK(blpa::read_checkpoint(c.checkpoint).config.at("memory_format") == "nhwc");
  remove_tree(dir);
}

// A CPU run resumed on a GPU with auto goes on in its own precision and layout: fp32 (the CPU
// has no TF32), and NCHW for one from before the flags. The old one was refused as tf32 (the
// GPU's default) before trained_precision took the closest.
TEST_CASE("CUDA: a CPU run's checkpoint, old or new, resumes on the GPU in its fp32 and layout with auto",
          "[train][cuda]") {
  BLPA_REQUIRE_CUDA();
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("cpu-to-cuda");
  auto c = small(dir);
  c.iterations = 4;
  c.checkpoint = (dir / "new.pt").string();
  blpa::train(c);
  Loaded trained(c.checkpoint, c);
  REQUIRE(trained.ck.config.at("precision") == "fp32");
  const std::string layout = trained.ck.config.at("memory_format");
  trained.save_before_the_flags((dir / "old.pt").string(), "cpu");
  for (const auto& [name, kept_layout] : {std::pair<std::string, std::string>{"new.pt", layout}, {"old.pt", "nchw"}}) {
    CAPTURE(name);
    auto gpu = c;
    gpu.checkpoint = (dir / name).string();
    gpu.resume = true, gpu.iterations = 6, gpu.device = "cuda";
    gpu.precision = "auto", gpu.memory_format = "auto";
    CHECK(blpa::train(gpu).iteration == 6);
    const auto resumed = blpa::read_checkpoint(gpu.checkpoint).config;
    CHECK(resumed.at("precision") == "fp32");
    CHECK(resumed.at("memory_format") == kept_layout);
    CHECK(resumed.at("device").rfind("cuda", 0) == 0);
  }
  remove_tree(dir);
}

TEST_CASE("train: an incompatible or damaged checkpoint is refused and the good one survives", "[train]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("damaged");
  auto c = small(dir);
  c.iterations = 5;
  c.checkpoint = (dir / "ck.pt").string();
  blpa::train(c);
  const auto good = fs::file_size(c.checkpoint);

  auto other = c;
  other.iterations = 10;
  other.resume = true;
  other.mode = {blpa::Mode::blpa, 8};
  CHECK_THROWS_WITH(blpa::train(other), Catch::Contains("belongs to a different run") &&
                                            Catch::Contains("mode: checkpoint " + c.mode.str() + ", command line " + other.mode.str()));

  fs::copy_file(c.checkpoint, dir / "bad.pt");
  fs::resize_file(dir / "bad.pt", good / 2);
  auto damaged = other;
  damaged.mode = c.mode;
  damaged.checkpoint = (dir / "bad.pt").string();
  CHECK_THROWS_WITH(blpa::train(damaged), Catch::Contains("damaged or truncated"));

  auto resume = other;
  resume.mode = c.mode;
  CHECK(blpa::train(resume).iteration == 10);  // the good checkpoint still loads
  remove_tree(dir);
}

TEST_CASE("train: a diverging loss stops with the iteration and keeps the last good checkpoint", "[train]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("nan");
  auto c = small(dir);
  c.iterations = 5;
  c.checkpoint = (dir / "ck.pt").string();
  blpa::train(c);
  const auto before = fs::last_write_time(c.checkpoint);
  c.iterations = 200;
  c.lr = 1e9;
  c.resume = true;
  CHECK_THROWS_AS(blpa::train(c), blpa::NonFiniteLoss);
  CHECK_THROWS_WITH(blpa::train(c), Catch::Contains("at iteration") && Catch::Contains("was kept"));
  CHECK(fs::last_write_time(c.checkpoint) == before);
  remove_tree(dir);
}

TEST_CASE("train: blpa-train on SIGINT writes a checkpoint that --resume continues", "[train]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("sigint");
  const std::string ck = (dir / "ck.pt").string(), log = (dir / "log.jsonl").string();
  const std::vector<std::string> common{"--depth", "11", "--batch", "32", "--train-subset", "2000", "--test-subset",
                                        "200", "--threads", "1", "--eval-every", "0", "--log-every", "1",
                                        "--checkpoint", ck, "--checkpoint-every", "100000", "--log", log, "--quiet"};
  auto args = common;
  args.insert(args.end(), {"--iterations", "100000"});
  pid_t pid = 0;
  run_train(args, &pid);
  // Wait until it trains (a log record exists), then interrupt it.
  for (int i = 0; i < 600 && logged(log, "loss").size() < 3; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  ::kill(pid, SIGINT);
  int status = 0;
  ::waitpid(pid, &status, 0);
  // Ended by the signal once the checkpoint is written, so that a shell loop stops too.
  REQUIRE(WIFSIGNALED(status));
  CHECK(WTERMSIG(status) == SIGINT);
  REQUIRE(fs::exists(ck));
  const auto done = logged(log, "iter").back();

  args = common;
  args.insert(args.end(), {"--iterations", std::to_string(static_cast<int64_t>(done) + 3), "--resume"});
  CHECK(run_train(args) == 0);
  const auto iters = logged(log, "iter");
  CHECK(iters.back() == done + 3);
  remove_tree(dir);
}

TEST_CASE("train: blpa-train refuses bad flags and missing data with exit codes", "[train]") {
  CHECK(run_train({"--no-such-flag"}) == 2);
  CHECK(run_train({"--mode", "exact", "--bits", "4"}) == 2);
  CHECK(run_train({"--mode", "plain", "--window", "8"}) == 2);
  CHECK(run_train({"--bits", "3"}) == 2);
  for (const char* w : {"0", "-2", "nan", "inf", "x", "1e-35"}) CHECK(run_train({"--window", w}) == 2);
  for (const char* l : {"nan", "inf", "x"}) CHECK(run_train({"--lift", l}) == 2);
  CHECK(run_train({"--mode", "exact", "--lift", "1"}) == 2);
  CHECK(run_train({"--resume"}) == 2);
  CHECK(run_train({"--lr-steps", "100,50"}) == 2);
  CHECK(run_train({"--data-dir", "/nonexistent/blpa", "--quiet"}) == 1);
  CHECK(run_train({"--help"}) == 0);
}

TEST_CASE("train: --preset imagenet sets the paper's protocol and explicit flags win", "[train]") {
  const auto dir = temp_dir("preset");
  const std::string out = (dir / "config.txt").string();
  auto config = [&](const std::string& extra) {
    const std::string cmd = std::string(BLPA_TRAIN_EXE) + " --print-config " + extra + " > " + out + " 2>&1";
    REQUIRE(std::system(cmd.c_str()) == 0);
    std::ifstream f(out);
    return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  };
  // A folder of ImageNet's layout (--print-config looks at it, as the run does).
  fs::create_directories(dir / "imagenet" / "train");
  fs::create_directories(dir / "imagenet" / "val");
  const std::string data = " --data-dir " + (dir / "imagenet").string();
  {  // a val/ missing beside train/: said, not "give the folder that holds them"
    fs::create_directories(dir / "no-val" / "train");
    const std::string cmd = std::string(BLPA_TRAIN_EXE) + " --print-config --preset imagenet --data-dir " +
                            (dir / "no-val").string() + " > " + out + " 2>&1";
    CHECK(WEXITSTATUS(std::system(cmd.c_str())) == 1);
    std::ifstream f(out);
    CHECK(std::string((std::istreambuf_iterator<char>(f)), {}).find(": no val/ folder beside its train/") !=
          std::string::npos);
  }
  {  // one level too deep: it failed as ".../train/train: cannot open directory"
    const std::string deep = (dir / "imagenet" / "train").string();
    const std::string cmd = std::string(BLPA_TRAIN_EXE) + " --print-config --preset imagenet --data-dir " + deep +
                            " > " + out + " 2>&1";
    CHECK(WEXITSTATUS(std::system(cmd.c_str())) == 1);
    std::ifstream f(out);
    CHECK(std::string((std::istreambuf_iterator<char>(f)), {}).find("--data-dir " + deep + ": no train/ and val/ "
                                                                    "folders: give the folder that holds them") !=
          std::string::npos);
  }
  const std::string p = config("--preset imagenet" + data);
  const std::string mode = "mode=" + blpa::ModeConfig{blpa::Mode::blpa, 4}.str() + "\n";  // the default window
  for (const char* kv : {"dataset=imagenet\n", "arch=imagenet\n", "depth=152\n", "batch=256\n",
                                "iterations=640000\n", "lr=0.1\n", "warmup=0\n", "steps=160000,320000,480000\n",
                                "weight_decay=0.0001\n", mode.c_str()})
    CHECK(p.find(kv) != std::string::npos);
  const std::string o = config("--preset imagenet" + data + " --batch 64 --accum-steps 2 --depth 50");
  CHECK(o.find("batch=64\n") != std::string::npos);
  CHECK(o.find("depth=50\n") != std::string::npos);
  CHECK(o.find("accum_steps=2\n") != std::string::npos);
  // What the run would refuse, --print-config refuses too (it printed and exited 0).
  const std::string missing = std::string(BLPA_TRAIN_EXE) + " --print-config --resume --checkpoint " +
                              (dir / "missing.ckpt").string() + " > " + out + " 2>&1";
  CHECK(WEXITSTATUS(std::system(missing.c_str())) == 2);
  if (!torch::cuda::is_available()) {
    const std::string cuda = std::string(BLPA_TRAIN_EXE) + " --print-config --device cuda > " + out + " 2>&1";
    CHECK(WEXITSTATUS(std::system(cuda.c_str())) == 2);
  }
  // Numbers as strtod took them: a leading '+' (from_chars alone refuses it), '.5', '1e-5'.
  const std::string plus = config("--lr +0.5 --momentum .5 --weight-decay 1e-5");
  CHECK(plus.find("lr=0.5\n") != std::string::npos);
  CHECK(plus.find("momentum=0.5\n") != std::string::npos);
  CHECK(plus.find("weight_decay=1e-05\n") != std::string::npos);
  CHECK(o.find("iterations=640000\n") != std::string::npos);
  const std::string d = config("");  // the CIFAR protocol
  CHECK(d.find("depth=164\n") != std::string::npos);
  CHECK(d.find("steps=32000,48000\n") != std::string::npos);
  // What runs, not what was left to auto: the data set and folder, the data threads,
  // LibTorch's threads, the precision and layout for the device.
  CHECK(d.find("dataset=fashion-mnist\ndata_dir=" + std::string(blpa::data::kDebianFashionMnist) + "\n") !=
        std::string::npos);
  CHECK(d.find("workers=2\n") != std::string::npos);
  CHECK(d.find("threads=0\n") == std::string::npos);
  CHECK(d.find("precision=fp32\n") != std::string::npos);
  // No auto is left: on the CPU the graphs are off (on CUDA, auto is decided at the capture).
  CHECK(d.find("=auto\n") == std::string::npos);
  CHECK(d.find("\ncuda_graphs=off\n") != std::string::npos);
  // --prefetch as the loader takes it: at least one batch per worker.
  CHECK(config("--workers 4 --prefetch 2").find("\nprefetch=4\n") != std::string::npos);
  fs::create_directories(dir / "cifar");
  std::ofstream(dir / "cifar" / "data_batch_1.bin").put('x');
  CHECK(config("--data-dir " + (dir / "cifar").string()).find("dataset=cifar10\n") != std::string::npos);
  // A folder without a data set: the same error the run would give.
  const std::string empty = "--print-config --data-dir " + (dir / "none").string() + " > " + out + " 2>&1";
  fs::create_directories(dir / "none");
  CHECK(std::system((std::string(BLPA_TRAIN_EXE) + " " + empty).c_str()) != 0);
  CHECK(slurp(out).find("no CIFAR-10 (data_batch_1.bin)") != std::string::npos);
  CHECK(std::system((std::string(BLPA_TRAIN_EXE) + " --print-config --preset imagenet >/dev/null 2>&1").c_str()) != 0);
  CHECK(::system((std::string(BLPA_TRAIN_EXE) + " --preset nonsense >/dev/null 2>&1").c_str()) != 0);
  CHECK(::system((std::string(BLPA_TRAIN_EXE) + " --batch 10 --accum-steps 3 >/dev/null 2>&1").c_str()) != 0);
  const std::string env_cmd = "RANK=1 WORLD_SIZE=4 MASTER_ADDR=10.0.0.2 MASTER_PORT=29555 " + std::string(BLPA_TRAIN_EXE) +
                              " --print-config > " + out + " 2>&1";
  REQUIRE(std::system(env_cmd.c_str()) == 0);
  std::ifstream f(out);
  const std::string e((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  CHECK(e.find("\nworld=4\n") != std::string::npos);
  CHECK(e.find("world_size") == std::string::npos);  // once is enough
  CHECK(e.find("\ncuda_graphs=off\n") != std::string::npos);  // as it acts on the CPU, not "auto"
  CHECK(e.find("rank=1\nlocal_rank=1\nmaster=10.0.0.2:29555\ndist_backend=gloo\ndist_timeout=600\n") !=
        std::string::npos);
  // LibTorch's threads, the machine's cores shared by its processes as --workers shares them
  // (8 ranks took every core each), unless OMP_NUM_THREADS sets them.
  const auto threads_of = [&](const std::string& env) {
    REQUIRE(std::system((env + " " + BLPA_TRAIN_EXE + " --print-config > " + out + " 2>&1").c_str()) == 0);
    const std::string printed = slurp(out);
    const auto at = printed.find("\nthreads=");
    REQUIRE(at != std::string::npos);
    return std::stoi(printed.substr(at + 9));
  };
  const int all = threads_of("env -u OMP_NUM_THREADS");
  CHECK(threads_of("env -u OMP_NUM_THREADS LOCAL_WORLD_SIZE=2") == std::max(1, all / 2));
  CHECK(threads_of("env OMP_NUM_THREADS=" + std::to_string(all) + " LOCAL_WORLD_SIZE=2") == all);
  remove_tree(dir);
}

TEST_CASE("train: blpa-eval scores a Fashion-MNIST checkpoint as the trainer's evaluation does", "[train]") {
  if (!have_fashion_mnist()) return;
  // In the precision and layout the network was trained in, unless told otherwise: a bf16
  // network scored in fp32 differs from its log in the fourth digit of the loss.
  for (const auto& [precision, layout] : {std::pair<std::string, std::string>{"fp32", "nchw"}, {"bf16", "nhwc"}}) {
    CAPTURE(precision, layout);
    const auto dir = temp_dir("eval");
    auto c = small(dir);
    c.iterations = 10;
    c.test_subset = 300;
    c.precision = precision;
    c.memory_format = layout;
    c.checkpoint = (dir / "ck.pt").string();
    const auto r = blpa::train(c);
    const auto eval = [&](const std::string& flags) {
      const std::string out = (dir / "eval.json").string();
      const std::string cmd =
          std::string(BLPA_EVAL_EXE) + " --checkpoint " + c.checkpoint + " --subset 300 --json" + flags + " > " + out;
      REQUIRE(std::system(cmd.c_str()) == 0);
      return slurp(out);
    };
    const std::string json = eval("");
    CAPTURE(json);
    CHECK(json.find("\"precision\": \"" + precision + "\", \"memory_format\": \"" + layout + "\"") !=
          std::string::npos);
    std::smatch m;
    REQUIRE(std::regex_search(json, m, std::regex("\"images\": 300, \"failed\": 0, \"loss\": ([0-9.]+), \"top1\": ([0-9.]+)")));
    CHECK(std::stod(m[1]) == Approx(r.test_loss).epsilon(1e-5));  // the JSON has 6 decimals
    CHECK(std::stod(m[2]) == Approx(r.test_acc).margin(1e-6));
    // and the error, as the summary's test_error
    REQUIRE(std::regex_search(json, m, std::regex("\"top1_error\": ([0-9.]+), \"top5_error\": ([0-9.]+)\\}")));
    CHECK(std::stod(m[1]) == Approx(1 - r.test_acc).margin(2e-6));
    const std::string other = precision == "fp32" ? "bf16" : "fp32";
    CHECK(eval(" --precision " + other).find("\"precision\": \"" + other + "\"") != std::string::npos);
    remove_tree(dir);
  }
}

TEST_CASE("bench: step --profile reports where a step's time went and --trace writes Chrome traces", "[bench]") {
  const auto dir = temp_dir("bench");
  // The trace's folder does not exist yet: it is made, as mkdir -p.
  const std::string out = (dir / "step.jsonl").string(), trace = (dir / "traces" / "t").string();
  const std::string cmd = std::string(BLPA_BENCH_EXE) +
                          " step --model cifar:11 --batch 2 --size 8 --mode plain,blpa-4 --steps 1 --warmup 0 "
                          "--threads 1 --profile 3 --trace " + trace + " --json > " + out + " 2> " + out + ".err";
  REQUIRE(std::system(("env -u KINETO_LOG_LEVEL " + cmd).c_str()) == 0);
  // Kineto's start/stop lines and its "gpuGetDeviceCount failed" are silenced on the CPU.
  CHECK(slurp(out + ".err").find("profiler_start") == std::string::npos);
  CHECK(slurp(out + ".err").find("gpuGetDeviceCount") == std::string::npos);
  std::ifstream f(out);
  std::string line;
  int rows = 0;
  const std::regex profile(
      "\"profile\": \\{\"wall_ms\": ([0-9.]+), \"busy_ms\": ([0-9.]+), \"events\": ([0-9]+), \"top\": \\[(.*)\\]\\}");
  while (std::getline(f, line)) {
    CAPTURE(line);
    std::smatch m;
    REQUIRE(std::regex_search(line, m, profile));
    CHECK(std::stod(m[1]) > 0);
    CHECK(std::stod(m[2]) > 0);
    CHECK(std::stoll(m[3]) >= 3);  // at least the operators listed
    const std::string top = m[4];
    const std::regex name("\"name\": ");
    const auto names = std::distance(std::sregex_iterator(top.begin(), top.end(), name), std::sregex_iterator());
    CHECK(names >= 1);
    CHECK(names <= 3);
    ++rows;
  }
  CHECK(rows == 2);
  for (const char* mode : {"plain", "blpa-4"}) {
    std::ifstream t(trace + "-" + mode + ".json");
    const std::string json((std::istreambuf_iterator<char>(t)), std::istreambuf_iterator<char>());
    CAPTURE(mode);
    CHECK(json.find("\"traceEvents\"") != std::string::npos);
  }
  CHECK(::system((std::string(BLPA_BENCH_EXE) + " step --trace " + trace + " >/dev/null 2>&1").c_str()) != 0);
  // A generated ImageNet tree goes into a new or empty folder only, not into a data set.
  const auto cmd_tree = [&](const std::string& d) {
    return ::system((std::string(BLPA_BENCH_EXE) + " data --write-tree " + d + " --images 2 >/dev/null 2>&1").c_str());
  };
  CHECK(cmd_tree((dir / "tree").string()) == 0);
  CHECK(fs::exists(dir / "tree" / "val" / "n00000001" / "val_00001.JPEG"));
  CHECK(WEXITSTATUS(cmd_tree((dir / "tree").string())) == 2);
  remove_tree(dir);
}

TEST_CASE("bench: codec takes --precision as the other programs do --dtype as its old name and --gamma", "[train]") {
  const auto dir = temp_dir("bench-codec");
  const std::string out = (dir / "codec.json").string();
  const auto codec = [&](const std::string& flags) {
    const std::string cmd = std::string(BLPA_BENCH_EXE) + " codec --numel 4096 --channels 4 --hw 4 --reps 1 " +
                            "--threads 1 --json " + flags + " > " + out + " 2>&1";
    const int status = std::system(cmd.c_str());
    return std::pair{WEXITSTATUS(status), slurp(out)};
  };
  for (const char* flags : {"--precision bf16", "--dtype bf16", "--dtype bf16 --precision bf16"}) {
    CAPTURE(flags);
    const auto [rc, text] = codec(flags);
    CHECK(rc == 0);
    CHECK(text.find("\"dtype\": \"bf16\"") != std::string::npos);
    CHECK(text.find("\"forward_fused_ms\": ") != std::string::npos);  // the unit's forward, three ways
    CHECK(text.find("\"libtorch_forward_ms\": ") != std::string::npos);
  }
  CHECK(codec("").second.find("\"dtype\": \"float\"") != std::string::npos);
  // Which copy of the loops ran, and a BLPA_CODEC_ISA it does not know said (it was ignored unsaid).
  CHECK(codec("").second.find("\"cpu_isa\": \"") != std::string::npos);
  ::setenv("BLPA_CODEC_ISA", "base", 1);
  CHECK(codec("").second.find("\"cpu_isa\": \"base\"") != std::string::npos);
  ::setenv("BLPA_CODEC_ISA", "avx9", 1);
  CHECK(codec("").second.find("BLPA_CODEC_ISA=avx9 is not base, avx2 or avx512: ignored") != std::string::npos);
  ::unsetenv("BLPA_CODEC_ISA");
  for (const char* p : {"fp32", "tf32", "auto"})  // as a sweep passes them to every program
    CHECK(codec(std::string("--precision ") + p).second.find("\"dtype\": \"float\"") != std::string::npos);
  const auto [rc, text] = codec("--dtype float --precision bf16");
  CHECK(rc == 2);
  CHECK(text.find("--dtype float and --precision bf16 disagree") != std::string::npos);
  CHECK(codec("--precision fp16").first == 2);
  // gamma as initialised (the default, as before the flag) or drawn as after training.
  CHECK(codec("").second.find("\"gamma\": \"ones\"") != std::string::npos);
  const auto [drawn_rc, drawn] = codec("--gamma drawn --precision bf16 --memory-format nhwc");
  CHECK(drawn_rc == 0);
  CHECK(drawn.find("\"gamma\": \"drawn\"") != std::string::npos);
  // bf16 values divided by 1 lie next to a bin edge about 1 in 61 (4 bits); divided by drawn
  // gammas about 1 in 20,000: of these 4,096 elements, dozens against none or a few.
  const auto near_edge = [](const std::string& json) {
    const auto at = json.find("\"near_edge_fraction\": ");
    return at == std::string::npos ? -1.0 : std::stod(json.substr(at + 22));
  };
  const double ones_near = near_edge(codec("--precision bf16 --memory-format nhwc").second);
  CHECK(ones_near > 0.005);
  CHECK(near_edge(drawn) >= 0.0);
  CHECK(near_edge(drawn) < ones_near / 10);
  CHECK(codec("--gamma 0.5").second.find("\"gamma\": 0.5,") != std::string::npos);  // a number, as a number
  // The codes' window is recorded, so that the rows of a window sweep can be told apart, and
  // the precision under the name the other commands use.
  const std::string windowed = codec("--window 4 --precision bf16").second;
  CHECK(windowed.find("\"bits\": 4, \"window\": 4, \"lift\": 0,") != std::string::npos);
  CHECK(windowed.find("\"precision\": \"bf16\", \"dtype\": \"bf16\"") != std::string::npos);
  CHECK(codec("--gamma two").second.find("--gamma: 'two' is not a number") != std::string::npos);
  const auto [bad_rc, bad] = codec("--gamma 0");
  CHECK(bad_rc == 2);
  CHECK(bad.find("--gamma must be ones, drawn or a positive number") != std::string::npos);
  remove_tree(dir);
}

TEST_CASE("train: --workers 0 shares the machine's cores among its LOCAL_WORLD_SIZE processes", "[train]") {
  const int cores = static_cast<int>(std::thread::hardware_concurrency());
  CHECK(blpa::default_workers("imagenet", 1) == std::clamp(cores, 1, 16));
  CHECK(blpa::default_workers("imagenet", 4) == std::clamp(cores / 4, 1, 16));
  CHECK(blpa::default_workers("imagenet", 100000) == 1);
  CHECK(blpa::default_workers("fashion-mnist", 8) == 2);
  const std::string cmd = "LOCAL_WORLD_SIZE=0 " + std::string(BLPA_TRAIN_EXE) + " --iterations 1 >/dev/null 2>&1";
  CHECK(WEXITSTATUS(std::system(cmd.c_str())) == 2);  // a bad configuration
}

namespace {

std::string read_identity(const std::string& checkpoint) {
  torch::serialize::InputArchive archive;
  archive.load_from(checkpoint);
  c10::IValue v;
  archive.read("blpa_identity", v);
  return v.toStringRef();
}

}  // namespace

TEST_CASE("train: the window is part of a checkpoint, and the paper's is named as before windows existed", "[train]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("window");
  auto c = small(dir);
  c.iterations = 3;
  c.checkpoint = (dir / "ck.pt").string();
  c.mode = {blpa::Mode::blpa, 4, 6.0f};
  blpa::train(c);
  // What commit a5b148d wrote for --mode blpa --bits 4, before the window existed; so a
  // checkpoint of that time means window 6 and resumes as one.
  CHECK(read_identity(c.checkpoint).find(" mode=blpa-4 batch=32 ") != std::string::npos);
  const auto stored = blpa::read_checkpoint(c.checkpoint);
  const auto model = blpa::load_model(stored);
  CHECK(model->config().mode.window == 6.0f);
  CHECK(stored.state.iteration == 3);
  for (const auto& [name, unit] : model->units()) CHECK(unit->mode().window == 6.0f);

  auto other = c;
  other.resume = true;
  other.iterations = 4;
  other.mode = {blpa::Mode::blpa, 4};  // the default window, another method
  CHECK_THROWS_WITH(blpa::train(other), Catch::Contains("belongs to a different run") &&
                                            Catch::Contains(other.mode.str()) && Catch::Contains("window"));
  other.mode = {blpa::Mode::blpa, 4, 6.0f};
  CHECK(blpa::train(other).iteration == 4);

  // Another window and 2 bits: named in full, and blpa-eval builds the network with them.
  auto w = small(dir);
  w.log_path = (dir / "w.jsonl").string();  // a new run beside the first
  w.iterations = 2;
  w.mode = {blpa::Mode::blpa, 2, 3.5f};
  w.checkpoint = (dir / "w.pt").string();
  blpa::train(w);
  CHECK(read_identity(w.checkpoint).find(" mode=blpa-2-w3.5 ") != std::string::npos);
  const auto net = blpa::load_model(blpa::read_checkpoint(w.checkpoint));
  CHECK(net->config().mode.bits == 2);
  CHECK(net->config().mode.window == 3.5f);
  remove_tree(dir);
}

TEST_CASE("bench: fidelity measures bits x windows at drawn parameters and at a checkpoint's weights", "[bench]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("fidelity");
  auto c = small(dir);
  c.iterations = 4;
  c.checkpoint = (dir / "ck.pt").string();
  blpa::train(c);
  const std::string out = (dir / "f.jsonl").string();
  auto run = [&](const std::string& args) {
    const std::string cmd = std::string(BLPA_BENCH_EXE) + " fidelity --threads 1 --json " + args + " > " + out;
    REQUIRE(std::system(cmd.c_str()) == 0);
    std::ifstream f(out);
    std::vector<std::string> lines;
    for (std::string line; std::getline(f, line);) lines.push_back(line);
    return lines;
  };
  const std::regex row("\"source\": \"(\\w+)\", \"checkpoint\": \"[^\"]*\", \"iteration\": (\\d+), \"depth\": (\\d+), "
                       "\"batch\": (\\d+), \"size\": (\\d+), \"mode\": \"(\\w+)\", \"bits\": (\\d), \"window\": ([0-9.]+), "
                       "\"lift\": ([-0-9.]+), \"relative_error\": ([0-9.]+), \"min_cosine\": ([-0-9.]+)");
  const auto trained = run("--checkpoint " + c.checkpoint + " --batch 8 --modes blpa,naive --bits 2 --windows 3,default");
  REQUIRE(trained.size() == 4);
  const auto def = blpa::default_format(2);  // an explicit window is centred (lift 0)
  const std::vector<std::tuple<std::string, std::string, std::string>> want{
      {"blpa", "3", "0"}, {"blpa", fmt::format("{}", def.window), fmt::format("{}", def.lift)},
      {"naive", "3", "0"}, {"naive", fmt::format("{}", def.window), fmt::format("{}", def.lift)}};
  for (size_t i = 0; i < trained.size(); ++i) {
    CAPTURE(trained[i]);
    std::smatch m;
    REQUIRE(std::regex_search(trained[i], m, row));
    CHECK(m[1] == "checkpoint");
    CHECK(m[2] == "4");
    CHECK(m[3] == "11");
    CHECK(m[5] == "28");  // Fashion-MNIST's images
    CHECK(m[6] == std::get<0>(want[i]));
    CHECK(m[7] == "2");
    CHECK(m[8] == std::get<1>(want[i]));
    CHECK(m[9] == std::get<2>(want[i]));
    CHECK(std::stod(m[10]) > 0);  // 2-bit codes do change the gradient
    CHECK(std::stod(m[11]) <= 1);
  }
  // A bf16 checkpoint is measured in bf16 unless --precision says otherwise (as blpa-eval
  // scores it), and --data-dir says where its data set is now.
  auto b = small(dir);
  b.iterations = 2;
  b.precision = "bf16";
  b.checkpoint = (dir / "bf16.pt").string();
  b.log_path = (dir / "bf16.jsonl").string();
  blpa::train(b);
  for (const auto& [flag, want] : {std::pair<std::string, std::string>{"", "bf16"}, {"--precision fp32", "fp32"}}) {
    const auto rows = run("--checkpoint " + b.checkpoint + " --batch 4 --modes blpa --bits 8 " + flag);
    REQUIRE(rows.size() == 1);
    CAPTURE(rows[0]);
    CHECK(rows[0].find("\"precision\": \"" + want + "\"") != std::string::npos);
  }
  const std::string moved = std::string(BLPA_BENCH_EXE) + " fidelity --threads 1 --checkpoint " + b.checkpoint +
                            " --batch 4 --modes blpa --bits 8 --data-dir " + (dir / "moved").string() + " > " + out +
                            " 2>&1";
  CHECK(std::system(moved.c_str()) != 0);
  CHECK(slurp(out).find((dir / "moved").string()) != std::string::npos);
  const auto drawn = run("--depths 11 --batch 2 --size 8 --modes blpa --bits 8 --windows 6");
  REQUIRE(drawn.size() == 1);
  std::smatch m;
  REQUIRE(std::regex_search(drawn[0], m, row));
  CHECK(m[1] == "drawn");
  CHECK(std::stod(m[10]) < 0.2);
  // A window so wide that the gradient overflows is measured as such: null, the parameter
  // named, and no "nan" in the JSON (it printed -nan, and a smallest cosine of 2).
  const auto wide = run("--depths 11 --batch 2 --size 8 --modes blpa --bits 4 --windows 1e4");
  REQUIRE(wide.size() == 1);
  CAPTURE(wide[0]);
  CHECK(wide[0].find("\"relative_error\": null, \"min_cosine\": null, \"min_cosine_param\": \"stem.weight\"") !=
        std::string::npos);
  CHECK(wide[0].find("nan") == std::string::npos);
  remove_tree(dir);
}

// A checkpoint's list settings: an empty item is kept, so that "1,,2" in decode_failed= is
// refused as damaged rather than read as "1,2".
TEST_CASE("train: a checkpoint's list settings split at every comma", "[train]") {
  using V = std::vector<std::string>;
  CHECK(blpa::split_list("").empty());
  CHECK(blpa::split_list("32000") == V{"32000"});
  CHECK(blpa::split_list("32000,48000") == V{"32000", "48000"});
  CHECK(blpa::split_list("1,,2") == V{"1", "", "2"});
  CHECK(blpa::split_list("1,") == V{"1", ""});
  CHECK(blpa::split_list(",") == V{"", ""});
}
