// The only interface between lib/ and the CUDA kernels: plain parameter structs and
// launchers. No torch and no CUDA headers here, so lib/ compiles without either.
// Every launcher runs on the current LibTorch CUDA stream of `device`, never synchronises
// and allocates nothing.
#pragma once

#include <cstdint>

namespace blpa::cuda {

struct PackParams {
  const float* v = nullptr;        // numel elements, contiguous, channel = (i / plane) % channels
  const float* divisor = nullptr;  // [channels] or null: codes of v / divisor_c
  const uint8_t* offsets = nullptr;  // [channels] per-channel s_c
  uint8_t* codes = nullptr;        // ceil(numel * bits / 8) bytes
  int64_t numel = 0;
  int64_t plane = 1;               // elements per (sample, channel): H * W
  int64_t channels = 1;
  int bits = 8;
  int device = 0;
};

struct OffsetParams {
  const float* b = nullptr;    // [channels] beta / gamma
  uint8_t* offsets = nullptr;  // [channels]
  int64_t channels = 0;
  int bits = 8;
  int device = 0;
};

// Any output pointer may be null: that output is not produced.
struct UnpackParams {
  const uint8_t* codes = nullptr;
  const uint8_t* offsets = nullptr;
  const float* b = nullptr;      // [channels], needed for x_hat
  const float* gamma = nullptr;  // [channels], needed for r
  float* x_hat = nullptr;        // v' - b
  float* r = nullptr;            // max(gamma * v', 0)
  bool* mask = nullptr;          // code >= s
  float* grad = nullptr;         // in place: grad = mask ? grad : 0
  int64_t numel = 0;
  int64_t plane = 1;
  int64_t channels = 1;
  int bits = 8;
  int device = 0;
};

void compute_offsets(const OffsetParams& p);
void pack(const PackParams& p);
void unpack(const UnpackParams& p);

}  // namespace blpa::cuda
