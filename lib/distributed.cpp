#include "blpa/distributed.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#if BLPA_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <spdlog/spdlog.h>

#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <future>
#include <map>
#include <mutex>
#include <stdexcept>
#include <thread>

namespace blpa {
namespace {

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (!v) return fallback;
  if (!*v)  // a launcher's variable left unset: every process would take the same rank
    throw std::invalid_argument(std::string("environment variable ") + name + " is set but empty");
  int x = 0;
  const char* end = v + std::strlen(v);
  const auto [p, ec] = std::from_chars(v, end, x);
  if (ec == std::errc::result_out_of_range)  // not wrapped round: 4294967297 is no world size of 1
    throw std::invalid_argument(std::string("environment variable ") + name + "='" + v + "' is out of range");
  if (ec != std::errc() || p != end)
    throw std::invalid_argument(std::string("environment variable ") + name + "='" + v + "' is not an integer");
  return x;
}

// The rendezvous's keys: a rank's world size, its refusal to start, and that it has read
// everything rank 0 must keep the store up for.
std::string world_key(int r) { return "blpa/world/" + std::to_string(r); }
std::string refused_key(int r) { return "blpa/refused/" + std::to_string(r); }
std::string read_key(int r) { return "blpa/world-read/" + std::to_string(r); }
constexpr const char* kStopsKey = "blpa/stops";  // how many ranks were asked to stop (watch_stops)
std::string stop_signal_key(int sig) { return "blpa/stops/" + std::to_string(sig); }  // and by which signals

// Runs a collective; any failure becomes PeerLost with the backend's first line.
template <typename F>
void guarded(const char* what, F f) {
  try {
    f();
  } catch (const std::exception& e) {
    std::string why = e.what();
    why = why.substr(0, why.find('\n'));
    // Gloo's words for a peer that exited: "[.../pair.cc:561] Connection closed by peer
    // [addr]:port. This is typically caused by a remote worker crashing. ... GLHF!": the
    // source location and the advice go.
    if (!why.empty() && why.front() == '[' && why.find("] ") != std::string::npos) why = why.substr(why.find("] ") + 2);
    if (const auto advice = why.find(". This is typically caused by"); advice != std::string::npos)
      why = why.substr(0, advice) + ": a rank stopped, and its own output says why";
    throw PeerLost(std::string(what) + " failed: " + why);
  }
}

// Whether something listens at addr:port within `timeout`, tried every 100 ms. The ranks
// other than 0 wait for rank 0's store here: TCPStore's client, left to wait, took about 2.5
// times its timeout (25 s for --dist-timeout 10) before it failed. A name that does not
// resolve (other than for now) throws at once. Returns false at once when *stop is set.
bool listening_within(const std::string& addr, int port, std::chrono::milliseconds timeout,
                      const std::atomic<bool>* stop) {
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + timeout;
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  for (;;) {
    addrinfo* found = nullptr;
    const int resolved = ::getaddrinfo(addr.c_str(), std::to_string(port).c_str(), &hints, &found);
    if (resolved != 0 && resolved != EAI_AGAIN)
      throw std::runtime_error("--master-addr " + addr + " cannot be resolved (" + ::gai_strerror(resolved) + ")");
    if (resolved == 0) {
      bool up = false;
      for (const addrinfo* a = found; a && !up; a = a->ai_next) {
        const int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) continue;
        if (::connect(fd, a->ai_addr, a->ai_addrlen) == 0) {
          up = true;
        } else if (errno == EINPROGRESS) {  // a remote host: wait for its answer, not past the deadline
          const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
          pollfd p{fd, POLLOUT, 0};
          int err = 0;
          socklen_t len = sizeof err;
          up = ::poll(&p, 1, static_cast<int>(std::clamp<long long>(left, 0, 1000))) == 1 &&
               ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0;
        }
        ::close(fd);
      }
      ::freeaddrinfo(found);
      if (up) return true;
    }
    if (Clock::now() >= deadline || (stop && stop->load())) return false;
    std::this_thread::sleep_for(std::min<Clock::duration>(std::chrono::milliseconds(100), deadline - Clock::now()));
  }
}

// The rendezvous store's options: rank 0 serves it. Its server does not wait for the others:
// join() does, comparing their world sizes, or refuse() tells them why this rank cannot come.
c10d::TCPStoreOptions store_options(const DistConfig& config, std::chrono::milliseconds timeout) {
  c10d::TCPStoreOptions so;
  so.port = static_cast<uint16_t>(config.master_port);
  so.isServer = config.rank == 0;
  so.numWorkers = config.world;
  so.waitWorkers = false;
  so.timeout = timeout;
  return so;
}

// TCPStore's client waits for the store's answer without a limit: something else that listens
// at the port and never answers (another program, a hung process) held a rank there for good.
// It connects on a thread of its own, left behind if it never returns; null when `until`
// passes or *stop is set first. TCPStore's own errors are rethrown.
c10::intrusive_ptr<c10d::TCPStore> client_within(const std::string& addr, const c10d::TCPStoreOptions& so,
                                                 std::chrono::steady_clock::time_point until,
                                                 const std::atomic<bool>* stop) {
  using Store = c10::intrusive_ptr<c10d::TCPStore>;
  auto made = std::make_shared<std::promise<Store>>();
  auto store = made->get_future();
  std::thread([made, addr, so] {
    try {
      made->set_value(c10::make_intrusive<c10d::TCPStore>(addr, so));
    } catch (...) {
      made->set_exception(std::current_exception());
    }
  }).detach();
  while (store.wait_for(std::chrono::milliseconds(100)) != std::future_status::ready)
    if (std::chrono::steady_clock::now() >= until || (stop && stop->load())) return {};
  return store.get();
}

}  // namespace

DistConfig DistConfig::from_env() {
  DistConfig c;
  c.rank = env_int("RANK", 0);
  c.world = env_int("WORLD_SIZE", 1);
  c.local_rank = env_int("LOCAL_RANK", c.rank);
  c.local_world = env_int("LOCAL_WORLD_SIZE", 1);
  if (const char* a = std::getenv("MASTER_ADDR"); a && *a) c.master_addr = a;
  c.master_port = env_int("MASTER_PORT", 29500);
  return c;
}

struct Distributed::Impl {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> pg;
  // watch_stops's thread, which may outlive this: it shares only `watch`, and touches the
  // caller's flags under its mutex while `quit` is unset.
  struct Watch {
    std::mutex mutex;
    std::condition_variable wake;
    bool quit = false, done = false;
    bool hurry = false;   // post_stop_now: poll now, not at the next 100 ms
    bool posted = false;  // this rank's stop is posted
  };
  std::shared_ptr<Watch> watch;

  // Waits up to 2 s for the thread (a store request takes milliseconds), not for good: one in
  // flight can take until the store's timeout where rank 0's machine is gone, and the thread
  // no longer touches the caller's flags once `quit` is set.
  void end_watch() {
    if (!watch) return;
    std::unique_lock<std::mutex> lock(watch->mutex);
    watch->quit = true;
    watch->wake.notify_all();
    watch->wake.wait_for(lock, std::chrono::seconds(2), [&] { return watch->done; });
    lock.unlock();
    watch.reset();
  }
};

Distributed::Distributed(const DistConfig& config, const std::string& backend, const std::atomic<bool>* stop,
                         const std::atomic<int>* signal)
    : config_(config), backend_(backend), stop_(stop), signal_(signal), impl_(std::make_unique<Impl>()) {
  if (config.world < 1 || config.rank < 0 || config.rank >= config.world)
    throw std::invalid_argument("rank " + std::to_string(config.rank) + " is not in a world of " +
                                std::to_string(config.world));
  if (config.master_port <= 0 || config.master_port > 65535)
    throw std::invalid_argument("master port " + std::to_string(config.master_port) + " is out of range");
  const c10d::TCPStoreOptions so = store_options(config, config.timeout);
  const std::string who = "rank " + std::to_string(config.rank) + " of " + std::to_string(config.world);
  const std::string where = config.master_addr + ":" + std::to_string(config.master_port);
  const std::string hint = "; give each run its own --master-port (or MASTER_PORT)";
  const auto ms = config.timeout.count();  // --dist-timeout's seconds; ms where a caller gives less
  const std::string within = ms % 1000 == 0 ? std::to_string(ms / 1000) + " s" : std::to_string(ms) + " ms";
  const std::string start_all = ": start every rank, with the same --master-addr and --master-port";
  if (!so.isServer) {
    bool up = false;
    try {
      up = listening_within(config.master_addr, config.master_port, config.timeout, stop);
    } catch (const std::exception& e) {
      throw std::runtime_error(who + ": " + e.what());
    }
    if (stop && stop->load()) throw stopped(who);
    if (!up)
      throw std::runtime_error(who + ": no rendezvous at " + where + " within " + within + " (rank 0 is not " +
                               "listening)" + start_all);
  }
  bool silent = false;  // something at the port that is not a rendezvous
  try {
    if (so.isServer) {
      impl_->store = c10::make_intrusive<c10d::TCPStore>(config.master_addr, so);
    } else {
      impl_->store = client_within(config.master_addr, so,
                                   std::chrono::steady_clock::now() + config.timeout + std::chrono::seconds(5), stop);
      silent = !impl_->store && !(stop && stop->load());
    }
  } catch (const std::exception& e) {
    const auto* c = dynamic_cast<const c10::Error*>(&e);
    std::string why = c ? c->what_without_backtrace() : e.what();
    why = why.substr(0, why.find('\n'));
    // Rank 0 fails at once when it cannot listen; the others wait for it up to the timeout.
    if (so.isServer)
      throw std::runtime_error(who + ": cannot open the rendezvous on port " + std::to_string(config.master_port) +
                               " (" + why + ")" + (why.find("EADDRINUSE") != std::string::npos
                                                        ? ": another run may be using that port" + hint
                                                        : std::string()));
    throw std::runtime_error(who + ": no rendezvous at " + where + " within " + within + " (" + why + ")");
  }
  if (stop && stop->load()) throw stopped(who);
  if (silent)
    throw std::runtime_error(who + ": something listens at " + where + " but does not answer as a rendezvous within " +
                             within + ": another program may be using that port" + hint);
  // Two runs at one port (both left at the default): the second's rank 0 cannot listen, and its
  // other ranks join the first run's store, where they used to wait for a collective's timeout
  // and then fail with Gloo's words. Each rank counts itself in, so one rank too many knows.
  if (impl_->store->add("blpa/ranks", 1) > config.world)
    throw std::runtime_error(who + ": more than this run's " + std::to_string(config.world) +
                             " ranks joined the rendezvous at " + where + ": another run is using that port" + hint +
                             ", or two of this run's processes were given the same --rank");
  // Two processes given one rank (a launch script that did not change RANK): the second
  // stops every rank, which would otherwise wait for the rank that was never started.
  if (impl_->store->add("blpa/rank/" + std::to_string(config.rank), 1) > 1) {
    const std::string why = "two processes were given rank " + std::to_string(config.rank) +
                            ": give each its own --rank (RANK)";
    const std::string kind_why = "2" + why;  // a flag's error, as Distributed::refuse posts it
    impl_->store->set(refused_key(config.rank), std::vector<uint8_t>(kind_why.begin(), kind_why.end()));
    throw std::invalid_argument(who + ": " + why);
  }
  join(who, where + " within " + within, start_all);
  if (backend == "gloo") {
    auto o = c10d::ProcessGroupGloo::Options::create(config.timeout);
    // GLOO_SOCKET_IFNAME picks the network interface, as in PyTorch; else the host's address.
    const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
    o->devices.push_back(ifname && *ifname ? c10d::ProcessGroupGloo::createDeviceForInterface(ifname)
                                           : c10d::ProcessGroupGloo::createDefaultDevice());
    impl_->pg = c10::make_intrusive<c10d::ProcessGroupGloo>(impl_->store, config.rank, config.world, o);
  } else if (backend == "nccl") {
#if BLPA_WITH_NCCL
    auto o = c10d::ProcessGroupNCCL::Options::create();
    o->timeout = config.timeout;
    impl_->pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(impl_->store, config.rank, config.world, o);
#else
    throw std::runtime_error("this blpa was built without NCCL (a CUDA build with the NCCL headers has it)");
#endif
  } else {
    throw std::invalid_argument("unknown distributed backend '" + backend + "' (gloo or nccl)");
  }
}

Distributed::~Distributed() {
  impl_->end_watch();
  if (closed_ || !impl_->pg) return;
  try {
    impl_->pg->abort();  // Gloo's does nothing: its destructor ends its threads
  } catch (...) {        // leaving on an error already: that one is reported
  }
}

void Distributed::close() {
  impl_->end_watch();
  if (closed_ || !impl_->pg) return;
  closed_ = true;
  // This rank's work is done: a collective that fails to flush is its peers' to report.
  try {
    impl_->pg->shutdown();
  } catch (const std::exception& e) {
    std::string why = e.what();
    spdlog::warn("rank {} of {}: closing the process group: {}", config_.rank, config_.world,
                 why.substr(0, why.find('\n')));
  }
}

namespace {

// The process's watch (one Distributed trains at a time), for post_stop_now.
std::mutex g_watch_mutex;
std::weak_ptr<Distributed::Impl::Watch> g_watch;

}  // namespace

void post_stop_now() noexcept {
  try {
    std::shared_ptr<Distributed::Impl::Watch> w;
    {
      std::lock_guard<std::mutex> lock(g_watch_mutex);
      w = g_watch.lock();
    }
    if (!w) return;
    std::unique_lock<std::mutex> lock(w->mutex);
    if (w->quit || w->done) return;
    w->hurry = true;
    w->wake.notify_all();
    // A store request takes milliseconds; one to a machine gone may take its timeout.
    const bool posted = w->wake.wait_for(lock, std::chrono::milliseconds(500), [&] { return w->posted || w->done; }) &&
                        w->posted;
    lock.unlock();
    // Two rounds of the other ranks' watches: they read it before they lose this rank.
    if (posted) std::this_thread::sleep_for(std::chrono::milliseconds(250));
  } catch (...) {  // ending at once all the same
  }
}

void Distributed::watch_stops(const std::atomic<bool>* mine, Stops* seen) {
  if (impl_->watch || closed_) return;
  auto watch = impl_->watch = std::make_shared<Impl::Watch>();
  {
    std::lock_guard<std::mutex> lock(g_watch_mutex);
    g_watch = watch;
  }
  std::thread([watch, store = impl_->store, mine, seen, signal = signal_] {
    struct Done {  // however the thread ends
      Impl::Watch& w;
      ~Done() {
        std::lock_guard<std::mutex> lock(w.mutex);
        w.done = true;
        w.wake.notify_all();
      }
    } done{*watch};
    bool posted = false;
    for (;;) {
      bool asked = false;
      int sig = 0;
      {
        std::unique_lock<std::mutex> lock(watch->mutex);
        watch->wake.wait_for(lock, std::chrono::milliseconds(100), [&] { return watch->quit || watch->hurry; });
        if (watch->quit) return;
        asked = mine && mine->load();
        sig = signal ? signal->load() : 0;
      }
      int64_t stops = 0;
      int told = 0;
      try {  // TCPStore's client serialises its requests: the main thread may use it meanwhile
        // The signal before the count: a rank that sees the count finds it.
        if (asked && !posted && sig > 0) store->add(stop_signal_key(sig), 1);
        if (asked && !posted) {
          stops = store->add(kStopsKey, 1);
          posted = true;
        } else {
          stops = store->add(kStopsKey, 0);
        }
        // As the ranks' sums tell it (Run::told): SIGTERM before SIGHUP before SIGINT.
        for (const int s : {SIGTERM, SIGHUP, SIGINT})
          if (stops > 0 && told == 0 && store->check({stop_signal_key(s)})) told = s;
      } catch (const std::exception&) {  // rank 0's store gone: the run is ending, or its
        return;                          // collectives say why it failed
      }
      std::lock_guard<std::mutex> lock(watch->mutex);
      watch->posted = posted, watch->hurry = false;
      watch->wake.notify_all();  // post_stop_now
      if (watch->quit) return;
      if (told != 0) seen->signal.store(told);  // before the flags: a reader of them finds it
      if (stops > (posted ? 1 : 0)) seen->others.store(true);
      if (stops > 0) seen->any.store(true);
    }
  }).detach();
}

namespace {

// Rank 0's store goes with it: before it leaves with an error that the others must read, it
// waits (a little) until each has read it, or has refused itself.
void linger(c10d::Store& store, int world, std::chrono::steady_clock::time_point until,
            const std::atomic<bool>* stop) {
  for (int r = 1; r < world; ++r)
    while (!store.check({read_key(r)}) && !store.check({refused_key(r)}) &&
           std::chrono::steady_clock::now() < until && !(stop && stop->load()))
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
}

std::string text(const std::vector<uint8_t>& v) { return {v.begin(), v.end()}; }
}  // namespace

// Each rank posts its world size and waits for every other rank's. Ranks started for worlds
// of different sizes are told so at once (Gloo, given them, waited up to five timeouts for
// ranks that would never come, then failed in its words); a rank that refused to start
// (refuse()) stops the others at once; a rank that does not come is named.
void Distributed::join(const std::string& who, const std::string& at, const std::string& hint) {
  auto& store = *impl_->store;
  const std::string mine = std::to_string(config_.world);
  store.set(world_key(config_.rank), std::vector<uint8_t>(mine.begin(), mine.end()));
  std::vector<int> waiting;
  for (int r = 0; r < config_.world; ++r)
    if (r != config_.rank) waiting.push_back(r);
  const auto deadline = std::chrono::steady_clock::now() + config_.timeout;
  auto leave = [&] {  // before an error the others read too
    if (config_.rank != 0) store.set(read_key(config_.rank), std::vector<uint8_t>{1});
    else linger(store, config_.world, std::min(deadline, std::chrono::steady_clock::now() + std::chrono::seconds(10)),
                stop_);
  };
  auto refused_by = [&](int r) {
    if (!store.check({refused_key(r)})) return;
    const std::string why = text(store.get(refused_key(r)));
    if (!why.empty() && why[0] == 's' && config_.rank == 0)  // a stop: the user waits, 3 s at most for the others
      linger(store, config_.world, std::min(deadline, std::chrono::steady_clock::now() + std::chrono::seconds(3)),
             stop_);
    else
      leave();
    throw RankRefused(who + ": rank " + std::to_string(r) + " cannot start, so no rank trains (" +
                          (why.empty() ? why : why.substr(1)) + ")",
                      r, why);
  };
  // Rank 0's store closing under a waiting rank (rank 0 timed out waiting for a third rank, or
  // was stopped) is said as such: c10d's words were "Failed to recv, got 0 bytes".
  try {
    while (!waiting.empty()) {
      // Every rank, also those that have come, and this one: a second process given its rank.
      for (int r = 0; r < config_.world; ++r) refused_by(r);
      for (auto r = waiting.begin(); r != waiting.end();) {
        if (!store.check({world_key(*r)})) {
          ++r;
          continue;
        }
        const std::string theirs = text(store.get(world_key(*r)));
        if (theirs != mine) {
          leave();
          throw WorldsDiffer(who + ": rank " + std::to_string(*r) + " was started for a world of " + theirs +
                             " ranks, this one for " + mine + ": give every rank the same --world-size (WORLD_SIZE)");
        }
        r = waiting.erase(r);
      }
      if (waiting.empty()) break;
      if (stop_ && stop_->load()) throw stopped(who);
      if (std::chrono::steady_clock::now() >= deadline) {
        std::string missing;
        for (const int r : waiting) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
        throw std::runtime_error(who + ": " +
                                 (config_.rank == 0 ? "the other ranks did not join the rendezvous at " + at +
                                                          " (not come: rank " + missing + ")"
                                 : waiting.front() == 0 ? "rank 0 did not answer at the rendezvous at " + at
                                                        : "rank " + missing + " did not join the rendezvous at " + at) +
                                 hint);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  } catch (const c10::Error&) {
    if (config_.rank == 0) throw;
    throw std::runtime_error(who + ": rank 0 closed the rendezvous (" + at + ") before every rank joined: it stopped, "
                             "or timed out waiting for a rank that did not come (its output names it)" + hint);
  }
  // Every rank has read every other's size: rank 0 may close the store from here on.
  if (config_.rank != 0) store.set(read_key(config_.rank), std::vector<uint8_t>{1});
}

Interrupted Distributed::stopped(const std::string& who) {
  const std::string why = "s" + std::to_string(signal_ && signal_->load() ? signal_->load() : SIGINT);
  // Short, as the user asked to stop (a Ctrl-C to every rank of a world not yet whole waits it
  // out for the missing ones; ranks at the rendezvous hear within a second); a second signal
  // ends it.
  const auto grace = std::min<std::chrono::milliseconds>(config_.timeout, std::chrono::seconds(3));
  spdlog::warn("{}: stopped at the rendezvous: telling the other ranks at {}:{} (up to {:g} s)", who,
               config_.master_addr, config_.master_port, grace.count() / 1000.0);
  if (!impl_->store) {  // none reached yet: through a rendezvous of its own, as a refusal
    refuse(config_, why, grace, nullptr);
  } else {  // on the store the others are connected to (they cannot reach a new one)
    try {
      impl_->store->set(refused_key(config_.rank), std::vector<uint8_t>(why.begin(), why.end()));
      if (config_.rank == 0) linger(*impl_->store, config_.world, std::chrono::steady_clock::now() + grace, nullptr);
    } catch (const std::exception&) {  // rank 0's store gone: the others learn it closed
    }
  }
  return Interrupted(who + ": stopped by a signal at the rendezvous, before training");
}

void Distributed::refuse(const DistConfig& config, const std::string& why, std::chrono::milliseconds grace,
                         const std::atomic<bool>* stop) {
  if (!config.enabled() || config.rank < 0 || config.rank >= config.world || config.master_port <= 0 ||
      config.master_port > 65535)
    return;
  const auto until = std::chrono::steady_clock::now() + grace;
  try {
    const c10d::TCPStoreOptions so = store_options(config, grace);
    if (!so.isServer && !listening_within(config.master_addr, config.master_port, grace, stop)) return;
    const auto store = so.isServer ? c10::make_intrusive<c10d::TCPStore>(config.master_addr, so)
                                   : client_within(config.master_addr, so, until, stop);
    if (!store) return;
    store->set(refused_key(config.rank), std::vector<uint8_t>(why.begin(), why.end()));
    if (so.isServer) linger(*store, config.world, until, stop);
  } catch (const std::exception&) {
    // No rendezvous to tell (the port taken, rank 0 gone): the others wait for their timeout.
  }
}

// c10d's collectives take a list of same-shaped tensors (one per device of the process), so
// many different tensors travel as one flat buffer per dtype.
template <typename Collective>
void flat_collective(const std::vector<at::Tensor>& tensors, Collective run) {
  std::map<at::ScalarType, std::vector<at::Tensor>> by_type;
  for (const auto& t : tensors) by_type[t.scalar_type()].push_back(t);
  for (auto& [type, group] : by_type) {
    std::vector<at::Tensor> flat;
    for (const auto& t : group) flat.push_back(t.reshape(-1));
    std::vector<at::Tensor> buffer{at::cat(flat)};
    run(buffer);
    int64_t offset = 0;
    for (auto& t : group) {
      t.copy_(buffer[0].narrow(0, offset, t.numel()).view(t.sizes()));
      offset += t.numel();
    }
  }
}

void Distributed::broadcast(std::vector<at::Tensor> tensors, int root) {
  c10d::BroadcastOptions o;
  o.rootRank = root;
  guarded("broadcast", [&] {
    flat_collective(tensors, [&](std::vector<at::Tensor>& b) { impl_->pg->broadcast(b, o)->wait(); });
  });
}

void Distributed::allreduce_sum(std::vector<at::Tensor> tensors) {
  guarded("all-reduce", [&] {
    flat_collective(tensors, [&](std::vector<at::Tensor>& b) { impl_->pg->allreduce(b)->wait(); });
  });
}

std::vector<double> Distributed::sum(const std::vector<double>& values) {
  auto t = at::tensor(values, at::kDouble);
  if (backend_ == "nccl") t = t.to(at::Device(at::kCUDA, config_.local_rank));
  std::vector<at::Tensor> v{t};
  guarded("all-reduce", [&] { impl_->pg->allreduce(v)->wait(); });
  auto cpu = v[0].cpu();
  return {cpu.data_ptr<double>(), cpu.data_ptr<double>() + cpu.numel()};
}

std::vector<std::string> Distributed::all_gather(const std::string& mine) {
  // Gloo and NCCL both sum int32 tensors: each rank writes its own slot, the sum fills all.
  const auto opts = at::TensorOptions(at::kInt).device(backend_ == "nccl" ? at::Device(at::kCUDA, config_.local_rank)
                                                                         : at::Device(at::kCPU));
  std::vector<at::Tensor> lengths{at::zeros({config_.world}, opts)};
  lengths[0][config_.rank] = static_cast<int>(mine.size());
  guarded("all-gather", [&] { impl_->pg->allreduce(lengths)->wait(); });
  const auto n = lengths[0].cpu();
  const int64_t longest = n.max().item<int64_t>();
  auto slots = at::zeros({config_.world, std::max<int64_t>(longest, 1)}, at::kInt);
  auto w = slots.accessor<int, 2>();
  for (size_t i = 0; i < mine.size(); ++i) w[config_.rank][static_cast<int64_t>(i)] = static_cast<unsigned char>(mine[i]);
  std::vector<at::Tensor> all{slots.to(opts.device())};
  guarded("all-gather", [&] { impl_->pg->allreduce(all)->wait(); });
  const auto bytes = all[0].cpu();
  const auto r_ = bytes.accessor<int, 2>();
  const auto len = n.accessor<int, 1>();
  std::vector<std::string> out(config_.world);
  for (int r = 0; r < config_.world; ++r)
    for (int i = 0; i < len[r]; ++i) out[r] += static_cast<char>(r_[r][i]);
  return out;
}

void Distributed::barrier() {
  guarded("barrier", [&] { impl_->pg->barrier()->wait(); });
}

// ---- gradient reducer ------------------------------------------------------------------------

struct GradientReducer::State {
  struct Bucket {
    at::Tensor flat;
    std::vector<size_t> params;
    std::vector<int64_t> offsets;
    size_t pending = 0;
    c10::intrusive_ptr<c10d::Work> work;
  };
  c10::intrusive_ptr<c10d::Backend> pg;
  int world = 1;
  std::vector<at::Tensor> params;
  std::vector<size_t> bucket_of, slot_of;
  std::vector<Bucket> buckets;
  std::vector<char> ready;
  size_t next_launch = 0;
  bool enabled = false;
  std::mutex mutex;

  void reset() {
    std::fill(ready.begin(), ready.end(), 0);
    for (auto& b : buckets) b.pending = b.params.size(), b.work.reset();
    next_launch = 0;
  }
  // Buckets are launched in their order on every rank (collectives must match across ranks).
  void launch_ready() {
    while (next_launch < buckets.size() && buckets[next_launch].pending == 0) {
      std::vector<at::Tensor> t{buckets[next_launch].flat};
      buckets[next_launch].work = pg->allreduce(t);
      ++next_launch;
    }
  }
  void copy_in(size_t i) {
    Bucket& b = buckets[bucket_of[i]];
    auto slice = b.flat.narrow(0, b.offsets[slot_of[i]], params[i].numel());
    const auto& g = params[i].grad();
    if (g.defined())
      slice.copy_(g.reshape(-1));
    else
      slice.zero_();  // no gradient this step: it contributes zero, as DDP's unused parameters
    ready[i] = 1;
    --b.pending;
  }
  void on_grad(size_t i) {  // a PostAccumulateGradHook, on an autograd engine thread
    std::lock_guard<std::mutex> lock(mutex);
    if (!enabled || ready[i]) return;
    copy_in(i);
    launch_ready();
  }
};

namespace {

struct Hook : torch::autograd::PostAccumulateGradHook {
  std::weak_ptr<GradientReducer::State> state;
  size_t index;
  Hook(std::weak_ptr<GradientReducer::State> s, size_t i) : state(std::move(s)), index(i) {}
  void operator()(const torch::autograd::Variable&) override {
    if (auto s = state.lock()) s->on_grad(index);
  }
};

}  // namespace

std::unique_ptr<GradientReducer> Distributed::reducer(const std::vector<at::Tensor>& params, int64_t bucket_bytes) {
  auto s = std::make_shared<GradientReducer::State>();
  s->pg = impl_->pg;
  s->world = config_.world;
  s->params = params;
  s->bucket_of.resize(params.size());
  s->slot_of.resize(params.size());
  s->ready.assign(params.size(), 0);
  // Reverse order: the last layers' gradients are ready first in backward.
  int64_t bytes = 0;
  for (size_t k = params.size(); k-- > 0;) {
    const auto& p = params[k];
    if (s->buckets.empty() || (bytes > 0 && bytes + static_cast<int64_t>(p.nbytes()) > bucket_bytes)) {
      s->buckets.emplace_back();
      bytes = 0;
    }
    auto& b = s->buckets.back();
    s->bucket_of[k] = s->buckets.size() - 1;
    s->slot_of[k] = b.params.size();
    b.offsets.push_back(b.params.empty() ? 0 : b.offsets.back() + params[b.params.back()].numel());
    b.params.push_back(k);
    bytes += p.nbytes();
  }
  for (auto& b : s->buckets) {
    const int64_t n = b.offsets.back() + params[b.params.back()].numel();
    b.flat = at::zeros({n}, params[b.params.front()].options().requires_grad(false));
  }
  s->reset();
  for (size_t i = 0; i < params.size(); ++i)
    torch::autograd::impl::set_post_acc_grad_hooks(params[i], std::make_unique<Hook>(s, i));
  return std::unique_ptr<GradientReducer>(new GradientReducer(s));
}

GradientReducer::GradientReducer(std::shared_ptr<State> s) : state_(std::move(s)) {}

GradientReducer::~GradientReducer() {
  for (auto& p : state_->params) torch::autograd::impl::set_post_acc_grad_hooks(p, nullptr);
}

void GradientReducer::enable(bool on) {
  std::lock_guard<std::mutex> lock(state_->mutex);
  state_->enabled = on;
}

void GradientReducer::finish() {
  State& s = *state_;
  std::unique_lock<std::mutex> lock(s.mutex);
  if (!s.enabled) return;
  for (size_t i = 0; i < s.params.size(); ++i)
    if (!s.ready[i]) s.copy_in(i);
  s.launch_ready();
  try {
    guarded("gradient all-reduce", [&] {
      for (auto& b : s.buckets) b.work->wait();
    });
  } catch (...) {
    s.reset();
    throw;
  }
  for (auto& b : s.buckets) {
    b.flat.div_(s.world);
    for (size_t j = 0; j < b.params.size(); ++j) {
      auto& p = s.params[b.params[j]];
      auto avg = b.flat.narrow(0, b.offsets[j], p.numel()).view(p.sizes());
      if (p.grad().defined())
        p.mutable_grad().copy_(avg);
      else
        p.mutable_grad() = avg.clone();
    }
  }
  s.reset();
}

}  // namespace blpa
