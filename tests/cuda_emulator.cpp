// The CUDA emulator's machine (cuda_emulator.h): a block's threads are fibers on the calling
// thread, run in turn until each finishes or waits at a barrier.
//
// A fiber switch saves the callee-saved registers on the fiber's stack and swaps stack
// pointers (switch_stacks, x86-64 System V). A kernel must not reach a barrier or a shuffle
// inside a catch block: the C++ runtime's record of the exception being handled is the OS
// thread's, not the fiber's (the codec's kernels throw nothing). glibc's swapcontext also saves the signal mask
// with a system call each time: the block-wide sums of the BatchNorm kernels switch every
// thread at each of their shuffles, and swapcontext made the codec's tests under the emulator
// take minutes. Elsewhere than x86-64 the emulator uses swapcontext.
#include "cuda_emulator.h"

#include <sys/mman.h>
#include <unistd.h>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <array>
#include <cerrno>
#include <exception>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define BLPA_EMULATOR_ASAN 1
#else
#define BLPA_EMULATOR_ASAN 0
#endif

#if defined(__x86_64__)
// switch_stacks(&from, to): pushes the callee-saved registers on the running stack, stores its
// pointer in *from, then pops the same from stack `to` and returns there. The fibers share
// the floating-point control registers (MXCSR, the x87 control word): nothing here changes
// them.
extern "C" void blpa_emulator_switch_stacks(void** from, void* to);
__asm__(R"(
  .pushsection .text
  .globl blpa_emulator_switch_stacks
  .type blpa_emulator_switch_stacks, @function
  .p2align 4
blpa_emulator_switch_stacks:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size blpa_emulator_switch_stacks, .-blpa_emulator_switch_stacks
  .popsection
)");
#endif

namespace blpa::emulated {
namespace {

#if defined(__x86_64__)
struct Context {
  void* sp = nullptr;
};

// A context that starts entry() on the given stack: the six registers switch_stacks pops,
// entry's address for its `ret`, and above that a null return address for entry, which never
// returns. entry starts with the stack pointer 8 past a 16-byte boundary, as after a call.
void prepare(Context& c, char* stack, size_t bytes, void (*entry)()) {
  auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t{15});
  top[-1] = 0;
  top[-2] = reinterpret_cast<uint64_t>(entry);
  for (int k = 3; k <= 8; ++k) top[-k] = 0;  // rbp, rbx, r12 to r15
  c.sp = top - 8;
}

void jump(Context& from, const Context& to) { blpa_emulator_switch_stacks(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};

void prepare(Context& c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}

void jump(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

constexpr unsigned kWarp = 32;
constexpr size_t kStackBytes = 128 * 1024;

// Threads wait at a barrier until `expected` have arrived; the last to arrive goes on and
// makes the others ready. A thread that exits stops being expected (as on the GPU, where an
// exited thread no longer holds a __syncthreads back).
struct Barrier {
  unsigned expected = 0;
  std::vector<unsigned> waiting;
};

// A fiber's stack, with an inaccessible page below it: a kernel that overflows its stack
// stops with SIGSEGV there instead of writing over the heap (another fiber's stack, the
// test's tensors) and going on.
class Stack {
 public:
  Stack() {
    guard_ = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
    void* p = ::mmap(nullptr, guard_ + kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::system_error(errno, std::generic_category(), "emulator: a fiber's stack");
    map_ = static_cast<char*>(p);
    if (::mprotect(map_, guard_, PROT_NONE) != 0) {
      const int e = errno;
      ::munmap(map_, guard_ + kStackBytes);
      throw std::system_error(e, std::generic_category(), "emulator: a fiber's stack guard");
    }
  }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  ~Stack() { ::munmap(map_, guard_ + kStackBytes); }
  char* get() const { return map_ + guard_; }  // kStackBytes from here are the stack

 private:
  char* map_ = nullptr;
  size_t guard_ = 0;
};

struct Fiber {
  Context context;
  Stack stack;
  uint3 index;
  uint64_t shuffles = 0;       // the parity picks the buffer of the warp's shuffle slots
  void* fake_stack = nullptr;  // AddressSanitizer's, while switched out
};

struct Machine {
  std::vector<std::unique_ptr<Fiber>> fibers;  // not moved: a context points into itself
  unsigned threads = 0;                        // of the running block
  unsigned current = 0;
  unsigned live = 0;
  std::vector<unsigned> ready;  // threads to resume, in order; `next` is the first not yet resumed
  size_t next = 0;
  Barrier block;
  std::vector<Barrier> warps;
  std::vector<unsigned> live_lanes;                                // per warp, a mask
  std::vector<std::array<std::array<uint64_t, kWarp>, 2>> slots;  // per warp, two buffers
  std::vector<std::array<unsigned, 2>> written;                    // per warp and buffer, lanes
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;
  Context scheduler;
  const void* scheduler_bottom = nullptr;  // for AddressSanitizer
  size_t scheduler_size = 0;
  bool running = false;
  std::thread::id owner;   // the thread running the launch
  bool abandoned = false;  // a launch failed with threads suspended: their frames are left
  Counters counters;
};

Machine& machine() {
  static Machine m;
  return m;
}

Machine& running_machine(const char* what) {
  Machine& m = machine();
  if (!m.running) throw std::logic_error(std::string("emulator: ") + what + " outside a kernel");
  return m;
}

// Switches from the scheduler to fiber f, and back when it waits or ends.
void enter(Machine& m, Fiber& f) {
#if BLPA_EMULATOR_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack.get(), kStackBytes);
#endif
  jump(m.scheduler, f.context);
#if BLPA_EMULATOR_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

// From fiber f back to the scheduler; `final` when f has ended and will not be resumed.
void leave(Machine& m, Fiber& f, bool final) {
#if BLPA_EMULATOR_ASAN
  __sanitizer_start_switch_fiber(final ? nullptr : &f.fake_stack, m.scheduler_bottom, m.scheduler_size);
#endif
  jump(f.context, m.scheduler);
#if BLPA_EMULATOR_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &m.scheduler_bottom, &m.scheduler_size);
#endif
}

void release(Machine& m, Barrier& b) {
  m.ready.insert(m.ready.end(), b.waiting.begin(), b.waiting.end());
  b.waiting.clear();
}

void arrive(Machine& m, Barrier& b) {
  if (b.waiting.size() + 1 == b.expected) {  // the last one: the others go on
    release(m, b);
    return;
  }
  b.waiting.push_back(m.current);
  leave(m, *m.fibers[m.current], false);
}

void stop_expecting(Machine& m, Barrier& b) {
  --b.expected;
  if (!b.waiting.empty() && b.waiting.size() == b.expected) release(m, b);
}

void fiber_main() {
  Machine& m = machine();
#if BLPA_EMULATOR_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &m.scheduler_bottom, &m.scheduler_size);
#endif
  try {
    (*m.body)();
  } catch (...) {
    if (!m.error) m.error = std::current_exception();
  }
  const unsigned tid = m.current;
  --m.live;
  m.live_lanes[tid / kWarp] &= ~(1u << (tid % kWarp));
  stop_expecting(m, m.block);
  stop_expecting(m, m.warps[tid / kWarp]);
  leave(m, *m.fibers[tid], true);
}

void run_block(Machine& m) {
  const unsigned n = m.threads;
  const unsigned warps = (n + kWarp - 1) / kWarp;
  m.block.expected = n;
  m.block.waiting.clear();
  m.warps.resize(warps);
  m.live_lanes.resize(warps);
  m.slots.resize(warps);
  m.written.assign(warps, {0u, 0u});
  for (unsigned w = 0; w < warps; ++w) {
    const unsigned lanes = std::min(kWarp, n - w * kWarp);
    m.warps[w].expected = lanes;
    m.warps[w].waiting.clear();
    m.live_lanes[w] = lanes == kWarp ? ~0u : (1u << lanes) - 1;
  }
  m.ready.clear();
  m.next = 0;
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = *m.fibers[i];
    f.index = {i % blockDim.x, i / blockDim.x % blockDim.y, i / (blockDim.x * blockDim.y)};
    f.shuffles = 0;
    // Stacks are allocated alike, so their tops would share one cache set: each one starts
    // 64 bytes lower than the one before (the BatchNorm tests took 27% longer without).
    prepare(f.context, f.stack.get(), kStackBytes - i % 256 * 64, fiber_main);
    m.ready.push_back(i);
  }
  m.live = n;
  while (m.next < m.ready.size()) {
    const unsigned i = m.ready[m.next++];
    m.current = i;
    threadIdx = m.fibers[i]->index;
    enter(m, *m.fibers[i]);
    if (m.error) std::rethrow_exception(m.error);
  }
  if (m.live > 0)
    throw std::runtime_error("emulator: block (" + std::to_string(blockIdx.x) + ", " + std::to_string(blockIdx.y) +
                             ") deadlocked: its live threads wait at barriers that others never reach");
}

}  // namespace

void run(dim3 grid, dim3 block, const std::function<void()>& body) {
  Machine& m = machine();
  if (m.running && m.owner == std::this_thread::get_id())
    throw std::logic_error("emulator: a launch from inside a kernel");
  // One launch at a time: the machine, the coordinates and the kernels' __shared__ arrays
  // are the process's.
  static std::mutex one_at_a_time;
  const std::lock_guard<std::mutex> lock(one_at_a_time);
  m.owner = std::this_thread::get_id();
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535)
    throw std::runtime_error("emulator: invalid launch configuration (cudaErrorInvalidConfiguration): grid (" +
                             std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " + std::to_string(grid.z) +
                             "), block (" + std::to_string(block.x) + ", " + std::to_string(block.y) + ", " +
                             std::to_string(block.z) + ")");
  while (m.fibers.size() < threads) m.fibers.push_back(std::make_unique<Fiber>());
#if BLPA_EMULATOR_ASAN
  // A failed launch leaves suspended threads' frames on their stacks, poisoned: the next
  // threads on those stacks would trip over them.
  if (m.abandoned)
    for (auto& f : m.fibers) ASAN_UNPOISON_MEMORY_REGION(f->stack.get(), kStackBytes);
#endif
  m.abandoned = false;
  m.threads = static_cast<unsigned>(threads);
  m.body = &body;
  m.error = nullptr;
  m.running = true;
  gridDim = grid;
  blockDim = block;
  ++m.counters.launches;
  try {
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          blockIdx = {x, y, z};
          m.counters.threads += threads;
          run_block(m);
        }
  } catch (...) {
    m.running = false;
    m.body = nullptr;
    m.abandoned = true;
    throw;
  }
  m.running = false;
  m.body = nullptr;
}

void sync_threads() {
  Machine& m = running_machine("__syncthreads");
  arrive(m, m.block);
}

uint64_t shuffle_down(uint64_t value, unsigned delta, unsigned mask) {
  Machine& m = running_machine("__shfl_down_sync");
  const unsigned tid = m.current, warp = tid / kWarp, lane = tid % kWarp;
  // The GPU needs every lane the mask names to execute the same shuffle; the kernels name the
  // whole warp, so every lane must be live.
  if (mask != m.live_lanes[warp])
    throw std::runtime_error("emulator: __shfl_down_sync with mask " + std::to_string(mask) +
                             " in a warp whose live lanes are " + std::to_string(m.live_lanes[warp]));
  Fiber& f = *m.fibers[tid];
  const unsigned parity = f.shuffles++ & 1;
  auto& slots = m.slots[warp][parity];
  slots[lane] = value;
  m.written[warp][parity] |= 1u << lane;
  Barrier& b = m.warps[warp];
  // The last to arrive: every lane is past the shuffle before this one, whose buffer the next
  // shuffle takes.
  if (b.waiting.size() + 1 == b.expected) m.written[warp][parity ^ 1] = 0;
  arrive(m, b);
  // A lane that exited while the others waited here never wrote its slot.
  if ((mask & ~m.written[warp][parity]) != 0)
    throw std::runtime_error("emulator: __shfl_down_sync with mask " + std::to_string(mask) +
                             " but only these live lanes reached it: " + std::to_string(m.written[warp][parity]));
  const unsigned source = lane + delta;
  return source < kWarp ? slots[source] : value;
}

void check_aligned(const void* p, size_t bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0)
    throw std::runtime_error(std::string("emulator: misaligned ") + what + " of " + std::to_string(bytes) +
                             " bytes at " + std::to_string(reinterpret_cast<uintptr_t>(p)) +
                             " (cudaErrorMisalignedAddress on a GPU)");
}

Counters counters() { return machine().counters; }

}  // namespace blpa::emulated
