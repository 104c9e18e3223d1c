// K-bit sign-preserving codes of a unit's normalised activations v = x_hat + beta/gamma
// (docs/method.md, "Quantiser"), K = 8, 4 or 2, over a window of a given width. One entry
// point per operation; CPU tensors run the parallel CPU path, CUDA tensors the kernels in
// cuda/.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "blpa/codec_math.h"

namespace blpa {

// The paper's window, 6 units of x_hat for every K (DESIGN.md 1.3).
using codec::kPaperWindow;

// How values become codes: `bits` per value (8, 4 or 2) over a window `window` wide (units
// of x_hat: bins of window / 2^bits) whose centre sits `lift` above the channel's b (the
// mean of v). The default, {8, 6, 0}, is the paper's quantiser for every bit width.
struct CodeFormat {
  int bits = 8;
  float window = kPaperWindow;
  float lift = 0.0f;
  float bin_width() const { return codec::bin_width(window, bits); }
};

// The narrowest window accepted (units of x_hat). Below about 2^-117 the bins would be
// narrower than 2^-125, where the GPU's decode (a multiply-add) and the CPU's can differ in
// their last bit (codec_math.h, decode_by_steps); no useful window comes near either.
inline constexpr float kMinWindow = 1e-30f;

// The format blpa uses when none is asked for: window and lift chosen per bit width by
// measured gradient fidelity (docs/results.md, "Windows").
CodeFormat default_format(int bits);

// The packed codes of one tensor plus what is needed to read them back.
struct Codes {
  at::Tensor data;     // uint8, exactly packed_bytes(numel, format.bits) bytes
  at::Tensor offsets;  // uint8 [C]: the per-channel offset s_c
  std::vector<int64_t> sizes;  // the logical N x C x H x W (or N x C x ...) sizes
  CodeFormat format;
  // The codes are packed in the tensor's memory order: NCHW, or NHWC for channels-last
  // (4-D) tensors. The codes of the same values are the same in either.
  bool channels_last = false;

  int64_t numel() const;
  int64_t channels() const { return sizes.size() > 1 ? sizes[1] : 1; }
  // Bytes held: the packed codes and the per-channel metadata.
  int64_t bytes() const;
  bool defined() const { return data.defined(); }
};

int64_t packed_bytes(int64_t numel, int bits);

// Throws (TORCH_CHECK) unless bits is 8, 4 or 2, the window positive and finite and the
// lift finite.
void check_format(const CodeFormat& f);

// What a unit needs per channel before its BatchNorm and its codes, in one pass (one launch
// on CUDA): g = max(gamma, gamma_min) as LibTorch's clamp_min (NaN stays NaN), b = beta / g
// when `centred` (blpa: the window sits around b) or 0 (naive), and the offsets s_c of b.
// gamma and beta: contiguous float32 [C] on one device. A NaN b has the device's bits on CUDA
// (0x7FFFFFFF), not necessarily the CPU's (an operand's payload, or 0xFFC00000 for 0 / 0); so
// has a float32 x_hat = v' - b that unpack computes from it. Offsets and codes do not differ.
struct ChannelCoding {
  at::Tensor g, b;     // float32 [C]
  at::Tensor offsets;  // uint8 [C]
  CodeFormat format;
};
ChannelCoding channel_coding(const at::Tensor& gamma, const at::Tensor& beta, float gamma_min, const CodeFormat& f,
                             bool centred);

// v: float32 or bfloat16 (widened to float exactly: the codes of the bf16 values), at least
// 2-D with channels on dim 1 (N x C x H x W, or N x C), contiguous (NCHW) or 4-D and
// channels-last contiguous (NHWC; a tensor that is both is taken as NCHW). Anything else is
// refused with a message.
// b: float32 [C] on the same device (b_c = beta_c / gamma_c; zeros for the naive baseline,
// which centres the window on 0). With `divisor` (float32 [C]) the codes are those of
// v / divisor_c, computed on the fly: the unit packs a / gamma without making it.
Codes pack(const at::Tensor& v, const at::Tensor& b, const CodeFormat& f, const at::Tensor& divisor = {});

// pack(a, b, f, divisor), and a = max(a, 0) in place in the same pass: the unit's forward
// packs a / gamma and applies its ReLU without reading a twice. NaN stays NaN, as with relu_;
// a keeps its dtype, and its version counter counts the write, as relu_'s does (a backward
// that saved a refuses to run on the changed values).
Codes pack_relu_(at::Tensor& a, const at::Tensor& b, const CodeFormat& f, const at::Tensor& divisor);

// The same with the channels' values already made by channel_coding: its offsets are used
// (and shared by the codes) instead of being computed again. pack_relu_ divides by cc.g.
Codes pack(const at::Tensor& v, const ChannelCoding& cc, const at::Tensor& divisor = {});
Codes pack_relu_(at::Tensor& a, const ChannelCoding& cc);

// The unit's forward in blpa mode from its BatchNorm's batch statistics, in one pass over x
// (on CUDA one kernel over x, after one over the channels for a wide layer; the BatchNorm's
// output a is never stored): per channel
//   invstd = 1 / sqrt(var + eps),  a = g invstd (x - mean) + beta,
// a computed as codec::bn_affine gives it and rounded once to x's dtype; r = max(a, 0), a new
// tensor of x's dtype and layout (NaN stays NaN, with the device's bits on CUDA as LibTorch's
// CUDA kernels give them, 0x7FFFFFFF in float32 and 0x7FFF in bf16, not the CPU's); and the
// codes of a / g, those that pack_relu_(a, cc) gives for this a. x: as pack's v; mean and var:
// float32 [C], the batch's mean and biased variance (at::batch_norm_update_stats); beta:
// float32 [C]; g = cc.g. invstd: float32 [C], what the backward needs. a agrees with
// LibTorch's BatchNorm output to float rounding, not to the bit (LibTorch's CUDA kernel
// computes (x - mean) invstd g + beta).
struct BnPacked {
  at::Tensor r, invstd;
  Codes codes;
};
BnPacked bn_relu_pack(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var, float eps,
                      const at::Tensor& beta, const ChannelCoding& cc);

enum UnpackOutput : unsigned { kXhat = 1u, kRelu = 2u, kMask = 4u };

struct Unpacked {
  at::Tensor x_hat;  // v' - b
  at::Tensor r;      // max(gamma * v', 0), the approximate ReLU output
  at::Tensor mask;   // bool, code >= s: the exact ReLU mask
};

// Produces, in one pass over the codes, only the outputs named in `outputs`.
// b is needed for kXhat, gamma for kRelu (either may be undefined otherwise). x_hat and r
// are of `dtype`, float32 or bfloat16 (computed in float, rounded once to nearest-even), and
// like mask in the codes' layout (channels-last tensors for channels-last codes).
Unpacked unpack(const Codes& codes, const at::Tensor& b, const at::Tensor& gamma, unsigned outputs,
                at::ScalarType dtype = at::kFloat);

// The unit's BatchNorm-and-ReLU backward in blpa mode, read from the codes (docs/method.md,
// "Backward of a unit"). With g_a = mask ? g_r : 0, x_hat' = v' - b, per channel c sums over
// N, H and W, and M = N*H*W elements per channel:
//   g_beta = sum g_a,   g_g = sum g_a x_hat',
//   g_x = g_c * invstd_c * (g_a - g_beta / M - x_hat' * g_g / M).
// Two passes over the codes and g_r (the sums, then g_x); nothing of the input's size is made
// besides g_x, which is g_r itself when `in_place` (its version counter then counts the
// write, as an in-place ATen op's does). g_r: float32 or bfloat16, dense in the codes'
// layout (contiguous for NCHW codes, channels-last contiguous for NHWC ones); g_x has its
// dtype and layout (computed in float, rounded once); g_g and g_beta are float32 [C].
// g: the clamped gamma; g_g is the gradient with respect to it, or, given gamma_min, with
// respect to gamma where g = max(gamma, gamma_min): zero for the channels with
// g <= gamma_min, as threshold_backward(g_g, gamma, gamma_min) (a NaN gamma passes its NaN
// gradient).
// The sums are carried in double, over float partial sums of at most 32 elements (CPU) or 4
// (CUDA), and added in a fixed order: a device gives the same bits from run to run, and the
// two devices agree to about 1e-6 of sum |g_a| (sum |g_a x_hat'|). On the CPU the order is
// that of the NCHW walk in either layout, so NHWC gives the bits of NCHW. The GPU sums g_a and
// g_a (q - s) per channel and writes g_x as scale g_a + (base + slope (q - s)) with per-channel
// coefficients in double rounded to float: the same algebra, rounded otherwise; a NaN in its
// bf16 g_x has the device's bits (0x7FFF), not the CPU's (0x7FC0).
struct BnGrads {
  at::Tensor g_x, g_g, g_beta;
};
BnGrads bn_relu_backward(const Codes& codes, const at::Tensor& b, const at::Tensor& g, const at::Tensor& invstd,
                         at::Tensor g_r, bool in_place, std::optional<float> gamma_min = std::nullopt);

// The integer codes, one uint8 per element, in the shape of the packed tensor with its
// logical N, C, H, W indexing (a permuted view for channels-last codes; for tests and
// inspection, not on the training path).
at::Tensor code_values(const Codes& codes);

// How many threads the CPU codec's loops run on: the distinct threads of one at::parallel_for
// of `tasks` tasks, compiled where those loops are. at::parallel_for is a header template; in
// an OpenMP LibTorch, code built without -fopenmp runs it on one thread, whatever
// at::get_num_threads() says. For tests of the build.
int codec_parallel_threads(int64_t tasks);

// The copy of the CPU codec's loops that runs: "base" (SSE2), "avx2" or "avx512" (the widest
// the CPU has, or BLPA_CODEC_ISA's).
const char* cpu_isa_name();

}  // namespace blpa
