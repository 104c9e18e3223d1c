// The only interface between lib/ and the CUDA kernels: plain parameter structs and
// launchers. No torch and no CUDA headers here, so lib/ compiles without either.
// Every launcher makes `device` current while it launches (a rank on cuda:1 need not have
// made it current), runs on LibTorch's current stream of that device, never synchronises
// and allocates nothing.
//
// Activations, gradients and unpack's outputs are float32, or bfloat16 when `bf16` is set
// (widened to float exactly on load, rounded once to nearest-even on store: codec_math.h).
// Their memory is NCHW (channel of element i: (i / plane) % channels) or, when `nhwc` is set,
// channels-last (channel i % channels; plane is H * W either way). The codes follow the
// memory order.
#pragma once

#include <cstdint>

namespace blpa::cuda {

struct PackParams {
  const void* v = nullptr;         // numel elements (float or bf16), in the layout below
  const float* divisor = nullptr;  // [channels] or null: codes of v / divisor_c
  const uint8_t* offsets = nullptr;  // [channels] per-channel s_c
  uint8_t* codes = nullptr;        // ceil(numel * bits / 8) bytes
  int64_t numel = 0;
  int64_t plane = 1;               // elements per (sample, channel): H * W
  int64_t channels = 1;
  int bits = 8;                    // 8, 4 or 2
  float window = 6.0f;             // bins of window / 2^bits
  int device = 0;
  void* relu = nullptr;  // if set, receives max(v, 0) (NaN kept) in v's type; may be v itself
  bool bf16 = false;
  bool nhwc = false;
  float* workspace = nullptr;  // pack_workspace(p) floats of scratch, 16-byte aligned (null where that
                               // is 0): pack's per-channel table, made by a launch of its own
  // The unit's forward in one pass (blpa::bn_relu_pack), when `mean` is set: v holds the
  // BatchNorm's input x, and the values packed (and, through relu, which must not alias v,
  // made non-negative) are a = T(fma(x, alpha_c, shift_c)) of codec::bn_affine(mean_c,
  // invstd_c, divisor_c, beta_c), invstd_c = codec::bn_invstd(var_c, eps), written to invstd.
  const float* mean = nullptr;  // [channels]: the batch's mean
  const float* var = nullptr;   // [channels]: the batch's biased variance
  const float* beta = nullptr;  // [channels]
  float eps = 0.0f;
  float* invstd = nullptr;      // [channels]
  bool general = false;  // every launch takes the kernel for any shape, not the common path's (for measurements)
  int unroll = 0;  // bf16 on the common path: groups a thread loads at once, 2 or 4 (0: 2); for measurements
};

// The floats of pack's per-channel table and edge thresholds, where pack makes them once for a
// launch rather than in every block.
constexpr int64_t pack_table_floats(int64_t channels) { return 4 * channels + 2 * 256 + 2; }

struct OffsetParams {
  const float* b = nullptr;    // [channels] beta / gamma
  uint8_t* offsets = nullptr;  // [channels]
  int64_t channels = 0;
  int bits = 8;
  float window = 6.0f;
  float lift = 0.0f;           // the window's centre sits lift above b
  int device = 0;
};

// blpa/codec.h, channel_coding: g = max(gamma, gamma_min), b = beta / g (or 0), offsets of b.
struct ChannelParams {
  const float* gamma = nullptr;  // [channels]
  const float* beta = nullptr;   // [channels]
  float gamma_min = 0.0f;
  bool centred = true;           // false: b = 0
  float* g = nullptr;            // [channels]
  float* b = nullptr;            // [channels]
  uint8_t* offsets = nullptr;    // [channels]
  int64_t channels = 0;
  int bits = 8;
  float window = 6.0f;
  float lift = 0.0f;
  int device = 0;
};

// Any output pointer may be null: that output is not produced.
struct UnpackParams {
  const uint8_t* codes = nullptr;
  const uint8_t* offsets = nullptr;
  const float* b = nullptr;      // [channels], needed for x_hat
  const float* gamma = nullptr;  // [channels], needed for r
  void* x_hat = nullptr;         // v' - b (float or bf16)
  void* r = nullptr;             // max(gamma * v', 0) (float or bf16)
  bool* mask = nullptr;          // code >= s
  int64_t numel = 0;
  int64_t plane = 1;
  int64_t channels = 1;
  int bits = 8;
  float window = 6.0f;
  int device = 0;
  bool bf16 = false;
  bool nhwc = false;
  bool general = false;  // as PackParams::general
};

// The unit's BatchNorm-and-ReLU backward from the codes (blpa/codec.h, bn_relu_backward).
// NCHW: channel c's elements are the planes n * channels + c, n < batch. NHWC: element c of
// each of the batch * plane rows of `channels` elements.
struct BnBackwardParams {
  const uint8_t* codes = nullptr;
  const uint8_t* offsets = nullptr;
  const float* b = nullptr;       // [channels]: x_hat' = v' - b
  const float* g = nullptr;       // [channels]: the clamped gamma
  const float* invstd = nullptr;  // [channels]
  const void* grad = nullptr;     // g_r, numel (float or bf16)
  void* grad_in = nullptr;        // g_x, numel, grad's type; may be grad itself
  double* partials = nullptr;     // bn_workspace(p) doubles: each block's two sums
  float* g_g = nullptr;           // [channels]
  float* g_beta = nullptr;        // [channels]
  bool mask_g_g = false;          // g_g = 0 where g <= gamma_min (the clamp's gradient)
  float gamma_min = 0.0f;
  int64_t batch = 0;
  int64_t channels = 0;
  int64_t plane = 1;
  int bits = 8;
  float window = 6.0f;
  int device = 0;
  bool bf16 = false;
  bool nhwc = false;
  int nhwc_vector = 0;  // NHWC: the channels a thread takes in a row, 4 or 8 (0: 8); for measurements
  int nhwc_blocks_per_sm = 0;  // NHWC: row blocks an SM (0: as many as it holds at once); for measurements
};

// The device's multiprocessors: the launchers size their grids by them, and with them so
// do the BatchNorm backward's partial sums (the tests' emulator takes the same count to
// give the GPU's bits).
int multiprocessors(int device);

void compute_offsets(const OffsetParams& p);
void channel_coding(const ChannelParams& p);
// The floats of workspace pack needs for p: pack_table_floats(channels) where it makes its
// table in a launch of its own (large tensors, wide layers), 0 where each block makes a copy.
int64_t pack_workspace(const PackParams& p);
void pack(const PackParams& p);
void unpack(const UnpackParams& p);
// The doubles of workspace bn_relu_backward needs for p; the grid, and so the size, depends
// on the pointers' alignment too: call it with the p that bn_relu_backward gets.
int64_t bn_workspace(const BnBackwardParams& p);
// Sums per block into p.partials, then writes g_x, g_g and g_beta, each block adding the
// partial sums of its channel in a fixed order: two launches (NHWC: three, a channel's
// partials added once, by one block), reproducible to the bit. NHWC adds in another order
// than NCHW: the two agree to the sums' rounding, not to the bit (on the CPU they agree to
// the bit).
void bn_relu_backward(const BnBackwardParams& p);

}  // namespace blpa::cuda
