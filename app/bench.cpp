// blpa-bench: measured figures. `codec` times the packing kernels (see docs/results.md).
#include <blpa/codec.h>
#include <blpa/codec_math.h>
#include <blpa/train.h>
#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <cxxopts.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include "bench.h"
#include "flags.h"
#include <iostream>
#include <string>

namespace {

using Clock = std::chrono::steady_clock;

void sync(const torch::Device& dev) {
  if (dev.is_cuda()) torch::cuda::synchronize(dev.index());
}

// Median-free and simple: the best of `rounds` averages of `reps` calls, in seconds per call.
template <typename F>
double time_per_call(const torch::Device& dev, int rounds, int reps, F&& f) {
  f();  // warm-up (allocator, caches)
  sync(dev);
  double best = 1e30;
  for (int r = 0; r < rounds; ++r) {
    const auto t0 = Clock::now();
    for (int i = 0; i < reps; ++i) f();
    sync(dev);
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count() / reps);
  }
  return best;
}

// The share of pack's elements (of the tensor's first 2^24, in NCHW order) that the CUDA pack's
// fast code (codec::fused_code) leaves to its exact path, next to a bin edge: on a GPU a warp
// takes that path whenever one of its threads does. divisor: pack's, or undefined (1).
double near_edge_fraction(const torch::Tensor& v, const blpa::Codes& codes, const torch::Tensor& divisor) {
  namespace codec = blpa::codec;
  const int64_t channels = v.size(1), plane = v.numel() / (v.size(0) * channels);
  const int64_t n = std::min<int64_t>(v.numel(), int64_t{1} << 24), per_sample = v.numel() / v.size(0);
  // The samples that hold those elements, and only those, made float32 and NCHW.
  const auto first = v.narrow(0, 0, (n + per_sample - 1) / per_sample);
  const auto x = first.to(torch::kFloat).contiguous().view(-1).narrow(0, 0, n).cpu();
  const auto offsets = codes.offsets.cpu();
  const auto g = divisor.defined() ? divisor.to(torch::kFloat).cpu() : torch::ones({channels});
  const int bits = codes.format.bits;
  const float d = codes.format.bin_width(), guard_d = codec::kGuard / d;
  const float limit = codec::far_limit(codec::scaled_tolerance(bits, guard_d));
  std::vector<float> scale(channels), bias(channels);
  for (int64_t c = 0; c < channels; ++c) {  // as the kernel's table
    const codec::FusedChannel f = codec::fused_channel(g[c].item<float>(), offsets[c].item<uint8_t>(), d, guard_d);
    scale[c] = f.scale;
    bias[c] = f.bias;
  }
  const float* xp = x.data_ptr<float>();
  int64_t near = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = (i / plane) % channels;
    near += codec::fused_code(xp[i], scale[c], bias[c], limit, bits) == codec::kNearEdge;
  }
  return static_cast<double>(near) / static_cast<double>(n);
}

int codec_main(int argc, char** argv) {
  cxxopts::Options opts(
      "blpa-bench codec",
      "Throughput of the K-bit codec: pack, unpack of r' and the BatchNorm-and-ReLU backward from the codes,\n"
      "beside LibTorch's own BatchNorm-and-ReLU backward (threshold_backward + native_batch_norm_backward, what\n"
      "plain runs) and a copy of the tensor. GB/s count the bytes each operation must move at least: pack reads\n"
      "the activations (4 or 2 bytes an element) and writes K/8; unpack reads K/8 and writes 4 or 2; the codec's\n"
      "backward reads the codes and g_r and writes g_x; LibTorch's reads g_r, r and x and writes g_x; a copy\n"
      "reads and writes the tensor. The tensor is N x C x H x H with N = numel / (C H H).\n"
      "The forward of a unit outside its convolutions, whole: blpa's fused one (LibTorch's batch statistics, then\n"
      "bn_relu_pack), blpa's unfused one (LibTorch's BatchNorm, then pack_relu_) and plain's (BatchNorm, ReLU);\n"
      "GB/s of the fused one count reading x twice (statistics, then values) and writing r and the codes.\n"
      "--gamma ones times the network as initialised (gamma = 1: pack has no divisor, and bf16 values, which lie\n"
      "on a coarse grid, often sit exactly on a bin edge, where the codes take a slower exact path); drawn times\n"
      "it as training leaves it (gamma of each channel from U(0.5, 1.5), and pack's divisor gamma, as a unit's).\n"
      "near_edge_fraction: the share of pack's elements (of the first 2^24) that take that exact path.");
  opts.add_options()("bits", "Bits per code: 8, 4 or 2", cxxopts::value<std::string>()->default_value("4"))(
      "window", "Window width in units of x_hat (default: the default for --bits)", cxxopts::value<std::string>())(
      "numel", "Elements in the tensor", cxxopts::value<std::string>()->default_value("16777216"))(
      "channels", "Channels (dim 1)", cxxopts::value<std::string>()->default_value("64"))(
      "hw", "Height and width of a plane", cxxopts::value<std::string>()->default_value("32"))(
      "precision", "Activations and gradients: fp32 or bf16 (tf32 and auto: fp32; default: fp32)",
      cxxopts::value<std::string>())(
      "dtype", "The old name of --precision: float or bf16", cxxopts::value<std::string>())(
      "memory-format", "nchw or nhwc (NHWC: PyTorch's channels_last)", cxxopts::value<std::string>()->default_value("nchw"))(
      "gamma", "ones, drawn or a number: the BatchNorm's gamma as initialised, drawn as after training (see "
      "above), or that value in every channel (pack dividing by it)",
      cxxopts::value<std::string>()->default_value("ones"))(
      "device", "cpu, cuda or cuda:N", cxxopts::value<std::string>()->default_value("cpu"))(
      "threads", "CPU threads (0: LibTorch's default)", cxxopts::value<std::string>()->default_value("0"))(
      "reps", "Calls per timing round", cxxopts::value<std::string>()->default_value("10"))(
      "json", "Print one JSON object instead of a table")("h,help", "This help");
  auto args = blpa::parse_flags(opts, argc, argv);
  blpa::refuse_unmatched(args);
  if (blpa::switched_on(args, "help")) {
    std::cout << opts.help() << std::endl;
    return 0;
  }
  const int bits = blpa::number<int>(args, "bits");
  const int64_t numel = blpa::number<int64_t>(args, "numel");
  const int64_t channels = blpa::number<int64_t>(args, "channels");
  const int64_t hw = blpa::number<int64_t>(args, "hw");
  if (bits != 8 && bits != 4 && bits != 2) throw std::invalid_argument("--bits must be 8, 4 or 2");
  blpa::CodeFormat format = blpa::default_format(bits);
  if (args.count("window")) format = {bits, blpa::number<float>(args, "window"), 0.0f};
  if (!(format.window >= blpa::kMinWindow))
    throw std::invalid_argument(fmt::format("--window must be positive, at least {}", blpa::kMinWindow));
  if (numel <= 0 || channels <= 0 || hw <= 0 || numel % (channels * hw * hw) != 0)
    throw std::invalid_argument("--numel must be a positive multiple of --channels x --hw x --hw");
  const std::string layout = args["memory-format"].as<std::string>();
  std::string precision = args.count("precision") ? args["precision"].as<std::string>() : "fp32";
  if (precision != "fp32" && precision != "tf32" && precision != "bf16" && precision != "auto")
    throw std::invalid_argument("--precision must be fp32, tf32 or auto (both fp32 here), or bf16, got '" + precision + "'");
  // tf32 as the other programs take it: the codec's arithmetic has no matrix product, so it is fp32's.
  if (precision == "tf32" || precision == "auto") precision = "fp32";
  if (args.count("dtype")) {
    const std::string d = args["dtype"].as<std::string>();
    if (d != "float" && d != "bf16") throw std::invalid_argument("--dtype must be float or bf16");
    if (args.count("precision") && (d == "bf16") != (precision == "bf16"))
      throw std::invalid_argument("--dtype " + d + " and --precision " + precision + " disagree");
    precision = d == "bf16" ? "bf16" : "fp32";
  }
  const std::string dtype_name = precision == "bf16" ? "bf16" : "float";  // the JSON's "dtype", as before
  if (layout != "nchw" && layout != "nhwc") throw std::invalid_argument("--memory-format must be nchw or nhwc");
  const std::string gamma_kind = args["gamma"].as<std::string>();
  double gamma_value = 0;  // --gamma as a number
  if (gamma_kind != "ones" && gamma_kind != "drawn") {
    gamma_value = blpa::number<double>(args, "gamma");
    if (!(gamma_value > 0) || !std::isfinite(gamma_value))
      throw std::invalid_argument("--gamma must be ones, drawn or a positive number");
  }
  const auto dtype = dtype_name == "bf16" ? torch::kBFloat16 : torch::kFloat;
  const auto memory_format = layout == "nhwc" ? torch::MemoryFormat::ChannelsLast : torch::MemoryFormat::Contiguous;
  const torch::Device dev = blpa::parse_device(args["device"].as<std::string>());
  if (dev.is_cuda() && !torch::cuda::is_available())
    throw std::invalid_argument("--device cuda: this machine has no CUDA device");  // exit 2, as blpa-train's
  blpa::set_threads(blpa::number<int>(args, "threads"));

  torch::manual_seed(0);
  const std::vector<int64_t> shape{numel / (channels * hw * hw), channels, hw, hw};
  auto b = torch::randn({channels}, dev);
  auto v = (torch::randn(shape, dev) + b.view({1, channels, 1, 1})).to(dtype).contiguous(memory_format);
  auto g_r = torch::randn(shape, dev).to(dtype).contiguous(memory_format);
  auto gamma = gamma_kind == "ones"    ? torch::ones({channels}, dev)
               : gamma_kind == "drawn" ? torch::rand({channels}, dev) + 0.5
                                       : torch::full({channels}, gamma_value, torch::TensorOptions(dev));
  auto invstd = torch::ones({channels}, dev);
  // As initialised, pack has no divisor (v / 1 is v); drawn, its divisor is gamma, as a unit's.
  const auto divisor = gamma_kind == "ones" ? torch::Tensor() : gamma;
  const int reps = blpa::number<int>(args, "reps");
  if (reps <= 0) throw std::invalid_argument("--reps must be positive");
  blpa::Codes codes;
  const double pack_s = time_per_call(dev, 5, reps, [&] { codes = blpa::pack(v, b, format, divisor); });
  const double near_edge = near_edge_fraction(v, codes, divisor);
  // The unit's forward outside its convolutions, as the three ways run it in training; next to
  // pack, so that a profiler taking the first launches (gpu-check's ncu-codec) has both.
  auto beta = b.clone(), rm = torch::zeros({channels}, dev), rv = torch::ones({channels}, dev);
  const auto cc = blpa::channel_coding(gamma, beta, 1e-8f, format, true);
  const double fused_s = time_per_call(dev, 5, reps, [&] {
    auto [mean, var] = at::batch_norm_update_stats(v, rm, rv, 0.1);
    blpa::bn_relu_pack(v, mean, var, 1e-5f, beta, cc);
  });
  const double unfused_s = time_per_call(dev, 5, reps, [&] {
    auto a = std::get<0>(at::_batch_norm_with_update(v, cc.g, beta, rm, rv, 0.1, 1e-5));
    blpa::pack_relu_(a, cc);
  });
  const double plain_fwd_s =
      time_per_call(dev, 5, reps, [&] { at::relu(at::batch_norm(v, gamma, beta, rm, rv, true, 0.1, 1e-5, true)); });
  const double unpack_s =
      time_per_call(dev, 5, reps, [&] { blpa::unpack(codes, b, gamma, blpa::kRelu, dtype); });
  const double bn_s =
      time_per_call(dev, 5, reps, [&] { blpa::bn_relu_backward(codes, b, gamma, invstd, g_r, false); });
  // What plain runs for the same step (its autograd's ReLU and BatchNorm backward nodes).
  auto x = v.clone(), r = torch::relu(v), mean = torch::zeros({channels}, dev);
  const double ref_s = time_per_call(dev, 5, reps, [&] {
    auto ga = at::threshold_backward(g_r, r, 0);
    at::native_batch_norm_backward(ga, x, gamma, {}, {}, mean, invstd, true, 1e-5, {true, true, true});
  });
  auto dst = torch::empty_like(v);
  const double copy_s = time_per_call(dev, 5, reps, [&] { dst.copy_(v); });
  const double e = static_cast<double>(torch::elementSize(dtype)), k = bits / 8.0;
  const double n = static_cast<double>(numel) / 1e9;
  const double pack_gb = n * (e + k), unpack_gb = n * (k + e), bn_gb = n * (k + 2 * e), ref_gb = n * 4 * e,
               copy_gb = n * 2 * e, fused_gb = n * (3 * e + k);
  const int threads = dev.is_cuda() ? 0 : torch::get_num_threads();
  if (blpa::switched_on(args, "json")) {
    // "gamma": the kind, or its number as a number. "dtype" is kept beside "precision", the
    // name the other commands' JSON use, for the scripts that read it.
    const std::string gamma_json =
        gamma_kind == "ones" || gamma_kind == "drawn" ? "\"" + gamma_kind + "\"" : fmt::format("{}", gamma_value);
    fmt::print("{{\"bench\": \"codec\", \"bits\": {}, \"window\": {}, \"lift\": {}, \"numel\": {}, \"channels\": {}, "
               "\"hw\": {}, \"precision\": \"{}\", \"dtype\": \"{}\", \"memory_format\": \"{}\", \"device\": \"{}\", "
               "\"threads\": {}, \"pack_gbps\": {:.3f}, "
               "\"unpack_gbps\": {:.3f}, \"bn_backward_gbps\": {:.3f}, \"libtorch_bn_backward_gbps\": {:.3f}, "
               "\"copy_gbps\": {:.3f}, \"pack_ms\": {:.4f}, \"unpack_ms\": {:.4f}, \"bn_backward_ms\": {:.4f}, "
               "\"libtorch_bn_backward_ms\": {:.4f}, \"copy_ms\": {:.4f}, \"forward_fused_gbps\": {:.3f}, "
               "\"forward_fused_ms\": {:.4f}, \"forward_unfused_ms\": {:.4f}, \"libtorch_forward_ms\": {:.4f}, "
               "\"gamma\": {}, \"near_edge_fraction\": {:.6f}, \"cpu_isa\": \"{}\"}}\n",
               bits, format.window, format.lift, numel, channels, hw, precision, dtype_name, layout, dev.str(), threads,
               pack_gb / pack_s,
               unpack_gb / unpack_s, bn_gb / bn_s, ref_gb / ref_s, copy_gb / copy_s, pack_s * 1e3, unpack_s * 1e3,
               bn_s * 1e3, ref_s * 1e3, copy_s * 1e3, fused_gb / fused_s, fused_s * 1e3, unfused_s * 1e3,
               plain_fwd_s * 1e3, gamma_json, near_edge, blpa::cpu_isa_name());
  } else {
    fmt::print("codec {}-bit (window {}, lift {}), {} elements {} {} {}, gamma {}, {} ({}); GB/s of the bytes "
               "moved\n",
               bits, format.window, format.lift, numel, fmt::join(shape, "x"), dtype_name, layout, gamma_kind,
               dev.str(),
               dev.is_cuda() ? std::string("its kernels") : fmt::format("{} threads, {} loops", threads,
                                                                          blpa::cpu_isa_name()));
    fmt::print("  pack                {:8.3f} GB/s  ({:.3f} ms); elements next to a bin edge: {}\n",
               pack_gb / pack_s, pack_s * 1e3, near_edge > 0 ? fmt::format("1 in {:.0f}", 1 / near_edge) : "none");
    fmt::print("  unpack r'           {:8.3f} GB/s  ({:.3f} ms)\n", unpack_gb / unpack_s, unpack_s * 1e3);
    fmt::print("  bn_relu_backward    {:8.3f} GB/s  ({:.3f} ms)\n", bn_gb / bn_s, bn_s * 1e3);
    fmt::print("  LibTorch's backward {:8.3f} GB/s  ({:.3f} ms)\n", ref_gb / ref_s, ref_s * 1e3);
    fmt::print("  copy                {:8.3f} GB/s  ({:.3f} ms)\n", copy_gb / copy_s, copy_s * 1e3);
    fmt::print("  forward, fused      {:8.3f} GB/s  ({:.3f} ms); unfused {:.3f} ms, LibTorch's {:.3f} ms\n",
               fused_gb / fused_s, fused_s * 1e3, unfused_s * 1e3, plain_fwd_s * 1e3);
  }
  return 0;
}

void usage() {
  std::cout << "usage: blpa-bench <command> [options]\n\n"
               "commands:\n"
               "  codec      pack, unpack and BatchNorm-backward throughput of the K-bit codec\n"
               "  memory     activation memory and step peak of a network, per mode\n"
               "  step       training-step time per mode and overhead against plain\n"
               "  max-batch  the largest batch that trains within a memory budget, per mode\n"
               "  fidelity   gradient cosine to plain against depth, blpa and naive\n"
               "  data       images/s of the ImageNet decode and augmentation pipeline per worker count\n\n"
               "Run `blpa-bench <command> --help` for the options of a command.\n";
}

}  // namespace

static int run(int argc, char** argv) {
  blpa::quiet_library_log();
  if (argc < 2 || std::string(argv[1]) == "-h" || std::string(argv[1]) == "--help") {
    usage();
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  try {
    if (cmd == "codec") return codec_main(argc - 1, argv + 1);
    if (cmd == "memory") return memory_main(argc - 1, argv + 1);
    if (cmd == "step") return step_main(argc - 1, argv + 1);
    if (cmd == "max-batch") return max_batch_main(argc - 1, argv + 1);
    if (cmd == "fidelity") return fidelity_main(argc - 1, argv + 1);
    if (cmd == "data") return data_main(argc - 1, argv + 1);
    std::cerr << "blpa-bench: unknown command '" << cmd << "'\n";
    usage();
    return 2;
  } catch (const cxxopts::exceptions::exception& e) {
    std::cerr << "blpa-bench " << cmd << ": " << e.what() << "\nRun blpa-bench " << cmd << " --help for the options.\n";
    return 2;
  } catch (const std::invalid_argument& e) {  // the commands' flag checks
    std::cerr << "blpa-bench " << cmd << ": " << e.what() << "\nRun blpa-bench " << cmd << " --help for the options.\n";
    return 2;
  } catch (const blpa::NonFiniteLoss& e) {  // fidelity: plain's gradient of a network that overflows
    std::cerr << "blpa-bench " << cmd << ": " << e.what() << "\n";
    return 3;
  } catch (const std::exception& e) {
    std::cerr << "blpa-bench " << cmd << ": " << blpa::error_message(e) << "\n";
    return 1;
  }
}

int main(int argc, char** argv) { return blpa::checked_output("blpa-bench", run(argc, argv)); }
