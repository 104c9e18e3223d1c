#include "blpa/step.h"

#include <stdexcept>

#if BLPA_WITH_CUDA
#include "graph.h"
#else
namespace blpa::cuda {  // a build without the CUDA library: there is nothing to capture with
class Graph {
 public:
  void capture(int, const std::function<void()>&) { throw std::runtime_error("blpa was built without CUDA"); }
  void replay() { throw std::runtime_error("blpa was built without CUDA"); }
  bool captured() const { return false; }
  int64_t pool_bytes() const { return 0; }
};
}  // namespace blpa::cuda
#endif

namespace blpa {

void sgd_step(torch::optim::SGD& opt, const torch::Tensor& lr) {
  torch::NoGradGuard no_grad;
  TORCH_CHECK(lr.dim() == 0 && lr.scalar_type() == torch::kFloat, "sgd_step: the learning rate must be a 0-dim float "
              "tensor, got ", lr.scalar_type(), " of shape ", lr.sizes());
  const torch::Tensor neg_lr = lr.neg();
  for (auto& group : opt.param_groups()) {
    const auto& o = static_cast<const torch::optim::SGDOptions&>(group.options());
    TORCH_CHECK(o.dampening() == 0 && !o.nesterov(), "sgd_step: dampening and Nesterov momentum are not supported");
    std::vector<torch::Tensor> params, grads, bufs;
    for (auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      params.push_back(p);
      grads.push_back(p.grad());
      if (o.momentum() == 0) continue;
      auto& state = opt.state()[p.unsafeGetTensorImpl()];
      if (!state) {
        // LibTorch's first step clones d_p into the buffer; 0 * momentum + d_p is the same.
        auto s = std::make_unique<torch::optim::SGDParamState>();
        s->momentum_buffer(torch::zeros_like(p));
        state = std::move(s);
      }
      bufs.push_back(static_cast<torch::optim::SGDParamState&>(*state).momentum_buffer());
    }
    if (params.empty()) continue;
    TORCH_CHECK(lr.device() == params.front().device(), "sgd_step: the learning rate is on ", lr.device(),
                " but the parameters on ", params.front().device());
    // LibTorch's update, one operation at a time over all the group's tensors: d_p = g +
    // weight_decay * p; buf = momentum * buf + d_p; p += d_p * -lr. On CUDA each is a few
    // multi-tensor kernels where the per-tensor loop launched one per tensor.
    std::vector<torch::Tensor> d_p = o.weight_decay() != 0 ? at::_foreach_add(grads, params, o.weight_decay()) : grads;
    if (o.momentum() != 0) {
      at::_foreach_mul_(bufs, o.momentum());
      at::_foreach_add_(bufs, d_p);
      d_p = bufs;
    }
    at::_foreach_add_(params, at::_foreach_mul(d_p, neg_lr));
  }
}

struct GraphedStep::Impl {
  Impl(ResNet m, torch::optim::SGD* o, int64_t s) : model(std::move(m)), opt(o), steps(s) {}
  ResNet model;
  torch::optim::SGD* opt;
  int64_t steps;
  cuda::Graph graph;
  torch::Tensor images, labels, lr;  // the graph's inputs
  torch::Tensor total, sum, last;    // this iteration's loss; the sum and last since take_losses
  int64_t pending = 0;               // iterations since take_losses

  void body() {
    const int64_t part = images.size(0) / steps;
    total.zero_();
    for (int64_t j = 0; j < steps; ++j) {
      auto out = model->forward(images.narrow(0, j * part, part));
      auto loss = torch::nn::functional::cross_entropy(out, labels.narrow(0, j * part, part)) /
                  static_cast<double>(steps);
      loss.backward();
      total.add_(loss.detach());
    }
    sgd_step(*opt, lr);
    if (model->config().mode.mode != Mode::plain) model->constrain_();
    sum.add_(total);
    last.copy_(total);
  }
};

GraphedStep::GraphedStep(ResNet& model, torch::optim::SGD& opt, int64_t accum_steps)
    : impl_(std::make_unique<Impl>(model, &opt, accum_steps)) {}

GraphedStep::~GraphedStep() = default;

void GraphedStep::run(const torch::Tensor& images, const torch::Tensor& labels, double lr) {
  Impl& s = *impl_;
  if (!s.graph.captured()) {
    // A tensor that still holds an autograd graph of the parameters (an output or loss of an
    // earlier iteration kept without detach()) keeps their AccumulateGrad nodes, made on that
    // iteration's stream; the captured backward would then wait on that stream, which a
    // capture forbids, and fail with CUDA's "operation would make the legacy stream depend on
    // a capturing blocking stream".
    for (const auto& p : s.model->parameters())
      TORCH_CHECK(!torch::autograd::impl::try_get_grad_accumulator(p), "CUDA graphs: a tensor still holds an autograd "
                  "graph of the model's parameters (an output or loss of an earlier iteration kept without "
                  "detach()); a capture needs none");
    const auto device = s.model->parameters().front().device();
    TORCH_CHECK(device.is_cuda(), "CUDA graphs need the model on a CUDA device");
    TORCH_CHECK(images.size(0) % s.steps == 0, "the batch must split into --accum-steps equal parts");
    s.images = torch::empty(images.sizes(), images.options().device(device));
    s.labels = torch::empty(labels.sizes(), labels.options().device(device));
    s.lr = torch::zeros({}, torch::TensorOptions(torch::kFloat).device(device));
    s.total = torch::zeros({}, s.lr.options());
    s.sum = torch::zeros({}, s.lr.options().dtype(torch::kDouble));
    s.last = torch::zeros({}, s.lr.options());
    // What the capture must find in place: no gradients (the first part's backward assigns
    // them, inside the graph's pool) and every momentum buffer (the update accumulates into
    // them; one created during capture would be made anew at every replay).
    s.opt->zero_grad();
    for (auto& group : s.opt->param_groups()) {
      if (static_cast<const torch::optim::SGDOptions&>(group.options()).momentum() == 0) continue;
      for (auto& p : group.params()) {
        auto& state = s.opt->state()[p.unsafeGetTensorImpl()];
        if (state) continue;
        auto b = std::make_unique<torch::optim::SGDParamState>();
        b->momentum_buffer(torch::zeros_like(p));  // as sgd_step would make it
        state = std::move(b);
      }
    }
    try {
      s.graph.capture(device.index(), [&] { s.body(); });
    } catch (...) {
      s.opt->zero_grad();  // gradients made during the capture point into its discarded pool
      throw;
    }
  }
  TORCH_CHECK(images.sizes() == s.images.sizes(), "a CUDA graph replays one batch shape; got ", images.sizes(),
              " after ", s.images.sizes());
  s.images.copy_(images, /*non_blocking=*/true);
  s.labels.copy_(labels, /*non_blocking=*/true);
  s.lr.fill_(lr);
  s.graph.replay();
  ++s.pending;
}

GraphedStep::Losses GraphedStep::take_losses() {
  Impl& s = *impl_;
  Losses l;
  if (s.pending == 0) return l;
  l.sum = s.sum.item<double>();  // waits for the iterations queued so far
  l.last = s.last.item<double>();
  l.count = s.pending;
  s.sum.zero_();
  s.pending = 0;
  return l;
}

bool GraphedStep::captured() const { return impl_->graph.captured(); }

int64_t GraphedStep::pool_bytes() const { return impl_->graph.pool_bytes(); }

}  // namespace blpa
