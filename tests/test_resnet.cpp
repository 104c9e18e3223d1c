// Whole networks: shapes, parameter counts, gradient fidelity against plain, memory.
#include <blpa/memory.h>
#include <blpa/resnet.h>

#include "test_support.h"

using blpa::Mode;
using blpa::ModeConfig;
using blpa::NetConfig;
using blpa::ResNet;

namespace {

int64_t count_params(const ResNet& net) {
  int64_t n = 0;
  for (const auto& p : net->parameters()) n += p.numel();
  return n;
}

ResNet make_net(int depth, ModeConfig mode, int64_t in_channels = 3, int64_t classes = 10) {
  NetConfig c;
  c.arch = "cifar";
  c.depth = depth;
  c.in_channels = in_channels;
  c.num_classes = classes;
  c.mode = mode;
  return ResNet(c);
}

// Gradients of every parameter after one forward/backward of a cross-entropy loss, with
// the weights of `like` (so every mode sees the same network and the same batch).
std::vector<torch::Tensor> gradients(int depth, ModeConfig mode, const ResNet& like, const torch::Tensor& x,
                                     const torch::Tensor& labels, const blpa::Numerics& numerics = {}) {
  auto net = make_net(depth, mode);
  net->set_numerics(numerics);
  {
    torch::NoGradGuard g;
    auto src = like->parameters();
    auto dst = net->parameters();
    for (size_t i = 0; i < src.size(); ++i) dst[i].copy_(src[i]);
  }
  net->train();
  torch::nn::functional::cross_entropy(net->forward(x), labels).backward();
  std::vector<torch::Tensor> g;
  for (const auto& p : net->parameters()) g.push_back(p.grad().flatten());
  return g;
}

double cosine(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.dot(b) / (a.norm() * b.norm() + 1e-30)).item<double>();
}

// A freshly initialised network has beta = 0 and gamma = 1, where blpa's offset equals
// naive's. Trained networks do not: draw the affine parameters as training leaves them.
void randomise_affine(const ResNet& net) {
  torch::NoGradGuard g;
  for (auto& [name, u] : net->units()) {
    u->gamma.uniform_(0.5, 1.5);
    u->beta.normal_(0, 0.5);
  }
}

struct Batch {
  torch::Tensor x, labels;
};

Batch random_batch(int64_t n, int64_t hw, uint64_t seed) {
  torch::manual_seed(seed);
  return {torch::randn({n, 3, hw, hw}), torch::randint(0, 10, {n})};
}

}  // namespace

TEST_CASE("resnet: ResNet-164 and ResNet-152 have the published sizes and output shapes", "[resnet]") {
  auto r164 = make_net(164, {Mode::blpa, 4});
  const int64_t p164 = count_params(r164);
  std::cout << "ResNet-164 parameters: " << p164 << std::endl;
  CHECK(p164 == 1703258);
  CHECK(r164->units().size() == 3 * 54 + 1);

  NetConfig c;
  c.arch = "imagenet";
  c.depth = 152;
  c.num_classes = 1000;
  ResNet r152(c);
  const int64_t p152 = count_params(r152);
  std::cout << "ResNet-152 parameters: " << p152 << std::endl;
  CHECK(p152 == 60185128);

  torch::NoGradGuard g;
  r164->eval();
  CHECK(r164->forward(torch::randn({2, 3, 32, 32})).sizes() == std::vector<int64_t>{2, 10});
  r152->eval();
  CHECK(r152->forward(torch::randn({1, 3, 64, 64})).sizes() == std::vector<int64_t>{1, 1000});
  auto fashion = make_net(11, {Mode::blpa, 4}, 1, 10);  // Fashion-MNIST: 1 x 28 x 28
  fashion->eval();
  CHECK(fashion->forward(torch::randn({3, 1, 28, 28})).sizes() == std::vector<int64_t>{3, 10});
  CHECK_THROWS_WITH(make_net(50, {Mode::blpa, 4}), Catch::Contains("9n+2"));
}

TEST_CASE("resnet: exact mode gives plain's gradients and blpa's cosine to plain is high", "[resnet]") {
  const int depth = 20;
  auto batch = random_batch(8, 32, 50);
  torch::manual_seed(51);
  auto init = make_net(depth, {Mode::plain, 8});
  randomise_affine(init);
  auto plain = gradients(depth, {Mode::plain, 8}, init, batch.x, batch.labels);
  auto exact = gradients(depth, {Mode::exact, 8}, init, batch.x, batch.labels);
  auto b8 = gradients(depth, {Mode::blpa, 8}, init, batch.x, batch.labels);
  auto b4 = gradients(depth, {Mode::blpa, 4}, init, batch.x, batch.labels);
  double min_exact = 1, min8 = 1, min4 = 1;
  for (size_t i = 0; i < plain.size(); ++i) {
    CHECK(torch::allclose(exact[i], plain[i], 1e-3, 1e-5));
    min_exact = std::min(min_exact, cosine(exact[i], plain[i]));
    min8 = std::min(min8, cosine(b8[i], plain[i]));
    min4 = std::min(min4, cosine(b4[i], plain[i]));
  }
  std::cout << "ResNet-" << depth << " minimum cosine to plain over " << plain.size()
            << " parameter gradients: exact " << min_exact << ", blpa-8 " << min8 << ", blpa-4 " << min4 << std::endl;
  CHECK(min_exact > 0.99999);
  CHECK(min8 >= 0.99);
  CHECK(min4 >= 0.95);
}

TEST_CASE("resnet: naive quantisation drifts further from plain than blpa, more so with depth", "[resnet]") {
  auto batch = random_batch(8, 16, 60);
  for (int depth : {20, 56, 110}) {
    torch::manual_seed(61);
    auto init = make_net(depth, {Mode::plain, 8});
    randomise_affine(init);
    auto plain = gradients(depth, {Mode::plain, 8}, init, batch.x, batch.labels);
    for (int bits : {8, 4}) {
      auto b = gradients(depth, {Mode::blpa, bits}, init, batch.x, batch.labels);
      auto n = gradients(depth, {Mode::naive, bits}, init, batch.x, batch.labels);
      auto all = [](const std::vector<torch::Tensor>& v) { return torch::cat(v); };
      const double eb = ((all(b) - all(plain)).norm() / all(plain).norm()).item<double>();
      const double en = ((all(n) - all(plain)).norm() / all(plain).norm()).item<double>();
      std::cout << "depth " << depth << ", " << bits << "-bit: relative gradient error blpa " << eb << ", naive "
                << en << std::endl;
      CAPTURE(depth, bits, eb, en);
      CHECK(en > 2 * eb);
    }
  }
}

TEST_CASE("resnet: in bf16 blpa-4's gradient error against bf16 plain stays within 1.5x of fp32's and naive's grows with depth",
          "[resnet][bf16]") {
  const blpa::Numerics fp32, bf16{blpa::Precision::bf16, at::MemoryFormat::ChannelsLast};
  auto batch = random_batch(8, 16, 60);
  auto all = [](const std::vector<torch::Tensor>& v) { return torch::cat(v); };
  auto rel = [&](const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& ref) {
    return ((all(a) - all(ref)).norm() / all(ref).norm()).item<double>();
  };
  std::vector<double> naive_err;
  for (int depth : {20, 56, 110}) {
    torch::manual_seed(61);
    auto init = make_net(depth, {Mode::plain});
    randomise_affine(init);
    auto grads = [&](ModeConfig m, const blpa::Numerics& n) { return gradients(depth, m, init, batch.x, batch.labels, n); };
    const auto plain32 = grads({Mode::plain}, fp32), plain16 = grads({Mode::plain}, bf16);
    const double e32 = rel(grads({Mode::blpa, 4}, fp32), plain32);
    const double e16 = rel(grads({Mode::blpa, 4}, bf16), plain16);
    const double n16 = rel(grads({Mode::naive, 4}, bf16), plain16);
    const double p16 = rel(plain16, plain32);  // what bf16 itself changes
    std::cout << "depth " << depth << ": blpa-4 relative gradient error fp32 " << e32 << ", bf16-nhwc " << e16
              << " (naive-4 " << n16 << "; bf16 plain vs fp32 plain " << p16 << ")" << std::endl;
    CAPTURE(depth, e32, e16, n16, p16);
    CHECK(e16 <= 1.5 * e32);
    CHECK(n16 > 2 * e16);
    naive_err.push_back(n16);
  }
  CHECK(naive_err.back() > naive_err.front());
}

// The network codes all its units' channels in one pass (one launch on a GPU, not one per
// unit); each unit's own coding, used when a unit runs alone, must give the same bits.
TEST_CASE("resnet: the network's one-pass channel coding gives each unit's own, bit for bit", "[resnet]") {
  for (const ModeConfig mode : {ModeConfig{Mode::blpa, 4}, ModeConfig{Mode::naive, 8}, ModeConfig{Mode::blpa, 2}}) {
    CAPTURE(mode.str());
    torch::manual_seed(11);
    auto a = make_net(29, mode), b = make_net(29, mode);
    randomise_affine(a);
    {
      torch::NoGradGuard g;
      a->units().front().second->gamma[0] = 1e-9f;  // below the floor: clamped by the coding
      auto pa = a->parameters(), pb = b->parameters();
      for (size_t i = 0; i < pa.size(); ++i) pb[i].copy_(pa[i]);
    }
    const auto batch = random_batch(4, 12, 5);
    a->train(), b->train();
    // a: the network's forward. b: the same layers run one by one, so that each unit codes
    // its own channels.
    torch::nn::functional::cross_entropy(a->forward(batch.x), batch.labels).backward();
    for (auto& [name, u] : a->units()) CHECK(!u->take_channel_coding().g.defined());  // none left over
    const auto parts = b->named_children();
    auto h = at::conv2d(batch.x, parts["stem"]->as<torch::nn::Conv2d>()->weight, {}, 1, 1);
    for (const auto& m : *parts["blocks"]->as<torch::nn::ModuleList>()) h = m->as<blpa::BlockImpl>()->forward(h);
    h = parts["final"]->as<blpa::Unit>()->forward(h)[0];
    const auto fc = parts["fc"]->as<torch::nn::Linear>();
    torch::nn::functional::cross_entropy(at::linear(h.mean({2, 3}), fc->weight, fc->bias), batch.labels).backward();
    const auto na = a->named_parameters(), nb = b->named_parameters();
    for (const auto& e : na) {
      CAPTURE(e.key());
      CHECK(torch::equal(e.value().grad(), nb[e.key()].grad()));
    }
    for (const auto& e : a->named_buffers()) CHECK(torch::equal(e.value(), b->named_buffers()[e.key()]));
  }
}

TEST_CASE("resnet: in blpa mode the graph holds codes and metadata, not activations", "[resnet][memory]") {
  blpa::memory::install_cpu_counter();
  const torch::Device cpu(torch::kCPU);
  auto batch = random_batch(4, 16, 70);
  std::map<std::string, int64_t> held;
  const ModeConfig b8{Mode::blpa, 8}, b4{Mode::blpa, 4}, b2{Mode::blpa, 2};
  for (ModeConfig mode : {ModeConfig{Mode::plain, 8}, ModeConfig{Mode::exact, 8}, b8, b4, b2}) {
    torch::manual_seed(71);
    auto net = make_net(29, mode);
    net->train();
    const int64_t before = blpa::memory::allocated(cpu);
    auto out = net->forward(batch.x);
    held[mode.str()] = blpa::memory::allocated(cpu) - before - out.nbytes();
    if (mode.mode != Mode::blpa) continue;

    int64_t elements = 0, channels = 0;
    for (const auto& row : net->memory_table()) {
      int64_t n = 1;
      for (auto s : row.memory.input_sizes) n *= s;
      elements += n;
      channels += row.memory.input_sizes[1];
      CHECK(row.memory.full_bytes == 0);
      CHECK(row.memory.code_bytes == (n * mode.bits + 7) / 8);
    }
    // Beyond the units, the graph keeps only the pooled features for the classifier (N x 256).
    const int64_t other = 4 * 256 * 4;
    CAPTURE(mode.str(), held[mode.str()], elements);
    CHECK(held[mode.str()] == net->stored_unit_bytes() + other);
    CHECK(held[mode.str()] <= elements * 4 * mode.bits / 32 + channels * 13 + other);  // 3 floats + 1 byte per channel
  }
  std::cout << "ResNet-29, batch 4, 16x16: bytes held by autograd after forward: plain " << held.at("plain")
            << ", exact " << held.at("exact") << ", blpa-8 " << held.at(b8.str()) << ", blpa-4 " << held.at(b4.str())
            << ", blpa-2 " << held.at(b2.str()) << std::endl;
  CHECK(held.at("exact") < held.at("plain"));
  CHECK(held.at("plain") > 12 * held.at(b4.str()));
  CHECK(held.at("plain") > 20 * held.at(b2.str()));
}

TEST_CASE("CUDA: a small network trains the same on CPU and GPU", "[resnet][cuda]") {
  BLPA_REQUIRE_CUDA();
  NoTF32 fp32;
  auto batch = random_batch(8, 16, 80);
  torch::manual_seed(81);
  auto cpu_net = make_net(20, {Mode::blpa, 4});
  auto gpu_net = make_net(20, {Mode::blpa, 4});
  {
    torch::NoGradGuard g;
    auto s = cpu_net->parameters();
    auto d = gpu_net->parameters();
    for (size_t i = 0; i < s.size(); ++i) d[i].copy_(s[i]);
  }
  gpu_net->to(torch::kCUDA);
  torch::nn::functional::cross_entropy(cpu_net->forward(batch.x), batch.labels).backward();
  torch::nn::functional::cross_entropy(gpu_net->forward(batch.x.cuda()), batch.labels.cuda()).backward();
  auto pc = cpu_net->parameters();
  auto pg = gpu_net->parameters();
  for (size_t i = 0; i < pc.size(); ++i) CHECK(cosine(pc[i].grad().flatten(), pg[i].grad().cpu().flatten()) > 0.999);
}

namespace {

// The stem's max-pool against LibTorch's, to the bit, forward and backward, in every dtype and
// layout of the input and of the output's gradient, on `device`.
void check_stem_max_pool(const torch::Device& device) {
  torch::manual_seed(12);
  const std::vector<std::vector<int64_t>> shapes{
      {2, 3, 112, 112}, {1, 4, 7, 9}, {3, 2, 2, 5}, {2, 3, 5, 2}, {2, 3, 2, 2}};
  const auto layouts = {at::MemoryFormat::Contiguous, at::MemoryFormat::ChannelsLast};
  for (const auto& shape : shapes) {
    for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
      for (auto layout : layouts) {
        for (auto grad_layout : layouts) {
          CAPTURE(shape, dtype, layout, grad_layout);
          auto x = torch::randn(shape).to(device, dtype).contiguous(layout).requires_grad_();
          auto ref = torch::max_pool2d(x, 3, 2, 1);
          auto out = blpa::stem_max_pool(x);
          CHECK(torch::equal(out, ref));
          auto probe = torch::randn(ref.sizes()).to(device, dtype).contiguous(grad_layout);
          // The gradients as the two backwards return them (x.grad() would be restrided to x).
          auto want = torch::autograd::grad({ref}, {x}, {probe})[0];
          auto got = torch::autograd::grad({out}, {x}, {probe})[0];
          CHECK(torch::equal(got, want));  // LibTorch's own backward, from the same indices
          CHECK(got.strides() == want.strides());
        }
      }
    }
  }
}

}  // namespace

TEST_CASE("resnet: the compact stem max-pool equals LibTorch's forward and backward", "[resnet]") {
  check_stem_max_pool(torch::kCPU);
  // What it keeps: one byte per output element.
  blpa::memory::install_cpu_counter();
  auto x = torch::randn({2, 8, 30, 30}).requires_grad_();
  const int64_t before = blpa::memory::allocated(torch::kCPU);
  auto y = blpa::stem_max_pool(x);
  CHECK(blpa::memory::allocated(torch::kCPU) - before - static_cast<int64_t>(y.nbytes()) == y.numel());
}

TEST_CASE("CUDA: the compact stem max-pool equals LibTorch's on the GPU", "[resnet][cuda]") {
  BLPA_REQUIRE_CUDA();
  check_stem_max_pool(torch::kCUDA);
}
