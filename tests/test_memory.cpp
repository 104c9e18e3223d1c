// Where a step's memory peaks: the scopes and the recorder of blpa/memory.h, and the memory
// bench that reports them.
#include <blpa/loader.h>
#include <blpa/memory.h>

#include <fstream>
#include <map>
#include <regex>

#include "test_support.h"

using blpa::memory::PeakRecorder;
using blpa::memory::Scope;

namespace {

std::string scope_names(const PeakRecorder& r) {
  std::string s;
  for (const auto& p : r.scopes()) s += p.name + ";";
  return s;
}

}  // namespace

TEST_CASE("memory: a PeakRecorder charges the peak to the innermost scope open at it", "[memory]") {
  blpa::memory::install_cpu_counter();
  const torch::Device cpu(torch::kCPU);
  const int64_t kib = 1024;
  const int64_t base = blpa::memory::allocated(cpu);
  PeakRecorder rec(cpu);
  {
    const Scope a("a", "forward");
    auto t = torch::empty({kib});  // 4 KiB
    {
      const Scope b("b", "backward");
      auto u = torch::empty({2 * kib});  // 8 KiB, freed on leaving
    }
    auto v = torch::empty({kib});  // 4 KiB: a's own allocations stay below b's peak
  }
  CHECK(scope_names(rec) == "b backward;a forward;");
  CHECK(rec.scopes()[0].peak == base + 12 * kib);
  CHECK(rec.scopes()[1].peak == base + 12 * kib);
  CHECK(rec.scopes()[0].depth == 1);
  CHECK(rec.scopes()[1].depth == 0);
  CHECK(rec.peak() == base + 12 * kib);
  CHECK(rec.peak_scope() == "b backward");
  {
    const Scope c("c", "forward");
    auto w = torch::empty({4 * kib});
  }
  CHECK(rec.peak() == base + 16 * kib);
  CHECK(rec.peak_scope() == "c forward");
  {
    auto outside = torch::empty({8 * kib});
  }
  CHECK(rec.peak() == base + 32 * kib);
  CHECK(rec.peak_scope().empty());
}

TEST_CASE("memory: the CPU counter leaves out the batches the loader's workers make", "[memory]") {
  blpa::memory::install_cpu_counter();
  const c10::Device cpu(c10::kCPU);
  const int64_t before = blpa::memory::allocated(cpu);
  constexpr int64_t kFloats = 1 << 20;  // 4 MiB a batch, 4 of them ready ahead
  {
    blpa::data::BatchStream stream([](int64_t) { return blpa::data::Batch{torch::ones({kFloats}), torch::zeros({1})}; },
                                   0, 2, 4);
    const auto batch = stream.next();
    CHECK(batch.images.numel() == kFloats);
    // Counted, the batch in hand and those made ahead gave 4 MiB or more, as the workers ran.
    CHECK(blpa::memory::allocated(cpu) - before < 4 * kFloats);
    const auto copy = batch.images.clone();  // this thread's own: counted
    CHECK(blpa::memory::allocated(cpu) - before >= 4 * kFloats);
  }
  CHECK(blpa::memory::allocated(cpu) == before);  // what it freed was taken away once, never twice
}

TEST_CASE("memory: without a recorder a scope records nothing and leaves the peak alone", "[memory]") {
  blpa::memory::install_cpu_counter();
  const torch::Device cpu(torch::kCPU);
  blpa::memory::reset_peak(cpu);
  const int64_t base = blpa::memory::allocated(cpu);
  {
    auto t = torch::empty({1024});
  }
  {
    const Scope s("unit", "forward");
    auto u = torch::empty({16});
  }
  CHECK(blpa::memory::peak(cpu) == base + 4096);
  PeakRecorder rec(cpu);
  CHECK(rec.scopes().empty());
  CHECK_THROWS_WITH(PeakRecorder(cpu), Catch::Contains("one PeakRecorder"));
}

// In NHWC the convolutions' weights were cast to the layout at each forward: a copy of every
// one, kept by autograd and counted as stored (ResNet-50 at batch 2: blpa-4 "stored" 90 MiB in
// NHWC, 0.5 MiB in NCHW). The weights are now kept in the run's layout.
TEST_CASE("bench: what autograd keeps does not depend on the layout", "[bench][memory]") {
  const auto out = std::filesystem::temp_directory_path() / ("blpa-bench-layout-" + std::to_string(::getpid()));
  auto stored = [&](const char* layout) {
    const std::string cmd = std::string(BLPA_BENCH_EXE) +
                            " memory --model imagenet:50 --batch 2 --slope-batch 0 --size 32 --mode blpa-4 "
                            "--threads 1 --json --memory-format " + layout + " > " + out.string() + " 2>/dev/null";
    REQUIRE(std::system(cmd.c_str()) == 0);
    std::ifstream f(out);
    std::map<std::string, double> bytes;
    std::smatch m;
    const std::regex row("\"mode\": \"([a-z]+)\".*\"stored_activation_bytes\": ([0-9]+)");
    for (std::string line; std::getline(f, line);)
      if (std::regex_search(line, m, row)) bytes[m[1]] = std::stod(m[2]);
    return bytes;
  };
  const auto nchw = stored("nchw"), nhwc = stored("nhwc");
  CAPTURE(nchw.at("blpa"), nhwc.at("blpa"), nchw.at("exact"), nhwc.at("exact"), nchw.at("plain"), nhwc.at("plain"));
  CHECK(nhwc.at("blpa") < 1.2 * nchw.at("blpa"));  // 0.50 against 0.48 MiB; it was 90 MiB
  CHECK(nhwc.at("exact") < 1.2 * nchw.at("exact"));
  // Plain too: the last stage's 1x1 maps fit both layouts, and its weights were copied to
  // NCHW and kept (37.2 MiB against 3.2).
  CHECK(nhwc.at("plain") < 1.2 * nchw.at("plain"));
  std::filesystem::remove(out);
}

TEST_CASE("bench: memory reports the per-sample slopes and where the peak is", "[bench][memory]") {
  const auto out = std::filesystem::temp_directory_path() / ("blpa-bench-memory-" + std::to_string(::getpid()));
  const std::string cmd = std::string(BLPA_BENCH_EXE) +
                          " memory --model cifar:11 --batch 8 --slope-batch 4 --size 8 --mode blpa-4 --threads 1 --json > " +
                          out.string() + " 2>/dev/null";
  REQUIRE(std::system(cmd.c_str()) == 0);
  std::ifstream f(out);
  std::string line;
  std::vector<std::string> modes;
  const std::regex row("\"mode\": \"([a-z]+)\".*\"stored_activation_bytes\": ([0-9]+).*\"peak_at\": \"([^\"]*)\", "
                       "\"slope_batch\": 4, \"stored_per_sample_bytes\": ([0-9]+), \"peak_per_sample_bytes\": "
                       "([0-9]+), .*\"peak_per_sample_at\": \"([^\"]+)\"");
  while (std::getline(f, line)) {
    CAPTURE(line);
    std::smatch m;
    REQUIRE(std::regex_search(line, m, row));
    modes.push_back(m[1]);
    const double stored = std::stod(m[2]), stored_slope = std::stod(m[4]), peak_slope = std::stod(m[5]);
    CHECK(stored_slope > 0);
    CHECK(stored_slope * 8 < stored);  // per-channel tensors (BatchNorm's statistics) do not grow with the batch
    CHECK(peak_slope > 0);
    if (m[1] != "plain") CHECK(!std::string(m[3]).empty());  // a unit's or a node's scope
    // Said, where the slopes are no growth rates (the peak moved between the two batches).
    CHECK(line.find(peak_slope < stored_slope ? "\"peak_per_sample_moved\": true"
                                              : "\"peak_per_sample_moved\": ") != std::string::npos);
    CHECK(line.find("\"stored_per_sample_ratio_plain\": ") != std::string::npos);
  }
  CHECK(modes == std::vector<std::string>{"plain", "exact", "blpa"});
  // Without a second batch the per-sample keys are there, as null: every row has the same keys.
  // In bf16, plain keeps its activations in 16 bits.
  const std::string single = std::string(BLPA_BENCH_EXE) +
                             " memory --model cifar:11 --batch 4 --slope-batch 0 --size 8 --mode plain "
                             "--precision bf16 --threads 1 --json > " +
                             out.string() + " 2>/dev/null";
  REQUIRE(std::system(single.c_str()) == 0);
  std::ifstream g(out);
  int rows = 0;
  while (std::getline(g, line)) {
    CAPTURE(line);
    ++rows;
    CHECK(line.find("\"slope_batch\": null, \"stored_per_sample_bytes\": null") != std::string::npos);
    CHECK(line.find("\"peak_per_sample_ratio_plain_fp32\": null") != std::string::npos);
    CHECK(line.find("\"peak_per_sample_moved\": null") != std::string::npos);
    const bool plain_bf16 = line.find("\"precision\": \"bf16\"") != std::string::npos &&
                            line.find("\"mode\": \"plain\"") != std::string::npos;
    if (plain_bf16) CHECK(line.find("\"bits\": 16,") != std::string::npos);
    // Every row of a bf16 run has its ratios to plain in float32, plain's own too (plain-fp32
    // runs first; its ratio was null). At this tiny batch the weights' bf16 copies, which
    // autograd keeps as autocast's are kept, weigh as much as the activations: no value is
    // asserted here (the per-sample slopes are the figures that compare).
    std::smatch ratio;
    CHECK(std::regex_search(line, ratio, std::regex("\"stored_ratio_plain_fp32\": ([0-9.]+),")));
  }
  CHECK(rows == 3);  // plain, plain in float32, exact
  std::filesystem::remove(out);
}

// The search itself: a real attempt per batch tried, nothing left behind, blpa-4 fitting more
// than plain, and a --max that fits said ("capped") instead of reported as the largest batch.
TEST_CASE("bench: max-batch finds the largest batch per mode and says when --max capped it", "[bench][memory]") {
  const auto out = std::filesystem::temp_directory_path() / ("blpa-bench-max-batch-" + std::to_string(::getpid()));
  auto search = [&](const std::string& max) {
    const std::string cmd = std::string(BLPA_BENCH_EXE) + " max-batch --model cifar:11 --size 16 --mode plain,blpa-4 " +
                            "--budget-gib 0.03 --threads 1 --json --max " + max + " > " + out.string() + " 2>/dev/null";
    REQUIRE(std::system(cmd.c_str()) == 0);
    std::ifstream f(out);
    std::vector<std::string> lines;
    for (std::string line; std::getline(f, line);) lines.push_back(line);
    REQUIRE(lines.size() == 2);
    return lines;
  };
  auto field = [](const std::string& line, const std::string& key) {
    const auto at = line.find("\"" + key + "\": ");
    REQUIRE(at != std::string::npos);
    return line.substr(at + key.size() + 4, line.find_first_of(",}", at) - at - key.size() - 4);
  };
  const auto free = search("100000");
  CAPTURE(free[0], free[1]);
  for (const auto& line : free) {
    CHECK(field(line, "capped") == "false");
    CHECK(field(line, "leaked_bytes") == "0");
  }
  CHECK(std::stoi(field(free[0], "max_batch")) > 0);
  CHECK(std::stod(field(free[1], "ratio_vs_plain")) > 1.5);  // 30 MiB: parameters and buffers take part of it
  // Within the budget as blpa-bench memory measures a step of training's steady state (the
  // momentum buffers there): the attempts' one step had left the momentum out, and found
  // batches over the budget.
  for (const auto& line : free) {
    const std::string mode = field(line, "mode") == "\"plain\"" ? "plain" : "blpa-4";
    const std::string cmd = std::string(BLPA_BENCH_EXE) + " memory --model cifar:11 --size 16 --mode " + mode +
                            " --batch " + field(line, "max_batch") + " --slope-batch 0 --threads 1 --json > " +
                            out.string() + " 2>/dev/null";
    REQUIRE(std::system(cmd.c_str()) == 0);
    std::ifstream f(out);
    int measured = 0;
    for (std::string row; std::getline(f, row);)
      if (field(row, "mode") == field(line, "mode")) {
        ++measured;
        CHECK(std::stoll(field(row, "peak_bytes")) + std::stoll(field(row, "resident_bytes")) <=
              std::stoll(field(line, "budget_bytes")));
      }
    CHECK(measured == 1);
  }
  const auto capped = search("8");
  for (const auto& line : capped) {
    CHECK(field(line, "capped") == "true");
    CHECK(field(line, "max_batch") == "8");
  }
  std::filesystem::remove(out);
}
