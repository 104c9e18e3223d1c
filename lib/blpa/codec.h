// K-bit sign-preserving codes of a unit's normalised activations v = x_hat + beta/gamma
// (docs/method.md, "Quantiser"). One entry point per operation; CPU tensors run the
// parallel CPU path, CUDA tensors the kernels in cuda/.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace blpa {

// The packed codes of one tensor plus what is needed to read them back.
struct Codes {
  at::Tensor data;     // uint8, exactly packed_bytes(numel, bits) bytes
  at::Tensor offsets;  // uint8 [C]: the per-channel offset s_c
  std::vector<int64_t> sizes;
  int bits = 8;

  int64_t numel() const;
  int64_t channels() const { return sizes.size() > 1 ? sizes[1] : 1; }
  // Bytes held: the packed codes and the per-channel metadata.
  int64_t bytes() const;
  bool defined() const { return data.defined(); }
};

int64_t packed_bytes(int64_t numel, int bits);

// v: float32, contiguous, at least 2-D with channels on dim 1 (N x C x H x W, or N x C).
// b: float32 [C] on the same device (b_c = beta_c / gamma_c; zeros for the naive baseline,
// which centres the window on 0). bits: 8 or 4. With `divisor` (float32 [C]) the codes are
// those of v / divisor_c, computed on the fly: the unit packs a / gamma without making it.
Codes pack(const at::Tensor& v, const at::Tensor& b, int bits, const at::Tensor& divisor = {});

enum UnpackOutput : unsigned { kXhat = 1u, kRelu = 2u, kMask = 4u };

struct Unpacked {
  at::Tensor x_hat;  // v' - b
  at::Tensor r;      // max(gamma * v', 0), the approximate ReLU output
  at::Tensor mask;   // bool, code >= s: the exact ReLU mask
};

// Produces, in one pass over the codes, only the outputs named in `outputs`.
// b is needed for kXhat, gamma for kRelu (either may be undefined otherwise).
Unpacked unpack(const Codes& codes, const at::Tensor& b, const at::Tensor& gamma, unsigned outputs);

// grad = mask ? grad : 0, in place, without materialising the mask.
void apply_mask_(const Codes& codes, at::Tensor& grad);

// apply_mask_(codes, grad) and unpack(codes, b, {}, kXhat).x_hat in one pass over the codes
// (the unit's backward needs both); returns x_hat.
at::Tensor unpack_x_hat_masking_(const Codes& codes, const at::Tensor& b, at::Tensor& grad);

// The integer codes, one uint8 per element, in the shape of the packed tensor (for tests
// and inspection; not on the training path).
at::Tensor code_values(const Codes& codes);

}  // namespace blpa
