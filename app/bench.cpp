// blpa-bench: measured figures. `codec` times the packing kernels (see docs/results.md).
#include <blpa/codec.h>
#include <blpa/train.h>
#include <torch/torch.h>

#include <chrono>
#include <cxxopts.hpp>
#include <fmt/format.h>

#include "bench.h"
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

int codec_main(int argc, char** argv) {
  cxxopts::Options opts("blpa-bench codec", "Pack/unpack throughput of the K-bit codec.\n"
                                            "Throughput is GB/s of fp32 elements: numel*4 bytes read by pack, "
                                            "written by unpack (the approximate ReLU output r').");
  opts.add_options()("bits", "Bits per code: 8 or 4", cxxopts::value<int>()->default_value("4"))(
      "numel", "Elements in the tensor", cxxopts::value<int64_t>()->default_value("16777216"))(
      "channels", "Channels (dim 1); the rest of the tensor is N x C x plane", cxxopts::value<int64_t>()->default_value("64"))(
      "device", "cpu or cuda", cxxopts::value<std::string>()->default_value("cpu"))(
      "threads", "CPU threads (0: LibTorch's default)", cxxopts::value<int>()->default_value("0"))(
      "reps", "Calls per timing round", cxxopts::value<int>()->default_value("10"))(
      "json", "Print one JSON object instead of a table")("h,help", "This help");
  auto args = opts.parse(argc, argv);
  if (args.count("help")) {
    std::cout << opts.help() << std::endl;
    return 0;
  }
  const int bits = args["bits"].as<int>();
  const int64_t numel = args["numel"].as<int64_t>();
  const int64_t channels = args["channels"].as<int64_t>();
  if (bits != 8 && bits != 4) throw std::invalid_argument("--bits must be 8 or 4");
  if (numel <= 0 || channels <= 0 || numel % channels != 0)
    throw std::invalid_argument("--numel must be a positive multiple of --channels");
  const torch::Device dev(args["device"].as<std::string>());
  if (dev.is_cuda() && !torch::cuda::is_available())
    throw std::runtime_error("--device cuda: no CUDA device is available");
  if (args["threads"].as<int>() > 0) torch::set_num_threads(args["threads"].as<int>());

  torch::manual_seed(0);
  auto b = torch::randn({channels}, dev);
  auto v = torch::randn({1, channels, numel / channels}, dev) + b.view({1, channels, 1});
  auto gamma = torch::ones({channels}, dev);
  const int reps = args["reps"].as<int>();
  blpa::Codes codes;
  const double pack_s = time_per_call(dev, 5, reps, [&] { codes = blpa::pack(v, b, bits); });
  const double unpack_s = time_per_call(dev, 5, reps, [&] { blpa::unpack(codes, b, gamma, blpa::kRelu); });
  double copy_s = 0;
  if (dev.is_cuda()) {
    auto dst = torch::empty_like(v);
    copy_s = time_per_call(dev, 5, reps, [&] { dst.copy_(v); });
  }
  const double gb = numel * 4.0 / 1e9;
  const int threads = dev.is_cuda() ? 0 : torch::get_num_threads();
  if (args.count("json")) {
    fmt::print("{{\"bench\": \"codec\", \"bits\": {}, \"numel\": {}, \"channels\": {}, \"device\": \"{}\", "
               "\"threads\": {}, \"pack_gbps\": {:.3f}, \"unpack_gbps\": {:.3f}",
               bits, numel, channels, dev.str(), threads, gb / pack_s, gb / unpack_s);
    if (dev.is_cuda()) fmt::print(", \"copy_gbps\": {:.3f}", gb / copy_s);
    fmt::print("}}\n");
  } else {
    fmt::print("codec {}-bit, {} elements, {} ({} threads)\n", bits, numel, dev.str(), threads);
    fmt::print("  pack    {:8.3f} GB/s  ({:.3f} ms)\n", gb / pack_s, pack_s * 1e3);
    fmt::print("  unpack  {:8.3f} GB/s  ({:.3f} ms)\n", gb / unpack_s, unpack_s * 1e3);
    if (dev.is_cuda()) fmt::print("  copy    {:8.3f} GB/s  (device-to-device, same tensor)\n", gb / copy_s);
  }
  return 0;
}

void usage() {
  std::cout << "usage: blpa-bench <command> [options]\n\n"
               "commands:\n"
               "  codec      pack/unpack throughput of the K-bit codec\n"
               "  memory     activation memory and step peak of a network, per mode\n"
               "  step       training-step time per mode and overhead against plain\n"
               "  max-batch  the largest batch that trains within a memory budget, per mode\n"
               "  fidelity   gradient cosine to plain against depth, blpa and naive\n"
               "  data       images/s of the ImageNet decode and augmentation pipeline per worker count\n\n"
               "Run `blpa-bench <command> --help` for the options of a command.\n";
}

}  // namespace

int main(int argc, char** argv) {
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
    std::cerr << "blpa-bench " << cmd << ": " << e.what() << "\n";
    return 2;
  } catch (const std::invalid_argument& e) {  // the commands' flag checks
    std::cerr << "blpa-bench " << cmd << ": " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "blpa-bench " << cmd << ": " << blpa::error_message(e) << "\n";
    return 1;
  }
}
