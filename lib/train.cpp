// The training loop of blpa-train: data, network and optimiser set up (or resumed), iterations
// (eager or replayed as a CUDA graph, on one rank or several), evaluations, checkpoints, and
// the run's end, whole or stopped. Its files are run_files.cpp's; its settings,
// train_config.cpp's; its evaluations, evaluation.cpp's.
#include "blpa/train.h"

#include <signal.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fmt/format.h>
#include <iterator>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <thread>
#include <c10/util/Logging.h>
#include <torch/torch.h>

#include "blpa/checkpoint.h"
#include "blpa/dataset.h"
#include "blpa/formats.h"
#include "blpa/imagenet.h"
#include "blpa/loader.h"
#include "blpa/memory.h"
#include "blpa/resnet.h"
#include "blpa/step.h"
#include "train_parts.h"

namespace blpa {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

// A message as a sentence: with its full stop.
std::string sentence(std::string m) { return m.empty() || std::strchr(".!?", m.back()) ? m : m + "."; }

// The progress line's ETA: "1h05m", "3m07s" ("?" where unknown).
std::string duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const int64_t t = static_cast<int64_t>(s);
  return t >= 3600 ? fmt::format("{}h{:02d}m", t / 3600, t / 60 % 60) : fmt::format("{}m{:02d}s", t / 60, t % 60);
}

double unix_time() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// A loss for a JSON record: NaN and Inf, which JSON has no words for, are null.
std::string json_loss(double v) { return std::isfinite(v) ? fmt::format("{:.6g}", v) : "null"; }

// A non-finite loss in words: NaN (whatever its sign bit, which fmt prints as "-nan"), Inf, -Inf.
std::string non_finite(double v) { return std::isnan(v) ? "NaN" : v > 0 ? "Inf" : "-Inf"; }

bool debugging() {
  const char* debug = std::getenv("BLPA_DEBUG");
  return debug && *debug && std::string(debug) != "0";
}

}  // namespace

void quiet_library_log() {
  // Messages (progress, warnings, errors) go to stderr, as flag errors and the progress line
  // do; stdout is left to what a program prints as its result (JSON lines, --help).
  spdlog::set_default_logger(
      std::make_shared<spdlog::logger>("", std::make_shared<spdlog::sinks::stderr_color_sink_mt>()));
  if (debugging()) return;
  FLAGS_caffe2_log_level = 3;  // c10's FATAL: its errors reach the user as exceptions anyway
  c10::UpdateLoggingLevelsFromFlags();
}

std::string error_message(const std::exception& e) {
  if (debugging()) return e.what();
  if (const auto* c = dynamic_cast<const c10::Error*>(&e)) return c->what_without_backtrace();
  return e.what();
}

double accumulate_gradients(ResNet& model, const torch::Tensor& x, const torch::Tensor& y, int64_t steps,
                            int64_t* stored_bytes, GradientReducer* reducer) {
  TORCH_CHECK(steps >= 1 && x.size(0) % steps == 0, "the batch (", x.size(0), ") must split into ", steps,
              " equal parts");
  const int64_t part = x.size(0) / steps;
  torch::Tensor total = torch::zeros({}, x.options().dtype(torch::kFloat));
  for (int64_t j = 0; j < steps; ++j) {
    auto xj = x.narrow(0, j * part, part), yj = y.narrow(0, j * part, part);
    const int64_t before = memory::allocated(x.device());
    auto out = model->forward(xj);
    if (j == 0 && stored_bytes)
      *stored_bytes = memory::allocated(x.device()) - before - static_cast<int64_t>(out.nbytes());
    // Each part's mean loss weighs 1/steps: the gradient is that of the whole batch's mean.
    auto loss = torch::nn::functional::cross_entropy(out, yj) / static_cast<double>(steps);
    if (reducer && j == steps - 1) reducer->enable(true);
    loss.backward();
    total += loss.detach();
  }
  if (reducer) {
    reducer->finish();
    reducer->enable(false);
  }
  return total.item<double>();  // read once backward is queued: no stall between the parts
}

torch::optim::SGD make_optimizer(ResNet& model, const TrainConfig& config) {
  std::vector<torch::Tensor> decay, no_decay;
  for (auto& p : model->parameters()) (p.dim() > 1 ? decay : no_decay).push_back(p);
  auto opts = [&](double wd) {
    return std::make_unique<torch::optim::SGDOptions>(
        torch::optim::SGDOptions(config.lr_at(0)).momentum(config.momentum).weight_decay(wd));
  };
  return torch::optim::SGD({torch::optim::OptimizerParamGroup(decay, opts(config.weight_decay)),
                            torch::optim::OptimizerParamGroup(no_decay, opts(0.0))},
                           torch::optim::SGDOptions(config.lr_at(0)).momentum(config.momentum));
}

namespace {

// What a setting that ranks compare is, for the message of ranks that differ: the flag that
// sets it, or what it is (the settings of a checkpoint resumed, or of the training data).
std::string agreement_name(const std::string& key) {
  static const std::map<std::string, std::string> names{
      {"arch", "--model"},
      {"augment", "augment (--no-augment)"},
      {"factor", "--lr-factor"},
      {"mode", "--mode (--bits, --window, --lift)"},
      {"momentum_buffers", "momentum buffers in the checkpoint"},
      {"resume", "resume (true: from its --checkpoint, false: a new run)"},
      {"run_id", "run of the checkpoint"},
      {"start", "iteration of the checkpoint"},
      {"steps", "--lr-steps"},
      {"train_data", "training data (hash of its pixels and labels)"},
      {"train_images", "training images"},
      {"train_index", "training list (hash of its paths and labels)"},
      {"world", "--world-size"}};
  const auto at = names.find(key);
  if (at != names.end()) return at->second;
  std::string flag = "--" + key;
  std::replace(flag.begin(), flag.end(), '_', '-');
  return flag;
}

// Every rank must train the same run; a rank whose settings differ stops them all, each
// naming the settings that differ and what makes them agree.
void agree_across_ranks(Distributed& dist, const std::string& mine) {
  const auto all = dist.all_gather(mine);
  auto tokens = [](const std::string& s) {
    std::map<std::string, std::string> kv;
    std::istringstream in(s);
    for (std::string t; in >> t;)
      if (const auto eq = t.find('='); eq != std::string::npos) kv[t.substr(0, eq)] = t.substr(eq + 1);
    return kv;
  };
  const auto lead = tokens(all[0]);
  std::string diffs;
  bool checkpoints = false, data = false, flags = false;
  auto is = [](const std::map<std::string, std::string>& kv, const char* key, const char* value) {
    const auto at = kv.find(key);
    return at != kv.end() && at->second == value;
  };
  for (size_t r = 1; r < all.size(); ++r) {
    if (all[r] == all[0]) continue;
    const auto theirs = tokens(all[r]);
    // resume: --resume given to one rank only (its flags), or --auto-resume, given to both (it
    // words the remedy only: ranks may mix it with --resume), finding a checkpoint on one (its
    // copy); the iteration and run of the checkpoint that one of them has not, 0 and none, say
    // nothing more.
    const bool one_resumes = lead.count("resume") && theirs.count("resume") && lead.at("resume") != theirs.at("resume");
    const bool both_auto = is(lead, "auto_resume", "true") && is(theirs, "auto_resume", "true");
    for (const auto& [key, value] : theirs)
      if (!lead.count(key) || lead.at(key) != value) {
        if (key == "auto_resume" || (one_resumes && (key == "start" || key == "run_id"))) continue;
        diffs += fmt::format("\n  {}: rank 0 {}, rank {} {}", agreement_name(key), lead.count(key) ? lead.at(key) : "?",
                             r, value);
        const bool checkpoint = key == "resume" || key == "start" || key == "run_id" || key == "momentum_buffers";
        const bool images = key == "train_images" || key == "train_data" || key == "train_index";
        checkpoints = checkpoints || checkpoint, data = data || images;
        flags = flags || (key == "resume" && !both_auto) || (!checkpoint && !images);
      }
  }
  if (diffs.empty()) return;
  std::vector<std::string> remedies;
  if (flags) remedies.push_back("give every rank the same flags");
  // --auto-resume decides on each rank: one whose copy of the checkpoint is missing starts afresh.
  if (checkpoints)
    remedies.push_back("give every rank's --checkpoint a copy of rank 0's (the same file at the same iteration), "
                       "or resume none");
  if (data) remedies.push_back("give every rank the same training data");
  dist.close();  // every rank read every other's settings: each stops on the same difference
  throw FlagError(fmt::format("rank {} of {}: the ranks were started with different settings:{}\n{}", dist.rank(),
                              dist.world(), diffs, fmt::join(remedies, "; ")));
}

// For the tests of what a failure part-way leaves: BLPA_TEST_FAIL="step:N" fails iteration N
// (counted from 1) after its forward and backward passes, before its update, as running out of
// memory in the backward pass or losing a peer in the gradients' all-reduce does;
// "eval:N" fails the evaluation after iteration N; "slow-eval:S" makes each evaluation take S
// seconds longer (a test set that takes longer than --dist-timeout); "slow-step:MS" each eager
// iteration MS milliseconds longer (signals that must come during one, whatever the machine);
// "slow-load:MS" the loading (the network built, no file of the run written yet) MS longer, or
// until a stop; "slow-checkpoint:MS" each checkpoint MS longer;
// "export:1" fails the export at the run's end.
// {"", 0}: none. Only eager iterations are failed: one replayed as a CUDA graph runs as
// captured.
std::pair<std::string, int64_t> injected_failure() {
  const char* v = std::getenv("BLPA_TEST_FAIL");
  const std::string text = v ? v : "";
  const auto colon = text.find(':');
  if (colon == std::string::npos) return {"", 0};
  return {text.substr(0, colon), std::strtoll(text.c_str() + colon + 1, nullptr, 10)};
}

// The model's buffers (BatchNorm's running statistics and counts) as they were before an
// iteration's forward pass, which updates them. An iteration that fails part-way (out of
// memory in its backward, a lost peer) is not completed, and the checkpoint then written is
// that of the last completed one: with these restored, its resume is the run without the
// failure. Copied by dtype, so a few multi-tensor kernels an iteration on CUDA.
class BufferBackup {
 public:
  explicit BufferBackup(ResNet& model) {
    for (const auto& b : model->buffers()) live_[b.scalar_type()].push_back(b);
    for (auto& [type, live] : live_)
      for (const auto& b : live) saved_[type].push_back(torch::empty_like(b));
  }
  void save() { copy(saved_, live_); }
  void restore() { copy(live_, saved_); }

 private:
  using Lists = std::map<torch::ScalarType, std::vector<torch::Tensor>>;
  static void copy(Lists& to, Lists& from) {
    torch::NoGradGuard no_grad;
    for (auto& [type, list] : to) at::_foreach_copy_(list, from.at(type));
  }
  Lists live_, saved_;
};

// The data a run trains and evaluates on: in memory (CIFAR, MNIST-style) or JPEG folders decoded
// on the fly (ImageNet), with what the checkpoints record of it.
struct TrainingData {
  bool imagenet = false;
  data::Dataset train_set, test_set;      // in memory
  data::ImageList train_list, val_list;   // imagenet
  data::Normalisation norm;
  int64_t in_channels = 3, num_classes = 0;
  int64_t n_train = 0;
  // What the checkpoints record of the data, for a resume to find the same: the training
  // images' number and a hash (ImageNet's of their paths and labels, which fix the data order;
  // a data set held in memory, of its pixels and labels), and ImageNet's class names in label
  // order.
  const char* hash_key = "";
  std::string hash, data_record;
};

// Loaded and checked against the checkpoint resumed (`resumed`, or null) and the flags; `lead`
// (rank 0) warns of what only needs saying once. Bad input found here loses nothing: no output
// has been opened yet.
TrainingData load_training_data(const TrainConfig& config, const Checkpoint* resumed, bool lead) {
  TrainingData d;
  const std::string dir = config.data_dir.empty() ? std::string(data::kDebianFashionMnist) : config.data_dir;
  auto& [imagenet, train_set, test_set, train_list, val_list, norm, in_channels, num_classes, n_train, hash_key, hash,
         data_record] = d;
  imagenet = config.dataset == "imagenet";
  if (imagenet) {
    data::ImageNetSplits splits;
    if (!config.train_list.empty()) {  // paths relative to --data-dir if given, else to each list's folder
      splits.train = read_list("--train-list", config.train_list, config.data_dir);
      splits.val = read_list("--val-list", config.val_list, config.data_dir);
      // A validation label the training labels never reach gave the network outputs never trained.
      if (splits.val.num_classes > splits.train.num_classes)
        throw std::runtime_error(fmt::format("--val-list {}: its labels go up to {}, --train-list's to {}: the network "
                                             "would be scored on classes it was never trained on",
                                             config.val_list, splits.val.num_classes - 1,
                                             splits.train.num_classes - 1));
      std::vector<bool> seen(static_cast<size_t>(splits.train.num_classes));
      for (const int64_t label : splits.train.labels) seen[static_cast<size_t>(label)] = true;
      for (int64_t i = 0; i < splits.val.size(); ++i)
        if (!seen[static_cast<size_t>(splits.val.labels[static_cast<size_t>(i)])])
          throw std::runtime_error(fmt::format("--val-list {}: {} has label {}, which no image of --train-list {} has: "
                                               "the network would be scored on a class it was never trained on",
                                               config.val_list, splits.val.paths[static_cast<size_t>(i)],
                                               splits.val.labels[static_cast<size_t>(i)], config.train_list));
      if (const auto unseen = std::count(seen.begin(), seen.end(), false); unseen > 0)
        spdlog::warn("--train-list {}: {} of its labels 0 to {} have no image (the network still has an output for "
                     "each)",
                     config.train_list, unseen, splits.train.num_classes - 1);
      splits.val.num_classes = splits.train.num_classes;
    } else {
      splits = data::load_imagenet(dir, config.index_cache, std::max(4, config.workers));
    }
    const auto classes_in = [](const data::ImageList& l) {
      return std::set<int64_t>(l.labels.begin(), l.labels.end()).size();
    };
    // Counted only for a subset: a set of ImageNet's 1.28M labels is no start-up cost to pay for nothing.
    const bool subset = config.train_subset > 0 && config.train_subset < splits.train.size();
    const size_t classes_before = subset ? classes_in(splits.train) : 0;
    train_list = data::spread_subset(std::move(splits.train), config.train_subset);
    if (lead && subset && classes_in(train_list) < classes_before)
      spdlog::warn("--train-subset {} is fewer than the {} classes with images: {} of them have none",
                   config.train_subset, classes_before, classes_before - classes_in(train_list));
    val_list = data::spread_subset(std::move(splits.val), config.test_subset);
    num_classes = train_list.num_classes;
    norm = data::imagenet_normalisation();
    spdlog::info("imagenet: {} training / {} validation images, {} classes", train_list.size(), val_list.size(),
                 num_classes);
  } else {
    train_set = subset(data::load(config.dataset, dir, true), config.train_subset);
    test_set = subset(data::load(config.dataset, dir, false), config.test_subset);
    if (train_set.images.sizes().slice(1) != test_set.images.sizes().slice(1))
      throw std::runtime_error("training and test images differ in shape");
    norm = data::channel_stats(train_set);
    in_channels = train_set.images.size(1);
    num_classes = train_set.num_classes;
    spdlog::info("{}: {} training / {} test images of {}x{}x{}, {} classes", config.dataset, train_set.size(),
                 test_set.size(), train_set.images.size(1), train_set.images.size(2), train_set.images.size(3),
                 num_classes);
  }

  // What the checkpoints record of the data, for a resume to find the same: the training
  // images' number and a hash (ImageNet's of their paths and labels, which fix the data order;
  // a data set held in memory, of its pixels and labels), and ImageNet's class names in label
  // order.
  if (imagenet && resumed) {
    const auto trained = checkpoint_classes(*resumed);
    if (!trained.empty() && trained != train_list.classes) {
      std::vector<std::string> gone, added;
      std::set_difference(trained.begin(), trained.end(), train_list.classes.begin(), train_list.classes.end(),
                          std::back_inserter(gone));
      std::set_difference(train_list.classes.begin(), train_list.classes.end(), trained.begin(), trained.end(),
                          std::back_inserter(added));
      throw FlagError(fmt::format("--resume: the training classes are not the checkpoint's{}{}: its labels would "
                                  "mean other classes; resume with the data it was trained on",
                                  gone.empty() ? "" : fmt::format(" ({} gone: {})", gone.size(), gone.front()),
                                  added.empty() ? "" : fmt::format(" ({} new: {})", added.size(), added.front())));
    }
  }
  n_train = imagenet ? static_cast<int64_t>(train_list.size()) : train_set.size();
  hash_key = imagenet ? "train_index" : "train_data";
  hash =
      fmt::format("{:016x}", imagenet ? data::list_hash(train_list) : data::content_hash(train_set));
  data_record = (imagenet ? "classes=" + class_list(train_list.classes) + "\n" : std::string()) +
                                  fmt::format("train_images={}\n{}={}\n", n_train, hash_key, hash);
  if (resumed) {
    const auto& kv = resumed->config;
    const auto images = kv.find("train_images"), recorded = kv.find(hash_key);
    if (recorded != kv.end() && recorded->second != hash)
      spdlog::warn("--resume: the training images are not the checkpoint's ({} then, {} now, or other {}): the run "
                   "continues{}, so it is not the run that would have been trained without the stop",
                   images != kv.end() ? images->second : "?", n_train,
                   imagenet ? "files or labels" : "pixels or labels",
                   imagenet ? ", but its data order is not the first run's" : " on these");
  }

  // Bad input found here loses nothing: no output has been opened yet.
  if (lead && config.train_subset > n_train)
    spdlog::warn("--train-subset {} is more than the {} training images: all are used", config.train_subset, n_train);
  if (const int64_t n_test = imagenet ? val_list.size() : test_set.size(); lead && config.test_subset > n_test)
    spdlog::warn("--test-subset {} is more than the {} {} images: all are used", config.test_subset, n_test,
                 imagenet ? "validation" : "test");
  if (lead && imagenet && config.arch == "cifar")
    spdlog::warn("a CIFAR-style network (--model cifar) on ImageNet images: --preset imagenet gives ResNet-152 and "
                 "its protocol");
  if (config.batch * config.dist.world > n_train)
    throw FlagError(fmt::format("--batch {}{} exceeds the {} training images", config.batch,
                                config.dist.world > 1 ? fmt::format(" x {} ranks", config.dist.world) : "",
                                n_train));

  return d;
}

// Several ranks: the rendezvous, where a rank that cannot start (`refused`: its flags, data
// folder, device, outputs or checkpoint) tells the others, and every rank exits as it does;
// then rank 0 says what is left (`word`: given on rank 0, as Run::finish_alone reads it; rank
// 0's on return), and the ranks' settings must agree. `start`: the iteration this rank trains
// from. `signal`: the one behind *stop, told to the others if it stops this rank here.
std::unique_ptr<Distributed> join_ranks(const TrainConfig& config, std::exception_ptr refused, int64_t start,
                                        std::string& word, const torch::Device& dev,
                                        const std::atomic<bool>* stop, const std::atomic<int>* signal) {
  // A refusal travels with its kind, so that every rank exits as the refusing one does: 2 for
  // flags, 3 for a diverged run --auto-resume skips, else 1. The refusing rank waits for the
  // others a little (they may be starting), not --dist-timeout. (A complete run is no refusal:
  // rank 0 says so after the rendezvous, as the ranks agree.)
  if (refused) {
    std::string why;
    try {
      std::rethrow_exception(refused);
    } catch (const FlagError& e) {
      why = "2" + error_message(e);
    } catch (const NonFiniteLoss& e) {
      why = "3" + error_message(e);
    } catch (const std::exception& e) {
      why = "1" + error_message(e);
    }
    const auto grace = std::min<std::chrono::milliseconds>(config.dist.timeout, std::chrono::seconds(15));
    spdlog::warn("rank {} of {} cannot start: telling the other ranks at {}:{} (up to {:g} s)", config.dist.rank,
                 config.dist.world, config.dist.master_addr, config.dist.master_port, grace.count() / 1000.0);
    Distributed::refuse(config.dist, why, grace, nullptr);  // a first signal does not cut it short: a second ends it
    std::rethrow_exception(refused);
  }
  std::unique_ptr<Distributed> dist;
  try {
    dist = std::make_unique<Distributed>(config.dist, config.dist.resolved_backend(dev.is_cuda()), stop, signal);
  } catch (const std::invalid_argument& e) {  // worlds of different sizes, a rank given twice: as flags
    throw FlagError(e.what());
  } catch (const RankRefused& e) {
    const char kind = e.why.empty() ? '1' : e.why[0];
    if (kind == 's')  // another rank was stopped there (a Ctrl-C on its machine's launcher), by this signal
      throw Stopped(fmt::format("rank {} of {}: rank {} was stopped by a signal at the rendezvous, so no "
                                           "rank trains: nothing was written",
                                           config.dist.rank, config.dist.world, e.rank),
                               std::atoi(e.why.c_str() + 1));
    if (kind == '2') throw FlagError(e.what());
    if (kind == '3') throw NonFiniteLoss(e.what());
    throw std::runtime_error(e.what());
  }
  // Resumed: the same run too. A rank that resumed another run's checkpoint at the same
  // iteration (a stale copy on one machine) took rank 0's weights below but kept its own
  // momentum, and the ranks drifted apart without a word. But a run that rank 0 finds
  // complete, or finishes alone, needs no other rank's checkpoint: a sweep that deleted the
  // copies on the other machines (or rank 0's, its summary saying done) was refused, exit 2.
  word = dist->all_gather(config.dist.rank == 0 ? word : "")[0];
  agree_across_ranks(*dist, config.rank_agreement() +
                                (word != "train" ? std::string()
                                                 : fmt::format(" auto_resume={} resume={} start={}",
                                                               config.auto_resume, config.resume, start) +
                                                       (config.resume ? " run_id=" + config.run_id : std::string())));
  spdlog::info("rank {} of {} ({}, {} backend), batch {} per rank, {} in all", config.dist.rank, config.dist.world,
               dev.str(), dist->backend(), config.batch, config.batch * config.dist.world);
  return dist;
}

// Before anything loads: the settings checked and resolved (--auto-resume decided), the outputs
// locked and checked, and for a resume the checkpoint's header read (RunComplete where nothing
// is left to do), its pending evaluation set where the run's end is still to come. `given`:
// the settings as the command line gave them. With several ranks rank 0 says why the run is
// complete in `complete`, to tell the others after the rendezvous (they cannot see its files).
std::optional<Checkpoint> begin_run(TrainConfig& config, const TrainConfig& given, OutputLocks& locks,
                                    std::string& complete) {
  const bool lead = config.dist.rank == 0;
  config.validate();
  // Resolved before --resume compares the settings: `auto` is not a change.
  config.resolve();
  if (config.warmup >= config.iterations && config.warmup_lr != config.lr && lead)
    spdlog::warn("--warmup {} is not below --iterations {}: the run trains at --warmup-lr {} throughout, never at "
                 "--lr {} (give a shorter --warmup, or --warmup 0)",
                 config.warmup, config.iterations, config.warmup_lr, config.lr);
  config.check_device();
  if (config.auto_resume) {
    // Each rank looks for itself; ranks that decide differently are stopped by their settings'
    // agreement (resume=) below. A path that cannot be looked at is no checkpoint: the output
    // checks then say why, through the rendezvous.
    std::error_code ec;
    config.resume = fs::exists(config.checkpoint, ec);
    if (lead && !config.resume) refuse_diverged_rerun(config);
    if (lead && !config.resume) {
      try {
        skip_completed_rerun(config);
      } catch (const RunComplete& e) {
        if (!config.dist.enabled()) throw;
        complete = e.what();
        return std::nullopt;
      }
    }
    if (lead && !config.resume)  // resuming: said once the checkpoint is read and checked
      spdlog::info("--auto-resume: no checkpoint {}, a new run", config.checkpoint);
  }
  if (!config.resume && config.run_id.empty()) config.run_id = draw_run_id();
  if (lead) prepare_outputs(config, locks);
  else if (config.resume && !fs::exists(config.checkpoint))
    throw FlagError("--resume: checkpoint " + config.checkpoint + " does not exist on rank " +
                    std::to_string(config.dist.rank));
  if (!config.resume) return std::nullopt;
  // The checkpoint's header first: a run that cannot resume fails before the data loads.
  Checkpoint ck = read_resumed_checkpoint(config, given, lead);
  config.run_id = ck.config.count("run_id") ? ck.config.at("run_id") : "";
  if (config.run_id.empty()) config.run_id = draw_run_id();  // a checkpoint from before run ids
  RunState& state = ck.state;
  if (state.iteration == config.iterations) {
    const EndLeft left = end_left(ck, config);
    state.pending_eval = left.evaluate;
    if (left.nothing() && lead) {  // the other ranks cannot see what rank 0's files lack
      complete = fmt::format("checkpoint {} is at iteration {}, evaluated: with --iterations {} the run is complete, "
                             "nothing to do",
                             config.checkpoint, state.iteration, config.iterations);
      if (!config.dist.enabled()) throw RunComplete(complete);
      return ck;
    }
  }
  // An output the run had and this resume forgot (a sweep's second command line): its
  // records or file would be missing without a word. Not refused: it may be meant.
  if (const auto had = ck.config.find("outputs"); lead && had != ck.config.end())
    for (const auto& [flag, path] : {std::pair<std::string, std::string>{"--log", config.log_path},
                                     {"--summary", config.summary_path},
                                     {"--export", config.export_path}})
      if (path.empty() &&
          fmt::format(",{},", had->second).find(fmt::format(",{},", flag.substr(2))) != std::string::npos)
        spdlog::warn("checkpoint {}'s run was given {}, this resume none: {}", config.checkpoint, flag,
                     flag == "--log" ? "its records from here on are not kept"
                     : flag == "--summary" ? "it writes no summary"
                                           : "it writes no export");
  return ck;
}

// Rank 0, once the data, the network and the checkpoint have all been read: the log opened (a
// resume's records after its checkpoint dropped), and a fresh run's --overwrite carried out.
// Returns the records dropped. Killed before its first checkpoint, the new run must not leave
// its log beside another run's files, which --resume would then refuse as mixed: the replaced
// run's checkpoint, summary and export go with its log.
int64_t open_log(LogFile& log, const TrainConfig& config, const RunState& state) {
  if (!config.resume && config.overwrite)
    for (const std::string& path : {config.checkpoint, config.summary_path, config.export_path})
      if (std::error_code ec;
          !path.empty() && fs::is_regular_file(path, ec) && !fs::remove(link_target(path), ec) && ec)
        throw std::runtime_error(path + ": cannot be removed for --overwrite (" + ec.message() + ")");
  if (config.log_path.empty()) return 0;
  // A log gone (deleted, or its path mistyped): the run's history would be split between
  // files without a word.
  if (std::error_code ec; config.resume && state.iteration > 0 && !fs::exists(config.log_path, ec))
    spdlog::warn("--log {} does not exist: a new log begins at iteration {}, without the run's records before it",
                 config.log_path, state.iteration);
  else if (config.resume && state.iteration > 0 && fs::is_regular_file(config.log_path, ec) &&
           fs::file_size(config.log_path, ec) == 0)
    spdlog::warn("--log {} is empty: it begins again at iteration {}, without the run's records before it",
                 config.log_path, state.iteration);
  const int64_t dropped = config.resume ? drop_records_after(config.log_path, state.iteration, state.pending_eval,
                                                             state.window_iters > 0)
                                        : 0;
  if (dropped > 0)
    spdlog::info("--log {}: {} record{} after iteration {}{} removed (the resumed run computes them again)",
                 config.log_path, dropped, dropped == 1 ? "" : "s", state.iteration,
                 state.pending_eval ? ", or of its evaluation," : "");
  log.open(config.log_path, config.resume);
  return dropped;
}

// A checkpoint loads on the CPU: its momentum buffers follow the weights to the device, in
// their layout.
void momentum_to(torch::optim::SGD& opt, const torch::Device& dev, at::MemoryFormat layout) {
  for (auto& entry : opt.state())
    if (auto* sgd = dynamic_cast<torch::optim::SGDParamState*>(entry.second.get());
        sgd && sgd->momentum_buffer().defined()) {
      const auto b = sgd->momentum_buffer().to(dev);
      // by the strides, as set_numerics lays the weights
      sgd->momentum_buffer(b.dim() == 4 && b.suggest_memory_format() != layout ? b.clone(layout) : b);
    }
}

// Every rank starts from rank 0's weights and statistics (the same seed gives the same
// initialisation, and every rank resumes from the same file; this makes sure of it).
// The momentum too, in parameter order: the run agreed (join_ranks), so every rank has the same.
// And the same training data, which the settings do not show (a copy with other labels).
void start_from_rank_0(Distributed& dist, ResNet& model, torch::optim::SGD& opt, const TrainingData& data,
                       const TrainConfig& config) {
  std::vector<torch::Tensor> weights;
  for (const auto& p : model->parameters()) weights.push_back(p.detach());
  for (const auto& b : model->buffers()) weights.push_back(b);
  for (const auto& p : model->parameters())
    if (const auto s = opt.state().find(p.unsafeGetTensorImpl()); s != opt.state().end())
      if (const auto* sgd = dynamic_cast<const torch::optim::SGDParamState*>(s->second.get());
          sgd && sgd->momentum_buffer().defined())
        weights.push_back(sgd->momentum_buffer());
  try {
    agree_across_ranks(dist, fmt::format("train_images={} {}={} momentum_buffers={}", data.n_train, data.hash_key,
                                         data.hash,
                                         weights.size() - model->parameters().size() - model->buffers().size()));
    dist.broadcast(weights);
  } catch (const PeerLost& e) {  // a rank whose data or checkpoint failed to load has stopped, or is slow
    const bool gone = std::string(e.what()).find("a rank stopped") != std::string::npos;
    throw PeerLost(fmt::format("rank {} of {}: {} ({})", config.dist.rank, config.dist.world,
                                         gone ? "another rank stopped before training began"
                                              : "another rank did not reach the start of training within "
                                                "--dist-timeout (its data still loading?)",
                                         e.what()));
  }
}

// The learning rate of checkpoint c's last iteration, by the schedule its run trained with
// (a resume may give another, which acts on the steps after): what a record of the window it
// left open says. None where the checkpoint does not record the schedule whole.
std::optional<double> checkpoint_lr(const Checkpoint& c, const TrainConfig& config) {
  if (c.state.iteration <= 0) return std::nullopt;
  TrainConfig ran = config;
  try {
    ran.lr = std::stod(c.config.at("lr"));
    ran.warmup = std::stoll(c.config.at("warmup"));
    ran.warmup_lr = std::stod(c.config.at("warmup_lr"));
    ran.factor = std::stod(c.config.at("factor"));
    ran.steps.clear();
    for (const std::string& step : split_list(c.config.at("steps"))) ran.steps.push_back(std::stoll(step));
  } catch (const std::exception&) {  // missing or not a number
    return std::nullopt;
  }
  return ran.lr_at(c.state.iteration - 1);
}

// One process's part of a run (rank 0's, or another rank's), from its start to its end: set up
// (settings, ranks, data, network, log), then its iterations with their log records,
// evaluations and checkpoints, then its export and summary; and what a failure or a signal
// leaves. train() is its one user. Its members are the run's state, as plain a struct's fields
// (no trailing underscores): the code that reads them was written, and reviewed, with them as
// the locals of one function.
class Run {
 public:
  Run(const TrainConfig& given, const std::atomic<bool>* stop, SummaryDraft* draft, const std::atomic<int>* signal)
      : given(given), stop(stop), draft(draft), signal(signal), config(given), lead(config.dist.rank == 0) {}
  TrainResult train();

 private:
  void set_up();      // everything before the first iteration: settings, ranks, data, network, log, loaders
  // The network and its optimiser, with the checkpoint's weights and state on a resume (whose
  // archive is then let go), on the device, and with several ranks rank 0's everywhere.
  void build_network(std::optional<Checkpoint>& resumed);
  void open_loaders();  // the training batches (drawn ahead by worker threads) and the evaluation
  void begin_loop();  // the loop's state, from the checkpoint's on a resume; the summary says "running"
  void iterate();     // the iterations left, with their records, evaluations and checkpoints
  // One iteration's forward, backward and update (replayed as a CUDA graph where it can be);
  // `stopping` becomes true where a rank was asked to stop.
  void step(double lr, const data::Batch& batch, bool& stopping);
  void log_window(double lr);  // the log record and progress line of the iterations since the last
  // After a failure other than divergence: the last completed iteration saved where it can be,
  // and the summary says why; throws, unless the run's end is whole (a peer lost after it).
  void fail(const std::exception& e);
  TrainResult finish();  // the export and the summary

  std::pair<double, int64_t> trained(Clock::time_point now);
  std::string render_summary(const char* status, const std::string& error);
  void write_summary(const char* status, const std::string& error = "");
  void try_summary(const char* status, const std::string& error);
  double sent(int sig);
  void told(double stops, double terms, double hups, bool mine);
  std::string lead_word(const std::string& complete) const;
  // What stops rank 0's evaluation: its own signal, or with several ranks any rank's.
  const std::atomic<bool>* eval_stop() const { return dist ? &stops_seen.any : stop; }
  // Whether another rank was asked to stop (told by the ranks' sums, or posted at the
  // rendezvous), so that losing one is an interruption, not a failure; and the signal to end
  // by where this rank was sent none.
  bool other_stop_asked() const { return stops_seen.others.load() || others_told; }
  int asked_signal() const { return result.stop_signal != 0 ? result.stop_signal : stops_seen.signal.load(); }
  void stop_before_start();
  void finish_alone(const std::string& word, const std::string& complete);
  void redraft();
  NonFiniteLoss diverged(const std::string& what, int64_t updates);
  bool evaluate_now();
  void stop_if_overflowed(bool overflowed);
  void drain();
  void checkpoint();
  std::string resumable(const std::exception& e, const char* what);

  // What train() was given.
  const TrainConfig& given;
  const std::atomic<bool>* stop;
  SummaryDraft* draft;
  const std::atomic<int>* signal;

  TrainConfig config;  // resolved (set_up)
  const bool lead;     // rank 0: writes the log, the checkpoints and the outputs
  OutputLocks locks;   // released last, after the final checkpoint, export and summary
  RunState state;      // the checkpoint's, on a resume
  std::optional<int64_t> resumed_stored, resumed_peak;  // the run's figures as its checkpoint recorded them
  std::optional<double> window_lr;  // the learning rate of the checkpoint's last step, by its settings
  // The run's training seconds before this process: its checkpoint's (unknown in one from before
  // they were recorded), 0 for a new run.
  std::optional<double> train_s_before = 0.0;
  // The training images that could not be decoded in the batches trained (the run's, from its
  // checkpoint on a resume): the log's decode_failures, whatever --prefetch made ahead.
  std::set<int64_t> decode_failed;
  torch::Device dev{torch::kCPU};
  // Several ranks: the stops asked, as the rendezvous tells them (Distributed::watch_stops), so
  // that rank 0's evaluation stops at a signal to a rank waiting for it too; and whether the
  // ranks' sums told of another rank's.
  Distributed::Stops stops_seen;
  bool others_told = false;
  std::unique_ptr<Distributed> dist;
  TrainResult result;
  LogFile log;
  TrainingData training_data;
  ResNet model{nullptr};
  std::optional<torch::optim::SGD> opt;
  std::unique_ptr<GradientReducer> reducer;
  // The inputs' normalisation, as the log, the summary and an export's user need it.
  std::string normalisation;
  // The warnings, for the batches made, ahead of training too; written by the loaders' threads,
  // so declared before the loaders, which join them when destroyed.
  data::DecodeErrors decode_errors;
  std::unique_ptr<data::TrainLoader> memory_loader;
  std::unique_ptr<data::BatchStream> image_loader;
  int64_t per_epoch = 0;
  std::function<data::Batch()> next_batch;
  std::function<EvalResult()> run_eval;

  int64_t it = 0;  // iterations completed
  bool tty = false;
  Clock::time_point run_start;
  double start_time = 0;
  int64_t first = 0;  // the iteration this process started from
  // The log window, continued from the checkpoint's when resuming.
  int64_t window_iters = 0;
  double window_loss = 0;
  Clock::time_point window_start;
  double train_seconds = 0;  // training only, without evaluations and checkpoints
  int64_t train_images = 0, stored = 0, peak_max = 0;
  // What autograd stores and the step's peak: measured by this process once it trains, and
  // until then the run's as its checkpoint recorded them (unknown, null, before they were
  // recorded), so that the summary of a resumed run that only evaluates or writes its files
  // does not say 0.
  bool stored_known = false;
  int64_t eval_iter = -1;  // the iteration of this process's last evaluation (-1: none)
  int64_t eval_images = 0, eval_failed = 0;  // its images scored, and those left out (unreadable)
  // The first window's part from before a resume: in its log record, not in this process's
  // train_s and images/s.
  double carried_seconds = 0;
  int64_t carried_iters = 0;
  int64_t last_good = -1;  // the iteration of the last checkpoint written (or resumed)
  bool pending_eval = false;
  // CUDA graphs: after a few eager iterations (cuDNN's choices, the momentum buffers), the
  // iteration is captured once and replayed. Its losses stay on the device until drain(),
  // at log time and before a checkpoint.
  bool use_graphs = false;
  std::unique_ptr<GraphedStep> graphed;
  int64_t capture_at = 0;
  // On CUDA every update is sgd_step's (the learning rate a float tensor, a few multi-tensor
  // kernels per step, as PyTorch's default SGD there): eager iterations (before the capture,
  // after a fallback, with graphs off or several ranks) update as the replayed ones do, so a
  // run resumed from a checkpoint, whose first iterations are eager where the first run
  // replayed, does the same arithmetic (cuDNN's nondeterministic kernels aside). The CPU keeps
  // LibTorch's SGD.
  bool tensor_lr_update = false;
  torch::Tensor lr_tensor;
  // A resume of a complete run that only writes its lost export leaves its summary as it is.
  bool only_export = false;
  bool summarising = false;
  // The summary that a second signal, which stops at once, writes: rendered before the first
  // iteration, at each log record and evaluation, and after an iteration a second or more
  // after the last rendering.
  Clock::time_point last_draft;
  // A window much wider than the default makes the codes' bins coarse enough for the backward
  // pass's gradients to grow through the depth (blpa-bench fidelity shows it): a cause to name
  // beside the learning rate.
  std::string wide_window;
  bool eval_overflowed = false;  // rank 0's last evaluation gave a non-finite loss
  std::pair<std::string, int64_t> fail_at;  // BLPA_TEST_FAIL's
  // Set while an evaluation or checkpoint interrupts training: a checkpoint's open window ends
  // there, so that the resumed run's first images/s is of training alone.
  std::optional<Clock::time_point> paused;
  // The outputs the run was given, for a resume that forgets one to hear of it.
  std::string outputs_given;
  bool consistent = true;  // false while an update is half applied
  bool in_checkpoint = false;
  bool mid_step = false;  // an eager iteration's forward has begun: the buffers have moved
  const char* waiting_for = nullptr;  // another rank's work that this one waits for, if any
  std::optional<BufferBackup> buffers;
};

TrainResult Run::train() {
  set_up();
  begin_loop();
  try {
    iterate();
  } catch (const NonFiniteLoss&) {
    throw;
  } catch (const std::exception& e) {
    fail(e);  // throws, unless the run's end is whole
    return finish();  // its group not closed but aborted, by its destructor: a collective may have failed
  }
  if (dist) dist->close();  // the ranks' last collective is behind them: rank 0 writes alone from here
  return finish();
}

void Run::set_up() {
  std::optional<Checkpoint> resumed;
  // With several ranks, a rank that cannot start (its flags, its data folder, its device, its
  // outputs, its checkpoint) says so to the others at the rendezvous below, instead of
  // leaving them waiting there for --dist-timeout.
  std::exception_ptr refused;
  std::string complete;
  try {
    resumed = begin_run(config, given, locks, complete);
    dev = torch::Device(config.device);
  } catch (const std::exception&) {
    if (!config.dist.enabled()) throw;
    refused = std::current_exception();
  }
  if (resumed) {
    state = resumed->state;
    resumed_stored = resumed->stored_activation_bytes;
    resumed_peak = resumed->peak_bytes;
    window_lr = checkpoint_lr(*resumed, config);
    train_s_before.reset();
    if (resumed->run_train_ms) train_s_before = static_cast<double>(*resumed->run_train_ms) / 1000;
    decode_failed.insert(resumed->decode_failed.begin(), resumed->decode_failed.end());
  }
  if (!refused && config.threads > 0) torch::set_num_threads(config.threads);  // refused: maybe out of range
  memory::install_cpu_counter();
  if (config.dist.enabled()) {
    std::string word = lead_word(complete);
    dist = join_ranks(config, refused, state.iteration, word, dev, stop, signal);
    finish_alone(word, complete);
    if (dist) dist->watch_stops(stop, &stops_seen);  // rank 0 finishing alone has none
  }
  training_data = load_training_data(config, resumed ? &*resumed : nullptr, lead);
  try {
    build_network(resumed);
    if (const auto [what, ms] = injected_failure(); what == "slow-load")  // until then, or a stop on any rank
      for (const auto end = Clock::now() + std::chrono::milliseconds(ms);
           Clock::now() < end && !(stop && stop->load()) && !stops_seen.any.load();)
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    stop_before_start();
  } catch (const PeerLost& e) {
    // Another rank asked to stop, then lost (a second signal ends one at once) while the run
    // loaded: the others end by its signal, where they exited 1 ("another rank stopped").
    if (!other_stop_asked()) {  // said as start_from_rank_0 says it, not "barrier failed: ..." alone
      if (std::string(e.what()).find("before training began") != std::string::npos) throw;
      throw PeerLost(fmt::format("rank {} of {}: another rank stopped before training began ({})", config.dist.rank,
                                 config.dist.world, e.what()));
    }
    throw Stopped(fmt::format("stopped before the run began: another rank was asked to stop, and the ranks were lost "
                              "({}); {}nothing was written",
                              e.what(), config.overwrite ? "--overwrite replaced nothing, and " : ""),
                  asked_signal());
  }
  if (lead) result.dropped_log_records = open_log(log, config, state);
  // The inputs' normalisation goes with the run's records: an --export's user needs it (CIFAR's
  // and MNIST-style statistics are of the training images, which they may not have).
  normalisation = fmt::format("{{\"mean\": [{}], \"std\": [{}]}}", fmt::join(training_data.norm.mean, ", "),
                              fmt::join(training_data.norm.std, ", "));
  log.write(fmt::format(
      "{{\"type\": \"config\", \"iter\": {}, \"time\": {:.3f}, \"resumed\": {}, \"config\": {}, "
      "\"normalisation\": {}}}\n",
      it, unix_time(), config.resume, config.json(), normalisation));

  open_loaders();
}

// A stop asked for while a new run loads: nothing of the run is written yet, and nothing that
// --overwrite would replace is gone. (Before, the old run's files went, and the new run
// trained one step to have a checkpoint.) Several ranks agree on it: one stopped stops all,
// each ending by the signal the stopped one was sent.
void Run::stop_before_start() {
  if (config.resume || !(dist || stop)) return;  // every rank sums, whether or not it was given a stop
  // Every rank loaded first: a signal while this one waits for a slower one counts (read
  // before the sum, it was lost, and the run trained a step).
  if (dist) dist->barrier();
  const bool mine = stop && stop->load();
  bool stopped = mine;
  if (dist) {
    const auto sums = dist->sum({mine ? 1.0 : 0.0, sent(SIGTERM), sent(SIGHUP)});
    stopped = sums[0] > 0;
    told(sums[0], sums[1], sums[2], mine);
    if (stopped) dist->close();  // the ranks part as planned: nothing of theirs aborted
  }
  if (stopped)
    throw Stopped(fmt::format("stopped before the run began{}: {}nothing was written",
                              dist && !mine ? " (another rank was interrupted)" : "",
                              config.overwrite ? "--overwrite replaced nothing, and " : ""),
                  result.stop_signal);
}

// Several ranks: what is left of a run at its end is rank 0's word (join_ranks), since only
// rank 0 sees the run's files (its summary, its export). Nothing: every rank exits 0. Its
// evaluation, export or summary: rank 0 writes them alone, as the only rank that evaluates and
// writes files, while the others exit 0. A run killed after its final checkpoint left its
// summary "running", and an export or summary lost after it ended could not be written again.
std::string Run::lead_word(const std::string& complete) const {
  if (!lead) return "";
  if (!complete.empty()) return "complete " + complete;
  if (!config.resume || state.iteration != config.iterations) return "train";
  return state.pending_eval ? "end its evaluation, export and summary" : "end its export";
}

void Run::finish_alone(const std::string& word, const std::string& complete) {
  if (word == "train") return;
  dist->close();  // the ranks part here: rank 0's word and their settings went round
  if (lead && !complete.empty()) throw RunComplete(complete);
  if (word.rfind("complete ", 0) == 0) throw RunComplete("rank 0: " + word.substr(9));
  if (!lead)
    throw RunComplete(fmt::format("the run is at its last iteration ({}), and rank 0 writes {} alone: nothing for "
                                  "rank {} to do",
                                  state.iteration, word.substr(4), config.dist.rank));
  spdlog::info("the run is at its last iteration ({}): rank 0 writes {} alone, the other ranks exit", state.iteration,
               word.substr(4));
  dist.reset();
}

void Run::build_network(std::optional<Checkpoint>& resumed) {
  NetConfig net;
  net.arch = config.arch;
  net.depth = config.depth;
  net.in_channels = training_data.in_channels;
  net.num_classes = training_data.num_classes;
  net.mode = config.mode;
  torch::manual_seed(config.seed);
  model = ResNet(net);
  model->train();
  model->set_numerics(config.numerics());
  apply_precision(config.numerics().precision, dev);
  opt.emplace(make_optimizer(model, config));

  if (resumed) {
    if (resumed->net.in_channels != training_data.in_channels ||
        resumed->net.num_classes != training_data.num_classes)
      throw FlagError(fmt::format("checkpoint {} holds a network for {} channels and {} classes; the data has {} and "
                                  "{}: resume with the data it was trained on",  // exit 2, as other data mismatches
                                  config.checkpoint, resumed->net.in_channels, resumed->net.num_classes,
                                  training_data.in_channels, training_data.num_classes));
    load_training_state(*resumed, model, *opt);
    resumed.reset();  // the archive's memory
    // The optimiser's settings are this command line's (a changed one takes effect).
    for (size_t g = 0; g < opt->param_groups().size(); ++g) {
      auto& o = static_cast<torch::optim::SGDOptions&>(opt->param_groups()[g].options());
      o.momentum(config.momentum).weight_decay(g == 0 ? config.weight_decay : 0.0);
    }
    it = state.iteration;
    spdlog::info("resumed from {} at iteration {}", config.checkpoint, it);
    model->set_numerics(config.numerics());  // the loaded weights in the run's layout
  }
  model->to(dev);
  momentum_to(*opt, dev, config.numerics().layout);
  if (dist) {
    start_from_rank_0(*dist, model, *opt, training_data, config);
    reducer = dist->reducer(model->parameters());
  }
  int64_t params = 0;
  for (const auto& p : model->parameters()) params += p.numel();
  spdlog::info("model {}-{} ({} parameters), mode {}, {}, batch {}, {} iterations, device {}", config.arch,
               config.depth, params, config.mode.str(), config.numerics().str(), config.batch, config.iterations,
               dev.str());
}

void Run::open_loaders() {
  const data::Shard shard{config.dist.rank, config.dist.world};
  const bool pin = dev.is_cuda();
  if (config.dataset == "imagenet") {
    // Throws when the global batch exceeds the training images.
    auto sampler =
        std::make_shared<data::ShardSampler>(training_data.train_list.size(), config.batch, shard, config.seed);
    per_epoch = sampler->batches_per_epoch();
    data::ImageNetAugment aug;
    if (!config.augment) aug.min_short = aug.max_short = 256, aug.flip = false, aug.jitter_on = false;
    image_loader = std::make_unique<data::BatchStream>(
        [this, aug, sampler, pin](int64_t b) {
          const auto idx = sampler->indices(b);
          return data::imagenet_train_batch(training_data.train_list, idx, aug, training_data.norm,
                                            data::counter_hash(config.seed, 0x5A5A5A5Aull, b / per_epoch),
                                            &decode_errors, pin);
        },
        it, config.workers, config.prefetch);
    next_batch = [this] { return image_loader->next(); };
    run_eval = [this] {
      ImageEvalOptions o;
      o.batch = config.batch, o.workers = config.workers, o.device = config.device, o.stop = eval_stop();
      return evaluate_images(model, training_data.val_list, o);
    };
  } else {
    memory_loader = std::make_unique<data::TrainLoader>(
        training_data.train_set, config.batch, config.seed, training_data.norm,
        data::Augment{config.augment ? 4 : 0, config.augment}, it, config.workers, config.prefetch, shard, pin);
    per_epoch = memory_loader->batches_per_epoch();
    next_batch = [this] { return memory_loader->next(); };
    run_eval = [this] {
      return evaluate(model, training_data.test_set, training_data.norm, config.batch, dev, eval_stop());
    };
  }
}

void Run::begin_loop() {
  tty = config.progress && lead && ::isatty(STDERR_FILENO);
  run_start = Clock::now();
  start_time = unix_time();
  first = it;
  window_iters = state.window_iters;
  window_loss = state.window_loss;
  window_start = Clock::now() - std::chrono::duration_cast<Clock::duration>(
                                    std::chrono::duration<double>(state.window_seconds));
  stored_known = resumed_stored.has_value();
  if (resumed_stored) stored = *resumed_stored;
  if (resumed_peak) peak_max = *resumed_peak;
  carried_seconds = state.window_seconds;
  carried_iters = state.window_iters;
  last_good = config.resume ? it : -1;
  pending_eval = state.pending_eval;
  memory::reset_peak(dev);

  // resolve() made auto "off" on the CPU and with several ranks (rank 0 finishing a run's end
  // alone too: nothing to capture).
  use_graphs = dev.is_cuda() && config.cuda_graphs != "off";
  if (dev.is_cuda() && config.dist.enabled() && given.cuda_graphs != "off" && it < config.iterations)
    spdlog::info("CUDA graphs off: with several ranks every iteration runs eagerly (the all-reduce is not captured)");
  capture_at = it + 3;
  tensor_lr_update = dev.is_cuda();
  if (tensor_lr_update) lr_tensor = torch::zeros({}, torch::TensorOptions(torch::kFloat).device(dev));
  only_export = config.resume && it == config.iterations && !pending_eval;
  summarising = !config.summary_path.empty() && lead && !only_export;
  last_draft = Clock::now();
  if (summarising && draft) draft->open(config.summary_path);
  const bool coded = config.mode.mode == Mode::blpa || config.mode.mode == Mode::naive;
  const float default_window = coded ? default_format(config.mode.bits).window : 0;
  if (coded && config.mode.window > 2 * default_window)
    wide_window = fmt::format(" Its --window {} is over twice the default at {} bits ({}): bins that coarse can make "
                              "the gradients overflow too; try a narrower one.",
                              config.mode.window, config.mode.bits, default_window);
  fail_at = injected_failure();
  for (const auto& [name, path] : {std::pair<const char*, const std::string*>{"log", &config.log_path},
                                   {"summary", &config.summary_path},
                                   {"export", &config.export_path}})
    if (!path->empty()) outputs_given += fmt::format("{}{}", outputs_given.empty() ? "" : ",", name);
  outputs_given = "outputs=" + outputs_given + "\n";
  buffers.emplace(model);
  // From here until the run ends its summary says "running" (an earlier one, of the run
  // before this resume, would read as this run's state; a killed run leaves this one).
  if (summarising) {
    AtomicFile f(config.summary_path);
    f.write(render_summary("running", ""));
    f.commit();
  }
  redraft();
}

void Run::iterate() {
  // A run resumed at its last iteration (--iterations lowered to where it was stopped) that
  // had not logged that iteration: the record a run ending there writes, from the
  // checkpoint's log window. Before, its log ended a record short.
  if (it == config.iterations && window_iters > 0) log_window(window_lr.value_or(config.lr_at(it - 1)));
  // An evaluation that a signal interrupted runs first.
  if (pending_eval) {
    paused = Clock::now();
    bool done = !lead || evaluate_now();
    bool overflowed = eval_overflowed;
    if (dist) {
      const auto sums = dist->sum({done ? 0.0 : 1.0, eval_overflowed ? 1.0 : 0.0});
      done = sums[0] == 0, overflowed = sums[1] > 0;
    }
    stop_if_overflowed(overflowed);
    if (done) pending_eval = false;
    else result.interrupted = true;  // the checkpoint still holds the pending evaluation
    if (done && it >= config.iterations) checkpoint();  // the run's end, evaluated: a resume finds it complete
    window_start += Clock::now() - *paused;  // not training time
    paused.reset();
  }
  while (!result.interrupted && it < config.iterations) {
    // One process: a signal that came after the last step's check (in its log record,
    // evaluation or checkpoint) stops here, not after one more step (a new run trains its
    // first, so that it has a checkpoint to resume). Ranks agree on the flag read with the
    // step's all-reduce, below.
    if (!dist && stop && stop->load() && (it > 0 || config.resume)) {
      if (last_good != it) {
        in_checkpoint = true;
        checkpoint();
        in_checkpoint = false;
      }
      if (tty) console("\n");
      result.interrupted = true;
      break;
    }
    const double lr = config.lr_at(it);
    for (auto& g : opt->param_groups()) static_cast<torch::optim::SGDOptions&>(g.options()).lr(lr);
    auto batch = next_batch();
    decode_failed.insert(batch.failed.begin(), batch.failed.end());
    bool stopping = stop && stop->load();
    step(lr, batch, stopping);
    ++it;
    ++window_iters;
    mid_step = false;
    // A signal that came during this step stops after it, as the message says ("after the
    // current step"), not after one more. Ranks agree on the flag read before the step.
    if (!dist) stopping = stop && stop->load();
    if (Clock::now() - last_draft > std::chrono::seconds(1)) redraft();

    const bool last = it == config.iterations;
    if (it % config.log_every == 0 || last) log_window(lr);
    // Evaluation and checkpoints are not training: their time is kept out of the next
    // window's images/s, on every rank (the others wait for rank 0 at a barrier).
    paused = Clock::now();
    const bool evaluating = (config.eval_every > 0 && it % config.eval_every == 0) || last;
    const bool checkpointing = it % config.checkpoint_every == 0 || last;
    if (lead && evaluating) {
      pending_eval = true;  // until it completes: a checkpoint after a failure in it runs it again
      pending_eval = !evaluate_now();
      redraft();  // with the evaluation's figures
    }
    // Whether the run's evaluation here was interrupted, on every rank: at the last iteration
    // the run is then not done (rank 1 said "done" and exited 0 where rank 0 was stopped).
    bool eval_left = pending_eval;
    if (dist && evaluating) {  // a signal during rank 0's evaluation stops every rank
      // After it: a signal that came to another rank while it waited is read below, and the
      // ranks stop here rather than after one more iteration.
      waiting_for = lead ? "the other ranks" : "rank 0's evaluation";  // "after iteration N" if lost
      dist->barrier();
      waiting_for = nullptr;
      const bool stopped = stop && stop->load();
      const auto sums = dist->sum({pending_eval || stopped ? 1.0 : 0.0, eval_overflowed ? 1.0 : 0.0,
                                   stopped ? 1.0 : 0.0, sent(SIGTERM), sent(SIGHUP), pending_eval ? 1.0 : 0.0});
      stopping = stopping || sums[0] > 0;
      eval_left = sums[5] > 0;
      told(sums[2], sums[3], sums[4], stopped);
      stop_if_overflowed(sums[1] > 0);
    } else {
      stopping = stopping || pending_eval;
      stop_if_overflowed(eval_overflowed);
    }
    if (checkpointing || stopping) {
      in_checkpoint = true;
      checkpoint();
      in_checkpoint = false;
    }
    if (dist && (evaluating || checkpointing || stopping)) {
      waiting_for = lead ? "the other ranks" : "rank 0's checkpoint";
      dist->barrier();
      waiting_for = nullptr;
      // The run's end: a signal that came during rank 0's final checkpoint, to it or to a rank
      // waiting for it, is told, so that every rank ends by it (the signalled one did, and the
      // others exited 0).
      if (last) {
        const bool mine = stop && stop->load();
        const auto sums = dist->sum({mine ? 1.0 : 0.0, sent(SIGTERM), sent(SIGHUP)});
        told(sums[0], sums[1], sums[2], mine);
      }
    }
    window_start += Clock::now() - *paused;
    paused.reset();
    if (stopping && (!last || eval_left)) {
      if (tty) console("\n");
      result.interrupted = true;
      break;
    }
  }
  drain();
}

void Run::step(double lr, const data::Batch& batch, bool& stopping) {
  bool replayed = false;
  if (use_graphs && it >= capture_at) {
    try {
      if (!graphed) graphed = std::make_unique<GraphedStep>(model, *opt, config.accum_steps);
      const bool capturing = !graphed->captured();
      consistent = false;  // a replay (after the capture too) updates the weights; a failed capture runs nothing
      graphed->run(batch.images, batch.labels, lr);
      consistent = true;
      replayed = true;
      if (capturing)
        spdlog::info("CUDA graphs: iteration {} onwards replays one captured iteration ({:.1f} MiB pool)", it + 1,
                     graphed->pool_bytes() / 1048576.0);
    } catch (const std::exception& e) {  // c10::Error too: an out-of-memory, a failed check
      if (graphed && graphed->captured()) throw;  // a replay that fails is an error like any other
      consistent = true;
      if (config.cuda_graphs == "on")
        throw std::runtime_error(std::string("--cuda-graphs on: the iteration could not be captured (") + e.what() +
                                 ")");
      spdlog::warn("CUDA graphs off: the iteration could not be captured ({}); training continues eagerly", e.what());
      graphed.reset();
      use_graphs = false;
    }
  }
  if (!replayed) {
    auto x = batch.images.to(dev, /*non_blocking=*/true), y = batch.labels.to(dev, /*non_blocking=*/true);
    opt->zero_grad();
    buffers->save();
    mid_step = true;
    // A bad loss changes nothing: the update is not applied and no checkpoint is written.
    double loss_v = accumulate_gradients(model, x, y, config.accum_steps, &stored, reducer.get());
    stored_known = true;
    if (fail_at.first == "slow-step") std::this_thread::sleep_for(std::chrono::milliseconds(fail_at.second));
    if (fail_at == std::pair<std::string, int64_t>{"step", it + 1})
      throw std::runtime_error(fmt::format("iteration {} failed after its backward pass (BLPA_TEST_FAIL)", it + 1));
    if (dist) {  // the mean loss over ranks, and a stop asked for on any rank stops them all
      const bool mine = stopping;
      const auto sums = dist->sum({loss_v, mine ? 1.0 : 0.0, sent(SIGTERM), sent(SIGHUP)});
      loss_v = sums[0] / config.dist.world;
      stopping = sums[1] > 0;
      told(sums[1], sums[2], sums[3], mine);
    }
    if (!std::isfinite(loss_v))
      throw diverged(fmt::format("the loss became {} at iteration {}", non_finite(loss_v), it + 1), it);
    consistent = false;
    if (tensor_lr_update) {
      lr_tensor.fill_(lr);
      sgd_step(*opt, lr_tensor);
    } else {
      opt->step();
    }
    if (config.mode.mode != Mode::plain) model->constrain_();
    consistent = true;
    window_loss += loss_v;
    result.last_loss = loss_v;
  }
}

void Run::log_window(double lr) {
  drain();
  const double secs = std::chrono::duration<double>(Clock::now() - window_start).count();
  double ips = window_iters * config.batch / secs;
  std::tie(train_seconds, train_images) = trained(Clock::now());
  carried_seconds = 0, carried_iters = 0;
  // No step in this process (a window all from the checkpoint): the run's peak, as it kept it.
  int64_t peak = it > first ? memory::peak(dev) : peak_max, peak_total = peak, stored_total = stored;
  peak_max = std::max(peak_max, peak);
  if (dist) {  // per rank (this one, rank 0) and in total
    const auto sums = dist->sum({ips, static_cast<double>(peak), static_cast<double>(stored)});
    ips = sums[0];
    peak_total = static_cast<int64_t>(sums[1]);
    stored_total = static_cast<int64_t>(sums[2]);
  }
  // Rank 0 finishing a run of several ranks alone (finish_alone): the window is the
  // checkpoint's, whose steps every rank took in lockstep (each waits for the all-reduce), so
  // the run's images/s is rank 0's times the ranks; the other ranks' bytes were not kept.
  const bool alone = !dist && config.dist.world > 1;
  if (alone) ips *= config.dist.world;
  const double total = std::chrono::duration<double>(Clock::now() - run_start).count();
  const double eta = it > first ? total / (it - first) * (config.iterations - it) : 0;
  log.write(fmt::format(
      "{{\"type\": \"train\", \"iter\": {}, \"time\": {:.3f}, \"epoch\": {:.3f}, \"loss\": {}, \"lr\": {:.6g}, "
      "\"images_per_s\": {:.2f}, \"stored_activation_bytes\": {}, \"peak_bytes\": {}, \"decode_failures\": {}, "
      "\"graphed\": {}, \"graph_pool_bytes\": {}{}}}\n",
      it, unix_time(), double(it) / per_epoch, json_loss(window_loss / window_iters), lr, ips,
      // null: no step in this process, and a checkpoint from before they were kept
      stored_known ? std::to_string(stored) : "null", stored_known ? std::to_string(peak) : "null",
      decode_failed.size(), graphed != nullptr, graphed ? graphed->pool_bytes() : 0,
      config.dist.world > 1
          ? fmt::format(", \"world\": {}, \"global_batch\": {}, \"images_per_s_per_rank\": {:.2f}, "
                        "\"stored_activation_bytes_total\": {}, \"peak_bytes_total\": {}",
                        config.dist.world, config.batch * config.dist.world, ips / config.dist.world,
                        alone || !stored_known ? "null" : std::to_string(stored_total),
                        alone || !stored_known ? "null" : std::to_string(peak_total))
          : std::string()));
  const std::string line =
      fmt::format("iter {}/{}  loss {:.4f}  lr {:.4g}  {:.1f} img/s  stored {:.1f} MiB  ETA {}", it,
                  config.iterations, window_loss / window_iters, lr, ips, stored / 1048576.0, duration(eta));
  if (tty)
    console("\r{:<100}", line);
  else if (config.progress && lead)
    console("{}\n", line);
  window_start = Clock::now();
  window_iters = 0;
  window_loss = 0;
  memory::reset_peak(dev);
  redraft();
}

// This process's training time and images up to now, the open window's part included.
std::pair<double, int64_t> Run::trained(Clock::time_point now) {
  const double secs = std::chrono::duration<double>(now - window_start).count() - carried_seconds;
  return std::pair{train_seconds + std::max(secs, 0.0),
                   train_images + (window_iters - carried_iters) * config.batch * config.dist.world};
}

// `error`: why a run "failed", or was "interrupted" by the loss of a rank asked to stop ("" otherwise: null).
std::string Run::render_summary(const char* status, const std::string& error) {
  const auto [secs, images] = trained(Clock::now());
  // The figures of this process's last evaluation (eval_iter), written as its log record
  // writes them; with none they are unknown (null), not 0 and 100% error.
  const bool known = eval_iter >= 0;
  auto test = [&](double v) { return known && std::isfinite(v) ? fmt::format("{:.6f}", v) : std::string("null"); };
  return fmt::format(
      "{{\"type\": \"summary\", \"status\": \"{}\", \"iter\": {}, \"iterations\": {}, \"time\": {:.3f}, "
      "\"wall_s\": {:.3f}, \"train_s\": {:.3f}, \"run_train_s\": {}, \"last_loss\": {}, \"eval_iter\": {}, "
      "\"test_loss\": {}, \"test_acc\": {}, \"test_top5\": {}, \"test_error\": {}, \"test_images\": {}, "
      "\"test_failed\": {}, \"images_per_s\": {}, \"stored_activation_bytes\": {}, \"peak_bytes\": {}, "
      "\"decode_failures\": {}, \"graphed\": {}, \"resumed_from\": {}, \"error\": {}, \"config\": {}, "
      "\"normalisation\": {}}}\n",
      status, it, config.iterations, unix_time(), unix_time() - start_time, secs,
      train_s_before ? fmt::format("{:.3f}", *train_s_before + secs) : std::string("null"),
      json_loss(result.last_loss),  // null: none trained
      known ? std::to_string(eval_iter) : "null", known ? json_loss(result.test_loss) : "null", test(result.test_acc),
      test(result.test_top5), test(1 - result.test_acc), known ? std::to_string(eval_images) : "null",
      known ? std::to_string(eval_failed) : "null",
      secs > 0 && images > 0 ? fmt::format("{:.2f}", images / secs) : std::string("null"),  // none trained
      stored_known ? std::to_string(stored) : "null",
      stored_known ? std::to_string(std::max(peak_max, memory::peak(dev))) : "null", decode_failed.size(),
      graphed != nullptr, config.resume ? std::to_string(first) : "null",
      error.empty() ? std::string("null") : json_string(error), config.json(), normalisation);
}

void Run::write_summary(const char* status, const std::string& error) {
  if (!summarising) return;
  if (draft) draft->close();  // the run's own summary from here on
  AtomicFile f(config.summary_path);
  f.write(render_summary(status, error));
  f.commit();
}

// A failed or diverged run's summary, where the disk allows it (the run's own error is the
// one reported).
void Run::try_summary(const char* status, const std::string& error) {
  try {
    write_summary(status, error);
  } catch (const std::exception& e) {  // a sweep would find none, or an older one: said
    spdlog::warn("the summary of this {} run could not be written: {}", status, error_message(e));
  }
}

// What a rank's stop was asked by, told to the others with the stop itself: a rank that was
// not signalled ends as the signalled one does (143 for a scheduler's SIGTERM, not 130).
double Run::sent(int sig) {
  return stop && stop->load() && signal && signal->load() == sig ? 1.0 : 0.0;
}

// `stops` ranks asked to stop, `mine` whether this one is among them.
void Run::told(double stops, double terms, double hups, bool mine) {
  if (stops > 0 && result.stop_signal == 0) result.stop_signal = terms > 0 ? SIGTERM : hups > 0 ? SIGHUP : SIGINT;
  if (stops > 0) stops_seen.any.store(true);  // as the rendezvous would say within 0.1 s: rank 0's evaluation stops
  if (stops > (mine ? 1 : 0)) others_told = true;
}

void Run::redraft() {
  if (!summarising || !draft) return;
  draft->publish(render_summary("interrupted", ""));
  last_draft = Clock::now();
}

// `what` says what and where (iterations counted from 1); `updates` is how many updates
// made the weights whose numbers overflowed: the last of them had the learning rate named,
// and a checkpoint of that iteration holds those weights. The summary is written where the
// disk allows it: the divergence is what the run reports (exit 3), whatever the summary's fate.
NonFiniteLoss Run::diverged(const std::string& what, int64_t updates) {
  // SGD's weight decay scales the weights by 1 - lr * decay at each step: a decay above 1
  // (usual ones are 1e-4 to 5e-4) that makes it 0 or less flips or grows them whatever the
  // gradients, and --lr is not the cause.
  const double lr_then = config.lr_at(std::max<int64_t>(updates - 1, 0));
  const std::string decay =
      config.weight_decay > 1 && lr_then * config.weight_decay >= 1
          ? fmt::format(" Its --weight-decay {} at learning rate {} scales the weights by {:g} at every step: "
                        "lower the weight decay.",
                        config.weight_decay, lr_then, 1 - lr_then * config.weight_decay)
          : "";
  NonFiniteLoss e(fmt::format(
      "{} ({}); training stopped.{}{} {}", what,
      updates == 0       ? std::string("before any update")
      : updates == first ? fmt::format("the weights resumed from iteration {}", updates)
                         : fmt::format("learning rate {}", config.lr_at(updates - 1)),
      wide_window, decay,
      config.checkpoint.empty() ? std::string("No checkpoint was configured.")
      : last_good < 0 ? "No checkpoint had been written yet, and none is written from non-finite numbers."
      : last_good == updates
          ? fmt::format("Checkpoint {} (iteration {}) holds these weights, so resuming it gives the same: start "
                        "again with a lower --lr.",
                        config.checkpoint, last_good)
      : config.resume && last_good == first
          // A run that diverged can leave finite weights whose gradient is not (blpa's codes
          // are of a / gamma, and a diverging run drives gamma to its floor): a lower
          // --lr cannot help there.
          ? fmt::format("It diverged before its next checkpoint; the one it resumed, {} (iteration {}), was "
                        "kept. If a much lower --lr diverges as soon after resuming it, its weights cannot be "
                        "continued (their gradients are not finite at any learning rate): start again with "
                        "--overwrite.",
                        config.checkpoint, last_good)
          : fmt::format("The last checkpoint of finite numbers, {} (iteration {}), was kept; its weights may "
                        "already be on their way to diverging: resume it with a lower --lr, or start again.",
                        config.checkpoint, last_good)));
  try_summary("diverged", "");
  return e;
}

bool Run::evaluate_now() {  // rank 0; returns false when a signal interrupted it
  if (tty) console("\n");
  if (fail_at == std::pair<std::string, int64_t>{"eval", it})
    throw std::runtime_error("the evaluation failed (BLPA_TEST_FAIL)");
  if (fail_at.first == "slow-eval")  // as long as an evaluation of that many seconds, and as interruptible
    for (auto until = Clock::now() + std::chrono::seconds(fail_at.second);
         Clock::now() < until && !(eval_stop() && eval_stop()->load());)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const EvalResult e = run_eval();
  if (e.interrupted) {
    spdlog::warn("evaluation at iteration {} interrupted; it runs first when the run resumes", it);
    return false;
  }
  if (e.count == 0)  // "100% error, loss 0" would read as a result; the checkpoint keeps it due
    throw std::runtime_error(fmt::format("the evaluation after iteration {} could evaluate no image ({} could not "
                                         "be read or decoded)",
                                         it, e.failed));
  result.test_loss = e.loss;
  result.test_acc = e.top1;
  result.test_top5 = e.top5;
  result.evaluated = true;
  eval_iter = it;
  eval_images = e.count, eval_failed = e.failed;
  log.write(fmt::format("{{\"type\": \"eval\", \"iter\": {}, \"time\": {:.3f}, \"test_loss\": {}, "
                        "\"test_acc\": {:.6f}, \"test_top5\": {:.6f}, \"images\": {}, \"failed\": {}}}\n",
                        it, unix_time(), json_loss(e.loss), e.top1, e.top5, e.count, e.failed));
  spdlog::info("iteration {}: test loss {:.4f}, test error {:.2f}% (top-5 error {:.2f}%){}", it, e.loss,
               100 * (1 - e.top1), 100 * (1 - e.top5),
               e.failed > 0 ? fmt::format("; {} of {} images could not be read or decoded", e.failed,
                                          e.count + e.failed)
                            : "");
  eval_overflowed = !std::isfinite(e.loss);
  return true;
}

// Finite weights whose outputs overflow (the running statistics, which the training loss
// does not use) are a diverged run too: blpa-eval would refuse them. Every rank stops, told
// by rank 0's `overflowed` (the others do not evaluate).
void Run::stop_if_overflowed(bool overflowed) {
  if (overflowed)
    throw diverged(fmt::format("the test loss became non-finite (NaN or Inf) at iteration {}: the network's outputs "
                               "overflow",
                               it),
                   it);
}

void Run::drain() {
  if (!graphed) return;
  const auto l = graphed->take_losses();
  if (l.count == 0) return;
  if (!std::isfinite(l.sum))
    throw diverged(fmt::format("the loss became {} in one of iterations {} to {} (replayed as a CUDA graph, the "
                               "loss is read every --log-every iterations)",
                               non_finite(l.sum), it - l.count + 1, it),
                   it);
  window_loss += l.sum;
  result.last_loss = l.last;
}

// Only finite weights and optimiser state reach a checkpoint: an update can overflow even
// when the loss before it was finite.
void Run::checkpoint() {
  if (config.checkpoint.empty() || !lead) return;
  drain();
  if (fail_at.first == "slow-checkpoint") std::this_thread::sleep_for(std::chrono::milliseconds(fail_at.second));
  if (!all_finite(model, &*opt))
    throw diverged(fmt::format("the weights became non-finite (NaN or Inf) by iteration {}", it), it);
  RunState s;
  s.iteration = it;
  s.pending_eval = pending_eval;
  s.window_iters = window_iters;
  s.window_loss = window_loss;
  const auto now = paused.value_or(Clock::now());
  s.window_seconds = std::chrono::duration<double>(now - window_start).count();
  // evaluated: whether this iteration's evaluation ran. A run stopped part-way and resumed
  // with --iterations at the checkpoint's has not been evaluated at its (new) end.
  const std::string header =
      config.describe() + "run_id=" + config.run_id + "\nevaluated=" + (eval_iter == it ? "1" : "0") + "\n" +
      outputs_given +
      (stored_known ? fmt::format("stored_activation_bytes={}\npeak_bytes={}\n", stored,
                                  std::max(peak_max, memory::peak(dev)))
                    : std::string()) +
      (decode_failed.empty() ? std::string() : fmt::format("decode_failed={}\n", fmt::join(decode_failed, ","))) +
      (train_s_before ? fmt::format("run_train_ms={}\n", std::llround((*train_s_before + trained(now).first) * 1000))
                      : std::string()) +
      training_data.data_record;
  save_checkpoint(config.checkpoint, config.identity(), header, s, model, *opt);
  last_good = it;
}

// The run is whole in its last checkpoint: a resume of it writes what could not be written.
std::string Run::resumable(const std::exception& e, const char* what) {
  std::error_code ec;
  const std::string why = sentence(error_message(e));
  if (!lead || config.checkpoint.empty() || !fs::is_regular_file(config.checkpoint, ec)) return why;
  return fmt::format("{} Checkpoint {} holds iteration {}: --resume (or --auto-resume){} writes the {}.", why,
                     config.checkpoint, it, config.dist.enabled() ? ", given to every rank," : "", what);
}

void Run::fail(const std::exception& e) {
  // Any other failure (a lost peer, a data or log error, out of memory): the weights of
  // the last completed iteration are saved if they can be, so at most the failed one is lost.
  std::string saved = config.checkpoint.empty() ? " No checkpoint was configured." : "";
  if (lead && !config.checkpoint.empty()) {
    // Iteration 0 is the initial network: a fresh run that fails in its first iteration
    // leaves no checkpoint, so that its rerun (a smaller --batch, say) is a new run.
    if (consistent && !in_checkpoint && it > std::max<int64_t>(last_good, 0)) {
      try {
        if (mid_step) buffers->restore();
        checkpoint();
      } catch (const std::exception& again) {
        saved = fmt::format(" Saving iteration {} failed too ({}).", it, error_message(again));
      }
    }
    std::error_code ec;
    if (last_good >= 0 && fs::is_regular_file(config.checkpoint, ec))
      saved += fmt::format(" Checkpoint {} holds iteration {}: continue with --resume{}.", config.checkpoint,
                           last_good, config.dist.enabled() ? " on every rank" : "");
    else if (last_good >= 0)  // removed while the run ran (its folder, say)
      saved += fmt::format(" Checkpoint {} of iteration {} is gone: there is nothing to resume.", config.checkpoint,
                           last_good);
    else if (!fs::is_regular_file(config.checkpoint, ec)) {  // none written: its outputs are a new run's to replace
      // The same command line starts it again where its files record no training (a new
      // run replaces those under --auto-resume, and none are refused where none exist).
      bool recorded = false;
      for (const auto& [path, flag] : outputs_of(config))
        recorded = recorded || (flag != "--checkpoint" && fs::is_regular_file(path, ec) &&
                                !(config.auto_resume && records_no_training(path, flag)));
      saved += std::string(" No checkpoint was written: there is nothing to resume; start the run again") +
               (!recorded             ? "."
                : config.auto_resume ? " with --overwrite in place of --auto-resume (it replaces this run's files)."
                                     : " with --overwrite (it replaces this run's files).");
    }
  }
  // The run's end is whole (its last iteration trained, evaluated and, here if not before,
  // checkpointed) where a peer was lost at the barrier after its evaluation: rank 0 writes
  // the export and the summary. It said "failed", and a resume, finding the run complete,
  // left that summary and no export.
  const bool whole_end = dynamic_cast<const PeerLost*>(&e) != nullptr && lead && it == config.iterations &&
                         !pending_eval && last_good == it;
  if (whole_end) {
    spdlog::warn("rank 0 of {}: lost the other ranks after the run's last iteration ({}); it is trained, evaluated "
                 "and checkpointed: writing its export and summary",
                 config.dist.world, e.what());
    // One asked to stop (a second signal ended it at once): this rank ends by its signal too,
    // as after a signal told in the last iteration (it exited 0).
    if (other_stop_asked() && result.stop_signal == 0) result.stop_signal = asked_signal() ? asked_signal() : SIGINT;
    return;
  }
  // A peer that died or went silent: every rank stops, instead of hanging. Waiting for rank
  // 0's evaluation or checkpoint, a silent peer may only be slow (a closed connection is not).
  const bool peer = dynamic_cast<const PeerLost*>(&e) != nullptr;
  const std::string lost = e.what();
  const bool closed = lost.find("losed") != std::string::npos || lost.find("reset") != std::string::npos ||
                      lost.find("a rank stopped") != std::string::npos;
  const std::string slow =  // rank 0 waits only for ranks that wait for it
      waiting_for && !closed && !lead
          ? fmt::format(" This rank was waiting for {}: one that takes longer than --dist-timeout ({:g} s) looks the "
                        "same; give a longer one.",
                        waiting_for, config.dist.timeout.count() / 1000.0)
          : std::string();
  const std::string when = waiting_for ? fmt::format("after iteration {}", it) : fmt::format("during iteration {}", it + 1);
  // Lost after another rank was asked to stop: most likely a second signal ended it at once.
  // The run was interrupted, not failed: its summary says so, and this rank ends by the
  // signal too, as where the ranks stop together, so that a loop of runs on its machine stops
  // (it exited 1, and the loop started its next run). Its own signal alone does not make a
  // lost peer (a crash, say) an interruption.
  if (peer && other_stop_asked()) {
    const std::string why = fmt::format("rank {} of {}: interrupted: another rank was asked to stop, and the ranks "
                                        "were lost {} ({}).{}{}",
                                        config.dist.rank, config.dist.world, when, lost, slow, saved);
    try_summary("interrupted", why);
    throw Stopped(why, asked_signal());
  }
  const std::string why = peer ? fmt::format("rank {} of {}: lost the other ranks {} ({}).{}{}", config.dist.rank,
                                             config.dist.world, when, lost, slow, saved)
                               : sentence(error_message(e)) + saved;
  try_summary("failed", why);
  throw std::runtime_error(why);
}

TrainResult Run::finish() {
  result.iteration = it;
  if (!config.export_path.empty() && !result.interrupted && lead) {
    try {
      if (fail_at.first == "export") throw std::runtime_error("the export failed (BLPA_TEST_FAIL)");
      export_state_dict(config.export_path, model, config.run_id);
    } catch (const std::exception& e) {  // the run is whole (its final checkpoint written), its export not
      const std::string why = resumable(e, "export and the summary");
      try_summary("failed", why);
      throw std::runtime_error(why);
    }
  }
  try {
    write_summary(result.interrupted ? "interrupted" : "done");
  } catch (const std::exception& e) {
    throw std::runtime_error(resumable(e, "summary"));
  }
  return result;
}

}  // namespace

TrainResult train(const TrainConfig& config, const std::atomic<bool>* stop, SummaryDraft* draft,
                  const std::atomic<int>* signal) {
  return Run(config, stop, draft, signal).train();
}

}  // namespace blpa
