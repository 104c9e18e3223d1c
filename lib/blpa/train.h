// The training loop of blpa-train (SGD with momentum, the paper's schedule, periodic
// evaluation, JSON-lines log, atomic checkpoints that resume the identical run).
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "blpa/unit.h"

namespace blpa {

struct TrainConfig {
  // Data
  std::string dataset = "auto";  // auto | cifar10 | cifar100 | cifar100-coarse | fashion-mnist | mnist
  std::string data_dir;          // empty: Debian's Fashion-MNIST
  int64_t train_subset = 0;      // use the first N training samples (0: all)
  int64_t test_subset = 0;       // evaluate on the first N test samples (0: all)
  bool augment = true;
  // Model
  std::string arch = "cifar";
  int depth = 164;
  ModeConfig mode{Mode::blpa, 4};
  // Optimisation (defaults: the paper's CIFAR protocol)
  int64_t batch = 128;
  int64_t iterations = 64000;
  double lr = 0.1;
  int64_t warmup = 400;  // iterations at warmup_lr before lr
  double warmup_lr = 0.01;
  std::vector<int64_t> steps{32000, 48000};
  double factor = 0.1;
  double momentum = 0.9;
  double weight_decay = 2e-4;  // conv and linear weights only
  // Running
  std::string device = "cpu";
  uint64_t seed = 0;
  int threads = 0;  // LibTorch intra-op threads (0: its default)
  int workers = 2;  // data threads
  int prefetch = 4;
  int64_t log_every = 50;
  int64_t eval_every = 2000;  // 0: only at the end
  std::string checkpoint;     // path; empty: no checkpoints
  int64_t checkpoint_every = 1000;
  bool resume = false;
  std::string log_path;     // JSON lines; empty: none
  std::string export_path;  // a state dict for Python's torch.load, written at the end
  bool progress = true;     // the live progress line on stderr

  double lr_at(int64_t iteration) const;
  // The fields a checkpoint must agree on to be resumed: they define the model, the
  // optimiser state and the data order.
  std::string identity() const;
  // Every field, one "key=value" per line (stored in checkpoints and logged).
  std::string describe() const;
  // Throws std::invalid_argument for values that make no sense together.
  void validate() const;
};

struct TrainResult {
  int64_t iteration = 0;  // iterations completed
  bool interrupted = false;
  double last_loss = 0;
  double test_loss = 0, test_acc = 0;  // last evaluation
};

// Error thrown when the loss stops being finite: training stops, no checkpoint is written.
struct NonFiniteLoss : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Runs (or resumes) training. `stop` is polled after every step: when it turns true a
// checkpoint is written and the function returns with interrupted = true.
TrainResult train(const TrainConfig& config, const std::atomic<bool>* stop = nullptr);

}  // namespace blpa
