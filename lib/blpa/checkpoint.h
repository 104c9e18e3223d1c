// Checkpoints and exported weights on disk: written atomically with every write error
// reported (a full disk included), read back only after every record has passed its CRC,
// and holding finite numbers only.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>

#include "blpa/resnet.h"

namespace blpa {

// A file that cannot be used: unreadable, damaged, not a blpa checkpoint, or holding
// non-finite numbers. The message names the file and what failed.
struct CheckpointError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The file that writing `path` fills: `path` itself, or, where it is a symbolic link, the end of
// its chain of links (which need not exist yet). Outputs are written through links, which stay.
std::string link_target(const std::string& path);

// Files that exist only while a run runs: AtomicFile's temporaries and blpa-train's lock
// files, held from creation to removal. remove_transient_files() removes those held, for a
// process that a signal ends next (blpa-train's second SIGINT), so that it leaves its outputs
// and no litter (a half-written checkpoint's temporary can be as large as the checkpoint).
// Callers of hold_transient() then wait for ever: the process must end right after it.
void hold_transient(const std::string& path);
void release_transient(const std::string& path);
void remove_transient_files() noexcept;

// Writes `path` all or nothing: the bytes go to `path`.tmp, which is flushed to disk and
// renamed over `path` by commit(). A write error (ENOSPC, EFBIG, EIO...) is remembered and
// reported by commit() with the path and the reason; a writer destroyed before a successful
// commit() removes the temporary file, so a failure leaves neither a half file nor litter.
// Where `path` is a symbolic link, the file it names is written (link_target), and the link
// stays.
class AtomicFile {
 public:
  explicit AtomicFile(std::string path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  // Always returns n: LibTorch's zip writer cannot recover from a short write (its destructor
  // then throws again during unwinding, which aborts the program), so the first error is kept,
  // later bytes are dropped, and commit() reports it.
  size_t write(const void* data, size_t n);
  void write(const std::string& s) { write(s.data(), s.size()); }
  // Flush, fsync, rename, fsync of the directory. Throws std::runtime_error on failure.
  void commit();

 private:
  std::string shown_, path_, tmp_;  // the path as given (for messages), the file written, beside it
  int fd_ = -1;
  int error_ = 0;  // errno of the first failure
};

// Checks, before any work, that `path` can be written where it is: its folder exists (it is
// created if missing) and takes a new file. `atomic`: written through AtomicFile, so `path`
// must be a regular file or absent; otherwise (a log) it may also be a device or a pipe.
// `flag` names the option in errors, which are thrown as std::invalid_argument. `write`
// false (--print-config): the same checks without creating anything, from the folders'
// permissions alone.
void check_output_path(const std::string& path, const std::string& flag, bool atomic, bool write = true);

// Every record of a zip archive written by LibTorch against the CRC-32 in its central
// directory (LibTorch's own reader skips this check), and every pickle against what LibTorch's
// pickler writes: its lengths, memo indices and storages within what the file holds (the
// unpickler allocates and reads what they say). Throws CheckpointError naming the file and the
// first record that fails.
void verify_archive(const std::string& path);

// The training run a checkpoint continues, besides the weights and optimiser state.
struct RunState {
  int64_t iteration = 0;      // iterations completed
  bool pending_eval = false;  // an evaluation due at `iteration` was interrupted: run it first
  // The log window open at `iteration` (iterations, summed loss, seconds), so that the
  // resumed run's first record covers every iteration since the last one logged.
  int64_t window_iters = 0;
  double window_loss = 0, window_seconds = 0;
};

// A blpa-train checkpoint, opened and checked: its CRCs, format and header.
struct Checkpoint {
  std::string path;
  std::string identity;                       // TrainConfig::identity() of the run
  std::map<std::string, std::string> config;  // TrainConfig::describe()'s key=value lines
  NetConfig net;                              // the network it holds
  int64_t train_subset = 0;                   // training images the run used (its first N; 0: all)
  // What autograd stored and the step's peak, in bytes, as the run last measured them (none in
  // a checkpoint from before 2026-12-02, or of a run that had trained no iteration).
  std::optional<int64_t> stored_activation_bytes, peak_bytes;
  // The run's training time up to this checkpoint, in milliseconds, summed over the processes
  // that trained it (none in a checkpoint from before 2026-12-02).
  std::optional<int64_t> run_train_ms;
  // ImageNet: the list indices of the training images that could not be decoded so far.
  std::vector<int64_t> decode_failed;
  RunState state;
  std::shared_ptr<torch::serialize::InputArchive> archive;
};

// Opens and checks a checkpoint (CRCs, format, header); loads no weights yet.
Checkpoint read_checkpoint(const std::string& path);
// The items of one of its settings that is a comma-separated list (steps=, decode_failed=),
// an empty item kept: "" has none, "1,,2" three.
std::vector<std::string> split_list(const std::string& list);
// The network of a checkpoint with its weights and statistics, in evaluation mode, on the
// CPU. Refuses weights or statistics that are not finite. Its tensors are the archive's
// (LibTorch's Module::load sets them to what it reads): two models loaded from one
// Checkpoint share them, so read the checkpoint again for an independent copy.
ResNet load_model(const Checkpoint& c);
// Weights and statistics into `model`, and the optimiser state into `optimizer`.
void load_training_state(const Checkpoint& c, ResNet& model, torch::optim::Optimizer& optimizer);

// Writes a checkpoint atomically. `identity` and `config` are TrainConfig::identity() and
// describe(). The caller checks that the weights are finite (all_finite) first.
void save_checkpoint(const std::string& path, const std::string& identity, const std::string& config,
                     const RunState& state, ResNet& model, torch::optim::Optimizer& optimizer);

// True when every parameter, buffer and optimiser state tensor is finite.
bool all_finite(ResNet& model, torch::optim::Optimizer* optimizer = nullptr);

// The weights and BatchNorm statistics as a dict of tensors in torch.save's zip format, so
// Python's torch.load reads it (names as in named_parameters / named_buffers). Atomic.
// `run_id` (TrainConfig::run_id), if given, goes in a record of its own, "blpa_run_id".
void export_state_dict(const std::string& path, ResNet& model, const std::string& run_id = "");
// The run id an export holds; "" for none (an export of another program or before run ids),
// nullopt for a file that is not a zip archive.
std::optional<std::string> exported_run_id(const std::string& path);
// Why the file at `path` may not be replaced by an export of run `run_id` ("" for a checkpoint
// from before run ids) of network `net`, as "is ..." words ("is a folder"); "" where it may: an
// export holding that same run id or, for a run without one, a dict of tensors with `net`'s
// names and shapes (its export from before run ids, as far as can be told). Any other file
// without a run id (a state dict saved with torch.save, a checkpoint) is not replaced.
std::string export_not_replaceable(const std::string& path, const std::string& run_id, const NetConfig& net);

}  // namespace blpa
