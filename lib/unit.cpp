// The unit as a custom autograd Function (docs/method.md, "Backward of a unit").
#include "blpa/unit.h"

#include <fmt/format.h>

#include <charconv>
#include <cmath>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <tuple>

#include "blpa/codec.h"
#include "blpa/memory.h"

namespace blpa {
namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

Tensor per_channel(const Tensor& t) { return t.view({1, -1, 1, 1}); }

// LibTorch 2.15's oneDNN (3.13) on a CPU without AVX-512 gets the weight gradient of a 1x1
// convolution of stride > 1 on channels-last tensors wrong when its input has few channels
// (errors of 40-120% with 4 to 7 of them, none measured with 8 to 2048) and can write past its
// buffers (a heap corruption, with 2): measured on an AVX2 EPYC, docs/results.md, "A LibTorch
// bug". Such a convolution reads only every stride-th row and column, so on the CPU one with
// under 16 input channels (none of the networks' has) runs as one of stride 1 on those, in
// every mode: another of oneDNN's kernels, right on every machine measured.
bool pointwise_strided_on_cpu(const Tensor& input, const Tensor& weight, int64_t stride, int64_t padding) {
  return input.is_cpu() && input.size(1) < 16 && stride > 1 && padding == 0 && weight.size(2) == 1 &&
         weight.size(3) == 1 && input.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

Tensor every_stride(const Tensor& x, int64_t stride) {
  return x.slice(2, 0, std::nullopt, stride).slice(3, 0, std::nullopt, stride);
}

Tensor conv2d(const Tensor& input, const Tensor& weight, int64_t stride, int64_t padding) {
  if (pointwise_strided_on_cpu(input, weight, stride, padding))
    return at::conv2d(every_stride(input, stride).contiguous(at::MemoryFormat::ChannelsLast), weight);
  return at::conv2d(input, weight, {}, stride, padding);
}

// LibTorch's convolution backward, of the same convolutions as conv2d: the input gradient
// (weight false; `input` is read for its shape) or the weight's.
Tensor conv2d_backward(const Tensor& grad_y, const Tensor& input, const Tensor& weight, int64_t stride,
                       int64_t padding, bool for_weight) {
  const bool around = pointwise_strided_on_cpu(input, weight, stride, padding);
  const auto layout = at::MemoryFormat::ChannelsLast;
  const Tensor read = around ? every_stride(input, stride).contiguous(layout) : input;
  const int64_t s = around ? 1 : stride, p = around ? 0 : padding;
  const auto grads = at::convolution_backward(grad_y, read, weight, std::nullopt, {s, s}, {p, p}, {1, 1}, false,
                                              {0, 0}, 1, {!for_weight, for_weight, false});
  if (for_weight) return std::get<1>(grads);
  if (!around) return std::get<0>(grads);
  Tensor g = at::empty(input.sizes(), std::get<0>(grads).options().memory_format(layout)).zero_();
  every_stride(g, stride).copy_(std::get<0>(grads));
  return g;
}

// Whether a blpa unit fuses its forward (UnitImpl::fused_forward) when the unit does not say:
// on CUDA; BLPA_FUSED_FORWARD=0 or 1 in the environment sets it for every device, for
// measurements (the fused against the unfused forward).
bool fused_by_default(const Tensor& x) {
  static const int chosen = [] {
    const char* v = std::getenv("BLPA_FUSED_FORWARD");
    if (!v || !*v) return -1;
    TORCH_CHECK(std::string(v) == "0" || std::string(v) == "1", "BLPA_FUSED_FORWARD must be 0 or 1, got '", v, "'");
    return *v - '0';
  }();
  return chosen < 0 ? x.is_cuda() : chosen == 1;
}

Codes codes_from(AutogradContext* ctx) {
  Codes c;
  c.data = ctx->saved_data["codes"].toTensor();
  c.offsets = ctx->saved_data["offsets"].toTensor();
  c.sizes = ctx->saved_data["sizes"].toIntVector();
  c.channels_last = ctx->saved_data["codes_channels_last"].toBool();
  c.format = {static_cast<int>(ctx->saved_data["bits"].toInt()),
              static_cast<float>(ctx->saved_data["window"].toDouble()),
              static_cast<float>(ctx->saved_data["lift"].toDouble())};
  return c;
}

struct UnitFunction : torch::autograd::Function<UnitFunction> {
  // w0, w1: the unit's convolution weights, absent when it has fewer than two.
  static variable_list forward(AutogradContext* ctx, Tensor x, Tensor gamma, Tensor beta,
                               std::optional<Tensor> w0, std::optional<Tensor> w1, UnitImpl* unit,
                               UnitMemory* memory) {
    const ModeConfig& mode = unit->mode();
    // blpa and naive: g = max(gamma, 1e-8), the window's centre b and the offsets of the codes
    // in one pass over the channels (one launch on a GPU, where a small step is bound by the
    // host's launches), or the network's, made for all its units in one pass.
    ChannelCoding cc;
    if (mode.mode != Mode::exact) {
      cc = unit->take_channel_coding();
      if (!cc.g.defined()) cc = channel_coding(gamma, beta, kGammaMinF, mode.codes_format(), mode.mode == Mode::blpa);
      const CodeFormat f = mode.codes_format();
      TORCH_CHECK(cc.g.numel() == gamma.numel() && cc.format.bits == f.bits && cc.format.window == f.window &&
                      cc.format.lift == f.lift,
                  "unit: the channel coding given (", cc.g.numel(), " channels, ", cc.format.bits, " bits, window ",
                  cc.format.window, ", lift ", cc.format.lift, ") is not this unit's (", gamma.numel(),
                  " channels, ", f.bits, " bits, window ", f.window, ", lift ", f.lift, ")");
    }
    const Tensor g = mode.mode == Mode::exact ? gamma.clamp_min(kGammaMin) : cc.g;
    Tensor a, mean, invstd, r;
    Codes codes;
    const bool fused = unit->fused_forward.has_value() ? *unit->fused_forward : fused_by_default(x);
    if (mode.mode == Mode::blpa && fused) {
      // The batch statistics (updating the running ones) by LibTorch: on the CPU the bits of
      // its BatchNorm's; on a GPU its native kernels', where the unfused path may take
      // cuDNN's, which round otherwise. Then r = max(a, 0) and the codes of a / g in one
      // pass over x, a never stored.
      Tensor var;
      std::tie(mean, var) = at::batch_norm_update_stats(x, unit->running_mean, unit->running_var, unit->momentum);
      BnPacked packed = bn_relu_pack(x, mean, var, static_cast<float>(unit->eps), beta, cc);
      r = std::move(packed.r);
      invstd = std::move(packed.invstd);
      codes = std::move(packed.codes);
    } else {
      // a = gamma * x_hat + beta with batch statistics; updates the running statistics. The
      // same LibTorch operator, and so the same kernel (cuDNN's on a GPU), as plain's batch_norm.
      std::tie(a, mean, invstd, std::ignore) = at::_batch_norm_with_update(
          x, g, beta, unit->running_mean, unit->running_var, unit->momentum, unit->eps);
    }
    *memory = UnitMemory{};
    memory->input_sizes = x.sizes().vec();
    ctx->saved_data["invstd"] = invstd;
    memory->metadata_bytes += invstd.nbytes();
    // x_hat in float32 whatever x's dtype (bf16 x promotes), in x's layout.
    const auto layout = x.suggest_memory_format();
    auto normalised = [&] { return ((x - per_channel(mean)) * per_channel(invstd)).contiguous(layout); };

    if (mode.mode != Mode::blpa) {  // their backward runs LibTorch's BatchNorm backward on x_hat'
      ctx->saved_data["zeros"] = unit->zeros_like_channels(invstd);  // shared, not per step
      ctx->saved_data["ones"] = unit->ones_like_channels(invstd);
    }
    if (mode.mode == Mode::exact) {
      Tensor x_hat = normalised();
      ctx->saved_data["x_hat"] = x_hat;
      memory->full_bytes += x_hat.nbytes();
    } else {
      // blpa: codes of v = a / gamma, windowed around b = beta / gamma, so the mask of the
      // codes is the sign of a: exactly the forward ReLU's, applied in the same pass over a.
      // naive: codes of x_hat around 0. g and b are kept for backward (C floats each), which
      // saves recomputing them there.
      if (mode.mode == Mode::blpa && !codes.defined()) {  // (fused: made with r above)
        r = a.contiguous(layout);
        codes = pack_relu_(r, cc);
      } else if (mode.mode == Mode::naive) {
        codes = pack(normalised(), cc);
      }
      ctx->saved_data["g"] = cc.g;
      ctx->saved_data["b"] = cc.b;
      memory->metadata_bytes += cc.g.nbytes() + cc.b.nbytes();
      ctx->saved_data["codes"] = codes.data;
      ctx->saved_data["offsets"] = codes.offsets;
      ctx->saved_data["sizes"] = codes.sizes;
      ctx->saved_data["codes_channels_last"] = codes.channels_last;
      ctx->saved_data["bits"] = static_cast<int64_t>(codes.format.bits);
      ctx->saved_data["window"] = static_cast<double>(codes.format.window);
      ctx->saved_data["lift"] = static_cast<double>(codes.format.lift);
      memory->code_bytes += codes.data.nbytes();
      memory->metadata_bytes += codes.offsets.nbytes();
    }
    ctx->save_for_backward({gamma, beta, w0.value_or(Tensor()), w1.value_or(Tensor())});

    std::vector<int64_t> geometry;
    for (const ConvSpec& c : unit->convs) geometry.insert(geometry.end(), {c.stride, c.padding});
    ctx->saved_data["geometry"] = geometry;
    ctx->saved_data["mode"] = static_cast<int64_t>(mode.mode);
    ctx->saved_data["dtype"] = static_cast<int64_t>(x.scalar_type());
    ctx->saved_data["channels_last"] = layout == at::MemoryFormat::ChannelsLast;
    ctx->saved_data["label"] = unit->label;

    if (!r.defined()) r = at::relu_(a);
    if (unit->convs.empty()) return {r};
    variable_list y;
    for (size_t i = 0; i < unit->convs.size(); ++i) {
      const ConvSpec& c = unit->convs[i];
      y.push_back(conv2d(r, i == 0 ? *w0 : *w1, c.stride, c.padding));
    }
    return y;
  }

  // grad_y by reference: it holds the engine's only references to the output gradients, so
  // resetting an entry frees that gradient at its last use.
  static variable_list backward(AutogradContext* ctx, variable_list& grad_y) {
    const auto saved = ctx->get_saved_variables();
    const memory::Scope scope(ctx->saved_data["label"].toStringRef(), "backward");
    const Tensor &gamma = saved[0], &beta = saved[1];
    const auto mode = static_cast<Mode>(ctx->saved_data["mode"].toInt());
    const Tensor g = mode == Mode::exact ? gamma.clamp_min(kGammaMin) : ctx->saved_data["g"].toTensor();
    const Tensor invstd = ctx->saved_data["invstd"].toTensor();
    const auto geometry = ctx->saved_data["geometry"].toIntVector();
    // The activations' dtype (float32 or bfloat16: the convolutions', and that of the gradient
    // returned for x) and layout; the BatchNorm's own arithmetic is float32.
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    const auto layout = ctx->saved_data["channels_last"].toBool() ? at::MemoryFormat::ChannelsLast
                                                                   : at::MemoryFormat::Contiguous;

    Codes codes;
    Tensor x_hat;  // x_hat', full precision in exact mode
    if (mode == Mode::exact) {
      x_hat = ctx->saved_data["x_hat"].toTensor();
    } else {
      codes = codes_from(ctx);
      if (mode == Mode::naive) x_hat = unpack(codes, ctx->saved_data["b"].toTensor(), {}, kXhat).x_hat;
    }

    // Convolutions: g_W from r' (approximate), g_r from W (exact), by separate calls of LibTorch's
    // convolution backward (the kernels and bits of one call asking for both), so that the
    // scratch of one is not alive during the other. All weight gradients first, while r' lives.
    Tensor g_r;
    Tensor r;  // r' (exact and naive: also their mask, r' > 0)
    if (mode != Mode::blpa) r = at::addcmul(per_channel(beta), x_hat, per_channel(g)).relu_();
    variable_list g_w(2);
    const size_t n_conv = geometry.size() / 2;
    if (n_conv == 0) {
      g_r = std::move(grad_y[0]);
    } else {
      if (mode == Mode::blpa) r = unpack(codes, {}, g, kRelu, dtype).r;
      auto conv_backward = [&](size_t i, const Tensor& input, bool weight) {
        const int64_t stride = geometry[2 * i], padding = geometry[2 * i + 1];
        // exact and naive keep r' in float32 (their ReLU mask); a bf16 convolution reads a copy.
        return conv2d_backward(grad_y[i], input.to(dtype), saved[2 + i], stride, padding, weight);
      };
      for (size_t i = 0; i < n_conv; ++i) {
        if (!grad_y[i].defined()) continue;
        grad_y[i] = grad_y[i].contiguous(layout);
        if (ctx->needs_input_grad(3 + i)) g_w[i] = conv_backward(i, r, true);
      }
      // The input gradients. LibTorch reads only the input's shape for them, but wants a tensor
      // of that shape: in blpa mode, where nothing else needs r', any float tensor of at least
      // as many elements stands in for it, so that r' is freed first: the output gradient
      // when it is as large (a 1x1 convolution widening the channels, a 3x3 one of stride 1),
      // else the first input gradient, for the projection shortcut's.
      Tensor stand_in;
      for (size_t i = 0; i < n_conv; ++i) {
        if (!grad_y[i].defined()) continue;
        if (mode == Mode::blpa && !stand_in.defined() && grad_y[i].numel() >= r.numel())
          stand_in = grad_y[i].as_strided(r.sizes(), r.strides());  // both dense: within its elements
        if (stand_in.defined()) r.reset();
        Tensor gi = conv_backward(i, stand_in.defined() ? stand_in : r, false);
        grad_y[i].reset();  // its last use
        stand_in.reset();
        g_r = g_r.defined() ? g_r.add_(gi) : gi;
        if (mode == Mode::blpa) stand_in = g_r;
      }
    }
    variable_list out(7);
    out[3] = g_w[0];
    out[4] = g_w[1];
    if (!g_r.defined()) return out;

    if (mode == Mode::blpa) {
      // ReLU and BatchNorm backward straight from the codes (blpa/codec.h): the mask is exact,
      // x_hat' is decoded on the fly and never stored. g_r is overwritten by g_x when it is
      // ours (it came from the convolutions, or is a copy in our layout), not when it is the
      // caller's. The gradient with respect to gamma through g = max(gamma, 1e-8) comes out
      // of them too (gamma_min).
      if (n_conv > 0) r.reset();  // r' is no longer needed: free it first
      Tensor grad = g_r.contiguous(layout);
      const bool ours = n_conv > 0 || !grad.is_same(g_r);
      g_r.reset();
      auto [g_x, g_gamma, g_beta] = bn_relu_backward(codes, ctx->saved_data["b"].toTensor(), g, invstd, grad,
                                                     /*in_place=*/ours, kGammaMinF);
      out[0] = g_x;
      out[1] = g_gamma;
      out[2] = g_beta;
      return out;
    }

    // ReLU: g_a = g_r where r' > 0, over g_r when it is ours and of x_hat's dtype (a bf16 g_r
    // is widened first: the BatchNorm backward runs in float32 on the float32 x_hat').
    const bool ours = n_conv > 0 && g_r.scalar_type() == x_hat.scalar_type();
    g_r = g_r.to(x_hat.scalar_type());
    Tensor g_a = ours ? at::threshold_backward_out(g_r, g_r, r, 0) : at::threshold_backward(g_r, r, 0);
    g_r.reset();
    r.reset();

    // BatchNorm with batch statistics given x_hat' (docs/method.md), by LibTorch's fused
    // kernel: with input x_hat', mean 0 and 1/sigma 1 it normalises nothing, and the weight
    // gamma/sigma gives g_x = gamma/sigma (g_a - mean(g_a) - x_hat' mean(g_a x_hat')); its
    // weight gradient is sum(g_a x_hat') = g_gamma and its bias gradient sum(g_a) = g_beta.
    const Tensor zeros = ctx->saved_data["zeros"].toTensor(), ones = ctx->saved_data["ones"].toTensor();
    auto [g_x, g_gamma, g_beta] = at::native_batch_norm_backward(
        g_a, x_hat, g * invstd, std::nullopt, std::nullopt, zeros, ones, /*train=*/true, 0.0, {true, true, true});
    // The clamp's gradient: zero unless gamma >= 1e-8 in double. The float 1e-8f lies just
    // below it, so constrain_()'s clamped gammas get none (LibTorch 2.15's clamp_min agrees;
    // 2.11's passes a gradient at exactly 1e-8f). For float gamma that is gamma > 1e-8f, one
    // threshold_backward kernel; blpa's kernels apply the same rule.
    out[0] = g_x.to(dtype);
    out[1] = gamma.scalar_type() == at::kFloat ? at::threshold_backward(g_gamma, gamma, kGammaMinF)
                                               : g_gamma * (gamma >= kGammaMin);
    out[2] = g_beta;
    return out;
  }
};

}  // namespace
}  // namespace blpa

// After a node's backward the engine calls its release_variables() (unless the graph is
// retained), which for a custom Function frees only what save_for_backward() saved. The unit
// keeps its codes and per-channel tensors in saved_data, which LibTorch frees only with the
// node, when the whole graph goes after backward: every unit's codes would stay to the end of
// the step's backward. This frees them as soon as the unit's own backward is done.
template <>
void torch::autograd::CppNode<blpa::UnitFunction>::release_variables() {
  std::lock_guard<std::mutex> lock(mutex_);
  ctx_.saved_variables_.clear();
  ctx_.saved_data.clear();
  ctx_.has_freed_buffers_ = true;
}

namespace blpa {

Mode parse_mode(const std::string& s) {
  if (s == "plain") return Mode::plain;
  if (s == "exact") return Mode::exact;
  if (s == "blpa") return Mode::blpa;
  if (s == "naive") return Mode::naive;
  throw std::invalid_argument("unknown mode '" + s + "' (expected plain, exact, blpa or naive)");
}

std::string to_string(Mode m) {
  switch (m) {
    case Mode::plain: return "plain";
    case Mode::exact: return "exact";
    case Mode::blpa: return "blpa";
    case Mode::naive: return "naive";
  }
  return "?";
}

CodeFormat ModeConfig::codes_format() const {
  if (window == 0) {
    CodeFormat f = default_format(bits);
    if (lift) f.lift = *lift;
    return f;
  }
  return {bits, window, lift.value_or(0.0f)};
}

std::string ModeConfig::str() const {
  if (mode != Mode::blpa && mode != Mode::naive) return to_string(mode);
  const CodeFormat f = codes_format();
  auto text = [](float x) {  // the shortest text that reads back as x
    char buf[32];
    return std::string(buf, std::to_chars(buf, buf + sizeof buf, x).ptr);
  };
  std::string s = to_string(mode) + "-" + std::to_string(bits);
  if (f.window != kPaperWindow) s += "-w" + text(f.window);
  if (f.lift != 0.0f) s += "-l" + text(f.lift);
  return s;
}

ModeConfig parse_mode_config(const std::string& s, int bits, float window, std::optional<float> lift) {
  auto bad = [&] {
    return std::invalid_argument("unknown mode '" + s + "' (expected plain, exact, blpa, naive, blpa-K or naive-K with "
                                 "K = 8, 4 or 2, then optionally -wW for a window of width W and -lL for a lift L)");
  };
  const auto dash = s.find('-');
  ModeConfig m{parse_mode(s.substr(0, dash)), bits, window, lift};
  if (dash == std::string::npos) return m;
  if (m.mode != Mode::blpa && m.mode != Mode::naive) throw bad();
  // -K, then optionally -wW, then optionally -lL
  const char* p = s.data() + dash + 1;
  const char* end = s.data() + s.size();
  auto [q, ec] = std::from_chars(p, end, m.bits);
  if (ec != std::errc() || (m.bits != 8 && m.bits != 4 && m.bits != 2)) throw bad();
  m.window = kPaperWindow;
  m.lift = 0.0f;
  auto suffix = [&](char tag, float& value) {
    if (end - q < 3 || q[0] != '-' || q[1] != tag) return;
    auto [after, ec2] = std::from_chars(q + 2, end, value);
    if (ec2 != std::errc() || !std::isfinite(value)) throw bad();
    q = after;
  };
  suffix('w', m.window);
  suffix('l', *m.lift);
  if (q != end || !(m.window > 0)) throw bad();
  if (!(m.window >= kMinWindow))  // it failed in the codec, once the run had begun
    throw std::invalid_argument(fmt::format("mode '{}': the window must be at least {}", s, kMinWindow));
  return m;
}

UnitImpl::UnitImpl(int64_t in_channels, std::vector<ConvSpec> convs_, ModeConfig mode)
    : convs(std::move(convs_)), mode_(mode), memory_(std::make_shared<UnitMemory>()) {
  TORCH_CHECK(convs.size() <= 2, "a unit has at most two convolutions");
  if (mode.mode == Mode::blpa || mode.mode == Mode::naive) {
    TORCH_CHECK(mode.bits == 8 || mode.bits == 4 || mode.bits == 2, "bits must be 8, 4 or 2, got ", mode.bits);
    const CodeFormat f = mode.codes_format();
    check_format(f);
    mode_.window = f.window;
    mode_.lift = f.lift;
  }
  gamma = register_parameter("gamma", torch::ones({in_channels}));
  beta = register_parameter("beta", torch::zeros({in_channels}));
  running_mean = register_buffer("running_mean", torch::zeros({in_channels}));
  running_var = register_buffer("running_var", torch::ones({in_channels}));
  zeros_ = torch::zeros({in_channels});  // made here, so that a first forward allocates nothing extra
  ones_ = torch::ones({in_channels});
  for (size_t i = 0; i < convs.size(); ++i) {
    const ConvSpec& c = convs[i];
    auto w = torch::empty({c.out_channels, in_channels, c.kernel, c.kernel});
    torch::nn::init::kaiming_normal_(w, 0.0, torch::kFanOut, torch::kReLU);  // He normal
    weights.push_back(register_parameter(i == 0 ? "weight" : "shortcut_weight", w));
  }
}

std::vector<torch::Tensor> UnitImpl::forward(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 4 && x.size(1) == gamma.size(0), "unit expects N x ", gamma.size(0), " x H x W input, got ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kDouble,
              "unit expects float32 or bfloat16 activations (float64 in tests), got ", x.scalar_type());
  const memory::Scope scope(label, "forward");
  const bool train = is_training();
  // The convolutions run in the activations' dtype and layout: the float32 weights are cast
  // to them (a differentiable copy, as LibTorch's autocast makes; none when they match).
  // BatchNorm reads bf16 activations with its float32 parameters and statistics as they are.
  // An activation whose strides fit both layouts (1x1 maps: ResNet-50's last stage at 32x32,
  // where the residual add hands on NCHW strides) says nothing of the run's layout: there the
  // weights stay in theirs, the run's (ResNetImpl::set_numerics). Cast to NCHW, they were
  // copied at every step and autograd kept the copies (34 MiB of "stored" bytes in plain).
  const auto layout = x.suggest_memory_format();
  const auto weight_layout =
      x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast) ? at::MemoryFormat::Preserve : layout;
  auto cast = [&](const Tensor& w) { return w.to(w.options().dtype(x.scalar_type()), false, false, weight_layout); };
  if (mode_.mode == Mode::plain || !train) {
    // Ordinary LibTorch ops and autograd: the plain mode, and evaluation in every mode.
    const Tensor g = mode_.mode == Mode::plain ? gamma : gamma.clamp_min(kGammaMin);
    Tensor r = at::relu(at::batch_norm(x, g, beta, running_mean, running_var, train, momentum, eps, true));
    if (convs.empty()) return {r};
    std::vector<torch::Tensor> y;
    for (size_t i = 0; i < convs.size(); ++i)
      y.push_back(conv2d(r, cast(weights[i]), convs[i].stride, convs[i].padding));
    return y;
  }
  Tensor x_in = mode_.mode == Mode::exact ? x : x.contiguous(layout);
  auto weight = [&](size_t i) { return i < weights.size() ? std::optional<Tensor>(cast(weights[i])) : std::nullopt; };
  return UnitFunction::apply(x_in, gamma, beta, weight(0), weight(1), this, memory_.get());
}

const torch::Tensor& UnitImpl::zeros_like_channels(const torch::Tensor& like) {
  if (!zeros_.defined() || zeros_.device() != like.device() || zeros_.scalar_type() != like.scalar_type() ||
      zeros_.sizes() != like.sizes())
    zeros_ = torch::zeros_like(like);
  return zeros_;
}

const torch::Tensor& UnitImpl::ones_like_channels(const torch::Tensor& like) {
  if (!ones_.defined() || ones_.device() != like.device() || ones_.scalar_type() != like.scalar_type() ||
      ones_.sizes() != like.sizes())
    ones_ = torch::ones_like(like);
  return ones_;
}

void UnitImpl::constrain_() {
  torch::NoGradGuard no_grad;
  gamma.clamp_min_(kGammaMin);
}

}  // namespace blpa
