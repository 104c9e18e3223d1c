// Pre-activation bottleneck ResNets built from units (docs/method.md, "Networks").
//   cifar:    depth 9n+2 (ResNet-164: n = 18), stages of width 16/32/64 (x4), 3x3 stem
//   imagenet: depth 50/101/152/200, stages of width 64/128/256/512 (x4), 7x7/2 stem + max-pool
//             (the max-pool keeps 1 byte per output element outside plain mode)
#pragma once

#include <torch/torch.h>

#include <string>
#include <utility>
#include <vector>

#include "blpa/unit.h"

namespace blpa {

struct NetConfig {
  std::string arch = "cifar";  // cifar | imagenet
  int depth = 164;
  int64_t in_channels = 3;
  int64_t num_classes = 10;
  ModeConfig mode;
};

// One bottleneck block: three units, the first with the projection shortcut when the
// shape changes (it reads the first unit's r, so it stores nothing of its own).
class BlockImpl : public torch::nn::Module {
 public:
  BlockImpl(int64_t in_channels, int64_t width, int64_t stride, const ModeConfig& mode);
  torch::Tensor forward(const torch::Tensor& x);
  Unit u1{nullptr}, u2{nullptr}, u3{nullptr};
  bool projection = false;
  std::string label = "block";  // its place in a network ("block3"), for memory reports
};
TORCH_MODULE(Block);

struct UnitRow {
  std::string name;
  UnitMemory memory;
};

class ResNetImpl : public torch::nn::Module {
 public:
  explicit ResNetImpl(const NetConfig& config);
  torch::Tensor forward(const torch::Tensor& x);

  const NetConfig& config() const { return config_; }
  // Every unit in forward order, with its name.
  std::vector<std::pair<std::string, Unit>> units() const;
  // What each unit kept for backward in the last training forward (exact/blpa/naive).
  std::vector<UnitRow> memory_table() const;
  int64_t stored_unit_bytes() const;
  // gamma >= 1e-8 in every unit; call after each optimiser step.
  void constrain_();

 private:
  NetConfig config_;
  torch::nn::Conv2d stem{nullptr};
  torch::nn::ModuleList blocks;
  Unit final_unit{nullptr};
  torch::nn::Linear fc{nullptr};
};
TORCH_MODULE(ResNet);

// The ImageNet stem's 3x3/2 max-pool (padding 1), as torch::max_pool2d, keeping one byte per
// output element for backward (which window position won) instead of the input and int64
// indices. Used in the exact, blpa and naive modes.
torch::Tensor stem_max_pool(const torch::Tensor& x);

// Stages (blocks per stage) of an ImageNet depth; throws for an unsupported depth.
std::vector<int> imagenet_stages(int depth);

}  // namespace blpa
