#include "train_flags.h"

#include <ATen/Parallel.h>
#include <c10/core/Device.h>
#include <blpa/checkpoint.h>

#include <fmt/format.h>

#include <algorithm>
#include <cstdlib>
#include <cxxopts.hpp>
#include <filesystem>

#include "flags.h"

namespace blpa {
namespace {

std::vector<int64_t> parse_steps(const std::string& s) {
  std::vector<int64_t> out;  // "" is no step: a constant learning rate after the warmup
  if (s.empty()) return out;
  for (const auto& item : comma_list("--lr-steps", s)) out.push_back(parse_number<int64_t>("--lr-steps", item));
  return out;
}

cxxopts::Options make_options() {
  cxxopts::Options opts("blpa-train", "Train a pre-activation ResNet whose units keep K-bit activations for backprop.\n"
                                      "Defaults reproduce the CIFAR protocol of the paper; without --data-dir the "
                                      "data set is Fashion-MNIST from /usr/share/datasets/fashion-mnist.\n"
                                      "Exit codes: 0 done, 1 error, 2 bad flags, 3 the loss, the test loss or the "
                                      "weights became NaN/Inf, 128+N stopped by signal N: INT, TERM or HUP (a "
                                      "checkpoint was written, unless an error says it could not be or a new run "
                                      "was still loading, and the process ends by the signal; a second one stops "
                                      "at once, without one). "
                                      "BLPA_DEBUG=1 adds LibTorch's C++ backtraces to its errors.\n");
  using S = std::string;
  // clang-format off
  opts.add_options("Data")
    ("preset", "imagenet: the paper's ResNet-152 ImageNet protocol (--dataset imagenet --model imagenet --depth 152 --batch 256 --iterations 640000 --lr 0.1 --warmup 0 --lr-steps 160000,320000,480000 --weight-decay 1e-4 --eval-every 20000 --checkpoint-every 5000); flags given explicitly win", cxxopts::value<S>())
    ("dataset", "auto, cifar10, cifar100, cifar100-coarse, fashion-mnist, mnist or imagenet (auto: from the files in --data-dir)", cxxopts::value<S>()->default_value("auto"))
    ("data-dir", "Directory with the data set's official files (default: Debian's Fashion-MNIST); for imagenet the folder holding train/<wnid>/*.JPEG and val/<wnid>/*.JPEG", cxxopts::value<S>())
    ("train-list", "imagenet: a list file of 'relative/path,label' lines instead of <data-dir>/train (paths relative to --data-dir, or to the list's folder; given with --val-list)", cxxopts::value<S>())
    ("val-list", "imagenet: the same for validation (labels among --train-list's)", cxxopts::value<S>())
    ("index-cache", "imagenet: directory where the scanned file lists are cached, keyed by the folders' path and their class folders' change times, which any added, removed or renamed image changes ('' to disable)", cxxopts::value<S>()->default_value(default_cache_dir()))
    ("train-subset", "Train on the first N training images (ImageNet: N spread over all classes; 0: all)", cxxopts::value<S>()->default_value("0"))
    ("test-subset", "Evaluate on the first N test images (ImageNet: N spread over all classes; 0: all)", cxxopts::value<S>()->default_value("0"))
    ("no-augment", "Disable augmentation: CIFAR and MNIST-style sets lose pad-4 random crops and horizontal flips; imagenet keeps a random 224 crop of the image with its shorter side at 256, without flips or colour jitter");
  opts.add_options("Model")
    ("model", "cifar (depth 9n+2) or imagenet (depth 50/101/152/200)", cxxopts::value<S>()->default_value("cifar"))
    ("depth", "Network depth", cxxopts::value<S>()->default_value("164"))
    ("mode", "plain, exact, blpa or naive", cxxopts::value<S>()->default_value("blpa"))
    ("bits", "Bits per stored activation for blpa and naive: 8, 4 or 2", cxxopts::value<S>()->default_value("4"))
    ("window", fmt::format("Width of the codes' window in units of x_hat, for blpa and naive (default: {} at 8 bits, {} at 4, {} at 2, chosen by measured gradient fidelity, each with its --lift; the paper's is {}. A window given here has lift 0 unless --lift is given too)", default_format(8).window, default_format(4).window, default_format(2).window, kPaperWindow), cxxopts::value<S>())
    ("lift", fmt::format("How far the window's centre sits above the channel's mean, in units of x_hat (default: {} at 8 bits, {} at 4, {} at 2 with the default window, else 0, the paper's)", default_format(8).lift, default_format(4).lift, default_format(2).lift), cxxopts::value<S>());
  opts.add_options("Precision")
    ("precision", "fp32, tf32, bf16 or auto. fp32: float32 throughout (TF32 off on CUDA); tf32: CUDA convolutions and matrix products in TF32, float32 tensors (CUDA only); bf16: convolutions and the classifier in bfloat16, with float32 weights, BatchNorm, loss and optimiser, as PyTorch's autocast; auto: tf32 on CUDA, fp32 on the CPU, and with --resume the checkpoint's (tf32 goes on in fp32 on the CPU, which has no TF32)", cxxopts::value<S>()->default_value("auto"))
    ("memory-format", "Activation layout: nchw, nhwc (channels-last) or auto (nhwc, measured the faster on CPUs and on an H200; see the README; with --resume the checkpoint's)", cxxopts::value<S>()->default_value("auto"));
  opts.add_options("Optimisation")
    ("batch", "Batch size (of one update)", cxxopts::value<S>()->default_value("128"))
    ("accum-steps", "Process each batch in this many equal parts and accumulate their gradients: the same update in less memory (BatchNorm then normalises each part by its own statistics)", cxxopts::value<S>()->default_value("1"))
    ("iterations", "Training iterations", cxxopts::value<S>()->default_value("64000"))
    ("lr", "Learning rate after warm-up", cxxopts::value<S>()->default_value("0.1"))
    ("warmup", "Warm-up iterations", cxxopts::value<S>()->default_value("400"))
    ("warmup-lr", "Learning rate during warm-up", cxxopts::value<S>()->default_value("0.01"))
    ("lr-steps", "Iterations at which the learning rate is multiplied by --lr-factor, comma-separated ('': none)", cxxopts::value<S>()->default_value("32000,48000"))
    ("lr-factor", "Learning-rate factor at each step", cxxopts::value<S>()->default_value("0.1"))
    ("momentum", "SGD momentum", cxxopts::value<S>()->default_value("0.9"))
    ("weight-decay", "Weight decay on conv and linear weights", cxxopts::value<S>()->default_value("2e-4"));
  opts.add_options("Running")
    ("device", "cpu, cuda or cuda:N", cxxopts::value<S>()->default_value("cpu"))
    ("cuda-graphs", "auto, on or off: capture one training iteration as a CUDA graph after three eager ones and replay it, so the host launches no kernels (auto: on CUDA with one rank, falling back to eager with a warning if capture fails; on: a failure is an error; the loss is then read every --log-every iterations)", cxxopts::value<S>()->default_value("auto"))
    ("seed", "Seed of initialisation, data order and augmentation", cxxopts::value<S>()->default_value("0"))
    ("threads", "LibTorch CPU threads, 0 to 1024 (0: its default, divided among the LOCAL_WORLD_SIZE processes unless OMP_NUM_THREADS is set)", cxxopts::value<S>()->default_value("0"))
    ("workers", "Data-preparation threads, 0 to 256 (0: 2 for data sets held in memory; for imagenet the cores / $LOCAL_WORLD_SIZE, 1 to 16)", cxxopts::value<S>()->default_value("0"))
    ("prefetch", "Batches prepared ahead (at least one per worker)", cxxopts::value<S>()->default_value("4"))
    ("log-every", "Iterations between progress lines and log records", cxxopts::value<S>()->default_value("50"))
    ("eval-every", "Iterations between evaluations (0: only at the end)", cxxopts::value<S>()->default_value("2000"))
    ("log", "JSON-lines log file (continued on --resume)", cxxopts::value<S>())
    ("checkpoint", "Checkpoint file, written atomically every --checkpoint-every iterations, at the end, on SIGINT/SIGTERM/SIGHUP and before exiting on an error", cxxopts::value<S>())
    ("checkpoint-every", "Iterations between checkpoints", cxxopts::value<S>()->default_value("1000"))
    ("resume", "Continue the run stored in --checkpoint: give the run's command line again, with this (settings come from the command line; its --log, --summary and --export must be that run's; a run already complete exits 0 and does nothing)")
    ("auto-resume", "--resume where --checkpoint exists, else start a new run, as without it: a sweep run again resumes what was stopped, starts what never ran and skips what is complete, and (exit 3) what diverged, as its --summary says, unless a learning-rate, momentum, weight-decay or --accum-steps setting changed (a run that diverged before its first checkpoint has nothing to resume: exit 3 whatever the settings)")
    ("overwrite", "Start a new run even where --checkpoint, --log, --export or --summary name existing files (replaced)")
    ("export", "At the end, write the weights as a state dict that Python loads with torch.load", cxxopts::value<S>())
    ("summary", "When the run ends (done, interrupted, diverged or failed), write one JSON object: status, final figures, configuration, the error of a failed run; from when training starts until then it says running", cxxopts::value<S>())
    ("quiet", "No progress line")
    ("print-config", "Print the configuration this command line runs, every default and auto resolved (the data set found in --data-dir, workers, threads, precision, layout), as the checkpoint's key=value lines (then --prefetch, --index-cache, the rank's rendezvous and the output paths), and exit; with --resume or --auto-resume the checkpoint is read and checked as the run does, and the outputs are checked as the run checks them, writing nothing")
    ("h,help", "This help");
  opts.add_options("Distributed")
    ("rank", "This process's rank (default: $RANK, else 0)", cxxopts::value<S>())
    ("world-size", "Number of processes (default: $WORLD_SIZE, else 1); --batch is per process", cxxopts::value<S>())
    ("local-rank", "GPU index on this machine for --device cuda (default: $LOCAL_RANK, else the rank)", cxxopts::value<S>())
    ("master-addr", "Address of rank 0's rendezvous store (default: $MASTER_ADDR, else 127.0.0.1)", cxxopts::value<S>())
    ("master-port", "Its port (default: $MASTER_PORT, else 29500)", cxxopts::value<S>())
    ("dist-timeout", "Seconds after which a missing or silent peer is an error", cxxopts::value<S>()->default_value("600"))
    ("dist-backend", "auto (NCCL between GPUs, Gloo between CPU processes), gloo (also for CUDA tensors, e.g. several ranks sharing one GPU) or nccl", cxxopts::value<S>()->default_value("auto"));
  // clang-format on
  return opts;
}

}  // namespace

TrainCommand parse_train_command(int argc, const char* const* argv) {
  auto opts = make_options();
  TrainCommand cmd;
  TrainConfig& c = cmd.config;
  cxxopts::ParseResult a;
  a = parse_flags(opts, argc, argv);
  if (switched_on(a, "help")) {
    cmd.help = true;
    cmd.help_text = opts.help({"Data", "Model", "Precision", "Optimisation", "Running", "Distributed"});
    return cmd;
  }
  if (!a.unmatched().empty()) throw FlagError("unexpected argument '" + a.unmatched()[0] + "'");
  const std::string preset = a.count("preset") ? a["preset"].as<std::string>() : "";
  if (!preset.empty() && preset != "imagenet") throw FlagError("--preset must be imagenet, got '" + preset + "'");
  // A preset value unless the flag was given; otherwise the flag's value or default.
  const bool use_preset = !preset.empty();
  auto given = [&](const char* name) { return a.count(name) > 0; };
  auto on = [&](const char* name) { return switched_on(a, name); };
  auto num = [&](const char* name, auto preset_value) {
    using T = decltype(preset_value);
    return use_preset && !given(name) ? preset_value : number<T>(a, name);
  };
  auto str = [&](const char* name, const std::string& preset_value) {
    return use_preset && !given(name) ? preset_value : a[name].as<std::string>();
  };
  c.dataset = str("dataset", "imagenet");
  if (given("data-dir")) c.data_dir = a["data-dir"].as<std::string>();
  c.index_cache = a["index-cache"].as<std::string>();
  if (given("train-list")) c.train_list = a["train-list"].as<std::string>();
  if (given("val-list")) c.val_list = a["val-list"].as<std::string>();
  c.train_subset = number<int64_t>(a, "train-subset");
  c.test_subset = number<int64_t>(a, "test-subset");
  c.augment = !on("no-augment");
  c.arch = str("model", "imagenet");
  c.depth = num("depth", 152);
  const int bits = number<int>(a, "bits");
  try {
    c.mode = {parse_mode(a["mode"].as<std::string>()), bits};
  } catch (const std::invalid_argument& e) {
    // A name of blpa-bench, the log and --print-config (blpa-4, blpa-4-l1): said as flags.
    std::string hint;
    try {
      const ModeConfig named = parse_mode_config(a["mode"].as<std::string>());
      const ModeConfig by_bits{named.mode, named.bits};
      const CodeFormat f = named.codes_format();
      hint = fmt::format("; as flags, {} is --mode {} --bits {}{}", named.str(), to_string(named.mode), named.bits,
                         named.str() == by_bits.str() ? "" : fmt::format(" --window {} --lift {}", f.window, f.lift));
    } catch (const std::invalid_argument&) {
    }
    throw FlagError(std::string("--mode: ") + e.what() + hint);
  }
  if (given("window")) {
    c.mode.window = number<float>(a, "window");
    if (!(c.mode.window >= kMinWindow))  // 0: the default, not given here
      throw FlagError(fmt::format("--window must be a positive width in units of x_hat, at least {}", kMinWindow));
  }
  if (given("lift")) c.mode.lift = number<float>(a, "lift");
  for (const char* flag : {"bits", "window", "lift"})
    if (given(flag) && (c.mode.mode == Mode::plain || c.mode.mode == Mode::exact))
      throw FlagError(std::string("--") + flag + " applies to --mode blpa and naive, not " + to_string(c.mode.mode));
  c.batch = num("batch", int64_t{256});
  c.accum_steps = number<int64_t>(a, "accum-steps");
  c.iterations = num("iterations", int64_t{640000});
  c.lr = num("lr", 0.1);
  c.warmup = num("warmup", int64_t{0});
  c.warmup_lr = number<double>(a, "warmup-lr");
  c.steps = parse_steps(str("lr-steps", "160000,320000,480000"));
  c.factor = number<double>(a, "lr-factor");
  c.momentum = number<double>(a, "momentum");
  c.weight_decay = num("weight-decay", 1e-4);
  c.device = a["device"].as<std::string>();
  c.cuda_graphs = a["cuda-graphs"].as<std::string>();
  c.precision = a["precision"].as<std::string>();
  c.memory_format = a["memory-format"].as<std::string>();
  c.seed = number<uint64_t>(a, "seed");
  c.threads = number<int>(a, "threads");
  c.workers = number<int>(a, "workers");
  c.prefetch = number<int>(a, "prefetch");
  c.log_every = number<int64_t>(a, "log-every");
  c.eval_every = num("eval-every", int64_t{20000});
  if (given("log")) c.log_path = a["log"].as<std::string>();
  if (given("checkpoint")) c.checkpoint = a["checkpoint"].as<std::string>();
  c.checkpoint_every = num("checkpoint-every", int64_t{5000});
  c.resume = on("resume");
  c.auto_resume = on("auto-resume");
  c.overwrite = on("overwrite");
  if (given("export")) c.export_path = a["export"].as<std::string>();
  if (given("summary")) c.summary_path = a["summary"].as<std::string>();
  c.progress = !on("quiet");
  try {
    c.dist = DistConfig::from_env();  // torchrun's variables, then the flags
  } catch (const std::invalid_argument& e) {
    throw FlagError(e.what());
  }
  if (given("rank")) c.dist.rank = number<int>(a, "rank");
  if (given("world-size")) c.dist.world = number<int>(a, "world-size");
  c.dist.local_rank = given("local-rank") ? number<int>(a, "local-rank") : std::getenv("LOCAL_RANK") ? c.dist.local_rank : c.dist.rank;
  if (given("master-addr")) c.dist.master_addr = a["master-addr"].as<std::string>();
  if (given("master-port")) c.dist.master_port = number<int>(a, "master-port");
  c.dist.backend = a["dist-backend"].as<std::string>();
  const int timeout = number<int>(a, "dist-timeout");
  if (timeout <= 0) throw FlagError("--dist-timeout must be positive");
  c.dist.timeout = std::chrono::seconds(timeout);
  // A bad value is named as it was given: the flag, torchrun's variable, or the default.
  const auto named = [&](const char* flag, const char* env, int v) {
    if (given(flag) || !std::getenv(env)) return "--" + std::string(flag) + " " + std::to_string(v);
    return "$" + std::string(env) + "=" + std::to_string(v);
  };
  if (c.dist.world < 1) throw FlagError(named("world-size", "WORLD_SIZE", c.dist.world) + ": must be at least 1");
  if (c.dist.rank < 0 || c.dist.rank >= c.dist.world)
    throw FlagError(named("rank", "RANK", c.dist.rank) + " is not in " +
                    named("world-size", "WORLD_SIZE", c.dist.world) + " (ranks run from 0 to the world size - 1)");
  if (c.dist.local_rank < 0) throw FlagError(named("local-rank", "LOCAL_RANK", c.dist.local_rank) + ": must be >= 0");
  if (c.dist.master_port <= 0 || c.dist.master_port > 65535)
    throw FlagError(named("master-port", "MASTER_PORT", c.dist.master_port) + ": must be in 1..65535");
  c.validate();
  // Checked here, but left as given: --precision auto on --resume is the checkpoint's, which
  // train() reads.
  TrainConfig(c).resolve_numerics();
  cmd.print_config = on("print-config");
  return cmd;
}

std::string printed_config(const TrainConfig& given) {
  // What the run would use: every auto resolved as train() resolves it (the data set and
  // folder among them, and LibTorch's thread count for --threads 0).
  TrainConfig c = given;
  c.resolve();
  c.check_device();
  // As train() checks before it loads the data (there, inside the ranks' rendezvous): the
  // checkpoint to resume exists, is whole and is this run's, and its precision is auto's.
  // Rank 0's outputs too, as it checks them, but without writing or locking anything.
  std::error_code ec;  // a path that cannot be looked at is no checkpoint, as in train()
  const bool lead = c.dist.rank == 0;
  if (c.auto_resume) c.resume = std::filesystem::exists(c.checkpoint, ec);
  if (lead && c.auto_resume && !c.resume) refuse_diverged_rerun(c);  // exit 3, as the run
  bool complete = false;  // its checkpoint deleted, its summary done: the run does nothing
  try {
    if (lead && c.auto_resume && !c.resume) skip_completed_rerun(c);
  } catch (const RunComplete&) {
    complete = true;
  }
  if (lead && !complete) check_outputs_unwritten(c);
  if (c.resume && !std::filesystem::exists(c.checkpoint, ec))
    throw FlagError("--resume: checkpoint " + c.checkpoint + " does not exist");
  if (c.resume && std::filesystem::is_directory(c.checkpoint, ec))
    throw FlagError("--checkpoint " + c.checkpoint + ": is a directory");
  if (c.resume) read_resumed_checkpoint(c, given, lead);
  // The settings the checkpoint records (describe()), then the ones it does not: where this
  // rank meets the others, and where the run's files go.
  const std::string settings = c.describe();
  const bool cuda = c10::Device(c.device).is_cuda();
  const std::string backend = c.dist.enabled() ? c.dist.resolved_backend(cuda) : "none";
  return settings + fmt::format("prefetch={}\nindex_cache={}\nrank={}\nlocal_rank={}\nmaster={}:{}\n"
                                "dist_backend={}\ndist_timeout={}\ncheckpoint={}\nresume={}\nlog={}\n"
                                "export={}\nsummary={}\n",
                                std::max(c.prefetch, c.workers),  // the loader's: one batch per worker at least
                                c.index_cache, c.dist.rank, c.dist.local_rank, c.dist.master_addr,
                                c.dist.master_port, backend, fmt::format("{:g}", c.dist.timeout.count() / 1000.0),
                                c.checkpoint, c.resume ? 1 : 0, c.log_path, c.export_path, c.summary_path);
}

}  // namespace blpa
