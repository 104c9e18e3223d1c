// CUDA graphs (docs/method.md, "CUDA graphs"): the update with a device learning rate on the
// CPU against LibTorch's SGD, the flag's rules, and on a GPU the graphed training run
// against the eager one.
#include <blpa/checkpoint.h>
#include <blpa/dataset.h>
#include <blpa/memory.h>
#include <blpa/step.h>
#include <blpa/train.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <regex>

#include "test_support.h"
#if BLPA_WITH_CUDA
#include "graph.h"
#include "memory_stats.h"
#endif

namespace fs = std::filesystem;

namespace {

// Two identical small networks with the same gradients, and an SGD for each.
struct Twins {
  blpa::ResNet a{nullptr}, b{nullptr};
  torch::Device device;
  explicit Twins(torch::Device d = torch::kCPU) : device(d) {
    blpa::NetConfig c;
    c.depth = 11, c.in_channels = 1, c.num_classes = 4;
    torch::manual_seed(3);
    a = blpa::ResNet(c);
    torch::manual_seed(3);
    b = blpa::ResNet(c);
    a->to(device), b->to(device);
  }
  void backward(int64_t seed) {
    for (auto* m : {&a, &b}) {
      torch::manual_seed(seed);
      auto x = torch::randn({4, 1, 8, 8}).to(device);
      auto y = torch::randint(0, 4, {4}).to(device);
      (*m)->zero_grad();
      torch::nn::functional::cross_entropy((*m)->forward(x), y).backward();
    }
  }
};

// blpa-train's optimiser (momentum 0.9, weight decay 5e-4 on weights of rank > 1) at lr.
std::unique_ptr<torch::optim::SGD> sgd(blpa::ResNet& m, double lr) {
  blpa::TrainConfig c;
  c.lr = lr;
  c.warmup = 0;
  c.momentum = 0.9;
  c.weight_decay = 5e-4;
  return std::make_unique<torch::optim::SGD>(blpa::make_optimizer(m, c));
}

fs::path temp_dir(const std::string& name) { return fresh_temp_dir("graphs-" + name); }

// lr = 0.25: lr * buffer is exact, so rounding it first (sgd_step) or fusing it (ATen's add
// with alpha, an FMA on this CPU and on a GPU) gives the same bits, step after step. lr = 0.1:
// the two differ by at most one rounding of that product per step, a unit in the last place
// of a weight. Each step is compared from equal weights and buffers: the networks are in blpa
// mode, where a difference of one unit can move a 4-bit code and so the next gradients by far
// more than a rounding. On the CPU ATen runs the multi-tensor operators one tensor at a time,
// in the kernels LibTorch's SGD uses, so the momentum buffers are equal bit for bit. On CUDA
// they are its multi-tensor kernels, which only the CUDA twin checks, to the same rounding
// bound: whether nvcc fused g + weight_decay * p in one kernel and not in the other is not
// ours to pin.
void check_sgd_step(torch::Device device) {
  const bool cpu = device.is_cpu();
  for (const double lr : {0.25, 0.1}) {
    Twins t(device);
    auto oa = sgd(t.a, lr), ob = sgd(t.b, lr);
    const auto lr_t = torch::full({}, lr, torch::TensorOptions(torch::kFloat).device(device));
    auto pa = t.a->parameters(), pb = t.b->parameters();
    auto buffer = [](torch::optim::SGD& o, const torch::Tensor& p) {
      auto it = o.state().find(p.unsafeGetTensorImpl());
      REQUIRE(it != o.state().end());  // the optimiser's own buffers (what a checkpoint saves)
      return static_cast<torch::optim::SGDParamState&>(*it->second).momentum_buffer();
    };
    for (int64_t step = 0; step < 4; ++step) {
      t.backward(step);
      oa->step();
      blpa::sgd_step(*ob, lr_t);
      double worst = 0, worst_buffer = 0;
      auto relative = [](const torch::Tensor& want, const torch::Tensor& got) {
        return (want - got).abs().max().item<double>() / (want.abs().max().item<double>() + 1e-30);
      };
      for (size_t i = 0; i < pa.size(); ++i) {
        auto ba = buffer(*oa, pa[i]), bb = buffer(*ob, pb[i]);
        if (cpu) CHECK(torch::equal(ba, bb));  // the momentum buffer is the same arithmetic in both
        worst_buffer = std::max(worst_buffer, relative(ba, bb));
        worst = std::max(worst, relative(pa[i], pb[i]));
        if (cpu && lr == 0.25) CHECK(torch::equal(pa[i], pb[i]));
        torch::NoGradGuard no_grad;  // equal again for the next step
        pb[i].copy_(pa[i]);
        bb.copy_(ba);
      }
      CAPTURE(lr, step, worst, worst_buffer);
      CHECK(worst < 2.5e-7);  // about 2 units in the last place of the largest weight
      CHECK(worst_buffer < 2.5e-7);
    }
  }
}

// ResNet::constrain_ clamps all the units' gammas in one multi-tensor operation (a few
// kernels on CUDA, inside the captured iteration): it must be each unit's clamp_min_.
void check_constrain(torch::Device device) {
  Twins t(device);
  torch::NoGradGuard no_grad;
  int64_t units = 0;
  for (auto* m : {&t.a, &t.b}) {
    torch::manual_seed(5);
    for (auto& [name, u] : (*m)->units()) {
      u->gamma.copy_(torch::randn(u->gamma.sizes()) * 1e-7);  // half of them below the floor
      u->gamma[0] = std::nanf("");
      u->gamma[1] = 1e-8f;  // the float just below 1e-8: clamped up to the same float
      u->beta.copy_(torch::randn(u->beta.sizes()));
    }
  }
  t.a->constrain_();
  for (auto& [name, u] : t.b->units()) u->constrain_(), ++units;
  CHECK(units > 5);
  const auto pa = t.a->named_parameters(), pb = t.b->named_parameters();
  for (const auto& e : pa) {
    CAPTURE(e.key());
    CHECK(torch::equal(e.value().nan_to_num(-1), pb[e.key()].nan_to_num(-1)));  // NaN stays NaN in both
  }
  for (auto& [name, u] : t.a->units()) {
    CHECK(std::isnan(u->gamma[0].item<float>()));
    CHECK((u->gamma.slice(0, 1) >= 1e-8f).all().item<bool>());
  }
}

}  // namespace

TEST_CASE("graphs: the update with the learning rate in a tensor is LibTorch's SGD update", "[graphs]") {
  check_sgd_step(torch::kCPU);
  // The learning rate must be a 0-dim float tensor on the parameters' device.
  Twins t;
  auto o = sgd(t.a, 0.1);
  t.backward(0);
  CHECK_THROWS_WITH(blpa::sgd_step(*o, torch::full({1}, 0.1)), Catch::Contains("0-dim float"));
  CHECK_THROWS_WITH(blpa::sgd_step(*o, torch::full({}, 0.1, torch::kDouble)), Catch::Contains("0-dim float"));
}

TEST_CASE("CUDA: the multi-tensor update is LibTorch's SGD update on the GPU", "[graphs][cuda]") {
  BLPA_REQUIRE_CUDA();
  NoTF32 no_tf32;
  check_sgd_step(torch::Device(torch::kCUDA, 0));
}

TEST_CASE("graphs: the network's gamma clamp in one operation is every unit's clamp_min", "[graphs]") {
  check_constrain(torch::kCPU);
}

TEST_CASE("CUDA: the network's gamma clamp in one operation is every unit's clamp_min on the GPU", "[graphs][cuda]") {
  BLPA_REQUIRE_CUDA();
  check_constrain(torch::Device(torch::kCUDA, 0));
}

TEST_CASE("graphs: --cuda-graphs is auto, on or off, and on needs one CUDA rank", "[graphs]") {
  blpa::TrainConfig c;
  c.cuda_graphs = "sometimes";
  CHECK_THROWS_WITH(c.validate(), Catch::Contains("--cuda-graphs must be auto, on or off"));
  c.cuda_graphs = "on";
  CHECK_THROWS_WITH(c.validate(), Catch::Contains("--cuda-graphs on needs --device cuda"));
  c.device = "cuda";
  c.dist.world = 2;
  CHECK_THROWS_WITH(c.validate(), Catch::Contains("not with several ranks"));
  c.dist.world = 1;
  CHECK_NOTHROW(c.validate());
  c.cuda_graphs = "auto";
  c.device = "cpu";
  CHECK_NOTHROW(c.validate());  // auto on the CPU: eager
  CHECK(std::system((std::string(BLPA_TRAIN_EXE) + " --cuda-graphs on --print-config >/dev/null 2>&1").c_str()) != 0);
  CHECK(std::system((std::string(BLPA_TRAIN_EXE) + " --cuda-graphs off --print-config >/dev/null 2>&1").c_str()) == 0);
  // Not part of a run's identity: a run may resume with graphs on or off.
  CHECK(blpa::TrainConfig::identity_keys() == std::vector<std::string>{"dataset", "train_subset", "augment", "arch",
                                                                         "depth", "mode", "batch", "seed", "precision",
                                                                         "world"});
}

TEST_CASE("CUDA: a graphed run trains as the eager one, schedule included", "[graphs][cuda]") {
  BLPA_REQUIRE_CUDA();
  if (!fs::exists(blpa::data::kDebianFashionMnist)) {
    std::cout << "BLPA_SKIP: dataset-fashion-mnist is not installed" << std::endl;
    return;
  }
  // Deterministic cuDNN and no TF32, and on CUDA both runs update with sgd_step: the two runs
  // then do the same arithmetic in the same kernels and are expected equal or, where a kernel
  // is chosen differently under capture, apart by roundings (about 1e-7 relative per step)
  // that 20 iterations of training amplify to about 1e-5. A learning rate that the replay
  // ignored after the step at iteration 10 would differ by orders of magnitude more.
  NoTF32 no_tf32;
  struct CudnnChoices {  // restored for the tests that follow
    bool deterministic = at::globalContext().deterministicCuDNN(), benchmark = at::globalContext().benchmarkCuDNN();
    ~CudnnChoices() {
      at::globalContext().setDeterministicCuDNN(deterministic);
      at::globalContext().setBenchmarkCuDNN(benchmark);
    }
  } cudnn_choices;
  at::globalContext().setDeterministicCuDNN(true);
  at::globalContext().setBenchmarkCuDNN(false);
  const auto dir = temp_dir("cuda");
  std::vector<std::string> exports;
  std::vector<blpa::TrainResult> results;
  for (const char* graphs : {"off", "on"}) {
    blpa::TrainConfig c;
    c.depth = 20, c.train_subset = 2000, c.test_subset = 500, c.batch = 32, c.iterations = 20;
    c.warmup = 0, c.lr = 0.05, c.steps = {10}, c.factor = 0.1, c.log_every = 5, c.eval_every = 0;
    c.progress = false, c.device = "cuda", c.cuda_graphs = graphs;
    c.log_path = (dir / (std::string(graphs) + ".jsonl")).string();
    c.export_path = (dir / (std::string(graphs) + ".pt")).string();
    results.push_back(blpa::train(c));
    std::ifstream f(c.log_path);
    const std::string log((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    CHECK(log.find(std::string("\"graphed\": ") + (std::string(graphs) == "on" ? "true" : "false")) != std::string::npos);
  }
  CHECK(results[1].last_loss == Approx(results[0].last_loss).epsilon(1e-4));
  CHECK(results[1].test_acc == Approx(results[0].test_acc).margin(0.01));
  auto load = [](const std::string& p) {
    std::ifstream f(p, std::ios::binary);
    std::vector<char> bytes((std::istreambuf_iterator<char>(f)), {});
    return torch::pickle_load(bytes).toGenericDict();
  };
  auto a = load((dir / "off.pt").string()), b = load((dir / "on.pt").string());
  for (const auto& e : a) {
    const auto x = e.value().toTensor(), y = b.at(e.key()).toTensor();
    CAPTURE(e.key().toStringRef());
    CHECK(((x - y).abs().max() / (x.abs().max() + 1e-12)).item<double>() < 1e-3);
  }
  remove_tree(dir);
}

TEST_CASE("graphs: a capture refuses parameters whose autograd graph is still held", "[graphs]") {
  // On the H200 a parameter's clone() kept from an eager step made the next capture fail
  // with CUDA's "operation would make the legacy stream depend on a capturing blocking stream".
  blpa::NetConfig nc;
  nc.depth = 11, nc.in_channels = 1, nc.num_classes = 4;
  blpa::ResNet m(nc);
  auto opt = sgd(m, 0.1);
  const auto x = torch::randn({4, 1, 8, 8}), y = torch::randint(0, 4, {4});
  auto held = m->forward(x).sum();
  {
    blpa::GraphedStep step(m, *opt, 1);
    CHECK_THROWS_WITH(step.run(x, y, 0.1), Catch::Contains("still holds an autograd graph"));
    CHECK_FALSE(step.captured());
  }
  held = torch::Tensor();
  // Nothing holds a graph now: what stops this capture is the CPU.
  blpa::GraphedStep step(m, *opt, 1);
  CHECK_THROWS_WITH(step.run(x, y, 0.1), Catch::Contains("CUDA graphs need the model on a CUDA device"));
}

TEST_CASE("CUDA: a capture that fails leaves the model and optimiser usable", "[graphs][cuda]") {
  BLPA_REQUIRE_CUDA();
  blpa::NetConfig nc;
  nc.depth = 11, nc.in_channels = 1, nc.num_classes = 4;
  blpa::ResNet m(nc);
  m->to(torch::kCUDA);
  auto opt = sgd(m, 0.1);
  blpa::GraphedStep step(m, *opt, 1);
  const auto x = torch::randn({4, 1, 8, 8});
  // Float labels: cross_entropy throws inside the capture.
  CHECK_THROWS(step.run(x, torch::zeros({4}), 0.1));
  CHECK_FALSE(step.captured());
  // detach(): a clone of the parameter would hold its AccumulateGrad, which the capture below
  // refuses (test "graphs: a capture refuses parameters whose autograd graph is still held").
  const auto before = m->parameters().front().detach().clone();
  torch::nn::functional::cross_entropy(m->forward(x.cuda()), torch::zeros({4}, torch::kLong).cuda()).backward();
  opt->step();
  CHECK_FALSE(torch::equal(before, m->parameters().front()));
  // A good capture then works, and the learning rate set before each replay is the one used.
  blpa::GraphedStep good(m, *opt, 1);
  const auto y = torch::randint(0, 4, {4});
  good.run(x, y, 0.1);
  CHECK(good.captured());
  const auto frozen = m->parameters().front().detach().clone();
  good.run(x, y, 0.0);
  CHECK(torch::equal(frozen, m->parameters().front()));  // momentum aside: lr 0 moves nothing
  CHECK(good.take_losses().count == 2);
}

#if BLPA_WITH_CUDA
TEST_CASE("CUDA: a capture that a synchronisation invalidates leaves the allocator usable", "[graphs][cuda]") {
  // A host read inside the body invalidates the capture: cudaStreamEndCapture fails, which
  // PyTorch 2.11's capture_end does not clean up after (the allocator kept routing to the
  // pool, and emptying the cache then failed an internal assertion).
  BLPA_REQUIRE_CUDA();
  const torch::Device dev(torch::kCUDA, 0);
  auto t = torch::ones({1024}, dev);
  blpa::memory::release_cached(dev);
  const int64_t before = blpa::cuda::reserved_bytes(0);
  {
    blpa::cuda::Graph g;
    CHECK_THROWS_AS(g.capture(0, [&] { (void)(t * 2).sum().item<float>(); }), std::runtime_error);
    CHECK_FALSE(g.captured());
  }
  CHECK_NOTHROW(blpa::memory::release_cached(dev));
  CHECK(blpa::cuda::reserved_bytes(0) == before);  // the pool the capture took is given back
  auto u = torch::full({1 << 20}, 3.0f, dev);  // eager allocations and kernels work
  CHECK(u.sum().item<float>() == 3.0f * (1 << 20));
  blpa::cuda::Graph good;
  good.capture(0, [&] { t.mul_(2); });
  CHECK(good.captured());
  good.replay();
  good.replay();
  CHECK(t.sum().item<float>() == 4.0f * 1024);  // replays only: the capture ran nothing
  CHECK_NOTHROW(blpa::memory::release_cached(dev));
}
#endif
