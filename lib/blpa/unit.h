// The BN-affine-ReLU-conv unit of docs/method.md ("The unit") in every mode.
//
//   x --BN(batch stats)--> x_hat --*gamma+beta--> a --ReLU--> r --conv(W_i)--> y_i
//
// A unit has zero, one or two convolutions reading the same r: zero for the network's final
// BN-ReLU, two for a block's first unit whose projection shortcut shares r (and so the codes).
#pragma once

#include <torch/torch.h>

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "blpa/codec.h"

namespace blpa {

enum class Mode { plain, exact, blpa, naive };

Mode parse_mode(const std::string& s);
std::string to_string(Mode m);

struct ModeConfig {
  // {mode}, {mode, bits}, {mode, bits, window}, ...: the members not given take their defaults.
  ModeConfig(Mode m = Mode::blpa, int k = 4, float w = 0, std::optional<float> l = {})
      : mode(m), bits(k), window(w), lift(l) {}
  Mode mode = Mode::blpa;
  int bits = 4;               // 8, 4 or 2; used by blpa and naive
  float window = 0;           // the codes' window in units of x_hat (blpa, naive); 0: the default for bits
  std::optional<float> lift;  // its centre above b; unset: the default with the default window, else 0
  // What the codes use (blpa/codec.h): `window` and `lift`, or default_format(bits). So
  // {blpa, K, 6} is the paper's quantiser.
  CodeFormat codes_format() const;
  // plain, exact, blpa-K or naive-K for the paper's quantiser (window 6, lift 0), with -wW for
  // another window W and -lL for a lift L: blpa-8-w12, blpa-4-l1. The name that logs,
  // checkpoints and blpa-bench use.
  std::string str() const;
};

// Reads a name that ModeConfig::str() writes. A name without -wW has the paper's window 6
// and without -lL its lift 0: so do the names in checkpoints written before either existed.
// A bare blpa or naive takes `bits`, `window` and `lift`. Throws std::invalid_argument for
// anything else.
ModeConfig parse_mode_config(const std::string& s, int bits = 4, float window = 0, std::optional<float> lift = {});

// The floor of gamma (DESIGN.md: gamma >= 1e-8, so that sign(a) = sign(a / gamma)): every
// mode but plain trains with max(gamma, kGammaMin), and constrain_() keeps gamma there.
inline constexpr double kGammaMin = 1e-8;
inline constexpr float kGammaMinF = static_cast<float>(kGammaMin);  // what clamp_min(kGammaMin) compares a float with

struct ConvSpec {
  int64_t out_channels;
  int64_t kernel;
  int64_t stride = 1;
  int64_t padding = 0;
};

// What a unit's autograd node keeps for backward after its last training forward.
struct UnitMemory {
  int64_t code_bytes = 0;      // packed codes (blpa, naive)
  int64_t metadata_bytes = 0;  // per-channel: 1/sigma, offsets; blpa/naive also gamma, beta/gamma
  int64_t full_bytes = 0;      // full-size activations (exact: x_hat; must be 0 in blpa/naive)
  std::vector<int64_t> input_sizes;
  int64_t total() const { return code_bytes + metadata_bytes + full_bytes; }
};

class UnitImpl : public torch::nn::Module {
 public:
  UnitImpl(int64_t in_channels, std::vector<ConvSpec> convs, ModeConfig mode);

  // One output per convolution (or r itself when the unit has none).
  std::vector<torch::Tensor> forward(const torch::Tensor& x);

  const ModeConfig& mode() const { return mode_; }
  // Filled by the last training forward in exact/blpa/naive modes (plain keeps its own
  // autograd tensors; measure those with the allocator, see blpa/memory.h).
  const UnitMemory& memory() const { return *memory_; }
  // Keeps gamma >= 1e-8 so that sign(a) = sign(a / gamma) (call after each optimiser step).
  void constrain_();
  // blpa and naive: the channel coding (blpa/codec.h) of gamma and beta as they are now, for
  // the next training forward only; a network makes all its units' in one pass. Without one
  // the forward makes its own. take_channel_coding() returns it (or none) and forgets it.
  void set_channel_coding(ChannelCoding cc) { next_coding_ = std::move(cc); }
  ChannelCoding take_channel_coding() { return std::exchange(next_coding_, {}); }

  torch::Tensor gamma, beta, running_mean, running_var;
  std::vector<torch::Tensor> weights;
  std::vector<ConvSpec> convs;
  double momentum = 0.1, eps = 1e-5;
  std::string label = "unit";  // its place in a network ("block3.u2"), for memory reports
  // blpa: whether the training forward makes its BatchNorm's output, ReLU and codes in one
  // pass over x (bn_relu_pack) from LibTorch's batch statistics, rather than by LibTorch's
  // BatchNorm and then pack_relu_. Unset: on CUDA, where that saves a read and a write of the
  // activation per unit; the CPU keeps LibTorch's BatchNorm, whose output is exact mode's to
  // the bit (the fused output agrees with it to float rounding). BLPA_FUSED_FORWARD=0 or 1 in
  // the environment changes the default on every device, for measurements.
  std::optional<bool> fused_forward;

  // Per-channel zeros and ones that exact's and naive's backward pass to LibTorch's BN
  // backward as the mean and 1/sigma of x_hat' (blpa's reads the codes instead). Kept here,
  // not buffers (no state, not saved), so that a backward launches no kernels to make them;
  // moved to the input's device on first use.
  const torch::Tensor& zeros_like_channels(const torch::Tensor& like);
  const torch::Tensor& ones_like_channels(const torch::Tensor& like);

 private:
  ModeConfig mode_;
  std::shared_ptr<UnitMemory> memory_;
  torch::Tensor zeros_, ones_;
  ChannelCoding next_coding_;
};
TORCH_MODULE(Unit);

}  // namespace blpa
