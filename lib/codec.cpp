// CPU path of the codec and the one dispatch point to the CUDA kernels.
#include "blpa/codec.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "blpa/codec_math.h"
#if BLPA_WITH_CUDA
#include "codec_kernels.h"
#endif

namespace blpa {
namespace {

using codec::decode;
using codec::encode;

// Work is split into element ranges that start on a byte boundary of the packed codes, so
// no two threads ever write the same byte (two 4-bit or four 2-bit codes share one).
constexpr int64_t kGrain = 1 << 15;

struct Layout {
  int64_t numel, plane, channels;
};

Layout layout_of(at::IntArrayRef sizes) {
  TORCH_CHECK(sizes.size() >= 2, "blpa codec: expected a tensor with at least 2 dims (N x C x ...), got ",
              sizes.size(), " dims");
  int64_t plane = 1;
  for (size_t d = 2; d < sizes.size(); ++d) plane *= sizes[d];
  int64_t numel = sizes[0] * sizes[1] * plane;
  return {numel, plane, sizes[1]};
}

// Calls f(begin, end, c) for each run of elements in [e0, e1) that share one channel.
template <typename F>
void for_each_channel_run(const Layout& l, int64_t e0, int64_t e1, F&& f) {
  while (e0 < e1) {
    const int64_t p = l.plane > 0 ? e0 / l.plane : 0;
    const int64_t end = std::min(e1, (p + 1) * l.plane);
    f(e0, end, p % l.channels);
    e0 = end;
  }
}

// Codes per byte: 1, 2 or 4. Element j of a byte sits at bits [j*Bits, (j+1)*Bits).
template <int Bits>
constexpr int kPerByte = 8 / Bits;

// div: the per-channel divisor (all ones when the caller gave none; x / 1 is exact).
// relu: if set, receives max(v, 0) after each run is encoded (it may be v itself).
template <int Bits>
void pack_cpu(const float* v, const float* div, const uint8_t* offsets, uint8_t* out, float* relu, float d,
              const Layout& l) {
  constexpr int per = kPerByte<Bits>;
  at::parallel_for(0, (l.numel + per - 1) / per, kGrain, [&](int64_t pb, int64_t pe) {
    for_each_channel_run(l, pb * per, std::min(pe * per, l.numel), [&](int64_t b, int64_t e, int64_t c) {
      const int s = offsets[c];
      const float dc = div[c];
      auto code = [&](int64_t i) { return static_cast<uint8_t>(encode(v[i] / dc, s, Bits, d)); };
      if constexpr (Bits == 8) {
        for (int64_t i = b; i < e; ++i) out[i] = code(i);
      } else {
        // A byte is begun at its first element (by a block or the tail below, which assign it)
        // and finished by the runs that follow in this thread (the head, which adds to it).
        int64_t i = b;
        for (; i < e && i % per; ++i) out[i / per] = static_cast<uint8_t>(out[i / per] | code(i) << (i % per * Bits));
        // Encode blocks into a small stack buffer (vectorises), then pack whole bytes.
        constexpr int kBlock = 256;
        uint8_t buf[kBlock];
        while (e - i >= per) {
          const int n = static_cast<int>(std::min<int64_t>(kBlock, (e - i) / per * per));
          for (int k = 0; k < n; ++k) buf[k] = code(i + k);
          uint8_t* o = out + i / per;
          for (int k = 0; k < n / per; ++k) {
            uint8_t byte = 0;
            for (int j = 0; j < per; ++j) byte = static_cast<uint8_t>(byte | buf[per * k + j] << (j * Bits));
            o[k] = byte;
          }
          i += n;
        }
        if (i < e) {  // the first elements of a byte: the next run or the zero padding ends it
          uint8_t byte = 0;
          for (int j = 0; i + j < e; ++j) byte = static_cast<uint8_t>(byte | code(i + j) << (j * Bits));
          out[i / per] = byte;
        }
      }
      if (relu)  // after the run is encoded: relu may be v itself
        for (int64_t i = b; i < e; ++i) relu[i] = v[i] < 0.0f ? 0.0f : v[i];
    });
  });
}

// Reads the n codes of elements [i, i + n) into q, one per byte.
template <int Bits>
void read_codes(const uint8_t* data, int64_t i, int n, uint8_t* q) {
  if constexpr (Bits == 8) {
    std::copy(data + i, data + i + n, q);
  } else {
    constexpr int per = kPerByte<Bits>, mask = (1 << Bits) - 1;
    int k = 0;
    for (; k < n && (i + k) % per; ++k)  // the run starts inside a byte
      q[k] = (data[(i + k) / per] >> ((i + k) % per * Bits)) & mask;
    const uint8_t* src = data + (i + k) / per;
    const int bytes = (n - k) / per;
    for (int j = 0; j < bytes; ++j)
      for (int t = 0; t < per; ++t) q[k + per * j + t] = (src[j] >> (t * Bits)) & mask;
    k += per * bytes;
    for (int t = 0; k < n; ++k, ++t) q[k] = (src[bytes] >> (t * Bits)) & mask;
  }
}

template <int Bits>
void unpack_cpu(const uint8_t* data, const uint8_t* offsets, const float* b, const float* gamma, float* x_hat,
                float* r, bool* mask, float d, const Layout& l) {
  at::parallel_for(0, l.numel, kGrain, [&](int64_t e0, int64_t e1) {
    for_each_channel_run(l, e0, e1, [&](int64_t lo, int64_t hi, int64_t c) {
      const int s = offsets[c];
      const float bc = b ? b[c] : 0.0f, g = gamma ? gamma[c] : 0.0f;
      constexpr int kBlock = 256;
      uint8_t q[kBlock];
      for (int64_t i = lo; i < hi; i += kBlock) {
        const int n = static_cast<int>(std::min<int64_t>(kBlock, hi - i));
        read_codes<Bits>(data, i, n, q);
        if (x_hat)
          for (int k = 0; k < n; ++k) x_hat[i + k] = decode(q[k], s, d) - bc;
        if (r)
          for (int k = 0; k < n; ++k) {
            const float t = g * decode(q[k], s, d);
            r[i + k] = t > 0.0f ? t : 0.0f;
          }
        if (mask)
          for (int k = 0; k < n; ++k) mask[i + k] = codec::mask(q[k], s);
      }
    });
  });
}

// The BatchNorm-and-ReLU backward from the codes, one channel at a time: its planes are
// read twice (the sums, then g_x) while they are still in cache. The sums are taken in
// eight float lanes per block of 256 elements (so that they vectorise) and carried in double.
template <int Bits>
void bn_relu_backward_cpu(const uint8_t* data, const uint8_t* offsets, const float* b, const float* g,
                          const float* invstd, const float* grad, float* g_x, float* g_g, float* g_beta,
                          int64_t batch, float d, const Layout& l) {
  const double m = static_cast<double>(batch * l.plane);
  at::parallel_for(0, l.channels, 1, [&](int64_t c0, int64_t c1) {
    constexpr int kBlock = 256, kLanes = 8;
    uint8_t q[kBlock];
    alignas(32) float ga[kBlock], xh[kBlock];
    for (int64_t c = c0; c < c1; ++c) {
      const int s = offsets[c];
      const float bc = b[c];
      // g_a and x_hat' of elements [i, i + n) of plane `base` into ga and xh, zero-padded to a
      // multiple of kLanes.
      auto decode_block = [&](int64_t base, int64_t i, int n) {
        read_codes<Bits>(data, base + i, n, q);
        const float* __restrict gr = grad + base + i;
        float* __restrict a = ga;
        float* __restrict x = xh;
        for (int k = 0; k < n; ++k) {
          const float gv = gr[k];  // read unconditionally, so that the select vectorises
          a[k] = codec::mask(q[k], s) ? gv : 0.0f;  // a select: a masked NaN gradient is 0
          x[k] = decode(q[k], s, d) - bc;
        }
        for (int k = n; k % kLanes; ++k) a[k] = x[k] = 0.0f;
      };
      // Calls f(first element, length) for each block of the channel, decoded into ga and xh.
      auto for_each_block = [&](auto&& f) {
        for (int64_t n = 0; n < batch; ++n) {
          const int64_t base = (n * l.channels + c) * l.plane;
          for (int64_t i = 0; i < l.plane; i += kBlock) {
            const int len = static_cast<int>(std::min<int64_t>(kBlock, l.plane - i));
            decode_block(base, i, len);
            f(base + i, len);
          }
        }
      };
      double sum_a = 0.0, sum_ax = 0.0;
      for_each_block([&](int64_t, int len) {
        float la[kLanes] = {}, lax[kLanes] = {};
        for (int k = 0; k < len; k += kLanes)
          for (int t = 0; t < kLanes; ++t) {
            la[t] += ga[k + t];
            lax[t] += ga[k + t] * xh[k + t];
          }
        for (int t = 0; t < kLanes; ++t) sum_a += la[t], sum_ax += lax[t];
      });
      g_beta[c] = static_cast<float>(sum_a);
      g_g[c] = static_cast<float>(sum_ax);
      const float mean_a = static_cast<float>(sum_a / m), mean_ax = static_cast<float>(sum_ax / m);
      const float scale = g[c] * invstd[c];
      for_each_block([&](int64_t first, int len) {
        float* out = g_x + first;
        for (int k = 0; k < len; ++k) out[k] = scale * (ga[k] - mean_a - xh[k] * mean_ax);
      });
    }
  });
}

// Calls f(std::integral_constant<int, K>{}) for the codes' bit width: one instantiation per K.
template <typename F>
void with_bits(int bits, F&& f) {
  switch (bits) {
    case 8: return f(std::integral_constant<int, 8>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 2: return f(std::integral_constant<int, 2>{});
  }
  TORCH_CHECK(false, "blpa codec: bits must be 8, 4 or 2, got ", bits);
}

void check_channel_vector(const at::Tensor& t, const char* name, const at::Tensor& like, int64_t channels) {
  TORCH_CHECK(t.defined(), "blpa codec: ", name, " is required for the requested output");
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.numel() == channels && t.is_contiguous(),
              "blpa codec: ", name, " must be a contiguous float32 vector of ", channels, " channels, got ",
              t.scalar_type(), " ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), "blpa codec: ", name, " is on ", t.device(), " but the codes are on ",
              like.device());
}

#if !BLPA_WITH_CUDA
[[noreturn]] void no_cuda() {
  TORCH_CHECK(false, "blpa was built without its CUDA kernels (BLPA_CUDA=OFF or no matching toolkit); "
                     "rebuild with -DBLPA_CUDA=ON to use CUDA tensors");
}
#endif

}  // namespace

int64_t packed_bytes(int64_t numel, int bits) { return (numel * bits + 7) / 8; }

void check_format(const CodeFormat& f) {
  TORCH_CHECK(f.bits == 8 || f.bits == 4 || f.bits == 2, "blpa codec: bits must be 8, 4 or 2, got ", f.bits);
  TORCH_CHECK(std::isfinite(f.window) && f.window > 0.0f, "blpa codec: the window must be a positive width (in units "
              "of x_hat), got ", f.window);
  TORCH_CHECK(std::isfinite(f.lift), "blpa codec: the window's lift must be finite, got ", f.lift);
}

CodeFormat default_format(int bits) {
  switch (bits) {
    case 8: return {8, 12.0f, 0.0f};
    case 4: return {4, 6.0f, 1.0f};
    case 2: return {2, 4.0f, 1.0f};
  }
  TORCH_CHECK(false, "blpa codec: bits must be 8, 4 or 2, got ", bits);
}

int64_t Codes::numel() const {
  int64_t n = 1;
  for (auto s : sizes) n *= s;
  return n;
}

int64_t Codes::bytes() const {
  return (data.defined() ? data.nbytes() : 0) + (offsets.defined() ? offsets.nbytes() : 0);
}

namespace {

// offsets: the channels' offsets of b when the caller has them (channel_coding), else undefined.
Codes pack_impl(const at::Tensor& v, const at::Tensor& b, const CodeFormat& f, const at::Tensor& divisor,
                float* relu, const at::Tensor& offsets = {}) {
  check_format(f);
  TORCH_CHECK(v.scalar_type() == at::kFloat, "blpa codec: pack expects float32 activations, got ",
              v.scalar_type());
  TORCH_CHECK(v.is_contiguous(), "blpa codec: pack expects a contiguous NCHW tensor (call .contiguous(); "
                                 "channels-last is not supported)");
  const Layout l = layout_of(v.sizes());
  check_channel_vector(b, "b = beta / gamma", v, l.channels);
  if (divisor.defined()) check_channel_vector(divisor, "divisor", v, l.channels);

  Codes out;
  out.format = f;
  out.sizes = v.sizes().vec();
  const auto u8 = v.options().dtype(at::kByte);
  out.data = at::empty({packed_bytes(l.numel, f.bits)}, u8);
  const bool have_offsets = offsets.defined();
  if (have_offsets) {
    TORCH_CHECK(offsets.scalar_type() == at::kByte && offsets.dim() == 1 && offsets.numel() == l.channels &&
                    offsets.is_contiguous() && offsets.device() == v.device(),
                "blpa codec: the offsets must be a contiguous uint8 vector of ", l.channels, " channels on ",
                v.device());
    out.offsets = offsets;
  } else {
    out.offsets = at::empty({l.channels}, u8);
  }
  if (l.numel == 0) return out;

  if (v.is_cuda()) {
#if BLPA_WITH_CUDA
    const int dev = v.get_device();
    if (!have_offsets)
      cuda::compute_offsets({b.data_ptr<float>(), out.offsets.data_ptr<uint8_t>(), l.channels, f.bits, f.window,
                             f.lift, dev});
    cuda::pack({v.data_ptr<float>(), divisor.defined() ? divisor.data_ptr<float>() : nullptr,
                out.offsets.data_ptr<uint8_t>(), out.data.data_ptr<uint8_t>(), l.numel, l.plane, l.channels, f.bits,
                f.window, dev, relu});
    return out;
#else
    no_cuda();
#endif
  }
  TORCH_CHECK(v.is_cpu(), "blpa codec: unsupported device ", v.device());
  const float* bp = b.data_ptr<float>();
  uint8_t* op = out.offsets.data_ptr<uint8_t>();
  const float d = f.bin_width();
  if (!have_offsets)
    for (int64_t c = 0; c < l.channels; ++c) op[c] = static_cast<uint8_t>(codec::offset(bp[c], f.bits, d, f.lift));
  std::vector<float> ones;
  const float* div = divisor.defined() ? divisor.data_ptr<float>() : (ones.assign(l.channels, 1.0f), ones.data());
  with_bits(f.bits, [&](auto k) {
    pack_cpu<decltype(k)::value>(v.data_ptr<float>(), div, op, out.data.data_ptr<uint8_t>(), relu, d, l);
  });
  return out;
}

}  // namespace

Codes pack(const at::Tensor& v, const at::Tensor& b, const CodeFormat& f, const at::Tensor& divisor) {
  return pack_impl(v, b, f, divisor, nullptr);
}

Codes pack_relu_(at::Tensor& a, const at::Tensor& b, const CodeFormat& f, const at::Tensor& divisor) {
  return pack_impl(a, b, f, divisor, a.scalar_type() == at::kFloat ? a.data_ptr<float>() : nullptr);
}

Codes pack(const at::Tensor& v, const ChannelCoding& cc, const at::Tensor& divisor) {
  return pack_impl(v, cc.b, cc.format, divisor, nullptr, cc.offsets);
}

Codes pack_relu_(at::Tensor& a, const ChannelCoding& cc) {
  return pack_impl(a, cc.b, cc.format, cc.g, a.scalar_type() == at::kFloat ? a.data_ptr<float>() : nullptr,
                   cc.offsets);
}

ChannelCoding channel_coding(const at::Tensor& gamma, const at::Tensor& beta, float gamma_min, const CodeFormat& f,
                             bool centred) {
  check_format(f);
  TORCH_CHECK(gamma.dim() == 1, "blpa codec: gamma must be a vector, got ", gamma.sizes());
  const int64_t channels = gamma.numel();
  check_channel_vector(gamma, "gamma", gamma, channels);
  check_channel_vector(beta, "beta", gamma, channels);
  const auto f32 = gamma.options().requires_grad(false);
  ChannelCoding cc{at::empty({channels}, f32), at::empty({channels}, f32), at::empty({channels}, f32.dtype(at::kByte)),
                   f};
  const float* gp = gamma.data_ptr<float>();
  const float* bp = beta.data_ptr<float>();
  if (gamma.is_cuda()) {
#if BLPA_WITH_CUDA
    cuda::channel_coding({gp, bp, gamma_min, centred, cc.g.data_ptr<float>(), cc.b.data_ptr<float>(),
                          cc.offsets.data_ptr<uint8_t>(), channels, f.bits, f.window, f.lift, gamma.get_device()});
    return cc;
#else
    no_cuda();
#endif
  }
  TORCH_CHECK(gamma.is_cpu(), "blpa codec: unsupported device ", gamma.device());
  float* g = cc.g.data_ptr<float>();
  float* b = cc.b.data_ptr<float>();
  uint8_t* s = cc.offsets.data_ptr<uint8_t>();
  const float d = f.bin_width();
  for (int64_t c = 0; c < channels; ++c) {
    g[c] = gp[c] < gamma_min ? gamma_min : gp[c];  // NaN stays NaN, as clamp_min
    b[c] = centred ? bp[c] / g[c] : 0.0f;
    s[c] = static_cast<uint8_t>(codec::offset(b[c], f.bits, d, f.lift));
  }
  return cc;
}

namespace {

void unpack_into(const Codes& codes, const at::Tensor& b, const at::Tensor& gamma, float* x_hat, float* r,
                 bool* mask) {
  const CodeFormat& f = codes.format;
  check_format(f);
  const Layout l = layout_of(codes.sizes);
  TORCH_CHECK(codes.data.numel() == packed_bytes(l.numel, f.bits) && codes.offsets.numel() == l.channels,
              "blpa codec: codes are inconsistent with their shape");
  TORCH_CHECK(codes.offsets.device() == codes.data.device(), "blpa codec: the codes' offsets are on ",
              codes.offsets.device(), " but their data on ", codes.data.device());
  if (l.numel == 0) return;
  const float* bp = x_hat ? b.data_ptr<float>() : nullptr;
  const float* gp = r ? gamma.data_ptr<float>() : nullptr;
  const uint8_t* data = codes.data.data_ptr<uint8_t>();
  const uint8_t* offsets = codes.offsets.data_ptr<uint8_t>();
  if (codes.data.is_cuda()) {
#if BLPA_WITH_CUDA
    cuda::unpack({data, offsets, bp, gp, x_hat, r, mask, l.numel, l.plane, l.channels, f.bits, f.window,
                  codes.data.get_device()});
    return;
#else
    no_cuda();
#endif
  }
  const float d = f.bin_width();
  with_bits(f.bits, [&](auto k) { unpack_cpu<decltype(k)::value>(data, offsets, bp, gp, x_hat, r, mask, d, l); });
}

}  // namespace

Unpacked unpack(const Codes& codes, const at::Tensor& b, const at::Tensor& gamma, unsigned outputs,
                at::ScalarType dtype) {
  TORCH_CHECK(codes.defined(), "blpa codec: unpack of empty codes");
  TORCH_CHECK(dtype == at::kFloat && !codes.channels_last, "blpa codec: unpack to ", dtype,
              (codes.channels_last ? " channels-last" : ""), " is not supported yet");
  const auto f32 = codes.data.options().dtype(at::kFloat);
  Unpacked u;
  if (outputs & kXhat) {
    check_channel_vector(b, "b = beta / gamma", codes.data, codes.channels());
    u.x_hat = at::empty(codes.sizes, f32);
  }
  if (outputs & kRelu) {
    check_channel_vector(gamma, "gamma", codes.data, codes.channels());
    u.r = at::empty(codes.sizes, f32);
  }
  if (outputs & kMask) u.mask = at::empty(codes.sizes, f32.dtype(at::kBool));
  unpack_into(codes, b, gamma, u.x_hat.defined() ? u.x_hat.data_ptr<float>() : nullptr,
              u.r.defined() ? u.r.data_ptr<float>() : nullptr, u.mask.defined() ? u.mask.data_ptr<bool>() : nullptr);
  return u;
}

namespace {

void check_grad(const Codes& codes, const at::Tensor& grad) {
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.is_contiguous() && grad.sizes().vec() == codes.sizes &&
                  grad.device() == codes.data.device(),
              "blpa codec: the gradient must be contiguous float32 of shape ", at::IntArrayRef(codes.sizes),
              " on ", codes.data.device(), ", got ", grad.scalar_type(), " ", grad.sizes(), " on ", grad.device());
}

}  // namespace

BnGrads bn_relu_backward(const Codes& codes, const at::Tensor& b, const at::Tensor& g, const at::Tensor& invstd,
                         at::Tensor g_r, bool in_place, std::optional<float> gamma_min) {
  TORCH_CHECK(codes.defined(), "blpa codec: bn_relu_backward of empty codes");
  const CodeFormat& f = codes.format;
  check_format(f);
  check_grad(codes, g_r);
  const Layout l = layout_of(codes.sizes);
  TORCH_CHECK(codes.data.numel() == packed_bytes(l.numel, f.bits) && codes.offsets.numel() == l.channels,
              "blpa codec: codes are inconsistent with their shape");
  check_channel_vector(b, "b = beta / gamma", codes.data, l.channels);
  check_channel_vector(g, "gamma", codes.data, l.channels);
  check_channel_vector(invstd, "invstd", codes.data, l.channels);
  TORCH_CHECK(codes.offsets.device() == codes.data.device(), "blpa codec: the codes' offsets are on ",
              codes.offsets.device(), " but their data on ", codes.data.device());
  const auto f32 = g_r.options();
  BnGrads out{in_place ? g_r : at::empty_like(g_r), at::empty({l.channels}, f32), at::empty({l.channels}, f32)};
  const int64_t batch = codes.sizes[0];
  const uint8_t* data = codes.data.data_ptr<uint8_t>();
  const uint8_t* offsets = codes.offsets.data_ptr<uint8_t>();
  if (l.numel == 0) {
    out.g_g.zero_();
    out.g_beta.zero_();
    return out;
  }
  if (g_r.is_cuda()) {
#if BLPA_WITH_CUDA
    cuda::BnBackwardParams p{data, offsets, b.data_ptr<float>(), g.data_ptr<float>(), invstd.data_ptr<float>(),
                             g_r.data_ptr<float>(), out.g_x.data_ptr<float>(), nullptr, out.g_g.data_ptr<float>(),
                             out.g_beta.data_ptr<float>(), gamma_min.has_value(), gamma_min.value_or(0.0f), batch,
                             l.channels, l.plane, f.bits, f.window, g_r.get_device()};
    const at::Tensor partials = at::empty({cuda::bn_workspace(p)}, f32.dtype(at::kDouble));
    p.partials = partials.data_ptr<double>();
    cuda::bn_relu_backward(p);
    return out;
#else
    no_cuda();
#endif
  }
  const float d = f.bin_width();
  with_bits(f.bits, [&](auto k) {
    bn_relu_backward_cpu<decltype(k)::value>(data, offsets, b.data_ptr<float>(), g.data_ptr<float>(),
                                             invstd.data_ptr<float>(), g_r.data_ptr<float>(), out.g_x.data_ptr<float>(),
                                             out.g_g.data_ptr<float>(), out.g_beta.data_ptr<float>(), batch, d, l);
  });
  if (gamma_min) {  // the clamp's gradient, as threshold_backward: none where g <= gamma_min
    const float* gp = g.data_ptr<float>();
    float* gg = out.g_g.data_ptr<float>();
    for (int64_t c = 0; c < l.channels; ++c)
      if (gp[c] <= *gamma_min) gg[c] = 0.0f;
  }
  return out;
}

at::Tensor code_values(const Codes& codes) {
  const int64_t n = codes.numel();
  const int bits = codes.format.bits;
  if (bits == 8) return codes.data.view(codes.sizes);
  std::vector<at::Tensor> fields;  // element j of each byte, j = 0 .. 8 / bits - 1
  for (int shift = 0; shift < 8; shift += bits)
    fields.push_back(at::bitwise_and(at::bitwise_right_shift(codes.data, shift), (1 << bits) - 1));
  return at::stack(fields, 1).flatten().narrow(0, 0, n).view(codes.sizes);
}

}  // namespace blpa
