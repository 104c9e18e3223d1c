// Data-parallel training on torch.distributed's engine (c10d): one process per device, a TCP
// store for the rendezvous, Gloo on CPUs and NCCL on GPUs, and gradients averaged by bucketed
// all-reduces launched from backward as soon as a bucket's gradients are accumulated, as
// PyTorch's DistributedDataParallel does. BatchNorm keeps per-replica statistics.
#pragma once

#include <ATen/core/Tensor.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace blpa {

struct DistConfig {
  int rank = 0, world = 1, local_rank = 0;
  int local_world = 1;  // processes on this machine: they share its cores
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  std::string backend = "auto";  // auto (NCCL for CUDA tensors, Gloo for CPU ones), gloo or nccl
  std::chrono::milliseconds timeout{std::chrono::seconds(600)};  // a missing peer is an error after this

  bool enabled() const { return world > 1; }
  // The backend `auto` picks: NCCL where the tensors are on a GPU, else Gloo.
  std::string resolved_backend(bool cuda) const { return backend != "auto" ? backend : cuda ? "nccl" : "gloo"; }
  // RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT (torchrun's
  // variables), where set.
  static DistConfig from_env();
};

class GradientReducer;

// A collective failed: a peer died, closed its connection or stayed silent past the timeout.
struct PeerLost : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The ranks that met at the rendezvous were started for worlds of different sizes.
struct WorldsDiffer : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// A signal (*stop, set by the caller's handler) ended the wait at the rendezvous. The other
// ranks were told so, as a refusal of kind 's' with the signal (see refuse).
struct Interrupted : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Another rank refused to start (Distributed::refuse): `why` is what it said, after a
// character that gives its exit code ('2': its flags, say).
struct RankRefused : std::runtime_error {
  RankRefused(const std::string& what, int rank, std::string why)
      : std::runtime_error(what), rank(rank), why(std::move(why)) {}
  int rank;
  std::string why;
};

// A process group of `world` processes. Collectives must be called in the same order by
// every rank; each call throws PeerLost when a peer has gone or the timeout passes.
class Distributed {
 public:
  // backend: "gloo" or "nccl" (tensors on the GPU of LOCAL_RANK). Waits at the rendezvous
  // up to config.timeout for the other ranks; throws Interrupted when *stop is set meanwhile,
  // once it has told the ranks there, with the signal *signal names (SIGINT without one).
  Distributed(const DistConfig& config, const std::string& backend, const std::atomic<bool>* stop = nullptr,
              const std::atomic<int>* signal = nullptr);
  // One not closed aborts its collectives (NCCL's communicators): it is leaving on an error,
  // its peers may be gone, and waiting for them could hang.
  ~Distributed();
  // Where the ranks part as planned (after the last collective of a run, or of a start that
  // the ranks agreed not to train): waits until every collective this rank started has
  // delivered its part, then tears the group down, as PyTorch's destroy_process_group. A
  // rank that leaves first must not abort the others' last collective, which NCCL's
  // destructor otherwise does (with a warning that destroy_process_group was not called).
  // Nothing may use the group after it (GradientReducer included).
  void close();
  // What watch_stops has seen posted at the rendezvous.
  struct Stops {
    std::atomic<bool> any{false};     // a stop, this rank's or another's
    std::atomic<bool> others{false};  // another rank's stop
    std::atomic<int> signal{0};       // what they were asked by (SIGTERM before SIGHUP before SIGINT; 0: none known)
  };
  // From here until close or destruction, every 100 ms: posts this rank's stop (*mine set,
  // by its signal) to the rendezvous, and sets `seen`'s fields as the stops are posted. Rank
  // 0's evaluation stops on `any`, where a signal to a rank waiting for it at a barrier waited
  // for its end (minutes of ImageNet on a CPU); and a rank that loses another it knows was
  // asked to stop (a second signal ends one at once) ends by `signal`, as an interrupted run.
  void watch_stops(const std::atomic<bool>* mine, Stops* seen);
  // Tells the other ranks at the rendezvous that this one cannot start (its flags, its data,
  // its outputs), so that they stop at once, where they would wait for it until the timeout:
  // their constructor throws RankRefused with `why`. Returns within `grace` (rank 0 keeps
  // the rendezvous open until then, or until every other rank has read it); does nothing
  // where there is no rendezvous to reach.
  static void refuse(const DistConfig& config, const std::string& why, std::chrono::milliseconds grace,
                     const std::atomic<bool>* stop = nullptr);
  Distributed(const Distributed&) = delete;
  Distributed& operator=(const Distributed&) = delete;

  int rank() const { return config_.rank; }
  int world() const { return config_.world; }
  const std::string& backend() const { return backend_; }

  // In place: every rank gets rank `root`'s tensors (any shapes; sent as one flat buffer per dtype).
  void broadcast(std::vector<at::Tensor> tensors, int root = 0);
  // In place: the sum over ranks.
  void allreduce_sum(std::vector<at::Tensor> tensors);
  // Sums of a few numbers over ranks (loss, bytes, images/s), through one float64 tensor.
  std::vector<double> sum(const std::vector<double>& values);
  // Every rank's string, in rank order (a few kilobytes at most: it travels as int32s).
  std::vector<std::string> all_gather(const std::string& mine);
  void barrier();

  // Averages the gradients of `params` across ranks while backward runs: buckets of about
  // `bucket_bytes`, in reverse parameter order (the order backward produces gradients).
  std::unique_ptr<GradientReducer> reducer(const std::vector<at::Tensor>& params, int64_t bucket_bytes = 25 << 20);

  struct Impl;

 private:
  void join(const std::string& who, const std::string& at, const std::string& hint);
  // Stopped at the rendezvous: "s<signal>" posted as this rank's refusal, on its store if it has
  // one, and kept up for the others to read (3 s at most); returns the Interrupted to throw.
  Interrupted stopped(const std::string& who);

  DistConfig config_;
  std::string backend_;
  const std::atomic<bool>* stop_;  // read at the rendezvous (join) only
  const std::atomic<int>* signal_;
  std::unique_ptr<Impl> impl_;
  bool closed_ = false;
};

// For a process that ends at once (a second signal, blpa-train's take_signals): posts its stop
// at the rendezvous now, where watch_stops would within 0.1 s, and waits 0.25 s for the other
// ranks' watches to read it, so that losing this rank ends them as interrupted, by its signal,
// not as failed. Two signals 0.05 s apart ended a rank before its stop was posted. Returns at
// once where no watch runs (one process).
void post_stop_now() noexcept;

class GradientReducer {
 public:
  ~GradientReducer();
  // Only the backward after enable(true) reduces (gradient accumulation: the last part).
  void enable(bool on);
  // After backward: launches what is left, waits for every bucket and writes the averages
  // into the parameters' .grad. Throws when a collective failed.
  void finish();

  struct State;

 private:
  friend class Distributed;
  explicit GradientReducer(std::shared_ptr<State> s);
  std::shared_ptr<State> state_;
};

}  // namespace blpa
