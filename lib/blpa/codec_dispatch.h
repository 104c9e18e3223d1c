// The one dispatch of the codec's loops and kernels on the codes' bit width, the element
// type and the layout, shared by the CPU path (lib/codec.cpp) and the CUDA kernels
// (cuda/codec_kernels.cuh): one instantiation per (K, T, NHWC). Host code only.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <type_traits>

namespace blpa::codec {

// Calls f(std::integral_constant<int, K>{}) for the codes' bit width K = 8, 4 or 2.
template <typename F>
void with_bits(int bits, F&& f) {
  switch (bits) {
    case 8: return f(std::integral_constant<int, 8>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 2: return f(std::integral_constant<int, 2>{});
  }
  TORCH_CHECK(false, "blpa codec: bits must be 8, 4 or 2, got ", bits);
}

// Calls f(std::integral_constant<int, K>{}, T{}, std::bool_constant<NHWC>{}), T float or
// c10::BFloat16.
template <typename F>
void dispatch(int bits, bool bf16, bool nhwc, F&& f) {
  with_bits(bits, [&](auto k) {
    auto by_layout = [&](auto t) {
      if (nhwc) return f(k, t, std::true_type{});
      return f(k, t, std::false_type{});
    };
    if (bf16) return by_layout(c10::BFloat16{});
    return by_layout(float{});
  });
}

}  // namespace blpa::codec
