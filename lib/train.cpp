#include "blpa/train.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cctype>
#include <iterator>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fmt/format.h>
#include <fstream>
#include <map>
#include <optional>
#include <random>
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

namespace blpa {
namespace {

// A message as a sentence: with its full stop.
std::string sentence(std::string m) { return m.empty() || std::strchr(".!?", m.back()) ? m : m + "."; }

// The progress line and its ends, on stderr. A console that cannot take them (its reader gone,
// a full disk) loses them: fmt::print would throw and end the run.
template <typename... Args>
void console(fmt::format_string<Args...> format, Args&&... args) {
  const std::string text = fmt::format(format, std::forward<Args>(args)...);
  const size_t written = std::fwrite(text.data(), 1, text.size(), stderr);
  (void)written;
}

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

// The data sets a folder's files can be, each with the files that mark it and the other data
// sets it serves (MNIST's IDX files are named as Fashion-MNIST's; CIFAR-100's files hold the
// coarse labels too).
struct Layout {
  const char* dataset;
  const char* files;
  std::vector<std::string> markers;  // all present
  std::vector<std::string> also;
};
const std::vector<Layout>& layouts() {
  static const std::vector<Layout> all{
      {"imagenet", "ImageNet's folders (train/, val/)", {"train", "val"}, {}},
      {"cifar10", "CIFAR-10's files (data_batch_1.bin)", {"data_batch_1.bin"}, {}},
      {"cifar100", "CIFAR-100's files (train.bin)", {"train.bin"}, {"cifar100-coarse"}},
      {"fashion-mnist", "IDX files (train-images-idx3-ubyte[.gz], MNIST's or Fashion-MNIST's)",
       {"train-images-idx3-ubyte"}, {"mnist"}}};
  return all;
}

bool holds(const fs::path& d, const Layout& l) {
  std::error_code ec;
  for (const auto& m : l.markers)
    if (!fs::exists(d / m, ec) && !(m.rfind("train-images", 0) == 0 && fs::exists(d / (m + ".gz"), ec))) return false;
  return true;
}

// MNIST's and Fashion-MNIST's files have the same names: a folder of either is told by its
// images, whose mean pixel is about 33 in MNIST (and 45-50 in EMNIST and KMNIST, digits or
// letters on black) and 73 in Fashion-MNIST. "" where the file cannot say (the load reports why).
std::string idx_kind(const std::string& dir) {
  const double mean = data::idx_mean_pixel(data::idx_file(dir, "train-images-idx3-ubyte"), 1000);
  if (std::isnan(mean)) return "";
  return mean < 58 ? "mnist" : "fashion-mnist";
}

bool serves(const Layout& l, const std::string& dataset) {
  return l.dataset == dataset || std::find(l.also.begin(), l.also.end(), dataset) != l.also.end();
}

std::string resolve_dataset(const TrainConfig& c) {
  if (c.data_dir.empty() && c.dataset != "auto" && c.dataset != "fashion-mnist" && c.train_list.empty())
    throw FlagError("--dataset " + c.dataset + " needs --data-dir (only Fashion-MNIST has a default)");
  std::error_code ec;
  if (!c.data_dir.empty() && !fs::exists(c.data_dir, ec))
    throw std::runtime_error("--data-dir " + c.data_dir + ": no such folder");
  if (!c.data_dir.empty() && !fs::is_directory(c.data_dir, ec))
    throw std::runtime_error("--data-dir " + c.data_dir + ": not a folder");
  if (!c.train_list.empty() || !c.val_list.empty()) {
    if (c.train_list.empty() || c.val_list.empty()) throw FlagError("--train-list and --val-list go together");
    if (c.dataset != "auto" && c.dataset != "imagenet")
      throw FlagError("--train-list and --val-list are for --dataset imagenet");
    return "imagenet";
  }
  if (c.data_dir.empty()) return c.dataset != "auto" ? c.dataset : "fashion-mnist";
  const Layout* found = nullptr;  // the first layout the folder holds; the named one's first
  for (const auto& l : layouts())
    if ((!found || serves(l, c.dataset)) && holds(c.data_dir, l)) found = &l;
  const bool idx = found && std::string(found->dataset) == "fashion-mnist";
  if (c.dataset == "auto") {
    if (idx) {
      const std::string kind = idx_kind(c.data_dir);
      return kind.empty() ? found->dataset : kind;
    }
    if (found) return found->dataset;
    throw std::runtime_error("--data-dir " + c.data_dir +
                             ": no CIFAR-10 (data_batch_1.bin), CIFAR-100 (train.bin), IDX "
                             "(train-images-idx3-ubyte[.gz]) files or ImageNet folders (train/, val/) found: is it the "
                             "data set's folder?");
  }
  // Named, and the folder holds another data set's files: said, not "data_batch_1.bin: not found".
  if (found && !serves(*found, c.dataset))
    throw std::runtime_error(fmt::format("--dataset {}: --data-dir {} holds {}, not {}'s: give its folder, or "
                                         "leave --dataset out to train on what is there",
                                         c.dataset, c.data_dir, found->files, c.dataset));
  // Named as the other of the two: said, but not refused (other IDX sets are named either).
  if (idx && serves(*found, c.dataset))
    if (const std::string kind = idx_kind(c.data_dir); !kind.empty() && kind != c.dataset)
      spdlog::warn("--dataset {}: the images in --data-dir {} look like {}'s (by their mean pixel), whose classes "
                   "are {}: the run and blpa-predict name them as {}'s",
                   c.dataset, c.data_dir, kind, kind == "mnist" ? "digits" : "clothes", c.dataset);
  // ImageNet's folder named one level too deep (its train/) failed as ".../train/train: cannot open".
  if (!found && c.dataset == "imagenet") {
    const bool train = fs::is_directory(fs::path(c.data_dir) / "train", ec);
    throw std::runtime_error("--data-dir " + c.data_dir + ": no " +
                             (train ? "val/ folder beside its train/" : "train/ and val/ folders: give the folder that "
                                                                        "holds them") +
                             " (or give --train-list and --val-list)");
  }
  return c.dataset;
}

data::Dataset subset(data::Dataset d, int64_t n) {
  if (n > 0 && n < d.size()) {
    d.images = d.images.narrow(0, 0, n).contiguous();
    d.labels = d.labels.narrow(0, 0, n).contiguous();
  }
  return d;
}


// Loss, top-1 and top-5 over batches whose labels may be -1 (an image that failed to
// decode: left out). `views` rows of the batch belong to each label (10-crop: 10); their
// softmax outputs are averaged.
struct EvalSums {
  double loss = 0;
  int64_t top1 = 0, top5 = 0, count = 0;
  void add(const torch::Tensor& logits, const torch::Tensor& labels_in, int64_t views) {
    auto labels = labels_in.to(logits.device());
    // log of the views' mean probability, without forming probabilities that underflow: the
    // loss is the training loss's cross-entropy for one view.
    auto prob = torch::log_softmax(logits.to(torch::kFloat), 1);
    if (views > 1) prob = prob.view({labels.size(0), views, -1}).logsumexp(1) - std::log(static_cast<double>(views));
    auto valid = labels.ge(0);
    const int64_t n = valid.sum().item<int64_t>();
    if (n == 0) return;
    if (n < labels.size(0)) {
      auto keep = valid.nonzero().squeeze(1);
      prob = prob.index_select(0, keep);
      labels = labels.index_select(0, keep);
    }
    loss += torch::nll_loss(prob, labels, {}, at::Reduction::Sum).item<double>();
    auto k = std::min<int64_t>(5, prob.size(1));
    auto top = std::get<1>(prob.topk(k, 1));
    auto hit = top.eq(labels.unsqueeze(1));
    top1 += hit.select(1, 0).sum().item<int64_t>();
    top5 += hit.any(1).sum().item<int64_t>();
    count += n;
  }
  EvalResult result(int64_t failed) const {
    const double n = std::max<int64_t>(count, 1);
    EvalResult r;
    r.loss = loss / n, r.top1 = top1 / n, r.top5 = top5 / n, r.count = count, r.failed = failed;
    return r;
  }
};

EvalResult evaluate(ResNet& model, const data::Dataset& test, const data::Normalisation& norm, int64_t batch,
                    const torch::Device& dev, const std::atomic<bool>* stop = nullptr) {
  torch::NoGradGuard no_grad;
  const bool was_training = model->is_training();
  model->eval();
  EvalSums sums;
  bool interrupted = false;
  for (int64_t s = 0; s < test.size(); s += batch) {
    if (stop && stop->load()) {
      interrupted = true;
      break;
    }
    std::vector<int64_t> idx;
    for (int64_t i = s; i < std::min(test.size(), s + batch); ++i) idx.push_back(i);
    auto b = data::make_batch(test, idx, norm, nullptr, 0);
    sums.add(model->forward(b.images.to(dev)), b.labels, 1);
  }
  if (was_training) model->train();
  auto r = sums.result(0);
  r.interrupted = interrupted;
  return r;
}

std::string duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const int64_t t = static_cast<int64_t>(s);
  return t >= 3600 ? fmt::format("{}h{:02d}m", t / 3600, t / 60 % 60) : fmt::format("{}m{:02d}s", t / 60, t % 60);
}

}  // namespace

EvalResult evaluate_images(ResNet& model, const data::ImageList& list, const ImageEvalOptions& o) {
  torch::NoGradGuard no_grad;
  const bool was_training = model->is_training();
  model->eval();
  const torch::Device dev(o.device);
  const int64_t batches = (list.size() + o.batch - 1) / o.batch;
  data::DecodeErrors errors;
  const auto norm = data::imagenet_normalisation();
  const bool pin = dev.is_cuda();
  data::BatchStream stream(
      [&](int64_t b) {
        if (b >= batches) return data::Batch{};
        const int64_t first = b * o.batch, n = std::min(o.batch, list.size() - first);
        return data::imagenet_eval_batch(list, first, n, o.resize_short, o.crop, o.ten_crop, norm, &errors, pin);
      },
      0, o.workers, o.workers + 1);
  EvalSums sums;
  bool interrupted = false;
  for (int64_t b = 0; b < batches; ++b) {
    if (o.stop && o.stop->load()) {
      interrupted = true;
      break;
    }
    auto batch = stream.next();
    sums.add(model->forward(batch.images.to(dev, /*non_blocking=*/true)), batch.labels, o.ten_crop ? 10 : 1);
    if (o.progress && ((b + 1) % 20 == 0 || b + 1 == batches))
      console("\revaluated {}/{} images", std::min((b + 1) * o.batch, list.size()), list.size());
  }
  if (o.progress) console("\n");
  if (was_training) model->train();
  auto r = sums.result(errors.count.load());
  r.interrupted = interrupted;
  return r;
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

int default_workers(const std::string& dataset, int local_world) {
  if (dataset != "imagenet") return 2;
  const int cores = static_cast<int>(std::thread::hardware_concurrency());
  return std::clamp(cores / std::max(local_world, 1), 1, 16);
}

std::string default_cache_dir() {
  const char* xdg = std::getenv("XDG_CACHE_HOME");
  const char* home = std::getenv("HOME");
  if (xdg && *xdg) return std::string(xdg) + "/blpa";
  return home && *home ? std::string(home) + "/.cache/blpa" : "";
}

namespace {

// Class names in the checkpoint's one-line `classes=` list: comma-separated, with '%', ',' and
// line breaks written %XX (a folder's name may hold any of them).
std::string class_list(const std::vector<std::string>& names) {
  std::string out;
  for (size_t i = 0; i < names.size(); ++i) {
    if (i > 0) out += ',';
    for (const char ch : names[i])
      out += ch == '%' || ch == ',' || ch == '\n' || ch == '\r' ? fmt::format("%{:02X}", static_cast<unsigned char>(ch))
                                                              : std::string(1, ch);
  }
  return out;
}

}  // namespace

std::vector<std::string> checkpoint_classes(const Checkpoint& ck) {
  std::vector<std::string> names;
  const auto at = ck.config.find("classes");
  if (at == ck.config.end() || at->second.empty()) return names;
  std::string name;
  const std::string& text = at->second;
  for (size_t i = 0; i <= text.size(); ++i) {
    if (i == text.size() || text[i] == ',') {
      names.push_back(name);
      name.clear();
    } else if (text[i] == '%' && i + 2 < text.size() && std::isxdigit(static_cast<unsigned char>(text[i + 1])) &&
               std::isxdigit(static_cast<unsigned char>(text[i + 2]))) {
      name += static_cast<char>(std::strtol(text.substr(i + 1, 2).c_str(), nullptr, 16));
      i += 2;
    } else {
      name += text[i];
    }
  }
  return names;
}

namespace {

// A list file read, and its first image looked for: a list whose paths are taken from the
// wrong folder failed only at the first batch, as "100 images in a row could not be read".
data::ImageList read_list(const std::string& flag, const std::string& file, const std::string& base) {
  data::ImageList l = data::read_image_list(file, base);
  const std::string first = l.path(0);
  if (::access(first.c_str(), F_OK) != 0)
    throw std::runtime_error(fmt::format("{} {}: its first image, {}, is not at {} (paths are taken from {}): give "
                                         "the folder they are relative to with --data-dir",
                                         flag, file, l.paths.front().substr(0, 200), first.substr(0, 300),
                                         base.empty() ? "the list's folder" : "--data-dir " + base));
  // An image listed twice is trained on (or scored) once per entry: said, as it may not be
  // meant. Listed with two labels, it is an error of the list. Paths are compared by their
  // hashes first (sorted), which ImageNet's 1.28M entries take in a fraction of a second.
  std::vector<std::pair<size_t, size_t>> hashed(l.paths.size());
  for (size_t i = 0; i < l.paths.size(); ++i) hashed[i] = {std::hash<std::string>{}(l.paths[i]), i};
  std::sort(hashed.begin(), hashed.end());
  size_t repeats = 0, first_repeat = 0;
  for (size_t j = 1; j < hashed.size(); ++j)
    for (size_t k = j; k-- > 0 && hashed[k].first == hashed[j].first;) {
      const size_t a = std::min(hashed[k].second, hashed[j].second), b = std::max(hashed[k].second, hashed[j].second);
      if (l.paths[a] != l.paths[b]) continue;  // another path of the same hash
      if (l.labels[a] != l.labels[b])
        throw std::runtime_error(fmt::format("{} {}: {} is listed with label {} and again with label {}", flag, file,
                                             l.paths[a].substr(0, 300), l.labels[a], l.labels[b]));
      if (repeats++ == 0 || b < first_repeat) first_repeat = b;
      break;
    }
  if (repeats > 0)
    spdlog::warn("{} {}: {} {} an image listed before (first: {}), which counts once per entry", flag, file, repeats,
                 repeats == 1 ? "entry repeats" : "entries repeat", l.paths[first_repeat].substr(0, 300));
  return l;
}

// A folder's labels renumbered as the checkpoint's run numbered its classes (by name): a
// val/ with a class folder missing or renamed was numbered otherwise, and scored with
// shifted labels. A class the network was not trained on is refused.
void relabel_as_trained(data::ImageList& list, const std::vector<std::string>& trained, const std::string& where) {
  if (trained.empty() || list.classes.empty() || list.classes == trained) return;
  std::map<std::string, int64_t> index;
  for (size_t i = 0; i < trained.size(); ++i) index[trained[i]] = static_cast<int64_t>(i);
  std::vector<int64_t> to(list.classes.size());
  for (size_t i = 0; i < list.classes.size(); ++i) {
    const auto at = index.find(list.classes[i]);
    if (at == index.end())
      throw std::runtime_error(fmt::format("{}: class folder {} is not one of the {} classes the network was trained "
                                           "on",
                                           where, list.classes[i], trained.size()));
    to[i] = at->second;
  }
  for (auto& label : list.labels) label = to[static_cast<size_t>(label)];
  if (list.classes.size() < trained.size())
    spdlog::warn("{}: {} of the network's {} classes {} no folder here; the others are scored under their "
                 "trained labels", where, trained.size() - list.classes.size(), trained.size(),
                 trained.size() - list.classes.size() == 1 ? "has" : "have");
  list.classes = trained;
  list.num_classes = static_cast<int64_t>(trained.size());
}

}  // namespace

std::string checkpoint_data_dir(const Checkpoint& ck, const std::string& given) {
  if (!given.empty()) return given;
  const auto at = ck.config.find("data_dir");
  if (at == ck.config.end() || at->second.empty()) return data::kDebianFashionMnist;
  std::error_code ec;
  if (!fs::is_directory(at->second, ec))
    throw std::runtime_error(fmt::format(
        "{}: the folder its run was trained on, {}, is not there{}: give the data with --data-dir", ck.path,
        at->second,
        fs::path(at->second).is_relative() ? " (a relative path, from the folder the run was started in)" : ""));
  return at->second;
}

EvalResult evaluate_checkpoint(const CheckpointEval& e) {
  const Checkpoint ck = read_checkpoint(e.checkpoint);
  auto kv = ck.config;
  const std::string dataset = kv["dataset"];
  if (dataset != "imagenet" && !e.imagenet_flags.empty())
    throw FlagError(fmt::format("{} appl{} to ImageNet checkpoints only; {} was trained on {}",
                                fmt::join(e.imagenet_flags, ", "), e.imagenet_flags.size() > 1 ? "y" : "ies",
                                e.checkpoint, dataset));
  const std::string dir = e.val_list.empty() && kv["val_list"].empty() ? checkpoint_data_dir(ck, e.data_dir) : "";
  ResNet model = load_model(ck);
  const torch::Device dev(e.options.device);
  model->to(dev);
  const Numerics numerics =
      numerics_for(eval_precision(e.options.precision, kv["precision"], dev), e.options.memory_format, dev);
  model->set_numerics(numerics);
  apply_precision(numerics.precision, dev);
  const auto ran_in = [&](EvalResult r) {
    r.numerics = numerics;
    r.iteration = ck.state.iteration;
    r.run_id = kv["run_id"];
    return r;
  };
  if (dataset == "imagenet") {
    data::ScanReport report;
    // A list's relative paths: from --data-dir; else, for a run trained from lists, from the
    // folder it took them from (its --data-dir, where given and still there); else from the
    // list's own folder.
    std::error_code ec;
    const std::string base = !e.data_dir.empty() ? e.data_dir
                             : !kv["train_list"].empty() && fs::is_directory(kv["data_dir"], ec) ? kv["data_dir"]
                                                                                                 : std::string();
    data::ImageList val = !e.val_list.empty() ? read_list("--val-list", e.val_list, base)
                          : !kv["val_list"].empty() ? read_list("--val-list", kv["val_list"], base)
                          : data::scan_image_folder(dir + "/val", e.index_cache, std::max(4, e.options.workers), &report);
    data::print_scan_warnings(report, dir + "/val");  // as blpa-train's scan
    relabel_as_trained(val, checkpoint_classes(ck), dir + "/val");
    if (val.num_classes > ck.net.num_classes) {  // only a list's labels can: a folder's were renumbered above
      const std::string list = !e.val_list.empty() ? e.val_list : kv["val_list"];
      const auto above = std::find_if(val.labels.begin(), val.labels.end(),
                                      [&](int64_t label) { return label >= ck.net.num_classes; });
      throw std::runtime_error(fmt::format("--val-list {}: {} has label {}, but the network has {} classes (0 to {})",
                                           list, val.paths[static_cast<size_t>(above - val.labels.begin())], *above,
                                           ck.net.num_classes, ck.net.num_classes - 1));
    }
    if (!val.classes.empty()) val.num_classes = ck.net.num_classes;
    return ran_in(evaluate_images(model, data::spread_subset(std::move(val), e.subset), e.options));
  }
  // The normalisation is the trainer's: the statistics of the training images it used.
  const data::Dataset train = subset(data::load(dataset, dir, true), ck.train_subset);
  const data::Dataset test = subset(data::load(dataset, dir, false), e.subset);
  return ran_in(evaluate(model, test, data::channel_stats(train), e.options.batch, dev, e.options.stop));
}

std::string eval_precision(const std::string& requested, const std::string& trained, const torch::Device& device) {
  if (requested != "auto" || trained.empty()) return requested;
  return trained == "tf32" && !device.is_cuda() ? "fp32" : trained;
}

double TrainConfig::lr_at(int64_t it) const {
  if (it < warmup) return warmup_lr;
  double r = lr;
  for (int64_t s : steps)
    if (it >= s) r *= factor;
  return r;
}

const std::vector<std::string>& TrainConfig::identity_keys() {
  static const std::vector<std::string> keys{"dataset", "train_subset", "augment", "arch",      "depth",
                                             "mode",    "batch",        "seed",    "precision", "world"};
  return keys;
}

std::string TrainConfig::identity() const {
  return fmt::format("dataset={} train_subset={} augment={} arch={} depth={} mode={} batch={} seed={} precision={}{}",
                     dataset, train_subset, augment, arch, depth, mode.str(), batch, seed, precision,
                     dist.enabled() ? fmt::format(" world={}", dist.world) : std::string());
}

std::string TrainConfig::rank_agreement() const {
  return fmt::format(
      "{} world={} iterations={} lr={} warmup={} warmup_lr={} steps={} factor={} momentum={} weight_decay={} "
      "accum_steps={} log_every={} eval_every={} checkpoint_every={} resume={}",
      identity(), dist.world, iterations, lr, warmup, warmup_lr, fmt::join(steps, ","), factor, momentum,
      weight_decay, accum_steps, log_every, eval_every, checkpoint_every, resume);
}

std::string TrainConfig::describe() const {
  return fmt::format(
      "dataset={}\ndata_dir={}\ntrain_subset={}\ntest_subset={}\naugment={}\narch={}\ndepth={}\nmode={}\nbatch={}\n"
      "iterations={}\nlr={}\nwarmup={}\nwarmup_lr={}\nsteps={}\nfactor={}\nmomentum={}\nweight_decay={}\ndevice={}\n"
      "seed={}\nthreads={}\nworkers={}\naccum_steps={}\ntrain_list={}\nval_list={}\nworld={}\nlog_every={}\n"
      "eval_every={}\ncheckpoint_every={}\ncuda_graphs={}\nprecision={}\nmemory_format={}\n",
      dataset, data_dir, train_subset, test_subset, augment, arch, depth, mode.str(), batch, iterations, lr, warmup,
      warmup_lr, fmt::join(steps, ","), factor, momentum, weight_decay, device, seed, threads, workers, accum_steps,
      train_list, val_list, dist.world, log_every, eval_every, checkpoint_every, cuda_graphs, precision, memory_format);
}

namespace {
// The length of the well-formed UTF-8 sequence at s[i] (RFC 3629: no overlong forms, no
// surrogates, nothing past U+10FFFF), or 0.
size_t utf8_length(const std::string& s, size_t i) {
  const auto at = [&](size_t k) { return i + k < s.size() ? static_cast<unsigned char>(s[i + k]) : 0u; };
  const unsigned lead = at(0);
  const auto cont = [&](size_t k, unsigned lo = 0x80, unsigned hi = 0xbf) { return at(k) >= lo && at(k) <= hi; };
  if (lead >= 0xc2 && lead <= 0xdf) return cont(1) ? 2 : 0;
  if (lead >= 0xe0 && lead <= 0xef)
    return cont(1, lead == 0xe0 ? 0xa0 : 0x80, lead == 0xed ? 0x9f : 0xbf) && cont(2) ? 3 : 0;
  if (lead >= 0xf0 && lead <= 0xf4)
    return cont(1, lead == 0xf0 ? 0x90 : 0x80, lead == 0xf4 ? 0x8f : 0xbf) && cont(2) && cont(3) ? 4 : 0;
  return 0;
}
}  // namespace

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (size_t i = 0; i < s.size();) {
    const unsigned char ch = static_cast<unsigned char>(s[i]);
    if (ch < 0x80) {
      if (ch == '"' || ch == '\\') out += '\\', out += static_cast<char>(ch);
      else if (ch < 0x20 || ch == 0x7f) out += fmt::format("\\u{:04x}", static_cast<int>(ch));
      else out += static_cast<char>(ch);
      ++i;
    } else if (const size_t n = utf8_length(s, i); n > 0) {
      out.append(s, i, n);
      i += n;
    } else {  // a byte of no UTF-8 character (a path in another encoding): JSON must be UTF-8
      out += "\\ufffd";
      ++i;
    }
  }
  return out + "\"";
}

namespace {

double unix_time() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// A loss for a JSON record: NaN and Inf, which JSON has no words for, are null.
std::string json_loss(double v) { return std::isfinite(v) ? fmt::format("{:.6g}", v) : "null"; }

// A non-finite loss in words: NaN (whatever its sign bit, which fmt prints as "-nan"), Inf, -Inf.
std::string non_finite(double v) { return std::isnan(v) ? "NaN" : v > 0 ? "Inf" : "-Inf"; }

}  // namespace

std::string TrainConfig::json() const {
  return fmt::format(
      "{{\"dataset\": {}, \"data_dir\": {}, \"train_subset\": {}, \"test_subset\": {}, \"augment\": {}, "
      "\"arch\": {}, \"depth\": {}, \"mode\": {}, \"bits\": {}, \"batch\": {}, \"accum_steps\": {}, "
      "\"iterations\": {}, \"lr\": {}, \"warmup\": {}, \"warmup_lr\": {}, \"steps\": [{}], \"factor\": {}, "
      "\"momentum\": {}, \"weight_decay\": {}, \"device\": {}, \"seed\": {}, \"threads\": {}, \"workers\": {}, "
      "\"world\": {}, \"log_every\": {}, \"eval_every\": {}, \"checkpoint_every\": {}, \"cuda_graphs\": {}, "
      "\"precision\": {}, \"memory_format\": {}, \"train_list\": {}, \"val_list\": {}, \"run_id\": {}}}",
      json_string(dataset), json_string(data_dir), train_subset, test_subset, augment, json_string(arch), depth, json_string(mode.str()),
      (mode.mode == Mode::blpa || mode.mode == Mode::naive) ? mode.bits : 32, batch, accum_steps, iterations, lr,
      warmup, warmup_lr, fmt::join(steps, ", "), factor, momentum, weight_decay, json_string(device), seed, threads,
      workers, dist.world, log_every, eval_every, checkpoint_every, json_string(cuda_graphs), json_string(precision),
      json_string(memory_format), json_string(train_list), json_string(val_list), json_string(run_id));
}

void TrainConfig::validate() const {
  auto bad = [](const std::string& m) { throw FlagError(m); };
  if (!std::set<std::string>{"auto", "cifar10", "cifar100", "cifar100-coarse", "fashion-mnist", "mnist", "imagenet"}
           .count(dataset))
    bad("--dataset must be auto, cifar10, cifar100, cifar100-coarse, fashion-mnist, mnist or imagenet, got '" +
        dataset + "'");
  if (batch <= 0) bad("--batch must be positive");
  if (iterations <= 0) bad("--iterations must be positive");
  if (!(lr > 0) || !(warmup_lr > 0) || !std::isfinite(lr) || !std::isfinite(warmup_lr))
    bad("--lr and --warmup-lr must be positive and finite");
  if (warmup < 0) bad("--warmup must be >= 0");
  if (!(factor > 0 && factor <= 1)) bad("--lr-factor must be in (0, 1]");
  if (!(momentum >= 0 && momentum < 1)) bad("--momentum must be in [0, 1)");
  if (!(weight_decay >= 0) || !std::isfinite(weight_decay)) bad("--weight-decay must be >= 0 and finite");
  for (size_t i = 0; i < steps.size(); ++i)
    if (steps[i] <= 0 || (i > 0 && steps[i] <= steps[i - 1])) bad("--lr-steps must be positive and increasing");
  if ((mode.mode == Mode::blpa || mode.mode == Mode::naive) && mode.bits != 8 && mode.bits != 4 && mode.bits != 2)
    bad("--bits must be 8, 4 or 2");
  if (!(mode.window == 0 || (std::isfinite(mode.window) && mode.window > 0)))
    bad("--window must be a positive width in units of x_hat");
  if (mode.lift && !std::isfinite(*mode.lift)) bad("--lift must be a finite number of units of x_hat");
  // The checkpoint records its run's settings one per line: a path of two lines would read
  // back as another setting (and the log's and summary's readers take lines too).
  for (const auto& [flag, path] : {std::pair<const char*, const std::string&>{"--data-dir", data_dir},
                                   {"--train-list", train_list}, {"--val-list", val_list},
                                   {"--index-cache", index_cache}, {"--checkpoint", checkpoint},
                                   {"--log", log_path}, {"--export", export_path}, {"--summary", summary_path}})
    if (path.find_first_of("\n\r") != std::string::npos)
      bad(std::string(flag) + ": a path with a line break in it is not taken (the checkpoint records paths one "
          "per line)");
  if (arch == "cifar") {
    if (depth < 11 || (depth - 2) % 9 != 0)
      bad("--depth " + std::to_string(depth) + ": a cifar network has depth 9n+2, n >= 1 (11, 20, 29, ..., 164, 1001)");
  } else if (arch == "imagenet") {
    if (depth != 50 && depth != 101 && depth != 152 && depth != 200)
      bad("--depth " + std::to_string(depth) + ": an imagenet network has depth 50, 101, 152 or 200");
  } else {
    bad("--model must be cifar or imagenet, got '" + arch + "'" +
        (arch.rfind("resnet", 0) == 0 ? "; the depth is a flag of its own: --model cifar --depth 20, or --model "
                                        "imagenet --depth 152"
                                      : ""));
  }
  if (train_subset < 0 || test_subset < 0) bad("--train-subset and --test-subset must be >= 0 (0: all)");
  check_threads(threads);
  if (resume && checkpoint.empty()) bad("--resume needs --checkpoint PATH");
  if (resume && overwrite) bad("--resume continues a run and --overwrite starts a new one: give one of them");
  if (auto_resume && checkpoint.empty()) bad("--auto-resume needs --checkpoint PATH");
  if (auto_resume && resume) bad("--auto-resume resumes where --checkpoint exists: give it without --resume");
  // Where the checkpoint is gone (deleted, or another path given), --overwrite would replace a
  // finished run's log, summary and export: a run that cannot resume is replaced by hand.
  if (auto_resume && overwrite)
    bad("--auto-resume keeps existing runs and --overwrite replaces them: give one of them");
  if (log_every <= 0 || eval_every < 0 || checkpoint_every <= 0)
    bad("--log-every and --checkpoint-every must be positive, --eval-every >= 0");
  if (workers < 0 || workers > kMaxWorkers || prefetch <= 0)
    bad("--workers must be 0 (automatic) to " + std::to_string(kMaxWorkers) + " and --prefetch positive");
  if (dist.local_world < 1) bad("LOCAL_WORLD_SIZE must be positive");
  if (accum_steps <= 0 || batch % accum_steps != 0) bad("--accum-steps must be positive and divide --batch");
  bool cpu = false;
  try {
    cpu = parse_device(device).is_cpu();
  } catch (const std::invalid_argument& e) {
    bad(e.what());
  }
  if (precision != "auto" && precision != "fp32" && precision != "tf32" && precision != "bf16")
    bad("--precision must be fp32, tf32, bf16 or auto, got '" + precision + "'");
  if (precision == "tf32" && cpu) bad("--precision tf32 needs --device cuda (TF32 is a GPU tensor-core format); on the CPU use fp32 or bf16");
  if (memory_format != "auto" && memory_format != "nchw" && memory_format != "nhwc")
    bad("--memory-format must be nchw, nhwc or auto, got '" + memory_format + "'");
  if (cuda_graphs != "auto" && cuda_graphs != "on" && cuda_graphs != "off")
    bad("--cuda-graphs must be auto, on or off, got '" + cuda_graphs + "'");
  if (cuda_graphs == "on" && cpu) bad("--cuda-graphs on needs --device cuda (CUDA graphs replay GPU work)");
  if (dist.backend != "auto" && dist.backend != "gloo" && dist.backend != "nccl")
    bad("--dist-backend must be auto, gloo or nccl, got '" + dist.backend + "'");
  if (dist.backend == "nccl" && cpu) bad("--dist-backend nccl needs --device cuda");
  if (cuda_graphs == "on" && dist.enabled())
    bad("--cuda-graphs on: not with several ranks (their all-reduce is not captured); use auto or off");
  // Two outputs on one path would overwrite each other.
  std::map<std::string, std::string> outputs;
  for (const auto& [path, flag] : {std::pair{checkpoint, "--checkpoint"}, std::pair{log_path, "--log"},
                                   std::pair{export_path, "--export"}, std::pair{summary_path, "--summary"}}) {
    if (path.empty()) continue;
    std::error_code ec;  // the file written: through a link, the one it names (which may not exist yet)
    const std::string key = fs::weakly_canonical(fs::absolute(link_target(path)), ec).string();
    if (ec) bad(std::string(flag) + " " + path + ": " + ec.message());  // a loop of symbolic links
    if (outputs.count(key)) bad(std::string(flag) + " and " + outputs[key] + " name the same file, " + path);
    outputs[key] = flag;
  }
  // Nor may one be another's lock (PATH.lock) or temporary file (PATH.tmp), which the run
  // empties and removes.
  for (const auto& [key, flag] : outputs)
    for (const char* suffix : {".lock", ".tmp"})
      if (outputs.count(key + suffix))
        bad(outputs.at(key + suffix) + " names " + flag + "'s " + suffix + " file, which the run writes and removes");
}

void TrainConfig::resolve() {
  dataset = resolve_dataset(*this);
  // Named, so that the log and the checkpoint say where the images came from; absolute, so
  // that blpa-eval and blpa-predict find them from any folder.
  if (data_dir.empty() && train_list.empty()) data_dir = data::kDebianFashionMnist;
  for (std::string* path : {&data_dir, &train_list, &val_list}) {
    if (path->empty()) continue;
    const fs::path whole = fs::absolute(*path);
    // "a/../b" read as "b", where it is the same file: not where "a" is a link, whose ".." is
    // its target's parent. Links themselves are kept.
    fs::path p = whole.lexically_normal();
    std::error_code ec;
    if (!fs::equivalent(p, whole, ec) || ec) p = whole;
    if (!p.has_filename() && p.has_parent_path() && p != p.root_path()) p = p.parent_path();  // "dir/"
    *path = p.string();
  }
  torch::Device dev(device);
  if (dev.is_cuda() && dist.enabled() && !dev.has_index())
    dev = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(dist.local_rank));
  device = dev.str();
  resolve_numerics();
  if (workers == 0) workers = default_workers(dataset, dist.local_world);
  if (threads == 0) threads = at::get_num_threads();  // LibTorch's own count, recorded as what ran
}

void TrainConfig::resolve_numerics() {
  const Numerics n = numerics_for(precision, memory_format, torch::Device(device));
  precision = to_string(n.precision);
  memory_format = layout_name(n.layout);
}

void TrainConfig::check_device() const {
  const torch::Device dev(device);
  if (dev.is_cuda() && !torch::cuda::is_available())
    throw FlagError("--device " + device + ": this machine has no CUDA device");
  if (dev.is_cuda() && dev.index() >= static_cast<int>(torch::cuda::device_count()))
    throw FlagError(
        fmt::format("--device {}: this machine has {} CUDA device(s)", device, torch::cuda::device_count()));
}

Numerics TrainConfig::numerics() const {
  TORCH_CHECK(precision != "auto" && memory_format != "auto", "TrainConfig::numerics before resolve_numerics");
  return {parse_precision(precision), parse_layout(memory_format)};
}

namespace {
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

namespace {

// The JSON-lines log. Every record is one write(2), checked: a full disk or an unwritable
// file stops the run with the reason, never loses records silently.
class LogFile {
 public:
  LogFile() = default;
  ~LogFile() {
    if (fd_ >= 0) ::close(fd_);
  }
  LogFile(const LogFile&) = delete;
  LogFile& operator=(const LogFile&) = delete;
  // The open file is locked too (flock, by the file rather than its name): a second name for
  // it (a hard link) that another run opens is refused before that run empties it.
  void open(const std::string& path, bool append) {
    path_ = path;
    fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC | (append ? O_APPEND : 0), 0644);
    if (fd_ < 0) throw std::runtime_error("--log " + path + ": cannot be opened for writing (" + std::strerror(errno) + ")");
    struct stat st{};
    if (::fstat(fd_, &st) == 0 && S_ISREG(st.st_mode)) {
      if (::flock(fd_, LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK)
        throw std::runtime_error("--log " + path + " is in use by another blpa-train, under another name (a hard "
                                 "link): wait for it to end, or give another path");
      if (!append && ::ftruncate(fd_, 0) != 0)
        throw std::runtime_error("--log " + path + ": cannot be emptied (" + std::strerror(errno) + ")");
    }
  }
  explicit operator bool() const { return fd_ >= 0; }
  // A record cut short (a full disk) is cut off again, so that the log ends with whole lines.
  void write(const std::string& record) {
    if (fd_ < 0) return;
    const off_t end = ::lseek(fd_, 0, SEEK_END);  // -1 for a pipe: nothing to cut there
    const char* p = record.data();
    for (size_t left = record.size(); left > 0;) {
      const ssize_t w = ::write(fd_, p, left);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) {
        const std::string why = w < 0 ? std::strerror(errno) : "no progress";
        if (end >= 0 && left < record.size()) {
          const int cut = ::ftruncate(fd_, end);  // if this fails, --resume drops the line: it has no newline
          (void)cut;
        }
        throw std::runtime_error("--log " + path_ + ": a record could not be written (" + why + ")");
      }
      p += w, left -= static_cast<size_t>(w);
    }
  }

 private:
  int fd_ = -1;
  std::string path_;
};

// The "iter" of a log record, or -1.
int64_t record_iteration(const std::string& line) {
  const auto at = line.find("\"iter\": ");
  if (at == std::string::npos) return -1;
  return std::strtoll(line.c_str() + at + 8, nullptr, 10);
}

// The text of field `key` of a one-line JSON object as written (a string with its quotes),
// or "" when absent. The config records' fields are numbers, booleans, strings and arrays of
// numbers.
std::string json_field(const std::string& line, const std::string& key) {
  const std::string tag = "\"" + key + "\": ";
  const auto at = line.find(tag);
  if (at == std::string::npos) return "";
  size_t i = at + tag.size(), j = i;
  if (j < line.size() && line[j] == '"') {
    for (++j; j < line.size() && line[j] != '"'; ++j)
      if (line[j] == '\\') ++j;
    return line.substr(i, j + 1 - i);
  }
  if (j < line.size() && line[j] == '[') return line.substr(i, line.find(']', j) + 1 - i);
  while (j < line.size() && line[j] != ',' && line[j] != '}') ++j;
  return line.substr(i, j - i);
}

// Whether a line is one whole JSON object, as the log's records and the summary are: its
// braces and brackets (outside strings) close at its last character. Blanks around it, a CR
// and a UTF-8 byte-order mark (an editor's) aside.
bool whole_object(const std::string& line) {
  size_t begin = line.rfind("\xEF\xBB\xBF", 0) == 0 ? 3 : 0;
  begin = line.find_first_not_of(" \t", begin);
  const size_t end = line.find_last_not_of(" \t\r");
  if (begin == std::string::npos || line[begin] != '{') return false;
  int depth = 0;
  bool in_string = false;
  for (size_t i = begin; i <= end; ++i) {
    const char ch = line[i];
    if (in_string) {
      if (ch == '\\') ++i;
      else if (ch == '"') in_string = false;
    } else if (ch == '"') {
      in_string = true;
    } else if (ch == '{' || ch == '[') {
      ++depth;
    } else if ((ch == '}' || ch == ']') && --depth == 0) {
      return i == end;
    }
  }
  return false;
}

// A file's first line ("" where it cannot be read).
std::string first_line_of(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

// An output of the run to resume that is there but cannot be read (its permissions): said as
// such, rather than taken for another run's file.
void check_readable(const std::string& flag, const std::string& path) {
  if (::access(path.c_str(), R_OK) != 0)
    throw std::runtime_error(flag + " " + path + ": cannot be read (" + std::strerror(errno) + ")");
}

// A log's first config record (the run's settings and id), or "" where it has none.
std::string first_config_record(const std::string& path) {
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);)
    if (line.find("\"type\": \"config\"") != std::string::npos) return line;
  return "";
}

// --resume: the log must be this run's. Its first config record names the run (identity
// keys an older log lacks are not compared); a log of another run is refused before its
// records past the checkpoint are dropped.
void check_log_is_this_runs(const std::string& path, const TrainConfig& c) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec) || fs::file_size(path, ec) == 0) return;
  check_readable("--log", path);
  const std::string first = first_config_record(path);
  if (first.empty())
    throw FlagError("--log " + path + " holds no blpa-train config record: it is not the log of checkpoint " +
                    c.checkpoint + "'s run; give that run's log, or another path");
  const std::string ours = c.json();
  std::string differ;
  for (const auto& key : TrainConfig::identity_keys()) {
    const std::string theirs = json_field(first, key);
    if (!theirs.empty() && theirs != json_field(ours, key))
      differ += fmt::format("\n  {}: log {}, this run {}", key, theirs, json_field(ours, key));
  }
  const std::string theirs = json_field(first, "run_id");
  if (differ.empty() && theirs.size() > 2 && theirs != json_field(ours, "run_id"))
    differ = fmt::format("\n  run_id: log {}, checkpoint {}", theirs, json_field(ours, "run_id"));
  if (!differ.empty())
    throw FlagError("--log " + path + " is the log of another run:" + differ + "\ngive the log of checkpoint " +
                    c.checkpoint + "'s run, or another path");
}

// --resume: a summary or an export already there is replaced when the run ends, so it must be
// this run's (one written before run ids existed is taken to be).
void check_outputs_are_this_runs(const TrainConfig& c) {
  auto refuse = [&](const std::string& flag, const std::string& path, const std::string& why) {
    throw FlagError(flag + " " + path + " " + why + ": it is not checkpoint " + c.checkpoint + "'s run's (run id " +
                    c.run_id + "); give that run's " + flag + ", or another path");
  };
  std::error_code ec;
  if (!c.summary_path.empty() && fs::is_regular_file(c.summary_path, ec) && fs::file_size(c.summary_path, ec) > 0) {
    check_readable("--summary", c.summary_path);
    const std::string line = first_line_of(c.summary_path);
    if (line.find("\"type\": \"summary\"") == std::string::npos) refuse("--summary", c.summary_path, "is no summary");
    const std::string theirs = json_field(line, "run_id");  // cut short in it: no closing quote
    if (theirs.size() > 2 && theirs.back() == '"' && theirs != json_string(c.run_id))
      refuse("--summary", c.summary_path, "is the summary of run " + theirs.substr(1, theirs.size() - 2));
    if (!whole_object(line))  // damaged by hand or by a disk (summaries are written whole)
      spdlog::warn("--summary {} is cut short ({} bytes, not a whole JSON object): this run replaces it when it ends",
                   c.summary_path, line.size());
  }
  if (!c.export_path.empty() && fs::is_regular_file(c.export_path, ec) && fs::file_size(c.export_path, ec) > 0) {
    check_readable("--export", c.export_path);
    const auto theirs = exported_run_id(c.export_path);
    if (!theirs) refuse("--export", c.export_path, "is no export");
    if (!theirs->empty() && *theirs != c.run_id) refuse("--export", c.export_path, "is the export of run " + *theirs);
  }
}

}  // namespace

namespace {

// The settings that act on training steps alone (not on an evaluation or the outputs).
const std::set<std::string>& training_keys() {
  static const std::set<std::string> keys{"lr",           "warmup",      "warmup_lr", "steps",     "factor",
                                          "momentum",     "weight_decay", "accum_steps", "log_every", "eval_every",
                                          "checkpoint_every", "cuda_graphs"};
  return keys;
}

}  // namespace

void refuse_diverged_rerun(const TrainConfig& c) {
  if (c.summary_path.empty()) return;
  const std::string summary = first_line_of(c.summary_path), ours = c.json();
  if (json_field(summary, "status") != "\"diverged\"") return;
  if (!c.resume)  // diverged before its first checkpoint: nothing to resume, whatever the settings
    throw NonFiniteLoss(fmt::format(
        "--auto-resume: the run of summary {} diverged after iteration {}, before its first checkpoint ({} does not "
        "exist): there is nothing to resume. Start it again with --overwrite (and a lower --lr)",
        c.summary_path, json_field(summary, "iter"), c.checkpoint));
  for (const char* key : {"lr", "warmup", "warmup_lr", "steps", "factor", "momentum", "weight_decay", "accum_steps"})
    if (json_field(summary, key) != json_field(ours, key)) return;
  throw NonFiniteLoss(fmt::format(
      "--auto-resume: the run of checkpoint {} diverged after iteration {} with --lr {} (summary {}) and would "
      "again with the same learning rate, momentum and weight decay: not retried. Give a lower --lr (or other "
      "--lr-steps, --warmup, ...) to resume it, or start again with --overwrite",
      c.checkpoint, json_field(summary, "iter"), json_field(summary, "lr"), c.summary_path));
}

// --auto-resume without a checkpoint, where the summary says this run (its identity and
// --iterations) is done: its checkpoint was deleted (a sweep that keeps disks small), and
// there is nothing to do, as with the checkpoint there. It was refused as a new run over
// existing files, exit 2, on every rerun of the sweep.
void skip_completed_rerun(const TrainConfig& c) {
  std::error_code ec;
  if (c.summary_path.empty() || !fs::is_regular_file(c.summary_path, ec)) return;
  const std::string summary = first_line_of(c.summary_path), ours = c.json();
  if (!whole_object(summary) || json_field(summary, "status") != "\"done\"" ||
      json_field(summary, "iter") != std::to_string(c.iterations))
    return;
  for (const auto& key : TrainConfig::identity_keys())
    if (json_field(summary, key) != json_field(ours, key)) return;
  std::string idle;  // as a resume at the run's end says them (compare_with_checkpoint)
  for (const auto& key : training_keys())
    if (const std::string theirs = json_field(summary, key); !theirs.empty() && theirs != json_field(ours, key))
      idle += fmt::format("\n  {}: summary {}, command line {}", key, theirs, json_field(ours, key));
  if (!idle.empty())
    spdlog::warn("--auto-resume: these settings differ from the summary's, but its run is done: no iteration is "
                 "left for them to change (another run needs other output paths){}",
                 idle);
  throw RunComplete(fmt::format("--auto-resume: summary {} says this run is done at iteration {} (its checkpoint {} "
                                "is gone): nothing to do",
                                c.summary_path, c.iterations, c.checkpoint));
}

namespace {

// 16 hex digits, new for every run.
std::string draw_run_id() {
  std::random_device device;
  const uint64_t bits = (uint64_t{device()} << 32 | device()) ^
                        static_cast<uint64_t>(std::chrono::system_clock::now().time_since_epoch().count());
  return fmt::format("{:016x}", bits);
}

// --resume: the records of iterations after the checkpoint's are recomputed by the resumed
// run, so they leave the log (rewritten atomically), which then reads as one run. So does a
// last line without its newline: a record cut short by a full disk or a kill. `evaluates`:
// the resumed run evaluates at the checkpoint's iteration first (the process that wrote the
// checkpoint was stopped in or after that evaluation), so an evaluation record of that
// iteration is recomputed too.
int64_t drop_records_after(const std::string& path, int64_t iteration, bool evaluates) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) return 0;  // a device or a pipe keeps what it was given
  std::ifstream in(path);
  if (!in) return 0;
  std::string kept;
  int64_t dropped = 0, removed = 0, number = 0;
  for (std::string line; std::getline(in, line);) {
    ++number;
    const int64_t at = record_iteration(line);
    const bool redone = evaluates && at == iteration && line.rfind("{\"type\": \"eval\", ", 0) == 0;
    if (at > iteration || redone) {
      ++dropped;
      ++removed;
      continue;
    }
    // Cut short at or before the checkpoint's iteration (eof: no newline after it): the resumed
    // run does not compute that record again (its window was closed), so the log has none for
    // it. Said, not counted among the records "after" the checkpoint.
    if (in.eof()) {
      const size_t digits = line.find("\"iter\": ") + 8;  // cut in its number: not the iteration it was
      const bool whole = at >= 0 && line.find_first_not_of("0123456789", digits) != std::string::npos;
      spdlog::warn("--log {}: its last record was cut short (a write interrupted) and is removed; the log has no "
                   "record for the iterations it covered{}",
                   path, whole ? fmt::format(" (up to {})", at) : std::string());
      ++removed;
      continue;
    }
    // A line damaged in the middle (by hand, by a disk): kept, it made the log no JSON lines
    // for plot.sh and every reader after it. A blank one goes without a word.
    if (line.find_first_not_of(" \t\r") == std::string::npos) {
      ++removed;
      continue;
    }
    if (!whole_object(line)) {
      spdlog::warn("--log {}: line {} is no whole JSON record (damaged) and is removed: '{}'", path, number,
                   line.size() > 60 ? line.substr(0, 60) + "..." : line);
      ++removed;
      continue;
    }
    kept += line + "\n";
  }
  if (removed > 0) {
    AtomicFile f(path);
    f.write(kept);
    f.commit();
  }
  return dropped;
}

std::map<std::string, std::string> key_values(const std::string& describe) {
  std::map<std::string, std::string> kv;
  std::istringstream lines(describe);
  for (std::string line; std::getline(lines, line);)
    if (const auto eq = line.find('='); eq != std::string::npos) kv[line.substr(0, eq)] = line.substr(eq + 1);
  return kv;
}

// Throws, closing `fd`: the lock `file` of output `path` could not be taken (errno `e`).
[[noreturn]] void refuse(int fd, int e, const std::string& file, const std::string& path, const std::string& flag) {
  char text[32] = {};
  const ssize_t n = ::pread(fd, text, sizeof text - 1, 0);
  ::close(fd);
  // The pid its holder wrote, if that process lives (a killed run's stays in the file until
  // the next run that locks it writes its own).
  const long pid = n > 0 ? std::strtol(text, nullptr, 10) : 0;
  const bool alive = pid > 0 && (::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM);
  if (e == EWOULDBLOCK)
    throw std::runtime_error(fmt::format("{} {} is in use by another blpa-train{}: wait for it to end, or give "
                                         "another path",
                                         flag, path, alive ? fmt::format(" (process {})", pid) : std::string()));
  throw std::runtime_error(fmt::format("{} {}: its lock file {} cannot be locked ({})", flag, path, file,
                                       std::strerror(e)));
}

// One run per output file: an advisory lock (flock) on "<path>.lock" beside each output, held
// for the run and removed after it. Without it two runs started together (or two resumes of
// one checkpoint) both passed the check that a fresh run replaces nothing, and then wrote over
// each other's log and checkpoint. The kernel drops a killed run's lock; its file is reused.
class OutputLocks {
 public:
  OutputLocks() = default;
  OutputLocks(const OutputLocks&) = delete;
  OutputLocks& operator=(const OutputLocks&) = delete;
  ~OutputLocks() {
    for (const auto& [lock, fd] : held_) {
      ::unlink(lock.c_str());  // before the close: a run waiting on this file sees it gone
      ::close(fd);
      release_transient(lock);
    }
  }

  void add(const std::string& path, const std::string& flag) {
    std::error_code ec;
    if (path.empty() || (fs::exists(path, ec) && !fs::is_regular_file(path, ec))) return;  // a device, a pipe
    const fs::path parent = fs::path(path).has_parent_path() ? fs::path(path).parent_path() : fs::path(".");
    if (!fs::exists(parent, ec)) fs::create_directories(parent, ec);
    // PATH.lock beside the path as given; and where the path is a symbolic link, beside the
    // file it names too (one not written yet, too), which is the file written: a link to a
    // running run's checkpoint or log is that run's file.
    lock(path + ".lock", path, flag);
    const fs::path target = fs::absolute(link_target(path));
    if (target != fs::absolute(path)) {
      // Its folder first, as writing creates it: a lock that cannot be created is skipped.
      if (!fs::exists(target.parent_path(), ec)) fs::create_directories(target.parent_path(), ec);
      const fs::path resolved = fs::weakly_canonical(target, ec);
      if (!ec) lock(resolved.string() + ".lock", path, flag);
    }
  }

 private:
  // Takes `file` (creating it), or throws naming the run that holds it; returns quietly where
  // the file cannot be created (the output checks after this say why, naming the flag).
  void lock(const std::string& file, const std::string& path, const std::string& flag) {
    for (;;) {
      // A folder that cannot take the lock file cannot take a checkpoint either: the checks
      // after this one say why, naming the flag.
      int fd = ::open(file.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
      if (fd < 0 && errno == EACCES) fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);  // another user's: flock works
      if (fd < 0 && errno == EISDIR)
        throw FlagError(
            fmt::format("{} {}: {} is a folder, where the run keeps its lock: remove it", flag, path, file));
      if (fd < 0) return;
      if (::flock(fd, LOCK_EX | LOCK_NB) != 0) refuse(fd, errno, file, path, flag);
      // Locked; but if the run that held it removed the file meanwhile, this lock is on a
      // file nobody else will open: start again.
      struct stat mine {}, named {};
      if (::fstat(fd, &mine) == 0 && ::stat(file.c_str(), &named) == 0 && mine.st_ino == named.st_ino &&
          mine.st_dev == named.st_dev) {
        const std::string pid = std::to_string(::getpid());  // only for the message above
        const bool noted = ::ftruncate(fd, 0) == 0 && ::pwrite(fd, pid.data(), pid.size(), 0) > 0;
        (void)noted;
        held_.emplace_back(file, fd);
        hold_transient(file);
        return;
      }
      ::close(fd);
    }
  }

  std::vector<std::pair<std::string, int>> held_;
};

// --print-config: whether a run holds `path`'s lock, found without creating the lock file
// (a shared lock, taken and dropped at once, fails where a run holds its exclusive one).
void refuse_if_locked(const std::string& path, const std::string& flag) {
  std::error_code ec;
  // Beside the path as given and, for a link, beside the file it names, as OutputLocks locks.
  const fs::path target = fs::weakly_canonical(fs::absolute(link_target(path)), ec);
  for (const std::string& file : {path + ".lock", ec ? path + ".lock" : target.string() + ".lock"}) {
    const int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;
    if (::flock(fd, LOCK_SH | LOCK_NB) != 0) refuse(fd, errno, file, path, flag);
    ::close(fd);
  }
}

// --auto-resume where there is no checkpoint: a log and a summary that record no training are
// the start of a run that failed in its first iteration (which keeps no checkpoint), and are
// replaced, so that the same command line runs it again; anything that records training is not.
bool records_no_training(const std::string& path, const std::string& flag) {
  if (flag == "--summary") {
    const std::string summary = first_line_of(path);
    return json_field(summary, "iter") == "0" && json_field(summary, "status") != "\"done\"";
  }
  if (flag != "--log") return false;
  std::ifstream in(path);
  int64_t configs = 0;
  for (std::string line; std::getline(in, line);) {
    if (line.find("{\"type\": \"config\", ") != 0) return false;
    ++configs;
  }
  return configs > 0 && in.eof();
}

// The run's output files that are given, with their flags.
std::vector<std::pair<std::string, std::string>> outputs_of(const TrainConfig& c) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& [path, flag] : {std::pair<std::string, const char*>{c.checkpoint, "--checkpoint"},
                                   {c.log_path, "--log"},
                                   {c.export_path, "--export"},
                                   {c.summary_path, "--summary"}})
    if (!path.empty()) out.emplace_back(path, flag);
  return out;
}

// What an existing log or summary holds, for a message about replacing it: " (the summary of
// run ID, done at iteration N)", " (the log of run ID)", or "" where it says nothing of one.
std::string whose(const std::string& path, const std::string& flag) {
  std::string line;
  if (flag == "--summary") {
    line = first_line_of(path);
    if (line.find("\"type\": \"summary\"") == std::string::npos) return "";
  } else if (flag == "--log") {
    line = first_config_record(path);
  }
  const std::string id = json_field(line, "run_id");
  if (id.size() < 3 || id.front() != '"' || id.back() != '"') return "";
  const std::string run = "run " + id.substr(1, id.size() - 2);
  if (flag == "--log") return " (the log of " + run + ")";
  const std::string status = json_field(line, "status");
  return fmt::format(" (the summary of {}, {} at iteration {})", run,
                     status.size() > 2 ? status.substr(1, status.size() - 2) : "?", json_field(line, "iter"));
}

// A fresh run replaces no earlier run's files unless told to.
void refuse_replacing(const TrainConfig& c) {
  std::error_code ec;
  const bool resumable = !c.checkpoint.empty() && fs::is_regular_file(c.checkpoint, ec);
  for (const auto& [path, flag] : outputs_of(c)) {
    const bool is_log = flag == "--log";
    if (!c.resume && !c.overwrite && fs::is_regular_file(path, ec) && (!is_log || fs::file_size(path, ec) > 0) &&
        !(c.auto_resume && records_no_training(path, flag)))
      throw FlagError(flag + " " + path + whose(path, flag) + " already exists: " +
                      (resumable          ? "continue that run with --resume, or replace it with --overwrite"
                       : c.checkpoint.empty() ? "without --checkpoint there is nothing to continue it from; replace "
                                                "it with --overwrite, or give another path"
                                              : "it has no checkpoint to continue from; replace it with --overwrite, "
                                                "or give another path"));
  }
}

// Each output can be written where it goes (`write` false: judged without creating anything).
void check_output_paths(const TrainConfig& c, bool write) {
  for (const auto& [path, flag] : outputs_of(c)) {
    try {
      check_output_path(path, flag, flag != "--log", write);
    } catch (const std::invalid_argument& e) {
      throw FlagError(e.what());
    }
  }
}

// Before anything is loaded: every output can be written where it goes, no other run is
// writing it, and a fresh run replaces no earlier run's files unless told to.
void prepare_outputs(const TrainConfig& c, OutputLocks& locks) {
  for (const auto& [path, flag] : outputs_of(c)) locks.add(path, flag);  // first: the checks write probes
  refuse_replacing(c);
  check_output_paths(c, /*write=*/true);  // the probes, which create the log: not for a run refused above
  if (c.resume && !fs::exists(c.checkpoint))
    throw FlagError("--resume: checkpoint " + c.checkpoint + " does not exist");
}

// --resume: the checkpoint's run and this command line must agree on the identity; any other
// setting that differs takes effect and is listed, with both values.
void compare_with_checkpoint(const Checkpoint& ck, const TrainConfig& c) {
  auto saved = ck.config;
  if (!saved.count("world")) saved["world"] = ck.identity.find(" world=") == std::string::npos
                                                  ? "1"
                                                  : ck.identity.substr(ck.identity.find(" world=") + 7);
  // A checkpoint from before --precision and --memory-format ran as LibTorch does by default:
  // NCHW, float32, with TF32 convolutions (not matrix products) on CUDA. Its precision is
  // compared as the closest: fp32 on the CPU, tf32 on CUDA.
  if (!saved.count("precision")) {
    const auto device = saved.find("device");
    saved["precision"] = device != saved.end() && device->second.rfind("cuda", 0) == 0 ? "tf32" : "fp32";
  }
  if (!saved.count("memory_format")) saved["memory_format"] = "nchw";
  if (saved["threads"] == "0") saved["threads"] = std::to_string(c.threads);  // recorded unresolved: the default
  // Before resolve() named it, the default folder was recorded as "".
  if (saved["data_dir"].empty() && saved["train_list"].empty()) saved["data_dir"] = data::kDebianFashionMnist;
  const auto now = key_values(c.describe());
  const std::set<std::string> identity(TrainConfig::identity_keys().begin(), TrainConfig::identity_keys().end());
  // At the run's last iteration no step is left for the training settings to act on; the
  // others (the test subset, device, workers, ...) still set a final evaluation's.
  const bool at_end = ck.state.iteration == c.iterations;
  std::string refused, changed, idle;
  for (const auto& [key, value] : now) {
    const auto it = saved.find(key);
    if (it == saved.end() || it->second == value) continue;
    const std::string line = fmt::format("\n  {}: checkpoint {}, command line {}", key, it->second, value);
    (identity.count(key) ? refused : at_end && training_keys().count(key) ? idle : changed) += line;
  }
  if (!refused.empty())
    throw FlagError("--resume: checkpoint " + ck.path + " belongs to a different run:" + refused +
                    "\nresume with the same data set, training subset, augmentation, model, mode (bits, window, lift), "
                    "batch, seed, precision and world size, or start a new run");
  // A run at its last iteration trains no more: a sweep over --lr whose file names leave lr
  // out was told that each new one "takes effect", then "nothing to do".
  if (!idle.empty())
    spdlog::warn("--resume: these settings differ from the checkpoint's, but its run is at its --iterations {}: no "
                 "iteration is left for them to change (another run needs other output paths){}",
                 c.iterations, idle);
  if (!changed.empty())
    spdlog::info("--resume: these settings differ from the checkpoint's and take effect:{}", changed);
}

// Every rank must train the same run; a rank whose settings differ stops them all, each
// naming the settings that differ.
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
  for (size_t r = 1; r < all.size(); ++r) {
    if (all[r] == all[0]) continue;
    for (const auto& [key, value] : tokens(all[r]))
      if (!lead.count(key) || lead.at(key) != value)
        diffs += fmt::format("\n  {}: rank 0 {}, rank {} {}", key, lead.count(key) ? lead.at(key) : "?", r, value);
  }
  if (!diffs.empty())
    throw FlagError(fmt::format("rank {} of {}: the ranks were started with different settings:{}", dist.rank(),
                                dist.world(), diffs));
}

// For the tests of what a failure part-way leaves: BLPA_TEST_FAIL="step:N" fails iteration N
// (counted from 1) after its forward and backward passes, before its update, as running out of
// memory in the backward pass or losing a peer in the gradients' all-reduce does;
// "eval:N" fails the evaluation after iteration N; "slow-eval:S" makes each evaluation take S
// seconds longer (a test set that takes longer than --dist-timeout); "slow-step:MS" each eager
// iteration MS milliseconds longer (signals that must come during one, whatever the machine).
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

}  // namespace

void check_outputs_unwritten(const TrainConfig& c) {
  for (const auto& [path, flag] : outputs_of(c)) refuse_if_locked(path, flag);
  refuse_replacing(c);
  check_output_paths(c, /*write=*/false);
}

void check_outputs_are_the_runs(TrainConfig c, const Checkpoint& resumed) {
  const auto id = resumed.config.find("run_id");
  c.run_id = id != resumed.config.end() ? id->second : "";
  if (!c.log_path.empty()) check_log_is_this_runs(c.log_path, c);
  check_outputs_are_this_runs(c);
}

Checkpoint read_resumed_checkpoint(TrainConfig& config, const TrainConfig& given) {
  Checkpoint ck;
  try {
    ck = read_checkpoint(config.checkpoint);
  } catch (const CheckpointError& e) {  // a sweep's --auto-resume fails on it at every rerun: say what helps
    if (std::string(e.what()).find(" is damaged or truncated: ") == std::string::npos) throw;
    throw CheckpointError(std::string(e.what()) + ". A run keeps one checkpoint: resume a copy of it if you kept "
                          "one, or start the run again with --overwrite");
  }
  // --precision auto resumes at the checkpoint's precision, where this device has it (tf32 is
  // CUDA's); the layout's auto then follows it.
  const auto saved = ck.config.find("precision");
  if (given.precision == "auto" && saved != ck.config.end() &&
      (saved->second == "fp32" || saved->second == "bf16" ||
       (saved->second == "tf32" && torch::Device(config.device).is_cuda()))) {
    config.precision = saved->second;
    config.memory_format = given.memory_format;
    config.resolve_numerics();
  }
  // A run on an MNIST folder that auto took for Fashion-MNIST (before the images told them
  // apart) resumes as the run it is.
  const auto dataset = ck.config.find("dataset");
  auto idx = [](const std::string& d) { return d == "mnist" || d == "fashion-mnist"; };
  if (given.dataset == "auto" && dataset != ck.config.end() && idx(dataset->second) && idx(config.dataset))
    config.dataset = dataset->second;
  // A run cannot go back: exit 0 ("nothing to do") left an interrupted run unevaluated,
  // unexported and summarised "interrupted", and a sweep took it for finished.
  if (ck.state.iteration > config.iterations)
    throw FlagError(fmt::format("checkpoint {} is at iteration {}, past --iterations {}: a run cannot go back; give "
                                "--iterations {} to finish it there, or more to go on (or --overwrite to start again)",
                                config.checkpoint, ck.state.iteration, config.iterations, ck.state.iteration));
  compare_with_checkpoint(ck, config);
  return ck;
}

void SummaryDraft::open(const std::string& path) {
  std::lock_guard<std::mutex> lock(mutex_);
  path_ = path;
  draft_.clear();
  open_ = true;
}

void SummaryDraft::publish(std::string text) {
  std::lock_guard<std::mutex> lock(mutex_);
  draft_ = std::move(text);
}

void SummaryDraft::close() {
  // Waits for a write() under way: the run's own summary, written after this, comes last, and
  // its AtomicFile never meets the draft's.
  std::lock_guard<std::mutex> lock(mutex_);
  open_ = false;
}

void SummaryDraft::write() noexcept {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!open_ || draft_.empty()) return;
  try {
    AtomicFile f(path_);
    f.write(draft_);
    f.commit();
  } catch (const std::exception&) {  // the run stops at once all the same; no summary then
  }
}

TrainResult train(const TrainConfig& config_in, const std::atomic<bool>* stop, SummaryDraft* draft,
                  const std::atomic<int>* signal) {
  TrainConfig config = config_in;
  const bool lead = config.dist.rank == 0;  // writes the log, the checkpoints and the outputs
  OutputLocks locks;  // released last, after the final checkpoint, export and summary
  std::optional<Checkpoint> resumed;
  RunState state;
  std::optional<int64_t> resumed_stored, resumed_peak;  // the run's figures as its checkpoint recorded them
  // The training images that could not be decoded in the batches trained (the run's, from its
  // checkpoint on a resume): the log's decode_failures, whatever --prefetch made ahead.
  std::set<int64_t> decode_failed;
  torch::Device dev(torch::kCPU);
  // With several ranks, a rank that cannot start (its flags, its data folder, its device, its
  // outputs, its checkpoint) says so to the others at the rendezvous below, instead of
  // leaving them waiting there for --dist-timeout.
  std::exception_ptr refused;
  try {
    config.validate();
    // Resolved before --resume compares the settings: `auto` is not a change.
    config.resolve();
    if (config.warmup >= config.iterations && config.warmup_lr != config.lr && config.dist.rank == 0)
      spdlog::warn("--warmup {} is not below --iterations {}: the run trains at --warmup-lr {} throughout, never at "
                   "--lr {} (give a shorter --warmup, or --warmup 0)",
                   config.warmup, config.iterations, config.warmup_lr, config.lr);
    dev = torch::Device(config.device);
    config.check_device();
    if (config.auto_resume) {
      // Each rank looks for itself; ranks that decide differently are stopped by their settings'
      // agreement (resume=) below. A path that cannot be looked at is no checkpoint: the output
      // checks then say why, through the rendezvous.
      std::error_code ec;
      config.resume = fs::exists(config.checkpoint, ec);
      if (lead && !config.resume) refuse_diverged_rerun(config);
      if (lead && !config.resume) skip_completed_rerun(config);
      if (lead)
        spdlog::info("--auto-resume: {}", config.resume ? "resuming the run in " + config.checkpoint
                                                        : "no checkpoint " + config.checkpoint + ", a new run");
    }
    if (!config.resume && config.run_id.empty()) config.run_id = draw_run_id();
    if (lead) prepare_outputs(config, locks);
    else if (config.resume && !fs::exists(config.checkpoint))
      throw FlagError("--resume: checkpoint " + config.checkpoint + " does not exist on rank " +
                      std::to_string(config.dist.rank));
    // The checkpoint's header first: a run that cannot resume fails before the data loads.
    if (config.resume) {
      resumed = read_resumed_checkpoint(config, config_in);
      config.run_id = resumed->config.count("run_id") ? resumed->config.at("run_id") : "";
      if (config.run_id.empty()) config.run_id = draw_run_id();  // a checkpoint from before run ids
      if (lead && !config.log_path.empty()) check_log_is_this_runs(config.log_path, config);
      if (lead) check_outputs_are_this_runs(config);
      if (lead && config.auto_resume) refuse_diverged_rerun(config);
      state = resumed->state;
      resumed_stored = resumed->stored_activation_bytes;
      resumed_peak = resumed->peak_bytes;
      decode_failed.insert(resumed->decode_failed.begin(), resumed->decode_failed.end());
      // At the run's end, the run is complete once evaluated there and, with one rank (the
      // others cannot see rank 0's files), once its export is written and its summary says
      // "done". Otherwise the end is still to come: stopped part-way at what is now the end
      // (never evaluated), or stopped after the final checkpoint (the export or summary not
      // written), or given a --summary or --export it has not written. It evaluates, then
      // exports and summarises; where only the export is missing, it writes the export alone
      // (the summary that says "done" keeps its figures: this process would have none).
      bool export_missing = false;
      if (state.iteration == config.iterations && !state.pending_eval) {
        const auto evaluated = resumed->config.find("evaluated");
        std::error_code ec;
        export_missing = !config.dist.enabled() && !config.export_path.empty() && !fs::exists(config.export_path, ec);
        const std::string summary = config.summary_path.empty() ? "" : first_line_of(config.summary_path);
        const bool unfinished_summary =
            !config.dist.enabled() && !config.summary_path.empty() &&
            (!whole_object(summary) || json_field(summary, "status") != "\"done\"" ||
             json_field(summary, "iter") != std::to_string(state.iteration));
        state.pending_eval =
            (evaluated != resumed->config.end() && evaluated->second == "0") || unfinished_summary;
      }
      if (state.iteration == config.iterations && !state.pending_eval && !export_missing)
        throw RunComplete(fmt::format("checkpoint {} is at iteration {}, evaluated: with --iterations {} the run "
                                      "is complete, nothing to do",
                                      config.checkpoint, state.iteration, config.iterations));
      // An output the run had and this resume forgot (a sweep's second command line): its
      // records or file would be missing without a word. Not refused: it may be meant.
      if (const auto had = resumed->config.find("outputs"); lead && had != resumed->config.end())
        for (const auto& [flag, path] : {std::pair<std::string, std::string>{"--log", config.log_path},
                                         {"--summary", config.summary_path},
                                         {"--export", config.export_path}})
          if (path.empty() && ("," + had->second + ",").find("," + flag.substr(2) + ",") != std::string::npos)
            spdlog::warn("checkpoint {}'s run was given {}, this resume none: {}", config.checkpoint, flag,
                         flag == "--log" ? "its records from here on are not kept"
                         : flag == "--summary" ? "it writes no summary"
                                               : "it writes no export");
    }
  } catch (const std::exception&) {
    if (!config.dist.enabled()) throw;
    refused = std::current_exception();
  }
  const std::string dir = config.data_dir.empty() ? std::string(data::kDebianFashionMnist) : config.data_dir;
  if (!refused && config.threads > 0) torch::set_num_threads(config.threads);  // refused: maybe out of range
  memory::install_cpu_counter();
  std::unique_ptr<Distributed> dist;
  if (config.dist.enabled()) {
    const std::string backend = config.dist.resolved_backend(dev.is_cuda());
    // A refusal travels with its kind, so that every rank exits as the refusing one does: 2 for
    // flags, 3 for a diverged run --auto-resume skips, 0 for a complete one, else 1. The
    // refusing rank waits for the others a little (they may be starting), not --dist-timeout.
    if (refused) {
      std::string why;
      try {
        std::rethrow_exception(refused);
      } catch (const FlagError& e) {
        why = "2" + error_message(e);
      } catch (const NonFiniteLoss& e) {
        why = "3" + error_message(e);
      } catch (const RunComplete& e) {
        why = "0" + error_message(e);
      } catch (const std::exception& e) {
        why = "1" + error_message(e);
      }
      const auto grace = std::min<std::chrono::milliseconds>(config.dist.timeout, std::chrono::seconds(15));
      spdlog::warn("rank {} of {} cannot start: telling the other ranks at {}:{} (up to {:g} s)", config.dist.rank,
                   config.dist.world, config.dist.master_addr, config.dist.master_port, grace.count() / 1000.0);
      Distributed::refuse(config.dist, why, grace, stop);
      std::rethrow_exception(refused);
    }
    try {
      dist = std::make_unique<Distributed>(config.dist, backend, stop);
    } catch (const std::invalid_argument& e) {  // worlds of different sizes, a rank given twice: as flags
      throw FlagError(e.what());
    } catch (const RankRefused& e) {
      const char kind = e.why.empty() ? '1' : e.why[0];
      if (kind == '2') throw FlagError(e.what());
      if (kind == '3') throw NonFiniteLoss(e.what());
      // Another rank finds the run complete where this one would train: they were given
      // different --iterations (or one resumes where another starts afresh). All exited 0,
      // and a script extending the run believed it had.
      if (kind == '0')
        throw FlagError(fmt::format("{}; this rank would train, {} iteration {} to {}: the ranks were started with "
                                    "different settings (--iterations?); give every rank the same",
                                    e.what(), config.resume ? "from" : "a new run, from", state.iteration,
                                    config.iterations));
      throw std::runtime_error(e.what());
    }
    // Resumed: the same run too. A rank that resumed another run's checkpoint at the same
    // iteration (a stale copy on one machine) took rank 0's weights below but kept its own
    // momentum, and the ranks drifted apart without a word.
    agree_across_ranks(*dist, config.rank_agreement() + fmt::format(" start={}", state.iteration) +
                                  (config.resume ? " run_id=" + config.run_id : std::string()));
    spdlog::info("rank {} of {} ({}, {} backend), batch {} per rank, {} in all", config.dist.rank, config.dist.world,
                 dev.str(), dist->backend(), config.batch, config.batch * config.dist.world);
  }
  TrainResult result;
  LogFile log;
  const data::Shard shard{config.dist.rank, config.dist.world};

  // The data: in memory (CIFAR, MNIST-style) or JPEG folders decoded on the fly (ImageNet).
  const bool pin = dev.is_cuda();
  data::Dataset train_set, test_set;
  data::ImageList train_list, val_list;
  data::Normalisation norm;
  int64_t in_channels = 3, num_classes = 0;
  if (config.dataset == "imagenet") {
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
  const bool imagenet = config.dataset == "imagenet";
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
  const int64_t n_train = imagenet ? static_cast<int64_t>(train_list.size()) : train_set.size();
  const char* hash_key = imagenet ? "train_index" : "train_data";
  const std::string hash =
      fmt::format("{:016x}", imagenet ? data::list_hash(train_list) : data::content_hash(train_set));
  const std::string data_record = (imagenet ? "classes=" + class_list(train_list.classes) + "\n" : std::string()) +
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

  NetConfig net;
  net.arch = config.arch;
  net.depth = config.depth;
  net.in_channels = in_channels;
  net.num_classes = num_classes;
  net.mode = config.mode;
  torch::manual_seed(config.seed);
  ResNet model(net);
  model->train();
  model->set_numerics(config.numerics());
  apply_precision(config.numerics().precision, dev);

  torch::optim::SGD opt = make_optimizer(model, config);

  int64_t it = 0;
  if (resumed) {
    if (resumed->net.in_channels != in_channels || resumed->net.num_classes != num_classes)
      throw FlagError(fmt::format("checkpoint {} holds a network for {} channels and {} classes; the data has {} and "
                                  "{}: resume with the data it was trained on",  // exit 2, as other data mismatches
                                  config.checkpoint, resumed->net.in_channels, resumed->net.num_classes, in_channels,
                                  num_classes));
    load_training_state(*resumed, model, opt);
    resumed.reset();  // the archive's memory
    // The optimiser's settings are this command line's (a changed one takes effect).
    for (size_t g = 0; g < opt.param_groups().size(); ++g) {
      auto& o = static_cast<torch::optim::SGDOptions&>(opt.param_groups()[g].options());
      o.momentum(config.momentum).weight_decay(g == 0 ? config.weight_decay : 0.0);
    }
    it = state.iteration;
    spdlog::info("resumed from {} at iteration {}", config.checkpoint, it);
    model->set_numerics(config.numerics());  // the loaded weights in the run's layout
  }
  model->to(dev);
  // A checkpoint loads on the CPU: its momentum buffers follow the weights to the device, in
  // their layout.
  for (auto& entry : opt.state())
    if (auto* sgd = dynamic_cast<torch::optim::SGDParamState*>(entry.second.get()); sgd && sgd->momentum_buffer().defined()) {
      const auto b = sgd->momentum_buffer().to(dev);
      const auto layout = config.numerics().layout;  // by the strides, as set_numerics lays the weights
      sgd->momentum_buffer(b.dim() == 4 && b.suggest_memory_format() != layout ? b.clone(layout) : b);
    }
  std::unique_ptr<GradientReducer> reducer;
  if (dist) {
    // Every rank starts from rank 0's weights and statistics (the same seed gives the same
    // initialisation, and every rank resumes from the same file; this makes sure of it).
    // The momentum too, in parameter order: the run agreed above, so every rank has the same.
    // And the same training data, which the settings do not show (a copy with other labels).
    std::vector<torch::Tensor> weights;
    for (const auto& p : model->parameters()) weights.push_back(p.detach());
    for (const auto& b : model->buffers()) weights.push_back(b);
    for (const auto& p : model->parameters())
      if (const auto s = opt.state().find(p.unsafeGetTensorImpl()); s != opt.state().end())
        if (const auto* sgd = dynamic_cast<const torch::optim::SGDParamState*>(s->second.get());
            sgd && sgd->momentum_buffer().defined())
          weights.push_back(sgd->momentum_buffer());
    try {
      agree_across_ranks(*dist, fmt::format("train_images={} {}={} momentum_buffers={}", n_train, hash_key, hash,
                                            weights.size() - model->parameters().size() - model->buffers().size()));
      dist->broadcast(weights);
    } catch (const PeerLost& e) {  // a rank whose data or checkpoint failed to load has stopped, or is slow
      const bool gone = std::string(e.what()).find("a rank stopped") != std::string::npos;
      throw std::runtime_error(fmt::format("rank {} of {}: {} ({})", config.dist.rank, config.dist.world,
                                           gone ? "another rank stopped before training began"
                                                : "another rank did not reach the start of training within "
                                                  "--dist-timeout (its data still loading?)",
                                           e.what()));
    }
    reducer = dist->reducer(model->parameters());
  }
  int64_t params = 0;
  for (const auto& p : model->parameters()) params += p.numel();
  spdlog::info("model {}-{} ({} parameters), mode {}, {}, batch {}, {} iterations, device {}", config.arch, config.depth,
               params, config.mode.str(), config.numerics().str(), config.batch, config.iterations, dev.str());
  // The log opens (and a fresh run's --overwrite empties it) only now, when the data, the
  // network and the checkpoint have all been read. The replaced run's checkpoint, summary and
  // export go with it: killed before its first checkpoint, the new run must not leave its log
  // beside another run's files, which --resume would then refuse as mixed.
  if (lead && !config.resume && config.overwrite)
    for (const std::string& path : {config.checkpoint, config.summary_path, config.export_path})
      if (std::error_code ec;
          !path.empty() && fs::is_regular_file(path, ec) && !fs::remove(link_target(path), ec) && ec)
        throw std::runtime_error(path + ": cannot be removed for --overwrite (" + ec.message() + ")");
  if (!config.log_path.empty() && lead) {
    // A log gone (deleted, or its path mistyped): the run's history would be split between
    // files without a word.
    if (std::error_code ec; config.resume && state.iteration > 0 && !fs::exists(config.log_path, ec))
      spdlog::warn("--log {} does not exist: a new log begins at iteration {}, without the run's records before it",
                   config.log_path, state.iteration);
    else if (config.resume && state.iteration > 0 && fs::is_regular_file(config.log_path, ec) &&
             fs::file_size(config.log_path, ec) == 0)
      spdlog::warn("--log {} is empty: it begins again at iteration {}, without the run's records before it",
                   config.log_path, state.iteration);
    if (config.resume)
      result.dropped_log_records = drop_records_after(config.log_path, state.iteration, state.pending_eval);
    if (result.dropped_log_records > 0)
      spdlog::info("--log {}: {} record{} after iteration {}{} removed (the resumed run computes them again)",
                   config.log_path, result.dropped_log_records, result.dropped_log_records == 1 ? "" : "s",
                   state.iteration,
                   state.pending_eval ? ", or of its evaluation," : "");
    log.open(config.log_path, config.resume);
  }
  // The inputs' normalisation goes with the run's records: an --export's user needs it (CIFAR's
  // and MNIST-style statistics are of the training images, which they may not have).
  const std::string normalisation = fmt::format("{{\"mean\": [{}], \"std\": [{}]}}", fmt::join(norm.mean, ", "),
                                                fmt::join(norm.std, ", "));
  log.write(fmt::format(
      "{{\"type\": \"config\", \"iter\": {}, \"time\": {:.3f}, \"resumed\": {}, \"config\": {}, "
      "\"normalisation\": {}}}\n",
      it, unix_time(), config.resume, config.json(), normalisation));

  std::unique_ptr<data::TrainLoader> memory_loader;
  std::unique_ptr<data::BatchStream> image_loader;
  data::DecodeErrors decode_errors;  // the warnings, for the batches made, ahead of training too
  int64_t per_epoch = 0;
  std::function<data::Batch()> next_batch;
  std::function<EvalResult()> run_eval;
  if (config.dataset == "imagenet") {
    // Throws when the global batch exceeds the training images.
    auto sampler = std::make_shared<data::ShardSampler>(train_list.size(), config.batch, shard, config.seed);
    per_epoch = sampler->batches_per_epoch();
    data::ImageNetAugment aug;
    if (!config.augment) aug.min_short = aug.max_short = 256, aug.flip = false, aug.jitter_on = false;
    image_loader = std::make_unique<data::BatchStream>(
        [&, aug, sampler](int64_t b) {
          const auto idx = sampler->indices(b);
          return data::imagenet_train_batch(train_list, idx, aug, norm,
                                            data::counter_hash(config.seed, 0x5A5A5A5Aull, b / per_epoch),
                                            &decode_errors, pin);
        },
        it, config.workers, config.prefetch);
    next_batch = [&] { return image_loader->next(); };
    run_eval = [&] {
      ImageEvalOptions o;
      o.batch = config.batch, o.workers = config.workers, o.device = config.device, o.stop = stop;
      return evaluate_images(model, val_list, o);
    };
  } else {
    memory_loader = std::make_unique<data::TrainLoader>(
        train_set, config.batch, config.seed, norm, data::Augment{config.augment ? 4 : 0, config.augment}, it,
        config.workers, config.prefetch, shard, pin);
    per_epoch = memory_loader->batches_per_epoch();
    next_batch = [&] { return memory_loader->next(); };
    run_eval = [&] { return evaluate(model, test_set, norm, config.batch, dev, stop); };
  }
  const bool tty = config.progress && lead && ::isatty(STDERR_FILENO);
  const auto run_start = Clock::now();
  const double start_time = unix_time();
  const int64_t first = it;
  // The log window, continued from the checkpoint's when resuming.
  int64_t window_iters = state.window_iters;
  double window_loss = state.window_loss;
  auto window_start = Clock::now() - std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(state.window_seconds));
  double train_seconds = 0;  // training only, without evaluations and checkpoints
  int64_t train_images = 0, stored = 0, peak_max = 0;
  // What autograd stores and the step's peak: measured by this process once it trains, and
  // until then the run's as its checkpoint recorded them (unknown, null, before they were
  // recorded), so that the summary of a resumed run that only evaluates or writes its files
  // does not say 0.
  bool stored_known = resumed_stored.has_value();
  if (resumed_stored) stored = *resumed_stored;
  if (resumed_peak) peak_max = *resumed_peak;
  int64_t eval_iter = -1;  // the iteration of this process's last evaluation (-1: none)
  int64_t eval_images = 0, eval_failed = 0;  // its images scored, and those left out (unreadable)
  // The first window's part from before a resume: in its log record, not in this process's
  // train_s and images/s.
  double carried_seconds = state.window_seconds;
  int64_t carried_iters = state.window_iters;
  // This process's training time and images up to now, the open window's part included.
  auto trained = [&](Clock::time_point now) {
    const double secs = std::chrono::duration<double>(now - window_start).count() - carried_seconds;
    return std::pair{train_seconds + std::max(secs, 0.0),
                     train_images + (window_iters - carried_iters) * config.batch * config.dist.world};
  };
  int64_t last_good = config.resume ? it : -1;  // the iteration of the last checkpoint written (or resumed)
  bool pending_eval = state.pending_eval;
  memory::reset_peak(dev);

  // CUDA graphs: after a few eager iterations (cuDNN's choices, the momentum buffers), the
  // iteration is captured once and replayed. Its losses stay on the device until drain(),
  // at log time and before a checkpoint.
  bool use_graphs = dev.is_cuda() && config.cuda_graphs != "off";
  if (use_graphs && dist) {
    spdlog::info("CUDA graphs off: with several ranks every iteration runs eagerly (the all-reduce is not captured)");
    use_graphs = false;
  }
  std::unique_ptr<GraphedStep> graphed;
  const int64_t capture_at = it + 3;
  // On CUDA every update is sgd_step's (the learning rate a float tensor, a few multi-tensor
  // kernels per step, as PyTorch's default SGD there): eager iterations (before the capture,
  // after a fallback, with graphs off or several ranks) update as the replayed ones do, so a
  // run resumed from a checkpoint, whose first iterations are eager where the first run
  // replayed, does the same arithmetic (cuDNN's nondeterministic kernels aside). The CPU keeps
  // LibTorch's SGD.
  const bool tensor_lr_update = dev.is_cuda();
  const torch::Tensor lr_tensor =
      tensor_lr_update ? torch::zeros({}, torch::TensorOptions(torch::kFloat).device(dev)) : torch::Tensor();
  // `error`: why a run "failed" ("" otherwise: null).
  auto render_summary = [&](const char* status, const std::string& error) {
    const auto [secs, images] = trained(Clock::now());
    // The figures of this process's last evaluation (eval_iter), written as its log record
    // writes them; with none they are unknown (null), not 0 and 100% error.
    const bool known = eval_iter >= 0;
    auto test = [&](double v) { return known && std::isfinite(v) ? fmt::format("{:.6f}", v) : std::string("null"); };
    return fmt::format(
        "{{\"type\": \"summary\", \"status\": \"{}\", \"iter\": {}, \"iterations\": {}, \"time\": {:.3f}, "
        "\"wall_s\": {:.3f}, \"train_s\": {:.3f}, \"last_loss\": {}, \"eval_iter\": {}, \"test_loss\": {}, "
        "\"test_acc\": {}, \"test_top5\": {}, \"test_error\": {}, \"test_images\": {}, \"test_failed\": {}, "
        "\"images_per_s\": {}, \"stored_activation_bytes\": {}, \"peak_bytes\": {}, \"decode_failures\": {}, "
        "\"graphed\": {}, \"resumed_from\": {}, \"error\": {}, \"config\": {}, \"normalisation\": {}}}\n",
        status, it, config.iterations, unix_time(), unix_time() - start_time, secs,
        json_loss(result.last_loss),  // null: none trained
        known ? std::to_string(eval_iter) : "null", known ? json_loss(result.test_loss) : "null", test(result.test_acc),
        test(result.test_top5), test(1 - result.test_acc), known ? std::to_string(eval_images) : "null",
        known ? std::to_string(eval_failed) : "null",
        secs > 0 && images > 0 ? fmt::format("{:.2f}", images / secs) : std::string("null"),  // none trained
        stored_known ? std::to_string(stored) : "null",
        stored_known ? std::to_string(std::max(peak_max, memory::peak(dev))) : "null", decode_failed.size(),
        graphed != nullptr, config.resume ? std::to_string(first) : "null",
        error.empty() ? std::string("null") : json_string(error), config.json(), normalisation);
  };
  // A resume of a complete run that only writes its lost export leaves its summary as it is.
  const bool only_export = config.resume && it == config.iterations && !pending_eval;
  const bool summarising = !config.summary_path.empty() && lead && !only_export;
  auto write_summary = [&](const char* status, const std::string& error = "") {
    if (!summarising) return;
    if (draft) draft->close();  // the run's own summary from here on
    AtomicFile f(config.summary_path);
    f.write(render_summary(status, error));
    f.commit();
  };
  // A failed or diverged run's summary, where the disk allows it (the run's own error is the
  // one reported).
  auto try_summary = [&](const char* status, const std::string& error) {
    try {
      write_summary(status, error);
    } catch (const std::exception& e) {  // a sweep would find none, or an older one: said
      spdlog::warn("the summary of this {} run could not be written: {}", status, error_message(e));
    }
  };
  // The summary that a second signal, which stops at once, writes: rendered before the first
  // iteration, at each log record and evaluation, and after an iteration a second or more
  // after the last rendering.
  auto last_draft = Clock::now();
  // What a rank's stop was asked by, told to the others with the stop itself: a rank that was
  // not signalled ends as the signalled one does (143 for a scheduler's SIGTERM, not 130).
  auto sent = [&](int sig) { return stop && stop->load() && signal && signal->load() == sig ? 1.0 : 0.0; };
  auto told = [&](double stops, double terms, double hups) {
    if (stops > 0 && result.stop_signal == 0) result.stop_signal = terms > 0 ? SIGTERM : hups > 0 ? SIGHUP : SIGINT;
  };
  auto redraft = [&] {
    if (!summarising || !draft) return;
    draft->publish(render_summary("interrupted", ""));
    last_draft = Clock::now();
  };
  if (summarising && draft) draft->open(config.summary_path);
  // A window much wider than the default makes the codes' bins coarse enough for the backward
  // pass's gradients to grow through the depth (blpa-bench fidelity shows it): a cause to name
  // beside the learning rate.
  const bool coded = config.mode.mode == Mode::blpa || config.mode.mode == Mode::naive;
  const float default_window = coded ? default_format(config.mode.bits).window : 0;
  const std::string wide_window =
      coded && config.mode.window > 2 * default_window
          ? fmt::format(" Its --window {} is over twice the default at {} bits ({}): bins that coarse can make the "
                        "gradients overflow too; try a narrower one.",
                        config.mode.window, config.mode.bits, default_window)
          : "";
  // `what` says what and where (iterations counted from 1); `updates` is how many updates
  // made the weights whose numbers overflowed: the last of them had the learning rate named,
  // and a checkpoint of that iteration holds those weights. The summary is written where the
  // disk allows it: the divergence is what the run reports (exit 3), whatever the summary's fate.
  auto diverged = [&](const std::string& what, int64_t updates) {
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
  };
  bool eval_overflowed = false;  // rank 0's last evaluation gave a non-finite loss
  const auto fail_at = injected_failure();
  auto evaluate_now = [&] {  // rank 0; returns false when a signal interrupted it
    if (tty) console("\n");
    if (fail_at == std::pair<std::string, int64_t>{"eval", it})
      throw std::runtime_error("the evaluation failed (BLPA_TEST_FAIL)");
    if (fail_at.first == "slow-eval") std::this_thread::sleep_for(std::chrono::seconds(fail_at.second));
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
  };
  // Finite weights whose outputs overflow (the running statistics, which the training loss
  // does not use) are a diverged run too: blpa-eval would refuse them. Every rank stops, told
  // by rank 0's `overflowed` (the others do not evaluate).
  auto stop_if_overflowed = [&](bool overflowed) {
    if (overflowed)
      throw diverged(fmt::format("the test loss became non-finite (NaN or Inf) at iteration {}: the network's outputs "
                                 "overflow",
                                 it),
                     it);
  };
  auto drain = [&] {
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
  };
  // Set while an evaluation or checkpoint interrupts training: a checkpoint's open window ends
  // there, so that the resumed run's first images/s is of training alone.
  std::optional<Clock::time_point> paused;
  // The outputs the run was given, for a resume that forgets one to hear of it.
  std::string outputs_given;
  for (const auto& [name, path] : {std::pair<const char*, const std::string*>{"log", &config.log_path},
                                   {"summary", &config.summary_path},
                                   {"export", &config.export_path}})
    if (!path->empty()) outputs_given += (outputs_given.empty() ? "" : ",") + std::string(name);
  outputs_given = "outputs=" + outputs_given + "\n";
  // Only finite weights and optimiser state reach a checkpoint: an update can overflow even
  // when the loss before it was finite.
  auto checkpoint = [&] {
    if (config.checkpoint.empty() || !lead) return;
    drain();
    if (!all_finite(model, &opt))
      throw diverged(fmt::format("the weights became non-finite (NaN or Inf) by iteration {}", it), it);
    RunState s;
    s.iteration = it;
    s.pending_eval = pending_eval;
    s.window_iters = window_iters;
    s.window_loss = window_loss;
    s.window_seconds = std::chrono::duration<double>(paused.value_or(Clock::now()) - window_start).count();
    // evaluated: whether this iteration's evaluation ran. A run stopped part-way and resumed
    // with --iterations at the checkpoint's has not been evaluated at its (new) end.
    const std::string header =
        config.describe() + "run_id=" + config.run_id + "\nevaluated=" + (eval_iter == it ? "1" : "0") + "\n" +
        outputs_given +
        (stored_known ? fmt::format("stored_activation_bytes={}\npeak_bytes={}\n", stored,
                                    std::max(peak_max, memory::peak(dev)))
                      : std::string()) +
        (decode_failed.empty() ? std::string() : fmt::format("decode_failed={}\n", fmt::join(decode_failed, ","))) +
        data_record;
    save_checkpoint(config.checkpoint, config.identity(), header, s, model, opt);
    last_good = it;
  };

  bool consistent = true;  // false while an update is half applied
  bool in_checkpoint = false;
  bool mid_step = false;   // an eager iteration's forward has begun: the buffers have moved
  const char* waiting_for = nullptr;  // another rank's work that this one waits for, if any
  BufferBackup buffers(model);
  // From here until the run ends its summary says "running" (an earlier one, of the run
  // before this resume, would read as this run's state; a killed run leaves this one).
  if (summarising) {
    AtomicFile f(config.summary_path);
    f.write(render_summary("running", ""));
    f.commit();
  }
  redraft();
  try {
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
      for (auto& g : opt.param_groups()) static_cast<torch::optim::SGDOptions&>(g.options()).lr(lr);
      auto batch = next_batch();
      decode_failed.insert(batch.failed.begin(), batch.failed.end());
      bool stopping = stop && stop->load();
      bool replayed = false;
      if (use_graphs && it >= capture_at) {
        try {
          if (!graphed) graphed = std::make_unique<GraphedStep>(model, opt, config.accum_steps);
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
            throw std::runtime_error(std::string("--cuda-graphs on: the iteration could not be captured (") + e.what() + ")");
          spdlog::warn("CUDA graphs off: the iteration could not be captured ({}); training continues eagerly", e.what());
          graphed.reset();
          use_graphs = false;
        }
      }
      if (!replayed) {
        auto x = batch.images.to(dev, /*non_blocking=*/true), y = batch.labels.to(dev, /*non_blocking=*/true);
        opt.zero_grad();
        buffers.save();
        mid_step = true;
        // A bad loss changes nothing: the update is not applied and no checkpoint is written.
        double loss_v = accumulate_gradients(model, x, y, config.accum_steps, &stored, reducer.get());
        stored_known = true;
        if (fail_at.first == "slow-step") std::this_thread::sleep_for(std::chrono::milliseconds(fail_at.second));
        if (fail_at == std::pair<std::string, int64_t>{"step", it + 1})
          throw std::runtime_error(fmt::format("iteration {} failed after its backward pass (BLPA_TEST_FAIL)", it + 1));
        if (dist) {  // the mean loss over ranks, and a stop asked for on any rank stops them all
          const auto sums = dist->sum({loss_v, stopping ? 1.0 : 0.0, sent(SIGTERM), sent(SIGHUP)});
          loss_v = sums[0] / config.dist.world;
          stopping = sums[1] > 0;
          told(sums[1], sums[2], sums[3]);
        }
        if (!std::isfinite(loss_v))
          throw diverged(fmt::format("the loss became {} at iteration {}", non_finite(loss_v), it + 1), it);
        consistent = false;
        if (tensor_lr_update) {
          lr_tensor.fill_(lr);
          sgd_step(opt, lr_tensor);
        } else {
          opt.step();
        }
        if (config.mode.mode != Mode::plain) model->constrain_();
        consistent = true;
        window_loss += loss_v;
        result.last_loss = loss_v;
      }
      ++it;
      ++window_iters;
      mid_step = false;
      // A signal that came during this step stops after it, as the message says ("after the
      // current step"), not after one more. Ranks agree on the flag read before the step.
      if (!dist) stopping = stop && stop->load();
      if (Clock::now() - last_draft > std::chrono::seconds(1)) redraft();

      const bool last = it == config.iterations;
      if (it % config.log_every == 0 || last) {
        drain();
        const double secs = std::chrono::duration<double>(Clock::now() - window_start).count();
        double ips = window_iters * config.batch / secs;
        std::tie(train_seconds, train_images) = trained(Clock::now());
        carried_seconds = 0, carried_iters = 0;
        int64_t peak = memory::peak(dev), peak_total = peak, stored_total = stored;
        peak_max = std::max(peak_max, peak);
        if (dist) {  // per rank (this one, rank 0) and in total
          const auto sums = dist->sum({ips, static_cast<double>(peak), static_cast<double>(stored)});
          ips = sums[0];
          peak_total = static_cast<int64_t>(sums[1]);
          stored_total = static_cast<int64_t>(sums[2]);
        }
        const double total = std::chrono::duration<double>(Clock::now() - run_start).count();
        const double eta = total / (it - first) * (config.iterations - it);
        log.write(fmt::format(
            "{{\"type\": \"train\", \"iter\": {}, \"time\": {:.3f}, \"epoch\": {:.3f}, \"loss\": {}, \"lr\": {:.6g}, "
            "\"images_per_s\": {:.2f}, \"stored_activation_bytes\": {}, \"peak_bytes\": {}, \"decode_failures\": {}, "
            "\"graphed\": {}, \"graph_pool_bytes\": {}{}}}\n",
            it, unix_time(), double(it) / per_epoch, json_loss(window_loss / window_iters), lr, ips, stored, peak,
            decode_failed.size(), graphed != nullptr, graphed ? graphed->pool_bytes() : 0,
            dist ? fmt::format(", \"world\": {}, \"global_batch\": {}, \"images_per_s_per_rank\": {:.2f}, "
                               "\"stored_activation_bytes_total\": {}, \"peak_bytes_total\": {}",
                               config.dist.world, config.batch * config.dist.world, ips / config.dist.world,
                               stored_total, peak_total)
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
      if (dist && evaluating) {  // a signal during rank 0's evaluation stops every rank
        // After it: a signal that came to another rank while it waited is read below, and the
        // ranks stop here rather than after one more iteration.
        if (!lead) waiting_for = "rank 0's evaluation";
        dist->barrier();
        waiting_for = nullptr;
        const bool stopped = stop && stop->load();
        const auto sums = dist->sum({pending_eval || stopped ? 1.0 : 0.0, eval_overflowed ? 1.0 : 0.0,
                                     stopped ? 1.0 : 0.0, sent(SIGTERM), sent(SIGHUP)});
        stopping = stopping || sums[0] > 0;
        told(sums[2], sums[3], sums[4]);
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
        if (!lead) waiting_for = "rank 0's checkpoint";
        dist->barrier();
        waiting_for = nullptr;
      }
      window_start += Clock::now() - *paused;
      paused.reset();
      if (stopping && (!last || pending_eval)) {
        if (tty) console("\n");
        result.interrupted = true;
        break;
      }
    }
    drain();
  } catch (const NonFiniteLoss&) {
    throw;
  } catch (const std::exception& e) {
    // Any other failure (a lost peer, a data or log error, out of memory): the weights of
    // the last completed iteration are saved if they can be, so at most the failed one is lost.
    std::string saved = config.checkpoint.empty() ? " No checkpoint was configured." : "";
    if (lead && !config.checkpoint.empty()) {
      // Iteration 0 is the initial network: a fresh run that fails in its first iteration
      // leaves no checkpoint, so that its rerun (a smaller --batch, say) is a new run.
      if (consistent && !in_checkpoint && it > std::max<int64_t>(last_good, 0)) {
        try {
          if (mid_step) buffers.restore();
          checkpoint();
        } catch (const std::exception& again) {
          saved = fmt::format(" Saving iteration {} failed too ({}).", it, error_message(again));
        }
      }
      std::error_code ec;
      if (last_good >= 0 && fs::is_regular_file(config.checkpoint, ec))
        saved += fmt::format(" Checkpoint {} holds iteration {}: continue with --resume.", config.checkpoint,
                             last_good);
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
    if (whole_end)
      spdlog::warn("rank 0 of {}: lost the other ranks after the run's last iteration ({}); it is trained, evaluated "
                   "and checkpointed: writing its export and summary",
                   config.dist.world, e.what());
    if (!whole_end) {
      // A peer that died or went silent: every rank stops, instead of hanging. Waiting for rank
      // 0's evaluation or checkpoint, a silent peer may only be slow (a closed connection is not).
      const std::string lost = e.what();
      const bool closed = lost.find("losed") != std::string::npos || lost.find("reset") != std::string::npos ||
                          lost.find("a rank stopped") != std::string::npos;
      const std::string why =
          dynamic_cast<const PeerLost*>(&e)
              ? fmt::format("rank {} of {}: lost the other ranks {} ({}).{}{}", config.dist.rank, config.dist.world,
                            waiting_for ? fmt::format("after iteration {}", it)
                                        : fmt::format("during iteration {}", it + 1),
                            lost,
                            waiting_for && !closed ? fmt::format(" This rank was waiting for {}: one that takes longer "
                                                                 "than --dist-timeout ({:g} s) looks the same; give a "
                                                                 "longer one.",
                                                                 waiting_for, config.dist.timeout.count() / 1000.0)
                                                   : std::string(),
                            saved)
              : sentence(error_message(e)) + saved;
      try_summary("failed", why);
      throw std::runtime_error(why);
    }
  }
  result.iteration = it;
  // The run is whole in its last checkpoint: a resume of it writes what could not be written.
  auto resumable = [&](const std::exception& e, const char* what) {
    std::error_code ec;
    const std::string why = sentence(error_message(e));
    // With several ranks a resume of a run at its end is complete (its ranks cannot agree on
    // what rank 0's files lack): the hint would not be true.
    if (!lead || config.dist.enabled() || config.checkpoint.empty() || !fs::is_regular_file(config.checkpoint, ec))
      return why;
    return fmt::format("{} Checkpoint {} holds iteration {}: --resume (or --auto-resume) writes the {}.", why,
                       config.checkpoint, it, what);
  };
  if (!config.export_path.empty() && !result.interrupted && lead) {
    try {
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

}  // namespace blpa
