// The unit in every mode against `plain` (ordinary LibTorch batch_norm, relu, conv2d).
#include <blpa/memory.h>
#include <blpa/unit.h>

#include <cmath>

#include "test_support.h"

using blpa::ConvSpec;
using blpa::Mode;
using blpa::ModeConfig;
using blpa::Unit;

namespace {

struct Case {
  int64_t n, c, hw;
  std::vector<ConvSpec> convs;
};

std::vector<Case> cases() {
  return {
      {4, 8, 9, {{6, 3, 1, 1}}},              // 3x3, stride 1, padding 1
      {2, 6, 10, {{5, 3, 2, 1}}},             // 3x3, stride 2
      {3, 5, 7, {{7, 1, 1, 0}}},              // 1x1
      {2, 4, 8, {{3, 1, 1, 0}, {9, 1, 2, 0}}},  // with a projection shortcut on the same r
      {5, 3, 6, {}},                          // the final BN-ReLU
      {2, 4, 11, {{4, 5, 3, 2}}},             // 5x5, stride 3, padding 2
  };
}

struct Result {
  std::vector<torch::Tensor> y;
  torch::Tensor gx, ggamma, gbeta, running_mean, running_var;
  std::vector<torch::Tensor> gw;
};

// Builds a unit of `mode` with the parameters drawn for `seed`, runs forward and backward
// of sum(y_i * probe_i) and returns everything that should match the oracle.
Result run_unit(const Case& k, ModeConfig mode, torch::Dtype dtype, uint64_t seed) {
  torch::manual_seed(seed);
  Unit u(k.c, k.convs, mode);
  u->to(dtype);
  {
    torch::NoGradGuard g;
    u->gamma.copy_(torch::rand({k.c}) + 0.5);
    u->beta.copy_(torch::randn({k.c}));
    u->running_mean.copy_(torch::randn({k.c}) * 0.1);
  }
  auto x = (torch::randn({k.n, k.c, k.hw, k.hw}) * 2 + 0.5).to(dtype).requires_grad_();
  auto y = u->forward(x);
  torch::Tensor loss = torch::zeros({}, dtype);
  for (auto& t : y) loss = loss + (t * torch::randn(t.sizes()).to(dtype)).sum();
  loss.backward();
  Result r{y, x.grad(), u->gamma.grad(), u->beta.grad(), u->running_mean.clone(), u->running_var.clone(), {}};
  for (auto& w : u->weights) r.gw.push_back(w.grad());
  return r;
}

double rel_err(const torch::Tensor& a, const torch::Tensor& ref) {
  return ((a - ref).norm() / ref.norm()).item<double>();
}

void check_close(const Result& a, const Result& b, double rtol, double atol) {
  REQUIRE(a.y.size() == b.y.size());
  for (size_t i = 0; i < a.y.size(); ++i) CHECK(torch::allclose(a.y[i], b.y[i], rtol, atol));
  CHECK(torch::allclose(a.gx, b.gx, rtol, atol));
  CHECK(torch::allclose(a.ggamma, b.ggamma, rtol, atol));
  CHECK(torch::allclose(a.gbeta, b.gbeta, rtol, atol));
  CHECK(torch::allclose(a.running_mean, b.running_mean, rtol, atol));
  CHECK(torch::allclose(a.running_var, b.running_var, rtol, atol));
  for (size_t i = 0; i < a.gw.size(); ++i) CHECK(torch::allclose(a.gw[i], b.gw[i], rtol, atol));
}

}  // namespace

TEST_CASE("unit: exact equals plain to fp32 rounding, and to 1e-10 in double precision", "[unit]") {
  struct Precision {
    torch::Dtype dtype;
    double tol;
    uint64_t seed;
  };
  for (const Precision& p : {Precision{torch::kFloat, 1e-5, 10}, Precision{torch::kDouble, 1e-10, 20}}) {
    int i = 0;
    for (const auto& k : cases()) {
      CAPTURE(p.dtype, i);
      const uint64_t seed = p.seed + i++;
      auto plain = run_unit(k, {Mode::plain, 8}, p.dtype, seed);
      auto exact = run_unit(k, {Mode::exact, 8}, p.dtype, seed);
      check_close(exact, plain, p.dtype == torch::kFloat ? 1e-4 : 1e-10, p.tol);
    }
  }
}

TEST_CASE("unit: blpa keeps the forward exact, the mask exact and grad beta exact, errors shrink with K", "[unit]") {
  int i = 0;
  for (const auto& k : cases()) {
    CAPTURE(i);
    const uint64_t seed = 30 + i++;
    auto exact = run_unit(k, {Mode::exact, 8}, torch::kFloat, seed);
    auto b8 = run_unit(k, {Mode::blpa, 8}, torch::kFloat, seed);
    auto b4 = run_unit(k, {Mode::blpa, 4}, torch::kFloat, seed);
    for (auto* r : {&b8, &b4}) {
      for (size_t j = 0; j < exact.y.size(); ++j) CHECK(torch::equal(r->y[j], exact.y[j]));
      // grad beta = sum of g_r over the mask, with g_r exact: equal to the summation order
      // iff the masks are (one element masked differently would move a channel's sum by its
      // gradient, about 5% of the sum here, against 1e-5).
      CHECK(torch::allclose(r->gbeta, exact.gbeta, 1e-5, 1e-5));
      CHECK(torch::equal(r->running_var, exact.running_var));
    }
    const double x8 = rel_err(b8.gx, exact.gx), x4 = rel_err(b4.gx, exact.gx);
    const double g8 = rel_err(b8.ggamma, exact.ggamma), g4 = rel_err(b4.ggamma, exact.ggamma);
    std::cout << "unit case " << i - 1 << ": rel err grad x 8-bit " << x8 << " 4-bit " << x4 << "; grad gamma "
              << g8 << " / " << g4;
    // Floors from the bin width: the rounding error of x_hat' has std d/sqrt(12), about 0.108
    // at 4 bits and 0.0068 at 8 bits for a unit-variance x_hat; r', and so grad W and grad
    // gamma, carry about that relative error (we allow 2x). grad x sees it only through the
    // variance term, an order of magnitude less. grad gamma is a sum with cancellation, so
    // its relative error is allowed more.
    CHECK(x8 < x4);
    CHECK(g8 < g4);
    CHECK(x8 < 0.005);
    CHECK(x4 < 0.05);
    CHECK(g8 < 0.05);
    CHECK(g4 < 0.3);
    for (size_t j = 0; j < exact.gw.size(); ++j) {
      const double w8 = rel_err(b8.gw[j], exact.gw[j]), w4 = rel_err(b4.gw[j], exact.gw[j]);
      std::cout << "; grad W" << j << " " << w8 << " / " << w4;
      CHECK(w8 < w4);
      CHECK(w8 < 0.02);
      CHECK(w4 < 0.25);
    }
    std::cout << std::endl;
  }
}

TEST_CASE("unit: blpa keeps only codes and per-channel metadata", "[unit][memory]") {
  blpa::memory::install_cpu_counter();
  const torch::Device cpu(torch::kCPU);
  for (int bits : {8, 4}) {
    torch::manual_seed(40);
    Unit u(16, std::vector<ConvSpec>{{16, 3, 1, 1}, {32, 1, 2, 0}}, ModeConfig{Mode::blpa, bits});
    auto x = torch::randn({4, 16, 15, 15});
    const int64_t before = blpa::memory::allocated(cpu);
    auto y = u->forward(x);
    const int64_t held = blpa::memory::allocated(cpu) - before - y[0].nbytes() - y[1].nbytes();
    const auto& m = u->memory();
    const int64_t n = x.numel();
    CAPTURE(bits, held);
    CHECK(m.code_bytes == (n * bits + 7) / 8);
    CHECK(m.metadata_bytes == 3 * 16 * 4 + 16);  // 1/sigma, clamped gamma, b = beta/gamma; the offsets
    CHECK(m.full_bytes == 0);
    // Everything the autograd graph holds was allocated by the forward: it must be the codes
    // and metadata, which is at most K/32 of the fp32 activation plus the metadata.
    CHECK(held == m.total());
    CHECK(held <= n * 4 * bits / 32 + 1 + 16 * 13);
  }
}

TEST_CASE("unit: evaluation mode uses the running statistics and keeps nothing", "[unit]") {
  blpa::memory::install_cpu_counter();
  torch::manual_seed(41);
  Unit p(8, std::vector<ConvSpec>{{4, 3, 1, 1}}, ModeConfig{Mode::plain, 8});
  Unit b(8, std::vector<ConvSpec>{{4, 3, 1, 1}}, ModeConfig{Mode::blpa, 4});
  {
    torch::NoGradGuard g;
    b->weights[0].copy_(p->weights[0]);
    for (auto* u : {&p, &b}) {
      (*u)->running_mean.fill_(0.3);
      (*u)->running_var.fill_(2.0);
    }
  }
  p->eval();
  b->eval();
  auto x = torch::randn({2, 8, 6, 6});
  torch::NoGradGuard no_grad;
  const int64_t before = blpa::memory::allocated(torch::kCPU);
  auto yb = b->forward(x)[0];
  CHECK(blpa::memory::allocated(torch::kCPU) - before == static_cast<int64_t>(yb.nbytes()));
  CHECK(torch::allclose(yb, p->forward(x)[0]));
  CHECK(torch::allclose(b->running_mean, torch::full({8}, 0.3)));  // not updated in eval
}

TEST_CASE("CUDA: the unit matches its CPU twin", "[unit][cuda]") {
  BLPA_REQUIRE_CUDA();
  NoTF32 fp32;
  for (int bits : {8, 4}) {
    torch::manual_seed(42);
    Unit u(8, std::vector<ConvSpec>{{6, 3, 1, 1}, {12, 1, 2, 0}}, ModeConfig{Mode::blpa, bits});
    auto x = torch::randn({4, 8, 9, 9});
    auto probe0 = torch::randn({4, 6, 9, 9}), probe1 = torch::randn({4, 12, 5, 5});
    auto run = [&](const torch::Device& d) {
      Unit v(8, std::vector<ConvSpec>{{6, 3, 1, 1}, {12, 1, 2, 0}}, ModeConfig{Mode::blpa, bits});
      {
        torch::NoGradGuard g;
        for (size_t i = 0; i < u->parameters().size(); ++i) v->parameters()[i].copy_(u->parameters()[i]);
      }
      v->to(d);
      auto xd = x.to(d).detach().requires_grad_();  // a leaf on each device: its .grad() is filled
      auto y = v->forward(xd);
      ((y[0] * probe0.to(d)).sum() + (y[1] * probe1.to(d)).sum()).backward();
      return std::vector<torch::Tensor>{y[0].cpu(), xd.grad().cpu(), v->gamma.grad().cpu(), v->beta.grad().cpu(),
                                        v->weights[0].grad().cpu(), v->weights[1].grad().cpu()};
    };
    auto c = run(torch::kCPU), g = run(torch::kCUDA);
    for (size_t i = 0; i < c.size(); ++i) CHECK(torch::allclose(c[i], g[i], 1e-3, 1e-4));
  }
}

TEST_CASE("unit: gamma below 1e-8 is clamped in forward and gets no gradient, as with LibTorch's clamp_min", "[unit]") {
  torch::manual_seed(9);
  for (Mode mode : {Mode::exact, Mode::blpa}) {
    CAPTURE(to_string(mode));
    Unit u(5, std::vector<ConvSpec>{}, ModeConfig{mode, 8});
    auto g0 = torch::tensor({-1.0f, 0.0f, 1e-8f, 2e-8f, 1.0f});
    {
      torch::NoGradGuard no_grad;
      u->gamma.copy_(g0);
      u->beta.copy_(torch::tensor({0.1f, -0.2f, 0.3f, 0.0f, 0.5f}));
    }
    auto x = torch::randn({3, 5, 4, 4});
    auto probe = torch::randn({3, 5, 4, 4});
    (u->forward(x)[0] * probe).sum().backward();
    // The reference: LibTorch's autograd through the same clamp.
    auto gamma = g0.clone().requires_grad_();
    auto beta = u->beta.detach().clone().requires_grad_();
    auto r = torch::relu(torch::batch_norm(x, gamma.clamp_min(1e-8), beta, {}, {}, true, 0.1, 1e-5, false));
    (r * probe).sum().backward();
    auto got = u->gamma.grad(), want = gamma.grad();
    CHECK(got[0].item<float>() == 0.0f);
    CHECK(got[1].item<float>() == 0.0f);
    CAPTURE(got, want);
    // 1e-8f is just below 1e-8: clamped, so constrain_()'s gammas get no gradient. LibTorch
    // versions disagree at that point (2.15's clamp_min passes none there, 2.11's passes it),
    // so the comparison with LibTorch leaves it out.
    CHECK(got[2].item<float>() == 0.0f);
    CHECK(got[3].item<float>() != 0.0f);
    const auto away = torch::tensor({0, 1, 3, 4});
    got = got.index_select(0, away), want = want.index_select(0, away);
    if (mode == Mode::exact) CHECK(torch::allclose(got, want, 1e-4, 1e-5));
    else CHECK(((got != 0) == (want != 0)).all().item<bool>());
  }
}
