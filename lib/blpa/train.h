// The training loop of blpa-train (SGD with momentum, the paper's schedule, periodic
// evaluation, JSON-lines log, atomic checkpoints that resume the identical run).
#pragma once

#include <atomic>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "blpa/distributed.h"
#include "blpa/imagenet.h"
#include "blpa/resnet.h"
#include "blpa/unit.h"

namespace blpa {

struct Checkpoint;  // blpa/checkpoint.h

struct TrainConfig {
  // Data
  std::string dataset = "auto";  // auto | cifar10 | cifar100 | cifar100-coarse | fashion-mnist | mnist | imagenet
  std::string data_dir;          // empty: Debian's Fashion-MNIST; imagenet: the folder holding train/ and val/
  std::string index_cache;       // imagenet: where the scanned file lists are cached (empty: no cache)
  std::string train_list, val_list;  // imagenet from list files ("relative/path,label"), instead of folders
  int64_t train_subset = 0;      // use the first N training samples (0: all; imagenet: N spread over all classes)
  int64_t test_subset = 0;       // evaluate on the first N test samples (0: all; imagenet: likewise)
  bool augment = true;
  // Model
  std::string arch = "cifar";
  int depth = 164;
  ModeConfig mode{Mode::blpa, 4};
  std::string precision = "auto";      // fp32 | tf32 | bf16 | auto (tf32 on CUDA, fp32 on the CPU)
  std::string memory_format = "auto";  // nchw | nhwc | auto (default_layout of the device and precision)
  // Optimisation (defaults: the paper's CIFAR protocol)
  int64_t batch = 128;
  int64_t accum_steps = 1;  // the batch is processed in this many equal parts, one update
  int64_t iterations = 64000;
  double lr = 0.1;
  int64_t warmup = 400;  // iterations at warmup_lr before lr
  double warmup_lr = 0.01;
  std::vector<int64_t> steps{32000, 48000};
  double factor = 0.1;
  double momentum = 0.9;
  double weight_decay = 2e-4;  // conv and linear weights only
  // Running
  std::string device = "cpu";
  std::string cuda_graphs = "auto";  // auto | on | off: replay each iteration as a CUDA graph
  uint64_t seed = 0;
  int threads = 0;  // LibTorch intra-op threads (0: its default)
  int workers = 0;  // data threads (0: default_workers)
  int prefetch = 4;
  int64_t log_every = 50;
  int64_t eval_every = 2000;  // 0: only at the end
  std::string checkpoint;     // path; empty: no checkpoints
  int64_t checkpoint_every = 1000;
  bool resume = false;
  bool auto_resume = false;  // resume where `checkpoint` exists, else start a new run (train() decides)
  bool overwrite = false;    // a fresh run may replace an existing checkpoint, log, export, summary
  std::string log_path;      // JSON lines; empty: none
  std::string export_path;   // a state dict for Python's torch.load, written at the end
  std::string summary_path;  // one JSON object when the run ends (done, interrupted or diverged)
  bool progress = true;      // the live progress line on stderr
  // Data parallelism (world > 1): one process per device; --batch is per rank. Only rank 0
  // writes the log and checkpoints; every rank resumes from the same checkpoint.
  DistConfig dist;
  // Names the run (16 hex digits): drawn when it starts, kept by its checkpoints, written in
  // its log and summary and export, so that --resume refuses another run's files. Set by
  // train(); empty for a run that has not started, and in checkpoints older than it.
  std::string run_id;

  double lr_at(int64_t iteration) const;
  // The fields a checkpoint must agree on to be resumed: they define the model, the data
  // and its order, and the meaning of the optimiser state. The other settings may change on
  // --resume, and then take effect.
  static const std::vector<std::string>& identity_keys();
  std::string identity() const;
  // What every rank of a data-parallel run must agree on: the identity, the schedule, the
  // optimiser, and the iterations at which ranks meet (log, evaluation, checkpoint). Where they
  // train, the checkpoint each resumes from too (join_ranks adds it).
  std::string rank_agreement() const;
  // Every field, one "key=value" per line (stored in checkpoints and logged).
  std::string describe() const;
  // The same as a JSON object, numbers as numbers (the log's config record, the summary).
  std::string json() const;
  // Throws FlagError for values that make no sense, or make no sense together.
  void validate() const;
  // precision and memory_format with "auto" replaced by what it means on `device`.
  void resolve_numerics();
  // Every "auto" replaced by what this run will use, as train() does before it starts: the
  // data set (--data-dir's files looked at), the device's index on a rank, precision and
  // layout, the data threads. Throws FlagError (or runtime_error for a folder holding no data
  // set); checks neither the device nor the files further.
  void resolve();
  // After resolve(): FlagError where this machine lacks the device, as train() refuses it
  // (--print-config says so too).
  void check_device() const;
  // The network's setting (after resolve_numerics).
  Numerics numerics() const;
};

// A command line that cannot run as given: the programs exit with 2.
struct FlagError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

struct TrainResult {
  int64_t iteration = 0;  // iterations completed
  bool interrupted = false;
  // Several ranks: the signal that stopped them, as the ranks told each other (SIGTERM before
  // SIGHUP before SIGINT where several were sent); 0 where none was told.
  int stop_signal = 0;
  int64_t dropped_log_records = 0;  // --resume: records of iterations past the checkpoint's, removed
  double last_loss = std::numeric_limits<double>::quiet_NaN();  // NaN: this process trained no iteration
  double test_loss = 0, test_acc = 0, test_top5 = 0;  // last evaluation
  bool evaluated = false;  // this process evaluated: the test figures are its last evaluation's
};

struct EvalResult {
  double loss = 0, top1 = 0, top5 = 0;
  int64_t count = 0;   // images evaluated
  int64_t failed = 0;  // images that could not be decoded (left out)
  bool interrupted = false;  // stopped early by a signal: the figures are incomplete
  Numerics numerics;  // evaluate_checkpoint: the precision and layout it ran in
  // evaluate_checkpoint: the checkpoint's iteration and run id ("" before run ids existed),
  // which tell a finished run's checkpoint from one stopped part-way in a table of scores.
  int64_t iteration = -1;
  std::string run_id;
};

struct ImageEvalOptions {
  int64_t batch = 64;
  int resize_short = 256, crop = 224;
  bool ten_crop = false;  // the 4 corners and the centre, and their mirrors; softmax averaged
  int workers = 4;
  std::string device = "cpu";
  std::string precision = "auto", memory_format = "auto";  // numerics_for's names
  bool progress = false;
  const std::atomic<bool>* stop = nullptr;  // polled after every batch: stops early when true
};

// Each image's log class probabilities from the network's outputs (N x views rows, the views
// of an image together): the log of its views' mean probability, made without forming
// probabilities that underflow. What blpa-eval scores and blpa-predict ranks.
torch::Tensor log_class_probs(const torch::Tensor& logits, int64_t views);
// The k best of each row's scores (values, classes), best first, equal scores in class order:
// topk's order among equals is unspecified, and bf16 logits tie often, so that blpa-eval's
// top-1 and blpa-predict's first class could differ.
std::pair<torch::Tensor, torch::Tensor> top_classes(const torch::Tensor& scores, int64_t k);

// Top-1/top-5 of a model on a list of JPEGs (ImageNet validation protocol).
EvalResult evaluate_images(ResNet& model, const data::ImageList& list, const ImageEvalOptions& options);

// $XDG_CACHE_HOME/blpa, else ~/.cache/blpa: where the ImageNet file lists are cached.
std::string default_cache_dir();

// The data threads that --workers 0 stands for: 2 for data sets held in memory; for
// imagenet this machine's cores shared by its `local_world` processes, 1 to 16 each.
int default_workers(const std::string& dataset, int local_world);

// The most --threads and --workers take: beyond any machine's cores (100,000 threads crashed
// in OpenMP, 100,000 workers in std::thread).
constexpr int kMaxThreads = 1024, kMaxWorkers = 256;
// --threads n as every program takes it: 0 (LibTorch's default) to kMaxThreads, else FlagError.
inline void check_threads(int n) {
  if (n < 0 || n > kMaxThreads)
    throw FlagError("--threads must be 0 (LibTorch's default) to " + std::to_string(kMaxThreads));
}

// Evaluates the network stored in a blpa-train checkpoint on its data set's test split
// (ImageNet: val/, centre crop or 10 crops as `options` say).
struct CheckpointEval {
  std::string checkpoint;
  std::string data_dir;     // empty: the one the checkpoint was trained on
  std::string index_cache;  // imagenet only
  std::string val_list;     // imagenet: a list file instead of <data_dir>/val
  int64_t subset = 0;       // 0: all test images
  ImageEvalOptions options;
  // The ImageNet-only flags given (--ten-crop, --val-list, --resize, --crop): refused, with
  // FlagError, for a checkpoint of another data set.
  std::vector<std::string> imagenet_flags;
};
EvalResult evaluate_checkpoint(const CheckpointEval& e);

// The data folder for blpa-eval and blpa-predict: `given` (their --data-dir), else the one the
// checkpoint's run was trained on (Fashion-MNIST's for a run from before it was recorded),
// which must still be there: a runtime_error says to give --data-dir. For an MNIST or
// Fashion-MNIST run it warns where the folder's images look like the other's.
std::string checkpoint_data_dir(const Checkpoint& ck, const std::string& given);

// The class names (ImageNet's folders) in the order the checkpoint's run numbered them; empty
// for data sets without named folders and for checkpoints from before they were recorded.
std::vector<std::string> checkpoint_classes(const Checkpoint& ck);

// The precision an evaluation of a checkpoint runs in: `requested` (numerics_for's names), or
// for "auto" the one the network was trained in, `trained` (the checkpoint's "precision"; empty
// for one from before --precision: the device's default), so that blpa-eval and blpa-predict
// give the scores of the training log. tf32, a CUDA precision, is fp32 on the CPU.
std::string eval_precision(const std::string& requested, const std::string& trained, const torch::Device& device);
// The layout likewise: `requested`, or for "auto" the checkpoint's "memory_format", `trained`
// (empty for one from before --memory-format, which ran in NCHW). blpa-train's --resume too.
std::string eval_layout(const std::string& requested, const std::string& trained);
// Both, for checkpoint `ck`'s network evaluated on `device` (blpa-eval's and blpa-predict's).
Numerics eval_numerics(const ImageEvalOptions& o, const Checkpoint& ck, const torch::Device& device);

// Forward and backward of a batch in `steps` equal parts, each part's mean loss weighted by
// 1/steps, so the accumulated gradient equals the whole batch's up to BatchNorm, whose
// statistics are those of each part. Returns the batch's mean loss. `stored_bytes`: what
// autograd kept for the first part.
// With a reducer, the last part's backward averages the gradients across ranks.
double accumulate_gradients(ResNet& model, const torch::Tensor& x, const torch::Tensor& y, int64_t steps,
                            int64_t* stored_bytes = nullptr, GradientReducer* reducer = nullptr);

// blpa-train's optimiser for `model`: SGD at the schedule's first learning rate with
// config's momentum, and weight decay on convolution and linear weights only (tensors of rank
// > 1), not on gamma, beta or biases. A checkpoint's optimiser state loads into it.
torch::optim::SGD make_optimizer(ResNet& model, const TrainConfig& config);

// --resume: `config.checkpoint`'s header, read and checked (CheckpointError) before any data
// loads. --precision auto (as `given`) becomes the checkpoint's precision where this device
// has it, and `config` (resolved) must match the checkpoint's run in its identity (FlagError
// naming the settings that differ). On rank 0 (`lead`), its outputs must be the checkpoint's
// run's (check_outputs_are_the_runs) and, with --auto-resume, the run must not be one that
// would diverge again (refuse_diverged_rerun). The other settings that differ (they take
// effect) are logged after these checks, not before one of them refuses the resume.
Checkpoint read_resumed_checkpoint(TrainConfig& config, const TrainConfig& given, bool lead);

// --print-config: the checks train() makes of its outputs before it loads anything, made
// without creating, probing or locking a file: no other run holds one (std::runtime_error,
// exit 1), a fresh run replaces none unless told to, each can be written where it goes
// (FlagError). Then, for --resume, that the log, summary and export given are `resumed`'s
// run's (FlagError).
void check_outputs_unwritten(const TrainConfig& config);
void check_outputs_are_the_runs(TrainConfig config, const Checkpoint& resumed);

// --auto-resume: a run whose --summary says it diverged would diverge again from its last
// checkpoint with the settings it diverged with, so a sweep run again does not retry it:
// NonFiniteLoss (exit 3, at once). With a learning-rate setting changed it resumes. One that
// diverged before its first checkpoint (config.resume false) has nothing to resume: the same.
void refuse_diverged_rerun(const TrainConfig& config);

// --auto-resume without a checkpoint: where the --summary says this run (its identity and
// --iterations) is done, its checkpoint was deleted and there is nothing to do: RunComplete
// (exit 0), with a warning for training settings that differ from the summary's.
void skip_completed_rerun(const TrainConfig& config);

// Error thrown when the loss, or the weights after an update, stop being finite: training
// stops and the last checkpoint, which held finite numbers, is kept.
struct NonFiniteLoss : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Thrown where a stop (`stop`, on any rank) ends the run other than after a step: a new run
// stopped before it wrote anything (its --overwrite has replaced nothing, and there is no
// checkpoint to resume), or, with several ranks, the loss of another rank that was asked to
// stop (a second signal ends one at once) before they stopped together (rank 0's last
// checkpoint is kept, and the summary says "interrupted"). blpa-train ends by the signal:
// this process's, else `signal`, the one another rank was sent (0: not known).
struct Stopped : std::runtime_error {
  Stopped(const std::string& what, int signal) : std::runtime_error(what), signal(signal) {}
  int signal;
};

// Thrown by --resume of a run that has trained all its iterations and evaluated: nothing is
// done, and blpa-train exits with 0, so that a sweep run again skips the runs it finished.
struct RunComplete : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// `s` as a JSON string: quoted, with quotes, backslashes and control characters escaped, and
// each byte that is no part of a UTF-8 character (a path in another encoding) as U+FFFD.
std::string json_string(const std::string& s);

// The message of an exception for a user: LibTorch's errors without their C++ backtrace,
// unless BLPA_DEBUG=1 is set in the environment.
std::string error_message(const std::exception& e);
// Unless BLPA_DEBUG=1: LibTorch's own log is silent. Its errors reach the user as exceptions
// (one line each, through error_message), while its log lines carry C++ backtraces (c10d's
// rendezvous prints one per attempt). Also sends blpa's own messages (spdlog) to stderr.
// Called first by each program.
void quiet_library_log();

// The summary of an interruption, kept ready for a signal: train() renders it before the
// first iteration, at each log record and evaluation, and after the first iteration a second
// or more after the last rendering; write(), from another thread (blpa-train's signal
// thread), puts the latest one in --summary, so that a run stopped at once by a second signal
// still has one.
class SummaryDraft {
 public:
  // Atomic (AtomicFile); does nothing before the first draft or once the run writes its own
  // summary, which it then never replaces.
  void write() noexcept;

  // For train(): where the summary goes, a new draft, and the end of drafts.
  void open(const std::string& path);
  void publish(std::string text);
  void close();

 private:
  std::mutex mutex_;  // write() runs on another thread than the others
  std::string path_, draft_;
  bool open_ = false;
};

// Runs (or resumes) training. `stop` is polled after every step: when it turns true a
// checkpoint is written and the function returns with interrupted = true. `draft`, when
// given, is kept up to date with the summary of an interruption. `signal`, when given, is the
// signal behind `stop`, which the ranks tell each other (TrainResult::stop_signal).
TrainResult train(const TrainConfig& config, const std::atomic<bool>* stop = nullptr, SummaryDraft* draft = nullptr,
                  const std::atomic<int>* signal = nullptr);

}  // namespace blpa
