// Bad input and bad luck lose nothing: every case of an adversarial battery (issue #14) gets
// a clear one-line error with the documented exit code, and no run is lost or poisoned.
// The programs run as a user would run them, through a shell (for ulimit and redirection).
#include <blpa/checkpoint.h>
#include <blpa/dataset.h>
#include <blpa/train.h>
#include <caffe2/serialize/inline_container.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <regex>
#include <sstream>
#include <thread>
#include <tuple>

#include "fuzz/zip_crcs.h"
#include "test_support.h"

namespace fs = std::filesystem;

namespace {

fs::path temp_dir(const std::string& name) { return fresh_temp_dir("hard-" + name); }

struct Run {
  int code = -1;
  std::string output;  // stdout and stderr
};

// `prefix` goes before the program (e.g. "ulimit -f 64;"); arguments are single-quoted.
Run run(const std::string& exe, const std::vector<std::string>& args, const fs::path& dir, const std::string& prefix = "") {
  std::string cmd = prefix + " " + exe;
  for (const auto& a : args) cmd += " '" + a + "'";
  const fs::path out = dir / "out.txt";
  cmd += " > " + out.string() + " 2>&1";
  std::fflush(nullptr);
  const int status = std::system(("bash -c \"" + cmd + "\"").c_str());
  Run r;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.output = slurp(out);
  return r;
}

Run train(const std::vector<std::string>& args, const fs::path& dir, const std::string& prefix = "") {
  return run(BLPA_TRAIN_EXE, args, dir, prefix);
}

// A fast run on 512 Fashion-MNIST images: ResNet-11, batch 32, one thread.
std::vector<std::string> small(const fs::path& dir, std::vector<std::string> extra = {}) {
  std::vector<std::string> a{"--depth", "11", "--batch", "32", "--train-subset", "512", "--test-subset", "64",
                             "--iterations", "4", "--warmup", "0", "--lr", "0.02", "--lr-steps", "", "--threads", "1",
                             "--log-every", "1", "--eval-every", "0", "--quiet"};
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

// No C++ backtrace, and the message on one line (plus at most the --help hint).
void check_clean(const Run& r) {
  CAPTURE(r.output);
  CHECK(r.output.find("frame #") == std::string::npos);
  CHECK(r.output.find("Exception raised from") == std::string::npos);
  CHECK(r.output.find("terminate called") == std::string::npos);
}

// blpa-train in the background, its stdout and stderr to `out`, started with the signals
// `ignored` ignored (as `nohup` or a script's `&` start it) and `env` ("NAME=VALUE") set;
// wait_for_record waits until the log has a record containing `text`.
pid_t spawn_train(std::vector<std::string> args, const fs::path& out, std::initializer_list<int> ignored = {},
                  const char* env = nullptr) {
  std::vector<char*> argv{const_cast<char*>(BLPA_TRAIN_EXE)};
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    const int fd = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);  // one file for both
    ::dup2(fd, STDOUT_FILENO);
    ::dup2(fd, STDERR_FILENO);
    for (const int sig : ignored) std::signal(sig, SIG_IGN);
    if (env) ::putenv(const_cast<char*>(env));
    ::execv(BLPA_TRAIN_EXE, argv.data());
    ::_exit(127);
  }
  return pid;
}

// A spawned run: wait() gives its exit code (128 + N for signal N); a run that a failed
// assertion left behind is killed (the runs below are long).
struct Spawned {
  pid_t pid;
  int status = 0;  // as waitpid gave it
  int wait() {
    ::waitpid(pid, &status, 0);
    pid = 0;  // reaped: its number may be another process's now
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
  ~Spawned() {
    if (pid > 0 && ::kill(pid, SIGKILL) == 0) ::waitpid(pid, nullptr, 0);
  }
};

void wait_for_record(const std::string& log, const std::string& text) {
  for (int i = 0; i < 3000 && slurp(log).find(text) == std::string::npos; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
}

// The number after "key": in a one-line JSON object, or NaN.
double number_field(const std::string& json, const std::string& key) {
  const auto at = json.find("\"" + key + "\": ");
  return at == std::string::npos ? std::nan("") : std::strtod(json.c_str() + at + key.size() + 4, nullptr);
}

bool no_temporaries(const fs::path& dir) {
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".tmp") return false;
  return true;
}

}  // namespace

TEST_CASE("hardening: flags are checked before anything runs, and errors name the flag", "[hardening]") {
  const auto dir = temp_dir("flags");
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases{
      {{"--device", "tpu"}, "--device must be cpu, cuda or cuda:N, got 'tpu'"},
      {{"--lr-steps", "10,x"}, "--lr-steps: 'x' is not an integer"},
      {{"--batch", "abc"}, "--batch: 'abc' is not an integer"},
      {{"--lr", "1e999"}, "--lr: '1e999' is out of range"},
      {{"--lr", "inf"}, "--lr: 'inf' is not a finite number"},
      // Past float32's range: refused here, not as "cannot be converted to type float" mid-run.
      {{"--lr", "1e39"}, "--lr and --warmup-lr must be positive and finite in float32 (at most 3.4e38)"},
      {{"--warmup-lr", "1e39"}, "--lr and --warmup-lr must be positive and finite in float32 (at most 3.4e38)"},
      {{"--weight-decay", "1e39"}, "--weight-decay must be >= 0 and finite in float32 (at most 3.4e38)"},
      {{"--window", "1e39"}, "--window: '1e39' is out of range"},  // a float's inf, was "not finite"
      {{"--lr", "0x10"}, "--lr: '0x10' is not a number"},           // was 16
      {{"--seed", "-1"}, "--seed: '-1' is not a non-negative integer"},
      {{"--iterations", "99999999999999999999"}, "--iterations: '99999999999999999999' is out of range"},
      {{"--depth", "21"}, "--depth 21: a cifar network has depth 9n+2"},
      {{"--model", "imagenet", "--depth", "34"}, "--depth 34: an imagenet network has depth 50, 101, 152 or 200"},
      {{"--threads", "-3"}, "--threads must be 0 (LibTorch's default) to 1024"},
      {{"--threads", "100000"}, "--threads must be 0 (LibTorch's default) to 1024"},  // crashed in OpenMP
      {{"--workers", "100000"}, "--workers must be 0 (automatic) to 256"},            // and in std::thread
      {{"--train-subset", "-5"}, "--train-subset and --test-subset must be >= 0"},
      {{"--test-subset", "-1"}, "--train-subset and --test-subset must be >= 0"},
      {{"--mode", "fast"}, "--mode: unknown mode 'fast'"},
      // blpa-bench's and the log's names, and mistyped flags, said as the flags they mean.
      {{"--mode", "blpa-4"}, "as flags, blpa-4 is --mode blpa --bits 4 --window 6 --lift 0"},
      {{"--mode", "blpa-4-l1"}, "as flags, blpa-4-l1 is --mode blpa --bits 4"},
      {{"--model", "resnet20"}, "the depth is a flag of its own: --model cifar --depth 20"},
      {{"--out-dir", "x"}, "unknown option --out-dir"},  // was "--out-dir does not exist": a folder?
      {{"-k", "3"}, "unknown option -k (the options are long ones, --name; -h is --help)"},
      {{"--data", "x"}, "unknown option --data (did you mean --data-dir or --dataset?)"},
      {{"--lr-step", "5"}, "unknown option --lr-step (did you mean --lr-steps?)"},
      {{"--port", "5"}, "unknown option --port (did you mean --master-port?)"},  // was --export, by two edits
      {{"--iters", "5"}, "unknown option --iters (did you mean --iterations?)"},
      {{"--augment"}, "unknown option --augment (did you mean --no-augment?)"},
      {{"--batch-size", "5"}, "unknown option --batch-size (did you mean --batch?)"},
      {{"--checkpoint-evry", "5"}, "unknown option --checkpoint-evry (did you mean --checkpoint-every?)"},  // not --checkpoint
      {{"--warmup-rl", "5"}, "unknown option --warmup-rl (did you mean --warmup-lr?)"},
      {{"--checkpoint", "a.ckpt", "--log", "a.ckpt"}, "name the same file"},
      {{"--checkpoint", "a.ckpt", "--resume", "--overwrite"}, "give one of them"},
      {{"--master-port", "70000"}, "--master-port 70000: must be in 1..65535"},
      {{"--world-size", "0"}, "--world-size 0: must be at least 1"},
      {{"--rank", "3", "--world-size", "2"}, "--rank 3 is not in --world-size 2"},
      {{"--lr-steps", "3,,5"}, "--lr-steps: '3,,5' has an empty item"},  // was read as 3,5
      {{"--dist-backend", "mpi"}, "--dist-backend must be auto, gloo or nccl, got 'mpi'"},
      {{"--dist-backend", "nccl"}, "--dist-backend nccl needs --device cuda"},
      {{"--cuda-graphs", "on"}, "--cuda-graphs on needs --device cuda"},
      {{"--dataset", "foo"}, "--dataset must be auto, cifar10, cifar100, cifar100-coarse, fashion-mnist, mnist or "
                             "imagenet, got 'foo'"},
      {{"--checkpoint", "a.ckpt", "--log", "a.ckpt.lock"}, "--log names --checkpoint's .lock file"},
      // cxxopts said "Argument 'no' failed to parse", naming no flag.
      {{"--overwrite=no"}, "--overwrite=no: --overwrite is a switch: give it alone, or =true or =false"},
      {{"--lr-steps=", "--quiet=yes"}, "--quiet=yes: --quiet is a switch"},  // blamed --lr-steps=, not a switch
      // A value left out: the next flag was taken for it ("got '--print-config'").
      {{"--precision", "--print-config"}, "--precision needs a value, and was followed by the flag --print-config"},
      {{"--checkpoint"}, "--checkpoint needs a value, and was followed by the flag --data-dir"},
      // Two outputs through links to one file not written yet (it was "in use by" its own process).
      {{"--checkpoint", (dir / "x.ckpt").string(), "--summary", (dir / "to-x.json").string()},
       "--summary and --checkpoint name the same file"},
  };
  fs::create_symlink(dir / "x.ckpt", dir / "to-x.json");  // dangling
  for (const auto& [args, message] : cases) {
    // A data folder that does not exist: the flag must be refused before any data is read.
    auto a = args;
    a.insert(a.end(), {"--data-dir", (dir / "no-data").string()});
    const Run r = train(a, dir);
    CAPTURE(args, r.output);
    CHECK(r.code == 2);
    CHECK(r.output.find(message) != std::string::npos);
    check_clean(r);
  }
  // The last flag without its value (cxxopts said "Option ‘precision’ is missing an argument").
  const Run last = train({"--data-dir", (dir / "no-data").string(), "--precision"}, dir);
  CAPTURE(last.output);
  CHECK(last.code == 2);
  CHECK(last.output.find("blpa-train: --precision needs a value") != std::string::npos);
  // A loop of symbolic links is named with its flag (it was "filesystem error: status: ...").
  fs::create_symlink("loop.jsonl", dir / "loop.jsonl");
  const Run loop = train({"--log", (dir / "loop.jsonl").string(), "--data-dir", (dir / "no-data").string()}, dir);
  CHECK(loop.code == 2);
  CHECK(loop.output.find("--log " + (dir / "loop.jsonl").string() + ": Too many levels of symbolic links") !=
        std::string::npos);
  // A folder on the way that is a link to nothing is named as such (it was "its folder cannot
  // be created (File exists)").
  if (have_fashion_mnist()) {
    fs::create_symlink(dir / "nowhere", dir / "gone");
    const Run gone = train(small(dir, {"--checkpoint", (dir / "gone" / "a.ckpt").string()}), dir);
    CAPTURE(gone.output);
    CHECK(gone.code == 2);
    CHECK(gone.output.find("its folder " + (dir / "gone").string() + " is a link to " + (dir / "nowhere").string() +
                           ", which does not exist") != std::string::npos);
  }
  // torchrun's variables are named as such, not as the flags that were not given.
  const Run env = train({"--data-dir", (dir / "no-data").string()}, dir, "WORLD_SIZE=-1");
  CAPTURE(env.output);
  CHECK(env.code == 2);
  CHECK(env.output.find("$WORLD_SIZE=-1: must be at least 1") != std::string::npos);
  const Run wrapped = train({"--data-dir", (dir / "no-data").string()}, dir, "WORLD_SIZE=4294967297");  // was 1
  CHECK(wrapped.code == 2);
  CHECK(wrapped.output.find("WORLD_SIZE='4294967297' is out of range") != std::string::npos);
  const Run range = run(BLPA_PREDICT_EXE, {"--checkpoint", "x", "--from-dataset", "0..-1"}, dir);  // read to the end
  CHECK(range.code == 2);
  CHECK(range.output.find("--from-dataset 0..-1: needs 0 <= N < M") != std::string::npos);
  // blpa-eval names its flags too.
  const Run e = run(BLPA_EVAL_EXE, {"--checkpoint", "x", "--batch", "ten"}, dir);
  CHECK(e.code == 2);
  CHECK(e.output.find("--batch: 'ten' is not an integer") != std::string::npos);
  const Run d = run(BLPA_EVAL_EXE, {"--checkpoint", "x", "--device", "tpu"}, dir);
  CHECK(d.code == 2);
  CHECK(d.output.find("--device must be cpu, cuda or cuda:N") != std::string::npos);
  check_clean(d);
  for (const char* exe : {BLPA_EVAL_EXE, BLPA_PREDICT_EXE})  // 0 is auto, as blpa-train's
    for (const char* workers : {"-1", "100000"}) {
      const Run w = run(exe, {"--checkpoint", "x", "--workers", workers}, dir);
      CAPTURE(exe, w.output);
      CHECK(w.code == 2);
      CHECK(w.output.find("--workers must be 0 (automatic) to 256") != std::string::npos);
      // One flag's error names that flag alone ("--batch must be positive and --workers 0 to 256").
      CHECK(w.output.find("--batch") == std::string::npos);
      const Run b = run(exe, {"--checkpoint", "x", "--batch", "0"}, dir);
      CHECK(b.output.find("--batch must be positive\n") != std::string::npos);
    }
  for (const char* exe : {BLPA_EVAL_EXE, BLPA_PREDICT_EXE})  // a sweep's eval shares the machine's cores
    for (const char* threads : {"-1", "100000"}) {
      const Run t = run(exe, {"--checkpoint", "x", "--threads", threads}, dir);
      CAPTURE(exe, t.output);
      CHECK(t.code == 2);
      CHECK(t.output.find("--threads must be 0 (LibTorch's default) to 1024") != std::string::npos);
    }
  for (const char* exe : {BLPA_EVAL_EXE, BLPA_PREDICT_EXE}) {
    const Run w = run(exe, {"--checkpoint", "x", "--ten-crop=off"}, dir);
    CAPTURE(exe, w.output);
    CHECK(w.code == 2);
    CHECK(w.output.find("--ten-crop=off: --ten-crop is a switch") != std::string::npos);
  }
  // blpa-bench: counts that would print nonsense, and a negative size that reached LibTorch.
  const std::vector<std::pair<std::vector<std::string>, std::string>> bench{
      {{"codec", "--numel", "65536", "--reps", "0"}, "--reps must be positive"},
      {{"codec", "--numel", "65536", "--threads", "-1"}, "--threads must be 0 (LibTorch's default) to 1024"},
      {{"step", "--model", "cifar:11", "--size", "-4"}, "--size must be positive"},
      {{"max-batch", "--model", "cifar:11", "--max", "0"}, "--max must be at least --accum-steps"},
      {{"max-batch", "--batch", "64"}, "--batch: max-batch searches the batch; --max caps it"},  // was ignored
      {{"fidelity", "--checkpoint", "x.ckpt", "--depths", "20"}, "--depths sets the drawn networks"},  // ignored
      // Other flags that were ignored without a word:
      {{"fidelity", "--checkpoint", "x.ckpt", "--size", "64"}, "--size sets the drawn networks' images"},
      {{"memory", "--model", "cifar:11", "--mode", "plain", "--window", "8"},
       "--window and --lift apply to a bare blpa or naive in --mode, and plain has none"},
      {{"data", "--scan", ".", "--workers", "3"}, "--workers does not apply to --scan"},
      {{"data", "--write-tree", "t", "--seconds", "1"}, "--seconds does not apply to --write-tree"},
      {{"data", "--write-tree", "t", "--json"}, "--json does not apply to --write-tree"},
      {{"data", "--images", "20"}, "--batch 32 is more than the --images 20 generated"},  // named neither
      // numbers are named with their flag (cxxopts said only "Argument 'nan' failed to parse"),
      {{"codec", "--window", "nan"}, "--window: 'nan' is not a finite number"},
      {{"step", "--batch", "x"}, "--batch: 'x' is not an integer"},
      {{"memory", "--model", "cifar:x"}, "--model cifar:x: the depth: 'x' is not an integer"},  // was "stoi"
      {{"memory", "--model", "cifar:11", "--slope-batch", "-1"}, "--slope-batch must be >= 0"},
      {{"memory", "--model", "cifar:11", "--slope-batch", "99999999999999999"},  // was LibTorch's size overflow
       "--slope-batch 99999999999999999 of 32x32 images: the input alone overflows 64-bit sizes"},
      {{"memory", "--model", "cifar:11", "--mode", "all,plain"},  // was "unknown mode 'all'"
       "--mode all stands alone (plain,exact,blpa-8,blpa-4,naive-4): list the modes instead of adding to it"},
      {{"fidelity", "--depths", "11,a"}, "--depths: 'a' is not an integer"},
      {{"fidelity", "--seed", "-1"}, "--seed: '-1' is not a non-negative integer"},
      {{"data", "--workers", "0"}, "--workers: each count must be 1 to 256"},
      {{"data", "--quality", "500"}, "--quality must be 1 to 100"},
      // lists with an empty item (the item was dropped) or none (nothing ran, exit 0),
      {{"memory", "--model", "cifar:11", "--mode", "plain,,blpa"}, "--mode: 'plain,,blpa' has an empty item"},
      {{"fidelity", "--depths", ""}, "--depths needs a value"},
      // and flag errors that exited 1.
      {{"codec", "--numel", "65536", "--window", "-1"}, "--window must be positive"},
      {{"codec", "--numel", "65536", "--json", "false"}, "unexpected argument 'false'"},  // ran with JSON
      // Misnamed: a mode "blpa-nan", a huge budget "must be positive", LibTorch's size overflow.
      {{"fidelity", "--bits", "nan"}, "--bits: 'nan' is not an integer"},
      {{"fidelity", "--bits", "3"}, "--bits takes 8, 4 and 2, got 3"},
      {{"max-batch", "--model", "cifar:11", "--budget-gib", "99999999999"}, "out of range (at most 1048576)"},
      {{"memory", "--model", "cifar:11", "--size", "99999999999"}, "--size 99999999999: out of range"},
      {{"step", "--model", "cifar:11", "--batch", "99999999999", "--size", "99999"}, "the input alone overflows"},
      {{"fidelity", "--size", "99999999999"}, "--size 99999999999: out of range"},
      // fidelity has no --device: "--precision tf32 needs --device cuda" sent the user to a flag it lacks.
      {{"fidelity", "--precision", "tf32"}, "--precision tf32: blpa-bench fidelity runs on the CPU, which has no TF32"},
      {{"codec", "--json=yes"}, "--json=yes: --json is a switch: give it alone, or =true or =false"},
      // A device LibTorch names but blpa does not run on: LibTorch's words and exit 1 before.
      {{"codec", "--device", "tpu"}, "--device must be cpu, cuda or cuda:N, got 'tpu'"},
      {{"memory", "--model", "cifar:11", "--device", "meta"}, "--device must be cpu, cuda or cuda:N, got 'meta'"},
      // --mode all has its own codes: a --window beside it was ignored; one too narrow refused.
      {{"memory", "--model", "cifar:11", "--mode", "all", "--window", "6"}, "--mode all runs blpa-train's default"},
      {{"step", "--model", "cifar:11", "--mode", "all", "--bits", "8"}, "list the modes instead"},
      {{"memory", "--model", "cifar:11", "--window", "1e-35"}, "--window must be positive, at least 1e-30"},
      {{"fidelity", "--windows", "1e-35"}, "--windows must be positive, at least 1e-30"},
      {{"memory", "--model", "cifar:11", "--mode", "plain,blpa-4-w1e-35"}, "the window must be at least 1e-30"},
  };
  for (const auto& [args, message] : bench) {
    const Run b = run(BLPA_BENCH_EXE, args, dir);
    CAPTURE(args, b.output);
    CHECK(b.code == 2);
    CHECK(b.output.find(message) != std::string::npos);
  }
  // One default for --slope-batch, not two (the help's lines are wrapped: read as one line).
  std::string help = run(BLPA_BENCH_EXE, {"memory", "--help"}, dir).output;
  help = std::regex_replace(help, std::regex("\\s+"), " ");
  CHECK(help.find("(default: half of --batch; 0: none)") != std::string::npos);
  CHECK(help.find("(default: -1)") == std::string::npos);
  remove_tree(dir);
}

TEST_CASE("hardening: output paths are checked before the first iteration", "[hardening]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("outputs");
  std::ofstream(dir / "file") << "x";
  fs::create_directories(dir / "folder.ckpt");
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases{
      {{"--checkpoint", (dir / "folder.ckpt").string()}, "is a directory"},
      {{"--checkpoint", (dir / "file" / "x.ckpt").string()}, "is not a folder"},
      {{"--export", (dir / "file" / "x.pt").string()}, "--export"},
      {{"--log", (dir / "folder.ckpt").string()}, "--log"},
      {{"--summary", "/dev/null"}, "is not a regular file"},
      {{"--checkpoint", "/proc/blpa-test.ckpt"}, "cannot be written"},
  };
  for (const auto& [args, message] : cases) {
    const Run r = train(small(dir, args), dir);
    CAPTURE(args, r.output);
    CHECK(r.code == 2);
    CHECK(r.output.find(message) != std::string::npos);
    CHECK(r.output.find("iter ") == std::string::npos);  // no training happened
    check_clean(r);
  }
  CHECK(no_temporaries(dir));
  CHECK(fs::is_empty(dir / "folder.ckpt"));
  remove_tree(dir);
}

TEST_CASE("hardening: a fresh run replaces no earlier run unless told to", "[hardening]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("overwrite");
  const std::string ck = (dir / "a.ckpt").string(), log = (dir / "a.jsonl").string();
  REQUIRE(train(small(dir, {"--checkpoint", ck, "--log", log}), dir).code == 0);
  const std::string ck_bytes = slurp(ck), log_bytes = slurp(log);

  const Run again = train(small(dir, {"--checkpoint", ck, "--log", log}), dir);
  CAPTURE(again.output);
  CHECK(again.code == 2);
  CHECK(again.output.find("already exists: continue that run with --resume, or replace it with --overwrite") !=
        std::string::npos);
  CHECK(slurp(ck) == ck_bytes);
  CHECK(slurp(log) == log_bytes);
  // A switch given as =false is off (cxxopts counted it as given: this replaced the run).
  const Run off = train(small(dir, {"--checkpoint", ck, "--log", log, "--overwrite=false"}), dir);
  CHECK(off.code == 2);
  CHECK(slurp(ck) == ck_bytes);
  // The log alone is protected too (an empty one is not a run).
  const Run log_only = train(small(dir, {"--log", log}), dir);
  CHECK(log_only.code == 2);
  CHECK(slurp(log) == log_bytes);
  std::ofstream(dir / "empty.jsonl").flush();
  CHECK(train(small(dir, {"--log", (dir / "empty.jsonl").string()}), dir).code == 0);

  // --overwrite: once the new run opens its log, the replaced run's checkpoint is gone, so that
  // a new run killed before its first checkpoint leaves no mix of two runs' files.
  Spawned replacing{spawn_train(small(dir, {"--checkpoint", ck, "--log", log, "--overwrite", "--seed", "7",
                                            "--iterations", "100000", "--checkpoint-every", "100000"}),
                                dir / "replacing.out")};
  wait_for_record(log, "\"seed\": 7");  // its log opened
  CHECK(!fs::exists(ck));
  // While it runs, a link to its log is its log: refused, naming the run (the lock was beside
  // the link's name, so a second run trained the same files).
  fs::create_symlink(log, dir / "link.jsonl");
  const Run linked = train(small(dir, {"--log", (dir / "link.jsonl").string(), "--overwrite"}), dir);
  CHECK(linked.code == 1);
  CHECK(linked.output.find("is in use by another blpa-train") != std::string::npos);
  ::kill(replacing.pid, SIGKILL);
  replacing.wait();
  // A checkpoint path that is a link (not yet pointing at a file): the checkpoints are written
  // through it, into the file it names, and the link stays (the atomic rename replaced it with
  // a file). A second run naming the link or its target meets the lock.
  fs::create_directories(dir / "elsewhere");
  const std::string target = (dir / "elsewhere" / "target.ckpt").string(), link = (dir / "link.ckpt").string();
  fs::create_symlink(fs::path("elsewhere") / "target.ckpt", link);  // relative to the link's folder
  Spawned through_link{
      spawn_train(small(dir, {"--checkpoint", link, "--iterations", "100000", "--checkpoint-every", "1"}),
                  dir / "through_link.out")};
  for (int i = 0; i < 3000 && !fs::exists(target); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  REQUIRE(fs::exists(target));
  CHECK(fs::is_symlink(link));
  for (const std::string& path : {link, target}) {
    const Run second = train(small(dir, {"--checkpoint", path, "--resume", "--iterations", "100000"}), dir);
    CAPTURE(second.output);
    CHECK(second.code == 1);
    CHECK(second.output.find("is in use by another blpa-train") != std::string::npos);
  }
  ::kill(through_link.pid, SIGKILL);
  through_link.wait();
  CHECK(fs::is_symlink(link));
  CHECK(blpa::read_checkpoint(link).state.iteration >= 1);
  // A summary through a link, and --overwrite through it: the file it names is replaced, the
  // link kept; no temporary file is left beside either.
  const std::string summary_link = (dir / "link.json").string();
  fs::create_symlink(fs::path("elsewhere") / "s.json", summary_link);
  CHECK(train(small(dir, {"--checkpoint", link, "--summary", summary_link, "--overwrite", "--iterations", "2"}), dir)
            .code == 0);
  CHECK(fs::is_symlink(link));
  CHECK(fs::is_symlink(summary_link));
  CHECK(blpa::read_checkpoint(target).state.iteration == 2);
  CHECK(slurp(dir / "elsewhere" / "s.json").find("\"status\": \"done\"") != std::string::npos);
  for (const auto& entry : fs::directory_iterator(dir / "elsewhere"))
    CHECK(entry.path().extension() != ".tmp");
  // A link into a folder not made yet: its target is locked too (that lock was skipped, and a
  // second run naming the target emptied the running run's log).
  const std::string far_link = (dir / "far.jsonl").string(), far = (dir / "new" / "far.jsonl").string();
  fs::create_symlink(fs::path("new") / "far.jsonl", far_link);
  Spawned far_run{spawn_train(small(dir, {"--log", far_link, "--iterations", "100000"}), dir / "far.out")};
  wait_for_record(far, "\"type\": \"train\", \"iter\": 1,");
  const Run by_target = train(small(dir, {"--log", far, "--overwrite"}), dir);
  CAPTURE(by_target.output);
  CHECK(by_target.code == 1);
  CHECK(by_target.output.find("is in use by another blpa-train") != std::string::npos);
  // A hard link to it: the open log itself is locked, which no lock beside a name can see.
  const std::string hard = (dir / "hard.jsonl").string();
  fs::create_hard_link(far, hard);
  const Run by_hard = train(small(dir, {"--log", hard, "--overwrite"}), dir);
  CAPTURE(by_hard.output);
  CHECK(by_hard.code == 1);
  CHECK(by_hard.output.find("--log " + hard + " is in use by another blpa-train, under another name") !=
        std::string::npos);
  CHECK(slurp(far).find("\"type\": \"train\", \"iter\": 1,") != std::string::npos);  // not emptied
  ::kill(far_run.pid, SIGKILL);
  far_run.wait();
  // A folder where the lock goes was skipped, and the lock with it.
  fs::create_directories(dir / "b.ckpt.lock");
  const Run folder = train(small(dir, {"--checkpoint", (dir / "b.ckpt").string()}), dir);
  CHECK(folder.code == 2);
  CHECK(folder.output.find("is a folder, where the run keeps its lock") != std::string::npos);
  remove_tree(dir);
}

// A resumed run's own summary or log that could not be read (its permissions) was taken for
// another run's: "is no summary: it is not checkpoint ...'s run's", exit 2.
TEST_CASE("hardening: an output that cannot be read is said to be unreadable, not another run's", "[hardening]") {
  if (!have_fashion_mnist()) return;
  // Root reads everything: without the capabilities that let it, it reads as a user does.
  const std::string as_user =
      ::geteuid() == 0 ? "setpriv --bounding-set=-dac_override,-dac_read_search" : std::string();
  if (::geteuid() == 0 && std::system("setpriv --bounding-set=-dac_override true > /dev/null 2>&1") != 0) {
    std::cout << "BLPA_SKIP: running as root without setpriv's capability drop" << std::endl;
    return;
  }
  const fs::path dir = temp_dir("unreadable");
  const std::string ck = (dir / "ck.pt").string(), summary = (dir / "s.json").string(),
                    log = (dir / "log.jsonl").string();
  REQUIRE(train(small(dir, {"--checkpoint", ck, "--summary", summary, "--log", log, "--iterations", "2"}), dir).code ==
          0);
  // Write-only: it can be written (else that is said first), not read.
  for (const auto& [flag, path] : {std::pair{"--summary", summary}, std::pair{"--log", log}}) {
    ::chmod(path.c_str(), 0200);
    const Run r = train(small(dir, {"--checkpoint", ck, "--summary", summary, "--log", log, "--iterations", "3",
                                    "--resume"}),
                        dir, as_user);
    ::chmod(path.c_str(), 0644);
    CAPTURE(flag, r.output);
    CHECK(r.code == 1);
    CHECK(r.output.find(std::string(flag) + " " + path + ": cannot be read (Permission denied)") != std::string::npos);
    CHECK(r.output.find("run's") == std::string::npos);
  }
  remove_tree(dir);
}

// A resumed run whose log was gone (deleted, or its path mistyped) began a new one without a
// word, splitting the run's history between files.
TEST_CASE("hardening: a resume whose log is gone says that a new one begins", "[hardening]") {
  if (!have_fashion_mnist()) return;
  const fs::path dir = temp_dir("log-gone");
  const std::string ck = (dir / "ck.pt").string(), log = (dir / "log.jsonl").string();
  REQUIRE(train(small(dir, {"--checkpoint", ck, "--log", log, "--iterations", "2"}), dir).code == 0);
  fs::remove(log);
  const Run r = train(small(dir, {"--checkpoint", ck, "--log", log, "--iterations", "3", "--resume"}), dir);
  CAPTURE(r.output);
  CHECK(r.code == 0);
  CHECK(r.output.find("--log " + log + " does not exist: a new log begins at iteration 2, without the run's records "
                      "before it") != std::string::npos);
  remove_tree(dir);
}

TEST_CASE("hardening: --auto-resume starts a run, resumes it, and does nothing once it is complete", "[hardening]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("auto-resume");
  const std::string ck = (dir / "a.ckpt").string(), log = (dir / "a.jsonl").string();
  auto run_to = [&](const char* iterations, std::vector<std::string> extra = {}) {
    extra.insert(extra.end(), {"--checkpoint", ck, "--log", log, "--auto-resume", "--iterations", iterations});
    const Run r = train(small(dir, extra), dir);
    CAPTURE(r.output);
    return r;
  };
  // No checkpoint: a new run. Then the same command with more iterations continues it.
  const Run first = run_to("3");
  REQUIRE(first.code == 0);
  CHECK(first.output.find("--auto-resume: no checkpoint " + ck + ", a new run") != std::string::npos);
  const Run second = run_to("5");
  REQUIRE(second.code == 0);
  CHECK(second.output.find("--auto-resume: resuming the run in " + ck) != std::string::npos);
  const std::string log_text = slurp(log);
  CHECK(log_text.find("\"resumed\": false") != std::string::npos);
  CHECK(log_text.find("\"resumed\": true") != std::string::npos);
  CHECK(blpa::read_checkpoint(ck).state.iteration == 5);
  // Complete: exit 0, nothing written.
  const std::string ck_bytes = slurp(ck);
  const Run third = run_to("5");
  CHECK(third.code == 0);
  CHECK(third.output.find("the run is complete, nothing to do") != std::string::npos);
  CHECK(slurp(ck) == ck_bytes);
  CHECK(slurp(log) == log_text);
  // Another --lr changes nothing there, and is warned about (it was said to "take effect").
  const Run other_lr = run_to("5", {"--lr", "0.05"});
  CHECK(other_lr.code == 0);
  CHECK(other_lr.output.find("[warning] --resume: these settings differ from the checkpoint's, but its run is at its "
                             "--iterations 5 and evaluated: nothing is left for them to change") != std::string::npos);
  CHECK(other_lr.output.find("lr: checkpoint 0.02, command line 0.05") != std::string::npos);
  CHECK(other_lr.output.find("take effect") == std::string::npos);
  // So does a setting of the final evaluation, which ran (it was said to "take effect", then
  // "nothing to do").
  const Run other_subset = run_to("5", {"--test-subset", "50"});
  CHECK(other_subset.code == 0);
  CHECK(other_subset.output.find("and evaluated: nothing is left for them to change") != std::string::npos);
  CHECK(other_subset.output.find("test_subset: checkpoint") != std::string::npos);
  CHECK(other_subset.output.find("take effect") == std::string::npos);
  CHECK(other_subset.output.find("the run is complete, nothing to do") != std::string::npos);
  // A run's identity still decides: another seed is refused, its files kept.
  CHECK(run_to("5", {"--seed", "7"}).code == 2);
  CHECK(slurp(ck) == ck_bytes);
  // Without a checkpoint it is a new run under a new run's rules: an existing log (a run stopped
  // before its first checkpoint) is replaced only with --overwrite.
  fs::remove(ck);
  const Run kept = run_to("3");
  CHECK(kept.code == 2);
  CHECK(kept.output.find("already exists") != std::string::npos);
  CHECK(slurp(log) == log_text);
  CHECK(train(small(dir, {"--checkpoint", ck, "--log", log, "--overwrite", "--iterations", "3"}), dir).code == 0);
  // It needs a checkpoint, and is given without --resume or --overwrite (which would replace a
  // finished run's files wherever its checkpoint was deleted).
  CHECK(train(small(dir, {"--auto-resume"}), dir).output.find("--auto-resume needs --checkpoint PATH") !=
        std::string::npos);
  CHECK(run_to("3", {"--resume"}).output.find("give it without --resume") != std::string::npos);
  CHECK(run_to("3", {"--overwrite"}).output.find("give one of them") != std::string::npos);

  // Stopped part-way, then given --iterations at its checkpoint's: the run ends there, evaluated
  // (not called complete), and only then is it complete.
  const std::string cut = (dir / "cut.ckpt").string(), summary = (dir / "cut.json").string();
  Spawned run{spawn_train(small(dir, {"--checkpoint", cut, "--summary", summary, "--iterations", "100000",
                                      "--checkpoint-every", "3"}),
                          dir / "cut.out")};
  for (int i = 0; i < 3000 && !fs::exists(cut); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ::kill(run.pid, SIGTERM);
  REQUIRE(run.wait() == 143);
  const std::string at = std::to_string(blpa::read_checkpoint(cut).state.iteration);
  const std::vector<std::string> end_there{"--checkpoint", cut, "--summary", summary, "--iterations", at,
                                           "--auto-resume"};
  const Run ended = train(small(dir, end_there), dir);
  CAPTURE(ended.output);
  CHECK(ended.code == 0);
  CHECK(ended.output.find("complete") == std::string::npos);
  CHECK(slurp(summary).find("\"status\": \"done\"") != std::string::npos);
  CHECK(slurp(summary).find("\"eval_iter\": " + at + ",") != std::string::npos);
  // This process trained nothing: the run's stored bytes and peak are its checkpoint's, not 0
  // (and not the evaluation's peak), and the summary says where the process began.
  const std::regex figures("\"stored_activation_bytes\": ([0-9]+), \"peak_bytes\": ([0-9]+),");
  std::smatch m;
  const std::string ended_summary = slurp(summary);
  CAPTURE(ended_summary);
  REQUIRE(std::regex_search(ended_summary, m, figures));
  const auto cut_ck = blpa::read_checkpoint(cut);
  CHECK(m[1] == cut_ck.config.at("stored_activation_bytes"));
  CHECK(std::stoll(m[1]) > 0);
  CHECK(std::stoll(m[2]) >= std::stoll(cut_ck.config.at("peak_bytes")));
  CHECK(ended_summary.find("\"resumed_from\": " + at + ",") != std::string::npos);
  const Run complete = train(small(dir, end_there), dir);
  CHECK(complete.code == 0);
  CHECK(complete.output.find("the run is complete, nothing to do") != std::string::npos);
  // Complete means its summary says "done" too: one lost (or never written, as when the run
  // stopped after its final checkpoint) is written again.
  fs::remove(summary);
  const Run summarised = train(small(dir, end_there), dir);
  CHECK(summarised.code == 0);
  CHECK(summarised.output.find("complete") == std::string::npos);
  CHECK(slurp(summary).find("\"status\": \"done\"") != std::string::npos);
  CHECK(slurp(summary).find("\"stored_activation_bytes\": " + cut_ck.config.at("stored_activation_bytes") + ",") !=
        std::string::npos);
  // Its checkpoint deleted (a sweep keeping its disk small): the summary says this run is done,
  // so a rerun of the sweep does nothing (it was refused as a new run over its files, exit 2).
  const std::string done_summary = slurp(summary);
  fs::remove(cut);
  const Run gone = train(small(dir, end_there), dir);
  CAPTURE(gone.output);
  CHECK(gone.code == 0);
  CHECK(gone.output.find("--auto-resume: summary " + summary + " says this run is done at iteration " + at +
                         " (its checkpoint " + cut + " is gone): nothing to do") != std::string::npos);
  CHECK(slurp(summary) == done_summary);
  CHECK_FALSE(fs::exists(cut));
  CHECK(gone.output.find("a new run") == std::string::npos);  // it said so before "nothing to do"
  // --print-config agrees (it refused the outputs as a new run's, exit 2), and another --lr or
  // --test-subset is warned about, as a resume of the evaluated run's checkpoint warns: the
  // evaluation's settings have nothing left to act on either.
  auto printed = end_there;
  printed.push_back("--print-config");
  CHECK(train(small(dir, printed), dir).code == 0);
  auto lr_flags = end_there;
  lr_flags.insert(lr_flags.end(), {"--lr", "0.05", "--test-subset", "32"});
  const Run lr_gone = train(small(dir, lr_flags), dir);
  CAPTURE(lr_gone.output);
  CHECK(lr_gone.code == 0);
  CHECK(lr_gone.output.find("these settings differ from the summary's, but its run is done and evaluated: nothing "
                            "is left for them to change") != std::string::npos);
  CHECK(lr_gone.output.find("lr: summary 0.02, command line 0.05") != std::string::npos);
  CHECK(lr_gone.output.find("test_subset: summary 64, command line 32") != std::string::npos);
  CHECK(lr_gone.output.find("threads:") == std::string::npos);  // only what differs
  CHECK(slurp(summary) == done_summary);
  // An export lost with the checkpoint cannot be written again: said (it was "nothing to do"
  // alone), and still exit 0, the run being done.
  auto export_gone = end_there;
  const std::string lost = (dir / "lost.pt").string();
  export_gone.insert(export_gone.end(), {"--export", lost});
  const Run no_export = train(small(dir, export_gone), dir);
  CAPTURE(no_export.output);
  CHECK(no_export.code == 0);
  CHECK(no_export.output.find("--auto-resume: --export " + lost + " does not exist, and its run's checkpoint " + cut +
                              " is gone: it cannot be written again") != std::string::npos);
  CHECK(gone.output.find("cannot be written again") == std::string::npos);
  // Another run (a seed the sweep added, with the same file names) is refused, naming the run
  // whose summary it would replace.
  auto seed_5 = end_there;
  seed_5.insert(seed_5.end(), {"--seed", "5"});
  const Run other = train(small(dir, seed_5), dir);
  CAPTURE(other.output);
  CHECK(other.code == 2);
  const std::string id = blpa::json_string(cut_ck.config.at("run_id"));
  CHECK(other.output.find("--summary " + summary + " (the summary of run " + id.substr(1, id.size() - 2) +
                          ", done at iteration " + at + ") already exists") != std::string::npos);

  // --precision auto continues at the checkpoint's (bf16), from the command line too.
  const std::string bf16 = (dir / "bf16.ckpt").string();
  REQUIRE(train(small(dir, {"--checkpoint", bf16, "--iterations", "2", "--precision", "bf16"}), dir).code == 0);
  const Run bf16_resumed = train(small(dir, {"--checkpoint", bf16, "--iterations", "3", "--auto-resume"}), dir);
  CAPTURE(bf16_resumed.output);
  CHECK(bf16_resumed.code == 0);
  CHECK(blpa::read_checkpoint(bf16).config.at("precision") == "bf16");
  // --print-config shows that precision (it showed auto's), and refuses what the resume would.
  const Run shown = train(small(dir, {"--checkpoint", bf16, "--auto-resume", "--print-config"}), dir);
  CAPTURE(shown.output);
  CHECK(shown.code == 0);
  CHECK(shown.output.find("precision=bf16\n") != std::string::npos);
  const Run other_seed = train(small(dir, {"--checkpoint", bf16, "--resume", "--print-config", "--seed", "7"}), dir);
  CAPTURE(other_seed.output);
  CHECK(other_seed.code == 2);
  CHECK(other_seed.output.find("seed: checkpoint 0, command line 7") != std::string::npos);
  remove_tree(dir);
}

TEST_CASE("hardening: --auto-resume does not retry a run that diverged, unless its learning rate changed", "[hardening]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("auto-diverged");
  const std::string ck = (dir / "d.ckpt").string(), summary = (dir / "d.json").string();
  auto run_at = [&](const char* lr) {
    const Run r = train(small(dir, {"--checkpoint", ck, "--summary", summary, "--iterations", "8",
                                    "--checkpoint-every", "4", "--lr", lr, "--auto-resume"}),
                        dir);
    CAPTURE(r.output);
    return r;
  };
  // Four iterations and a checkpoint, then a learning rate that overflows: diverged.
  REQUIRE(train(small(dir, {"--checkpoint", ck, "--summary", summary, "--iterations", "4"}), dir).code == 0);
  const Run diverged = run_at("1e30");
  REQUIRE(diverged.code == 3);
  REQUIRE(slurp(summary).find("\"status\": \"diverged\"") != std::string::npos);
  // It had not diverged before this resume: not "again".
  CHECK(diverged.output.find("It diverged before its next checkpoint; the one it resumed, " + ck + " (iteration 4)") !=
        std::string::npos);
  const std::string ck_bytes = slurp(ck), summary_bytes = slurp(summary);
  // Run again as it was (a sweep run again): not retried, nothing written, still exit 3.
  const Run again = run_at("1e30");
  CHECK(again.code == 3);
  CHECK(again.output.find("--auto-resume: the run of checkpoint " + ck + " diverged after iteration ") !=
        std::string::npos);
  CHECK(again.output.find("not retried") != std::string::npos);
  // Refused before it is said to resume, or that its changed settings take effect.
  CHECK(again.output.find("resuming the run in") == std::string::npos);
  CHECK(again.output.find("take effect") == std::string::npos);
  CHECK(slurp(ck) == ck_bytes);
  CHECK(slurp(summary) == summary_bytes);
  // --print-config says so too (it printed, exit 0).
  const Run shown = train(small(dir, {"--checkpoint", ck, "--summary", summary, "--iterations", "8", "--lr", "1e30",
                                      "--auto-resume", "--print-config"}),
                          dir);
  CHECK(shown.code == 3);
  CHECK(shown.output.find("not retried") != std::string::npos);
  // One that diverged before its first checkpoint has nothing to resume: exit 3 too, not
  // "already exists" (exit 2), whatever its learning rate.
  const std::string early = (dir / "early.json").string(), none = (dir / "none.ckpt").string();
  auto early_run = [&](const char* lr) {
    return train(small(dir, {"--checkpoint", none, "--summary", early, "--iterations", "8", "--checkpoint-every",
                             "100", "--lr", lr, "--auto-resume"}),
                 dir);
  };
  REQUIRE(early_run("1e30").code == 3);
  const Run early_again = early_run("0.02");
  CAPTURE(early_again.output);
  CHECK(early_again.code == 3);
  CHECK(early_again.output.find("before its first checkpoint") != std::string::npos);
  // With a lower learning rate it resumes from the kept checkpoint and finishes.
  const Run lower = run_at("0.02");
  CHECK(lower.code == 0);
  CHECK(slurp(summary).find("\"status\": \"done\"") != std::string::npos);
  CHECK(blpa::read_checkpoint(ck).state.iteration == 8);
  remove_tree(dir);
}

TEST_CASE("hardening: a full disk is an error naming the file, and leaves no temporary file", "[hardening]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("full");
  // ulimit -f (in 1 KiB blocks) makes writes past it fail with EFBIG, as a full disk fails
  // them with ENOSPC: both reach the same code path.
  const std::string ck = (dir / "a.ckpt").string();
  const Run r = train(small(dir, {"--checkpoint", ck, "--log", (dir / "a.jsonl").string()}), dir, "ulimit -f 200;");
  CAPTURE(r.output);
  CHECK(r.code == 1);
  CHECK(r.output.find(ck + ": cannot be written (File too large)") != std::string::npos);
  check_clean(r);
  CHECK_FALSE(fs::exists(ck));
  CHECK(no_temporaries(dir));

  const std::string pt = (dir / "a.pt").string(), summary = (dir / "a.json").string();
  const Run x = train(small(dir, {"--export", pt, "--summary", summary}), dir, "ulimit -f 200;");
  CAPTURE(x.output);
  CHECK(x.code == 1);
  CHECK(x.output.find(pt + ": cannot be written (File too large)") != std::string::npos);
  check_clean(x);
  CHECK_FALSE(fs::exists(pt));
  CHECK(no_temporaries(dir));
  // The summary, which fits, says so (it said nothing: none was written).
  CHECK(slurp(summary).find("\"status\": \"failed\"") != std::string::npos);
  CHECK(slurp(summary).find("\"error\": \"" + pt + ": cannot be written (File too large)") != std::string::npos);

  // A log that cannot take a record stops the run at once, with the reason.
  const Run l = train(small(dir, {"--log", "/dev/full"}), dir);
  CAPTURE(l.output);
  CHECK(l.code == 1);
  CHECK(l.output.find("--log /dev/full: a record could not be written (No space left on device)") != std::string::npos);
  check_clean(l);
  remove_tree(dir);
}

TEST_CASE("hardening: a damaged checkpoint is refused, naming the record that fails", "[hardening]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("crc");
  const std::string ck = (dir / "a.ckpt").string();
  REQUIRE(train(small(dir, {"--checkpoint", ck}), dir).code == 0);
  REQUIRE_NOTHROW(blpa::verify_archive(ck));
  // One flipped bit in the middle of the largest tensor's bytes (the middle of the file can
  // fall into the padding that aligns each record, which no CRC covers and nothing reads).
  size_t offset = 0, largest = 0;
  {
    caffe2::serialize::PyTorchStreamReader reader(ck);
    for (const auto& name : reader.getAllRecords())
      if (const size_t size = reader.getRecordSize(name); size > largest)
        largest = size, offset = reader.getRecordOffset(name) + size / 2;
  }
  std::string bytes = slurp(ck);
  const fs::path bad = dir / "bad.ckpt";
  REQUIRE(offset < bytes.size());
  bytes[offset] ^= 0x10;
  std::ofstream(bad, std::ios::binary) << bytes;
  CHECK_THROWS_WITH(blpa::verify_archive(bad.string()), Catch::Contains("fails its CRC check"));

  const Run resumed = train(small(dir, {"--checkpoint", bad.string(), "--resume", "--iterations", "8"}), dir);
  CAPTURE(resumed.output);
  CHECK(resumed.code == 1);
  CHECK(resumed.output.find("is damaged or truncated: record '") != std::string::npos);
  CHECK(resumed.output.find("start the run again with --overwrite") != std::string::npos);  // what helps
  check_clean(resumed);
  const Run eval = run(BLPA_EVAL_EXE, {"--checkpoint", bad.string(), "--subset", "10"}, dir);
  CHECK(eval.code == 1);
  CHECK(eval.output.find("fails its CRC check") != std::string::npos);
  // A byte flipped in a record's name in its local header (the first record's, at byte 31),
  // which no CRC covers and LibTorch's reader does not read.
  std::string named = slurp(ck);
  named[31] ^= 0x01;
  std::ofstream(dir / "named.ckpt", std::ios::binary) << named;
  CHECK_THROWS_WITH(blpa::verify_archive((dir / "named.ckpt").string()),
                    Catch::Contains("its local header does not match the directory"));
  // Cut short, and not a zip at all.
  std::ofstream(dir / "short.ckpt", std::ios::binary) << slurp(ck).substr(0, 5000);
  CHECK_THROWS_WITH(blpa::verify_archive((dir / "short.ckpt").string()), Catch::Contains("damaged or truncated"));
  // Another file given by mistake is called what it is, not damage.
  std::ofstream(dir / "text.ckpt") << "not a checkpoint";
  CHECK_THROWS_WITH(blpa::read_checkpoint((dir / "text.ckpt").string()),
                    Catch::Contains("is not a blpa-train checkpoint: it is not a zip archive") &&
                        !Catch::Contains("JSON") && !Catch::Contains("damaged"));
  std::ofstream(dir / "log.jsonl") << "{\"type\": \"config\"}\n";
  const Run as_log = run(BLPA_EVAL_EXE, {"--checkpoint", (dir / "log.jsonl").string()}, dir);
  CHECK(as_log.code == 1);
  CHECK(as_log.output.find("is not a blpa-train checkpoint: it is not a zip archive, as checkpoints are (it reads as "
                           "JSON: a --log or --summary file?)") != std::string::npos);
  remove_tree(dir);
}

TEST_CASE("hardening: a crafted pickle cannot make the reader allocate or read what the file does not hold",
          "[hardening]") {
  // LibTorch's unpickler trusts a pickle's lengths, memo indices and storage sizes: fuzzing
  // found a checkpoint of 4 KB that took 4.3 GB of memory to be refused, and a weight's record
  // cut to 4 bytes loaded (and was read past its end). verify_archive walks the pickles first,
  // accepting only what LibTorch's pickler writes.
  const auto dir = temp_dir("pickle");
  using Records = std::vector<std::pair<std::string, std::string>>;
  auto archive = [&](const std::string& name, const Records& records, bool compress = false) {
    const std::string path = (dir / (name + ".ckpt")).string();
    caffe2::serialize::PyTorchStreamWriter writer(path);
    for (const auto& [record, bytes] : records) writer.writeRecord(record, bytes.data(), bytes.size(), compress);
    writer.writeEndOfFile();
    return path;
  };
  using namespace std::string_literals;
  const std::string proto = "\x80\x02"s;
  // A storage's tuple as the pickler writes it: its strings and type memoized the first time.
  const std::string storage = "(X\x07\0\0\0storageq\0ctorch\nFloatStorage\nq\x01X\x01\0\0\0" "0q\x02"
                              "X\x03\0\0\0cpuq\x03K\x02tQq\x04"s;
  const std::string again = "(h\0h\x01X\x01\0\0\0" "1q\x05h\x03K\x02tQq\x06"s;  // a second, from the memo
  const std::string eight(8, '\0'), four(4, '\0');
  CHECK_NOTHROW(blpa::verify_archive(archive("good", {{"data.pkl", proto + "X\x03\0\0\0abcq\0h\0\x86."s}})));
  CHECK_NOTHROW(blpa::verify_archive(archive("memo", {{"data.pkl", proto + "Nq\0Nr\x01\0\0\0q\x01h\x01\x87."s}})));
  // Lists and dicts filled as the pickler fills them, after their memo entry; a module built.
  CHECK_NOTHROW(blpa::verify_archive(archive(
      "filled", {{"data.pkl", proto + "c__torch__.___torch_mangle_12\nModule\n)\x81}q\0(X\x01\0\0\0" "a]q\x01(K\x01" "eub."s}})));
  CHECK_NOTHROW(blpa::verify_archive(
      archive("storages", {{"data.pkl", proto + storage + again + "\x86."s}, {"data/0", eight}, {"data/1", eight}})));
  const std::vector<std::tuple<std::string, Records, std::string>> bad{
      {"BINUNICODE's length", {{"x.debug_pkl", proto + "X\0\0\0\xf0" "abc."s}},
       ".debug_pkl' (11 bytes) needs 4026531840 bytes where 4 are left at byte 2"},
      {"a name in upper case", {{"x.DEBUG_PKL", proto + "X\0\0\0\xf0" "abc."s}},
       ".DEBUG_PKL' (11 bytes) needs 4026531840 bytes where 4 are left at byte 2"},
      {"LONG1's value", {{"x.pkl", proto + "N\x8a\x08\0\0."s}}, "needs 8 bytes where 3 are left at byte 3"},
      {"a memo index far out", {{"x.pkl", proto + "Nr\xff\xff\xff\xff."s}},
       "stores memo entry 4294967295 of a memo of 0 at byte 3"},
      {"a memo index skipped", {{"x.pkl", proto + "Nq\0q\x02."s}}, "stores memo entry 2 of a memo of 1 at byte 5"},
      {"a memo entry never stored", {{"x.pkl", proto + "h\0."s}}, "reads memo entry 0 of a memo of 0 at byte 2"},
      {"no STOP", {{"x.pkl", proto + "X\x03\0\0\0abc"s}}, "ends before its STOP at byte 10"},
      {"GLOBAL's lines", {{"x.pkl", proto + "cmodule"s}}, "has a line without its end at byte 2"},
      {"no PROTO", {{"x.pkl", "N."s}}, "does not begin with PROTO at byte 0"},
      {"an opcode of protocol 4", {{"x.pkl", proto + "\x8c\x01" "a."s}},
       "has opcode 0x8c, which LibTorch's pickler does not write at byte 2"},
      {"a storage larger than its record", {{"data.pkl", proto + storage + "."s}, {"data/0", four}},
       "has a storage of 2 elements of 4 bytes in record 'bad10/data/0' of 4 bytes at byte 60"},
      {"the second storage larger than its record",
       {{"data.pkl", proto + storage + again + "\x86."s}, {"data/0", eight}, {"data/1", four}},
       "has a storage of 2 elements of 4 bytes in record 'bad11/data/1' of 4 bytes at byte 81"},
      {"a storage with no record", {{"data.pkl", proto + storage + "."s}}, "names storage '0', which has no record"},
      {"a storage's tuple of six", {{"data.pkl", proto + "(X\x07\0\0\0storagectorch\nFloatStorage\nX\x01\0\0\0"
                                                        "0X\x03\0\0\0cpuK\x01K\x01tQ."s}, {"data/0", eight}},
       "has a storage whose tuple is not what LibTorch's pickler writes"},
      {"a storage's tuple from the memo", {{"data.pkl", proto + storage + "h\x04Q."s}, {"data/0", eight}},
       "has a storage whose tuple is not what LibTorch's pickler writes"},
      {"a storage of no type", {{"data.pkl", proto + "(X\x07\0\0\0storageK\x06X\x01\0\0\0" "0X\x03\0\0\0cpuK\x01tQ."s},
                                {"data/0", eight}},
       "has a storage whose tuple is not what LibTorch's pickler writes"},
      // What the older unpickler source read for this would read or erase past the stack's end
      // (LibTorch 2.15 checks these itself).
      {"a TUPLE whose MARK was taken", {{"x.pkl", proto + "NN(\x86t."s}},
       "has a TUPLE whose MARK is no longer on the stack at byte 6"},
      {"a DICT whose MARK was taken", {{"x.pkl", proto + "NN(\x86" "d."s}},
       "has a DICT whose MARK is no longer on the stack at byte 6"},
      {"a DICT of a key without its value", {{"x.pkl", proto + "(Nd."s}},
       "has a DICT of a key without its value at byte 4"},
      {"a SETITEMS of a key without its value", {{"x.pkl", proto + "}(NNNu."s}},
       "has a SETITEMS of a key without its value at byte 7"},
      {"a SETITEMS with no dict", {{"x.pkl", proto + "(NNu."s}}, "has a SETITEMS with nothing below its MARK at byte 5"},
      {"a TUPLE without a MARK", {{"x.pkl", proto + "Nt."s}}, "has a TUPLE without its MARK at byte 3"},
      {"a memo entry of an empty stack", {{"x.pkl", proto + "q\0."s}},
       "stores an empty stack's top in the memo at byte 2"},
      {"two values left", {{"x.pkl", proto + "NN."s}}, "ends with 2 values and 0 MARKs on its stack at byte 4"},
      // Calls whose effect on the stack the walk cannot know, or that blpa never writes.
      {"a REDUCE of a number", {{"x.pkl", proto + "K\0NR."s}}, "has a REDUCE whose callable is not a global at byte 5"},
      {"a global blpa does not write", {{"x.pkl", proto + "ctorch._tensor\n_rebuild_from_type_v2\n."s}},
       "has the global torch._tensor._rebuild_from_type_v2, which blpa does not write at byte 2"},
      // A registered C++ class: its __setstate__ ran on the pickle's values and crashed blpa-eval.
      {"a TorchScript custom class", {{"x.pkl", proto + "c__torch__.torch.classes.quantized\nConv2dPackedParamsBase\n."s}},
       "has the global __torch__.torch.classes.quantized.Conv2dPackedParamsBase, which blpa does not write"},
      // LibTorch frees nested values recursively: 200,000 tuples deep overflowed its stack.
      {"tuples nested 33 deep", {{"x.pkl", proto + "N"s + std::string(33, '\x85') + "."s}},
       "nests containers more than 32 deep at byte 35"},
      {"more values than any checkpoint's", {{"x.pkl", proto + std::string((1 << 21) + 1, 'N') + "."s}},
       "holds more than 2097152 values on its stack or in its memo at byte 2097154"},
      // A list filled after it went into a tuple would deepen the tuple unseen.
      {"a list filled after it was placed", {{"x.pkl", proto + "]q\0\x85h\0(Ne."s}},
       "has an APPENDS into a container that is not a new list or dict at byte 10"},
  };
  for (size_t i = 0; i < bad.size(); ++i) {
    const auto& [what, records, message] = bad[i];
    CAPTURE(what);
    CHECK_THROWS_WITH(blpa::verify_archive(archive("bad" + std::to_string(i), records)),
                      Catch::Contains("is damaged or truncated: pickle '") && Catch::Contains(message));
  }
  // Code beyond modules' attributes: TorchScript's importer would compile it, a __setstate__
  // would run as the pickle loads, and an enum's call may push nothing.
  const std::string module = "class Module(Module):\n  __parameters__ = [\"weight\", ]\n  weight : Tensor\n";
  CHECK_NOTHROW(blpa::verify_archive(archive("module", {{"x.pkl", proto + "N."s}, {"code/__torch__/m.py", module}})));
  const std::vector<std::pair<std::string, std::string>> code{
      {"class E(Enum):\n  A = 1\n", "line 1 is not a module's attribute: 'class E(Enum):'"},
      {module + "  def __setstate__(self, state: Tensor) -> None:\n",
       "line 4 is not a module's attribute: '  def __setstate__(self, state: Tensor) -> None:'"},
      {module + "  __annotations__[\"x\"] = torch.zeros([1 << 40])\n", "line 4 is not a module's attribute"},
      {module + "  x : " + std::string(5, '[') + "int" + std::string(5, ']') + "\n", "line 4 is not a module's attribute"},
      {"class Module(Module):\n  __parameters__ = [\"a\\\"\", ]\n", "line 2 is not a module's attribute"},
  };
  for (size_t i = 0; i < code.size(); ++i)
    CHECK_THROWS_WITH(blpa::verify_archive(archive("code" + std::to_string(i),
                                                   {{"x.pkl", proto + "N."s}, {"code/__torch__/M.PY", code[i].first}})),
                      Catch::Contains("code/__torch__/M.PY' " + code[i].second));
  // A second directory in a zip comment (or in bytes after the directory) is the one LibTorch's
  // reader would find: the walk's checks were passed by the first, and its 4 GB allocation came back.
  for (const std::string& after : {"xx"s, "junk"s}) {
    std::string bytes = slurp(archive("good", {{"data.pkl", proto + "N."s}}));
    if (after == "xx") bytes[bytes.size() - 2] = 2;  // the directory's comment: its length, then the bytes
    bytes += after;
    std::ofstream(dir / "after.ckpt", std::ios::binary) << bytes;
    CHECK_THROWS_WITH(blpa::verify_archive((dir / "after.ckpt").string()),
                      Catch::Contains("no zip directory at its end (or bytes after it"));
  }
  // What a second reader found past those checks, each reproduced by blpa-eval (2026-12-01):
  auto refused = [&](const std::string& what, const std::string& path, const std::string& message) {
    CAPTURE(what);
    CHECK_THROWS_WITH(blpa::verify_archive(path), Catch::Contains("is damaged or truncated: ") && Catch::Contains(message));
  };
  // bytes 4-7 "PTMF": LibTorch's loader reads a flatbuffer module, whose code ran;
  std::string ptmf = slurp(archive("ptmf", {{"data.pkl", proto + "N."s}}));
  ptmf.replace(4, 4, "PTMF");
  std::ofstream(dir / "ptmf.ckpt", std::ios::binary) << ptmf;
  refused("PTMF", (dir / "ptmf.ckpt").string(), "does not begin with a zip record");
  // a record miniz takes for a directory (read as an uninitialised buffer), or named with a NUL;
  std::string directory = slurp(archive("directory", {{"data.pkl", proto + "N."s}, {"data/0", eight}}));
  const size_t entry = directory.rfind("directory/data/0") - 46;  // its central directory entry
  REQUIRE(directory.compare(entry, 4, "PK\x01\x02") == 0);
  directory[entry + 38] = 0x10;  // external attributes: MS-DOS's directory bit
  std::ofstream(dir / "directory.ckpt", std::ios::binary) << directory;
  refused("a directory", (dir / "directory.ckpt").string(),
          "has a record named 'directory/data/0' of a kind LibTorch's writer does not write");
  std::string nul = slurp(archive("nul", {{"data.pkl", proto + "N."s}, {"data/0_x", eight}}));
  nul[nul.rfind("nul/data/0_x") + 10] = '\0';  // in the central directory's name
  std::ofstream(dir / "nul.ckpt", std::ios::binary) << nul;
  refused("a NUL", (dir / "nul.ckpt").string(), "has a record named 'nul/data/0?x' of a kind");
  // a storage key that is no number, or one named twice (each time read whole: 1.8 GB);
  refused("a key of letters",
          archive("letters", {{"data.pkl", proto + "(X\x07\0\0\0storagectorch\nFloatStorage\nX\x01\0\0\0" "aX\x03\0\0\0cpuK\x02tQ."s},
                              {"data/a", eight}}),
          "names storage 'a', where LibTorch's pickler writes a number");
  refused("a key twice",
          archive("twice", {{"data.pkl", proto + storage + "(h\0h\x01h\x02h\x03K\x02tQ\x86."s}, {"data/0", eight}}),
          "names storage '0' a second time");
  // module classes nested 17 deep (the importer recursed per class: 5,000 overflowed its
  // stack), or in a cycle; and a class of more than 65,536 lines (its import takes the square).
  Records chain{{"x.pkl", proto + "N."s}};
  for (int i = 0; i < 17; ++i)
    chain.emplace_back("code/__torch__/___torch_mangle_" + std::to_string(i) + ".py",
                       "class Module(Module):\n  x : __torch__.___torch_mangle_" + std::to_string(i + 1) + ".Module\n");
  chain.emplace_back("code/__torch__/___torch_mangle_17.py", "class Module(Module):\n");
  refused("a chain of 17", archive("chain", chain), "has module classes nested more than 16 deep");
  // and a class with no code (the import's error reads the .debug_pkl records)
  refused("a class with no code",
          archive("missing", {{"x.pkl", proto + "N."s},
                              {"code/__torch__.py", "class Module(Module):\n  x : __torch__.___torch_mangle_5.Module\n"}}),
          "names a module class whose code, missing/code/__torch__/___torch_mangle_5.py, it does not hold");
  chain.resize(3);
  chain.emplace_back("code/__torch__/___torch_mangle_2.py", "class Module(Module):\n  x : __torch__.Module\n");
  chain.emplace_back("code/__torch__.py", "class Module(Module):\n  x : __torch__.___torch_mangle_0.Module\n");
  refused("a cycle", archive("cycle", chain), "has module classes nested more than 16 deep");
  std::string long_class = "class Module(Module):\n";
  for (int i = 0; i < 65536; ++i) long_class += "  a : int\n";
  refused("65,537 lines", archive("lines", {{"x.pkl", proto + "N."s}, {"code/__torch__.py", long_class}}),
          "line 65537 is not a module's attribute");
  // a line of names (the parser makes a node of each: 730 MB from 1.1 MB)
  std::string names = "class Module(Module):\n  __parameters__ = [";
  for (int i = 0; i < 300; ++i) names += "\"a\", ";
  refused("a long line", archive("names", {{"x.pkl", proto + "N."s}, {"code/__torch__.py", names + "]\n"}}),
          "line 2 is not a module's attribute");
  // And what a third reading found: directory entries that share one record's bytes (each read
  // whole: 3.55 GB from 34 MB), a tensor's record deflated (zeros inflate a thousandfold), and
  // two names LibTorch's reader cannot tell apart (which one it finds depends on their order).
  std::string alias = slurp(archive("alias", {{"data.pkl", proto + "N."s}, {"data/0", eight}, {"data/1", eight}}));
  const size_t first = alias.rfind("alias/data/0") - 46, second = alias.rfind("alias/data/1") - 46;
  alias.replace(second + 42, 4, alias.substr(first + 42, 4));  // the second entry's local header: the first's
  std::ofstream(dir / "alias.ckpt", std::ios::binary) << alias;
  refused("entries sharing bytes", (dir / "alias.ckpt").string(), "has records that share bytes");
  refused("a deflated tensor", archive("deflated", {{"data/0", eight}}, true),
          "is compressed (method 8), where LibTorch's writer deflates only code");
  refused("names equal but for case", archive("case", {{"data.pkl", proto + "N."s}, {"data/0", eight}, {"DATA/0", eight}}),
          "has two records named 'case/DATA/0' but for their case");
  // A code record that would inflate past the bound, refused before it is inflated.
  const std::string zeros(17 << 20, '\0');
  CHECK_THROWS_WITH(blpa::verify_archive(archive("bomb", {{"code/x.py", zeros}}, true)),
                    Catch::Contains("code/x.py' holds 17825792 bytes"));

  // The fuzzer's case in a real checkpoint: the length of the config's string made 4 GB.
  // blpa-eval runs with 1.5 GB of data memory (without the walk, LibTorch's allocation fails
  // there and the message is std::bad_alloc), except under AddressSanitizer, which cannot
  // reserve its shadow memory under that limit and refuses allocations that large itself.
  torch::manual_seed(1);
  blpa::ResNet net(blpa::NetConfig{"cifar", 11, 1, 10, {blpa::Mode::plain}});
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1));
  const std::string ck = (dir / "real.ckpt").string();
  blpa::save_checkpoint(ck, "identity", "arch=cifar\ndepth=11\nmode=plain\n", {}, net, opt);
  REQUIRE_NOTHROW(blpa::verify_archive(ck));
  Records records;
  size_t offset = 0, size = 0;
  {
    caffe2::serialize::PyTorchStreamReader reader(ck);
    offset = reader.getRecordOffset("data.pkl"), size = reader.getRecordSize("data.pkl");
    for (const auto& name : reader.getAllRecords()) {
      if (name == "version" || name == ".data/version" || name == "byteorder" || name == ".data/serialization_id")
        continue;  // the writer writes these itself
      const auto [data, n] = reader.getRecord(name);
      records.emplace_back(name, std::string(static_cast<const char*>(data.get()), n));
    }
  }
  std::string bytes = slurp(ck);
  const std::string key = "X\x0b\0\0\0blpa_config"s;
  const size_t at = bytes.find(key, offset);
  REQUIRE(at < offset + size);
  const size_t value = at + key.size() + 2;  // after the key's BINPUT: the value's BINUNICODE
  REQUIRE(bytes[value] == 'X');
  bytes.replace(value + 1, 4, "\0\0\0\xf0"s);
  blpa_test::fix_zip_crcs(reinterpret_cast<uint8_t*>(bytes.data()), bytes.size());
  std::ofstream(dir / "crafted.ckpt", std::ios::binary) << bytes;
#if defined(__SANITIZE_ADDRESS__)
  const std::string limit;
#else
  const std::string limit = "ulimit -d 1500000;";
#endif
  const Run r = run(BLPA_EVAL_EXE, {"--checkpoint", (dir / "crafted.ckpt").string()}, dir, limit);
  CAPTURE(r.output);
  CHECK(r.code == 1);
  CHECK(r.output.find("is damaged or truncated: pickle '") != std::string::npos);
  CHECK(r.output.find("data.pkl' (" + std::to_string(size) + " bytes) needs 4026531840 bytes where") !=
        std::string::npos);
  check_clean(r);
  // And its first weight's record (the stem's 144 floats) cut to 4 bytes, the archive whole.
  for (auto& [name, data] : records)
    if (name == "data/0") data.resize(4);
  CHECK_THROWS_WITH(blpa::read_checkpoint(archive("short-weight", records)),
                    Catch::Contains("has a storage of 144 elements of 4 bytes in record 'short-weight/data/0' of 4 "
                                    "bytes"));
  remove_tree(dir);
}

TEST_CASE("hardening: a checkpoint whose tensors do not fit its network is refused when it loads", "[hardening]") {
  // LibTorch's Module::load adopts the file's tensors' shapes (it converts their types): a
  // weight of another shape loaded, and the forward pass failed later ("unit expects N x 16 x
  // H x W input"); a momentum buffer of another shape, the first step.
  const auto dir = temp_dir("shapes");
  torch::manual_seed(2);
  auto save = [&](const std::string& name, const std::function<void(blpa::ResNet&, torch::optim::SGD&)>& change) {
    blpa::ResNet net(blpa::NetConfig{"cifar", 11, 1, 10, {blpa::Mode::plain}});
    torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
    const torch::NoGradGuard no_grad;
    for (const auto& p : net->named_parameters()) {  // every parameter with a momentum buffer, as after a step
      auto state = std::make_unique<torch::optim::SGDParamState>();
      state->momentum_buffer(torch::zeros_like(p.value()));
      opt.state()[p.value().unsafeGetTensorImpl()] = std::move(state);
    }
    change(net, opt);
    const std::string path = (dir / name).string();
    blpa::save_checkpoint(path, "identity", "arch=cifar\ndepth=11\nmode=plain\n", {}, net, opt);
    return blpa::read_checkpoint(path);
  };
  auto resume = [](const blpa::Checkpoint& c) {
    auto net = blpa::load_model(c);
    torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
    blpa::load_training_state(c, net, opt);
  };
  CHECK_NOTHROW(resume(save("good.ckpt", [](blpa::ResNet&, torch::optim::SGD&) {})));
  const auto shape = save("shape.ckpt", [](blpa::ResNet& net, torch::optim::SGD&) {
    net->named_parameters()["stem.weight"].set_data(torch::zeros({28, 1, 3, 3}));
  });
  CHECK_THROWS_WITH(blpa::load_model(shape), Catch::Contains(": its weights do not fit the network it names "
                                                             "(stem.weight is [28, 1, 3, 3] Float in the file, "
                                                             "[16, 1, 3, 3] Float in the network)"));
  const auto momentum = save("momentum.ckpt", [](blpa::ResNet& net, torch::optim::SGD& opt) {
    auto& state = static_cast<torch::optim::SGDParamState&>(
        *opt.state().at(net->named_parameters()["fc.weight"].unsafeGetTensorImpl()));
    state.momentum_buffer(torch::zeros({3, 3}));
  });
  CHECK_NOTHROW(blpa::load_model(momentum));
  CHECK_THROWS_WITH(resume(momentum), Catch::Contains(": its optimiser state does not fit the network (the momentum "
                                                      "of fc.weight is [3, 3] Float in the file, [10, 256] Float in "
                                                      "the network)"));
  remove_tree(dir);
}

TEST_CASE("hardening: a divergence keeps the last checkpoint of finite numbers, and blpa-eval refuses NaN weights", "[hardening]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("nan");
  const std::string ck = (dir / "n.ckpt").string();
  REQUIRE(train(small(dir, {"--checkpoint", ck}), dir).code == 0);
  // The battery's case: a checkpoint every iteration at a learning rate that overflows.
  const Run r = train(small(dir, {"--checkpoint", ck, "--checkpoint-every", "1", "--lr", "1e6", "--iterations", "40",
                                  "--resume"}),
                      dir);
  CAPTURE(r.output);
  REQUIRE(r.code == 3);
  CHECK(r.output.find("The last checkpoint of finite numbers, " + ck + " (iteration ") != std::string::npos);
  // A window far wider than the default is named as a cause beside the learning rate, and the
  // loss in words (it said "-nan").
  const Run wide = train(small(dir, {"--window", "1e4", "--iterations", "20"}), dir);
  CAPTURE(wide.output);
  CHECK(wide.code == 3);
  CHECK(std::regex_search(wide.output, std::regex("the loss became (NaN|Inf|-Inf) at iteration")));
  CHECK(wide.output.find("Its --window 10000 is over twice the default at 4 bits (6)") != std::string::npos);
  const Run huge_lr = train(small(dir, {"--lr", "1e30", "--iterations", "20"}), dir);
  CHECK(huge_lr.output.find("--window") == std::string::npos);
  CHECK(huge_lr.output.find("--weight-decay") == std::string::npos);  // the usual decay: the rate's fault
  // A log whose losses overflowed is still JSON: NaN and Inf are null (it held "-nan").
  const std::string nan_log = (dir / "nan.jsonl").string();
  // Its weights stay finite, but the test loss is not: a diverged run too (it ended "done").
  // Each update scales the weights by 1 - 0.02 x 1e9: the third iteration's forward pass reads
  // weights of 4e14 times their first values, whose BatchNorm statistics float32 holds (with
  // 1e11, 4e18, a blpa unit's overflowed on an AVX2 machine, so that the training loss became
  // NaN first), and the evaluation after it weights 2e7 times larger than its running
  // statistics expect, at every unit: its outputs overflow.
  const Run overflow = train(small(dir, {"--log", nan_log, "--iterations", "3", "--weight-decay", "1e9"}), dir);
  CAPTURE(overflow.output);
  CHECK(overflow.code == 3);
  CHECK(overflow.output.find("the test loss became ") != std::string::npos);
  // The cause named: not the learning rate.
  CHECK(overflow.output.find("Its --weight-decay 1000000000 at learning rate 0.02 scales the weights by") !=
        std::string::npos);
  CHECK(slurp(nan_log).find("\"test_loss\": null") != std::string::npos);
  CHECK(!std::regex_search(slurp(nan_log), std::regex(": -?(nan|inf)", std::regex::icase)));
  const auto c = blpa::read_checkpoint(ck);
  CHECK(c.state.iteration >= 4);
  CHECK_NOTHROW(blpa::load_model(c));  // every tensor finite
  // Finite, but the weights of a run about to diverge: their training loss (batch statistics)
  // was finite, while the running statistics may overflow the evaluation. blpa-eval scores
  // it, or says that its loss is not finite (exit 3); never a NaN with exit 0.
  const Run kept = run(BLPA_EVAL_EXE, {"--checkpoint", ck, "--subset", "10"}, dir);
  CAPTURE(kept.output);
  CHECK((kept.code == 0 || kept.code == 3));
  CHECK((kept.code == 3) == (kept.output.find("nan") != std::string::npos));
  if (kept.code == 3) CHECK(kept.output.find("the network's outputs overflow") != std::string::npos);
  // blpa-predict on the same images answers alike: it printed NaN probabilities with exit 0.
  const Run predicted = run(BLPA_PREDICT_EXE, {"--checkpoint", ck, "--from-dataset", "0..10"}, dir);
  CAPTURE(predicted.output);
  CHECK(predicted.code == kept.code);
  CHECK((predicted.code == 3) == (predicted.output.find("the network's outputs overflow") != std::string::npos));

  // A checkpoint that holds a NaN (written by an older blpa, or by hand) is refused.
  auto model = blpa::load_model(c);
  model->named_parameters()["fc.weight"].detach()[0][0] = std::nan("");
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.1));
  blpa::save_checkpoint((dir / "nan.ckpt").string(), c.identity, "arch=cifar\ndepth=11\nmode=blpa-4\n", c.state, model, opt);
  const Run e = run(BLPA_EVAL_EXE, {"--checkpoint", (dir / "nan.ckpt").string(), "--subset", "10"}, dir);
  CAPTURE(e.output);
  CHECK(e.code == 1);
  CHECK(e.output.find("not finite") != std::string::npos);
  CHECK_THROWS_WITH(blpa::export_state_dict((dir / "nan.pt").string(), model), Catch::Contains("not finite"));
  CHECK_FALSE(fs::exists(dir / "nan.pt"));

  // Finite weights too large for the forward pass (a run's just before its loss became NaN):
  // the loss and the scores are null (NaN logits rank as topk puts them), the exit code says it.
  auto huge = blpa::load_model(blpa::read_checkpoint(ck));  // (models of one Checkpoint share its tensors)
  huge->named_parameters()["fc.weight"].detach().fill_(3e38);
  std::string config;
  for (const auto& [key, value] : c.config) config += key + "=" + value + "\n";
  blpa::save_checkpoint((dir / "huge.ckpt").string(), c.identity, config, c.state, huge, opt);
  const Run h = run(BLPA_EVAL_EXE, {"--checkpoint", (dir / "huge.ckpt").string(), "--subset", "10", "--json"}, dir);
  CAPTURE(h.output);
  CHECK(h.code == 3);
  CHECK(h.output.find("\"loss\": null, \"top1\": null, \"top5\": null, \"top1_error\": null, "
                      "\"top5_error\": null") != std::string::npos);
  CHECK(h.output.find("the network's outputs overflow") != std::string::npos);
  const Run ht = run(BLPA_EVAL_EXE, {"--checkpoint", (dir / "huge.ckpt").string(), "--subset", "10"}, dir);
  CHECK(ht.code == 3);
  CHECK(ht.output.find("10 images: no scores, the loss is ") != std::string::npos);
  // blpa-predict too, whatever this machine's arithmetic made of the kept checkpoint above.
  const Run hp = run(BLPA_PREDICT_EXE, {"--checkpoint", (dir / "huge.ckpt").string(), "--from-dataset", "0..4"}, dir);
  CAPTURE(hp.output);
  CHECK(hp.code == 3);
  CHECK(hp.output.find("the network's outputs overflow") != std::string::npos);
  CHECK(!std::regex_search(hp.output, std::regex("prob\": -?nan")));
  // blpa-bench fidelity has no reference gradient there: it says so (it printed a smallest
  // cosine of 2).
  const Run f = run(BLPA_BENCH_EXE, {"fidelity", "--checkpoint", (dir / "huge.ckpt").string(), "--modes", "blpa",
                                     "--bits", "4", "--batch", "4", "--threads", "1"}, dir);
  CAPTURE(f.output);
  CHECK(f.code == 3);
  CHECK(f.output.find("plain's loss is not finite (the network's outputs overflow") != std::string::npos);
  remove_tree(dir);
}

TEST_CASE("hardening: on --resume every flag takes effect or is refused with both values", "[hardening]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("resume-flags");
  const std::string ck = (dir / "a.ckpt").string();
  REQUIRE(train(small(dir, {"--checkpoint", ck, "--weight-decay", "0"}), dir).code == 0);
  const std::string saved = slurp(ck);

  const Run aug = train(small(dir, {"--checkpoint", ck, "--resume", "--iterations", "8", "--no-augment"}), dir);
  CAPTURE(aug.output);
  CHECK(aug.code == 2);
  CHECK(aug.output.find("augment: checkpoint true, command line false") != std::string::npos);
  const Run batch = train(small(dir, {"--checkpoint", ck, "--resume", "--iterations", "8", "--batch", "16"}), dir);
  CHECK(batch.code == 2);
  CHECK(batch.output.find("batch: checkpoint 32, command line 16") != std::string::npos);
  CHECK(slurp(ck) == saved);

  // Weight decay and momentum take effect: resuming with 0 and with 0.5 ends in different weights.
  std::vector<std::string> exports;
  for (const char* wd : {"0", "0.5"}) {
    fs::copy_file(dir / "a.ckpt", dir / (std::string("wd") + wd + ".ckpt"));
    const std::string pt = (dir / (std::string("wd") + wd + ".pt")).string();
    const Run r = train(small(dir, {"--checkpoint", (dir / (std::string("wd") + wd + ".ckpt")).string(), "--resume",
                                    "--iterations", "6", "--weight-decay", wd, "--momentum", "0.5", "--export", pt,
                                    "--threads", "2"}),
                        dir);
    CAPTURE(r.output);
    REQUIRE(r.code == 0);
    CHECK(r.output.find("momentum: checkpoint 0.9, command line 0.5\n") != std::string::npos);
    // Another order of the same arithmetic: said, since the resume is then not bit for bit.
    CHECK(r.output.find("threads: checkpoint 1, command line 2 (other rounding: the numbers from here may differ "
                        "slightly from an unchanged resume's)") != std::string::npos);
    exports.push_back(slurp(pt));
  }
  CHECK(exports[0] != exports[1]);
  remove_tree(dir);
}

TEST_CASE("hardening: a resumed run's log reads as one run", "[hardening]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("log");
  const std::string ck = (dir / "a.ckpt").string(), log = (dir / "a.jsonl").string();
  // Checkpoints at 3; the log runs to 5 (a run killed after its checkpoint).
  REQUIRE(train(small(dir, {"--checkpoint", ck, "--log", log, "--iterations", "3", "--log-every", "2"}), dir).code == 0);
  const auto at3 = slurp(ck);
  REQUIRE(train(small(dir, {"--checkpoint", ck, "--log", log, "--iterations", "5", "--log-every", "2", "--resume"}), dir)
              .code == 0);
  std::ofstream(ck, std::ios::binary) << at3;
  const Run r = train(small(dir, {"--checkpoint", ck, "--log", log, "--iterations", "6", "--log-every", "2", "--resume"}),
                      dir);
  CAPTURE(r.output);
  REQUIRE(r.code == 0);
  CHECK(r.output.find("records after iteration 3 removed") != std::string::npos);
  std::vector<int> iters;
  std::ifstream f(log);
  const std::regex train_record("\"type\": \"train\", \"iter\": ([0-9]+), \"time\": [0-9.]+");
  std::smatch m;
  for (std::string line; std::getline(f, line);)
    if (std::regex_search(line, m, train_record)) iters.push_back(std::stoi(m[1]));
  // 2, 3 (the end of the first run), then 4 and 6: no iteration twice, none missing.
  CHECK(iters == std::vector<int>{2, 3, 4, 6});
  CHECK(slurp(log).find("\"type\": \"config\", \"iter\": 3") != std::string::npos);
  // The config record says what ran, as --print-config does: the data folder (here the default
  // one, named) and how often the run logged, evaluated and checkpointed.
  CHECK(slurp(log).find("\"data_dir\": \"" + std::string(blpa::data::kDebianFashionMnist) + "\"") != std::string::npos);
  CHECK(slurp(log).find("\"log_every\": 2, \"eval_every\": ") != std::string::npos);
  CHECK(slurp(log).find("\"checkpoint_every\": ") != std::string::npos);
  remove_tree(dir);
}

TEST_CASE("hardening: an export is replaced only where it is the run's own", "[hardening]") {
  const auto dir = temp_dir("export-owner");
  const blpa::NetConfig net{"cifar", 11, 1, 10, {blpa::Mode::plain}}, deeper{"cifar", 20, 1, 10, {blpa::Mode::plain}};
  blpa::ResNet model(net);
  const std::string with_id = (dir / "with.pt").string(), without = (dir / "without.pt").string();
  blpa::export_state_dict(with_id, model, "run-a");
  blpa::export_state_dict(without, model);  // as a run from before run ids wrote it
  CHECK(blpa::export_not_replaceable(with_id, "run-a", net).empty());
  CHECK(blpa::export_not_replaceable(with_id, "run-b", net) == "is the export of run run-a");
  CHECK(blpa::export_not_replaceable(with_id, "", net) == "is the export of run run-a");
  // Without a run id: a run that has one cannot tell it from a torch.save file of the user's.
  CHECK(blpa::export_not_replaceable(without, "run-a", net).rfind("holds no run id", 0) == 0);
  // A run from before run ids: its own export, as far as its network's names and shapes tell
  // (a sweep rerun over such runs, or blpa-eval --export run twice, was refused).
  CHECK(blpa::export_not_replaceable(without, "", net).empty());
  CHECK(blpa::export_not_replaceable(without, "", deeper).rfind("holds no run id", 0) == 0);
  // A checkpoint, a folder, a file of text: never.
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.1));
  const std::string ck = (dir / "a.ckpt").string();
  blpa::save_checkpoint(ck, "identity", "arch=cifar\ndepth=11\nmode=plain\n", {}, model, opt);
  CHECK(blpa::export_not_replaceable(ck, "", net).rfind("is a checkpoint", 0) == 0);
  CHECK(blpa::export_not_replaceable(dir.string(), "", net) == "is a folder");
  std::ofstream(dir / "notes.txt") << "my notes\n";
  CHECK(blpa::export_not_replaceable((dir / "notes.txt").string(), "", net).rfind("is not an export", 0) == 0);
  remove_tree(dir);
}

TEST_CASE("hardening: --resume refuses another run's log, summary or export, and drops a record cut short",
          "[hardening]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("resume-log");
  const std::string ck = (dir / "a.ckpt").string(), log = (dir / "a.jsonl").string(), other = (dir / "b.jsonl").string();
  REQUIRE(train(small(dir, {"--checkpoint", ck, "--log", log, "--iterations", "3"}), dir).code == 0);
  REQUIRE(train(small(dir, {"--log", other, "--seed", "7"}), dir).code == 0);
  const std::string other_bytes = slurp(other);

  // A run already complete: nothing to do, and a sweep run again goes on (exit 0).
  const std::string done_bytes = slurp(ck) + slurp(log);
  const Run done = train(small(dir, {"--checkpoint", ck, "--log", log, "--iterations", "3", "--resume"}), dir);
  CAPTURE(done.output);
  CHECK(done.code == 0);
  CHECK(done.output.find("is at iteration 3, evaluated: with --iterations 3 the run is complete, nothing to do") !=
        std::string::npos);
  CHECK(slurp(ck) + slurp(log) == done_bytes);
  // Fewer iterations than its checkpoint's: a run cannot go back, and exit 0 would tell a sweep
  // that a run stopped part-way was finished (its export and evaluation never written).
  const Run back = train(small(dir, {"--checkpoint", ck, "--log", log, "--iterations", "2", "--resume"}), dir);
  CAPTURE(back.output);
  CHECK(back.code == 2);
  CHECK(back.output.find("is at iteration 3, past --iterations 2: a run cannot go back; give --iterations 3 to "
                         "finish it there") != std::string::npos);
  CHECK(back.output.find("take effect") == std::string::npos);  // refused before the changes are listed
  const Run back_shown =
      train(small(dir, {"--checkpoint", ck, "--log", log, "--iterations", "2", "--resume", "--print-config"}), dir);
  CHECK(back_shown.code == 2);  // --print-config checks as the run does
  CHECK(back_shown.output.find("a run cannot go back") != std::string::npos);
  CHECK(slurp(ck) + slurp(log) == done_bytes);

  // Another run's log: refused, and none of its records removed.
  const Run r = train(small(dir, {"--checkpoint", ck, "--log", other, "--iterations", "5", "--resume"}), dir);
  CAPTURE(r.output);
  CHECK(r.code == 2);
  CHECK(r.output.find("--log " + other + " is the log of another run:\n  seed: log 7, this run 0") != std::string::npos);
  CHECK(r.output.find("take effect") == std::string::npos);  // refused: its --iterations 5 was said to
  check_clean(r);
  CHECK(slurp(other) == other_bytes);
  // A file that is no blpa-train log at all.
  std::ofstream(dir / "notes.txt") << "my notes\n";
  const Run n = train(small(dir, {"--checkpoint", ck, "--log", (dir / "notes.txt").string(), "--iterations", "5",
                                  "--resume"}),
                      dir);
  CHECK(n.code == 2);
  CHECK(n.output.find("holds no blpa-train config record") != std::string::npos);
  CHECK(slurp(dir / "notes.txt") == "my notes\n");

  // Another run of the same settings but --lr (not part of the identity): its log, summary and
  // export are told apart by their run id, and left as they are. The log's records past the
  // checkpoint's iteration were removed before run ids.
  const std::string twin_log = (dir / "twin.jsonl").string(), twin_summary = (dir / "twin.json").string(),
                    twin_export = (dir / "twin.pt").string();
  REQUIRE(train(small(dir, {"--log", twin_log, "--summary", twin_summary, "--export", twin_export, "--iterations",
                            "5", "--lr", "0.05"}),
                dir)
              .code == 0);
  // A state dict with no run id (a user's torch.save file, or an export from before run ids) and
  // another run's checkpoint: each was taken for this run's export and written over at its end.
  const std::string no_id = (dir / "mine.pt").string(), twin_ck = (dir / "twin.ckpt").string();
  blpa::ResNet other_net(blpa::NetConfig{"cifar", 11, 1, 10, {blpa::Mode::plain}});
  blpa::export_state_dict(no_id, other_net);
  fs::copy_file(ck, twin_ck);
  const std::string twin_bytes =
      slurp(twin_log) + slurp(twin_summary) + slurp(twin_export) + slurp(no_id) + slurp(twin_ck);
  const std::vector<std::pair<std::vector<std::string>, std::string>> twins{
      {{"--log", twin_log}, "--log " + twin_log + " is the log of another run:\n  run_id: log \""},
      {{"--log", log, "--summary", twin_summary}, "--summary " + twin_summary + " is the summary of run "},
      {{"--log", log, "--export", twin_export}, "--export " + twin_export + " is the export of run "},
      {{"--log", log, "--export", no_id}, "--export " + no_id + " holds no run id"},
      {{"--log", log, "--export", twin_ck}, "--export " + twin_ck + " is a checkpoint (or another TorchScript"},
  };
  for (const auto& [flags, message] : twins) {
    std::vector<std::string> args{"--checkpoint", ck, "--iterations", "5", "--resume"};
    args.insert(args.end(), flags.begin(), flags.end());
    const Run t = train(small(dir, args), dir);
    CAPTURE(t.output);
    CHECK(t.code == 2);
    CHECK(t.output.find(message) != std::string::npos);
  }
  CHECK(slurp(twin_log) + slurp(twin_summary) + slurp(twin_export) + slurp(no_id) + slurp(twin_ck) == twin_bytes);

  // A record cut short (a full disk, a kill): the resumed log is whole lines again.
  std::ofstream(log, std::ios::app) << "{\"type\": \"train\", \"iter\": 3, \"ti";
  const Run ok = train(small(dir, {"--checkpoint", ck, "--log", log, "--iterations", "5", "--resume"}), dir);
  CAPTURE(ok.output);
  REQUIRE(ok.code == 0);
  std::ifstream f(log);
  int lines = 0;
  for (std::string line; std::getline(f, line); ++lines) {
    CAPTURE(line);
    CHECK(line.front() == '{');
    CHECK(line.back() == '}');
  }
  CHECK(lines >= 7);  // config, 1-3, config, 4-5
  CHECK(slurp(log).find("\"ti{") == std::string::npos);
  // That record was iteration 3's, the checkpoint's own: not computed again, and said so.
  CHECK(ok.output.find("its last record was cut short (a write interrupted) and is removed; the log has no record "
                       "for the iterations it covered (up to 3)") != std::string::npos);
  CHECK(ok.output.find("after iteration 3 removed") == std::string::npos);  // it was not after: counted once

  // A record damaged in the middle (by hand): removed, and said; the log is JSON lines again.
  // An editor's byte-order mark before the config record and a blank line are no damage.
  std::string text = slurp(log);
  const size_t second = text.find('\n') + 1;
  text.replace(second, text.find('\n', second) - second, "{broken\n");
  // And a resume's config record cut short after it: no iterations to name ("up to 5").
  std::ofstream(log, std::ios::trunc) << "\xEF\xBB\xBF" << text << "{\"type\": \"config\", \"iter\": 5, \"ti";
  const Run damaged = train(small(dir, {"--checkpoint", ck, "--log", log, "--iterations", "6", "--resume"}), dir);
  CAPTURE(damaged.output);
  REQUIRE(damaged.code == 0);
  CHECK(damaged.output.find("--log " + log + ": line 2 is no whole JSON record (damaged) and is removed: '{broken'") !=
        std::string::npos);
  CHECK(damaged.output.find("line 1 ") == std::string::npos);
  CHECK(damaged.output.find("line 3 ") == std::string::npos);  // the blank one
  CHECK(damaged.output.find("its last record, a run's config record, was cut short (a write interrupted) and is "
                            "removed; this run writes its own") != std::string::npos);
  CHECK(damaged.output.find("up to 5") == std::string::npos);
  CHECK(slurp(log).find("{broken") == std::string::npos);
  CHECK(slurp(log).find("\xEF\xBB\xBF{\"type\": \"config\", \"iter\": 0,") == 0);
  // An emptied log: said, as a missing one is.
  std::ofstream(log, std::ios::trunc).flush();
  const Run emptied = train(small(dir, {"--checkpoint", ck, "--log", log, "--iterations", "7", "--resume"}), dir);
  CAPTURE(emptied.output);
  REQUIRE(emptied.code == 0);
  CHECK(emptied.output.find("--log " + log + " is empty: it begins again at iteration 6, without the run's records "
                            "before it") != std::string::npos);
  // A resume that forgets the run's --log: said (a sweep's second command line), not refused.
  const Run forgot = train(small(dir, {"--checkpoint", ck, "--iterations", "8", "--resume"}), dir);
  CAPTURE(forgot.output);
  CHECK(forgot.code == 0);
  CHECK(forgot.output.find("checkpoint " + ck + "'s run was given --log, this resume none: its records from here on "
                           "are not kept") != std::string::npos);
  remove_tree(dir);
}

TEST_CASE("hardening: a run naming a running run's files is refused, and nothing of either is lost", "[hardening]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("lock");
  const std::string ck = (dir / "a.ckpt").string(), log = (dir / "a.jsonl").string();
  Spawned first{spawn_train(small(dir, {"--checkpoint", ck, "--log", log, "--iterations", "100000"}), dir / "a.out")};
  wait_for_record(log, "\"type\": \"train\", \"iter\": 2,");
  REQUIRE(fs::exists(ck + ".lock"));
  // A fresh run told to replace its files, and a resume of its checkpoint: both refused at
  // once, naming the running process.
  for (const auto& extra : std::vector<std::vector<std::string>>{{"--overwrite"}, {"--resume"}}) {
    auto args = small(dir, {"--checkpoint", ck, "--log", (dir / "b.jsonl").string()});
    args.insert(args.end(), extra.begin(), extra.end());
    const Run second = train(args, dir);
    CAPTURE(extra, second.output);
    CHECK(second.code == 1);
    CHECK(second.output.find("--checkpoint " + ck + " is in use by another blpa-train (process " +
                             std::to_string(first.pid) + ")") != std::string::npos);
    check_clean(second);
    CHECK_FALSE(fs::exists(dir / "b.jsonl"));
  }
  const Run log_only = train(small(dir, {"--log", log, "--overwrite"}), dir);
  CHECK(log_only.code == 1);
  CHECK(log_only.output.find("--log " + log + " is in use by another blpa-train") != std::string::npos);
  ::kill(first.pid, SIGTERM);
  CHECK(first.wait() == 143);
  CAPTURE(slurp(dir / "a.out"));
  // The first run's log and checkpoint are its own, and its locks are gone.
  CHECK(slurp(log).find("{\"type\": \"config\"") == 0);
  CHECK(blpa::read_checkpoint(ck).state.iteration >= 2);
  CHECK_FALSE(fs::exists(ck + ".lock"));
  CHECK_FALSE(fs::exists(log + ".lock"));
  // Then the files are free: a resume continues the run.
  const Run resumed = train(small(dir, {"--checkpoint", ck, "--log", log, "--resume", "--iterations",
                                        std::to_string(blpa::read_checkpoint(ck).state.iteration + 1)}),
                            dir);
  CAPTURE(resumed.output);
  CHECK(resumed.code == 0);
  remove_tree(dir);
}

TEST_CASE("hardening: bad input found in loading keeps old files, and eval refuses ImageNet-only flags", "[hardening]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("late-input");
  const std::string ck = (dir / "a.ckpt").string(), log = (dir / "a.jsonl").string();
  REQUIRE(train(small(dir, {"--checkpoint", ck, "--log", log}), dir).code == 0);
  const std::string ck_bytes = slurp(ck), log_bytes = slurp(log);
  const Run r = train(small(dir, {"--checkpoint", ck, "--log", log, "--overwrite", "--batch", "1024"}), dir);
  CAPTURE(r.output);
  CHECK(r.code == 2);
  CHECK(r.output.find("--batch 1024 exceeds the 512 training images") != std::string::npos);
  check_clean(r);
  CHECK(slurp(ck) == ck_bytes);
  CHECK(slurp(log) == log_bytes);
  CHECK_FALSE(fs::exists(ck + ".lock"));
  // blpa-eval's ImageNet protocol flags on a Fashion-MNIST checkpoint: refused, not ignored.
  const Run e = run(BLPA_EVAL_EXE, {"--checkpoint", ck, "--subset", "10", "--ten-crop", "--crop", "20"}, dir);
  CAPTURE(e.output);
  CHECK(e.code == 2);
  CHECK(e.output.find("--ten-crop, --crop apply to ImageNet checkpoints only; " + ck +
                      " was trained on fashion-mnist") != std::string::npos);
  const Run cache = run(BLPA_EVAL_EXE, {"--checkpoint", ck, "--subset", "10", "--index-cache", "/nonexistent"}, dir);
  CHECK(cache.output.find("--index-cache applies to ImageNet checkpoints only") != std::string::npos);
  // A --checkpoint that is not there, or a folder, is a bad flag for every program, as for
  // blpa-train --resume (blpa-eval and blpa-predict said exit 1, blpa-eval with a timestamp).
  const std::string missing = (dir / "b.ckpt").string();
  for (const auto& [exe, args] : std::vector<std::pair<std::string, std::vector<std::string>>>{
           {BLPA_EVAL_EXE, {"--checkpoint", missing}},
           {BLPA_PREDICT_EXE, {"--checkpoint", missing, "--from-dataset", "0..2"}},
           {BLPA_BENCH_EXE, {"fidelity", "--checkpoint", missing}}}) {
    const Run m = run(exe, args, dir);
    CAPTURE(exe, m.output);
    CHECK(m.code == 2);
    CHECK(m.output.find("--checkpoint " + missing + ": no such file") != std::string::npos);
    check_clean(m);
  }
  const Run folder = run(BLPA_EVAL_EXE, {"--checkpoint", dir.string()}, dir);
  CHECK(folder.code == 2);
  CHECK(folder.output.find("--checkpoint " + dir.string() + ": is a directory") != std::string::npos);
  remove_tree(dir);
}

TEST_CASE("hardening: a signal stops after the step it came in, and timeout's two SIGTERMs are one stop",
          "[hardening]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("one-stop");
  const std::string ck = (dir / "a.ckpt").string(), log = (dir / "a.jsonl").string();
  // GNU timeout sends SIGTERM to the run, then to its process group: taken as two signals,
  // they stopped it at once, without the checkpoint the first asked for (a race: 3 in 8).
  // ResNet-56's steps take a while: the signal comes during a step, after which the run
  // stops. It ran one more step (the flag was read before each step).
  auto args = small(dir, {"--checkpoint", ck, "--log", log, "--iterations", "100000", "--checkpoint-every", "100000",
                          "--depth", "56"});
  args.erase(std::find(args.begin(), args.end(), "--quiet"));  // a progress line per step
  Spawned run{spawn_train(args, dir / "run.out")};
  wait_for_record(log, "\"type\": \"train\", \"iter\": 2,");
  ::kill(run.pid, SIGTERM);
  ::kill(run.pid, SIGTERM);
  CHECK(run.wait() == 128 + SIGTERM);
  const std::string out = slurp(dir / "run.out");
  CAPTURE(out);
  CHECK(out.find("stopped at once") == std::string::npos);
  const auto told = out.find("stopping after the current step");
  REQUIRE(told != std::string::npos);
  int64_t steps_after = 0;  // progress lines after the message: the step it came in, if any
  for (auto at = out.find("\niter ", told); at != std::string::npos; at = out.find("\niter ", at + 1)) ++steps_after;
  CHECK(steps_after <= 1);
  const int64_t stopped_at = blpa::read_checkpoint(ck).state.iteration;
  CHECK(stopped_at >= 2);
  CHECK(slurp(log).find(fmt::format("\"iter\": {},", stopped_at + 1)) == std::string::npos);
  remove_tree(dir);
}

TEST_CASE("hardening: a second signal stops at once and says so, and the checkpoint before it is kept", "[hardening]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("second-signal");
  const std::string ck = (dir / "a.ckpt").string(), log = (dir / "a.jsonl").string();
  const std::string summary = (dir / "a.json").string();
  // Steps of 3 s (BLPA_TEST_FAIL=slow-step): both signals arrive during one step, the second
  // before the step ends and the first one's checkpoint is written, and after half a second
  // (the same signal sooner is the same stop: GNU timeout sends two).
  Spawned run{spawn_train(small(dir, {"--checkpoint", ck, "--log", log, "--summary", summary, "--iterations", "1000",
                                      "--checkpoint-every", "1"}),
                          dir / "run.out", {}, "BLPA_TEST_FAIL=slow-step:3000")};
  wait_for_record(log, "\"type\": \"train\", \"iter\": 2,");
  // Into the next step: between steps the first signal stops the run before another.
  std::this_thread::sleep_for(std::chrono::milliseconds(1000));
  ::kill(run.pid, SIGINT);
  std::this_thread::sleep_for(std::chrono::milliseconds(700));
  ::kill(run.pid, SIGINT);
  const int code = run.wait();
  const std::string out = slurp(dir / "run.out");
  CAPTURE(out);
  CHECK(code == 130);
  CHECK(out.find("stopping after the current step and writing a checkpoint (a second signal stops at once") !=
        std::string::npos);
  CHECK(out.find("stopped at once by a second signal: no checkpoint of the current iteration (the last one written "
                 "is kept)") != std::string::npos);
  CHECK(blpa::read_checkpoint(ck).state.iteration >= 1);  // whole (CRCs checked): 1 or 2, whichever was written
  // Its summary says so (there was none: the run dropped out of a sweep's table), as it stood
  // in the last second; no temporary file is left.
  const std::string json = slurp(summary);
  CAPTURE(json);
  CHECK(json.find("{\"type\": \"summary\", \"status\": \"interrupted\", \"iter\": ") == 0);
  CHECK(number_field(json, "iter") >= 1);
  CHECK(json.back() == '\n');
  CHECK(no_temporaries(dir));
  CHECK_FALSE(fs::exists(ck + ".lock"));  // removed before the signal ends it, as at a clean end
  CHECK_FALSE(fs::exists(log + ".lock"));
  CHECK_FALSE(fs::exists(summary + ".lock"));

  // Before the first checkpoint: none is "kept".
  const std::string fresh = (dir / "b.ckpt").string(), fresh_log = (dir / "b.jsonl").string();
  Spawned early{spawn_train(small(dir, {"--checkpoint", fresh, "--log", fresh_log, "--iterations", "1000",
                                        "--checkpoint-every", "1000"}),
                            dir / "early.out", {}, "BLPA_TEST_FAIL=slow-step:3000")};
  wait_for_record(fresh_log, "\"type\": \"train\", \"iter\": 2,");
  std::this_thread::sleep_for(std::chrono::milliseconds(1000));
  ::kill(early.pid, SIGTERM);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ::kill(early.pid, SIGINT);  // another signal: at once, however soon
  CHECK(early.wait() == 130);
  const std::string early_out = slurp(dir / "early.out");
  CAPTURE(early_out);
  CHECK(early_out.find("stopped at once by a second signal, before the run's first checkpoint: there is none to "
                       "resume") != std::string::npos);
  CHECK_FALSE(fs::exists(fresh));
  remove_tree(dir);
}

// A signal while a new run loads stops it before it writes anything: an --overwrite replaces
// nothing. Before, the old run's files went and the new run trained a step to checkpoint it;
// and a script's `cmd &` (SIGINT ignored) lost a Ctrl-C for the 0.3 s LibTorch takes to load,
// since the signals were blocked (kept for take_signals) only in main. Sent here as soon as
// they are blocked, which the loader now does before LibTorch's initialisers run.
TEST_CASE("hardening: a signal while a new run loads, even before main, stops it and --overwrite replaces nothing",
          "[hardening]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("signal-loading");
  const std::string ck = (dir / "a.ckpt").string(), log = (dir / "a.jsonl").string();
  const std::string summary = (dir / "a.json").string(), exported = (dir / "a.pt").string();
  const std::vector<std::string> files{"--checkpoint", ck, "--log", log, "--summary", summary, "--export", exported};
  auto args = [&](std::vector<std::string> extra) {
    extra.insert(extra.end(), files.begin(), files.end());
    return small(dir, extra);
  };
  REQUIRE(train(args({"--iterations", "2"}), dir).code == 0);
  std::vector<std::string> before;
  for (const auto& f : {ck, log, summary, exported}) before.push_back(slurp(f));

  Spawned run{spawn_train(args({"--iterations", "50", "--overwrite"}), dir / "run.out", {SIGINT},
                          "BLPA_TEST_FAIL=slow-load:30000")};  // ends at the stop
  // SIGINT blocked (kept pending for the run), as /proc says of its main thread.
  auto blocked = [&] {
    std::ifstream status("/proc/" + std::to_string(run.pid) + "/status");
    for (std::string line; std::getline(status, line);)
      if (line.rfind("SigBlk:", 0) == 0) return (std::stoull(line.substr(7), nullptr, 16) >> (SIGINT - 1)) & 1;
    return 0ull;
  };
  for (int i = 0; i < 10000 && !blocked(); ++i) std::this_thread::sleep_for(std::chrono::microseconds(500));
  ::kill(run.pid, SIGINT);
  CHECK(run.wait() == 130);
  const std::string out = slurp(dir / "run.out");
  CAPTURE(out);
  CHECK(out.find("stopped before the run began: --overwrite replaced nothing, and nothing was written") !=
        std::string::npos);
  std::vector<std::string> after;
  for (const auto& f : {ck, log, summary, exported}) after.push_back(slurp(f));
  CHECK(after == before);
  CHECK(no_temporaries(dir));
  CHECK_FALSE(fs::exists(ck + ".lock"));
  remove_tree(dir);
}

TEST_CASE("hardening: a process about to end by a signal removes its temporaries and lock files", "[hardening]") {
  // What blpa-train's second signal does before the signal ends it, in a child process: its
  // mutex stays held, as the process must end next.
  const auto dir = temp_dir("transient");
  const std::string out = (dir / "a.ckpt").string(), lock = out + ".lock", other = (dir / "b.ckpt").string();
  std::ofstream(other) << "kept";
  const pid_t child = ::fork();
  if (child == 0) {
    blpa::AtomicFile half(out);  // a checkpoint half written
    half.write("half");
    std::ofstream(lock) << "1";
    blpa::hold_transient(lock);
    { blpa::AtomicFile done(other); done.write("new"); done.commit(); }  // released: not removed
    const bool made = fs::exists(out + ".tmp") && fs::exists(lock);
    blpa::remove_transient_files();
    ::_exit(made ? 0 : 1);
  }
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  CHECK(no_temporaries(dir));
  CHECK_FALSE(fs::exists(lock));
  CHECK_FALSE(fs::exists(out));
  CHECK(slurp(other) == "new");
  remove_tree(dir);
}

// Every parameter and buffer of two checkpoints' networks, bit for bit.
bool same_network(const std::string& a, const std::string& b) {
  auto x = blpa::load_model(blpa::read_checkpoint(a)), y = blpa::load_model(blpa::read_checkpoint(b));
  auto ys = y->named_parameters();
  for (const auto& p : x->named_parameters())
    if (!torch::equal(p.value(), ys[p.key()])) return false;
  auto yb = y->named_buffers();
  for (const auto& p : x->named_buffers())
    if (!torch::equal(p.value(), yb[p.key()])) return false;
  return true;
}

TEST_CASE("hardening: a run failing part-way keeps its last whole iteration, which resumes as if it had not failed",
          "[hardening]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("fail-part-way");
  const std::string ref = (dir / "ref.ckpt").string(), ck = (dir / "a.ckpt").string();
  REQUIRE(train(small(dir, {"--iterations", "6", "--checkpoint", ref}), dir).code == 0);
  // Iteration 4 fails after its forward and backward passes (out of memory in the backward, a
  // lost peer): the checkpoint is iteration 3's, BatchNorm statistics included (the failed
  // forward had moved them), so that the resumed run ends where the run without the failure did.
  const Run failed = train(small(dir, {"--iterations", "6", "--checkpoint", ck}), dir, "BLPA_TEST_FAIL=step:4");
  CAPTURE(failed.output);
  CHECK(failed.code == 1);
  CHECK(failed.output.find("iteration 4 failed after its backward pass (BLPA_TEST_FAIL). Checkpoint " + ck +
                           " holds iteration 3: continue with --resume") != std::string::npos);
  CHECK(blpa::read_checkpoint(ck).state.iteration == 3);
  const Run resumed = train(small(dir, {"--iterations", "6", "--checkpoint", ck, "--resume"}), dir);
  CAPTURE(resumed.output);
  REQUIRE(resumed.code == 0);
  CHECK(same_network(ck, ref));

  // An evaluation that fails leaves it due: the resumed run runs it first.
  const std::string e = (dir / "e.ckpt").string(), log = (dir / "e.jsonl").string();
  const auto evaluating = small(dir, {"--eval-every", "2", "--checkpoint", e, "--log", log});
  const Run eval_failed = train(evaluating, dir, "BLPA_TEST_FAIL=eval:2");
  CAPTURE(eval_failed.output);
  CHECK(eval_failed.code == 1);
  CHECK(eval_failed.output.find("the evaluation failed (BLPA_TEST_FAIL)") != std::string::npos);
  const auto state = blpa::read_checkpoint(e).state;
  CHECK(state.iteration == 2);
  CHECK(state.pending_eval);
  auto again = evaluating;
  again.push_back("--resume");
  REQUIRE(train(again, dir).code == 0);
  CHECK(slurp(log).find("{\"type\": \"eval\", \"iter\": 2,") != std::string::npos);

  // A fresh run that fails in its first iteration has nothing to keep: no checkpoint of the
  // untrained network, which would make its rerun (here with a smaller batch) "another run".
  // Its log and summary record no training: the same --auto-resume command runs it again (they
  // were refused as "already exists"); a log that records training is not replaced.
  const std::string f = (dir / "f.ckpt").string();
  const auto sweep = small(dir, {"--checkpoint", f, "--log", (dir / "f.jsonl").string(), "--summary",
                                 (dir / "f.json").string(), "--auto-resume"});
  const Run first = train(sweep, dir, "BLPA_TEST_FAIL=step:1");
  CAPTURE(first.output);
  CHECK(first.code == 1);
  CHECK_FALSE(fs::exists(f));
  CHECK(first.output.find("--resume") == std::string::npos);
  CHECK(slurp(dir / "f.json").find("\"status\": \"failed\", \"iter\": 0,") != std::string::npos);
  // Subsets above the data are said, both (the test set's was taken whole without a word).
  const Run above =
      train(small(dir, {"--train-subset", "70000", "--test-subset", "20000"}), dir, "BLPA_TEST_FAIL=step:1");
  CHECK(above.output.find("--train-subset 70000 is more than the 60000 training images: all are used") !=
        std::string::npos);
  CHECK(above.output.find("--test-subset 20000 is more than the 10000 test images: all are used") != std::string::npos);
  const Run rerun = train(sweep, dir);
  CAPTURE(rerun.output);
  CHECK(rerun.code == 0);
  CHECK(slurp(dir / "f.json").find("\"status\": \"done\"") != std::string::npos);
  CHECK(slurp(dir / "f.jsonl").find("\"type\": \"train\"") != std::string::npos);
  fs::remove(f);  // the checkpoint gone: its summary says the run is done, so there is nothing to do
  const Run done = train(sweep, dir);
  CHECK(done.code == 0);
  CHECK(done.output.find("says this run is done at iteration 4") != std::string::npos);
  fs::remove(dir / "f.json");  // and without it, the log records training: refused, not replaced
  const Run trained = train(sweep, dir);
  CHECK(trained.code == 2);
  CHECK(trained.output.find("--log " + (dir / "f.jsonl").string() + " (the log of run ") != std::string::npos);
  CHECK(trained.output.find(") already exists") != std::string::npos);
  remove_tree(dir);
}

// A run stopped between log records and resumed with --iterations lowered to where it stopped
// ("give --iterations N to finish it there", as a resume past it is told) logs that
// iteration, from the checkpoint's log window, as a run of N iterations does. Before, its log
// ended a record short.
TEST_CASE("hardening: a run resumed at the iteration where it stopped logs that iteration as a run ending there",
          "[hardening]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("resume-at-end");
  const std::string ref_log = (dir / "ref.jsonl").string(), ck = (dir / "a.ckpt").string();
  const std::string log = (dir / "a.jsonl").string();
  REQUIRE(train(small(dir, {"--iterations", "3", "--log-every", "2", "--log", ref_log}), dir).code == 0);
  // Stopped after iteration 3 (iteration 4 fails): logged at 2, its checkpoint holds 3's window.
  const auto args = small(dir, {"--iterations", "6", "--log-every", "2", "--checkpoint", ck, "--log", log});
  REQUIRE(train(args, dir, "BLPA_TEST_FAIL=step:4").code == 1);
  REQUIRE(blpa::read_checkpoint(ck).state.iteration == 3);
  // A copy as a checkpoint from before 2026-12-02 was: without the run's stored and peak bytes.
  const std::string old_ck = (dir / "old.ckpt").string(), old_log = (dir / "old.jsonl").string();
  {
    const blpa::Checkpoint c = blpa::read_checkpoint(ck);
    auto model = blpa::load_model(c);
    auto opt = blpa::make_optimizer(model, blpa::TrainConfig{});  // the trainer's parameter groups
    blpa::load_training_state(c, model, opt);
    std::string config;
    for (const auto& [key, value] : c.config)
      if (key != "stored_activation_bytes" && key != "peak_bytes") config += key + "=" + value + "\n";
    blpa::save_checkpoint(old_ck, c.identity, config, c.state, model, opt);
    REQUIRE_FALSE(blpa::read_checkpoint(old_ck).peak_bytes);
    fs::copy_file(log, old_log);
  }
  auto at_end = small(dir, {"--iterations", "3", "--log-every", "2", "--checkpoint", ck, "--log", log, "--resume"});
  // Its evaluation failing first: the record it wrote is not written twice by the next resume.
  REQUIRE(train(at_end, dir, "BLPA_TEST_FAIL=eval:3").code == 1);
  const Run resumed = train(at_end, dir);
  CAPTURE(resumed.output);
  REQUIRE(resumed.code == 0);
  // The log's training records of an iteration.
  auto records = [](const std::string& path, int64_t iteration) {
    std::istringstream in(slurp(path));
    const std::string key = "{\"type\": \"train\", \"iter\": " + std::to_string(iteration) + ",";
    std::vector<std::string> found;
    for (std::string line; std::getline(in, line);)
      if (line.rfind(key, 0) == 0) found.push_back(line);
    return found;
  };
  const auto want = records(ref_log, 3), got = records(log, 3);
  CAPTURE(want, got);
  REQUIRE(want.size() == 1);
  REQUIRE(got.size() == 1);
  CHECK(number_field(got[0], "loss") == number_field(want[0], "loss"));
  CHECK(number_field(got[0], "images_per_s") > 0);
  CHECK(number_field(got[0], "peak_bytes") > 0);  // the run's, as its checkpoint kept it
  // Run again, the complete run logs nothing more.
  REQUIRE(train(at_end, dir).code == 0);
  CHECK(records(log, 3).size() == 1);
  // From the older checkpoint: its bytes are not known, null (they read 0). Its learning
  // rate is the one its steps took, not a new --lr's (which has no step left to act on).
  const Run from_old = train(small(dir, {"--iterations", "3", "--log-every", "2", "--checkpoint", old_ck, "--log",
                                         old_log, "--resume", "--lr", "0.0123"}),
                             dir);
  CAPTURE(from_old.output);
  REQUIRE(from_old.code == 0);
  const auto old_records = records(old_log, 3);
  REQUIRE(old_records.size() == 1);
  CHECK(number_field(old_records[0], "loss") == number_field(want[0], "loss"));
  CHECK(number_field(old_records[0], "lr") == number_field(want[0], "lr"));
  CHECK(from_old.output.find("lr: checkpoint") != std::string::npos);  // said to act on nothing
  CHECK(old_records[0].find("\"stored_activation_bytes\": null, \"peak_bytes\": null,") != std::string::npos);
  remove_tree(dir);
}

TEST_CASE("hardening: a divergence names the update that made the weights it overflowed on", "[hardening]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("diverged-update");
  const std::string ck = (dir / "c.ckpt").string();
  // Update 1 (at 1e37) makes weights whose loss at iteration 2 is NaN; iteration 1's checkpoint
  // holds them. The message named iteration 2's learning rate, and the last checkpoint as one
  // a lower --lr could save.
  const Run r = train(small(dir, {"--iterations", "30", "--lr", "1e37", "--checkpoint-every", "1", "--checkpoint", ck}),
                      dir);
  CAPTURE(r.output);
  CHECK(r.code == 3);
  CHECK(r.output.find("at iteration 2 (learning rate 1e+37); training stopped. Checkpoint " + ck +
                      " (iteration 1) holds these weights, so resuming it gives the same") != std::string::npos);
  // Resumed with a lower one, the same weights overflow: not that learning rate's doing.
  const Run again = train(small(dir, {"--iterations", "30", "--lr", "0.01", "--checkpoint", ck, "--resume"}), dir);
  CAPTURE(again.output);
  CHECK(again.code == 3);
  CHECK(again.output.find("at iteration 2 (the weights resumed from iteration 1); training stopped.") !=
        std::string::npos);
  remove_tree(dir);
}

TEST_CASE("hardening: a checkpoint after an evaluation keeps the evaluation's time out of its log window",
          "[hardening]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("window-time");
  const std::string ck = (dir / "a.ckpt").string(), log = (dir / "a.jsonl").string();
  // Iteration 2 is logged (its window closes), evaluated on the whole test set, then
  // checkpointed: the window the checkpoint carries to a resumed run is the time since the
  // record, not the evaluation's (the resumed run's first images/s counted it).
  REQUIRE(train(small(dir, {"--iterations", "2", "--test-subset", "10000", "--checkpoint", ck, "--log", log}), dir)
              .code == 0);
  const std::string text = slurp(log);
  const auto record = text.find("\"type\": \"train\", \"iter\": 2,"), eval = text.find("\"type\": \"eval\"");
  REQUIRE(record != std::string::npos);
  REQUIRE(eval != std::string::npos);
  const double evaluation = number_field(text.substr(eval), "time") - number_field(text.substr(record), "time");
  const auto state = blpa::read_checkpoint(ck).state;
  CAPTURE(evaluation, state.window_seconds);
  CHECK(state.window_iters == 0);
  CHECK(evaluation > 0.2);  // the whole test set: well above the writing of a record
  CHECK(state.window_seconds < evaluation / 4);
  remove_tree(dir);
}

TEST_CASE("hardening: a relative --data-dir is recorded whole, so blpa-eval finds the data from any folder",
          "[hardening]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("relative-data");
  fs::create_directories(dir / "run");
  fs::create_directories(dir / "other");
  fs::create_directory_symlink(blpa::data::kDebianFashionMnist, dir / "data");  // a link stays a link
  const std::string run_dir = "cd '" + (dir / "run").string() + "';", other = "cd '" + (dir / "other").string() + "';";
  REQUIRE(train(small(dir, {"--data-dir", "../data/", "--checkpoint", "m.ckpt", "--log", "m.jsonl"}), dir, run_dir)
              .code == 0);
  CHECK(slurp(dir / "run" / "m.jsonl").find("\"data_dir\": " + blpa::json_string((dir / "data").string()) + ",") !=
        std::string::npos);
  // It was "../data/", which blpa-eval and blpa-predict looked for beside the folder they ran in.
  const Run e = run(BLPA_EVAL_EXE, {"--checkpoint", "../run/m.ckpt", "--subset", "8"}, dir, other);
  CAPTURE(e.output);
  CHECK(e.code == 0);
  fs::remove(dir / "data");
  const Run gone = run(BLPA_PREDICT_EXE, {"--checkpoint", "../run/m.ckpt", "--from-dataset", "0..1"}, dir, other);
  CAPTURE(gone.output);
  CHECK(gone.code == 1);
  CHECK(gone.output.find("../run/m.ckpt: the folder its run was trained on, " + (dir / "data").string() +
                         ", is not there: give the data with --data-dir") != std::string::npos);
  // blpa-bench fidelity finds it as they do (it said "train-images-idx3-ubyte.gz: not found").
  const Run measured = run(BLPA_BENCH_EXE, {"fidelity", "--checkpoint", "../run/m.ckpt"}, dir, other);
  CAPTURE(measured.output);
  CHECK(measured.code == 1);
  CHECK(measured.output.find("../run/m.ckpt: the folder its run was trained on, " + (dir / "data").string() +
                             ", is not there: give the data with --data-dir") != std::string::npos);
  // A data set named whose files the folder does not hold: said, not "data_batch_1.bin: not found".
  const Run other_set = train(small(dir, {"--dataset", "cifar10", "--data-dir", blpa::data::kDebianFashionMnist}), dir);
  CHECK(other_set.code == 1);
  CHECK(other_set.output.find("--dataset cifar10: --data-dir " + std::string(blpa::data::kDebianFashionMnist) +
                              " holds IDX files (train-images-idx3-ubyte[.gz], MNIST's or Fashion-MNIST's), not "
                              "cifar10's") != std::string::npos);
  // ".." after a link is the parent of the link's target: kept as given, not read as "the link's
  // folder" (which loaded another folder than the one checked).
  fs::create_directories(dir / "sub");
  fs::create_directory_symlink(blpa::data::kDebianFashionMnist, dir / "sub" / "fm");
  const std::string through = "sub/fm/../" + fs::path(blpa::data::kDebianFashionMnist).filename().string();
  const Run linked = run(BLPA_TRAIN_EXE, {"--data-dir", through, "--print-config"}, dir, "cd '" + dir.string() + "';");
  CAPTURE(linked.output);
  REQUIRE(linked.code == 0);
  const auto at = linked.output.find("data_dir=");
  REQUIRE(at != std::string::npos);
  const std::string printed = linked.output.substr(at + 9, linked.output.find('\n', at) - at - 9);
  CHECK(fs::path(printed).is_absolute());
  CHECK(fs::equivalent(printed, blpa::data::kDebianFashionMnist));
  const Run missing = train(small(dir, {"--data-dir", (dir / "nowhere").string()}), dir);
  CHECK(missing.code == 1);
  CHECK(missing.output.find("--data-dir " + (dir / "nowhere").string() + ": no such folder") != std::string::npos);
  remove_tree(dir);
}

TEST_CASE("hardening: --summary writes one JSON object with the status and final figures", "[hardening]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("summary");
  const std::string s = (dir / "s.json").string();
  const std::string log = (dir / "s.jsonl").string();
  REQUIRE(train(small(dir, {"--summary", s, "--log", log, "--mode", "plain"}), dir).code == 0);
  const std::string json = slurp(s);
  CAPTURE(json);
  // The test figures as the log's evaluation record has them (the loss had 6 decimals there,
  // 6 significant digits here).
  std::smatch in_summary, in_log;
  const std::regex figures("\"test_loss\": ([^,]+), \"test_acc\": ([^,]+), \"test_top5\": ([^,]+)");
  REQUIRE(std::regex_search(json, in_summary, figures));
  const std::string log_text = slurp(log);
  REQUIRE(std::regex_search(log_text, in_log, figures));
  CHECK(in_summary[0] == in_log[0]);
  CHECK(json.find("{\"type\": \"summary\", \"status\": \"done\", \"iter\": 4, \"iterations\": 4") == 0);
  CHECK(json.find("\"test_acc\": ") != std::string::npos);
  // The codes' bits, window and lift as numbers to group a sweep by: none for plain.
  CHECK(json.find("\"mode\": \"plain\", \"bits\": 32, \"window\": null, \"lift\": null, ") != std::string::npos);
  CHECK(json.find("\"eval_iter\": 4, ") != std::string::npos);
  CHECK(json.find("\"test_images\": 64, \"test_failed\": 0, ") != std::string::npos);
  CHECK(number_field(json, "images_per_s") > 0);
  CHECK(number_field(json, "train_s") <= number_field(json, "wall_s"));
  CHECK(number_field(json, "run_train_s") == number_field(json, "train_s"));  // one process
  const Run d = train(small(dir, {"--summary", s, "--overwrite", "--lr", "1e30", "--iterations", "50"}), dir);
  CHECK(d.code == 3);
  CHECK(slurp(s).find("\"status\": \"diverged\"") != std::string::npos);
  // The default 4-bit codes: the paper's window 6, lifted by 1 (a name that says so).
  CHECK(slurp(s).find("\"mode\": \"blpa-4-l1\", \"bits\": 4, \"window\": 6, \"lift\": 1, ") != std::string::npos);
  // No evaluation ran: the test figures are unknown, not 0 and 100% error.
  CHECK(slurp(s).find("\"eval_iter\": null, \"test_loss\": null, \"test_acc\": null, \"test_top5\": null, "
                      "\"test_error\": null") != std::string::npos);

  // Interrupted before its first log record: this process's time, images/s and peak still
  // count; then resumed, its own time is within its wall time.
  const std::string ck = (dir / "a.ckpt").string();
  Spawned run{spawn_train(small(dir, {"--summary", s, "--overwrite", "--checkpoint", ck, "--iterations", "100000",
                                      "--log-every", "1000", "--checkpoint-every", "3"}),
                          dir / "run.out")};
  for (int i = 0; i < 3000 && !fs::exists(ck); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ::kill(run.pid, SIGTERM);
  CHECK(run.wait() == 143);
  const std::string cut = slurp(s);
  CAPTURE(cut);
  CHECK(cut.find("\"status\": \"interrupted\"") != std::string::npos);
  CHECK(number_field(cut, "train_s") > 0);
  CHECK(number_field(cut, "images_per_s") > 0);
  CHECK(number_field(cut, "peak_bytes") > 0);
  CHECK(cut.find("\"test_loss\": null") != std::string::npos);
  const auto cut_ck = blpa::read_checkpoint(ck);
  const int64_t at = cut_ck.state.iteration;
  // The run's training time: the checkpoint's is this process's up to it, the summary's a little
  // later (written after the checkpoint).
  REQUIRE(cut_ck.run_train_ms);
  CHECK(*cut_ck.run_train_ms > 0);
  CHECK(*cut_ck.run_train_ms / 1000.0 <= number_field(cut, "run_train_s") + 0.001);
  REQUIRE(train(small(dir, {"--summary", s, "--checkpoint", ck, "--resume", "--log-every", "1000", "--iterations",
                            std::to_string(at + 2), "--checkpoint-every", "3"}),
                dir)
              .code == 0);
  const std::string resumed = slurp(s);
  CAPTURE(resumed);
  CHECK(number_field(resumed, "train_s") <= number_field(resumed, "wall_s"));
  // The run's: the checkpoint's time before this process, and this process's (each rounded to
  // the millisecond), recorded again in the new checkpoint.
  CHECK(number_field(resumed, "run_train_s") ==
        Approx(*cut_ck.run_train_ms / 1000.0 + number_field(resumed, "train_s")).margin(0.0021));
  CHECK(*blpa::read_checkpoint(ck).run_train_ms > *cut_ck.run_train_ms);
  remove_tree(dir);
}

TEST_CASE("hardening: SIGTERM during an evaluation stops it, and the resumed run evaluates first", "[hardening]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("sigterm-eval");
  const std::string ck = (dir / "a.ckpt").string(), log = (dir / "a.jsonl").string();
  // An evaluation of 10,000 images at depth 20 on one thread takes seconds; training steps
  // are quick. Stop the run during its first evaluation, at iteration 2.
  auto args = small(dir, {"--depth", "20", "--test-subset", "0", "--iterations", "4", "--eval-every", "2",
                          "--checkpoint", ck, "--log", log});
  std::vector<char*> argv{const_cast<char*>(BLPA_TRAIN_EXE)};
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    if (!std::freopen((dir / "run.out").c_str(), "w", stderr)) ::_exit(126);
    ::execv(BLPA_TRAIN_EXE, argv.data());
    ::_exit(127);
  }
  for (int i = 0; i < 3000 && slurp(log).find("\"iter\": 2,") == std::string::npos; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ::kill(pid, SIGTERM);
  const auto t0 = std::chrono::steady_clock::now();
  int status = 0;
  ::waitpid(pid, &status, 0);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  CAPTURE(slurp(dir / "run.out"), secs);
  REQUIRE(WIFSIGNALED(status));
  CHECK(WTERMSIG(status) == SIGTERM);
  CHECK(slurp(log).find("\"type\": \"eval\"") == std::string::npos);  // interrupted, not logged
  CHECK(blpa::read_checkpoint(ck).state.pending_eval);
  CHECK(slurp(dir / "run.out").find("interrupted by signal 15 after iteration 2; checkpoint " + ck +
                                    " holds iteration 2, continue with --resume") != std::string::npos);
  // The resumed run evaluates fewer images (a setting that may change on resume): quicker.
  const Run r = train(small(dir, {"--depth", "20", "--test-subset", "256", "--iterations", "4", "--eval-every", "2",
                                  "--checkpoint", ck, "--log", log, "--resume"}),
                      dir);
  CAPTURE(r.output);
  CHECK(r.code == 0);
  const std::string text = slurp(log);
  const auto eval2 = text.find("\"type\": \"eval\", \"iter\": 2,");
  CHECK(eval2 != std::string::npos);
  CHECK(eval2 < text.find("\"type\": \"train\", \"iter\": 3,"));
  remove_tree(dir);
}

TEST_CASE("hardening: ranks started with different settings refuse to train, naming them", "[hardening][distributed]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("ranks");
  const int port = free_port();
  auto rank = [&](int r, const std::string& depth, const std::string& batch) {
    std::string cmd = fmt::format("RANK={} WORLD_SIZE=2 {}", r, BLPA_TRAIN_EXE);
    for (const auto& a : small(dir, {"--depth", depth, "--batch", batch, "--master-port", std::to_string(port),
                                     "--dist-timeout", "60"}))
      cmd += " '" + a + "'";
    const std::string out = (dir / fmt::format("r{}", r)).string();
    return fmt::format("({} > {}.out 2>&1; echo \\$? > {}.rc)", cmd, out, out);
  };
  // ResNet-20 against ResNet-29 used to abort rank 0 inside Gloo's broadcast.
  const std::string both = rank(0, "20", "32") + " & " + rank(1, "29", "64") + " & wait";
  REQUIRE(std::system(("bash -c \"" + both + "\"").c_str()) == 0);
  for (int r : {0, 1}) {
    const std::string out = slurp(dir / fmt::format("r{}.out", r));
    CAPTURE(r, out);
    CHECK(std::stoi(slurp(dir / fmt::format("r{}.rc", r))) == 2);
    CHECK(out.find("the ranks were started with different settings") != std::string::npos);
    // Named by their flags, with what makes them agree.
    CHECK(out.find("--depth: rank 0 20, rank 1 29") != std::string::npos);
    CHECK(out.find("--batch: rank 0 32, rank 1 64") != std::string::npos);
    CHECK(out.find("\ngive every rank the same flags") != std::string::npos);
    CHECK(out.find("frame #") == std::string::npos);
  }
  // A peer that never comes: one line after the timeout.
  const int unused = free_port();
  const Run alone = train(small(dir, {"--master-port", std::to_string(unused), "--dist-timeout", "1"}), dir,
                          "RANK=1 WORLD_SIZE=2");
  CAPTURE(alone.output);
  CHECK(alone.code == 1);
  CHECK(alone.output.find(fmt::format("rank 1 of 2: no rendezvous at 127.0.0.1:{} within 1 s", unused)) !=
        std::string::npos);
  check_clean(alone);
  remove_tree(dir);
}

TEST_CASE("hardening: --print-config refuses the outputs the run refuses and writes nothing, and output that cannot "
          "be written fails", "[hardening]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("print-outputs");
  const std::string ck = (dir / "a.ckpt").string(), log = (dir / "a.jsonl").string();
  // LibTorch's thread count is recorded as what ran: the log says what --print-config says.
  auto args = small(dir, {"--checkpoint", ck, "--log", log});
  *(std::find(args.begin(), args.end(), "--threads") + 1) = "0";
  REQUIRE(train(args, dir).code == 0);
  const std::string ck_bytes = slurp(ck), log_bytes = slurp(log);
  auto printed = args;
  printed.push_back("--print-config");
  printed.push_back("--resume");
  const Run shown = train(printed, dir);
  CHECK(shown.code == 0);
  std::smatch threads;
  REQUIRE(std::regex_search(shown.output, threads, std::regex("\nthreads=([0-9]+)\n")));
  CHECK(threads[1] != "0");
  CHECK(log_bytes.find("\"threads\": " + threads[1].str() + ",") != std::string::npos);

  // A fresh run would replace the run's files: refused (it printed and exited 0), nothing touched.
  auto fresh = printed;
  fresh.pop_back();
  const Run replaces = train(fresh, dir);
  CHECK(replaces.code == 2);
  CHECK(replaces.output.find("--checkpoint " + ck + " already exists: continue that run with --resume") !=
        std::string::npos);
  // A log that is a folder, and one in a folder the run would create, which is not created.
  const Run folder = train(small(dir, {"--log", dir.string(), "--print-config"}), dir);
  CHECK(folder.code == 2);
  CHECK(folder.output.find("--log " + dir.string() + ": is a directory") != std::string::npos);
  CHECK(train(small(dir, {"--log", (dir / "new" / "b.jsonl").string(), "--print-config"}), dir).code == 0);
  CHECK_FALSE(fs::exists(dir / "new"));
  const Run relative = run(BLPA_TRAIN_EXE, small(dir, {"--log", "new/b.jsonl", "--checkpoint", "new/c.ckpt",
                                                        "--print-config"}),
                           dir, "cd '" + dir.string() + "';");
  CAPTURE(relative.output);
  CHECK(relative.code == 0);  // it said "new is not a folder"
  CHECK_FALSE(fs::exists(dir / "new"));
  // On --resume, a summary of another run.
  auto resumed_with_summary = [&](const std::string& name, const std::string& text) {
    std::ofstream(dir / name) << text;
    return train(small(dir, {"--checkpoint", ck, "--log", log, "--summary", (dir / name).string(), "--resume",
                             "--print-config"}),
                 dir);
  };
  const Run other = resumed_with_summary("other.json", "{\"type\": \"summary\", \"run_id\": \"0123456789abcdef\"}\n");
  CHECK(other.code == 2);
  CHECK(other.output.find("is the summary of run 0123456789abcdef") != std::string::npos);
  // One cut short before its run id: taken, with a warning, since it cannot be checked.
  const Run cut = resumed_with_summary("cut.json", "{\"type\": \"summary\", \"status\": \"interr");
  CHECK(cut.code == 0);
  CHECK(cut.output.find("--summary " + (dir / "cut.json").string() + " is cut short (37 bytes") != std::string::npos);
  // Cut after an inner brace: cut short all the same. Another run's, with its id whole: refused.
  const Run inner = resumed_with_summary("inner.json", "{\"type\": \"summary\", \"config\": {\"a\": 1}");
  CHECK(inner.code == 0);
  CHECK(inner.output.find("inner.json is cut short") != std::string::npos);
  const Run theirs = resumed_with_summary(
      "theirs.json", "{\"type\": \"summary\", \"run_id\": \"0123456789abcdef\", \"config\": {\"a\": 1}");
  CHECK(theirs.code == 2);
  CHECK(theirs.output.find("is the summary of run 0123456789abcdef") != std::string::npos);
  CHECK(theirs.output.find("cut short") == std::string::npos);
  // A checkpoint another run holds (its lock taken here): exit 1, as the run.
  const int fd = ::open((ck + ".lock").c_str(), O_RDWR | O_CREAT, 0644);
  REQUIRE(fd >= 0);
  REQUIRE(::flock(fd, LOCK_EX | LOCK_NB) == 0);
  const Run held = train(printed, dir);
  CHECK(held.code == 1);
  CHECK(held.output.find("--checkpoint " + ck + " is in use by another blpa-train") != std::string::npos);
  // Through a link: the run locks the file it names too, and --print-config looks there.
  fs::create_symlink(ck, dir / "link.ckpt");
  const Run linked = train(small(dir, {"--checkpoint", (dir / "link.ckpt").string(), "--resume", "--print-config"}),
                           dir);
  CHECK(linked.code == 1);
  CHECK(linked.output.find("is in use by another blpa-train") != std::string::npos);
  fs::remove(dir / "link.ckpt");
  ::close(fd);
  fs::remove(ck + ".lock");
  CHECK(slurp(ck) == ck_bytes);
  CHECK(slurp(log) == log_bytes);
  CHECK(no_temporaries(dir));

  // A run refused after its outputs were checked (a batch above the data) leaves no empty log.
  const std::string late = (dir / "late.jsonl").string();
  CHECK(train(small(dir, {"--log", late, "--batch", "1024"}), dir).code == 2);
  CHECK_FALSE(fs::exists(late));

  // Standard output is each program's result: where it cannot be written (a full disk), exit 1.
  const fs::path err = dir / "err.txt";
  auto to_full = [&](const std::string& command) {
    std::fflush(nullptr);
    const int status = std::system(("bash -c \"" + command + " > /dev/full 2> " + err.string() + "\"").c_str());
    CAPTURE(command, slurp(err));
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 1);
    CHECK(slurp(err).find(": standard output could not be written") != std::string::npos);
  };
  to_full(std::string(BLPA_TRAIN_EXE) + " --print-config --threads 1");
  to_full(std::string(BLPA_EVAL_EXE) + " --help");
  to_full(std::string(BLPA_PREDICT_EXE) + " --help");
  to_full(std::string(BLPA_BENCH_EXE) + " codec --numel 65536 --reps 1 --threads 1");
  // Its lines wait in the buffer until the end, where the write fails: the reason is known.
  CHECK(slurp(err).find("(No space left on device)") != std::string::npos);
  remove_tree(dir);
}

TEST_CASE("hardening: SIGHUP checkpoints as SIGTERM does, and a console that has gone does not end the run",
          "[hardening]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("hangup");
  const std::string ck = (dir / "a.ckpt").string(), log = (dir / "a.jsonl").string(),
                    summary = (dir / "a.json").string();
  // The terminal or ssh session closed: a checkpoint, the summary, and the end by SIGHUP.
  Spawned hup{spawn_train(small(dir, {"--checkpoint", ck, "--log", log, "--summary", summary, "--iterations",
                                      "100000", "--checkpoint-every", "100000"}),
                          dir / "hup.out")};
  wait_for_record(log, "\"type\": \"train\", \"iter\": 2,");
  ::kill(hup.pid, SIGHUP);
  ::kill(hup.pid, SIGHUP);  // a closed terminal sends it twice: not a second signal's stop at once
  CHECK(hup.wait() == 128 + SIGHUP);
  CHECK((WIFSIGNALED(hup.status) && WTERMSIG(hup.status) == SIGHUP));  // ended by it, not exit(129)
  CAPTURE(slurp(dir / "hup.out"));
  CHECK(blpa::read_checkpoint(ck).state.iteration >= 2);
  CHECK(slurp(summary).find("\"status\": \"interrupted\"") != std::string::npos);
  CHECK(no_temporaries(dir));

  // Under nohup, SIGHUP is left to its ignoring. SIGINT is taken though a script's `&` came
  // with it ignored: a Ctrl-C on the script stops its background runs with a checkpoint.
  const std::string nohup_ck = (dir / "n.ckpt").string(), nohup_log = (dir / "n.jsonl").string();
  Spawned nohup{spawn_train(small(dir, {"--checkpoint", nohup_ck, "--log", nohup_log, "--iterations", "100000",
                                        "--checkpoint-every", "100000"}),
                            dir / "nohup.out", {SIGHUP, SIGINT})};
  wait_for_record(nohup_log, "\"type\": \"train\", \"iter\": 2,");
  ::kill(nohup.pid, SIGHUP);
  wait_for_record(nohup_log, "\"type\": \"train\", \"iter\": 4,");  // on after the hang-up
  ::kill(nohup.pid, SIGINT);
  CHECK(nohup.wait() == 128 + SIGINT);
  CAPTURE(slurp(dir / "nohup.out"));
  CHECK(blpa::read_checkpoint(nohup_ck).state.iteration >= 4);

  // Its console gone (the reader of its stderr ended, as `| tee` ended by the same Ctrl-C, or
  // `| head`): writes to it fail, and the run goes on to its end. It was killed by SIGPIPE.
  int pipe_fds[2];
  REQUIRE(::pipe(pipe_fds) == 0);
  auto args = small(dir, {"--log", (dir / "b.jsonl").string(), "--log-every", "1"});
  args.erase(std::find(args.begin(), args.end(), "--quiet"));  // progress lines too
  std::vector<char*> argv{const_cast<char*>(BLPA_TRAIN_EXE)};
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    std::signal(SIGPIPE, SIG_DFL);
    ::dup2(pipe_fds[1], STDOUT_FILENO);
    ::dup2(pipe_fds[1], STDERR_FILENO);
    ::close(pipe_fds[0]);
    ::execv(BLPA_TRAIN_EXE, argv.data());
    ::_exit(127);
  }
  ::close(pipe_fds[0]);
  ::close(pipe_fds[1]);
  Spawned headless{pid};
  CHECK(headless.wait() == 0);
  CHECK(slurp(dir / "b.jsonl").find("\"type\": \"eval\", \"iter\": 4,") != std::string::npos);

  // A run that fails after its signal (here the folder of its checkpoint and summary has gone)
  // says why, and still ends by the signal, so that a sweep stops: it exited 1, and a shell
  // loop went on. With no checkpoint written before, it says there is nothing to resume.
  const fs::path gone = dir / "gone";
  Spawned failing{spawn_train(small(dir, {"--log", (dir / "c.jsonl").string(), "--summary", (gone / "c.json").string(),
                                          "--checkpoint", (gone / "c.ckpt").string(), "--checkpoint-every", "1000",
                                          "--iterations", "100000"}),
                              dir / "c.out")};
  wait_for_record((dir / "c.jsonl").string(), "\"type\": \"train\", \"iter\": 2,");
  fs::remove_all(gone);
  std::ofstream(gone) << "a file where the folder was";
  ::kill(failing.pid, SIGINT);
  CHECK(failing.wait() == 128 + SIGINT);
  CHECK((WIFSIGNALED(failing.status) && WTERMSIG(failing.status) == SIGINT));
  CAPTURE(slurp(dir / "c.out"));
  CHECK(slurp(dir / "c.out").find((gone / "c.ckpt").string()) != std::string::npos);
  CHECK(slurp(dir / "c.out").find("No checkpoint was written: there is nothing to resume") != std::string::npos);

  // Ctrl-C on a sweep (a shell loop of runs; the whole process group gets SIGINT): the run
  // writes its checkpoint and the loop stops. When the run exited 130, bash took the signal
  // as handled by it and started the next run.
  std::string loop = "for seed in 1 2; do '" + std::string(BLPA_TRAIN_EXE) + "'";
  for (const auto& a : small(dir, {"--checkpoint", (dir / "s$seed.ckpt").string(), "--iterations", "100000",
                                   "--checkpoint-every", "100000", "--log", (dir / "s$seed.jsonl").string()}))
    loop += " \"" + a + "\"";
  loop += " 2>>'" + (dir / "loop.out").string() + "'; echo \"run $seed ended $?\" >> '" + (dir / "ran").string() +
          "'; done";
  std::fflush(nullptr);
  const pid_t shell = ::fork();
  if (shell == 0) {
    ::setsid();  // a process group of its own, as a terminal's job
    ::execl("/bin/bash", "bash", "-c", loop.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  wait_for_record((dir / "s1.jsonl").string(), "\"type\": \"train\", \"iter\": 2,");
  ::kill(-shell, SIGINT);
  int status = 0;  // within a minute: a loop that goes on trains a long run, killed here
  pid_t ended = 0;
  for (int i = 0; i < 600 && (ended = ::waitpid(shell, &status, WNOHANG)) == 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  ::kill(-shell, SIGKILL);  // what is left of the group
  if (ended == 0) ::waitpid(shell, nullptr, 0);
  CAPTURE(slurp(dir / "loop.out"), slurp(dir / "ran"));
  REQUIRE(ended == shell);
  CHECK((WIFSIGNALED(status) && WTERMSIG(status) == SIGINT));
  CHECK(fs::exists(dir / "s1.ckpt"));
  CHECK_FALSE(fs::exists(dir / "s2.jsonl"));  // the next run never started
  CHECK(slurp(dir / "ran").find("run 1 ended") == std::string::npos);
  remove_tree(dir);
}

TEST_CASE("hardening: a resume that evaluates again logs that evaluation once, and paths the checkpoint cannot "
          "record are refused", "[hardening]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("eval-once");
  const std::string ck = (dir / "a.ckpt").string(), log = (dir / "a.jsonl").string(),
                    exported = (dir / "a.pt").string();
  const auto args = small(dir, {"--checkpoint", ck, "--log", log, "--export", exported});
  REQUIRE(train(args, dir).code == 0);
  // Stopped between its last evaluation and its export (killed, or a full disk): the resume
  // evaluates again and writes the export. Its log had two records of that evaluation.
  fs::remove(exported);
  auto resume = args;
  resume.insert(resume.end(), {"--auto-resume", "--summary", (dir / "a.json").string()});
  const Run r = train(resume, dir);
  CAPTURE(r.output);
  CHECK(r.code == 0);
  CHECK(fs::exists(exported));
  // It trained no iteration: no images/s (it said 0), as no last loss.
  CHECK(slurp(dir / "a.json").find("\"last_loss\": null") != std::string::npos);
  CHECK(slurp(dir / "a.json").find("\"images_per_s\": null") != std::string::npos);
  const std::string text = slurp(log);
  size_t evals = 0;
  for (size_t at = text.find("\"type\": \"eval\", \"iter\": 4,"); at != std::string::npos;
       at = text.find("\"type\": \"eval\", \"iter\": 4,", at + 1))
    ++evals;
  CHECK(evals == 1);
  // Its summary says "done": the export alone is written, the summary keeps its figures
  // (they became null: the process trained nothing) and nothing is evaluated again.
  const std::string b_summary = (dir / "c.json").string(), b_log = (dir / "c.jsonl").string(),
                    b_export = (dir / "c.pt").string();
  const auto b = small(dir, {"--checkpoint", (dir / "c.ckpt").string(), "--log", b_log, "--export", b_export,
                             "--summary", b_summary});
  REQUIRE(train(b, dir).code == 0);
  const std::string done = slurp(b_summary);
  fs::remove(b_export);
  auto b_resume = b;
  b_resume.push_back("--auto-resume");
  const Run exported_again = train(b_resume, dir);
  CAPTURE(exported_again.output);
  CHECK(exported_again.code == 0);
  CHECK(fs::exists(b_export));
  // No scores of its own: it said "test error 100.00%".
  CHECK(exported_again.output.find("not evaluated again (the export was written; --summary " + b_summary +
                                   " keeps the run's scores)") != std::string::npos);
  CHECK(exported_again.output.find("test error") == std::string::npos);
  CHECK(slurp(b_summary) == done);
  const std::string eval_4 = "\"type\": \"eval\", \"iter\": 4,";
  CHECK(slurp(b_log).find(eval_4) == slurp(b_log).rfind(eval_4));
  CHECK(train(b_resume, dir).code == 0);  // complete: nothing to do
  // A summary cut short, though it says "done", is written again (it was kept, after a warning
  // that the run would replace it), as is one of an earlier iteration.
  std::ofstream(b_summary, std::ios::trunc) << done.substr(0, 120);
  fs::remove(b_export);
  const Run cut_summary = train(b_resume, dir);
  CHECK(cut_summary.code == 0);
  CHECK(slurp(b_summary).find("\"status\": \"done\", \"iter\": 4,") != std::string::npos);
  CHECK(slurp(b_summary).size() > 500);
  // Resumed for more iterations, its summary says "running" until the run ends: the earlier
  // "done" read as the run's state, also after the process was killed.
  auto more = b_resume;
  more.insert(more.end(), {"--iterations", "100000"});
  Spawned longer{spawn_train(more, dir / "longer.out")};
  wait_for_record(b_log, "\"type\": \"train\", \"iter\": 6,");
  ::kill(longer.pid, SIGKILL);
  longer.wait();
  const std::string running = slurp(b_summary);
  CAPTURE(running);
  CHECK(running.find("{\"type\": \"summary\", \"status\": \"running\", \"iter\": 4,") == 0);
  CHECK(running.find("\"resumed_from\": 4,") != std::string::npos);

  // A line break in a path: the checkpoint's settings are lines, so it would read back as another.
  const Run broken = train(small(dir, {"--log", (dir / "a\nseed=7").string()}), dir);
  CHECK(broken.code == 2);
  CHECK(broken.output.find("--log: a path with a line break in it is not taken") != std::string::npos);
  // A folder where the checkpoint is written first: said, not "File exists".
  fs::create_directories(dir / "b.ckpt.tmp");
  const Run tmp = train(small(dir, {"--checkpoint", (dir / "b.ckpt").string()}), dir);
  CHECK(tmp.code == 2);
  CHECK(tmp.output.find((dir / "b.ckpt.tmp").string() + " is a folder, where the file is written first") !=
        std::string::npos);
  remove_tree(dir);
}

TEST_CASE("hardening: a resume on other data held in memory is said, and MNIST is told from Fashion-MNIST",
          "[hardening]") {
  const auto dir = temp_dir("other-data");
  // A small Fashion-MNIST-shaped data set in plain IDX files; a copy of it with one label changed.
  auto write_idx = [](const fs::path& folder, int label_of_first, uint32_t (*pixel)(uint32_t)) {
    fs::create_directories(folder);
    auto be32 = [](std::ofstream& out, uint32_t v) {
      const char b[4] = {char(v >> 24), char(v >> 16), char(v >> 8), char(v)};
      out.write(b, 4);
    };
    for (const char* split : {"train", "t10k"}) {
      const uint32_t n = 64;
      std::ofstream images(folder / (std::string(split) + "-images-idx3-ubyte"), std::ios::binary);
      be32(images, 0x803), be32(images, n), be32(images, 28), be32(images, 28);
      for (uint32_t i = 0; i < n * 28 * 28; ++i) images.put(char(pixel(i)));
      std::ofstream labels(folder / (std::string(split) + "-labels-idx1-ubyte"), std::ios::binary);
      be32(labels, 0x801), be32(labels, n);
      for (uint32_t i = 0; i < n; ++i) labels.put(char(i == 0 ? label_of_first : i % 10));
    }
  };
  auto bright = [](uint32_t i) { return (i * 7919u) >> 5; };  // mean pixel about 127
  write_idx(dir / "a", 0, bright);
  write_idx(dir / "b", 3, bright);
  const std::string ck = (dir / "a.ckpt").string();
  auto args = [&](const char* data, const char* iterations) {
    return std::vector<std::string>{"--dataset", "fashion-mnist", "--data-dir", (dir / data).string(), "--depth", "11",
                                    "--batch", "16", "--iterations", iterations, "--warmup", "0", "--lr-steps", "",
                                    "--threads", "1", "--eval-every", "0", "--quiet", "--checkpoint", ck};
  };
  REQUIRE(train(args("a", "2"), dir).code == 0);
  auto resume = [&](const char* data, const char* iterations) {
    auto a = args(data, iterations);
    a.push_back("--resume");
    return train(a, dir);
  };
  const Run same = resume("a", "4");
  CAPTURE(same.output);
  CHECK(same.code == 0);
  CHECK(same.output.find("the training images are not the checkpoint's") == std::string::npos);
  const Run other = resume("b", "6");
  CAPTURE(other.output);
  CHECK(other.code == 0);
  CHECK(other.output.find("the training images are not the checkpoint's (64 then, 64 now, or other pixels or "
                          "labels)") != std::string::npos);

  // MNIST's files are named as Fashion-MNIST's: an IDX folder was always taken for Fashion-MNIST
  // (and blpa-predict named digits as clothes). Its images' mean pixel tells them apart.
  write_idx(dir / "digits", 0, [](uint32_t i) { return i % 66; });  // digits on black: mean pixel 32.5
  auto config_of = [&](std::vector<std::string> a) {
    a.insert(a.begin(), "--print-config");
    return train(a, dir);
  };
  const Run digits = config_of({"--data-dir", (dir / "digits").string()});
  CAPTURE(digits.output);
  CHECK(digits.output.find("dataset=mnist\n") != std::string::npos);
  const Run clothes = config_of({"--data-dir", (dir / "a").string()});  // mean about 127
  CHECK(clothes.output.find("dataset=fashion-mnist\n") != std::string::npos);
  const Run named = config_of({"--data-dir", (dir / "digits").string(), "--dataset", "fashion-mnist"});
  CHECK(named.code == 0);
  CHECK(named.output.find("look like mnist's (by their mean pixel), whose classes are digits") != std::string::npos);
  // A run that auto took for Fashion-MNIST before resumes as that run, without --dataset.
  const std::string old_ck = (dir / "old.ckpt").string();
  auto digit_run = [&](std::vector<std::string> extra) {
    std::vector<std::string> a{"--data-dir", (dir / "digits").string(), "--depth", "11", "--batch", "16",
                               "--warmup", "0", "--lr-steps", "", "--threads", "1", "--eval-every", "0", "--quiet",
                               "--checkpoint", old_ck};
    a.insert(a.end(), extra.begin(), extra.end());
    return train(a, dir);
  };
  REQUIRE(digit_run({"--dataset", "fashion-mnist", "--iterations", "2"}).code == 0);
  const Run resumed = digit_run({"--iterations", "4", "--resume"});
  CAPTURE(resumed.output);
  CHECK(resumed.code == 0);

  // blpa-eval and blpa-predict given the other one's folder: said (it was scored and named
  // without a word), and not for the run's own.
  const std::string warned = "look like mnist's (by their mean pixel), and " + ck + " was trained on fashion-mnist";
  for (const auto& [exe, extra] : {std::pair<const char*, const char*>{BLPA_EVAL_EXE, "--quiet"},
                                   {BLPA_PREDICT_EXE, "--from-dataset=0..2"}}) {
    const Run on_digits = run(exe, {"--checkpoint", ck, "--data-dir", (dir / "digits").string(), extra}, dir);
    CAPTURE(on_digits.output);
    CHECK(on_digits.code == 0);
    CHECK(on_digits.output.find(warned) != std::string::npos);
    const Run on_own = run(exe, {"--checkpoint", ck, "--data-dir", (dir / "a").string(), extra}, dir);
    CHECK(on_own.code == 0);
    CHECK(on_own.output.find("look like") == std::string::npos);
  }
  remove_tree(dir);
}

// A run on the CPU recorded --cuda-graphs as given ("auto") before resolve() made it what it
// did ("off"): each resume of it said "cuda_graphs: checkpoint auto, command line off", and a
// sweep run again over it finished warned of the same.
TEST_CASE("hardening: a CPU run recorded with --cuda-graphs auto resumes and reruns without a note of it",
          "[hardening]") {
  if (!have_fashion_mnist()) return;
  const auto dir = temp_dir("graphs-auto");
  const std::string ck = (dir / "ck.pt").string(), summary = (dir / "s.json").string();
  REQUIRE(train(small(dir, {"--checkpoint", ck, "--summary", summary}), dir).code == 0);
  {  // the checkpoint as it was written before
    const auto read = blpa::read_checkpoint(ck);
    REQUIRE(read.config.at("cuda_graphs") == "off");
    auto model = blpa::load_model(read);
    auto opt = blpa::make_optimizer(model, blpa::TrainConfig{});
    blpa::load_training_state(read, model, opt);
    std::string config;
    for (const auto& [key, value] : read.config) config += key + "=" + (key == "cuda_graphs" ? "auto" : value) + "\n";
    blpa::save_checkpoint(ck, read.identity, config, read.state, model, opt);
    REQUIRE(blpa::read_checkpoint(ck).config.at("cuda_graphs") == "auto");
  }
  const Run resumed = train(small(dir, {"--checkpoint", ck, "--summary", summary, "--iterations", "6", "--resume"}), dir);
  CAPTURE(resumed.output);
  CHECK(resumed.code == 0);
  CHECK(resumed.output.find("iterations: checkpoint 4, command line 6") != std::string::npos);  // the list is said
  CHECK(resumed.output.find("cuda_graphs") == std::string::npos);
  // The summary as it was written before, its checkpoint deleted (a sweep that keeps disks small).
  std::string text = slurp(summary);
  const std::string off = "\"cuda_graphs\": \"off\"";
  REQUIRE(text.find(off) != std::string::npos);
  text.replace(text.find(off), off.size(), "\"cuda_graphs\": \"auto\"");
  std::ofstream(summary, std::ios::trunc) << text;
  fs::remove(ck);
  const Run again = train(small(dir, {"--checkpoint", ck, "--summary", summary, "--iterations", "6", "--auto-resume"}), dir);
  CAPTURE(again.output);
  CHECK(again.code == 0);
  CHECK(again.output.find("says this run is done") != std::string::npos);
  CHECK(again.output.find("cuda_graphs") == std::string::npos);
  remove_tree(dir);
}
