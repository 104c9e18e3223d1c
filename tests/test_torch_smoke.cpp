// The toolchain works end to end: LibTorch ops, a custom autograd Function checked against
// a numerical gradient, and a CUDA test that skips visibly without a device.
#include "test_support.h"

namespace {

// y = x^3 * w with a hand-written backward.
struct Cube : torch::autograd::Function<Cube> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, torch::Tensor x, torch::Tensor w) {
    ctx->save_for_backward({x, w});
    return x.pow(3) * w;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list g) {
    auto saved = ctx->get_saved_variables();
    auto x = saved[0], w = saved[1];
    return {g[0] * 3 * x.pow(2) * w, (g[0] * x.pow(3)).sum()};
  }
};

}  // namespace

TEST_CASE("LibTorch computes a matmul", "[smoke]") {
  auto a = torch::tensor({{1.0, 2.0}, {3.0, 4.0}});
  auto b = torch::tensor({{5.0, 6.0}, {7.0, 8.0}});
  auto c = torch::matmul(a, b);
  CHECK(torch::equal(c, torch::tensor({{19.0, 22.0}, {43.0, 50.0}})));
}

TEST_CASE("A custom autograd Function matches its numerical gradient", "[smoke]") {
  torch::manual_seed(0);
  auto x = torch::randn({5}, torch::kDouble).requires_grad_();
  auto w = torch::randn({}, torch::kDouble).requires_grad_();
  Cube::apply(x, w).sum().backward();

  const double h = 1e-6;
  for (int i = 0; i < 5; ++i) {
    auto xp = x.detach().clone(), xm = x.detach().clone();
    xp[i] += h;
    xm[i] -= h;
    double num = ((xp.pow(3) * w.detach()).sum() - (xm.pow(3) * w.detach()).sum()).item<double>() / (2 * h);
    CHECK(x.grad()[i].item<double>() == Approx(num).epsilon(1e-6));
  }
  double num_w = x.detach().pow(3).sum().item<double>();
  CHECK(w.grad().item<double>() == Approx(num_w).epsilon(1e-9));
}

TEST_CASE("CUDA: LibTorch runs an op on the device", "[cuda]") {
  BLPA_REQUIRE_CUDA();
  auto a = torch::ones({1024}, torch::kCUDA);
  CHECK(a.sum().item<float>() == 1024.0f);
}
