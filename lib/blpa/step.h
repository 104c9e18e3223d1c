// One training iteration replayed as a CUDA graph: the forward and backward of a batch in
// equal parts, the SGD update and gamma's clamp, captured once and then launched as one unit,
// so that no step waits for the host to issue its thousands of kernels (docs/method.md,
// "CUDA graphs").
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <string>

#include "blpa/resnet.h"

namespace blpa {

// torch::optim::SGD's update (momentum, weight decay; no dampening, no Nesterov) with the
// learning rate read from `lr`, a 0-dim float tensor on the parameters' device (checked: a
// host one would be read with a synchronisation), so that a captured update follows the
// schedule. Each operation runs over all of a group's tensors at once (ATen's _foreach
// operators, as PyTorch's default SGD on CUDA): on CUDA a few multi-tensor kernels per step,
// where LibTorch's SGD launches three or four per parameter tensor. The same arithmetic except
// that lr * buffer is rounded before it is added (ATen's add with a scalar factor fuses the
// two, on CPUs with FMA and on GPUs), so the results agree to a rounding of each update, and
// exactly when lr is a power of two. Like PyTorch's foreach SGD it holds the update's
// temporaries for all tensors at once (lr * buffer, and g + weight_decay * p): up to twice the
// parameters' bytes while it runs, after the backward has freed its activations. Uses, and
// where missing creates, the optimiser's own momentum buffers, so checkpoints see one state.
void sgd_step(torch::optim::SGD& opt, const torch::Tensor& lr);

// The iteration of blpa-train for a fixed batch shape, captured as a CUDA graph on its first
// run() and replayed by the next ones. Needs a CUDA build and device; data parallelism is
// not captured (the trainer runs eagerly with several ranks).
class GraphedStep {
 public:
  GraphedStep(ResNet& model, torch::optim::SGD& opt, int64_t accum_steps);
  ~GraphedStep();
  GraphedStep(const GraphedStep&) = delete;
  GraphedStep& operator=(const GraphedStep&) = delete;

  // Copies the batch into the graph's inputs and the learning rate into its tensor, then
  // replays (capturing first). Synchronises nothing. Throws std::runtime_error when the
  // capture fails, with the reason; the model and optimiser are then as before the call.
  void run(const torch::Tensor& images, const torch::Tensor& labels, double lr);

  // The losses of the iterations run since the last call: their sum, how many, and the last
  // one. Waits for those iterations to finish (call it where the host needs the figures).
  struct Losses {
    double sum = 0, last = 0;
    int64_t count = 0;
  };
  Losses take_losses();

  // Whether the iteration has been captured (replays follow).
  bool captured() const;
  // Bytes the graph's private memory pool holds.
  int64_t pool_bytes() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace blpa
