// The codec against an independent scalar reference written here from the formula of
// DESIGN.md 1.3 for a window of any width (it does not call blpa/codec_math.h), and CPU
// against CUDA, for every bit width and several windows.
#include <blpa/codec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "emulated_kernels.h"
#include "test_support.h"

namespace {

constexpr float kGuard = 1e-6f;

using blpa::CodeFormat;
using blpa::pack;

// K bits over a window of `window` units: B = 2^K bins of width d = window / B.
int bins(const CodeFormat& f) { return 1 << f.bits; }
float width(const CodeFormat& f) { return f.window / static_cast<float>(bins(f)); }

// Every K with the paper's quantiser (window 6, lift 0), a narrower and a wider window, one
// whose bins are no power-of-two fraction of a unit, and lifted and lowered windows.
std::vector<CodeFormat> formats() {
  std::vector<CodeFormat> out;
  for (int bits : {8, 4, 2})
    for (auto [window, lift] : std::vector<std::pair<float, float>>{
             {6.0f, 0.0f}, {2.5f, 0.0f}, {12.0f, 0.0f}, {7.3f, 0.0f}, {6.0f, 1.0f}, {4.0f, -0.7f}, {12.0f, 2.5f}})
      out.push_back({bits, window, lift});
  return out;
}

int ref_offset(float b, const CodeFormat& f) {
  const int B = bins(f);
  double s = B / 2 - std::floor(static_cast<double>((b + f.lift) / width(f)));
  s = std::max(1.0, std::min(s, static_cast<double>(B - 1)));
  return static_cast<int>(s);
}

int ref_code(float v, int s, const CodeFormat& f) {
  double c = std::floor(static_cast<double>((v - kGuard) / width(f))) + s;
  c = std::max(0.0, std::min(c, static_cast<double>(bins(f) - 1)));
  return static_cast<int>(c);
}

// Reference codes of a float tensor, channel on dim 1.
std::vector<int> ref_codes(const torch::Tensor& v, const torch::Tensor& b, const CodeFormat& f) {
  auto vc = v.contiguous();
  const int64_t C = v.size(1), plane = v.numel() / (v.size(0) * C);
  std::vector<int> out(v.numel());
  const float* pv = vc.data_ptr<float>();
  const float* pb = b.data_ptr<float>();
  for (int64_t i = 0; i < v.numel(); ++i) out[i] = ref_code(pv[i], ref_offset(pb[(i / plane) % C], f), f);
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
torch::Tensor edge_values(const CodeFormat& f) {
  const int B = bins(f);
  const float d = width(f), w = f.window;
  std::vector<float> x;
  for (int k = -2 * B; k <= 2 * B; ++k) {
    x.push_back(k * d);
    x.push_back(k * d + kGuard);
    x.push_back(std::nextafter(k * d + kGuard, 1e9f));
    x.push_back(std::nextafter(k * d + kGuard, -1e9f));
  }
  for (float t : {0.0f, -0.0f, 1e-7f, -1e-7f, 1e-6f, -1e-6f, 2e-6f, -2e-6f, 1e-5f, -1e-5f, 1e-30f, -1e-30f})
    x.push_back(t);
  for (float t : {w / 2, -w / 2, w / 2 + 0.1f, -w / 2 - 0.1f, w, -w, 1e3f, -1e3f, 1e30f, -1e30f, 3e38f, -3e38f})
    x.push_back(t);
  return torch::tensor(x);
}

// The offsets cases: s pinned at 1 (b >= window / 2), pinned at B - 1 (b very negative),
// between, and b = -lift (the window centred on 0).
torch::Tensor offset_cases(const CodeFormat& f) {
  const float d = width(f), h = f.window / 2;
  return torch::tensor({0.0f, 0.3f, -0.3f, d, -d, 2.5f * d, -2.5f * d, h - 0.1f, h, 50.0f, 0.1f - h, -h, -50.0f,
                        1e20f, -1e20f, -f.lift});
}


// The unit's BatchNorm-and-ReLU backward from the codes, composed from unpack's outputs and
// the formula of docs/method.md, in double.
struct BnRef {
  torch::Tensor g_x, g_g, g_beta;
  torch::Tensor abs_g, abs_beta;  // sum |g_a x_hat'| and sum |g_a|: the scale of each sum's rounding
  // sum |g_a| (|x_hat' + b_c| + |b_c|): the scale of the GPU's g_g, which sums g_a u and g_a
  // apart and makes x_hat' = u d + d/2 - b_c of their sums (bn_sum_ax), so it rounds the two
  // terms before they cancel. The reference rounds them too, in unpack's float x_hat'. Where
  // x_hat' is near 0 (b_c near a decoded value) this is many times abs_g: on an H200 six
  // channels of 3 elements in 70,000 (3 x 70000, 8-bit and lifted 4-bit codes) missed 1e-6 of
  // abs_g.
  torch::Tensor terms_g;
};

BnRef bn_reference(const blpa::Codes& codes, const torch::Tensor& b, const torch::Tensor& g,
                   const torch::Tensor& invstd, const torch::Tensor& g_r) {
  auto u = blpa::unpack(codes, b, {}, blpa::kXhat | blpa::kMask);
  std::vector<int64_t> dims, shape(g_r.dim(), 1);
  for (int64_t d = 0; d < g_r.dim(); ++d)
    if (d != 1) dims.push_back(d);
  shape[1] = -1;
  auto ga = torch::where(u.mask, g_r, torch::zeros_like(g_r)).to(torch::kDouble);
  auto xh = u.x_hat.to(torch::kDouble);
  const double m = static_cast<double>(g_r.numel() / g_r.size(1));
  BnRef r;
  r.g_beta = ga.sum(dims);
  r.g_g = (ga * xh).sum(dims);
  r.abs_beta = ga.abs().sum(dims);
  r.abs_g = (ga * xh).abs().sum(dims);
  auto bd = b.to(torch::kDouble).view(shape);
  r.terms_g = (ga.abs() * ((xh + bd).abs() + bd.abs())).sum(dims);
  auto scale = (g * invstd).to(torch::kDouble).view(shape);
  r.g_x = scale * (ga - (r.g_beta / m).view(shape) - xh * (r.g_g / m).view(shape));
  return r;
}

bool close(const torch::Tensor& got, const torch::Tensor& want, double tol) {
  return torch::allclose(got.to(torch::kDouble).cpu(), want.to(torch::kDouble).cpu(), tol, tol);
}

// A per-channel sum of M float terms, to 1e-6 of the sum of their magnitudes: a sum that
// cancels to near 0 keeps the absolute rounding of its terms.
bool close_sum(const torch::Tensor& got, const torch::Tensor& want, const torch::Tensor& magnitude) {
  auto err = (got.to(torch::kDouble).cpu() - want.to(torch::kDouble).cpu()).abs();
  return (err <= magnitude.to(torch::kDouble).cpu() * 1e-6 + 1e-7).all().item<bool>();
}

// Shapes for the unit's backward: planes that are a multiple of 4 (the CUDA vector path) and
// not, odd planes whose 4-bit codes start mid-byte, N x C, a single channel.
std::vector<std::vector<int64_t>> bn_shapes() {
  return {{4, 16, 8, 8}, {3, 5, 7, 9}, {2, 3, 33, 33}, {7, 4099}, {1, 1, 5, 5}, {64, 8, 3, 3}};
}
}  // namespace

TEST_CASE("codec: codes equal the scalar reference on random inputs", "[codec]") {
  torch::manual_seed(1);
  for (const CodeFormat& f : formats()) {
    for (auto shape : std::vector<std::vector<int64_t>>{{4, 16, 8, 8}, {3, 5, 7, 9}, {2, 1, 33, 17}, {5, 2048}}) {
      CAPTURE(f.bits, f.window, f.lift, shape);
      auto b = torch::randn({shape[1]}) * 2;
      std::vector<int64_t> per_channel(shape.size(), 1);
      per_channel[1] = shape[1];
      auto v = torch::randn(shape) * 1.5 + b.view(per_channel);
      auto codes = pack(v, b, f);
      CHECK(codes.format.bits == f.bits);
      CHECK(codes.format.window == f.window);
      CHECK(codes.format.lift == f.lift);
      CHECK(count_mismatch(lib_codes(codes), ref_codes(v, b, f)) == 0);
    }
  }
}

TEST_CASE("codec: edges, zeros, guard values and clamping equal the reference for every offset", "[codec]") {
  for (const CodeFormat& f : formats()) {
    auto x = edge_values(f);
    auto b = offset_cases(f);
    const int64_t C = b.numel();
    // Each channel holds every edge value: shape 1 x C x n.
    auto v = x.view({1, 1, -1}).expand({1, C, x.numel()}).contiguous();
    auto codes = pack(v, b, f);
    CAPTURE(f.bits, f.window, f.lift);
    CHECK(count_mismatch(lib_codes(codes), ref_codes(v, b, f)) == 0);

    auto offsets = codes.offsets.to(torch::kInt);
    for (int64_t c = 0; c < C; ++c) CHECK(offsets[c].item<int>() == ref_offset(b[c].item<float>(), f));
    if (f.lift == 0.0f) CHECK(offsets[0].item<int>() == bins(f) / 2);  // b = 0: window centred on 0
    CHECK(offsets[15].item<int>() == bins(f) / 2);   // b = -lift: likewise
    CHECK(offsets[9].item<int>() == 1);              // b = 50: pinned at 1
    CHECK(offsets[12].item<int>() == bins(f) - 1);  // b = -50: pinned at B - 1
  }
}

TEST_CASE("codec: the mask is v >= guard, for every K and window, offset and input", "[codec]") {
  // code >= s exactly when a / gamma - guard >= 0: the sign of a, up to the guard band
  // (0, 1e-6 gamma] where the mask is off and the ReLU passes. Random values, the edge
  // values, and the channels' offsets pinned at both ends; through the divisor, as the unit
  // packs a / gamma.
  torch::manual_seed(2);
  for (const CodeFormat& f : formats()) {
    CAPTURE(f.bits, f.window, f.lift);
    auto b = torch::cat({offset_cases(f), torch::randn({17}) * 3});
    const int64_t C = b.numel();
    auto gamma = torch::rand({C}) * 2 + 0.01;
    auto a = torch::randn({8, C, 5, 5}) * 4 + (b * gamma).view({1, C, 1, 1});
    auto e = edge_values(f);
    a.view(-1).narrow(0, 0, e.numel()).copy_(e);
    auto v = a / gamma.view({1, C, 1, 1});  // as pack divides: one IEEE division per element
    auto codes = pack(a, b, f, gamma);
    auto u = blpa::unpack(codes, b, gamma, blpa::kMask | blpa::kRelu);
    CHECK(torch::equal(u.mask, v >= kGuard));
    auto clear = (v.abs() > 2 * kGuard) & v.isfinite();
    CHECK(torch::equal(u.mask.masked_select(clear), (a > 0).masked_select(clear)));
    CHECK(torch::equal((u.r > 0).masked_select(clear), (a > 0).masked_select(clear)));  // r' carries the mask
  }
}

TEST_CASE("codec: each value lies in its code's bin, and inside the window within half a bin of v'", "[codec]") {
  torch::manual_seed(3);
  for (const CodeFormat& f : formats()) {
    CAPTURE(f.bits, f.window, f.lift);
    const double d = width(f);
    auto b = torch::randn({6});
    auto x_hat = torch::randn({16, 6, 9, 9});
    auto v = (x_hat + b.view({1, 6, 1, 1})).contiguous();
    auto codes = pack(v, b, f);
    auto u = blpa::unpack(codes, b, torch::Tensor(), blpa::kXhat);
    auto q = blpa::code_values(codes).to(torch::kDouble);
    auto s = codes.offsets.to(torch::kDouble).view({1, 6, 1, 1});
    // Bin c - s holds [(c - s) d, (c - s + 1) d) + guard; the end bins are open outwards.
    auto lo = (q - s) * d + kGuard, hi = (q - s + 1) * d + kGuard;
    auto vd = v.to(torch::kDouble);
    const double tol = 1e-6;  // (v - guard) / d is rounded once, in float
    auto first = q.eq(0), last = q.eq(bins(f) - 1);
    CHECK(((vd >= lo - tol) | first).all().item<bool>());
    CHECK(((vd < hi + tol) | last).all().item<bool>());
    // v' is the centre of the bin: within d / 2 of v unless v was clamped.
    auto inside = (vd >= lo - tol) & (vd < hi + tol);
    CHECK(inside.sum().item<int64_t>() > v.numel() / 2);
    auto err = (u.x_hat.to(torch::kDouble) - x_hat.to(torch::kDouble)).abs().masked_select(inside);
    CHECK(err.max().item<double>() <= d / 2 + 1e-5);
  }
}

TEST_CASE("codec: unpack outputs follow from the codes", "[codec]") {
  torch::manual_seed(4);
  for (const CodeFormat& f : formats()) {
    CAPTURE(f.bits, f.window, f.lift);
    auto b = torch::randn({3});
    auto gamma = torch::rand({3}) + 0.5;
    auto v = torch::randn({2, 3, 7, 5}) + b.view({1, 3, 1, 1});
    auto codes = pack(v, b, f);
    auto u = blpa::unpack(codes, b, gamma, blpa::kXhat | blpa::kRelu | blpa::kMask);
    auto q = blpa::code_values(codes).to(torch::kFloat);
    auto s = codes.offsets.to(torch::kFloat).view({1, 3, 1, 1});
    auto v_prime = (q - s + 0.5f) * width(f);
    CHECK(torch::equal(u.x_hat, v_prime - b.view({1, 3, 1, 1})));
    CHECK(torch::equal(u.r, torch::clamp_min(gamma.view({1, 3, 1, 1}) * v_prime, 0)));
    CHECK(torch::equal(u.mask, q >= s));

    // Re-encoding the bin centres gives the same codes back.
    auto again = pack(v_prime.contiguous(), b, f);
    CHECK(torch::equal(again.data, codes.data));
  }
}

TEST_CASE("codec: packing with a divisor equals packing the divided tensor", "[codec]") {
  torch::manual_seed(7);
  for (const CodeFormat& f : formats()) {
    auto gamma = torch::rand({5}) * 2 + 1e-3;
    auto a = torch::randn({3, 5, 7, 9}) * 2;
    auto b = torch::randn({5});
    auto fused = pack(a, b, f, gamma);
    auto divided = pack((a / gamma.view({1, 5, 1, 1})).contiguous(), b, f);
    CAPTURE(f.bits, f.window, f.lift);
    CHECK(torch::equal(fused.data, divided.data));
    CHECK(torch::equal(fused.offsets, divided.offsets));
  }
}

TEST_CASE("codec: storage is exactly ceil(n*K/8) bytes plus one offset per channel, and round-trips at odd sizes",
          "[codec]") {
  for (const CodeFormat& f : formats()) {
    for (auto shape : std::vector<std::vector<int64_t>>{{1, 1, 1, 1}, {1, 1, 1, 2}, {1, 1, 1, 3}, {1, 1, 1, 5},
                                                        {1, 3, 5, 7}, {2, 1, 3, 3}, {1, 7, 1, 1}, {3, 5, 1, 3},
                                                        {3, 4096}, {3, 4097}, {0, 3, 2, 2}}) {
      auto b = torch::randn({shape[1]});
      auto v = torch::randn(shape) * 2;
      const int64_t C = shape[1];
      auto codes = pack(v, b, f);
      const int64_t n = v.numel();
      CAPTURE(f.bits, f.window, f.lift, shape);
      CHECK(codes.data.numel() == (n * f.bits + 7) / 8);
      CHECK(codes.data.numel() == blpa::packed_bytes(n, f.bits));
      CHECK(codes.offsets.numel() == C);
      CHECK(codes.bytes() == (n * f.bits + 7) / 8 + C);
      if (n == 0) {  // its offsets are b's, as a batch of one's (they were left unset)
        auto one = shape;
        one[0] = 1;
        CHECK(torch::equal(codes.offsets, pack(torch::zeros(one), b, f).offsets));
        continue;
      }
      CHECK(count_mismatch(lib_codes(codes), ref_codes(v, b, f)) == 0);
      const int used = static_cast<int>(n * f.bits % 8);  // bits of the last byte that hold codes
      if (used) CHECK((codes.data[-1].item<uint8_t>() >> used) == 0);  // the padding is zero
      // The round trip: decoding and encoding again gives the same bytes.
      auto u = blpa::unpack(codes, b, {}, blpa::kXhat);
      CHECK(torch::equal(pack((u.x_hat + b.view(shape.size() == 2 ? std::vector<int64_t>{1, C}
                                                                  : std::vector<int64_t>{1, C, 1, 1}))
                                  .contiguous(),
                              b, f)
                             .data,
                         codes.data));
    }
  }
}

TEST_CASE("codec: channel runs that start mid-byte and span threads stay correct", "[codec]") {
  // Odd planes put channel boundaries inside bytes (shared by two channels) and the tensor
  // is large enough to be split across threads.
  torch::manual_seed(5);
  for (const CodeFormat& f : formats()) {
    for (int64_t plane : {333, 334, 335}) {
      auto b = torch::randn({3}) * 2;
      auto v = torch::randn({2, 3, plane, 333}) * 2;
      auto codes = pack(v, b, f);
      CAPTURE(f.bits, f.window, f.lift, plane);
      CHECK(count_mismatch(lib_codes(codes), ref_codes(v, b, f)) == 0);
      auto u = blpa::unpack(codes, b, torch::ones({3}), blpa::kMask);
      CHECK(torch::equal(u.mask, v >= kGuard));
    }
  }
}

TEST_CASE("codec: non-finite inputs have the documented codes", "[codec]") {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  for (const CodeFormat& f : formats()) {
    const int top = bins(f) - 1;
    auto v = torch::tensor({nan, inf, -inf, nan}).view({1, 1, 4});
    auto codes = pack(v, torch::zeros({1}), f);
    auto q = lib_codes(codes);
    CHECK(q == std::vector<int>{0, top, 0, 0});
    auto nan_b = pack(torch::zeros({1, 2, 1}), torch::tensor({nan, 0.0f}), f);
    CHECK(nan_b.offsets[0].item<int>() == 1);
  }
}

TEST_CASE("codec: pack_relu_ packs like pack and leaves relu(a) in place", "[codec]") {
  torch::manual_seed(12);
  for (const CodeFormat& f : formats()) {
    for (auto shape : std::vector<std::vector<int64_t>>{{3, 5, 7, 9}, {2, 4, 8, 8}, {5, 3}}) {
      CAPTURE(f.bits, f.window, f.lift, shape);
      auto a = torch::randn(shape) * 2;
      auto flat = a.view(-1);
      flat[0] = std::nanf("");
      flat[1] = -0.0f;
      flat[2] = std::numeric_limits<float>::infinity();
      flat[3] = -std::numeric_limits<float>::infinity();
      auto b = torch::randn({shape[1]}), gamma = torch::rand({shape[1]}) + 0.1;
      auto r = a.clone();
      auto codes = blpa::pack_relu_(r, b, f, gamma);
      CHECK(codes.format.window == f.window);
      CHECK(torch::equal(codes.data, pack(a, b, f, gamma).data));
      CHECK(torch::equal(codes.offsets, pack(a, b, f, gamma).offsets));
      CHECK(torch::allclose(r, torch::relu(a), 0, 0, /*equal_nan=*/true));  // NaN stays NaN, as with relu
    }
  }
}

namespace {

// FNV-1a of a tensor's bytes.
uint64_t fnv1a(uint64_t h, const torch::Tensor& t) {
  auto c = t.contiguous();
  const auto* p = static_cast<const unsigned char*>(c.data_ptr());
  for (size_t i = 0; i < c.nbytes(); ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

}  // namespace

TEST_CASE("codec: the paper's window gives the codes of a5b148d (before windows existed), bit for bit", "[codec]") {
  // A fixed input (no random generator): values across several windows' widths around each
  // channel's b, exact multiples of the paper's bin width 6/256 every 13th element, offsets
  // from the middle to both pins, packed through a divisor. The hashes are of the packed
  // bytes and offsets, and of x_hat' and r' as decoded, printed by commit a5b148d's
  // blpa::pack (bits 8 and 4, window 6).
  const int64_t N = 2, C = 5, H = 3, W = 7;
  const float bs[C] = {0.0f, 0.7f, -1.3f, 2.9f, -4.2f};
  const float gs[C] = {1.0f, 0.5f, 1.7f, 0.9f, 3.0f};
  auto v = torch::empty({N, C, H, W});
  auto b = torch::empty({C}), g = torch::empty({C});
  for (int c = 0; c < C; ++c) b[c] = bs[c], g[c] = gs[c];
  float* pv = v.data_ptr<float>();
  for (int64_t i = 0; i < v.numel(); ++i) {
    pv[i] = bs[(i / (H * W)) % C] + static_cast<float>((i * 7919) % 1000 - 500) / 125.0f;
    if (i % 13 == 0) pv[i] = static_cast<float>(i % 40 - 20) * (6.0f / 256.0f);
  }
  struct Pinned {
    int bits;
    uint64_t codes, decoded;
    std::vector<int> offsets, first;
  };
  const Pinned pinned[] = {
      {8, 0x302cce6539806eacull, 0xf52c554a0583e12bull, {128, 99, 184, 5, 255},
       {107, 255, 243, 215, 188, 160, 132, 105, 77, 49, 22, 0, 0, 120, 252, 225, 197, 169, 142, 114, 87, 21, 0, 0}},
      {4, 0x3cdaa56741e28eeeull, 0x6e815859cea4cc70ull, {8, 7, 12, 1, 15},
       {6, 15, 15, 13, 11, 10, 8, 6, 4, 3, 1, 0, 0, 7, 15, 14, 12, 10, 8, 7, 5, 2, 0, 0}},
  };
  for (const Pinned& p : pinned) {
    CAPTURE(p.bits);
    auto codes = blpa::pack(v, b, CodeFormat{p.bits, blpa::kPaperWindow, 0.0f}, g);
    auto u = blpa::unpack(codes, b, g, blpa::kXhat | blpa::kRelu);
    const uint64_t basis = 1469598103934665603ull;
    CHECK(fnv1a(fnv1a(basis, codes.data), codes.offsets) == p.codes);
    CHECK(fnv1a(fnv1a(basis, u.x_hat), u.r) == p.decoded);
    CHECK(std::vector<int>(codes.offsets.data_ptr<uint8_t>(), codes.offsets.data_ptr<uint8_t>() + C) == p.offsets);
    auto q = lib_codes(codes);
    CHECK(std::vector<int>(q.begin(), q.begin() + 24) == p.first);
  }
}

TEST_CASE("codec: default formats and the format's checks", "[codec]") {
  const CodeFormat paper;
  CHECK(paper.bits == 8);
  CHECK(paper.window == 6.0f);
  CHECK(paper.lift == 0.0f);
  for (int bits : {8, 4, 2}) {
    CHECK(blpa::default_format(bits).bits == bits);
    CHECK(blpa::default_format(bits).window > 0);
  }
  CHECK_THROWS_WITH(blpa::default_format(3), Catch::Contains("bits must be 8, 4 or 2"));
  torch::manual_seed(18);
  auto v = torch::randn({2, 3, 4, 4}) * 3;
  const float inf = std::numeric_limits<float>::infinity();
  // 1e-40: bins of a subnormal width, whose GPU decode would differ from the CPU's in a bit.
  for (float w : {0.0f, -1.0f, std::nanf(""), inf, 1e-40f})
    CHECK_THROWS_WITH(blpa::pack(v, torch::zeros({3}), {4, w}), Catch::Contains("window must be a positive width"));
  CHECK_NOTHROW(blpa::pack(v, torch::zeros({3}), {4, blpa::kMinWindow}));
  for (float l : {std::nanf(""), inf, -inf})
    CHECK_THROWS_WITH(blpa::pack(v, torch::zeros({3}), {4, 6.0f, l}), Catch::Contains("lift must be finite"));
  CHECK_THROWS_WITH(blpa::channel_coding(torch::ones({3}), torch::ones({3}), 1e-8f, {4, 0.0f}, true),
                    Catch::Contains("window must be a positive width"));
  // Codes carry their window: unpacking reads it from them.
  auto b = torch::zeros({3});
  auto wide = blpa::pack(v, b, {4, 12.0f}), narrow = blpa::pack(v, b, {4, 3.0f});
  auto uw = blpa::unpack(wide, b, {}, blpa::kXhat), un = blpa::unpack(narrow, b, {}, blpa::kXhat);
  CHECK(uw.x_hat.abs().max().item<float>() > 3.0f);   // values reach past the narrow window
  CHECK(un.x_hat.abs().max().item<float>() <= 1.5f);  // clamped at its edges' bin centres
}

namespace {

// Gammas for channel_coding: at and below the clamp, zero, negative, NaN, infinite, just
// above the clamp, then ordinary.
torch::Tensor awkward_gammas(int64_t c) {
  auto g = torch::rand({c}) + 0.05;
  const float special[] = {1e-8f, 5e-9f, 0.0f, -0.5f, std::nanf(""), std::numeric_limits<float>::infinity(), 2e-8f};
  for (int64_t i = 0; i < std::min<int64_t>(c, 7); ++i) g[i] = special[i];
  return g;
}

}  // namespace

TEST_CASE("codec: channel_coding equals clamp_min, beta / g and pack's offsets", "[codec]") {
  torch::manual_seed(15);
  for (const CodeFormat& f : formats()) {
    CAPTURE(f.bits, f.window, f.lift);
    const int64_t c = 11;
    auto gamma = awkward_gammas(c), beta = torch::randn({c}) * 2;
    auto cc = blpa::channel_coding(gamma, beta, 1e-8f, f, /*centred=*/true);
    CHECK(cc.format.lift == f.lift);
    auto g = gamma.clamp_min(1e-8);
    CHECK(torch::allclose(cc.g, g, 0, 0, /*equal_nan=*/true));
    CHECK(torch::allclose(cc.b, beta / g, 0, 0, /*equal_nan=*/true));
    auto v = torch::randn({3, c, 5, 5});
    CHECK(torch::equal(cc.offsets, pack(v, cc.b, f).offsets));
    // pack with the coding: the same codes, and the coding's offsets are the codes' own.
    auto with = blpa::pack(v, cc);
    CHECK(with.format.window == f.window);
    CHECK(torch::equal(with.data, pack(v, cc.b, f).data));
    CHECK(with.offsets.data_ptr() == cc.offsets.data_ptr());
    auto a = v.clone(), a2 = v.clone();
    auto relu_codes = blpa::pack_relu_(a, cc);
    CHECK(torch::equal(relu_codes.data, blpa::pack_relu_(a2, cc.b, f, cc.g).data));
    CHECK(torch::equal(a, a2));
    // naive: the window is centred on 0.
    auto naive = blpa::channel_coding(gamma, beta, 1e-8f, f, /*centred=*/false);
    CHECK(torch::equal(naive.b, torch::zeros({c})));
    CHECK(torch::equal(naive.offsets, pack(v, torch::zeros({c}), f).offsets));
  }
  SECTION("bad arguments are refused") {
    CHECK_THROWS_WITH(blpa::channel_coding(torch::ones({3}), torch::ones({4}), 1e-8f, {8}, true),
                      Catch::Contains("vector of 3 channels"));
    CHECK_THROWS_WITH(blpa::channel_coding(torch::ones({3}), torch::ones({3}), 1e-8f, {5}, true),
                      Catch::Contains("bits must be 8, 4 or 2"));
    auto cc = blpa::channel_coding(torch::ones({3}), torch::ones({3}), 1e-8f, {8}, true);
    CHECK_THROWS_WITH(blpa::pack(torch::randn({2, 4, 3, 3}), cc), Catch::Contains("vector of 4 channels"));
  }
}

TEST_CASE("codec: bn_relu_backward with gamma_min passes no gradient to clamped or NaN gammas", "[codec]") {
  torch::manual_seed(16);
  const int64_t c = 9;
  auto gamma = awkward_gammas(c), beta = torch::randn({c}), invstd = torch::rand({c}) + 0.5;
  auto cc = blpa::channel_coding(gamma, beta, 1e-8f, {4}, true);
  auto codes = blpa::pack(torch::randn({4, c, 6, 6}), cc);
  auto g_r = torch::randn({4, c, 6, 6});
  auto free = blpa::bn_relu_backward(codes, cc.b, cc.g, invstd, g_r, false);
  auto masked = blpa::bn_relu_backward(codes, cc.b, cc.g, invstd, g_r, false, 1e-8f);
  // As threshold_backward(g_g, gamma, 1e-8f), the exact mode's clamp gradient: none where
  // gamma <= 1e-8f; a NaN gamma passes its NaN gradient.
  CHECK(torch::allclose(masked.g_g, at::threshold_backward(free.g_g, gamma, 1e-8f), 0, 0, /*equal_nan=*/true));
  CHECK(masked.g_g.narrow(0, 0, 4).eq(0).all().item<bool>());  // 1e-8f, 5e-9, 0, -0.5
  CHECK(std::isnan(masked.g_g[4].item<float>()));
  CHECK(masked.g_g.narrow(0, 5, c - 5).ne(0).all().item<bool>());
  CHECK(torch::equal(masked.g_beta, free.g_beta));
  CHECK(torch::allclose(masked.g_x, free.g_x, 0, 0, /*equal_nan=*/true));
}

namespace {

// The channel values bn_relu_backward takes, drawn in this order: b = beta / gamma, the
// clamped gamma g (at least 0.2) and 1/sigma (at least 0.5).
struct BnChannels {
  torch::Tensor b, g, invstd;
};
BnChannels draw_bn_channels(int64_t c) {
  BnChannels p;
  p.b = torch::randn({c});
  p.g = torch::rand({c}) + 0.2;
  p.invstd = torch::rand({c}) + 0.5;
  return p;
}

}  // namespace

TEST_CASE("codec: bn_relu_backward equals the BatchNorm backward of the masked gradient and x_hat'", "[codec]") {
  torch::manual_seed(13);
  for (const CodeFormat& f : formats()) {
    for (const auto& shape : bn_shapes()) {
      CAPTURE(f.bits, f.window, f.lift, shape);
      const int64_t c = shape[1];
      auto [b, g, invstd] = draw_bn_channels(c);
      auto v = torch::randn(shape) + b.view(shape.size() == 2 ? std::vector<int64_t>{1, c} : std::vector<int64_t>{1, c, 1, 1});
      auto codes = pack(v, b, f);
      auto g_r = torch::randn(shape);
      auto ref = bn_reference(codes, b, g, invstd, g_r);

      auto kept = g_r.clone();
      auto out = blpa::bn_relu_backward(codes, b, g, invstd, kept, /*in_place=*/false);
      CHECK(torch::equal(kept, g_r));  // not in place: the caller's gradient is untouched
      CHECK(close(out.g_x, ref.g_x, 1e-5));
      // The CPU loops round as the reference does; the emulated GPU kernels (emulated-cuda/) as the GPU.
      CHECK(close_sum(out.g_g, ref.g_g,
                      blpa::testing::EmulatedKernels::installed_by_environment() ? ref.terms_g : ref.abs_g));
      CHECK(close_sum(out.g_beta, ref.g_beta, ref.abs_beta));

      auto mine = g_r.clone();
      auto in_place = blpa::bn_relu_backward(codes, b, g, invstd, mine, /*in_place=*/true);
      CHECK(in_place.g_x.data_ptr() == mine.data_ptr());
      CHECK(torch::equal(in_place.g_x, out.g_x));
    }
  }
  SECTION("it is LibTorch's BatchNorm backward with x_hat' as input, mean 0 and 1/sigma 1") {
    auto [b, g, invstd] = draw_bn_channels(6);
    auto codes = blpa::pack(torch::randn({5, 6, 7, 7}), b, {4});
    auto g_r = torch::randn({5, 6, 7, 7});
    auto u = blpa::unpack(codes, b, {}, blpa::kXhat | blpa::kMask);
    auto [gx, gg, gb] = at::native_batch_norm_backward(torch::where(u.mask, g_r, torch::zeros_like(g_r)), u.x_hat,
                                                       g * invstd, {}, {}, torch::zeros({6}), torch::ones({6}), true,
                                                       0.0, {true, true, true});
    auto out = blpa::bn_relu_backward(codes, b, g, invstd, g_r, false);
    CHECK(torch::allclose(out.g_x, gx, 1e-5, 1e-5));
    CHECK(torch::allclose(out.g_g, gg, 1e-5, 1e-5));
    CHECK(torch::allclose(out.g_beta, gb, 1e-5, 1e-5));
  }
  SECTION("a NaN gradient where the mask is off contributes nothing, as with threshold_backward") {
    auto b = torch::zeros({2}), g = torch::ones({2}), invstd = torch::ones({2});
    auto v = torch::tensor({-1.0f, 2.0f, -3.0f, 0.5f}).view({1, 2, 2, 1});
    auto codes = blpa::pack(v, b, {8});
    auto g_r = torch::tensor({std::nanf(""), 1.0f, std::nanf(""), 2.0f}).view({1, 2, 2, 1});
    auto out = blpa::bn_relu_backward(codes, b, g, invstd, g_r, false);
    CHECK(torch::isfinite(out.g_x).all().item<bool>());
    CHECK(out.g_beta[0].item<float>() == 1.0f);
    CHECK(out.g_beta[1].item<float>() == 2.0f);
  }
  SECTION("bad arguments are refused") {
    auto b = torch::zeros({3});
    auto codes = blpa::pack(torch::randn({2, 3, 4, 4}), b, {8});
    CHECK_THROWS_WITH(blpa::bn_relu_backward(codes, b, b, b, torch::randn({2, 3, 4, 5}), false),
                      Catch::Contains("gradient must be float32 or bfloat16 of shape"));
    CHECK_THROWS_WITH(blpa::bn_relu_backward(codes, b, torch::ones({4}), b, torch::randn({2, 3, 4, 4}), false),
                      Catch::Contains("vector of 3 channels"));
  }
}

namespace {

// One format per bit width (the paper's window and a lifted one), for the dtype x layout tests.
std::vector<CodeFormat> layout_formats() {
  return {{8, 6.0f, 0.0f}, {4, 6.0f, 1.0f}, {2, 4.0f, 1.0f}, {4, 7.3f, 0.0f}};
}

// Shapes for the dtype x layout tests: C odd and numel odd (4-bit and 2-bit rows start inside
// a byte), planes past one block of 256, one large enough to be split across threads (and
// rows across thread ranges), and the shapes whose two layouts are the same memory (C == 1,
// H * W == 1).
std::vector<std::vector<int64_t>> layout_shapes() {
  return {{3, 5, 7, 9}, {2, 3, 33, 33}, {4, 16, 8, 8}, {2, 7, 5, 1}, {4, 9, 61, 61}, {1, 1, 5, 5}, {3, 6, 1, 1}};
}

torch::Tensor nhwc(const torch::Tensor& t) { return t.contiguous(at::MemoryFormat::ChannelsLast); }

// Values that exercise edges and non-finite inputs, at the start of a tensor.
torch::Tensor awkward_values(const std::vector<int64_t>& shape, const CodeFormat& f) {
  auto v = torch::randn(shape) * 2;
  auto flat = v.view(-1);
  auto e = edge_values(f);
  const int64_t k = std::min<int64_t>(e.numel(), flat.numel());
  flat.narrow(0, 0, k).copy_(e.narrow(0, 0, k));
  if (flat.numel() > k + 2) {
    flat[k] = std::nanf("");
    flat[k + 1] = -0.0f;
  }
  return v;
}

}  // namespace

// The codec's in-place writes are autograd's to see, as relu_'s are: a backward that saved the
// tensor refuses to run on its changed values. (Before, pack_relu_ left the version counter
// alone, and a caller's backward silently used max(a, 0) for a.)
TEST_CASE("codec: pack_relu_ and an in-place bn_relu_backward count as in-place writes for autograd", "[codec]") {
  const CodeFormat f{4};
  auto w = torch::randn({2, 3, 4, 4}, torch::requires_grad());
  auto a = w * 2;
  auto loss = (a * a).sum();  // saves a
  const auto before = a._version();
  blpa::pack_relu_(a, torch::zeros({3}), f, torch::ones({3}));
  CHECK(a._version() == before + 1);
  CHECK_THROWS_WITH(loss.backward(), Catch::Contains("modified by an inplace operation"));

  auto cc_a = torch::randn({2, 3, 4, 4}).contiguous(torch::MemoryFormat::ChannelsLast);
  const auto cc = blpa::channel_coding(torch::rand({3}) + 0.5, torch::randn({3}), 1e-8f, f, /*centred=*/true);
  const auto cc_before = cc_a._version();
  blpa::pack_relu_(cc_a, cc);
  CHECK(cc_a._version() == cc_before + 1);

  auto [b, g, invstd] = draw_bn_channels(3);
  const auto codes = pack(torch::randn({2, 3, 4, 4}), b, f);
  auto g_r = torch::randn({2, 3, 4, 4});
  const auto g_before = g_r._version();
  blpa::bn_relu_backward(codes, b, g, invstd, g_r, /*in_place=*/false);
  CHECK(g_r._version() == g_before);  // not written: not counted
  blpa::bn_relu_backward(codes, b, g, invstd, g_r, /*in_place=*/true);
  CHECK(g_r._version() == g_before + 1);
}

TEST_CASE("codec: channels-last tensors give the codes, unpack and ReLU of the same values in NCHW", "[codec]") {
  torch::manual_seed(21);
  for (const CodeFormat& f : layout_formats()) {
    for (const auto& shape : layout_shapes()) {
      CAPTURE(f.bits, f.window, f.lift, shape);
      const int64_t c = shape[1];
      const bool distinct = c > 1 && shape[2] * shape[3] > 1;  // otherwise one memory order
      auto v = awkward_values(shape, f);
      auto b = torch::randn({c}), gamma = torch::rand({c}) + 0.1;
      auto cl = nhwc(v);
      REQUIRE(cl.is_contiguous(at::MemoryFormat::ChannelsLast));

      auto ref = pack(v, b, f, gamma);
      auto codes = pack(cl, b, f, gamma);
      CHECK(codes.channels_last == distinct);
      CHECK(codes.sizes == ref.sizes);
      CHECK(codes.data.numel() == ref.data.numel());
      CHECK(torch::equal(blpa::code_values(codes), blpa::code_values(ref)));
      CHECK(count_mismatch(lib_codes(codes), lib_codes(pack(v / gamma.view({1, c, 1, 1}), b, f))) == 0);
      if (distinct)  // packed in memory order: the NHWC bytes are the codes of the permuted tensor
        CHECK(torch::equal(codes.data, pack(v.permute({0, 2, 3, 1}).contiguous().view({-1, c}), b, f, gamma).data));
      const int used = static_cast<int>(v.numel() * f.bits % 8);
      if (used) CHECK((codes.data[-1].item<uint8_t>() >> used) == 0);  // the padding is zero

      const unsigned all = blpa::kXhat | blpa::kRelu | blpa::kMask;
      auto u = blpa::unpack(codes, b, gamma, all), w = blpa::unpack(ref, b, gamma, all);
      for (auto [got, want] : {std::pair{u.x_hat, w.x_hat}, std::pair{u.r, w.r}, std::pair{u.mask, w.mask}}) {
        CHECK(torch::equal(got, want));
        CHECK(got.is_contiguous(distinct ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
      }

      auto r = cl.clone(at::MemoryFormat::ChannelsLast);
      auto relu_codes = blpa::pack_relu_(r, b, f, gamma);
      CHECK(torch::equal(relu_codes.data, codes.data));
      CHECK(r.is_contiguous(at::MemoryFormat::ChannelsLast));
      CHECK(torch::allclose(r, torch::relu(v), 0, 0, /*equal_nan=*/true));
    }
  }
}

TEST_CASE("codec: bf16 activations give the codes of their values widened to float32", "[codec]") {
  torch::manual_seed(22);
  for (const CodeFormat& f : layout_formats()) {
    for (const auto& shape : layout_shapes()) {
      for (bool cl : {false, true}) {
        CAPTURE(f.bits, f.window, f.lift, shape, cl);
        const int64_t c = shape[1];
        auto v16 = awkward_values(shape, f).to(torch::kBFloat16);
        if (cl) v16 = nhwc(v16);
        auto wide = v16.to(torch::kFloat);  // exact; keeps the layout
        auto b = torch::randn({c}), gamma = torch::rand({c}) + 0.1;
        auto codes = pack(v16, b, f, gamma), ref = pack(wide, b, f, gamma);
        CHECK(codes.channels_last == ref.channels_last);
        CHECK(torch::equal(codes.data, ref.data));
        CHECK(torch::equal(codes.offsets, ref.offsets));

        auto r = v16.clone();
        CHECK(torch::equal(blpa::pack_relu_(r, b, f, gamma).data, ref.data));
        CHECK(r.scalar_type() == torch::kBFloat16);
        CHECK(torch::allclose(r.to(torch::kFloat), torch::relu(wide), 0, 0, /*equal_nan=*/true));

        // bf16 outputs: the float32 outputs rounded once to nearest-even (LibTorch's conversion).
        const unsigned all = blpa::kXhat | blpa::kRelu | blpa::kMask;
        auto u = blpa::unpack(codes, b, gamma, all, torch::kBFloat16), w = blpa::unpack(codes, b, gamma, all);
        CHECK(u.x_hat.scalar_type() == torch::kBFloat16);
        CHECK(u.r.scalar_type() == torch::kBFloat16);
        CHECK(torch::equal(u.x_hat, w.x_hat.to(torch::kBFloat16)));
        CHECK(torch::equal(u.r, w.r.to(torch::kBFloat16)));
        CHECK(torch::equal(u.mask, w.mask));
        CHECK(u.x_hat.strides() == w.x_hat.strides());
      }
    }
  }
}

namespace {

// A case of the unit's fused forward: x, statistics and channels, with every 7th element of
// x placed so that a / g falls on a bin edge of the codes (guard included), where the pack
// decides exactly, and some gammas of 1 (where it would divide by 1) and at the clamp.
struct BnForwardCase {
  torch::Tensor x, mean, var, beta;
  blpa::ChannelCoding cc;
};

BnForwardCase bn_forward_case(const std::vector<int64_t>& shape, const CodeFormat& f, torch::ScalarType dtype,
                              bool cl) {
  const int64_t c = shape[1];
  BnForwardCase k;
  k.mean = torch::randn({c});
  k.var = torch::rand({c}) * 4 + 0.01;
  k.beta = torch::randn({c});
  auto gamma = torch::rand({c}) * 2 + 0.05;
  gamma.narrow(0, 0, (c + 2) / 3).fill_(1.0f);
  if (c > 4) gamma[c - 1] = 1e-9f;
  k.cc = blpa::channel_coding(gamma, k.beta, 1e-8f, f, true);
  auto pc = [&](const torch::Tensor& t) { return t.to(torch::kDouble).view({1, c, 1, 1}); };
  auto invstd = 1.0 / (pc(k.var) + 1e-5).sqrt(), g = pc(k.cc.g);
  auto x = torch::randn(shape, torch::kDouble) * 3 / invstd + pc(k.mean);
  const int half = (1 << f.bits) / 2;
  auto edge = (torch::randint(-half - 2, half + 3, shape, torch::kDouble) * f.bin_width() + 1e-6) * g;
  auto on_edge = (edge - pc(k.beta)) / (g * invstd) + pc(k.mean);  // x whose a is near the edge
  x = torch::where((torch::arange(x.numel()) % 7 == 0).view(shape), on_edge, x);
  k.x = x.to(dtype).contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  return k;
}

// bn_relu_pack's a written out here (not from blpa/codec_math.h): invstd, alpha and shift per
// channel in float, one fused multiply-add per element, rounded once to x's dtype.
torch::Tensor bn_affine_reference(const BnForwardCase& k, float eps, torch::Tensor& invstd) {
  const int64_t c = k.x.size(1), plane = k.x.numel() / (k.x.size(0) * c);
  auto x = k.x.to(torch::kFloat).contiguous();
  auto a = torch::empty_like(x);
  invstd = torch::empty({c});
  std::vector<float> alpha(c), shift(c);
  for (int64_t j = 0; j < c; ++j) {
    const float i = 1.0f / std::sqrt(k.var[j].item<float>() + eps);
    invstd[j] = i;
    alpha[j] = k.cc.g[j].item<float>() * i;
    shift[j] = std::fma(-k.mean[j].item<float>(), alpha[j], k.beta[j].item<float>());
  }
  const float* px = x.data_ptr<float>();
  float* pa = a.data_ptr<float>();
  for (int64_t e = 0; e < x.numel(); ++e) pa[e] = std::fma(px[e], alpha[(e / plane) % c], shift[(e / plane) % c]);
  return a.to(k.x.scalar_type()).contiguous(k.x.suggest_memory_format());
}

// Calls run(k, shape, dtype, channels_last) with a drawn case for each format, shape, dtype
// and layout.
template <typename Run>
void for_each_forward_case(const std::vector<std::vector<int64_t>>& shapes, Run&& run) {
  for (const CodeFormat& f : layout_formats())
    for (const auto& shape : shapes)
      for (auto dtype : {torch::kFloat, torch::kBFloat16})
        for (bool cl : {false, true}) {
          CAPTURE(f.bits, f.window, f.lift, shape, dtype, cl);
          run(bn_forward_case(shape, f, dtype, cl), shape, dtype, cl);
        }
}

// Bits of a float or bf16 tensor, to compare -0 and NaN payloads too.
torch::Tensor bits_of(const torch::Tensor& t) {
  return t.cpu().view(t.scalar_type() == torch::kFloat ? torch::kInt : torch::kShort);
}

}  // namespace

TEST_CASE("codec: bn_relu_pack is the BatchNorm to rounding, and pack_relu_ of its a, in every dtype and layout",
          "[codec]") {
  torch::manual_seed(43);
  auto shapes = layout_shapes();
  // Channels past 2,048, and NHWC rows of 8 channels.
  shapes.push_back({2, 2100, 1, 3});
  shapes.push_back({2, 2056, 1, 2});
  shapes.push_back({4, 64, 9, 9});
  const float eps = 1e-5f;
  for_each_forward_case(shapes, [&](const BnForwardCase& k, const std::vector<int64_t>& shape, torch::ScalarType dtype,
                                    bool cl) {
    auto got = blpa::bn_relu_pack(k.x, k.mean, k.var, eps, k.beta, k.cc);
    torch::Tensor invstd;
    auto a = bn_affine_reference(k, eps, invstd);
    auto r = a.clone(at::MemoryFormat::Preserve);
    auto want = blpa::pack_relu_(r, k.cc);
    CHECK(torch::equal(got.codes.data, want.data));
    CHECK(got.codes.channels_last == want.channels_last);
    CHECK(torch::equal(bits_of(got.r), bits_of(r)));
    CHECK(got.r.strides() == k.x.strides());
    CHECK(torch::equal(got.invstd, invstd));
    // An x one element off alignment (dense, in the same layout) takes the scalar loads.
    auto buf = torch::empty({k.x.numel() + 1}, k.x.options());
    auto shifted = buf.narrow(0, 1, k.x.numel());
    auto moved = cl ? shifted.view({shape[0], shape[2], shape[3], shape[1]}).permute({0, 3, 1, 2})
                    : shifted.view(shape);
    moved.copy_(k.x);
    auto off = blpa::bn_relu_pack(moved, k.mean, k.var, eps, k.beta, k.cc);
    CHECK(torch::equal(off.codes.data, want.data));
    CHECK(torch::equal(bits_of(off.r.contiguous(k.x.suggest_memory_format())), bits_of(r)));
    // LibTorch's BatchNorm with these statistics: (x - mean) invstd g + beta in float,
    // rounded once to the dtype. The two forms differ by their float roundings: a few
    // units (2^-24) of |x alpha| + |shift|, the largest terms either sums; then bf16's
    // rounding may fall either side: one bf16 unit, up to 2^-7 of a.
    auto bn = at::batch_norm(k.x, k.cc.g, k.beta, k.mean, k.var, false, 0.0, eps, false).to(torch::kFloat);
    auto pc = [&](const torch::Tensor& t) { return t.view({1, shape[1], 1, 1}); };
    auto alpha = k.cc.g * invstd, shift = k.beta - k.mean * alpha;
    auto terms = (k.x.to(torch::kFloat) * pc(alpha)).abs() + pc(shift).abs();
    auto err = (a.to(torch::kFloat) - bn).abs();
    const double rounding = dtype == torch::kFloat ? 0.0 : 1.0 / 128;
    CHECK((err <= bn.abs() * rounding + terms * 8 * std::ldexp(1.0, -24)).all().item<bool>());
  });
}

TEST_CASE("codec: bn_relu_pack refuses what it cannot read", "[codec]") {
  const CodeFormat f{4, 6.0f, 1.0f};
  auto cc = blpa::channel_coding(torch::ones({3}), torch::zeros({3}), 1e-8f, f, true);
  auto x = torch::randn({2, 3, 4, 4}), ones = torch::ones({3}), zeros = torch::zeros({3});
  CHECK_THROWS_WITH(blpa::bn_relu_pack(x, torch::zeros({4}), ones, 1e-5f, zeros, cc),
                    Catch::Contains("the batch mean must be a contiguous float32 vector of 3 channels"));
  CHECK_THROWS_WITH(blpa::bn_relu_pack(x, zeros, ones.to(torch::kDouble), 1e-5f, zeros, cc),
                    Catch::Contains("the batch variance must be a contiguous float32 vector"));
  CHECK_THROWS_WITH(blpa::bn_relu_pack(x.to(torch::kDouble), zeros, ones, 1e-5f, zeros, cc),
                    Catch::Contains("must be float32 or bfloat16"));
  CHECK_THROWS_WITH(blpa::bn_relu_pack(x.transpose(2, 3), zeros, ones, 1e-5f, zeros, cc),
                    Catch::Contains("must be contiguous (NCHW)"));
  CHECK_THROWS_WITH(blpa::bn_relu_pack(torch::randn({0, 3, 4, 4}), zeros, ones, 1e-5f, zeros, cc),
                    Catch::Contains("at least one element"));
}

TEST_CASE("codec: tensors one element off alignment give the codes, ReLU and gradients of aligned ones", "[codec]") {
  // A tensor that starts one element into its storage is as valid as any other. The CUDA
  // kernels load and store whole groups only at aligned addresses and take their scalar
  // paths here (the emulated-cuda/ run of this test checks those paths on any machine):
  // the codes and the ReLU are the same bits; the BatchNorm backward's sums, split among
  // threads in another way, agree to their rounding (the CPU loops: the same bits).
  torch::manual_seed(26);
  for (const CodeFormat& f : layout_formats()) {
    for (const auto& shape : layout_shapes()) {
      for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
        for (bool cl : {false, true}) {
          CAPTURE(f.bits, f.window, f.lift, shape, dtype, cl);
          const int64_t c = shape[1], n = c10::multiply_integers(shape);
          // The same values, in a buffer one element longer, starting at its element 1.
          auto off_by_one = [&](const torch::Tensor& t) {
            auto buf = torch::full({n + 1}, std::nanf(""), t.options().memory_format(c10::nullopt));
            auto view = buf.narrow(0, 1, n);
            auto moved = cl ? view.view({shape[0], shape[2], shape[3], c}).permute({0, 3, 1, 2}) : view.view(shape);
            moved.copy_(t);
            return moved;
          };
          auto v = awkward_values(shape, f).to(dtype);
          if (cl) v = nhwc(v);
          auto b = torch::randn({c}), gamma = torch::rand({c}) + 0.1;
          auto aligned = pack(v, b, f, gamma);
          auto shifted = off_by_one(v);
          REQUIRE(shifted.data_ptr() != v.data_ptr());
          CHECK(torch::equal(pack(shifted, b, f, gamma).data, aligned.data));
          auto r = v.clone();
          blpa::pack_relu_(r, b, f, gamma);
          CHECK(torch::equal(blpa::pack_relu_(shifted, b, f, gamma).data, aligned.data));
          CHECK(torch::equal(bits_of(shifted.contiguous(v.suggest_memory_format())), bits_of(r)));

          auto [bb, g, invstd] = draw_bn_channels(c);
          auto g_r = torch::randn(shape).to(dtype);
          if (cl) g_r = nhwc(g_r);
          auto codes = pack(v, bb, f);
          auto want = blpa::bn_relu_backward(codes, bb, g, invstd, g_r, false, 0.5f);
          auto got = blpa::bn_relu_backward(codes, bb, g, invstd, off_by_one(g_r), false, 0.5f);
          const double tol = dtype == torch::kFloat ? 1e-5 : 1.0 / 128;  // bf16: one rounding of g_x
          CHECK(close(got.g_x, want.g_x, tol));
          CHECK(close(got.g_g, want.g_g, 1e-5));
          CHECK(close(got.g_beta, want.g_beta, 1e-5));
          auto in_place = off_by_one(g_r);
          auto again = blpa::bn_relu_backward(codes, bb, g, invstd, in_place, true, 0.5f);
          CHECK(again.g_x.data_ptr() == in_place.data_ptr());
          CHECK(close(again.g_x, want.g_x, tol));
        }
      }
    }
  }
}

TEST_CASE("codec: bn_relu_backward gives the same bits for channels-last and bf16 gradients", "[codec][cpu-loops]") {
  // The sums are taken in the NCHW order in either layout, and a bf16 gradient is widened to
  // float exactly before the same float math: so channels-last gives NCHW's bits, and bf16
  // gives the float32 path's sums of the widened gradient and its g_x rounded once.
  torch::manual_seed(23);
  for (const CodeFormat& f : layout_formats()) {
    for (const auto& shape : layout_shapes()) {
      CAPTURE(f.bits, f.window, f.lift, shape);
      const int64_t c = shape[1];
      auto [b, g, invstd] = draw_bn_channels(c);
      auto v = torch::randn(shape) + b.view({1, c, 1, 1});
      auto g_r = torch::randn(shape).to(torch::kBFloat16).to(torch::kFloat);  // bf16 values
      g_r.view(-1)[0] = std::nanf("");  // masked or not, as in NCHW
      auto ref_codes = pack(v, b, f);
      auto ref = blpa::bn_relu_backward(ref_codes, b, g, invstd, g_r, false, 0.5f);
      auto codes = pack(nhwc(v), b, f);
      for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
        CAPTURE(dtype);
        auto grad = nhwc(g_r).to(dtype).clone();  // its own memory: it is overwritten in place below
        auto kept = grad.clone();
        auto out = blpa::bn_relu_backward(codes, b, g, invstd, grad, false, 0.5f);
        CHECK(torch::allclose(grad, kept, 0, 0, /*equal_nan=*/true));
        CHECK(out.g_x.scalar_type() == dtype);
        CHECK(out.g_g.scalar_type() == torch::kFloat);
        CHECK(out.g_x.strides() == grad.strides());
        CHECK(torch::allclose(out.g_beta, ref.g_beta, 0, 0, /*equal_nan=*/true));
        CHECK(torch::allclose(out.g_g, ref.g_g, 0, 0, /*equal_nan=*/true));
        CHECK(torch::allclose(out.g_x, ref.g_x.to(dtype), 0, 0, /*equal_nan=*/true));
        auto in_place = blpa::bn_relu_backward(codes, b, g, invstd, grad, true, 0.5f);
        CHECK(in_place.g_x.data_ptr() == grad.data_ptr());
        CHECK(torch::allclose(grad, out.g_x, 0, 0, /*equal_nan=*/true));
        if (dtype == torch::kBFloat16) {  // and NCHW bf16 too
          auto nchw = blpa::bn_relu_backward(ref_codes, b, g, invstd, g_r.to(dtype), false, 0.5f);
          CHECK(torch::allclose(nchw.g_x, out.g_x, 0, 0, /*equal_nan=*/true));
          CHECK(torch::allclose(nchw.g_g, out.g_g, 0, 0, /*equal_nan=*/true));
        }
      }
    }
  }
}

TEST_CASE("codec: bn_relu_backward's sums and g_x are pinned bit for bit, for any thread count", "[codec][cpu-loops]") {
  // The hashes were taken at 7d006a9, before the CPU loops were compiled per ISA: the same
  // bits come from the SSE2, AVX2 and AVX-512 copies (BLPA_CODEC_ISA=base|avx2 selects one;
  // the suite was run under each), from either layout and from 1 or 2 threads. The inputs
  // are arithmetic, not drawn: LibTorch's randn gives other values on another CPU.
  const int64_t N = 5, C = 6, H = 23, W = 19;  // planes of 437 elements: two blocks of the sums
  const float bs[C] = {0.0f, 0.7f, -1.3f, 2.9f, -4.2f, 0.25f};
  auto b = torch::tensor(std::vector<float>(bs, bs + C));
  auto g = torch::tensor({1.0f, 0.5f, 1.7f, 0.9f, 3.0f, 0.2f});
  auto invstd = torch::tensor({1.5f, 0.8f, 2.0f, 1.0f, 0.6f, 3.0f});
  auto v = torch::empty({N, C, H, W}), g_r = torch::empty({N, C, H, W});
  float* pv = v.data_ptr<float>();
  float* pg = g_r.data_ptr<float>();
  for (int64_t i = 0; i < v.numel(); ++i) {
    pv[i] = bs[(i / (H * W)) % C] + static_cast<float>((i * 7919) % 1000 - 500) / 125.0f;
    pg[i] = static_cast<float>((i * 104729) % 2001 - 1000) / 317.0f;
  }
  struct Pinned {
    int bits;
    uint64_t hash;
  };
  const int threads = at::get_num_threads();
  const Pinned pinned[] = {{8, 0xc5879cdc2aa1072cull}, {4, 0x1f9c314d4842e1fbull}, {2, 0xaba63189591ec9abull}};
  for (const Pinned& p : pinned) {
    auto codes = pack(v, b, blpa::default_format(p.bits));
    for (int t : {1, 2}) {
      CAPTURE(p.bits, t);
      at::set_num_threads(t);
      auto out = blpa::bn_relu_backward(codes, b, g, invstd, g_r, false);
      const uint64_t h = fnv1a(fnv1a(fnv1a(1469598103934665603ull, out.g_x), out.g_g), out.g_beta);
      CHECK(h == p.hash);
    }
  }
  at::set_num_threads(threads);
}

TEST_CASE("codec: the CPU loops run on two threads and give the bits of one", "[codec][cpu-loops]") {
  const int threads = at::get_num_threads();
  at::set_num_threads(2);
  // 1 when the codec is built without OpenMP: at::parallel_for then runs serially (it did
  // until lib/CMakeLists.txt linked OpenMP, at 2a9d79b and before).
  CHECK(blpa::codec_parallel_threads(8) == 2);
  torch::manual_seed(31);
  const int64_t C = 16;
  auto b = torch::randn({C}), gamma = torch::rand({C}) + 0.1, invstd = torch::rand({C}) + 0.5;
  for (int bits : {8, 4, 2}) {
    for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
      for (bool cl : {false, true}) {
        CAPTURE(bits, dtype, cl);
        // 147,456 elements: several grains of the element loops (32,768), 36 row chunks of
        // the NHWC sums, and channels for both threads of the NCHW ones.
        auto v = (torch::randn({4, C, 48, 48}) * 2).to(dtype), g_r = torch::randn({4, C, 48, 48}).to(dtype);
        if (cl) v = nhwc(v), g_r = nhwc(g_r);
        const unsigned all = blpa::kXhat | blpa::kRelu | blpa::kMask;
        auto run = [&](int t) {
          at::set_num_threads(t);
          auto r = v.clone();
          auto codes = blpa::pack_relu_(r, b, blpa::default_format(bits), gamma);
          auto u = blpa::unpack(codes, b, gamma, all, dtype);
          auto bn = blpa::bn_relu_backward(codes, b, gamma, invstd, g_r, false);
          return std::vector<torch::Tensor>{codes.data, r, u.x_hat, u.r, u.mask, bn.g_x, bn.g_g, bn.g_beta};
        };
        const auto one = run(1), two = run(2);
        for (size_t i = 0; i < one.size(); ++i) {
          CAPTURE(i);
          CHECK(torch::equal(one[i], two[i]));
        }
      }
    }
  }
  at::set_num_threads(threads);
}

TEST_CASE("codec: unsupported dtypes and layouts are refused with a clear message", "[codec]") {
  auto b = torch::zeros({3});
  auto v = torch::randn({2, 3, 4, 5});
  CHECK_THROWS_WITH(pack(v.to(torch::kHalf), b, {8}), Catch::Contains("must be float32 or bfloat16"));
  CHECK_THROWS_WITH(pack(v.transpose(2, 3), b, {8}), Catch::Contains("channels-last contiguous"));
  CHECK_THROWS_WITH(pack(nhwc(v).narrow(3, 0, 4), b, {8}), Catch::Contains("channels-last contiguous"));
  CHECK_THROWS_WITH(pack(torch::randn({2, 3, 4, 5, 6}).permute({0, 1, 4, 2, 3}), b, {8}),
                    Catch::Contains("contiguous (NCHW)"));
  auto ar = v.to(torch::kDouble);
  CHECK_THROWS_WITH(blpa::pack_relu_(ar, b, {8}, torch::ones({3})), Catch::Contains("float32 or bfloat16"));
  auto codes = pack(nhwc(v), b, {4});
  CHECK_THROWS_WITH(blpa::unpack(codes, b, {}, blpa::kXhat, torch::kHalf), Catch::Contains("float32 or bfloat16"));
  CHECK_THROWS_WITH(blpa::bn_relu_backward(codes, b, b, b, torch::randn({2, 3, 4, 5}), false),
                    Catch::Contains("channels-last contiguous (NHWC) like its codes"));
  CHECK_THROWS_WITH(blpa::bn_relu_backward(pack(v, b, {4}), b, b, b, nhwc(torch::randn({2, 3, 4, 5})), false),
                    Catch::Contains("contiguous (NCHW) like its codes"));
  CHECK_THROWS_WITH(blpa::bn_relu_backward(codes, b, b, b, nhwc(torch::randn({2, 3, 4, 5})).to(torch::kHalf), false),
                    Catch::Contains("float32 or bfloat16"));
}

TEST_CASE("codec: bad arguments are refused with a clear message", "[codec]") {
  auto v = torch::randn({2, 3, 4, 4});
  CHECK_THROWS_WITH(blpa::pack(v, torch::zeros({3}), {3}), Catch::Contains("bits must be 8, 4 or 2"));
  CHECK_THROWS_WITH(blpa::pack(v, torch::zeros({4}), {8}), Catch::Contains("vector of 3 channels"));
  CHECK_THROWS_WITH(blpa::pack(v.transpose(2, 3), torch::zeros({3}), {8}), Catch::Contains("contiguous"));
  CHECK_THROWS_WITH(blpa::pack(v.to(torch::kDouble), torch::zeros({3}), {8}), Catch::Contains("float32 or bfloat16"));
  CHECK_THROWS_WITH(blpa::pack(torch::randn({5}), torch::zeros({5}), {8}), Catch::Contains("at least 2 dims"));
}

TEST_CASE("CUDA: codec output is bit-identical to the CPU path", "[codec][cuda]") {
  BLPA_REQUIRE_CUDA();
  torch::manual_seed(6);
  for (const CodeFormat& f : formats()) {
    for (auto shape : std::vector<std::vector<int64_t>>{{4, 16, 8, 8}, {3, 5, 7, 9}, {2, 3, 333, 333}, {7, 4099},
                                                        {1, 1, 1, 5}, {3, 2, 1, 7}}) {
      CAPTURE(f.bits, f.window, f.lift, shape);
      auto b = torch::cat({offset_cases(f), torch::randn({shape[1]}) * 2}).narrow(0, 0, shape[1]).contiguous();
      auto v = torch::randn(shape) * 3;
      auto flat = v.view(-1);
      auto e = edge_values(f);
      const int64_t k = std::min<int64_t>(e.numel(), flat.numel());
      flat.narrow(0, 0, k).copy_(e.narrow(0, 0, k));
      auto gamma = torch::rand({shape[1]}) + 0.1;

      auto cpu = pack(v, b, f);
      auto gpu = pack(v.cuda(), b.cuda(), f);
      CHECK(torch::equal(cpu.offsets, gpu.offsets.cpu()));
      CHECK(torch::equal(cpu.data, gpu.data.cpu()));
      CHECK(torch::equal(pack(v, b, f, gamma).data, pack(v.cuda(), b.cuda(), f, gamma.cuda()).data.cpu()));

      const unsigned all = blpa::kXhat | blpa::kRelu | blpa::kMask;
      auto uc = blpa::unpack(cpu, b, gamma, all);
      auto ug = blpa::unpack(gpu, b.cuda(), gamma.cuda(), all);
      CHECK(torch::equal(uc.x_hat, ug.x_hat.cpu()));
      CHECK(torch::equal(uc.r, ug.r.cpu()));
      CHECK(torch::equal(uc.mask, ug.mask.cpu()));

      // pack_relu_: the same codes, and relu in place.
      auto rc = v.clone(), rg = v.cuda();
      CHECK(torch::equal(blpa::pack_relu_(rg, b.cuda(), f, gamma.cuda()).data.cpu(),
                         blpa::pack_relu_(rc, b, f, gamma).data));
      CHECK(torch::equal(rg.cpu(), rc));

      // A misaligned (but contiguous) input takes the scalar path and must agree too.
      auto buf = torch::randn({v.numel() + 1}, torch::kCUDA);
      auto shifted = buf.narrow(0, 1, v.numel()).view(shape);
      shifted.copy_(v.cuda());
      auto gpu2 = pack(shifted, b.cuda(), f);
      CHECK(torch::equal(cpu.data, gpu2.data.cpu()));
    }
  }
}

TEST_CASE("CUDA: bn_relu_backward matches the CPU path", "[codec][cuda]") {
  BLPA_REQUIRE_CUDA();
  torch::manual_seed(14);
  auto shapes = bn_shapes();
  shapes.push_back({32, 64, 28, 28});  // many blocks per channel
  shapes.push_back({2, 3000, 7, 7});   // many channels, one block each
  shapes.push_back({3, 70000});        // past gridDim.y's 65535: blocks take several channels
  for (const CodeFormat& f : formats()) {
    for (const auto& shape : shapes) {
      CAPTURE(f.bits, f.window, f.lift, shape);
      const int64_t c = shape[1];
      auto [b, g, invstd] = draw_bn_channels(c);
      auto codes = pack(torch::randn(shape), b, f);
      auto g_r = torch::randn(shape);
      auto cpu = blpa::bn_relu_backward(codes, b, g, invstd, g_r, false);
      auto ref = bn_reference(codes, b, g, invstd, g_r);
      blpa::Codes dc{codes.data.cuda(), codes.offsets.cuda(), codes.sizes, f};
      auto gd = g_r.cuda();
      auto gpu = blpa::bn_relu_backward(dc, b.cuda(), g.cuda(), invstd.cuda(), gd, false);
      CHECK(torch::equal(gd.cpu(), g_r));
      CHECK(close(gpu.g_x, cpu.g_x, 1e-5));
      CHECK(close_sum(gpu.g_g, ref.g_g, ref.terms_g));  // each device to the double reference
      CHECK(close_sum(gpu.g_beta, ref.g_beta, ref.abs_beta));
      CHECK(close_sum(cpu.g_g, ref.g_g, ref.abs_g));
      CHECK(close_sum(cpu.g_beta, ref.g_beta, ref.abs_beta));
      auto again = blpa::bn_relu_backward(dc, b.cuda(), g.cuda(), invstd.cuda(), gd, true);  // in place
      CHECK(again.g_x.data_ptr() == gd.data_ptr());
      CHECK(close(again.g_x, cpu.g_x, 1e-5));
      // The partial sums are added in a fixed order: a second run gives the same bits.
      auto twice = blpa::bn_relu_backward(dc, b.cuda(), g.cuda(), invstd.cuda(), g_r.cuda(), false);
      CHECK(torch::equal(twice.g_g, gpu.g_g));
      CHECK(torch::equal(twice.g_beta, gpu.g_beta));
      CHECK(torch::equal(twice.g_x, gpu.g_x));
      // A misaligned (but contiguous) gradient takes the scalar path.
      auto buf = torch::empty({g_r.numel() + 1}, torch::kCUDA);
      auto shifted = buf.narrow(0, 1, g_r.numel()).view(shape);
      shifted.copy_(g_r.cuda());
      CHECK(close(blpa::bn_relu_backward(dc, b.cuda(), g.cuda(), invstd.cuda(), shifted, true).g_x, cpu.g_x, 1e-5));
    }
  }
}

TEST_CASE("CUDA: bf16 and channels-last codes, unpack and ReLU are bit-identical to the CPU path", "[codec][cuda]") {
  BLPA_REQUIRE_CUDA();
  torch::manual_seed(24);
  auto shapes = layout_shapes();
  shapes.push_back({8, 64, 33, 33});  // many groups per thread, rows that straddle groups
  for (const CodeFormat& f : layout_formats()) {
    for (const auto& shape : shapes) {
      for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
        for (bool cl : {false, true}) {
          CAPTURE(f.bits, f.window, f.lift, shape, dtype, cl);
          const int64_t c = shape[1];
          auto v = awkward_values(shape, f).to(dtype);
          if (cl) v = nhwc(v);
          auto b = torch::randn({c}) * 2, gamma = torch::rand({c}) + 0.1;
          auto cpu = pack(v, b, f, gamma);
          auto gpu = pack(v.cuda(), b.cuda(), f, gamma.cuda());
          CHECK(gpu.channels_last == cpu.channels_last);
          CHECK(torch::equal(cpu.offsets, gpu.offsets.cpu()));
          CHECK(torch::equal(cpu.data, gpu.data.cpu()));

          auto rc = v.clone(), rg = v.cuda();
          CHECK(torch::equal(blpa::pack_relu_(rg, b.cuda(), f, gamma.cuda()).data.cpu(),
                             blpa::pack_relu_(rc, b, f, gamma).data));
          CHECK(torch::equal(bits_of(rg), bits_of(rc)));  // NaN payloads included

          const unsigned all = blpa::kXhat | blpa::kRelu | blpa::kMask;
          auto uc = blpa::unpack(cpu, b, gamma, all, dtype);
          auto ug = blpa::unpack(gpu, b.cuda(), gamma.cuda(), all, dtype);
          CHECK(torch::equal(uc.x_hat, ug.x_hat.cpu()));
          CHECK(torch::equal(uc.r, ug.r.cpu()));
          CHECK(torch::equal(uc.mask, ug.mask.cpu()));
          CHECK(ug.x_hat.strides() == uc.x_hat.strides());

          // A misaligned (but dense) input takes the scalar path and must agree too.
          auto buf = torch::empty({v.numel() + 1}, v.options().device(torch::kCUDA));
          auto shifted = buf.narrow(0, 1, v.numel());
          auto moved = cl ? shifted.view({shape[0], shape[2], shape[3], c}).permute({0, 3, 1, 2}) : shifted.view(shape);
          moved.copy_(v.cuda());
          CHECK(torch::equal(cpu.data, pack(moved, b.cuda(), f, gamma.cuda()).data.cpu()));
        }
      }
    }
  }
}

TEST_CASE("CUDA: bn_relu_pack gives the CPU path's codes, ReLU output and invstd", "[codec][cuda]") {
  BLPA_REQUIRE_CUDA();
  torch::manual_seed(44);
  auto shapes = layout_shapes();
  shapes.push_back({2, 2100, 1, 3});
  shapes.push_back({8, 64, 33, 33});
  for_each_forward_case(shapes, [&](const BnForwardCase& k, const std::vector<int64_t>&, torch::ScalarType, bool) {
    auto cpu = blpa::bn_relu_pack(k.x, k.mean, k.var, 1e-5f, k.beta, k.cc);
    blpa::ChannelCoding cc{k.cc.g.cuda(), k.cc.b.cuda(), k.cc.offsets.cuda(), k.cc.format};
    auto gpu = blpa::bn_relu_pack(k.x.cuda(), k.mean.cuda(), k.var.cuda(), 1e-5f, k.beta.cuda(), cc);
    CHECK(torch::equal(gpu.codes.data.cpu(), cpu.codes.data));
    CHECK(torch::equal(bits_of(gpu.r), bits_of(cpu.r)));
    CHECK(gpu.r.strides() == k.x.strides());
    CHECK(torch::equal(gpu.invstd.cpu(), cpu.invstd));
    // A NaN in x: its a is NaN on both, with the device's bits on the GPU (0x7FFF in bf16,
    // 0x7FFFFFFF in float32: not the CPU's); every code and every other value the same.
    auto x = k.x.clone(at::MemoryFormat::Preserve);
    x.as_strided({x.numel()}, {1})[x.numel() / 3] = std::nanf("");  // dense in either layout
    auto cpu_nan = blpa::bn_relu_pack(x, k.mean, k.var, 1e-5f, k.beta, k.cc);
    auto gpu_nan = blpa::bn_relu_pack(x.cuda(), k.mean.cuda(), k.var.cuda(), 1e-5f, k.beta.cuda(), cc);
    CHECK(torch::equal(gpu_nan.codes.data.cpu(), cpu_nan.codes.data));
    const auto nan = torch::isnan(cpu_nan.r);
    CHECK(nan.sum().item<int64_t>() == 1);
    CHECK(torch::equal(torch::isnan(gpu_nan.r.cpu()), nan));
    CHECK(torch::equal(bits_of(gpu_nan.r.cpu().masked_fill(nan, 0)), bits_of(cpu_nan.r.masked_fill(nan, 0))));
  });
}

TEST_CASE("CUDA: bn_relu_backward of bf16 and channels-last gradients matches the CPU path", "[codec][cuda]") {
  // The GPU adds in its own fixed order (NHWC: by rows of channels), so its sums agree with
  // the CPU's to their rounding (close_sum), and g_x to 1e-5 in float. In bf16, g_x is rounded
  // once from float: a float difference at a rounding boundary moves it by one bf16 ulp
  // (2^-8 relative), hence the tolerance 2^-7 relative for bf16.
  BLPA_REQUIRE_CUDA();
  torch::manual_seed(25);
  auto shapes = layout_shapes();
  shapes.push_back({32, 64, 28, 28});  // many row blocks
  shapes.push_back({2, 300, 7, 7});    // several channel tiles, the last partial
  shapes.push_back({3, 264, 3, 5});    // NHWC: lanes of 8 channels, two tiles, the last partial
  for (const CodeFormat& f : layout_formats()) {
    for (const auto& shape : shapes) {
      for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
        for (bool cl : {false, true}) {
          CAPTURE(f.bits, f.window, f.lift, shape, dtype, cl);
          const int64_t c = shape[1];
          auto [b, g, invstd] = draw_bn_channels(c);
          auto v = torch::randn(shape) + b.view({1, c, 1, 1});
          auto g_r = torch::randn(shape).to(dtype);
          if (cl) v = nhwc(v), g_r = nhwc(g_r);
          auto codes = pack(v, b, f);
          auto cpu = blpa::bn_relu_backward(codes, b, g, invstd, g_r, false, 0.5f);
          auto ref = bn_reference(codes, b, g, invstd, g_r.to(torch::kFloat));
          blpa::Codes dc{codes.data.cuda(), codes.offsets.cuda(), codes.sizes, f, codes.channels_last};
          auto gd = g_r.cuda();
          auto gpu = blpa::bn_relu_backward(dc, b.cuda(), g.cuda(), invstd.cuda(), gd, false, 0.5f);
          const double tol = dtype == torch::kFloat ? 1e-5 : 1.0 / 128;
          CHECK(torch::equal(gd.cpu(), g_r));
          CHECK(gpu.g_x.scalar_type() == dtype);
          CHECK(gpu.g_x.strides() == g_r.strides());
          CHECK(torch::allclose(gpu.g_x.cpu().to(torch::kDouble), cpu.g_x.to(torch::kDouble), tol, 1e-5));
          CHECK(close_sum(gpu.g_g, ref.g_g * (g > 0.5f).to(torch::kDouble), ref.terms_g));  // the clamp's gradient
          CHECK(close_sum(gpu.g_beta, ref.g_beta, ref.abs_beta));
          auto twice = blpa::bn_relu_backward(dc, b.cuda(), g.cuda(), invstd.cuda(), gd, true, 0.5f);
          CHECK(twice.g_x.data_ptr() == gd.data_ptr());
          CHECK(torch::equal(twice.g_x.cpu(), gpu.g_x.cpu()));  // the same bits from run to run
          CHECK(torch::equal(twice.g_g.cpu(), gpu.g_g.cpu()));
        }
      }
    }
  }
}

TEST_CASE("codec: the GPU's BatchNorm backward on a GPU's grid, emulated, matches the CPU path", "[emulator]") {
  // The emulated-cuda/ runs see a GPU of 2 multiprocessors, where an NHWC channel has 4 to 10
  // partial sums (bn_nhwc_grid: a wave of 2 to 5 row blocks an SM) and an NCHW one at most 32.
  // Here the emulator takes 8, 64 and 256, so that the NHWC sums of 12 channels of 16 x 32 x
  // 32 (a lane per channel, a warp covering two rows, 5 blocks an SM) spread over 40, 320 and
  // 1,024 row blocks (2, 10 and 32 warps per channel when they are added) and each thread of
  // the NCHW walk takes a few of a plane's vectors; tolerances as in the CUDA test above (the
  // GPU's order of addition is not the CPU's). NHWC lanes take 8 channels where the channels
  // are a multiple of 8 (16: two lanes a row, a warp covering 16 rows, 16 row blocks, then its
  // most, 128; 40: five of a tile's eight lanes; 264: two tiles of 32 lanes, the second with
  // one; 8: one lane a row), one channel otherwise (12, 300); 4 channels where
  // BLPA_BN_NHWC_VECTOR=4 (a CTest of its own), all six then. 4-bit codes on every grid; 2- and
  // 8-bit ones (whose 8 codes a row are 2 and 8 bytes) on the middle one.
  torch::manual_seed(29);
  struct Restore {
    ~Restore() { blpa::testing::set_emulated_multiprocessors(2); }
  } restore;
  const CodeFormat four{4, 6.0f, 1.0f}, two{2, 6.0f, 0.0f}, eight{8, 2.5f, 0.0f};
  for (const auto& [f, sms] : std::vector<std::pair<CodeFormat, int>>{{four, 8}, {four, 64}, {four, 256}, {two, 64},
                                                                       {eight, 64}}) {
    blpa::testing::set_emulated_multiprocessors(sms);
    for (const auto& shape : std::vector<std::vector<int64_t>>{
             {16, 12, 32, 32}, {16, 16, 32, 32}, {2, 300, 7, 7}, {5, 40, 9, 9}, {3, 264, 3, 5}, {2, 8, 5, 7}}) {
      for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
        CAPTURE(f.bits, sms, shape, dtype);
        const int64_t c = shape[1];
        auto [b, g, invstd] = draw_bn_channels(c);
        auto v = torch::randn(shape) + b.view({1, c, 1, 1});
        auto g_r = torch::randn(shape).to(dtype);
        auto codes = pack(v, b, f);
        auto cl_codes = pack(nhwc(v), b, f);
        auto cpu = blpa::bn_relu_backward(codes, b, g, invstd, g_r, false, 0.5f);
        auto ref = bn_reference(codes, b, g, invstd, g_r.to(torch::kFloat));
        const double tol = dtype == torch::kFloat ? 1e-5 : 1.0 / 128;
        blpa::testing::EmulatedKernels emulated;
        for (bool cl : {false, true}) {
          CAPTURE(cl);
          auto grad = cl ? nhwc(g_r) : g_r.clone();
          auto got = blpa::bn_relu_backward(cl ? cl_codes : codes, b, g, invstd, grad, false, 0.5f);
          CHECK(got.g_x.is_contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
          CHECK(torch::allclose(got.g_x.to(torch::kDouble), cpu.g_x.to(torch::kDouble), tol, 1e-5));
          CHECK(close_sum(got.g_g, ref.g_g * (g > 0.5f).to(torch::kDouble), ref.terms_g));
          CHECK(close_sum(got.g_beta, ref.g_beta, ref.abs_beta));
          auto again = blpa::bn_relu_backward(cl ? cl_codes : codes, b, g, invstd, grad, true, 0.5f);
          CHECK(again.g_x.data_ptr() == grad.data_ptr());  // in place
          CHECK(torch::equal(again.g_x, got.g_x));         // the same bits from run to run
          CHECK(torch::equal(again.g_g, got.g_g));
          CHECK(torch::equal(again.g_beta, got.g_beta));
        }
      }
    }
  }
}

TEST_CASE("codec: pack and unpack on a one-multiprocessor grid, emulated, give the CPU path's bits", "[emulator]") {
  // One multiprocessor: a grid of 4,096 threads, so that each thread of pack (two groups of 8
  // elements at a time, four with BLPA_PACK_UNROLL=4 in bf16) and of unpack (four groups of 16 bytes at a time) takes several turns of
  // its loop, with its last groups past the end or in the partial group at the tail.
  torch::manual_seed(31);
  struct Restore {
    ~Restore() { blpa::testing::set_emulated_multiprocessors(2); }
  } restore;
  blpa::testing::set_emulated_multiprocessors(1);
  const unsigned all = blpa::kXhat | blpa::kRelu | blpa::kMask;
  // The default formats, and windows narrower than 2^bits guards (kGuard / d > 1), where
  // pack's table makes every element a near edge that divides (near_code's s from the bias
  // would be off by one there).
  for (const CodeFormat& f : {blpa::default_format(8), blpa::default_format(4), blpa::default_format(2),
                              CodeFormat{8, 2e-4f, 0.0f}, CodeFormat{2, 3e-6f, 0.0f}}) {
    const int bits = f.bits;
    // {2, 2100, 1, 3}: channels past 2,048 (which the pack kept in shared memory until its
    // per-launch table); {2, 2056, 1, 2} too, in NHWC rows of 8 channels. In NHWC a common
    // kernel's thread reads its row of channels once (one_row_grid): 24, 40 and 136 channels
    // in grids where a thread takes one group; {8, 24, 16, 16} in a capped grid (16 blocks)
    // rounded down to 15, a whole number of rows wide, where a thread takes two; {4, 136, 8, 8}
    // capped where no grid of 16 blocks or fewer is (m = 17): the general kernel; and
    // {2, 2304, 3, 3} capped and rounded down to 9 blocks with pack's table in its workspace
    // (channels past 2,048). {16, 16, 32, 32}: 8 groups a pack thread, two turns of 4 where
    // BLPA_PACK_UNROLL=4 (its CTest entry) has the bf16 pack load 4 at once.
    for (const auto& shape : std::vector<std::vector<int64_t>>{{5, 7, 61, 67},
                                                               {4, 16, 32, 32},
                                                               {2, 300, 7, 7},
                                                               {2, 2100, 1, 3},
                                                               {2, 2056, 1, 2},
                                                               {4, 24, 9, 10},
                                                               {1, 40, 2, 2},
                                                               {2, 136, 4, 4},
                                                               {8, 24, 16, 16},
                                                               {4, 136, 8, 8},
                                                               {2, 2304, 3, 3},
                                                               {16, 16, 32, 32}}) {
      const int64_t c = shape[1];
      auto b = torch::randn({c}), gamma = torch::rand({c}) + 0.1;
      auto v = torch::randn(shape) * 2 + b.view({1, c, 1, 1});
      // Every 7th value on a bin edge of v / gamma (guard included): where pack divides.
      const int half = (1 << bits) / 2;
      auto edge = ((torch::randint(-half - 2, half + 3, shape, torch::kDouble) * f.bin_width() + 1e-6) *
                   gamma.to(torch::kDouble).view({1, c, 1, 1}))
                      .to(torch::kFloat);
      v = torch::where((torch::arange(v.numel()) % 7 == 0).view(shape), edge, v);
      for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
        for (bool cl : {false, true}) {
          CAPTURE(bits, f.window, shape, dtype, cl);
          auto x = v.to(dtype).contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
          auto r_cpu = x.clone(at::MemoryFormat::Preserve);
          auto cpu = blpa::pack_relu_(r_cpu, b, f, gamma);
          auto cpu_out = blpa::unpack(cpu, b, gamma, all, dtype);
          blpa::testing::EmulatedKernels emulated;
          auto r_gpu = x.clone(at::MemoryFormat::Preserve);
          auto gpu = blpa::pack_relu_(r_gpu, b, f, gamma);
          CHECK(torch::equal(gpu.data, cpu.data));
          CHECK(torch::equal(r_gpu, r_cpu));
          auto gpu_out = blpa::unpack(gpu, b, gamma, all, dtype);
          CHECK(torch::equal(gpu_out.x_hat, cpu_out.x_hat));
          CHECK(torch::equal(gpu_out.r, cpu_out.r));
          CHECK(torch::equal(gpu_out.mask, cpu_out.mask));
        }
      }
    }
  }
}

TEST_CASE("codec: unpack's every subset of outputs through the emulated kernels gives the CPU path's bits",
          "[emulator]") {
  // Each of the 7 subsets of x_hat, r' and mask, on shapes whose groups are whole (the common
  // path's kernels, which read only what the outputs asked for need: b for x_hat, gamma for r')
  // and not, with b and gamma aligned and one float into a buffer (the general kernels then).
  struct Restore {
    ~Restore() { blpa::testing::set_emulated_multiprocessors(2); }
  } restore;
  torch::manual_seed(37);
  for (int sms : {1, 2}) {
    blpa::testing::set_emulated_multiprocessors(sms);
    for (int bits : {8, 4, 2}) {
      const CodeFormat f = blpa::default_format(bits);
      for (const auto& shape :
           std::vector<std::vector<int64_t>>{{2, 16, 4, 4}, {3, 8, 2, 4}, {2, 2056, 8, 1}, {3, 5, 3, 3}}) {
        const int64_t c = shape[1];
        const auto cc = blpa::channel_coding(torch::rand({c}) * 2 + 0.05, torch::randn({c}), 1e-8f, f, true);
        for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
          for (bool cl : {false, true}) {
            for (bool shifted : {false, true}) {
              CAPTURE(sms, bits, shape, dtype, cl, shifted);
              auto x = (torch::randn(shape) * 2).to(dtype).contiguous(cl ? at::MemoryFormat::ChannelsLast
                                                                         : at::MemoryFormat::Contiguous);
              auto b = cc.b, g = cc.g;
              if (shifted) {
                b = torch::empty({c + 1}).narrow(0, 1, c).copy_(cc.b);
                g = torch::empty({c + 1}).narrow(0, 1, c).copy_(cc.g);
              }
              const auto codes = blpa::pack(x, b, f, g);
              for (unsigned outputs = 1; outputs < 8; ++outputs) {
                CAPTURE(outputs);
                auto cpu = blpa::unpack(codes, b, g, outputs, dtype);
                blpa::testing::EmulatedKernels emulated;
                auto gpu = blpa::unpack(codes, b, g, outputs, dtype);
                for (auto [got, want] : {std::pair{gpu.x_hat, cpu.x_hat}, {gpu.r, cpu.r}}) {
                  REQUIRE(got.defined() == want.defined());
                  if (want.defined()) CHECK(torch::equal(bits_of(got), bits_of(want)));
                }
                REQUIRE(gpu.mask.defined() == cpu.mask.defined());
                if (cpu.mask.defined()) CHECK(torch::equal(gpu.mask, cpu.mask));
              }
            }
          }
        }
      }
    }
  }
}

TEST_CASE("codec: drawn shapes values and grids through the emulated kernels give the CPU path's bits",
          "[emulator]") {
  // The cases above are chosen; these are drawn, so that what they did not think of meets the
  // kernels too: channels on either side of a warp's, a row's and the table's bounds (2,048),
  // planes of 1 to 49 elements that cut groups of 8 anywhere, 1 to 3 multiprocessors (the
  // grid's turns), misaligned tensors, a NaN, a channel of zero variance, a gamma below its
  // clamp and windows narrower than the guards. The forward's outputs must be the CPU's bits:
  // bn_relu_pack, pack_relu_, pack and unpack. (The BatchNorm backward adds in the GPU's
  // order: the test above and its CUDA twin compare it within its rounding.)
  struct Restore {
    ~Restore() { blpa::testing::set_emulated_multiprocessors(2); }
  } restore;
  std::mt19937 rng(20261201);
  auto draw = [&](int n) { return static_cast<int>(rng() % static_cast<unsigned>(n)); };
  const std::vector<int64_t> channels = {1,  2,  3,   7,   8,   9,    15,   16,   17,   31,   32,   33,   63,
                                         64, 65, 100, 255, 256, 257, 1000, 2047, 2048, 2049, 2056, 2100, 3000};
  const unsigned all = blpa::kXhat | blpa::kRelu | blpa::kMask;
  for (int i = 0; i < 120; ++i) {
    const int64_t c = channels[draw(static_cast<int>(channels.size()))];
    const std::vector<int64_t> shape{1 + draw(4), c, 1 + draw(7), 1 + draw(7)};
    const int bits = 2 << draw(3);  // 2, 4 or 8
    const bool bf16 = draw(2), cl = draw(2), misaligned = draw(4) == 0, narrow = draw(5) == 0;
    const int sms = 1 + draw(3);
    const CodeFormat f = narrow ? CodeFormat{bits, bits == 8 ? 2e-4f : 3e-6f, 0.0f} : blpa::default_format(bits);
    CAPTURE(i, shape, bits, bf16, cl, misaligned, narrow, sms);
    torch::manual_seed(i);
    auto gamma = torch::rand({c}) * 2 + 0.05, beta = torch::randn({c});
    gamma.narrow(0, 0, (c + 2) / 3).fill_(1.0f);  // gamma = 1 as initialised: bf16 values on bin edges
    if (c > 4) gamma[c - 1] = 1e-9f;
    auto mean = torch::randn({c}), var = torch::rand({c}) * 4 + 0.01;
    if (c > 3) var[1] = 0.0f;
    auto x = torch::randn(shape) * 2 + mean.view({1, c, 1, 1});
    if (draw(3) == 0) x.view(-1)[draw(static_cast<int>(x.numel()))] = std::nanf("");
    const auto layout = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    x = x.to(bf16 ? torch::kBFloat16 : torch::kFloat).contiguous(layout);
    if (misaligned) {  // the same values one element into a buffer, in the same layout
      auto at_one = torch::empty({x.numel() + 1}, x.options()).narrow(0, 1, x.numel());
      auto moved = cl ? at_one.view({shape[0], shape[2], shape[3], c}).permute({0, 3, 1, 2}) : at_one.view(shape);
      x = moved.copy_(x);
    }
    const auto cc = blpa::channel_coding(gamma, beta, 1e-8f, f, true);
    blpa::testing::set_emulated_multiprocessors(sms);
    // Each codec call on the CPU's loops, then on the emulated kernels.
    auto both = [&](auto&& call) {
      auto cpu = call();
      blpa::testing::EmulatedKernels emulated;
      return std::make_pair(cpu, call());
    };
    auto [fused_cpu, fused_gpu] = both([&] { return blpa::bn_relu_pack(x, mean, var, 1e-5f, beta, cc); });
    CHECK(torch::equal(fused_gpu.codes.data, fused_cpu.codes.data));
    CHECK(torch::equal(bits_of(fused_gpu.r), bits_of(fused_cpu.r)));
    CHECK(torch::equal(fused_gpu.invstd, fused_cpu.invstd));
    torch::Tensor r_cpu, r_gpu;
    auto [relu_cpu, relu_gpu] = both([&] {
      auto& r = r_cpu.defined() ? r_gpu : r_cpu;
      r = x.clone(at::MemoryFormat::Preserve);
      return blpa::pack_relu_(r, cc);
    });
    CHECK(torch::equal(relu_gpu.data, relu_cpu.data));
    CHECK(torch::equal(bits_of(r_gpu), bits_of(r_cpu)));
    auto [plain_cpu, plain_gpu] = both([&] { return blpa::pack(x, cc); });
    CHECK(torch::equal(plain_gpu.data, plain_cpu.data));
    auto [out_cpu, out_gpu] = both([&] { return blpa::unpack(relu_cpu, cc.b, cc.g, all, x.scalar_type()); });
    CHECK(torch::equal(bits_of(out_gpu.x_hat), bits_of(out_cpu.x_hat)));
    CHECK(torch::equal(bits_of(out_gpu.r), bits_of(out_cpu.r)));
    CHECK(torch::equal(out_gpu.mask, out_cpu.mask));
  }
}

TEST_CASE("CUDA: channel_coding and the clamp's gradient match the CPU path", "[codec][cuda]") {
  BLPA_REQUIRE_CUDA();
  torch::manual_seed(17);
  for (const CodeFormat& f : formats()) {
    CAPTURE(f.bits, f.window, f.lift);
    const int64_t c = 300;
    auto gamma = awkward_gammas(c), beta = torch::randn({c}) * 2, invstd = torch::rand({c}) + 0.5;
    for (bool centred : {true, false}) {
      auto cpu = blpa::channel_coding(gamma, beta, 1e-8f, f, centred);
      auto gpu = blpa::channel_coding(gamma.cuda(), beta.cuda(), 1e-8f, f, centred);
      CHECK(torch::allclose(gpu.g.cpu(), cpu.g, 0, 0, /*equal_nan=*/true));
      CHECK(torch::allclose(gpu.b.cpu(), cpu.b, 0, 0, /*equal_nan=*/true));
      CHECK(torch::equal(gpu.offsets.cpu(), cpu.offsets));
    }
    auto cc = blpa::channel_coding(gamma.cuda(), beta.cuda(), 1e-8f, f, true);
    auto v = torch::randn({4, c, 6, 6}, torch::kCUDA), g_r = torch::randn({4, c, 6, 6}, torch::kCUDA);
    auto codes = blpa::pack(v, cc);
    auto free = blpa::bn_relu_backward(codes, cc.b, cc.g, invstd.cuda(), g_r, false);
    auto masked = blpa::bn_relu_backward(codes, cc.b, cc.g, invstd.cuda(), g_r, false, 1e-8f);
    CHECK(torch::allclose(masked.g_g.cpu(), at::threshold_backward(free.g_g.cpu(), gamma, 1e-8f), 0, 0,
                          /*equal_nan=*/true));
    CHECK(torch::equal(masked.g_beta, free.g_beta));
  }
}

#if BLPA_WITH_CUDA
TEST_CASE("CUDA: the GPU's kernels give the emulator's bits, BatchNorm sums included", "[codec][cuda]") {
  // The emulator runs the same kernels' source with the GPU's multiprocessor count, so on the
  // same grid: the BatchNorm backward's partial sums are split and added as on the GPU, and
  // every output is expected to be the same bits. A difference would be the device
  // compiler's (the __CUDA_ARCH__ branches of codec_math.h, --fmad=false) or the emulator's.
  BLPA_REQUIRE_CUDA();
  torch::manual_seed(27);
  blpa::testing::set_emulated_multiprocessors(blpa::cuda::multiprocessors(0));
  struct Restore {
    ~Restore() { blpa::testing::set_emulated_multiprocessors(2); }
  } restore;
  const auto same = [](const torch::Tensor& gpu, const torch::Tensor& emulated) {  // to the bit: -0, NaN payloads
    return torch::equal(bits_of(gpu), bits_of(emulated));
  };
  // {2, 2304, 3, 3}: past pack's 2,048 channels a launch of its own makes the table in the
  // workspace (pack_table_launch), in either layout.
  for (const CodeFormat& f : layout_formats()) {
    for (const auto& shape : std::vector<std::vector<int64_t>>{{4, 16, 8, 8}, {3, 5, 7, 9}, {8, 64, 14, 14},
                                                               {2, 300, 7, 7}, {2, 2304, 3, 3}}) {
      for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
        for (bool cl : {false, true}) {
          CAPTURE(f.bits, f.window, f.lift, shape, dtype, cl);
          const int64_t c = shape[1];
          auto v = awkward_values(shape, f).to(dtype);
          auto g_r = torch::randn(shape).to(dtype);
          if (cl) v = nhwc(v), g_r = nhwc(g_r);
          auto [b, g, invstd] = draw_bn_channels(c);
          auto gamma = torch::rand({c}) + 0.1;
          const unsigned all = blpa::kXhat | blpa::kRelu | blpa::kMask;
          auto codes_d = pack(v.cuda(), b.cuda(), f, gamma.cuda());
          auto u_d = blpa::unpack(codes_d, b.cuda(), gamma.cuda(), all, dtype);
          auto bn_d = blpa::bn_relu_backward(codes_d, b.cuda(), g.cuda(), invstd.cuda(), g_r.cuda(), false, 0.5f);
          blpa::testing::EmulatedKernels emulated;
          auto codes_e = pack(v, b, f, gamma);
          auto u_e = blpa::unpack(codes_e, b, gamma, all, dtype);
          auto bn_e = blpa::bn_relu_backward(codes_e, b, g, invstd, g_r, false, 0.5f);
          CHECK(torch::equal(codes_d.data.cpu(), codes_e.data));
          CHECK(same(u_d.x_hat, u_e.x_hat));
          CHECK(same(u_d.r, u_e.r));
          CHECK(torch::equal(u_d.mask.cpu(), u_e.mask));
          CHECK(same(bn_d.g_x, bn_e.g_x));
          CHECK(same(bn_d.g_g, bn_e.g_g));
          CHECK(same(bn_d.g_beta, bn_e.g_beta));
        }
      }
    }
  }
}
#endif
