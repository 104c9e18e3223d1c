// The codec's CUDA kernels built for the emulator (emulated_kernels.h), and the emulator's own
// tests: what it must do as a GPU does for those kernels to be tested by it.
#include "emulated_kernels.h"

#define CATCH_CONFIG_EXTERNAL_INTERFACES  // the listener below
#include <catch2/catch.hpp>
#include <iostream>
#include <random>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <sys/wait.h>
#include <unistd.h>

#include "cuda_emulator.h"
// After the emulator: the kernels' source, compiled into blpa::emulated.
#include "codec_kernels.cuh"

namespace blpa::testing {

const KernelTable& emulated_kernels() {
  static constexpr KernelTable table{emulated::compute_offsets, emulated::channel_coding, emulated::pack_workspace,
                                     emulated::pack,            emulated::unpack,          emulated::bn_workspace,
                                     emulated::bn_relu_backward};
  return table;
}

void set_emulated_multiprocessors(int count) { emulated::sm_count = count; }

bool EmulatedKernels::installed_by_environment() {
  static const bool on = [] {
    const char* v = std::getenv("BLPA_TEST_KERNELS");
    return v != nullptr && std::string(v) == "emulated";
  }();
  return on;
}

namespace {

// Before main: BLPA_TEST_KERNELS=emulated sends every codec call on CPU tensors through the
// CUDA kernels.
const bool installed = [] {
  if (!EmulatedKernels::installed_by_environment()) return false;
  set_cpu_kernels(&emulated_kernels());
  std::fprintf(stderr, "blpa_tests: BLPA_TEST_KERNELS=emulated: the codec's CPU tensors run its CUDA kernels, "
                       "emulated\n");
  return true;
}();

// In a run with the emulated kernels installed, a test that launched none checked nothing of
// them: it is reported as skipped (CTest's skip marker), not as passed. A failed test stays
// failed.
struct LaunchedNothing : Catch::TestEventListenerBase {
  using TestEventListenerBase::TestEventListenerBase;
  int64_t launches = 0;
  void testCaseStarting(const Catch::TestCaseInfo& info) override {
    TestEventListenerBase::testCaseStarting(info);
    launches = emulated::counters().launches;
  }
  void testCaseEnded(const Catch::TestCaseStats& stats) override {
    if (EmulatedKernels::installed_by_environment() && stats.totals.assertions.failed == 0 &&
        emulated::counters().launches == launches)
      std::cout << "BLPA_SKIP: this test launched no emulated kernel" << std::endl;
    TestEventListenerBase::testCaseEnded(stats);
  }
};
CATCH_REGISTER_LISTENER(LaunchedNothing)

}  // namespace
}  // namespace blpa::testing

// Small kernels that use each built-in the codec's kernels use, in the emulator's namespace
// as the codec's kernels are.
namespace blpa::emulated {
namespace {

// Each thread writes its index to shared memory; after the barrier it reads its neighbour's.
__global__ void rotate_kernel(unsigned* out) {
  __shared__ unsigned s[256];
  s[threadIdx.x] = blockIdx.x * 1000 + threadIdx.x;
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// The codec's warp sum: lane 0 of each warp ends with the sum of the warp's values.
__global__ void warp_sum_kernel(double* out) {
  double v = threadIdx.x;
  for (int d = 16; d > 0; d /= 2) v += __shfl_down_sync(0xFFFFFFFFu, v, d);
  if (threadIdx.x % 32 == 0) out[threadIdx.x / 32] = v;
}

// Half of each warp at a shuffle, half at __syncthreads: neither can finish.
__global__ void deadlock_kernel(double* out) {
  if (threadIdx.x % 32 < 16) {
    out[threadIdx.x] = __shfl_down_sync(0xFFFFFFFFu, 1.0, 1);
  } else {
    __syncthreads();
  }
}

// Exited lanes named in a shuffle's mask: one that exits before the others reach the shuffle,
// and the last lane, which exits while the others wait in it.
__global__ void exited_lane_kernel(double* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_down_sync(0xFFFFFFFFu, 1.0, 1);
}

__global__ void last_lane_exits_kernel(double* out) {
  if (threadIdx.x == 31) return;
  out[threadIdx.x] = __shfl_down_sync(0xFFFFFFFFu, 1.0, 1);
}

__global__ void misaligned_kernel(const unsigned char* p, uint32_t* out) { *out = target::load<uint32_t>(p + 1); }

#if !defined(__SANITIZE_ADDRESS__)  // its test is not run under AddressSanitizer (below)
// Recurses in frames of about 1 KiB until they reach `bytes` below `top`; returns their number.
__attribute__((noinline)) int use_stack(const char* top, size_t bytes) {
  volatile char frame[1024];
  frame[0] = 1;
  const auto used = top - const_cast<const char*>(&frame[0]);
  const int below = used < static_cast<ptrdiff_t>(bytes) ? use_stack(top, bytes) : 0;
  return frame[0] + below;  // read after the call: not a tail call
}

__global__ void stack_kernel(size_t bytes, int* out) {
  volatile char first = 0;
  *out = use_stack(const_cast<const char*>(&first), bytes);
}
#endif

}  // namespace
}  // namespace blpa::emulated

TEST_CASE("emulator: barriers, shuffles, alignment and deadlocks behave as on a GPU", "[emulator]") {
  using namespace blpa::emulated;
  const Counters before = counters();

  std::vector<unsigned> out(3 * 256);
  BLPA_LAUNCH(3, 256, 0, rotate_kernel)(out.data());
  for (unsigned b = 0; b < 3; ++b)
    for (unsigned t = 0; t < 256; ++t) REQUIRE(out[b * 256 + t] == b * 1000 + (t + 1) % 256);

  std::vector<double> sums(8);
  BLPA_LAUNCH(1, 256, 0, warp_sum_kernel)(sums.data());
  for (unsigned w = 0; w < 8; ++w) CHECK(sums[w] == 32.0 * (32 * w) + 31 * 32 / 2);

  const Counters after = counters();
  CHECK(after.launches - before.launches == 2);
  CHECK(after.threads - before.threads == 4 * 256);

  std::vector<double> scratch(256);
  CHECK_THROWS_WITH(BLPA_LAUNCH(1, 64, 0, deadlock_kernel)(scratch.data()), Catch::Contains("deadlocked"));
  CHECK_THROWS_WITH(BLPA_LAUNCH(1, 32, 0, exited_lane_kernel)(scratch.data()), Catch::Contains("live lanes"));
  CHECK_THROWS_WITH(BLPA_LAUNCH(1, 32, 0, last_lane_exits_kernel)(scratch.data()), Catch::Contains("live lanes"));
  alignas(8) unsigned char bytes[8] = {};
  uint32_t word = 0;
  CHECK_THROWS_WITH(BLPA_LAUNCH(1, 1, 0, misaligned_kernel)(bytes, &word), Catch::Contains("misaligned load"));
  CHECK_THROWS_WITH(BLPA_LAUNCH(dim3(1, 70000), 32, 0, rotate_kernel)(out.data()),
                    Catch::Contains("invalid launch configuration"));
  // After a failed launch the emulator runs the next one.
  BLPA_LAUNCH(3, 256, 0, rotate_kernel)(out.data());
  CHECK(out[5] == 6);
}

TEST_CASE("emulator: a thread that overflows its stack stops there, not in another's", "[emulator]") {
  using namespace blpa::emulated;
#if defined(__SANITIZE_ADDRESS__)
  // AddressSanitizer pads each frame and may keep frames off the stack (its fake stack).
  WARN("not checked under AddressSanitizer, whose frames differ in size and may live off the stack");
#else
  // A fiber's stack is 128 KiB: 96 KiB of frames run.
  int frames = 0;
  BLPA_LAUNCH(1, 2, 0, stack_kernel)(size_t{96} << 10, &frames);
  CHECK(frames >= 90);
  // 129 KiB runs 1-2 KiB past the bottom of the stack, into the page below it, which kills
  // the process (here a child's) with SIGSEGV. Were that page readable, the frames would
  // write over it (the heap below a stack: another fiber's, a tensor) and the launch return.
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    std::signal(SIGSEGV, SIG_DFL);  // not Catch's handler, which reports a failure
    int deep = 0;
    BLPA_LAUNCH(1, 2, 0, stack_kernel)(size_t{129} << 10, &deep);
    ::_exit(deep > 0 ? 0 : 1);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  CAPTURE(status);
  CHECK(WIFSIGNALED(status));
  CHECK((WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV));
#endif
}

TEST_CASE("emulator: the kernels' multiply-high division equals division below 2^31", "[emulator]") {
  // kernel_common.cuh's Divider, on which every channel of pack and unpack rests below 2^31
  // elements: every divisor to 4,096 and the planes and channel counts of the networks, at
  // each multiple of the divisor and beside it, at the top of the range, and at random.
  using namespace blpa::emulated;
  std::vector<int64_t> divisors;
  for (int64_t d = 1; d <= 4096; ++d) divisors.push_back(d);
  for (int64_t d : {3136, 12544, 50176, 200704, 65535, 65536, 65537, 1 << 20, (1 << 20) + 1, 999999937})
    divisors.push_back(d);
  for (int s = 12; s <= 31; ++s) divisors.push_back((int64_t{1} << s) - 1);
  std::mt19937_64 rng(3);
  for (int i = 0; i < 200; ++i) divisors.push_back(1 + static_cast<int64_t>(rng() % ((uint64_t{1} << 31) - 1)));
  const uint32_t top = (uint32_t{1} << 31) - 1;
  int64_t wrong = 0, checked = 0;
  for (int64_t d : divisors) {
    const Divider v = make_divider(d);
    auto check = [&](uint64_t n) {
      if (n > top) return;
      ++checked;
      if (divide(static_cast<uint32_t>(n), v) != n / static_cast<uint64_t>(d)) {
        if (++wrong <= 5) FAIL_CHECK("n = " << n << ", d = " << d << ": " << divide(static_cast<uint32_t>(n), v));
      }
    };
    for (uint64_t n : {uint64_t{0}, uint64_t{1}, uint64_t{top}, uint64_t{top} - 1}) check(n);
    for (uint64_t k = 1; k <= 64 && k * d <= top + uint64_t{1}; ++k) check(k * d - 1), check(k * d), check(k * d + 1);
    const uint64_t last = top / d;  // the multiples at the top of the range
    check(last * d), check(last * d - 1), check(last * d + d - 1);
    for (int i = 0; i < 200; ++i) check(rng() % (uint64_t{top} + 1));
  }
  CHECK(wrong == 0);
  CHECK(checked > 1000000);
}
