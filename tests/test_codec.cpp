// The codec against an independent scalar reference written here from the formula of
// DESIGN.md 1.3 (it does not call blpa/codec_math.h), and CPU against CUDA.
#include <blpa/codec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "test_support.h"

namespace {

constexpr float kGuard = 1e-6f;

int ref_offset(float b, int bits) {
  const int B = 1 << bits;
  const float d = 6.0f / static_cast<float>(B);
  double s = B / 2 - std::floor(static_cast<double>(b / d));
  s = std::max(1.0, std::min(s, static_cast<double>(B - 1)));
  return static_cast<int>(s);
}

int ref_code(float v, int s, int bits) {
  const int B = 1 << bits;
  const float d = 6.0f / static_cast<float>(B);
  double c = std::floor(static_cast<double>((v - kGuard) / d)) + s;
  c = std::max(0.0, std::min(c, static_cast<double>(B - 1)));
  return static_cast<int>(c);
}

// Reference codes of a float tensor, channel on dim 1.
std::vector<int> ref_codes(const torch::Tensor& v, const torch::Tensor& b, int bits) {
  auto vc = v.contiguous();
  const int64_t C = v.size(1), plane = v.numel() / (v.size(0) * C);
  std::vector<int> out(v.numel());
  const float* pv = vc.data_ptr<float>();
  const float* pb = b.data_ptr<float>();
  for (int64_t i = 0; i < v.numel(); ++i) out[i] = ref_code(pv[i], ref_offset(pb[(i / plane) % C], bits), bits);
  return out;
}

std::vector<int> lib_codes(const blpa::Codes& codes) {
  auto t = blpa::code_values(codes).to(torch::kCPU).to(torch::kInt).contiguous();
  return std::vector<int>(t.data_ptr<int>(), t.data_ptr<int>() + t.numel());
}

int64_t count_mismatch(const std::vector<int>& a, const std::vector<int>& b) {
  REQUIRE(a.size() == b.size());
  int64_t n = 0;
  for (size_t i = 0; i < a.size(); ++i) n += a[i] != b[i];
  return n;
}

// Values that exercise every case of the formula: bin edges in the window (plain and
// guard-shifted), zeros, tiny values around the guard, and values far outside the window.
torch::Tensor edge_values(int bits) {
  const int B = 1 << bits;
  const float d = 6.0f / B;
  std::vector<float> x;
  for (int k = -2 * B; k <= 2 * B; ++k) {
    x.push_back(k * d);
    x.push_back(k * d + kGuard);
    x.push_back(std::nextafter(k * d + kGuard, 1e9f));
    x.push_back(std::nextafter(k * d + kGuard, -1e9f));
  }
  for (float t : {0.0f, -0.0f, 1e-7f, -1e-7f, 1e-6f, -1e-6f, 2e-6f, -2e-6f, 1e-5f, -1e-5f, 1e-30f, -1e-30f})
    x.push_back(t);
  for (float t : {3.0f, -3.0f, 3.1f, -3.1f, 10.0f, -10.0f, 1e3f, -1e3f, 1e30f, -1e30f, 3e38f, -3e38f}) x.push_back(t);
  return torch::tensor(x);
}

// The offsets cases: s pinned at 1 (b >= 3), pinned at B - 1 (b very negative), and between.
torch::Tensor offset_cases(int bits) {
  const float d = 6.0f / (1 << bits);
  return torch::tensor({0.0f, 0.3f, -0.3f, d, -d, 2.5f * d, -2.5f * d, 2.9f, 3.0f, 50.0f, -2.9f, -3.0f, -50.0f,
                        1e20f, -1e20f});
}

}  // namespace

TEST_CASE("codec: codes equal the scalar reference on random inputs", "[codec]") {
  torch::manual_seed(1);
  for (int bits : {8, 4}) {
    for (auto shape : std::vector<std::vector<int64_t>>{{4, 16, 8, 8}, {3, 5, 7, 9}, {2, 1, 33, 17}, {5, 2048}}) {
      CAPTURE(bits, shape);
      auto b = torch::randn({shape[1]}) * 2;
      std::vector<int64_t> per_channel(shape.size(), 1);
      per_channel[1] = shape[1];
      auto v = torch::randn(shape) * 1.5 + b.view(per_channel);
      auto codes = blpa::pack(v, b, bits);
      CHECK(count_mismatch(lib_codes(codes), ref_codes(v, b, bits)) == 0);
    }
  }
}

TEST_CASE("codec: edges, zeros, guard values and clamping equal the reference for every offset", "[codec]") {
  for (int bits : {8, 4}) {
    auto x = edge_values(bits);
    auto b = offset_cases(bits);
    const int64_t C = b.numel();
    // Each channel holds every edge value: shape 1 x C x n.
    auto v = x.view({1, 1, -1}).expand({1, C, x.numel()}).contiguous();
    auto codes = blpa::pack(v, b, bits);
    CAPTURE(bits);
    CHECK(count_mismatch(lib_codes(codes), ref_codes(v, b, bits)) == 0);

    auto offsets = codes.offsets.to(torch::kInt);
    for (int64_t c = 0; c < C; ++c) CHECK(offsets[c].item<int>() == ref_offset(b[c].item<float>(), bits));
    CHECK(offsets[0].item<int>() == (1 << bits) / 2);          // b = 0: window centred on 0
    CHECK(offsets[9].item<int>() == 1);                        // b = 50: pinned at 1
    CHECK(offsets[12].item<int>() == (1 << bits) - 1);         // b = -50: pinned at B - 1
  }
}

TEST_CASE("codec: the mask is exact for |v| above the guard", "[codec]") {
  torch::manual_seed(2);
  for (int bits : {8, 4}) {
    auto b = torch::cat({offset_cases(bits), torch::randn({17}) * 3});
    const int64_t C = b.numel();
    auto v = torch::randn({8, C, 5, 5}) * 4 + b.view({1, C, 1, 1});
    v.index_put_({v.abs() <= 2 * kGuard}, 1.0f);  // keep clear of the guard band
    auto codes = blpa::pack(v, b, bits);
    auto u = blpa::unpack(codes, b, torch::ones({C}), blpa::kMask | blpa::kRelu);
    CAPTURE(bits);
    CHECK(torch::equal(u.mask, v > 0));
    CHECK(torch::equal(u.r > 0, v > 0));  // r' = max(gamma v', 0) carries the same mask
  }
}

TEST_CASE("codec: dequantised values are within half a bin inside the window", "[codec]") {
  torch::manual_seed(3);
  for (int bits : {8, 4}) {
    const float d = 6.0f / (1 << bits);
    auto b = torch::randn({6});
    auto x_hat = torch::randn({16, 6, 9, 9});
    auto v = x_hat + b.view({1, 6, 1, 1});
    auto codes = blpa::pack(v, b, bits);
    auto u = blpa::unpack(codes, b, torch::Tensor(), blpa::kXhat);
    auto codes_i = blpa::code_values(codes).to(torch::kInt);
    auto inside = (codes_i > 0) & (codes_i < (1 << bits) - 1);  // not clamped
    auto err = (u.x_hat - x_hat).abs().masked_select(inside);
    CAPTURE(bits);
    REQUIRE(inside.sum().item<int64_t>() > v.numel() / 2);
    CHECK(err.max().item<float>() <= d / 2 + 2 * kGuard);
  }
}

TEST_CASE("codec: unpack outputs follow from the codes", "[codec]") {
  torch::manual_seed(4);
  for (int bits : {8, 4}) {
    const float d = 6.0f / (1 << bits);
    auto b = torch::randn({3});
    auto gamma = torch::rand({3}) + 0.5;
    auto v = torch::randn({2, 3, 7, 5}) + b.view({1, 3, 1, 1});
    auto codes = blpa::pack(v, b, bits);
    auto u = blpa::unpack(codes, b, gamma, blpa::kXhat | blpa::kRelu | blpa::kMask);
    auto q = blpa::code_values(codes).to(torch::kFloat);
    auto s = codes.offsets.to(torch::kFloat).view({1, 3, 1, 1});
    auto v_prime = (q - s + 0.5f) * d;
    CHECK(torch::equal(u.x_hat, v_prime - b.view({1, 3, 1, 1})));
    CHECK(torch::equal(u.r, torch::clamp_min(gamma.view({1, 3, 1, 1}) * v_prime, 0)));
    CHECK(torch::equal(u.mask, q >= s));

    auto g = torch::randn(v.sizes());
    auto expect = torch::where(u.mask, g, torch::zeros_like(g));
    auto g2 = g.clone();
    blpa::apply_mask_(codes, g);
    CHECK(torch::equal(g, expect));
    // The fused form used by the unit's backward: the same two results in one pass.
    CHECK(torch::equal(blpa::unpack_x_hat_masking_(codes, b, g2), u.x_hat));
    CHECK(torch::equal(g2, expect));

    // Re-encoding the bin centres gives the same codes back.
    auto again = blpa::pack(v_prime.contiguous(), b, bits);
    CHECK(torch::equal(again.data, codes.data));
  }
}

TEST_CASE("codec: packing with a divisor equals packing the divided tensor", "[codec]") {
  torch::manual_seed(7);
  for (int bits : {8, 4}) {
    auto gamma = torch::rand({5}) * 2 + 1e-3;
    auto a = torch::randn({3, 5, 7, 9}) * 2;
    auto b = torch::randn({5});
    auto fused = blpa::pack(a, b, bits, gamma);
    auto divided = blpa::pack((a / gamma.view({1, 5, 1, 1})).contiguous(), b, bits);
    CAPTURE(bits);
    CHECK(torch::equal(fused.data, divided.data));
    CHECK(torch::equal(fused.offsets, divided.offsets));
  }
}

TEST_CASE("codec: storage is exactly ceil(n*K/8) bytes plus one offset per channel", "[codec]") {
  for (int bits : {8, 4}) {
    for (auto shape : std::vector<std::vector<int64_t>>{{1, 1, 1, 1}, {1, 3, 5, 7}, {2, 1, 3, 3}, {3, 4096}, {0, 3, 2, 2}}) {
      auto v = torch::randn(shape);
      const int64_t C = shape[1];
      auto codes = blpa::pack(v, torch::zeros({C}), bits);
      const int64_t n = v.numel();
      CAPTURE(bits, shape);
      CHECK(codes.data.numel() == (n * bits + 7) / 8);
      CHECK(codes.data.numel() == blpa::packed_bytes(n, bits));
      CHECK(codes.offsets.numel() == C);
      CHECK(codes.bytes() == (n * bits + 7) / 8 + C);
      if (n > 0) CHECK(count_mismatch(lib_codes(codes), ref_codes(v, torch::zeros({C}), bits)) == 0);
      if (bits == 4 && n % 2 == 1) CHECK((codes.data[-1].item<uint8_t>() >> 4) == 0);  // padding nibble
    }
  }
}

TEST_CASE("codec: channel runs that start mid-byte and span threads stay correct", "[codec]") {
  // Odd planes put channel boundaries at odd elements (a byte shared by two channels) and
  // the tensor is large enough to be split across threads.
  torch::manual_seed(5);
  for (int bits : {8, 4}) {
    auto b = torch::randn({3}) * 2;
    auto v = torch::randn({2, 3, 333, 333}) * 2;
    auto codes = blpa::pack(v, b, bits);
    CAPTURE(bits);
    CHECK(count_mismatch(lib_codes(codes), ref_codes(v, b, bits)) == 0);
  }
}

TEST_CASE("codec: non-finite inputs have the documented codes", "[codec]") {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  for (int bits : {8, 4}) {
    const int top = (1 << bits) - 1;
    auto v = torch::tensor({nan, inf, -inf, nan}).view({1, 1, 4});
    auto codes = blpa::pack(v, torch::zeros({1}), bits);
    auto q = lib_codes(codes);
    CHECK(q == std::vector<int>{0, top, 0, 0});
    auto nan_b = blpa::pack(torch::zeros({1, 2, 1}), torch::tensor({nan, 0.0f}), bits);
    CHECK(nan_b.offsets[0].item<int>() == 1);
  }
}

TEST_CASE("codec: bad arguments are refused with a clear message", "[codec]") {
  auto v = torch::randn({2, 3, 4, 4});
  CHECK_THROWS_WITH(blpa::pack(v, torch::zeros({3}), 3), Catch::Contains("bits must be 8 or 4"));
  CHECK_THROWS_WITH(blpa::pack(v, torch::zeros({4}), 8), Catch::Contains("vector of 3 channels"));
  CHECK_THROWS_WITH(blpa::pack(v.transpose(2, 3), torch::zeros({3}), 8), Catch::Contains("contiguous"));
  CHECK_THROWS_WITH(blpa::pack(v.to(torch::kDouble), torch::zeros({3}), 8), Catch::Contains("float32"));
  CHECK_THROWS_WITH(blpa::pack(torch::randn({5}), torch::zeros({5}), 8), Catch::Contains("at least 2 dims"));
}

TEST_CASE("CUDA: codec output is bit-identical to the CPU path", "[codec][cuda]") {
  BLPA_REQUIRE_CUDA();
  torch::manual_seed(6);
  for (int bits : {8, 4}) {
    for (auto shape : std::vector<std::vector<int64_t>>{{4, 16, 8, 8}, {3, 5, 7, 9}, {2, 3, 333, 333}, {7, 4099}}) {
      CAPTURE(bits, shape);
      auto b = torch::cat({offset_cases(bits), torch::randn({shape[1]}) * 2}).narrow(0, 0, shape[1]).contiguous();
      auto v = torch::randn(shape) * 3;
      auto flat = v.view(-1);
      auto e = edge_values(bits);
      const int64_t k = std::min<int64_t>(e.numel(), flat.numel());
      flat.narrow(0, 0, k).copy_(e.narrow(0, 0, k));
      auto gamma = torch::rand({shape[1]}) + 0.1;

      auto cpu = blpa::pack(v, b, bits);
      auto gpu = blpa::pack(v.cuda(), b.cuda(), bits);
      CHECK(torch::equal(cpu.offsets, gpu.offsets.cpu()));
      CHECK(torch::equal(cpu.data, gpu.data.cpu()));
      CHECK(torch::equal(blpa::pack(v, b, bits, gamma).data, blpa::pack(v.cuda(), b.cuda(), bits, gamma.cuda()).data.cpu()));

      const unsigned all = blpa::kXhat | blpa::kRelu | blpa::kMask;
      auto uc = blpa::unpack(cpu, b, gamma, all);
      auto ug = blpa::unpack(gpu, b.cuda(), gamma.cuda(), all);
      CHECK(torch::equal(uc.x_hat, ug.x_hat.cpu()));
      CHECK(torch::equal(uc.r, ug.r.cpu()));
      CHECK(torch::equal(uc.mask, ug.mask.cpu()));

      auto g = torch::randn(shape);
      auto gg = g.cuda();
      auto g2 = g.clone(), gg2 = gg.clone();
      blpa::apply_mask_(cpu, g);
      blpa::apply_mask_(gpu, gg);
      CHECK(torch::equal(g, gg.cpu()));
      CHECK(torch::equal(blpa::unpack_x_hat_masking_(gpu, b.cuda(), gg2).cpu(), uc.x_hat));
      CHECK(torch::equal(gg2.cpu(), g));

      // A misaligned (but contiguous) input takes the scalar path and must agree too.
      auto buf = torch::randn({v.numel() + 1}, torch::kCUDA);
      auto shifted = buf.narrow(0, 1, v.numel()).view(shape);
      shifted.copy_(v.cuda());
      auto gpu2 = blpa::pack(shifted, b.cuda(), bits);
      CHECK(torch::equal(cpu.data, gpu2.data.cpu()));
    }
  }
}
