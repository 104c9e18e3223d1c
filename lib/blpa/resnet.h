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

// How a network computes (docs/method.md, "Precision"):
//   fp32  every operator in float32; on CUDA, TF32 off;
//   tf32  float32 tensors, CUDA convolutions and matrix products in TF32 (LibTorch's default
//         for convolutions); on the CPU the same as fp32, which it refuses;
//   bf16  convolutions and the classifier in bfloat16 on bfloat16 activations; parameters,
//         BatchNorm statistics and arithmetic, the loss and the optimiser in float32 (what
//         PyTorch's autocast does).
enum class Precision { fp32, tf32, bf16 };
// "fp32", "tf32", "bf16"; throws std::invalid_argument for anything else.
Precision parse_precision(const std::string& s);
std::string to_string(Precision p);

// A network's precision and activation layout (NCHW: at::MemoryFormat::Contiguous; NHWC:
// ChannelsLast). The weights stay float32 (set_numerics lays the convolutions' out in the
// layout); the stem casts the images, the units follow their input.
struct Numerics {
  Precision precision = Precision::fp32;
  at::MemoryFormat layout = at::MemoryFormat::Contiguous;
  at::ScalarType dtype() const { return precision == Precision::bf16 ? at::kBFloat16 : at::kFloat; }
  // "fp32-nchw", "bf16-nhwc", ...
  std::string str() const;
};
// "nchw" or "nhwc"; throws std::invalid_argument for anything else.
at::MemoryFormat parse_layout(const std::string& s);
// --device: "cpu", "cuda" or "cuda:N"; throws std::invalid_argument, naming the flag, for
// anything else (LibTorch's other device types, "CPU", "cuda:0x").
torch::Device parse_device(const std::string& s);
std::string layout_name(at::MemoryFormat f);
// What "auto" means on a device: tf32 on CUDA, fp32 on the CPU; NHWC on both, in every
// precision (docs/results.md, "Precision and layout" and "GPU (NVIDIA H200, 2026-11-30)").
Precision default_precision(const torch::Device& device);
at::MemoryFormat default_layout(const torch::Device& device, Precision p);
// The setting that --precision and --memory-format name on `device` ("auto" for the default);
// throws std::invalid_argument for an unknown name or tf32 on the CPU.
Numerics numerics_for(const std::string& precision, const std::string& memory_format, const torch::Device& device);
// Sets LibTorch's process-wide TF32 switches for CUDA convolutions and matrix products: on
// for tf32, off otherwise. Throws std::invalid_argument for tf32 on a CPU device.
void apply_precision(Precision p, const torch::Device& device);

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
  // fp32 NCHW unless set; a setting of the run (checkpoints hold float32). Setting it also
  // lays the convolutions' weights out in its layout (call it again after loading weights):
  // cast to NHWC at each forward, they were a copy that autograd kept for the backward.
  const Numerics& numerics() const { return numerics_; }
  void set_numerics(const Numerics& n);
  // Every unit in forward order, with its name.
  std::vector<std::pair<std::string, Unit>> units() const;
  // What each unit kept for backward in the last training forward (exact/blpa/naive).
  std::vector<UnitRow> memory_table() const;
  int64_t stored_unit_bytes() const;
  // gamma >= 1e-8 in every unit; call after each optimiser step.
  void constrain_();

 private:
  NetConfig config_;
  Numerics numerics_;
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
