// blpa-train: trains a ResNet with approximate activations. Defaults are the paper's CIFAR
// protocol (DESIGN.md 1.7); --preset imagenet is its ResNet-152 ImageNet protocol; without
// --data-dir it trains on Debian's Fashion-MNIST.
#include <blpa/codec.h>
#include <blpa/train.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <csignal>
#include <cstdlib>
#include <cxxopts.hpp>
#include <iostream>
#include <sstream>

namespace {

std::atomic<bool> g_stop{false};
std::atomic<int> g_signal{0};

// The first SIGINT/SIGTERM asks for a checkpoint and a clean exit after the current step;
// a second one takes the default action (the user insists).
extern "C" void on_signal(int sig) {
  g_signal.store(sig);
  g_stop.store(true);
  std::signal(sig, SIG_DFL);
}


std::vector<int64_t> parse_steps(const std::string& s) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) {
    if (item.empty()) continue;
    size_t used = 0;
    const long long v = std::stoll(item, &used);
    if (used != item.size()) throw std::invalid_argument("--lr-steps: '" + item + "' is not an integer");
    out.push_back(v);
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  blpa::TrainConfig c;
  cxxopts::Options opts("blpa-train", "Train a pre-activation ResNet whose units keep K-bit activations for backprop.\n"
                                      "Defaults reproduce the CIFAR protocol of the paper; without --data-dir the "
                                      "data set is Fashion-MNIST from /usr/share/datasets/fashion-mnist.\n");
  // clang-format off
  opts.add_options("Data")
    ("preset", "imagenet: the paper's ResNet-152 ImageNet protocol (--dataset imagenet --model imagenet --depth 152 --batch 256 --iterations 640000 --lr 0.1 --warmup 0 --lr-steps 160000,320000,480000 --weight-decay 1e-4 --eval-every 20000 --checkpoint-every 5000); flags given explicitly win", cxxopts::value<std::string>())
    ("dataset", "auto, cifar10, cifar100, cifar100-coarse, fashion-mnist, mnist or imagenet (auto: from the files in --data-dir)", cxxopts::value<std::string>()->default_value("auto"))
    ("data-dir", "Directory with the data set's official files (default: Debian's Fashion-MNIST); for imagenet the folder holding train/<wnid>/*.JPEG and val/<wnid>/*.JPEG", cxxopts::value<std::string>())
    ("train-list", "imagenet: a list file of 'relative/path,label' lines instead of <data-dir>/train (paths relative to --data-dir, or to the list's folder)", cxxopts::value<std::string>())
    ("val-list", "imagenet: the same for validation", cxxopts::value<std::string>())
    ("index-cache", "imagenet: directory where the scanned file lists are cached, keyed by the folders' contents ('' to disable)", cxxopts::value<std::string>()->default_value(blpa::default_cache_dir()))
    ("train-subset", "Train on the first N training images (0: all)", cxxopts::value<int64_t>()->default_value("0"))
    ("test-subset", "Evaluate on the first N test images (0: all)", cxxopts::value<int64_t>()->default_value("0"))
    ("no-augment", "Disable pad-4 random crops and horizontal flips");
  opts.add_options("Model")
    ("model", "cifar (depth 9n+2) or imagenet (depth 50/101/152/200)", cxxopts::value<std::string>()->default_value("cifar"))
    ("depth", "Network depth", cxxopts::value<int>()->default_value("164"))
    ("mode", "plain, exact, blpa or naive", cxxopts::value<std::string>()->default_value("blpa"))
    ("bits", "Bits per stored activation for blpa and naive: 8, 4 or 2", cxxopts::value<int>()->default_value("4"))
    ("window", fmt::format("Width of the codes' window in units of x_hat, for blpa and naive (default: {} at 8 bits, {} at 4, {} at 2, chosen by measured gradient fidelity; the paper's is {})", blpa::default_format(8).window, blpa::default_format(4).window, blpa::default_format(2).window, blpa::kPaperWindow), cxxopts::value<float>())
    ("lift", fmt::format("How far the window's centre sits above the channel's mean, in units of x_hat (default: {} at 8 bits, {} at 4, {} at 2 with the default window, else 0, the paper's)", blpa::default_format(8).lift, blpa::default_format(4).lift, blpa::default_format(2).lift), cxxopts::value<float>());
  opts.add_options("Optimisation")
    ("batch", "Batch size (of one update)", cxxopts::value<int64_t>()->default_value("128"))
    ("accum-steps", "Process each batch in this many equal parts and accumulate their gradients: the same update in less memory (BatchNorm then normalises each part by its own statistics)", cxxopts::value<int64_t>()->default_value("1"))
    ("iterations", "Training iterations", cxxopts::value<int64_t>()->default_value("64000"))
    ("lr", "Learning rate after warm-up", cxxopts::value<double>()->default_value("0.1"))
    ("warmup", "Warm-up iterations", cxxopts::value<int64_t>()->default_value("400"))
    ("warmup-lr", "Learning rate during warm-up", cxxopts::value<double>()->default_value("0.01"))
    ("lr-steps", "Iterations at which the learning rate is multiplied by --lr-factor", cxxopts::value<std::string>()->default_value("32000,48000"))
    ("lr-factor", "Learning-rate factor at each step", cxxopts::value<double>()->default_value("0.1"))
    ("momentum", "SGD momentum", cxxopts::value<double>()->default_value("0.9"))
    ("weight-decay", "Weight decay on conv and linear weights", cxxopts::value<double>()->default_value("2e-4"));
  opts.add_options("Running")
    ("device", "cpu, cuda or cuda:N", cxxopts::value<std::string>()->default_value("cpu"))
    ("seed", "Seed of initialisation, data order and augmentation", cxxopts::value<uint64_t>()->default_value("0"))
    ("threads", "LibTorch CPU threads (0: its default)", cxxopts::value<int>()->default_value("0"))
    ("workers", "Data-preparation threads (0: 2 for data sets held in memory; for imagenet the cores / $LOCAL_WORLD_SIZE, 1 to 16)", cxxopts::value<int>()->default_value("0"))
    ("prefetch", "Batches prepared ahead (at least one per worker)", cxxopts::value<int>()->default_value("4"))
    ("log-every", "Iterations between progress lines and log records", cxxopts::value<int64_t>()->default_value("50"))
    ("eval-every", "Iterations between evaluations (0: only at the end)", cxxopts::value<int64_t>()->default_value("2000"))
    ("log", "JSON-lines log file (appended to on --resume)", cxxopts::value<std::string>())
    ("checkpoint", "Checkpoint file, written atomically every --checkpoint-every iterations, at the end and on SIGINT/SIGTERM", cxxopts::value<std::string>())
    ("checkpoint-every", "Iterations between checkpoints", cxxopts::value<int64_t>()->default_value("1000"))
    ("resume", "Continue the run stored in --checkpoint")
    ("export", "At the end, write the weights as a state dict that Python loads with torch.load", cxxopts::value<std::string>())
    ("quiet", "No progress line")
    ("print-config", "Print the resolved configuration (presets, defaults, environment) and exit")
    ("h,help", "This help");
  opts.add_options("Distributed")
    ("rank", "This process's rank (default: $RANK, else 0)", cxxopts::value<int>())
    ("world-size", "Number of processes (default: $WORLD_SIZE, else 1); --batch is per process", cxxopts::value<int>())
    ("local-rank", "GPU index on this machine for --device cuda (default: $LOCAL_RANK, else the rank)", cxxopts::value<int>())
    ("master-addr", "Address of rank 0's rendezvous store (default: $MASTER_ADDR, else 127.0.0.1)", cxxopts::value<std::string>())
    ("master-port", "Its port (default: $MASTER_PORT, else 29500)", cxxopts::value<int>())
    ("dist-timeout", "Seconds after which a missing or silent peer is an error", cxxopts::value<int>()->default_value("600"));
  // clang-format on
  try {
    auto a = opts.parse(argc, argv);
    if (a.count("help")) {
      std::cout << opts.help({"Data", "Model", "Optimisation", "Running", "Distributed"}) << std::endl;
      return 0;
    }
    if (!a.unmatched().empty()) throw std::invalid_argument("unexpected argument '" + a.unmatched()[0] + "'");
    const std::string preset = a.count("preset") ? a["preset"].as<std::string>() : "";
    if (!preset.empty() && preset != "imagenet")
      throw std::invalid_argument("--preset must be imagenet, got '" + preset + "'");
    // A preset value unless the flag was given; otherwise the flag's value or default.
    auto pick = [&](const char* name, auto preset_value) {
      using T = decltype(preset_value);
      return !preset.empty() && a.count(name) == 0 ? preset_value : a[name].as<T>();
    };
    c.dataset = pick("dataset", std::string("imagenet"));
    if (a.count("data-dir")) c.data_dir = a["data-dir"].as<std::string>();
    c.index_cache = a["index-cache"].as<std::string>();
    if (a.count("train-list")) c.train_list = a["train-list"].as<std::string>();
    if (a.count("val-list")) c.val_list = a["val-list"].as<std::string>();
    c.train_subset = a["train-subset"].as<int64_t>();
    c.test_subset = a["test-subset"].as<int64_t>();
    c.augment = a.count("no-augment") == 0;
    c.arch = pick("model", std::string("imagenet"));
    c.depth = pick("depth", 152);
    c.mode = {blpa::parse_mode(a["mode"].as<std::string>()), a["bits"].as<int>(),
              a.count("window") ? a["window"].as<float>() : 0.0f,
              a.count("lift") ? std::optional<float>(a["lift"].as<float>()) : std::nullopt};
    for (const char* flag : {"bits", "window", "lift"})
      if (a.count(flag) && (c.mode.mode == blpa::Mode::plain || c.mode.mode == blpa::Mode::exact))
        throw std::invalid_argument(std::string("--") + flag + " applies to --mode blpa and naive, not " +
                                    blpa::to_string(c.mode.mode));
    if (a.count("window") && !(a["window"].as<float>() > 0))  // 0 would mean the default
      throw std::invalid_argument("--window must be a positive width in units of x_hat");
    c.batch = pick("batch", int64_t{256});
    c.accum_steps = a["accum-steps"].as<int64_t>();
    c.iterations = pick("iterations", int64_t{640000});
    c.lr = pick("lr", 0.1);
    c.warmup = pick("warmup", int64_t{0});
    c.warmup_lr = a["warmup-lr"].as<double>();
    c.steps = parse_steps(pick("lr-steps", std::string("160000,320000,480000")));
    c.factor = a["lr-factor"].as<double>();
    c.momentum = a["momentum"].as<double>();
    c.weight_decay = pick("weight-decay", 1e-4);
    c.device = a["device"].as<std::string>();
    c.seed = a["seed"].as<uint64_t>();
    c.threads = a["threads"].as<int>();
    c.workers = a["workers"].as<int>();
    c.prefetch = a["prefetch"].as<int>();
    c.log_every = a["log-every"].as<int64_t>();
    c.eval_every = pick("eval-every", int64_t{20000});
    if (a.count("log")) c.log_path = a["log"].as<std::string>();
    if (a.count("checkpoint")) c.checkpoint = a["checkpoint"].as<std::string>();
    c.checkpoint_every = pick("checkpoint-every", int64_t{5000});
    c.resume = a.count("resume") > 0;
    if (a.count("export")) c.export_path = a["export"].as<std::string>();
    c.progress = a.count("quiet") == 0;
    c.dist = blpa::DistConfig::from_env();  // torchrun's variables, then the flags
    if (a.count("rank")) c.dist.rank = a["rank"].as<int>();
    if (a.count("world-size")) c.dist.world = a["world-size"].as<int>();
    c.dist.local_rank = a.count("local-rank") ? a["local-rank"].as<int>() : std::getenv("LOCAL_RANK") ? c.dist.local_rank : c.dist.rank;
    if (a.count("master-addr")) c.dist.master_addr = a["master-addr"].as<std::string>();
    if (a.count("master-port")) c.dist.master_port = a["master-port"].as<int>();
    c.dist.timeout = std::chrono::seconds(a["dist-timeout"].as<int>());
    if (c.dist.world < 1 || c.dist.rank < 0 || c.dist.rank >= c.dist.world)
      throw std::invalid_argument("--rank " + std::to_string(c.dist.rank) + " is not in --world-size " + std::to_string(c.dist.world));
    if (a["dist-timeout"].as<int>() <= 0) throw std::invalid_argument("--dist-timeout must be positive");
    c.validate();
    if (a.count("print-config")) {
      std::cout << c.describe() << "rank=" << c.dist.rank << "\nworld_size=" << c.dist.world
                << "\nmaster=" << c.dist.master_addr << ":" << c.dist.master_port << std::endl;
      return 0;
    }
  } catch (const std::exception& e) {
    std::cerr << "blpa-train: " << e.what() << "\nRun blpa-train --help for the options.\n";
    return 2;
  }

  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  try {
    const auto r = blpa::train(c, &g_stop);
    if (r.interrupted) {
      // A rank without a signal of its own stopped because another rank was interrupted.
      const int sig = g_signal.load() ? g_signal.load() : SIGINT;
      spdlog::warn("{} after iteration {}{}",
                   g_signal.load() ? fmt::format("interrupted by signal {}", sig)
                                   : std::string("stopped because another rank was interrupted"),
                   r.iteration,
                   c.checkpoint.empty() ? " (no --checkpoint: progress is lost)"
                                        : "; checkpoint " + c.checkpoint + " written, continue with --resume");
      return 128 + sig;
    }
    if (c.dist.rank == 0)
      spdlog::info("done: {} iterations, last training loss {:.4f}, test loss {:.4f}, test error {:.2f}% (top-5 {:.2f}%)",
                   r.iteration, r.last_loss, r.test_loss, 100 * (1 - r.test_acc), 100 * (1 - r.test_top5));
    else
      spdlog::info("done: {} iterations, last training loss {:.4f} (rank {}; rank 0 evaluates)", r.iteration,
                   r.last_loss, c.dist.rank);
    return 0;
  } catch (const blpa::NonFiniteLoss& e) {
    spdlog::error("{}", e.what());
    return 3;
  } catch (const std::exception& e) {
    spdlog::error("{}", e.what());
    return 1;
  }
}
