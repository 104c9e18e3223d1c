// blpa-bench: measured figures. `codec` times the packing kernels (see docs/results.md).
#include <blpa/codec.h>
#include <blpa/memory.h>
#include <blpa/resnet.h>
#include <torch/torch.h>

#include <chrono>
#include <cxxopts.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <map>
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

struct ModelArgs {
  blpa::NetConfig net;
  int64_t batch, hw;
};

// "resnet164" -> cifar 164, "resnet152" -> imagenet 152, "cifar:N" / "imagenet:N" for other depths.
blpa::NetConfig parse_model(const std::string& s) {
  blpa::NetConfig c;
  auto colon = s.find(':');
  if (s == "resnet164") {
    c.arch = "cifar", c.depth = 164;
  } else if (s == "resnet152") {
    c.arch = "imagenet", c.depth = 152, c.num_classes = 1000;
  } else if (colon != std::string::npos) {
    c.arch = s.substr(0, colon);
    c.depth = std::stoi(s.substr(colon + 1));
    if (c.arch == "imagenet") c.num_classes = 1000;
  } else {
    throw std::invalid_argument("--model must be resnet164, resnet152, cifar:DEPTH or imagenet:DEPTH, got '" + s + "'");
  }
  return c;
}

std::vector<blpa::ModeConfig> parse_modes(const std::string& mode, int bits) {
  if (mode == "all")
    return {{blpa::Mode::plain, 8}, {blpa::Mode::exact, 8}, {blpa::Mode::blpa, 8}, {blpa::Mode::blpa, 4},
            {blpa::Mode::naive, 4}};
  std::vector<blpa::ModeConfig> out{{blpa::Mode::plain, 8}, {blpa::Mode::exact, 8}};
  blpa::ModeConfig m{blpa::parse_mode(mode), bits};
  if (m.mode != blpa::Mode::plain && m.mode != blpa::Mode::exact) out.push_back(m);
  return out;
}

int memory_main(int argc, char** argv) {
  cxxopts::Options opts("blpa-bench memory",
                        "Memory of one training step (forward, backward, SGD-momentum update), measured by the\n"
                        "allocator: the counting CPU allocator, or CUDA's caching allocator statistics.\n"
                        "plain and exact are always measured in the same run for comparison.");
  opts.add_options()("model", "resnet164, resnet152, cifar:DEPTH or imagenet:DEPTH",
                     cxxopts::value<std::string>()->default_value("resnet164"))(
      "batch", "Batch size", cxxopts::value<int64_t>()->default_value("128"))(
      "mode", "plain, exact, blpa, naive or all", cxxopts::value<std::string>()->default_value("blpa"))(
      "bits", "Bits for blpa/naive: 8 or 4", cxxopts::value<int>()->default_value("4"))(
      "size", "Input height/width (default: 32 for cifar, 224 for imagenet)", cxxopts::value<int64_t>()->default_value("0"))(
      "device", "cpu or cuda", cxxopts::value<std::string>()->default_value("cpu"))(
      "table", "Also print the per-unit table of stored bytes (human output only)")(
      "json", "Print one JSON object per mode")("h,help", "This help");
  auto args = opts.parse(argc, argv);
  if (args.count("help")) {
    std::cout << opts.help() << std::endl;
    return 0;
  }
  blpa::memory::install_cpu_counter();
  const torch::Device dev(args["device"].as<std::string>());
  if (dev.is_cuda() && !torch::cuda::is_available()) throw std::runtime_error("--device cuda: no CUDA device is available");
  blpa::NetConfig net = parse_model(args["model"].as<std::string>());
  const int64_t batch = args["batch"].as<int64_t>();
  int64_t hw = args["size"].as<int64_t>();
  if (hw == 0) hw = net.arch == "cifar" ? 32 : 224;
  const bool json = args.count("json") > 0;
  std::map<std::string, std::pair<int64_t, int64_t>> results;  // stored, peak
  for (const auto& mode : parse_modes(args["mode"].as<std::string>(), args["bits"].as<int>())) {
    net.mode = mode;
    torch::manual_seed(0);
    blpa::ResNet model(net);
    model->to(dev);
    model->train();
    torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
    auto x = torch::randn({batch, net.in_channels, hw, hw}, dev);
    auto labels = torch::randint(0, net.num_classes, {batch}, torch::TensorOptions(dev).dtype(torch::kLong));
    int64_t param_bytes = 0;
    for (const auto& p : model->parameters()) param_bytes += p.nbytes();

    // One warm-up step creates gradients and momentum buffers, so the measured step sees
    // the steady state of training.
    // Gradients are released (zero_grad sets them to none) before the baseline is taken, so
    // the peak covers everything the step itself allocates, gradients included.
    auto step = [&](int64_t* stored) {
      const int64_t before = blpa::memory::allocated(dev);
      auto out = model->forward(x);
      if (stored) *stored = blpa::memory::allocated(dev) - before - out.nbytes();
      torch::nn::functional::cross_entropy(out, labels).backward();
      opt.step();
      model->constrain_();
    };
    step(nullptr);
    opt.zero_grad();
    if (dev.is_cuda()) torch::cuda::synchronize();
    int64_t stored = 0;
    const int64_t base = blpa::memory::allocated(dev);
    blpa::memory::reset_peak(dev);
    step(&stored);
    if (dev.is_cuda()) torch::cuda::synchronize();
    const int64_t peak = blpa::memory::peak(dev) - base;
    results[mode.str()] = {stored, peak};
    const int64_t units = model->stored_unit_bytes();
    if (json) {
      fmt::print("{{\"bench\": \"memory\", \"model\": \"{}\", \"arch\": \"{}\", \"depth\": {}, \"batch\": {}, "
                 "\"size\": {}, \"mode\": \"{}\", \"bits\": {}, \"device\": \"{}\", \"stored_activation_bytes\": {}, "
                 "\"unit_accounted_bytes\": {}, \"peak_bytes\": {}, \"resident_bytes\": {}, \"param_bytes\": {}}}\n",
                 args["model"].as<std::string>(), net.arch, net.depth, batch, hw, blpa::to_string(mode.mode),
                 mode.mode == blpa::Mode::blpa || mode.mode == blpa::Mode::naive ? mode.bits : 32, dev.str(), stored,
                 units, peak, base, param_bytes);
    } else {
      fmt::print("{:8s} stored by autograd {:10.2f} MiB ({:.3f} MiB/sample; units account for {:.2f} MiB), "
                 "step peak above resident {:10.2f} MiB, resident (params, momentum, data) {:.2f} MiB\n",
                 mode.str(), stored / 1048576.0, stored / 1048576.0 / batch, units / 1048576.0, peak / 1048576.0,
                 base / 1048576.0);
      if (args.count("table") && mode.mode != blpa::Mode::plain) {
        for (const auto& row : model->memory_table())
          fmt::print("    {:14s} {:>20s} codes {:10d} metadata {:6d} full {:10d}\n", row.name,
                     fmt::format("{}", fmt::join(row.memory.input_sizes, "x")), row.memory.code_bytes,
                     row.memory.metadata_bytes, row.memory.full_bytes);
      }
    }
  }
  if (!json) {
    const auto& p = results["plain"];
    for (const auto& [name, r] : results)
      if (name != "plain")
        fmt::print("plain / {:8s}: stored {:6.2f}x, step peak {:6.2f}x\n", name, double(p.first) / r.first,
                   double(p.second) / r.second);
  }
  return 0;
}

void usage() {
  std::cout << "usage: blpa-bench <command> [options]\n\n"
               "commands:\n"
               "  codec   pack/unpack throughput of the K-bit codec\n"
               "  memory  activation memory and step peak of a network, per mode\n\n"
               "Run `blpa-bench <command> --help` for the options of a command.\n";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "-h" || std::string(argv[1]) == "--help") {
    usage();
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  try {
    if (cmd == "codec") return codec_main(argc - 1, argv + 1);
    if (cmd == "memory") return memory_main(argc - 1, argv + 1);
    std::cerr << "blpa-bench: unknown command '" << cmd << "'\n";
    usage();
    return 2;
  } catch (const cxxopts::exceptions::exception& e) {
    std::cerr << "blpa-bench " << cmd << ": " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "blpa-bench " << cmd << ": " << e.what() << "\n";
    return 1;
  }
}
