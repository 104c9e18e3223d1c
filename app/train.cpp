// blpa-train: trains a ResNet with approximate activations. Defaults are the paper's CIFAR
// protocol (DESIGN.md 1.7); without --data-dir it trains on Debian's Fashion-MNIST.
#include <blpa/train.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <csignal>
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
    ("dataset", "auto, cifar10, cifar100, cifar100-coarse, fashion-mnist or mnist (auto: from the files in --data-dir)", cxxopts::value<std::string>()->default_value("auto"))
    ("data-dir", "Directory with the data set's official files (default: Debian's Fashion-MNIST)", cxxopts::value<std::string>())
    ("train-subset", "Train on the first N training images (0: all)", cxxopts::value<int64_t>()->default_value("0"))
    ("test-subset", "Evaluate on the first N test images (0: all)", cxxopts::value<int64_t>()->default_value("0"))
    ("no-augment", "Disable pad-4 random crops and horizontal flips");
  opts.add_options("Model")
    ("model", "cifar (depth 9n+2) or imagenet (depth 50/101/152/200)", cxxopts::value<std::string>()->default_value("cifar"))
    ("depth", "Network depth", cxxopts::value<int>()->default_value("164"))
    ("mode", "plain, exact, blpa or naive", cxxopts::value<std::string>()->default_value("blpa"))
    ("bits", "Bits per stored activation for blpa and naive: 8 or 4", cxxopts::value<int>()->default_value("4"));
  opts.add_options("Optimisation")
    ("batch", "Batch size", cxxopts::value<int64_t>()->default_value("128"))
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
    ("workers", "Data-preparation threads", cxxopts::value<int>()->default_value("2"))
    ("prefetch", "Batches prepared ahead", cxxopts::value<int>()->default_value("4"))
    ("log-every", "Iterations between progress lines and log records", cxxopts::value<int64_t>()->default_value("50"))
    ("eval-every", "Iterations between evaluations (0: only at the end)", cxxopts::value<int64_t>()->default_value("2000"))
    ("log", "JSON-lines log file (appended to on --resume)", cxxopts::value<std::string>())
    ("checkpoint", "Checkpoint file, written atomically every --checkpoint-every iterations, at the end and on SIGINT/SIGTERM", cxxopts::value<std::string>())
    ("checkpoint-every", "Iterations between checkpoints", cxxopts::value<int64_t>()->default_value("1000"))
    ("resume", "Continue the run stored in --checkpoint")
    ("export", "At the end, write the weights as a state dict that Python loads with torch.load", cxxopts::value<std::string>())
    ("quiet", "No progress line")
    ("h,help", "This help");
  // clang-format on
  try {
    auto a = opts.parse(argc, argv);
    if (a.count("help")) {
      std::cout << opts.help({"Data", "Model", "Optimisation", "Running"}) << std::endl;
      return 0;
    }
    if (!a.unmatched().empty()) throw std::invalid_argument("unexpected argument '" + a.unmatched()[0] + "'");
    c.dataset = a["dataset"].as<std::string>();
    if (a.count("data-dir")) c.data_dir = a["data-dir"].as<std::string>();
    c.train_subset = a["train-subset"].as<int64_t>();
    c.test_subset = a["test-subset"].as<int64_t>();
    c.augment = a.count("no-augment") == 0;
    c.arch = a["model"].as<std::string>();
    c.depth = a["depth"].as<int>();
    c.mode = {blpa::parse_mode(a["mode"].as<std::string>()), a["bits"].as<int>()};
    if (a.count("bits") && (c.mode.mode == blpa::Mode::plain || c.mode.mode == blpa::Mode::exact))
      throw std::invalid_argument("--bits applies to --mode blpa and naive, not " + blpa::to_string(c.mode.mode));
    c.batch = a["batch"].as<int64_t>();
    c.iterations = a["iterations"].as<int64_t>();
    c.lr = a["lr"].as<double>();
    c.warmup = a["warmup"].as<int64_t>();
    c.warmup_lr = a["warmup-lr"].as<double>();
    c.steps = parse_steps(a["lr-steps"].as<std::string>());
    c.factor = a["lr-factor"].as<double>();
    c.momentum = a["momentum"].as<double>();
    c.weight_decay = a["weight-decay"].as<double>();
    c.device = a["device"].as<std::string>();
    c.seed = a["seed"].as<uint64_t>();
    c.threads = a["threads"].as<int>();
    c.workers = a["workers"].as<int>();
    c.prefetch = a["prefetch"].as<int>();
    c.log_every = a["log-every"].as<int64_t>();
    c.eval_every = a["eval-every"].as<int64_t>();
    if (a.count("log")) c.log_path = a["log"].as<std::string>();
    if (a.count("checkpoint")) c.checkpoint = a["checkpoint"].as<std::string>();
    c.checkpoint_every = a["checkpoint-every"].as<int64_t>();
    c.resume = a.count("resume") > 0;
    if (a.count("export")) c.export_path = a["export"].as<std::string>();
    c.progress = a.count("quiet") == 0;
    c.validate();
  } catch (const std::exception& e) {
    std::cerr << "blpa-train: " << e.what() << "\nRun blpa-train --help for the options.\n";
    return 2;
  }

  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  try {
    const auto r = blpa::train(c, &g_stop);
    if (r.interrupted) {
      spdlog::warn("interrupted by signal {} after iteration {}{}", g_signal.load(), r.iteration,
                   c.checkpoint.empty() ? " (no --checkpoint: progress is lost)"
                                        : "; checkpoint " + c.checkpoint + " written, continue with --resume");
      return 128 + g_signal.load();
    }
    spdlog::info("done: {} iterations, last training loss {:.4f}, test loss {:.4f}, test error {:.2f}%",
                 r.iteration, r.last_loss, r.test_loss, 100 * (1 - r.test_acc));
    return 0;
  } catch (const blpa::NonFiniteLoss& e) {
    spdlog::error("{}", e.what());
    return 3;
  } catch (const std::exception& e) {
    spdlog::error("{}", e.what());
    return 1;
  }
}
