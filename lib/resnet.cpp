#include "blpa/resnet.h"

#include <optional>
#include <stdexcept>
#include <utility>

#include "blpa/memory.h"

namespace blpa {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The ImageNet stem's 3x3/2 max-pool (padding 1) keeping, for backward, only which of the
// nine window positions won: one byte per output element. LibTorch's max-pool keeps its
// input and int64 indices, 24 bytes per output element (at ResNet-152, batch 64: 294 MiB,
// a third of what blpa-4 otherwise stores). Backward rebuilds LibTorch's indices and runs
// LibTorch's own max-pool backward: the same kernel, and so the same bits, as plain's.
struct StemMaxPool : torch::autograd::Function<StemMaxPool> {
  static torch::Tensor window_origin(int64_t n, const torch::Tensor& like) {  // 2 o - 1
    return torch::arange(n, like.options().dtype(torch::kLong)).mul_(2).sub_(1);
  }
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x) {
    auto [out, idx] = at::max_pool2d_with_indices(x, {3, 3}, {2, 2}, {1, 1});
    const int64_t W = x.size(3), OH = out.size(2), OW = out.size(3);
    // In place where it can: the int64 indices are twice the output's size.
    auto iw = idx.remainder(W);
    auto dy = idx.sub_(iw).div_(W, "floor").sub_(window_origin(OH, iw).view({1, 1, OH, 1}));
    auto dx = iw.sub_(window_origin(OW, iw).view({1, 1, 1, OW}));
    ctx->saved_data["code"] = dy.mul_(3).add_(dx).to(torch::kByte);  // in the output's layout
    ctx->saved_data["input_sizes"] = x.sizes().vec();
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    const memory::Scope scope("stem max-pool", "backward");
    const torch::Tensor code = ctx->saved_data["code"].toTensor();
    const auto in = ctx->saved_data["input_sizes"].toIntVector();
    const int64_t W = in[3], OH = code.size(2), OW = code.size(3);
    // The winner's index in its input plane: the window's origin (2 oh - 1) W + 2 ow - 1
    // plus (code / 3) W + code % 3, that is code + (code / 3)(W - 3).
    auto c = code.to(torch::kLong);
    auto origin = window_origin(OH, c).mul_(W).view({OH, 1}) + window_origin(OW, c).view({1, OW});
    auto idx = c.div(3, "floor").mul_(W - 3).add_(c).add_(origin);
    c.reset();
    // LibTorch's backward reads only its input's shape and layout: the gradient it writes
    // stands in for the input, which nobody kept.
    auto g = at::empty(in, grad[0].options().memory_format(code.suggest_memory_format()));
    at::max_pool2d_with_indices_backward_out(g, grad[0], g, {3, 3}, {2, 2}, {1, 1}, {1, 1}, false, idx);
    return {g};
  }
};

}  // namespace

torch::Tensor stem_max_pool(const torch::Tensor& x) { return StemMaxPool::apply(x); }

Precision parse_precision(const std::string& s) {
  if (s == "fp32") return Precision::fp32;
  if (s == "tf32") return Precision::tf32;
  if (s == "bf16") return Precision::bf16;
  throw std::invalid_argument("unknown precision '" + s + "' (expected fp32, tf32 or bf16)");
}

std::string to_string(Precision p) {
  switch (p) {
    case Precision::fp32: return "fp32";
    case Precision::tf32: return "tf32";
    case Precision::bf16: return "bf16";
  }
  return "?";
}

at::MemoryFormat parse_layout(const std::string& s) {
  if (s == "nchw") return at::MemoryFormat::Contiguous;
  if (s == "nhwc") return at::MemoryFormat::ChannelsLast;
  throw std::invalid_argument("unknown memory format '" + s + "' (expected nchw or nhwc)");
}

torch::Device parse_device(const std::string& s) {
  const std::string bad = "--device must be cpu, cuda or cuda:N, got '" + s + "'";
  try {
    const torch::Device d(s);
    if (d.is_cpu() || d.is_cuda()) return d;
  } catch (const c10::Error&) {
  }
  throw std::invalid_argument(bad);
}

std::string layout_name(at::MemoryFormat f) { return f == at::MemoryFormat::ChannelsLast ? "nhwc" : "nchw"; }

std::string Numerics::str() const { return to_string(precision) + "-" + layout_name(layout); }

Precision default_precision(const torch::Device& device) {
  return device.is_cuda() ? Precision::tf32 : Precision::fp32;
}

at::MemoryFormat default_layout(const torch::Device& /*device*/, Precision /*p*/) {
  // NHWC everywhere. The CPU: measured faster in every precision and mode (oneDNN's NHWC
  // convolutions; docs/results.md, "Precision and layout"). An H200: faster in bf16 (cuDNN's
  // tensor-core convolutions), and in tf32 for ResNet-152 (1.21-1.31x plain, 1.19-1.25x
  // blpa-4), where NCHW was the default before (docs/results.md, "GPU (NVIDIA H200,
  // 2026-11-30)"). Kept per device and precision for the next measurement that disagrees.
  return at::MemoryFormat::ChannelsLast;
}

Numerics numerics_for(const std::string& precision, const std::string& memory_format, const torch::Device& device) {
  if (precision != "auto" && precision != "fp32" && precision != "tf32" && precision != "bf16")
    throw std::invalid_argument("--precision must be fp32, tf32, bf16 or auto, got '" + precision + "'");
  if (memory_format != "auto" && memory_format != "nchw" && memory_format != "nhwc")
    throw std::invalid_argument("--memory-format must be nchw, nhwc or auto, got '" + memory_format + "'");
  Numerics n;
  n.precision = precision == "auto" ? default_precision(device) : parse_precision(precision);
  if (n.precision == Precision::tf32 && !device.is_cuda())
    throw std::invalid_argument("--precision tf32 needs --device cuda (TF32 is a GPU tensor-core format); on the CPU "
                                "use fp32 or bf16");
  n.layout = memory_format == "auto" ? default_layout(device, n.precision) : parse_layout(memory_format);
  return n;
}

void apply_precision(Precision p, const torch::Device& device) {
  if (p == Precision::tf32 && !device.is_cuda())
    throw std::invalid_argument("precision tf32 is a CUDA precision (TF32 tensor cores); on the CPU use fp32 or bf16");
  if (!device.is_cuda()) return;
  const auto mode = p == Precision::tf32 ? at::Float32Precision::TF32 : at::Float32Precision::IEEE;
  auto& ctx = at::globalContext();
  ctx.setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::CONV, mode);
  ctx.setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL, mode);
}

BlockImpl::BlockImpl(int64_t in_channels, int64_t width, int64_t stride, const ModeConfig& mode) {
  const int64_t out = 4 * width;
  projection = stride != 1 || in_channels != out;
  std::vector<ConvSpec> first{{width, 1, 1, 0}};
  if (projection) first.push_back({out, 1, stride, 0});
  u1 = register_module("u1", Unit(in_channels, first, mode));
  u2 = register_module("u2", Unit(width, std::vector<ConvSpec>{{width, 3, stride, 1}}, mode));
  u3 = register_module("u3", Unit(width, std::vector<ConvSpec>{{out, 1, 1, 0}}, mode));
}

torch::Tensor BlockImpl::forward(const torch::Tensor& x) {
  const memory::Scope scope(label, "forward");
  // Each unit's output is released once the next unit has consumed it, and outside plain mode
  // the shortcut is added in place: no full-size tensor outlives its use.
  auto y1 = u1->forward(x);
  const torch::Tensor shortcut = projection ? std::move(y1[1]) : x;
  auto h = u2->forward(std::exchange(y1[0], {}))[0];
  auto y = u3->forward(std::exchange(h, {}))[0];
  return u1->mode().mode == Mode::plain ? y + shortcut : y.add_(shortcut);
}

std::vector<int> imagenet_stages(int depth) {
  switch (depth) {
    case 50: return {3, 4, 6, 3};
    case 101: return {3, 4, 23, 3};
    case 152: return {3, 8, 36, 3};
    case 200: return {3, 24, 36, 3};
  }
  throw std::invalid_argument("imagenet depth must be 50, 101, 152 or 200, got " + std::to_string(depth));
}

ResNetImpl::ResNetImpl(const NetConfig& config) : config_(config) {
  std::vector<int> stages;
  std::vector<int64_t> widths;
  int64_t channels;
  if (config.arch == "cifar") {
    if (config.depth < 11 || (config.depth - 2) % 9 != 0)
      throw std::invalid_argument("cifar depth must be 9n+2 with n >= 1 (e.g. 56, 110, 164, 1001), got " +
                                  std::to_string(config.depth));
    const int n = (config.depth - 2) / 9;
    stages = {n, n, n};
    widths = {16, 32, 64};
    channels = 16;
    stem = register_module("stem", torch::nn::Conv2d(torch::nn::Conv2dOptions(config.in_channels, channels, 3)
                                                         .padding(1).bias(false)));
  } else if (config.arch == "imagenet") {
    stages = imagenet_stages(config.depth);
    widths = {64, 128, 256, 512};
    channels = 64;
    stem = register_module("stem", torch::nn::Conv2d(torch::nn::Conv2dOptions(config.in_channels, channels, 7)
                                                         .stride(2).padding(3).bias(false)));
  } else {
    throw std::invalid_argument("arch must be cifar or imagenet, got '" + config.arch + "'");
  }
  torch::nn::init::kaiming_normal_(stem->weight, 0.0, torch::kFanOut, torch::kReLU);
  blocks = register_module("blocks", torch::nn::ModuleList());
  for (size_t s = 0; s < stages.size(); ++s) {
    for (int b = 0; b < stages[s]; ++b) {
      const int64_t stride = (s > 0 && b == 0) ? 2 : 1;
      blocks->push_back(Block(channels, widths[s], stride, config.mode));
      channels = 4 * widths[s];
    }
  }
  final_unit = register_module("final", Unit(channels, std::vector<ConvSpec>{}, config.mode));
  fc = register_module("fc", torch::nn::Linear(channels, config.num_classes));
  for (size_t i = 0; i < blocks->size(); ++i) blocks->ptr(i)->as<BlockImpl>()->label = "block" + std::to_string(i);
  for (auto& [name, u] : units()) u->label = name;
}

namespace {

// blpa and naive, training: every unit's channel coding (blpa/codec.h) in one pass over all
// the network's channels, each unit given its slice: on a GPU one launch (and the two
// concatenations') instead of one per unit, 163 in ResNet-164; the same values, the coding
// being per channel. The units forget what they did not use when the forward ends, however it
// ends, so that none keeps a coding of weights since updated.
class ChannelCodings {
 public:
  ChannelCodings(std::vector<std::pair<std::string, Unit>>& units, const ModeConfig& mode) : units_(units) {
    torch::NoGradGuard no_grad;
    std::vector<torch::Tensor> gammas, betas;
    for (auto& [name, u] : units_) gammas.push_back(u->gamma), betas.push_back(u->beta);
    const ChannelCoding all = channel_coding(at::cat(gammas), at::cat(betas), kGammaMinF, mode.codes_format(),
                                             mode.mode == Mode::blpa);
    int64_t first = 0;
    for (auto& [name, u] : units_) {
      const int64_t c = u->gamma.numel();
      u->set_channel_coding(
          {all.g.narrow(0, first, c), all.b.narrow(0, first, c), all.offsets.narrow(0, first, c), all.format});
      first += c;
    }
  }
  ~ChannelCodings() {
    for (auto& [name, u] : units_) u->take_channel_coding();
  }
  ChannelCodings(const ChannelCodings&) = delete;
  ChannelCodings& operator=(const ChannelCodings&) = delete;

 private:
  std::vector<std::pair<std::string, Unit>>& units_;
};

}  // namespace

torch::Tensor ResNetImpl::forward(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 4 && x.size(1) == config_.in_channels, "model expects N x ", config_.in_channels,
              " x H x W images, got ", x.sizes());
  std::vector<std::pair<std::string, Unit>> coded_units;
  std::optional<ChannelCodings> codings;
  if (is_training() && (config_.mode.mode == Mode::blpa || config_.mode.mode == Mode::naive)) {
    coded_units = units();
    codings.emplace(coded_units, config_.mode);
  }
  // The images, the stem's and the classifier's weights in the run's dtype and layout (no copy
  // in fp32 NCHW); the classifier's outputs, and so the loss, in float32.
  const auto dtype = numerics_.dtype();
  auto cast = [&](const torch::Tensor& t) {
    return t.to(t.options().dtype(dtype), false, false, t.dim() == 4 ? numerics_.layout : at::MemoryFormat::Preserve);
  };
  torch::Tensor h;
  {
    const memory::Scope scope("stem", "forward");
    const auto& o = stem->options;
    h = at::conv2d(cast(x), cast(stem->weight), {}, o.stride(), std::get<torch::ExpandingArray<2>>(o.padding()));
    if (config_.arch == "imagenet")  // plain: LibTorch's own, the oracle
      h = config_.mode.mode == Mode::plain || !is_training() ? torch::max_pool2d(h, 3, 2, 1) : stem_max_pool(h);
  }
  for (const auto& m : *blocks) h = m->as<BlockImpl>()->forward(h);
  h = final_unit->forward(h)[0];
  const memory::Scope scope("classifier", "forward");
  // mean() rather than adaptive pooling: its backward needs only the shape, so nothing is kept.
  return at::linear(h.mean({2, 3}), cast(fc->weight), cast(fc->bias)).to(at::kFloat);
}

// As PyTorch's users convert a model with .to(memory_format=torch.channels_last). In float32
// NHWC the weights were cast to the layout at each forward: a copy of every one, kept by
// autograd for the backward and counted as stored (ResNet-50's 90 MiB beside its activations).
// set_data keeps each parameter's identity (the optimiser's state is keyed by it). By the
// strides `to` reads (suggest_memory_format), not is_contiguous: a 1 x 1 kernel's NCHW strides
// are contiguous in both layouts, yet `to` copied it.
void ResNetImpl::set_numerics(const Numerics& n) {
  numerics_ = n;
  torch::NoGradGuard no_grad;
  for (auto& p : parameters())
    if (p.dim() == 4 && p.suggest_memory_format() != n.layout) p.set_data(p.clone(n.layout));
}

std::vector<std::pair<std::string, Unit>> ResNetImpl::units() const {
  std::vector<std::pair<std::string, Unit>> out;
  for (size_t i = 0; i < blocks->size(); ++i) {
    auto* b = blocks->ptr(i)->as<BlockImpl>();
    const std::string prefix = "block" + std::to_string(i) + ".";
    out.emplace_back(prefix + "u1", b->u1);
    out.emplace_back(prefix + "u2", b->u2);
    out.emplace_back(prefix + "u3", b->u3);
  }
  out.emplace_back("final", final_unit);
  return out;
}

std::vector<UnitRow> ResNetImpl::memory_table() const {
  std::vector<UnitRow> rows;
  for (const auto& [name, u] : units()) rows.push_back({name, u->memory()});
  return rows;
}

int64_t ResNetImpl::stored_unit_bytes() const {
  int64_t total = 0;
  for (const auto& [name, u] : units()) total += u->memory().total();
  return total;
}

void ResNetImpl::constrain_() {
  // Every unit's clamp in one operation: a few multi-tensor kernels on CUDA, not one per unit.
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> gammas;
  for (auto& [name, u] : units()) gammas.push_back(u->gamma);
  at::_foreach_clamp_min_(gammas, kGammaMin);
}

}  // namespace blpa
