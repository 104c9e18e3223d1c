// blpa-bench subcommands that measure whole networks: memory, step, max-batch, fidelity.
#include <blpa/memory.h>
#include <blpa/resnet.h>
#include <blpa/step.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/profiler_kineto.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cxxopts.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>

#include "bench.h"

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
    c.depth = std::stoi(s.substr(colon + 1));
  } else {
    throw std::invalid_argument("--model must be resnet164, resnet152, resnet1001, cifar:DEPTH or imagenet:DEPTH, got '" +
                                s + "'");
  }
  if (c.arch == "imagenet") c.num_classes = 1000;
  return c;
}

// "all", or a comma list of modes, each optionally with bits: "plain,blpa-8,naive".
// A bare blpa/naive takes --bits.
std::vector<ModeConfig> parse_modes(const std::string& spec, int bits) {
  if (spec == "all") return {{Mode::plain, 8}, {Mode::exact, 8}, {Mode::blpa, 8}, {Mode::blpa, 4}, {Mode::naive, 4}};
  std::vector<ModeConfig> out;
  std::stringstream ss(spec);
  for (std::string tok; std::getline(ss, tok, ',');) {
    const auto dash = tok.find('-');
    ModeConfig m{blpa::parse_mode(tok.substr(0, dash)), bits};
    if (dash != std::string::npos) m.bits = std::stoi(tok.substr(dash + 1));
    if (m.bits != 8 && m.bits != 4) throw std::invalid_argument("bits must be 8 or 4 in --mode " + spec);
    out.push_back(m);
  }
  return out;
}

int report_bits(const ModeConfig& m) { return m.mode == Mode::blpa || m.mode == Mode::naive ? m.bits : 32; }

struct Common {
  std::string model_name;
  blpa::NetConfig net;
  int64_t batch = 0, size = 0;
  std::vector<ModeConfig> modes;
  torch::Device device{torch::kCPU};
  bool json = false;
};

void add_common(cxxopts::Options& o, const std::string& batch, const std::string& mode) {
  o.add_options()("model", "resnet164, resnet152, resnet1001, cifar:DEPTH or imagenet:DEPTH",
                  cxxopts::value<std::string>()->default_value("resnet164"))(
      "batch", "Batch size", cxxopts::value<int64_t>()->default_value(batch))(
      "mode", "all, or a comma list of plain, exact, blpa[-K], naive[-K]", cxxopts::value<std::string>()->default_value(mode))(
      "bits", "Bits for a bare blpa/naive in --mode: 8 or 4", cxxopts::value<int>()->default_value("4"))(
      "size", "Input height/width (0: 32 for cifar, 224 for imagenet)", cxxopts::value<int64_t>()->default_value("0"))(
      "device", "cpu or cuda", cxxopts::value<std::string>()->default_value("cpu"))(
      "threads", "LibTorch CPU threads (0: its default)", cxxopts::value<int>()->default_value("0"))(
      "json", "One JSON object per line and mode")("h,help", "This help");
}

// Parses; returns false after printing help.
bool parse_common(cxxopts::Options& o, int argc, char** argv, Common& c, cxxopts::ParseResult& args) {
  args = o.parse(argc, argv);
  if (args.count("help")) {
    std::cout << o.help() << std::endl;
    return false;
  }
  blpa::memory::install_cpu_counter();
  c.model_name = args["model"].as<std::string>();
  c.net = parse_model(c.model_name);
  c.batch = args["batch"].as<int64_t>();
  if (c.batch <= 0) throw std::invalid_argument("--batch must be positive");
  c.size = args["size"].as<int64_t>();
  if (c.size == 0) c.size = c.net.arch == "cifar" ? 32 : 224;
  c.modes = parse_modes(args["mode"].as<std::string>(), args["bits"].as<int>());
  c.device = torch::Device(args["device"].as<std::string>());
  if (c.device.is_cuda() && !torch::cuda::is_available()) throw std::runtime_error("--device cuda: no CUDA device");
  if (args["threads"].as<int>() > 0) torch::set_num_threads(args["threads"].as<int>());
  c.json = args.count("json") > 0;
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
  Rig(blpa::NetConfig net, const ModeConfig& mode, int64_t batch, int64_t size, const torch::Device& dev)
      : model(([&] {
          net.mode = mode;
          torch::manual_seed(0);
          blpa::ResNet m(net);
          m->to(dev);
          m->train();
          return m;
        })()),
        opt(model->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9)) {
    x = torch::randn({batch, net.in_channels, size, size}, torch::TensorOptions(dev));
    labels = torch::randint(0, net.num_classes, {batch}, torch::TensorOptions(dev).dtype(torch::kLong));
  }
  // Returns the bytes autograd holds after the forward pass.
  int64_t step() {
    opt.zero_grad();
    const auto dev = x.device();
    const int64_t before = blpa::memory::allocated(dev);
    auto out = model->forward(x);
    const int64_t stored = blpa::memory::allocated(dev) - before - static_cast<int64_t>(out.nbytes());
    torch::nn::functional::cross_entropy(out, labels).backward();
    opt.step();
    model->constrain_();
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

std::string head(const Common& c, const ModeConfig& m, const std::string& bench) {
  return fmt::format("{{\"bench\": \"{}\", \"model\": \"{}\", \"arch\": \"{}\", \"depth\": {}, \"batch\": {}, \"size\": {}, "
                     "\"mode\": \"{}\", \"bits\": {}, \"device\": \"{}\"",
                     bench, c.model_name, c.net.arch, c.net.depth, c.batch, c.size, blpa::to_string(m.mode),
                     report_bits(m), c.device.str());
}

}  // namespace

int memory_main(int argc, char** argv) {
  cxxopts::Options o("blpa-bench memory",
                     "Memory of one training step (forward, backward, SGD-momentum update), measured by the\n"
                     "allocator: the counting CPU allocator, or CUDA's caching allocator statistics. plain and\n"
                     "exact are added to the modes, so every run has its reference.");
  add_common(o, "128", "blpa");
  o.add_options()("table", "Also print the per-unit table of stored bytes (human output only)");
  Common c;
  cxxopts::ParseResult args;
  if (!parse_common(o, argc, argv, c, args)) return 0;
  // plain first (every ratio needs it), then exact, then the rest in the order given.
  std::vector<ModeConfig> modes{{Mode::plain, 8}, {Mode::exact, 8}};
  for (const auto& m : c.modes)
    if (m.mode != Mode::plain && m.mode != Mode::exact) modes.push_back(m);
  c.modes = modes;
  std::map<std::string, std::pair<int64_t, int64_t>> results;  // stored, peak
  for (const auto& mode : c.modes) {
    Rig rig(c.net, mode, c.batch, c.size, c.device);
    // One warm-up step creates the momentum buffers: the measured step sees training's steady state.
    rig.step();
    rig.opt.zero_grad();  // gradients are released, so the peak includes the ones the step allocates
    sync(c.device);
    const int64_t resident = blpa::memory::allocated(c.device);
    blpa::memory::reset_peak(c.device);
    const int64_t stored = rig.step();
    sync(c.device);
    const int64_t peak = blpa::memory::peak(c.device) - resident;
    results[mode.str()] = {stored, peak};
    const int64_t params = rig.param_bytes(), units = rig.model->stored_unit_bytes();
    if (c.json) {
      const auto& p = results.at("plain");
      fmt::print("{}, \"stored_activation_bytes\": {}, \"unit_accounted_bytes\": {}, \"peak_bytes\": {}, "
                 "\"resident_bytes\": {}, \"param_bytes\": {}, \"grad_bytes\": {}, \"optimizer_bytes\": {}, "
                 "\"stored_ratio_plain\": {:.3f}, \"peak_ratio_plain\": {:.3f}}}\n",
                 head(c, mode, "memory"), stored, units, peak, resident, params, params, params,
                 double(p.first) / stored, double(p.second) / peak);
    } else {
      fmt::print("{:8s} stored by autograd {:10.2f} MiB ({:.3f} MiB/sample; units account for {:.2f} MiB), "
                 "step peak above resident {:10.2f} MiB, resident (params, momentum, data) {:.2f} MiB\n",
                 mode.str(), stored / 1048576.0, stored / 1048576.0 / c.batch, units / 1048576.0, peak / 1048576.0,
                 resident / 1048576.0);
      if (args.count("table") && mode.mode != Mode::plain)
        for (const auto& row : rig.model->memory_table())
          fmt::print("    {:14s} {:>20s} codes {:10d} metadata {:6d} full {:10d}\n", row.name,
                     fmt::format("{}", fmt::join(row.memory.input_sizes, "x")), row.memory.code_bytes,
                     row.memory.metadata_bytes, row.memory.full_bytes);
    }
  }
  if (!c.json) {
    const auto& p = results.at("plain");
    for (const auto& [name, r] : results)
      if (name != "plain")
        fmt::print("plain / {:8s}: stored {:6.2f}x, step peak {:6.2f}x\n", name, double(p.first) / r.first,
                   double(p.second) / r.second);
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
  std::vector<std::tuple<double, int64_t, std::string>> top;  // total ms, calls, name
};

Profile profile_step(Rig& rig, size_t top_n, const std::string& trace) {
  namespace prof = torch::autograd::profiler;
  using torch::profiler::impl::ActivityType;
  const auto dev = rig.x.device();
  const torch::profiler::impl::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO);
  const std::set<ActivityType> activities =
      dev.is_cuda() ? std::set<ActivityType>{ActivityType::CPU, ActivityType::CUDA} : std::set<ActivityType>{ActivityType::CPU};
  prof::prepareProfiler(config, activities);
  prof::enableProfiler(config, activities);
  sync(dev);
  const auto t0 = Clock::now();
  rig.run();
  sync(dev);
  const double wall = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  const auto result = prof::disableProfiler();
  if (!trace.empty()) result->save(trace);  // Chrome trace format: chrome://tracing, Perfetto
  std::map<std::string, std::pair<double, int64_t>> by_name;
  Profile p;
  p.wall_ms = wall;
  for (const auto& e : result->events()) {
    if (e.deviceType() != dev.type()) continue;
    const double ms = static_cast<double>(e.durationNs()) / 1e6;
    auto& [total, calls] = by_name[e.name()];
    total += ms;
    ++calls;
    p.busy_ms += ms;
  }
  for (const auto& [name, tc] : by_name) p.top.emplace_back(tc.first, tc.second, name);
  std::sort(p.top.begin(), p.top.end(), [](const auto& a, const auto& b) { return std::get<0>(a) > std::get<0>(b); });
  if (p.top.size() > top_n) p.top.resize(top_n);
  return p;
}

std::string json_escape(const std::string& s) {
  std::string out;
  for (const char ch : s) {
    if (ch == '"' || ch == '\\') out += '\\';
    if (static_cast<unsigned char>(ch) >= 0x20) out += ch;
  }
  return out;
}

int step_main(int argc, char** argv) {
  cxxopts::Options o("blpa-bench step",
                     "Training-step time (forward, backward, SGD update) per mode in one process: median and\n"
                     "spread over --steps timed steps after --warmup, and the ratio of the median to plain's.");
  add_common(o, "128", "plain,blpa-8,blpa-4");
  o.add_options()("warmup", "Untimed steps per mode", cxxopts::value<int>()->default_value("2"))(
      "steps", "Timed steps per mode", cxxopts::value<int>()->default_value("5"))(
      "profile", "Then profile one more step per mode: the GPU's busy time and the N costliest kernels "
      "(on CPU: operators, inclusive times); 0: no profile", cxxopts::value<int>()->default_value("0"), "N")(
      "trace", "With --profile: write each mode's profiled step to PREFIX-MODE.json (Chrome trace format)",
      cxxopts::value<std::string>()->default_value(""), "PREFIX")(
      "cuda-graphs", "CUDA: time each mode also as one captured iteration replayed as a CUDA graph (as blpa-train "
      "--cuda-graphs runs it), in a row of its own after the eager one; JSON rows say \"graphed\"");
  Common c;
  cxxopts::ParseResult args;
  if (!parse_common(o, argc, argv, c, args)) return 0;
  const int warmup = args["warmup"].as<int>(), steps = args["steps"].as<int>(), top_n = args["profile"].as<int>();
  if (steps <= 0 || warmup < 0) throw std::invalid_argument("--steps must be positive and --warmup >= 0");
  if (top_n < 0) throw std::invalid_argument("--profile must be >= 0");
  const std::string trace = args["trace"].as<std::string>();
  if (!trace.empty() && top_n == 0) throw std::invalid_argument("--trace needs --profile N");
  const bool graphs = args.count("cuda-graphs") > 0;
  if (graphs && !c.device.is_cuda()) throw std::invalid_argument("--cuda-graphs needs --device cuda");
  double plain_ms[2] = {0, 0};  // eager, graphed
  for (const auto& mode : c.modes) {
    for (const bool graphed : {false, true}) {
      if (graphed && !graphs) continue;
      Rig rig(c.net, mode, c.batch, c.size, c.device);
      for (int i = 0; i < warmup; ++i) rig.step();
      std::unique_ptr<blpa::GraphedStep> replay;
      if (graphed) {
        replay = std::make_unique<blpa::GraphedStep>(rig.model, rig.opt, 1);
        replay->run(rig.x, rig.labels, 0.01);  // captures, then replays once
        rig.replay = [&] { replay->run(rig.x, rig.labels, 0.01); };
      }
      // host_ms: until step() returns, before the device has finished. On CUDA, host_ms close to
      // median_ms means the step is bound by the host's launching of kernels, not by the GPU.
      std::vector<double> ms, host_ms;
      sync(c.device);
      blpa::memory::reset_peak(c.device);
      for (int i = 0; i < steps; ++i) {
        sync(c.device);
        const auto t0 = Clock::now();
        rig.run();
        host_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
        sync(c.device);
        ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
      }
      auto median_of = [](std::vector<double>& v) {
        std::sort(v.begin(), v.end());
        return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
      };
      const double median = median_of(ms), host_median = median_of(host_ms);
      const int64_t peak = blpa::memory::peak(c.device);
      const OpCount ops = graphed ? OpCount{} : count_ops(rig);
      if (mode.mode == Mode::plain) plain_ms[graphed] = median;
      const std::string ratio = plain_ms[graphed] > 0 ? fmt::format("{:.3f}", median / plain_ms[graphed]) : "null";
      Profile p;
      if (top_n > 0) p = profile_step(rig, static_cast<size_t>(top_n), trace.empty() ? "" : trace + "-" + mode.str() + ".json");
      std::string profile_json;
      if (top_n > 0) {
        profile_json = fmt::format(", \"profile\": {{\"wall_ms\": {:.3f}, \"busy_ms\": {:.3f}, \"top\": [", p.wall_ms, p.busy_ms);
        for (size_t i = 0; i < p.top.size(); ++i)
          profile_json += fmt::format("{}{{\"ms\": {:.3f}, \"calls\": {}, \"name\": \"{}\"}}", i ? ", " : "",
                                      std::get<0>(p.top[i]), std::get<1>(p.top[i]), json_escape(std::get<2>(p.top[i])));
        profile_json += "]}";
      }
      if (c.json)
        fmt::print("{}, \"threads\": {}, \"graphed\": {}, \"steps\": {}, \"median_ms\": {:.3f}, \"min_ms\": {:.3f}, "
                   "\"max_ms\": {:.3f}, \"host_ms\": {:.3f}, \"ops\": {}, \"ops_outermost\": {}, \"images_per_s\": {:.2f}, "
                   "\"overhead_vs_plain\": {}, \"peak_bytes\": {}, \"graph_pool_bytes\": {}{}}}\n",
                   head(c, mode, "step"), c.device.is_cuda() ? 0 : torch::get_num_threads(), graphed, steps, median,
                   ms.front(), ms.back(), host_median, ops.all, ops.outer, c.batch * 1000.0 / median, ratio, peak,
                   replay ? replay->pool_bytes() : 0, profile_json);
      else {
        fmt::print("{:8s}{} median {:9.2f} ms  (min {:.2f}, max {:.2f}, host {:.2f}, {} steps, {} ops)  {:8.1f} img/s  vs plain {}\n",
                   mode.str(), graphed ? " graphed" : "", median, ms.front(), ms.back(), host_median, steps, ops.outer,
                   c.batch * 1000.0 / median,
                   plain_ms[graphed] > 0 ? ratio + "x" : std::string("(run plain first for the ratio)"));
        if (top_n > 0) {
          fmt::print("  profiled step: {:.2f} ms wall, {:.2f} ms {}\n", p.wall_ms, p.busy_ms,
                     c.device.is_cuda() ? "of GPU work" : "of operators (inclusive, overlapping)");
          for (const auto& [total, calls, name] : p.top)
            fmt::print("  {:9.3f} ms {:6d}x  {}\n", total, calls, name.size() > 110 ? name.substr(0, 107) + "..." : name);
        }
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
                     "unwound and the next one starts from a clean allocator (leaks are reported).");
  add_common(o, "1", "plain,blpa-4");  // --batch is not used: the batch is searched
  o.add_options()("budget-gib", "Memory budget in GiB, including parameters, momentum and the batch",
                  cxxopts::value<double>()->default_value("1"))(
      "max", "Largest batch to try", cxxopts::value<int64_t>()->default_value("4096"));
  Common c;
  cxxopts::ParseResult args;
  if (!parse_common(o, argc, argv, c, args)) return 0;
  const int64_t budget = static_cast<int64_t>(args["budget-gib"].as<double>() * (1ll << 30));
  const int64_t cap = args["max"].as<int64_t>();
  if (budget <= 0) throw std::invalid_argument("--budget-gib must be positive");
  std::map<std::string, int64_t> best;
  for (const auto& mode : c.modes) {
    const int64_t base = blpa::memory::allocated(c.device);
    int64_t leaked = 0, attempts = 0;
    auto fits = [&](int64_t b) {
      ++attempts;
      bool ok = true;
      blpa::memory::set_limit(c.device, base + budget);
      try {
        Rig rig(c.net, mode, b, c.size, c.device);
        rig.step();
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
    best[mode.str()] = lo;
    c.batch = lo;  // the JSON's "batch" is the batch found
    const auto plain = best.find("plain");
    const std::string ratio =
        plain != best.end() && plain->second > 0 ? fmt::format("{:.2f}", double(lo) / plain->second) : "null";
    if (c.json)
      fmt::print("{}, \"budget_bytes\": {}, \"max_batch\": {}, \"attempts\": {}, \"leaked_bytes\": {}, "
                 "\"ratio_vs_plain\": {}}}\n",
                 head(c, mode, "max-batch"), budget, lo, attempts, leaked, ratio);
    else
      fmt::print("{:8s} largest batch within {:.2f} GiB: {:5d}  ({} attempts, {} bytes leaked)  vs plain {}\n",
                 mode.str(), budget / double(1ll << 30), lo, attempts, leaked, ratio == "null" ? "-" : ratio + "x");
  }
  return 0;
}

int fidelity_main(int argc, char** argv) {
  cxxopts::Options o("blpa-bench fidelity",
                     "Gradient fidelity against plain, by depth: for a CIFAR network with BatchNorm affine\n"
                     "parameters drawn as training leaves them (gamma ~ U(0.5, 1.5), beta ~ N(0, 0.5); at\n"
                     "initialisation blpa and naive coincide), the relative error of the whole gradient and\n"
                     "the smallest per-parameter cosine similarity, for blpa and naive at each K.");
  o.add_options()("depths", "CIFAR depths (9n+2)", cxxopts::value<std::string>()->default_value("20,56,110,164"))(
      "batch", "Batch size", cxxopts::value<int64_t>()->default_value("16"))(
      "size", "Input height/width", cxxopts::value<int64_t>()->default_value("32"))(
      "seed", "Seed of data and parameters", cxxopts::value<uint64_t>()->default_value("0"))(
      "json", "One JSON object per line")("h,help", "This help");
  auto args = o.parse(argc, argv);
  if (args.count("help")) {
    std::cout << o.help() << std::endl;
    return 0;
  }
  const int64_t batch = args["batch"].as<int64_t>(), size = args["size"].as<int64_t>();
  const uint64_t seed = args["seed"].as<uint64_t>();
  std::vector<int> depths;
  std::stringstream ss(args["depths"].as<std::string>());
  for (std::string t; std::getline(ss, t, ',');) depths.push_back(std::stoi(t));
  for (int depth : depths) {
    blpa::NetConfig net;
    net.depth = depth;
    torch::manual_seed(seed);
    auto x = torch::randn({batch, 3, size, size});
    auto labels = torch::randint(0, 10, {batch});
    net.mode = {Mode::plain, 8};
    blpa::ResNet init(net);
    {
      torch::NoGradGuard g;
      for (auto& [name, u] : init->units()) {
        u->gamma.uniform_(0.5, 1.5);
        u->beta.normal_(0, 0.5);
      }
    }
    auto grads = [&](const ModeConfig& m) {
      net.mode = m;
      blpa::ResNet model(net);
      {
        torch::NoGradGuard g;
        auto src = init->parameters(), dst = model->parameters();
        for (size_t i = 0; i < src.size(); ++i) dst[i].copy_(src[i]);
      }
      torch::nn::functional::cross_entropy(model->forward(x), labels).backward();
      std::vector<torch::Tensor> g;
      for (const auto& p : model->parameters()) g.push_back(p.grad().flatten());
      return g;
    };
    const auto ref = grads({Mode::plain, 8});
    const auto ref_all = torch::cat(ref);
    for (const ModeConfig m : {ModeConfig{Mode::blpa, 8}, ModeConfig{Mode::naive, 8}, ModeConfig{Mode::blpa, 4},
                               ModeConfig{Mode::naive, 4}}) {
      const auto g = grads(m);
      double min_cos = 1;
      for (size_t i = 0; i < g.size(); ++i)
        min_cos = std::min(min_cos, (g[i].dot(ref[i]) / (g[i].norm() * ref[i].norm() + 1e-30)).item<double>());
      const double rel = ((torch::cat(g) - ref_all).norm() / ref_all.norm()).item<double>();
      if (args.count("json"))
        fmt::print("{{\"bench\": \"fidelity\", \"depth\": {}, \"batch\": {}, \"size\": {}, \"mode\": \"{}\", \"bits\": {}, "
                   "\"relative_error\": {:.5f}, \"min_cosine\": {:.5f}}}\n",
                   depth, batch, size, blpa::to_string(m.mode), m.bits, rel, min_cos);
      else
        fmt::print("depth {:4d}  {:8s} relative gradient error {:.4f}  smallest cosine {:.4f}\n", depth, m.str(), rel,
                   min_cos);
    }
  }
  return 0;
}
