// blpa-bench subcommands that measure whole networks: memory, step, max-batch, fidelity.
#include <blpa/dataset.h>
#include <blpa/loader.h>
#include <blpa/checkpoint.h>
#include <blpa/memory.h>
#include <blpa/resnet.h>
#include <blpa/step.h>
#include <blpa/train.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/profiler_kineto.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <cxxopts.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <optional>
#include <string_view>

#include "bench.h"
#include "flags.h"

namespace {

using blpa::Mode;
using blpa::ModeConfig;
using Clock = std::chrono::steady_clock;

// "resnet164" -> cifar 164, "resnet152" -> imagenet 152, "cifar:N" / "imagenet:N" for other depths.
blpa::NetConfig parse_model(const std::string& s) {
  blpa::NetConfig c;
  const auto colon = s.find(':');
  if (s == "resnet164") {
    c.arch = "cifar", c.depth = 164;
  } else if (s == "resnet152") {
    c.arch = "imagenet", c.depth = 152;
  } else if (s == "resnet1001") {
    c.arch = "cifar", c.depth = 1001;
  } else if (colon != std::string::npos) {
    c.arch = s.substr(0, colon);
    c.depth = blpa::parse_number<int>("--model " + s + ": the depth", s.substr(colon + 1));
  } else {
    throw std::invalid_argument("--model must be resnet164, resnet152, resnet1001, cifar:DEPTH or imagenet:DEPTH, got '" +
                                s + "'");
  }
  if (c.arch == "imagenet") c.num_classes = 1000;
  return c;
}


// "all", or a comma list of mode names as ModeConfig::str() writes them: "plain,blpa-8,blpa-4-w8".
// A bare blpa/naive takes --bits, --window (0: the default for its bits) and --lift; a name
// with bits is complete (no -wW: the paper's window 6, no -lL: lift 0), so they cannot apply.
// `bits_given`: --bits was on the command line (all has its own; it was ignored). A mode named
// twice runs once (it printed two rows alike, and --trace wrote one file over the other).
std::vector<ModeConfig> parse_modes(const std::string& spec, int bits, float window, std::optional<float> lift,
                                    bool bits_given) {
  if (spec == "all" && (window > 0 || lift || bits_given))
    throw std::invalid_argument("--mode all runs blpa-train's default codes for each of its modes; --bits, --window "
                                "and --lift apply to a bare blpa or naive: list the modes instead (--mode "
                                "plain,exact,blpa-8,blpa-4,naive-4 runs the paper's codes)");
  if (spec == "all") return {{Mode::plain, 8}, {Mode::exact, 8}, {Mode::blpa, 8}, {Mode::blpa, 4}, {Mode::naive, 4}};
  if (bits != 8 && bits != 4 && bits != 2) throw std::invalid_argument("--bits must be 8, 4 or 2");
  std::vector<ModeConfig> out;
  bool bare = false;  // a blpa or naive that takes --window and --lift
  for (const std::string& tok : blpa::comma_list("--mode", spec)) {
    if (tok == "all")
      throw std::invalid_argument("--mode all stands alone (plain,exact,blpa-8,blpa-4,naive-4): list the modes "
                                  "instead of adding to it");
    if ((window > 0 || lift) && tok.find('-') != std::string::npos)
      throw std::invalid_argument("--window and --lift apply to a bare blpa or naive in --mode; " + tok +
                                  " names its own (write -wW and -lL in the name)");
    bare = bare || tok == "blpa" || tok == "naive";
    const ModeConfig m = blpa::parse_mode_config(tok, bits, window, lift);
    if (std::none_of(out.begin(), out.end(), [&](const ModeConfig& o) { return o.str() == m.str(); }))
      out.push_back(m);
  }
  if ((window > 0 || lift) && !bare)  // `--mode plain --window 8` ran, the window ignored
    throw std::invalid_argument("--window and --lift apply to a bare blpa or naive in --mode, and " + spec +
                                " has none");
  return out;
}

bool coded(const ModeConfig& m) { return m.mode == Mode::blpa || m.mode == Mode::naive; }
// The bits an activation is kept in for backward: its codes', or the precision's.
int report_bits(const ModeConfig& m, blpa::Precision p) {
  return coded(m) ? m.bits : p == blpa::Precision::bf16 ? 16 : 32;
}
std::string report_format(const ModeConfig& m) {
  if (!coded(m)) return "\"window\": null, \"lift\": null";
  const blpa::CodeFormat f = m.codes_format();
  return fmt::format("\"window\": {}, \"lift\": {}", f.window, f.lift);
}

struct Common {
  std::string model_name;
  blpa::NetConfig net;
  int64_t batch = 1, size = 0;
  bool has_batch = true;  // false: no --batch (max-batch searches the batch)
  std::vector<ModeConfig> modes;
  torch::Device device{torch::kCPU};
  blpa::Numerics numerics;  // every mode's (memory also runs plain in fp32 as a second reference)
  bool json = false;
};

// cpu_only: fidelity, which runs on the CPU (no --device): no tf32.
void add_numerics(cxxopts::Options& o, bool cpu_only = false) {
  o.add_options()("precision",
                  cpu_only ? "fp32, bf16 or auto (fp32; with --checkpoint, the checkpoint's precision, tf32 as fp32): "
                             "this bench runs on the CPU, which has no TF32"
                           : "fp32, tf32 (CUDA only), bf16 or auto (tf32 on CUDA, fp32 on the CPU), as blpa-train's",
                  cxxopts::value<std::string>()->default_value("auto"))(
      "memory-format", "nchw, nhwc or auto, as blpa-train's", cxxopts::value<std::string>()->default_value("auto"));
}

blpa::Numerics parse_numerics(const cxxopts::ParseResult& args, const torch::Device& device) {
  const auto n = blpa::numerics_for(args["precision"].as<std::string>(), args["memory-format"].as<std::string>(), device);
  blpa::apply_precision(n.precision, device);
  return n;
}

// `batch`: --batch's default, or "" for a command that has no --batch (max-batch searches it).
void add_common(cxxopts::Options& o, const std::string& batch, const std::string& mode) {
  o.add_options()("model", "resnet164, resnet152, resnet1001, cifar:DEPTH or imagenet:DEPTH",
                  cxxopts::value<std::string>()->default_value("resnet164"));
  if (!batch.empty()) o.add_options()("batch", "Batch size", cxxopts::value<std::string>()->default_value(batch));
  o.add_options()(
      "mode", "all (plain, exact, and blpa 8, blpa 4 and naive 4 in blpa-train's default codes: blpa-8-w12, "
      "blpa-4-l1, naive-4-l1), or a comma list of plain, exact, blpa[-K[-wW][-lL]], naive[-K[-wW][-lL]] (a bare "
      "blpa: blpa-train's default codes for --bits; blpa-K: the paper's quantiser, window 6 and lift 0)",
      cxxopts::value<std::string>()->default_value(mode))(
      "bits", "Bits for a bare blpa/naive in --mode: 8, 4 or 2", cxxopts::value<std::string>()->default_value("4"))(
      "window", "Window for a bare blpa/naive in --mode, in units of x_hat (default: the default for its bits)",
      cxxopts::value<std::string>())(
      "lift", "Lift of the window's centre above b for a bare blpa/naive, in units of x_hat (default: the default "
      "for its bits with the default window, else 0)", cxxopts::value<std::string>())(
      "size", "Input height/width (0: 32 for cifar, 224 for imagenet)",
      cxxopts::value<std::string>()->default_value("0"))(
      "device", "cpu, cuda or cuda:N", cxxopts::value<std::string>()->default_value("cpu"))(
      "threads", "LibTorch CPU threads (0: its default)", cxxopts::value<std::string>()->default_value("0"))(
      "json", "One JSON object per line and mode");
  add_numerics(o);
}

// LibTorch's size arithmetic is 64-bit: a batch whose input alone overflows it is no batch.
void check_input_size(int64_t batch, int64_t size, const char* flag = "--batch") {
  if (size > (int64_t{1} << 20))
    throw std::invalid_argument(fmt::format("--size {}: out of range (at most 1048576)", size));
  if (int64_t bytes = 0; batch > (int64_t{1} << 40) || __builtin_mul_overflow(batch * 3 * 4, size * size, &bytes))
    throw std::invalid_argument(
        fmt::format("{} {} of {}x{} images: the input alone overflows 64-bit sizes", flag, batch, size, size));
}

// Parses; returns false after printing help.
bool parse_common(cxxopts::Options& o, int argc, char** argv, Common& c, cxxopts::ParseResult& args) {
  o.add_options()("h,help", "This help");  // here, after the command's own options: --help lists it last
  args = blpa::parse_flags(o, argc, argv);
  blpa::refuse_unmatched(args);
  if (blpa::switched_on(args, "help")) {
    std::cout << o.help() << std::endl;
    return false;
  }
  blpa::memory::install_cpu_counter();
  c.model_name = args["model"].as<std::string>();
  c.net = parse_model(c.model_name);
  if (c.has_batch) c.batch = blpa::number<int64_t>(args, "batch");
  if (c.batch <= 0) throw std::invalid_argument("--batch must be positive");
  c.size = blpa::number<int64_t>(args, "size");
  if (c.size < 0) throw std::invalid_argument("--size must be positive (0: 32 for cifar, 224 for imagenet)");
  if (c.size == 0) c.size = c.net.arch == "cifar" ? 32 : 224;
  check_input_size(c.batch, c.size);
  const float window = args.count("window") ? blpa::number<float>(args, "window") : 0.0f;
  if (args.count("window") && !(window >= blpa::kMinWindow))
    throw std::invalid_argument(fmt::format("--window must be positive, at least {}", blpa::kMinWindow));
  const auto lift = args.count("lift") ? std::optional<float>(blpa::number<float>(args, "lift")) : std::nullopt;
  c.modes = parse_modes(args["mode"].as<std::string>(), blpa::number<int>(args, "bits"), window, lift,
                        args.count("bits") > 0);
  c.device = blpa::parse_device(args["device"].as<std::string>());
  if (c.device.is_cuda() && !torch::cuda::is_available())
    throw std::invalid_argument("--device cuda: this machine has no CUDA device");
  blpa::set_threads(blpa::number<int>(args, "threads"));
  c.numerics = parse_numerics(args, c.device);
  c.json = blpa::switched_on(args, "json");
  return true;
}

void sync(const torch::Device& d) {
  if (d.is_cuda()) torch::cuda::synchronize(d.index());
}

// A network of one mode, SGD with momentum, and a fixed random batch: one training step.
struct Rig {
  blpa::ResNet model;
  torch::optim::SGD opt;
  torch::Tensor x, labels;
  Rig(blpa::NetConfig net, const ModeConfig& mode, int64_t batch, int64_t size, const torch::Device& dev,
      const blpa::Numerics& numerics)
      : model(([&] {
          net.mode = mode;
          torch::manual_seed(0);
          blpa::ResNet m(net);
          m->to(dev);
          m->train();
          m->set_numerics(numerics);
          return m;
        })()),
        opt(model->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9)) {
    x = torch::randn({batch, net.in_channels, size, size}, torch::TensorOptions(dev));
    labels = torch::randint(0, net.num_classes, {batch}, torch::TensorOptions(dev).dtype(torch::kLong));
    if (dev.is_cuda()) lr = torch::full({}, 0.01, torch::TensorOptions(torch::kFloat).device(dev));
  }
  torch::Tensor lr;  // CUDA: the update is blpa-train's there (sgd_step); the CPU's is LibTorch's SGD
  // Returns the bytes autograd holds after the forward pass (of the first part, with `accum`
  // parts: blpa-train's --accum-steps).
  int64_t step(int64_t accum = 1) {
    opt.zero_grad();
    const auto dev = x.device();
    int64_t stored = 0;
    if (accum > 1) {
      blpa::accumulate_gradients(model, x, labels, accum, &stored);
    } else {
      const int64_t before = blpa::memory::allocated(dev);
      auto out = model->forward(x);
      stored = blpa::memory::allocated(dev) - before - static_cast<int64_t>(out.nbytes());
      torch::nn::functional::cross_entropy(out, labels).backward();
    }
    if (lr.defined()) blpa::sgd_step(opt, lr);
    else opt.step();
    if (model->config().mode.mode != Mode::plain) model->constrain_();  // as blpa-train and the graph
    return stored;
  }
  // One step as the bench times it: replay() when set (a CUDA graph), else step().
  std::function<void()> replay;
  void run() {
    if (replay) replay();
    else step();
  }
  int64_t param_bytes() const {
    int64_t n = 0;
    for (const auto& p : model->parameters()) n += p.nbytes();
    return n;
  }
};

std::string head(const Common& c, const ModeConfig& m, const std::string& bench,
                 std::optional<blpa::Numerics> numerics = std::nullopt) {
  const blpa::Numerics n = numerics.value_or(c.numerics);
  return fmt::format("{{\"bench\": \"{}\", \"model\": \"{}\", \"arch\": \"{}\", \"depth\": {}, \"batch\": {}, \"size\": {}, "
                     "\"mode\": \"{}\", \"bits\": {}, {}, \"device\": \"{}\", \"precision\": \"{}\", \"memory_format\": \"{}\"",
                     bench, c.model_name, c.net.arch, c.net.depth, c.batch, c.size, blpa::to_string(m.mode),
                     report_bits(m, n.precision), report_format(m), c.device.str(), blpa::to_string(n.precision),
                     blpa::layout_name(n.layout));
}

// While alive, every autograd node's evaluation (its backward and the accumulation of its
// outputs into the next nodes' inputs) is a memory::Scope named after the node, so that peaks in
// LibTorch's own nodes (plain's units, the stem's convolution, the classifier) are attributed
// too. Our units open their own scopes inside.
class NodeScopes {
 public:
  NodeScopes() {
    handle_ = at::addGlobalCallback(
        at::RecordFunctionCallback(
            [](const at::RecordFunction& fn) -> std::unique_ptr<at::ObserverContext> {
              static constexpr std::string_view prefix = "autograd::engine::evaluate_function: ";
              const std::string_view name = fn.name();
              if (name.substr(0, prefix.size()) != prefix) return nullptr;
              std::string node(name.substr(prefix.size()));
              if (!node.empty() && node.back() == '>') node.pop_back();  // CppNode<T>: named by T
              if (const auto colons = node.rfind("::"); colons != std::string::npos) node = node.substr(colons + 2);
              return std::make_unique<Context>(node);
            },
            [](const at::RecordFunction&, at::ObserverContext* ctx) {
              if (ctx) static_cast<Context*>(ctx)->scope.reset();
            })
            .scopes({at::RecordScope::FUNCTION}));
  }
  ~NodeScopes() { at::removeCallback(handle_); }
  NodeScopes(const NodeScopes&) = delete;
  NodeScopes& operator=(const NodeScopes&) = delete;

 private:
  struct Context : at::ObserverContext {
    explicit Context(const std::string& node) : scope(std::in_place, node, "backward") {}
    std::optional<blpa::memory::Scope> scope;
  };
  at::CallbackHandle handle_;
};

struct MemoryStep {
  int64_t stored = 0, peak = 0, resident = 0, params = 0;
  std::string peak_at;                        // the innermost scope open at the peak
  std::map<std::string, blpa::memory::ScopePeak> scope_peaks;  // by name: the highest of its occurrences
  std::vector<blpa::UnitRow> table;
};

// One measured training step at `batch`, after a warm-up step that creates the momentum
// buffers (training's steady state); gradients are released before it, so the peak includes
// the ones the step allocates. Peaks are above what is resident before the step.
MemoryStep measure_step(const Common& c, const ModeConfig& mode, int64_t batch, const blpa::Numerics& numerics) {
  Rig rig(c.net, mode, batch, c.size, c.device, numerics);
  rig.step();
  rig.opt.zero_grad();
  sync(c.device);
  MemoryStep m;
  m.resident = blpa::memory::allocated(c.device);
  {
    blpa::memory::PeakRecorder recorder(c.device);
    NodeScopes nodes;
    m.stored = rig.step();
    sync(c.device);
    m.peak = recorder.peak() - m.resident;
    m.peak_at = recorder.peak_scope();
    for (auto s : recorder.scopes()) {
      s.peak -= m.resident;
      auto [it, added] = m.scope_peaks.emplace(s.name, s);
      if (!added && s.peak > it->second.peak) it->second = s;
    }
  }
  m.table = rig.model->memory_table();
  m.params = rig.param_bytes();
  return m;
}

}  // namespace

int memory_main(int argc, char** argv) {
  cxxopts::Options o("blpa-bench memory",
                     "Memory of one training step (forward, backward, SGD-momentum update), measured by the\n"
                     "allocator: the counting CPU allocator, or CUDA's caching allocator statistics. plain and\n"
                     "exact are added to the modes, so every run has its reference. Each mode also runs at\n"
                     "--slope-batch: the per-sample figures are the slopes between the two batches, free of what\n"
                     "does not grow with the batch (parameter gradients, the update). The peak is attributed to\n"
                     "the innermost part of the step running when it was reached: a unit's forward or backward,\n"
                     "a block's forward, the stem, the classifier, or an autograd node (named as LibTorch names it).");
  add_common(o, "128", "blpa");
  o.add_options()("table", "Also print the per-unit table: stored bytes, and the peak during the unit's forward and "
                           "backward (per sample with --slope-batch) (human output only)")(
      "slope-batch", "The second batch for the per-sample slopes (default: half of --batch; 0: none)",
      cxxopts::value<std::string>());
  Common c;
  cxxopts::ParseResult args;
  if (!parse_common(o, argc, argv, c, args)) return 0;
  const int64_t batch2 = args.count("slope-batch") ? blpa::number<int64_t>(args, "slope-batch") : c.batch / 2;
  if (batch2 < 0) throw std::invalid_argument("--slope-batch must be >= 0 (0: none)");
  if (batch2 == c.batch) throw std::invalid_argument("--slope-batch must differ from --batch");
  check_input_size(batch2, c.size, "--slope-batch");
  // plain first (every ratio needs it), then exact, then the rest in the order given. In bf16,
  // plain also runs in float32 (row plain-fp32): blpa's codes against both.
  struct Row {
    ModeConfig mode;
    blpa::Numerics numerics;
    std::string name;
  };
  const bool bf16 = c.numerics.precision == blpa::Precision::bf16;
  blpa::Numerics fp32 = c.numerics;
  fp32.precision = blpa::Precision::fp32;
  std::vector<Row> rows{{{Mode::plain}, c.numerics, "plain"}};
  if (bf16) rows.push_back({{Mode::plain}, fp32, "plain-fp32"});
  rows.push_back({{Mode::exact}, c.numerics, "exact"});
  for (const auto& m : c.modes)
    if (m.mode != Mode::plain && m.mode != Mode::exact) rows.push_back({m, c.numerics, m.str()});
  struct Result {
    int64_t stored, peak;
    double stored_slope, peak_slope;  // bytes per sample; 0 without a second batch
  };
  struct Measured {
    MemoryStep m;
    Result r;
    std::map<std::string, double> scope_peak;
    std::string slope_peak_at;
  };
  auto measure = [&](const Row& row) {
    const auto& [mode, numerics, row_name] = row;
    Measured x{measure_step(c, mode, c.batch, numerics), {}, {}, {}};
    const MemoryStep& m = x.m;
    Result& r = x.r;
    r = Result{m.stored, m.peak, 0, 0};
    // Per scope: its peak, per sample when there is a second batch; and the scope with the
    // highest, the innermost of equals (a unit's rather than the autograd node around it).
    std::map<std::string, double>& scope_peak = x.scope_peak;
    std::string& slope_peak_at = x.slope_peak_at;
    if (batch2 > 0) {
      const MemoryStep m2 = measure_step(c, mode, batch2, numerics);
      const double db = double(c.batch - batch2);
      r.stored_slope = double(m.stored - m2.stored) / db;
      r.peak_slope = double(m.peak - m2.peak) / db;
      int depth = -1;
      for (const auto& [name, p] : m.scope_peaks)
        if (const auto it = m2.scope_peaks.find(name); it != m2.scope_peaks.end()) {
          const double v = double(p.peak - it->second.peak) / db;
          scope_peak[name] = v;
          if (depth < 0 || v > scope_peak[slope_peak_at] || (v == scope_peak[slope_peak_at] && p.depth > depth))
            slope_peak_at = name, depth = p.depth;
        }
    } else {
      for (const auto& [name, p] : m.scope_peaks) scope_peak[name] = double(p.peak);
    }
    return x;
  };
  // The plain rows first, as every row's ratios need them (plain in float32 too, in bf16).
  std::map<std::string, Result> results;
  std::map<std::string, Measured> plain_rows;
  for (const Row& row : rows)
    if (row.mode.mode == Mode::plain) results[row.name] = (plain_rows[row.name] = measure(row)).r;
  for (const Row& row : rows) {
    const auto& [mode, numerics, row_name] = row;
    const auto done = plain_rows.find(row_name);
    const Measured x = done != plain_rows.end() ? std::move(done->second) : measure(row);
    const MemoryStep& m = x.m;
    const Result& r = x.r;
    auto scope_peak = x.scope_peak;  // read with [] below
    const std::string& slope_peak_at = x.slope_peak_at;
    results[row_name] = r;
    int64_t units = 0;
    for (const auto& row : m.table) units += row.memory.total();
    const auto& p = results.at("plain");
    // Per-sample peaks that cannot be growth rates: the step's below what autograd stores per
    // sample, or one part's far above the step's (a few percent above is the usual moving of the
    // peak from part to part). Between these batches the peak moved (LibTorch's CPU convolutions
    // size their scratch by the batch); they were printed without a word.
    const bool peak_moved =
        batch2 > 0 && (r.peak_slope < r.stored_slope || scope_peak[slope_peak_at] > 1.5 * r.peak_slope);
    // Against plain in float32 too, in a bf16 run.
    auto vs_fp32 = [&](auto ratio) {
      const auto it = results.find("plain-fp32");
      return bf16 && it != results.end() ? fmt::format("{:.3f}", ratio(it->second)) : std::string("null");
    };
    if (c.json) {
      fmt::print("{}, \"stored_activation_bytes\": {}, \"unit_accounted_bytes\": {}, \"peak_bytes\": {}, "
                 "\"resident_bytes\": {}, \"param_bytes\": {}, \"grad_bytes\": {}, \"optimizer_bytes\": {}, "
                 "\"stored_ratio_plain\": {:.3f}, \"peak_ratio_plain\": {:.3f}, \"peak_at\": {}",
                 head(c, mode, "memory", numerics), m.stored, units, m.peak, m.resident, m.params, m.params, m.params,
                 double(p.stored) / m.stored, double(p.peak) / m.peak, blpa::json_string(m.peak_at));
      if (batch2 > 0)
        fmt::print(", \"slope_batch\": {}, \"stored_per_sample_bytes\": {:.0f}, \"peak_per_sample_bytes\": {:.0f}, "
                   "\"stored_per_sample_ratio_plain\": {:.3f}, \"peak_per_sample_ratio_plain\": {:.3f}, "
                   "\"peak_per_sample_at\": {}, \"peak_per_sample_at_bytes\": {:.0f}, \"peak_per_sample_moved\": {}",
                   batch2, r.stored_slope, r.peak_slope, p.stored_slope / r.stored_slope, p.peak_slope / r.peak_slope,
                   blpa::json_string(slope_peak_at), scope_peak[slope_peak_at], peak_moved);
      else  // the same keys in every row, for the scripts that read them into one table
        fmt::print(", \"slope_batch\": null, \"stored_per_sample_bytes\": null, \"peak_per_sample_bytes\": null, "
                   "\"stored_per_sample_ratio_plain\": null, \"peak_per_sample_ratio_plain\": null, "
                   "\"peak_per_sample_at\": null, \"peak_per_sample_at_bytes\": null, \"peak_per_sample_moved\": null");
      fmt::print(", \"stored_ratio_plain_fp32\": {}, \"peak_ratio_plain_fp32\": {}",
                 vs_fp32([&](const Result& f) { return double(f.stored) / m.stored; }),
                 vs_fp32([&](const Result& f) { return double(f.peak) / m.peak; }));
      fmt::print(", \"peak_per_sample_ratio_plain_fp32\": {}",
                 batch2 > 0 ? vs_fp32([&](const Result& f) { return f.peak_slope / r.peak_slope; }) : "null");
      fmt::print("}}\n");
    } else {
      fmt::print("{:8s} stored by autograd {:10.2f} MiB ({:.3f} MiB/sample; units account for {:.2f} MiB), "
                 "step peak above resident {:10.2f} MiB, resident (params, momentum, data) {:.2f} MiB\n",
                 row_name, m.stored / 1048576.0, m.stored / 1048576.0 / c.batch, units / 1048576.0,
                 m.peak / 1048576.0, m.resident / 1048576.0);
      fmt::print("         peak in {}\n", m.peak_at.empty() ? "(no scope: loss, update)" : m.peak_at);
      if (batch2 > 0)
        fmt::print("         per sample (slopes from batch {}): stored {:.3f} MiB, step peak {:.3f} MiB, highest "
                   "in {} ({:.3f} MiB)\n",
                   batch2, r.stored_slope / 1048576.0, r.peak_slope / 1048576.0, slope_peak_at,
                   scope_peak[slope_peak_at] / 1048576.0);
      if (peak_moved)
        fmt::print("         (not growth rates: the peak moved between batch {} and {}, as the convolutions' scratch "
                   "follows the batch; take larger batches for per-sample peaks)\n",
                   batch2, c.batch);
      if (blpa::switched_on(args, "table")) {
        const char* per = batch2 > 0 ? "MiB/sample" : "MiB";
        fmt::print("    {:14s} {:>20s} {:>10s} {:>8s} {:>10s}  peak {} in forward, backward\n", "unit", "input",
                   "codes", "metadata", "full", per);
        auto peak_of = [&](const std::string& name) {
          const auto it = scope_peak.find(name);
          return it == scope_peak.end() ? 0.0 : it->second / 1048576.0;
        };
        for (const auto& row : m.table) {
          fmt::print("    {:14s} {:>20s} {:10d} {:8d} {:10d}  {:10.3f} {:10.3f}\n", row.name,
                     fmt::format("{}", fmt::join(row.memory.input_sizes, "x")), row.memory.code_bytes,
                     row.memory.metadata_bytes, row.memory.full_bytes, peak_of(row.name + " forward"),
                     peak_of(row.name + " backward"));
          const auto dot = row.name.find(".u3");
          if (dot != std::string::npos)  // the block's forward: its units and the residual sum
            fmt::print("    {:14s} {:>63s}  {:10.3f}\n", row.name.substr(0, dot), "(block, with the sum)",
                       peak_of(row.name.substr(0, dot) + " forward"));
        }
        fmt::print("    other parts of the step, peak {}:\n", per);
        for (const auto& [name, v] : scope_peak)
          if (name.rfind("block", 0) != 0 && name.rfind("final ", 0) != 0)
            fmt::print("    {:40s} {:10.3f}\n", name, v / 1048576.0);
      }
    }
  }
  if (!c.json) {
    for (const char* ref : {"plain", "plain-fp32"}) {
      if (!results.count(ref)) continue;
      const auto& p = results.at(ref);
      for (const auto& [name, r] : results)
        if (name.rfind("plain", 0) != 0) {
          fmt::print("{:10s} / {:8s}: stored {:6.2f}x, step peak {:6.2f}x", ref, name, double(p.stored) / r.stored,
                     double(p.peak) / r.peak);
          if (batch2 > 0)
            fmt::print("; per sample: stored {:6.2f}x, step peak {:6.2f}x", p.stored_slope / r.stored_slope,
                       p.peak_slope / r.peak_slope);
          fmt::print("\n");
        }
    }
    fmt::print("(precision {}, layout {}{})\n", blpa::to_string(c.numerics.precision), blpa::layout_name(c.numerics.layout),
               bf16 ? "; plain-fp32: plain in float32, the same layout" : "");
  }
  return 0;
}

// ATen operator calls during one training step: the ones made directly by our code and by
// autograd (outermost), and all of them. On a GPU whose step is bound by the host launching
// kernels (host_ms close to median_ms), these counts are what a mode costs (blpa's own codec
// kernels are not ATen operators and are not counted). BLPA_OPS_TRACE=1 prints each call.
struct OpCount {
  int64_t outer = 0, all = 0;
};

OpCount count_ops(Rig& rig) {
  static std::atomic<int64_t> outer{0}, all{0};
  static thread_local int depth = 0;
  outer = 0;
  all = 0;
  const auto handle = at::addGlobalCallback(
      at::RecordFunctionCallback(
          [](const at::RecordFunction& fn) -> std::unique_ptr<at::ObserverContext> {
            if (std::getenv("BLPA_OPS_TRACE")) std::fprintf(stderr, "OP%d %s\n", depth, fn.name());
            if (depth++ == 0) ++outer;
            ++all;
            return nullptr;
          },
          [](const at::RecordFunction&, at::ObserverContext*) { --depth; })
          .scopes({at::RecordScope::FUNCTION}));
  rig.step();
  sync(rig.x.device());
  at::removeCallback(handle);
  return {outer.load(), all.load()};
}

// One step under LibTorch's profiler (Kineto; CUPTI on CUDA). On CUDA: the kernels', copies'
// and memsets' time summed by name, the sum of all of it (busy_ms) and the step's wall time, so
// busy_ms / wall_ms says how much of the step the GPU worked. On CPU the operators' times are
// inclusive (an operator's time contains those it calls), so the sums overlap.
struct Profile {
  double busy_ms = 0, wall_ms = 0;
  int64_t events = 0;  // CUDA: kernels, copies and memsets (what the step launched); CPU: operator calls
  std::vector<std::tuple<double, int64_t, std::string>> top;  // total ms, calls, name
};

Profile profile_step(Rig& rig, size_t top_n, const std::string& trace) {
  namespace prof = torch::autograd::profiler;
  using torch::profiler::impl::ActivityType;
  const auto dev = rig.x.device();
  const torch::profiler::impl::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO);
  const std::set<ActivityType> activities =
      dev.is_cuda() ? std::set<ActivityType>{ActivityType::CPU, ActivityType::CUDA} : std::set<ActivityType>{ActivityType::CPU};
  // On the CPU, Kineto's own lines (its start and stop, and "gpuGetDeviceCount failed" on a
  // machine without a GPU) say nothing about the step: silenced, unless the user set the level.
  // On CUDA its errors (CUPTI's) explain an empty profile, so they stay.
  if (!dev.is_cuda()) ::setenv("KINETO_LOG_LEVEL", "6", /*overwrite=*/0);
  prof::prepareProfiler(config, activities);
  prof::enableProfiler(config, activities);
  sync(dev);
  const auto t0 = Clock::now();
  rig.run();
  sync(dev);
  const double wall = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  const auto result = prof::disableProfiler();
  if (!trace.empty()) {  // Chrome trace format: chrome://tracing, Perfetto
    std::error_code ec;
    std::filesystem::remove(trace, ec);
    result->save(trace);  // Kineto reports no failure: look for the file
    if (!std::filesystem::is_regular_file(trace, ec) || std::filesystem::file_size(trace, ec) == 0)
      throw std::runtime_error("--trace: " + trace + " could not be written");
  }
  std::map<std::string, std::pair<double, int64_t>> by_name;
  Profile p;
  p.wall_ms = wall;
  for (const auto& e : result->events()) {
    if (e.deviceType() != dev.type()) continue;
    const double ms = static_cast<double>(e.durationNs()) / 1e6;
    auto& [total, calls] = by_name[e.name()];
    total += ms;
    ++calls;
    ++p.events;
    p.busy_ms += ms;
  }
  for (const auto& [name, tc] : by_name) p.top.emplace_back(tc.first, tc.second, name);
  std::sort(p.top.begin(), p.top.end(), [](const auto& a, const auto& b) { return std::get<0>(a) > std::get<0>(b); });
  if (p.top.size() > top_n) p.top.resize(top_n);
  return p;
}

int step_main(int argc, char** argv) {
  cxxopts::Options o("blpa-bench step",
                     "Training-step time (forward, backward, SGD update) per mode in one process: median and\n"
                     "spread over the timed steps after --warmup, and the ratio of the median to plain's at the\n"
                     "same precision and layout. Every combination of --precision, --memory-format and --mode is\n"
                     "set up first; then --rounds times, each runs --steps timed steps in turn, so that a drift\n"
                     "of the machine's speed falls on all of them alike.");
  add_common(o, "128", "plain,blpa-8,blpa-4");
  o.add_options()("warmup", "Untimed steps per mode", cxxopts::value<std::string>()->default_value("2"))(
      "steps", "Timed steps per mode and round", cxxopts::value<std::string>()->default_value("5"))(
      "rounds", "Rounds of timed steps, the modes taking turns", cxxopts::value<std::string>()->default_value("1"))(
      "profile", "Then profile one more step per mode: the GPU's busy time, the number of kernels, copies and "
      "memsets it ran, and the N costliest kernels (on CPU: operators, inclusive times); 0: no profile",
      cxxopts::value<std::string>()->default_value("0"), "N")(
      "trace", "With --profile: write each mode's profiled step to PREFIX-MODE.json (PREFIX-MODE-PRECISION-LAYOUT.json with several) (Chrome trace format)",
      cxxopts::value<std::string>()->default_value(""), "PREFIX")(
      "cuda-graphs", "CUDA: time each mode also as one captured iteration replayed as a CUDA graph (as blpa-train "
      "--cuda-graphs runs it), in a row of its own after the eager one; JSON rows say \"graphed\" and give the "
      "graph's pool in graph_pool_bytes (peak_bytes leaves it out). Needs --warmup 1 or more");
  o.custom_help("[OPTIONS]  (--precision and --memory-format take comma lists here: fp32,bf16)");
  // The lists are split before the common parsing, which checks one value of each.
  std::vector<std::string> argv_one(argv, argv + argc);
  std::vector<std::string> precisions{"auto"}, layouts{"auto"};
  for (size_t i = 1; i < argv_one.size(); ++i)
    for (auto [flag, list] : {std::pair{std::string("--precision"), &precisions}, {"--memory-format", &layouts}}) {
      std::string& a = argv_one[i];
      std::string* value = a == flag && i + 1 < argv_one.size() ? &argv_one[i + 1]
                           : a.rfind(flag + "=", 0) == 0   ? &a
                                                           : nullptr;
      if (!value) continue;
      const size_t at = value == &a ? flag.size() + 1 : 0;
      *list = blpa::comma_list(flag, value->substr(at));
      *value = value->substr(0, at) + list->front();
    }
  std::vector<char*> argv_first;
  for (auto& a : argv_one) argv_first.push_back(a.data());
  Common c;
  cxxopts::ParseResult args;
  if (!parse_common(o, argc, argv_first.data(), c, args)) return 0;
  std::vector<blpa::Numerics> numerics;
  for (const auto& p : precisions)
    for (const auto& l : layouts) numerics.push_back(blpa::numerics_for(p, l, c.device));
  const int warmup = blpa::number<int>(args, "warmup"), steps = blpa::number<int>(args, "steps");
  const int rounds = blpa::number<int>(args, "rounds"), top_n = blpa::number<int>(args, "profile");
  if (steps <= 0 || warmup < 0 || rounds <= 0)
    throw std::invalid_argument("--steps and --rounds must be positive and --warmup >= 0");
  if (top_n < 0) throw std::invalid_argument("--profile must be >= 0");
  const std::string trace = args["trace"].as<std::string>();
  if (!trace.empty() && top_n == 0) throw std::invalid_argument("--trace needs --profile N");
  if (!trace.empty()) {  // PREFIX's folder, as mkdir -p: a trace is written only after the timed steps
    std::error_code ec;
    const auto folder = std::filesystem::path(trace).parent_path();
    if (!folder.empty()) std::filesystem::create_directories(folder, ec);
    if (ec || (!folder.empty() && !std::filesystem::is_directory(folder)))
      throw std::invalid_argument("--trace " + trace + ": its folder cannot be created" +
                                  (ec ? " (" + ec.message() + ")" : std::string()));
  }
  const bool graphs = blpa::switched_on(args, "cuda-graphs");
  if (graphs && !c.device.is_cuda()) throw std::invalid_argument("--cuda-graphs needs --device cuda");
  // cuDNN picks its kernels and LibTorch makes its handles at a shape's first step: eagerly,
  // not inside the capture.
  if (graphs && warmup < 1) throw std::invalid_argument("--cuda-graphs needs --warmup 1 or more");

  struct Entry {
    ModeConfig mode;
    blpa::Numerics numerics;
    bool graphed = false;
    std::unique_ptr<Rig> rig;
    std::unique_ptr<blpa::GraphedStep> replay;
    std::vector<double> ms, host_ms;  // host_ms: until run() returns, before the device has finished
    // Bytes this entry's rig holds between steps, and its peak: the other entries' rigs left
    // out, so that a mode's peak does not depend on the --mode list it ran in.
    int64_t resident = 0, peak = 0;
  };
  // CUDA: cuBLAS's workspace and LibTorch's handles, made at a precision's first step, stay
  // allocated to the end; without a throwaway rig first they would count in the first entry's
  // resident bytes, and so in its peak alone.
  if (c.device.is_cuda())
    for (const auto& n : numerics) {
      blpa::apply_precision(n.precision, c.device);
      Rig(c.net, c.modes.front(), c.batch, c.size, c.device, n).step();
    }
  std::vector<Entry> entries;
  for (const auto& n : numerics)
    for (const auto& mode : c.modes)
      for (const bool graphed : {false, true}) {
        if (graphed && !graphs) continue;
        Entry e;
        e.mode = mode, e.numerics = n, e.graphed = graphed;
        blpa::apply_precision(n.precision, c.device);
        sync(c.device);
        const int64_t before = blpa::memory::allocated(c.device);
        e.rig = std::make_unique<Rig>(c.net, mode, c.batch, c.size, c.device, n);
        Rig& rig = *e.rig;
        for (int i = 0; i < warmup; ++i) rig.step();
        if (graphed) {
          e.replay = std::make_unique<blpa::GraphedStep>(rig.model, rig.opt, 1);
          e.replay->run(rig.x, rig.labels, 0.01);  // captures, then replays once
          rig.replay = [&rig, r = e.replay.get()] { r->run(rig.x, rig.labels, 0.01); };
        }
        sync(c.device);
        e.resident = blpa::memory::allocated(c.device) - before;
        entries.push_back(std::move(e));
      }
  for (int round = 0; round < rounds; ++round)
    for (auto& e : entries) {
      blpa::apply_precision(e.numerics.precision, c.device);
      sync(c.device);
      const int64_t others = blpa::memory::allocated(c.device) - e.resident;
      blpa::memory::reset_peak(c.device);
      for (int i = 0; i < steps; ++i) {
        sync(c.device);
        const auto t0 = Clock::now();
        e.rig->run();
        e.host_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
        sync(c.device);
        e.ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
      }
      e.peak = std::max(e.peak, blpa::memory::peak(c.device) - others);
    }

  std::map<std::string, double> plain_ms;  // by numerics and graphed
  for (auto& e : entries) {
    Rig& rig = *e.rig;
    blpa::apply_precision(e.numerics.precision, c.device);
    auto median_of = [](std::vector<double>& v) {
      std::sort(v.begin(), v.end());
      return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
    };
    const double median = median_of(e.ms), host_median = median_of(e.host_ms);
    const OpCount ops = e.graphed ? OpCount{} : count_ops(rig);
    const std::string key = e.numerics.str() + (e.graphed ? " graphed" : "");
    if (e.mode.mode == Mode::plain) plain_ms[key] = median;
    const std::string ratio = plain_ms.count(key) ? fmt::format("{:.3f}", median / plain_ms[key]) : "null";
    Profile p;
    if (top_n > 0)
      p = profile_step(rig, static_cast<size_t>(top_n),
                       trace.empty() ? ""
                                     : trace + "-" + e.mode.str() + (numerics.size() > 1 ? "-" + e.numerics.str() : "") +
                                           ".json");
    std::string profile_json;
    if (top_n > 0) {
      profile_json = fmt::format(", \"profile\": {{\"wall_ms\": {:.3f}, \"busy_ms\": {:.3f}, \"events\": {}, \"top\": [",
                                 p.wall_ms, p.busy_ms, p.events);
      for (size_t i = 0; i < p.top.size(); ++i)
        profile_json += fmt::format("{}{{\"ms\": {:.3f}, \"calls\": {}, \"name\": {}}}", i ? ", " : "",
                                    std::get<0>(p.top[i]), std::get<1>(p.top[i]), blpa::json_string(std::get<2>(p.top[i])));
      profile_json += "]}";
    }
    if (c.json)
      fmt::print("{}, \"threads\": {}, \"graphed\": {}, \"steps\": {}, \"rounds\": {}, \"median_ms\": {:.3f}, "
                 "\"min_ms\": {:.3f}, \"max_ms\": {:.3f}, \"host_ms\": {:.3f}, \"ops\": {}, \"ops_outermost\": {}, "
                 "\"images_per_s\": {:.2f}, \"overhead_vs_plain\": {}, \"peak_bytes\": {}, \"graph_pool_bytes\": {}{}}}\n",
                 head(c, e.mode, "step", e.numerics), c.device.is_cuda() ? 0 : torch::get_num_threads(), e.graphed,
                 steps, rounds, median, e.ms.front(), e.ms.back(), host_median, ops.all, ops.outer,
                 c.batch * 1000.0 / median, ratio, e.peak, e.replay ? e.replay->pool_bytes() : 0, profile_json);
    else {
      fmt::print("{:8s} {}{} median {:9.2f} ms  (min {:.2f}, max {:.2f}, host {:.2f}, {} step{}, {} outermost ops)  "
                 "{:8.1f} img/s  "
                 "vs plain {}\n",
                 e.mode.str(), e.numerics.str(), e.graphed ? " graphed" : "", median, e.ms.front(), e.ms.back(),
                 host_median, e.ms.size(), e.ms.size() == 1 ? "" : "s", ops.outer, c.batch * 1000.0 / median,
                 plain_ms.count(key) ? ratio + "x" : std::string("(run plain first for the ratio)"));
      if (top_n > 0) {
        fmt::print("  profiled step: {:.2f} ms wall, {:.2f} ms {} in {} {}\n", p.wall_ms, p.busy_ms,
                   c.device.is_cuda() ? "of GPU work" : "of operators (inclusive, overlapping)", p.events,
                   c.device.is_cuda() ? "kernels, copies and memsets" : "operator calls");
        for (const auto& [total, calls, name] : p.top)
          fmt::print("  {:9.3f} ms {:6d}x  {}\n", total, calls, name.size() > 110 ? name.substr(0, 107) + "..." : name);
      }
    }
  }
  return 0;
}

int max_batch_main(int argc, char** argv) {
  cxxopts::Options o("blpa-bench max-batch",
                     "The largest batch whose training step fits in --budget-gib, per mode, found by real\n"
                     "attempts: allocations beyond the budget fail with out-of-memory (CUDA: the caching\n"
                     "allocator's memory fraction; CPU: the counting allocator enforces it), the attempt is\n"
                     "unwound and the next one starts from a clean allocator (leaks are reported). With\n"
                     "--accum-steps K each batch trains as K equal parts (blpa-train's --accum-steps): the\n"
                     "batches tried are multiples of K.");
  add_common(o, "", "plain,blpa-4");  // no --batch: the batch is searched
  o.add_options()("budget-gib", "Memory budget in GiB, including parameters, momentum and the batch",
                  cxxopts::value<std::string>()->default_value("1"))(
      "max", "Largest batch to try (one that fits is reported as capped)",
      cxxopts::value<std::string>()->default_value("4096"))(
      "accum-steps", "Train each batch as this many equal parts, accumulating their gradients",
      cxxopts::value<std::string>()->default_value("1"), "K");
  // Said here, before --help is seen: cxxopts refuses an unknown flag even beside --help.
  for (int i = 1; i < argc; ++i)
    if (std::string_view(argv[i]) == "--batch" || std::string_view(argv[i]).rfind("--batch=", 0) == 0)
      throw std::invalid_argument("--batch: max-batch searches the batch; --max caps it");
  Common c;
  c.has_batch = false;
  cxxopts::ParseResult args;
  if (!parse_common(o, argc, argv, c, args)) return 0;
  const double gib = blpa::number<double>(args, "budget-gib");
  if (!(gib > 0)) throw std::invalid_argument("--budget-gib must be positive");
  if (gib > (1 << 20)) throw std::invalid_argument(fmt::format("--budget-gib {}: out of range (at most 1048576)", gib));
  const int64_t budget = static_cast<int64_t>(gib * (1ll << 30));
  const int64_t accum = blpa::number<int64_t>(args, "accum-steps");
  if (budget <= 0) throw std::invalid_argument("--budget-gib must be at least a byte");
  if (accum <= 0) throw std::invalid_argument("--accum-steps must be positive");
  if (blpa::number<int64_t>(args, "max") < accum) throw std::invalid_argument("--max must be at least --accum-steps");
  const int64_t cap = blpa::number<int64_t>(args, "max") / accum;  // the search runs over the parts' size
  std::map<std::string, int64_t> best;
  for (const auto& mode : c.modes) {
    const int64_t base = blpa::memory::allocated(c.device);
    int64_t leaked = 0, attempts = 0;
    auto fits = [&](int64_t part) {
      ++attempts;
      bool ok = true;
      blpa::memory::set_limit(c.device, base + budget);
      try {
        Rig rig(c.net, mode, part * accum, c.size, c.device, c.numerics);
        // Two steps: the second is training's steady state, with the momentum buffers that the
        // first creates (one step's peak left them out, and overstated the batch by up to the
        // momentum's size: 230 MiB, some 14 samples, for ResNet-152).
        rig.step(accum);
        rig.step(accum);
        sync(c.device);
      } catch (const c10::OutOfMemoryError&) {
        ok = false;
      }
      blpa::memory::set_limit(c.device, 0);
      blpa::memory::release_cached(c.device);
      leaked = std::max(leaked, blpa::memory::allocated(c.device) - base);
      return ok;
    };
    int64_t lo = 0, hi = 1;  // lo fits (0: nothing yet), hi is the next to try
    while (hi <= cap && fits(hi)) lo = hi, hi *= 2;
    if (hi > cap) hi = cap + 1;
    while (hi - lo > 1) {  // invariant: lo fits, hi does not
      const int64_t mid = (lo + hi) / 2;
      (fits(mid) ? lo : hi) = mid;
    }
    const bool capped = lo == cap;  // --max fitted: a larger batch may fit too
    lo *= accum;
    best[mode.str()] = lo;
    c.batch = lo;  // the JSON's "batch" is the batch found
    const auto plain = best.find("plain");
    const std::string ratio =
        plain != best.end() && plain->second > 0 ? fmt::format("{:.2f}", double(lo) / plain->second) : "null";
    if (c.json)
      fmt::print("{}, \"budget_bytes\": {}, \"accum_steps\": {}, \"max_batch\": {}, \"capped\": {}, "
                 "\"attempts\": {}, \"leaked_bytes\": {}, \"ratio_vs_plain\": {}}}\n",
                 head(c, mode, "max-batch"), budget, accum, lo, capped, attempts, leaked, ratio);
    else
      fmt::print("{:8s} largest batch within {:.4g} GiB{}: {:5d}{}  ({} attempts, {} bytes leaked)  vs plain {}\n",
                 mode.str(), budget / double(1ll << 30),
                 accum > 1 ? fmt::format(" in {} parts", accum) : std::string(), lo,
                 capped ? " (--max: more may fit)" : "", attempts, leaked,
                 ratio != "null"            ? ratio + "x"
                 : best.count("plain") == 0 ? std::string("- (not measured: add plain to --mode)")
                                            : std::string("-"));
  }
  return 0;
}

namespace {

// One network at fixed parameters and one batch: the gradient of the cross-entropy in a mode.
struct FidelityCase {
  blpa::NetConfig net;
  blpa::ResNet params{nullptr};  // whose parameters every mode's network copies
  torch::Tensor x, labels;
  std::string source, checkpoint;  // "drawn" or "checkpoint" (then its path and iteration)
  std::string trained_precision;   // a checkpoint's: what --precision auto measures it in
  int64_t iteration = 0;
  blpa::Numerics numerics;  // of every mode, plain included

  std::vector<torch::Tensor> grads(const ModeConfig& m, double* loss = nullptr) {
    net.mode = m;
    blpa::ResNet model(net);
    model->set_numerics(numerics);
    {
      torch::NoGradGuard g;
      auto src = params->parameters(), dst = model->parameters();
      for (size_t i = 0; i < src.size(); ++i) dst[i].copy_(src[i]);
    }
    model->train();
    auto l = torch::nn::functional::cross_entropy(model->forward(x), labels);
    l.backward();
    if (loss) *loss = l.item<double>();
    std::vector<torch::Tensor> g;
    for (const auto& p : model->parameters()) g.push_back(p.grad().flatten());
    return g;
  }
};

// The network of each depth with BatchNorm affine parameters drawn as training leaves them,
// on random images: at initialisation (gamma 1, beta 0) blpa and naive would coincide.
FidelityCase drawn_case(int depth, int64_t batch, int64_t size, uint64_t seed) {
  FidelityCase c;
  c.net.depth = depth;
  c.source = "drawn";
  torch::manual_seed(seed);
  c.x = torch::randn({batch, 3, size, size});
  c.labels = torch::randint(0, 10, {batch});
  c.net.mode = {Mode::plain, 8};
  c.params = blpa::ResNet(c.net);
  torch::NoGradGuard g;
  for (auto& [name, u] : c.params->units()) {
    u->gamma.uniform_(0.5, 1.5);
    u->beta.normal_(0, 0.5);
  }
  return c;
}

// The weights of a blpa-train checkpoint on a batch of its training images (normalised as the
// trainer does, not augmented), drawn by `seed`.
FidelityCase checkpoint_case(const std::string& path, const std::string& data_dir, int64_t batch, uint64_t seed) {
  FidelityCase c;
  const blpa::Checkpoint stored = blpa::read_checkpoint(path);
  c.params = blpa::load_model(stored);
  c.net = c.params->config();
  c.source = "checkpoint";
  c.checkpoint = path;
  c.iteration = stored.state.iteration;
  auto kv = stored.config;
  c.trained_precision = kv["precision"];
  if (kv["dataset"] == "imagenet")
    throw std::invalid_argument("fidelity --checkpoint: " + path + " is an ImageNet network, which is not supported");
  const std::string dir = blpa::checkpoint_data_dir(stored, data_dir);  // as blpa-eval finds it, or says why not
  blpa::data::Dataset train = blpa::data::load(kv["dataset"], dir, true);
  const int64_t subset = stored.train_subset;
  if (subset > 0 && subset < train.size()) {
    train.images = train.images.narrow(0, 0, subset).contiguous();
    train.labels = train.labels.narrow(0, 0, subset).contiguous();
  }
  auto b = blpa::data::make_batch(train, blpa::data::batch_indices(train.size(), batch, seed, 0),
                                  blpa::data::channel_stats(train), nullptr, 0);
  c.x = b.images;
  c.labels = b.labels;
  return c;
}

}  // namespace

int fidelity_main(int argc, char** argv) {
  cxxopts::Options o("blpa-bench fidelity",
                     "Gradient fidelity against plain: the relative error of the whole gradient and the smallest\n"
                     "per-parameter cosine similarity, for each mode x bits x window. The parameters are either\n"
                     "drawn (CIFAR networks of --depths with BatchNorm affine parameters as training leaves them:\n"
                     "gamma ~ U(0.5, 1.5), beta ~ N(0, 0.5), on random images) or a trained network's\n"
                     "(--checkpoint, on a batch of its training images).");
  o.add_options()("depths", "CIFAR depths (9n+2) of drawn networks",
                  cxxopts::value<std::string>()->default_value("20,56,110,164"))(
      "checkpoint", "Comma list of blpa-train checkpoints to measure at instead of drawn parameters (CIFAR-style "
      "networks on CIFAR, MNIST or Fashion-MNIST), each in the precision it was trained in unless --precision says "
      "otherwise", cxxopts::value<std::string>(), "PATHS")(
      "data-dir", "Where the --checkpoint networks' data set is, one folder for all (default: the folder each run recorded)",
      cxxopts::value<std::string>(), "DIR")(
      "modes", "Comma list of blpa, naive", cxxopts::value<std::string>()->default_value("blpa,naive"))(
      "bits", "Comma list of 8, 4, 2", cxxopts::value<std::string>()->default_value("8,4,2"))(
      "windows", "Comma list of window widths in units of x_hat, or 'default' (the default for the bits; the "
      "paper's is 6)", cxxopts::value<std::string>()->default_value("default"))(
      "lifts", "Comma list of the window's lifts above b in units of x_hat, or 'default' (the default for the bits "
      "with the default window, else 0: the paper's)", cxxopts::value<std::string>()->default_value("default"))(
      "batch", "Batch size", cxxopts::value<std::string>()->default_value("16"))(
      "size", "Input height/width of drawn networks", cxxopts::value<std::string>()->default_value("32"))(
      "seed", "Seed of the data and the drawn parameters", cxxopts::value<std::string>()->default_value("0"))(
      "threads", "LibTorch CPU threads (0: its default)", cxxopts::value<std::string>()->default_value("0"))(
      "json", "One JSON object per line");
  add_numerics(o, /*cpu_only=*/true);
  o.add_options()("h,help", "This help");
  auto args = blpa::parse_flags(o, argc, argv);
  blpa::refuse_unmatched(args);
  if (blpa::switched_on(args, "help")) {
    std::cout << o.help() << std::endl;
    return 0;
  }
  // Not "needs --device cuda": fidelity has no --device.
  if (args["precision"].as<std::string>() == "tf32")
    throw std::invalid_argument("--precision tf32: blpa-bench fidelity runs on the CPU, which has no TF32 (its float32 "
                                "is fp32)");
  const int64_t batch = blpa::number<int64_t>(args, "batch"), size = blpa::number<int64_t>(args, "size");
  if (batch <= 0 || size <= 0) throw std::invalid_argument("--batch and --size must be positive");
  check_input_size(batch, size);
  const uint64_t seed = blpa::number<uint64_t>(args, "seed");
  blpa::set_threads(blpa::number<int>(args, "threads"));
  const blpa::Numerics numerics = parse_numerics(args, torch::kCPU);  // the fidelity bench runs on the CPU
  std::vector<ModeConfig> modes;
  std::vector<int> bit_widths;
  for (const auto& b : blpa::comma_list("--bits", args["bits"].as<std::string>())) {
    bit_widths.push_back(blpa::parse_number<int>("--bits", b));
    if (bit_widths.back() != 8 && bit_widths.back() != 4 && bit_widths.back() != 2)
      throw std::invalid_argument("--bits takes 8, 4 and 2, got " + b);
  }
  const auto windows = blpa::comma_list("--windows", args["windows"].as<std::string>());
  const auto lifts = blpa::comma_list("--lifts", args["lifts"].as<std::string>());
  for (const auto& m : blpa::comma_list("--modes", args["modes"].as<std::string>()))
    for (const int bits : bit_widths)
      for (const auto& w : windows)
        for (const auto& l : lifts) {
          if (m != "blpa" && m != "naive") throw std::invalid_argument("--modes takes blpa and naive, got " + m);
          ModeConfig mc = blpa::parse_mode_config(m + "-" + std::to_string(bits));
          mc.window = w == "default" ? 0.0f : blpa::parse_number<float>("--windows", w);
          if (w != "default" && !(mc.window >= blpa::kMinWindow))
            throw std::invalid_argument(
                fmt::format("--windows must be positive, at least {}, got {}", blpa::kMinWindow, w));
          mc.lift = l == "default" ? std::nullopt : std::optional<float>(blpa::parse_number<float>("--lifts", l));
          // "default" and the default's value are one mode: measured once (it gave rows alike).
          if (std::none_of(modes.begin(), modes.end(), [&](const ModeConfig& o) { return o.str() == mc.str(); }))
            modes.push_back(mc);
        }
  std::vector<std::function<FidelityCase()>> cases;
  if (args.count("checkpoint") && args.count("depths"))  // the depths were ignored
    throw std::invalid_argument("--depths sets the drawn networks, --checkpoint measures its own: give one of them");
  if (args.count("checkpoint") && args.count("size"))  // so was the size (its images are its data set's)
    throw std::invalid_argument("--size sets the drawn networks' images, --checkpoint measures its data set's: give "
                                "one of them");
  if (args.count("data-dir") && !args.count("checkpoint"))  // drawn networks run on random images
    throw std::invalid_argument("--data-dir is where --checkpoint's data set is; drawn networks need none");
  if (args.count("checkpoint")) {
    const std::string data_dir = args.count("data-dir") ? args["data-dir"].as<std::string>() : "";
    for (const auto& path : blpa::comma_list("--checkpoint", args["checkpoint"].as<std::string>())) {
      blpa::require_file("--checkpoint", path);
      cases.push_back([=] { return checkpoint_case(path, data_dir, batch, seed); });
    }
  } else {
    for (const auto& d : blpa::comma_list("--depths", args["depths"].as<std::string>()))
      cases.push_back(
          [=, depth = blpa::parse_number<int>("--depths", d)] { return drawn_case(depth, batch, size, seed); });
  }
  for (auto& make : cases) {
    FidelityCase c = make();
    // --precision auto: a checkpoint in the precision it was trained in, as blpa-eval scores it.
    c.numerics = c.trained_precision.empty()
                     ? numerics
                     : blpa::numerics_for(blpa::eval_precision(args["precision"].as<std::string>(),
                                                               c.trained_precision, torch::kCPU),
                                          args["memory-format"].as<std::string>(), torch::kCPU);
    double loss = 0;
    const auto ref = c.grads({Mode::plain, 8}, &loss);
    const auto ref_all = torch::cat(ref);
    const double ref_norm = ref_all.norm().item<double>();
    // Plain's gradient is the reference: without it no mode can be measured (blpa-eval exits 3
    // on such a network too).
    if (!std::isfinite(loss) || !std::isfinite(ref_norm))
      throw blpa::NonFiniteLoss(fmt::format(
          "{}: plain's {} is not finite (the network's outputs overflow, as with the weights of a run about to "
          "diverge): there is no reference gradient to measure the modes against",
          c.source == "drawn" ? fmt::format("drawn depth {}", c.net.depth) : c.checkpoint,
          std::isfinite(loss) ? "gradient" : "loss"));
    std::vector<std::string> names;
    for (const auto& p : c.params->named_parameters()) names.push_back(p.key());
    for (const ModeConfig& m : modes) {
      const auto g = c.grads(m);
      // A mode whose gradient overflows (a window so wide that its codes lose every value) is
      // measured as such: its figures are non-finite (null in JSON), the first such parameter named.
      double min_cos = std::numeric_limits<double>::infinity();
      std::string worst;
      for (size_t i = 0; i < g.size() && !std::isnan(min_cos); ++i) {
        // Two zero gradients (a parameter that no path reaches) agree: cosine 1, not 0/0 read as 0.
        const double gn = g[i].norm().item<double>(), rn = ref[i].norm().item<double>();
        const double cos = gn == 0 && rn == 0 ? 1.0 : g[i].dot(ref[i]).item<double>() / (gn * rn + 1e-30);
        if (std::isnan(cos) || cos < min_cos) min_cos = cos, worst = names[i];
      }
      const double rel = (torch::cat(g) - ref_all).to(torch::kDouble).norm().item<double>() / ref_norm;
      // Fixed decimals, or significant digits for a huge error; null (non-finite) for none.
      auto figure = [](double v, const char* none, const char* fixed, const char* general) {
        if (!std::isfinite(v)) return std::string(none);
        return std::abs(v) < 1e4 ? fmt::format(fmt::runtime(fixed), v) : fmt::format(fmt::runtime(general), v);
      };
      auto json_number = [&](double v) { return figure(v, "null", "{:.5f}", "{:.6g}"); };
      auto number = [&](double v) { return figure(v, "non-finite", "{:.4f}", "{:.4g}"); };
      if (blpa::switched_on(args, "json"))
        fmt::print("{{\"bench\": \"fidelity\", \"source\": \"{}\", \"checkpoint\": {}, \"iteration\": {}, "
                   "\"depth\": {}, \"batch\": {}, \"size\": {}, \"mode\": \"{}\", \"bits\": {}, {}, "
                   "\"relative_error\": {}, \"min_cosine\": {}, \"min_cosine_param\": \"{}\", "
                   "\"plain_loss\": {:.6g}, \"plain_grad_norm\": {:.6g}, \"precision\": \"{}\", \"memory_format\": \"{}\"}}\n",
                   c.source, blpa::json_string(c.checkpoint), c.iteration, c.net.depth, batch, c.x.size(2),
                   blpa::to_string(m.mode), m.bits,
                   report_format(m), json_number(rel), json_number(min_cos), worst, loss, ref_norm,
                   blpa::to_string(c.numerics.precision), blpa::layout_name(c.numerics.layout));
      else
        fmt::print("{} depth {:4d}  {} {:12s} relative gradient error {}  smallest cosine {} ({})  "
                   "[plain loss {:.4g}, |grad| {:.4g}]\n",
                   c.source == "drawn" ? std::string("drawn") : fmt::format("{} (it {})", c.checkpoint, c.iteration),
                   c.net.depth, c.numerics.str(), m.str(), number(rel), number(min_cos), worst, loss, ref_norm);
    }
  }
  return 0;
}
