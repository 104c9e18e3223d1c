// Evaluation: top-1, top-5 and loss of a network on a test set held in memory or on a list of
// JPEGs (ImageNet's protocol), and of a checkpoint on the data its run was trained on.
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "blpa/checkpoint.h"
#include "blpa/imagenet.h"
#include "blpa/loader.h"
#include "train_parts.h"

namespace blpa {

namespace fs = std::filesystem;

torch::Tensor log_class_probs(const torch::Tensor& logits, int64_t views) {
  auto logp = torch::log_softmax(logits.to(torch::kFloat), 1);
  if (views == 1) return logp;
  return logp.view({logits.size(0) / views, views, -1}).logsumexp(1) - std::log(static_cast<double>(views));
}

std::pair<torch::Tensor, torch::Tensor> top_classes(const torch::Tensor& scores, int64_t k) {
  auto [values, classes] = scores.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/true);
  k = std::min(k, scores.size(-1));
  return {values.narrow(-1, 0, k), classes.narrow(-1, 0, k)};
}

namespace {

// Loss, top-1 and top-5 over batches whose labels may be -1 (an image that failed to
// decode: left out). `views` rows of the batch belong to each label (10-crop: 10); their
// softmax outputs are averaged.
struct EvalSums {
  double loss = 0;
  int64_t top1 = 0, top5 = 0, count = 0;
  void add(const torch::Tensor& logits, const torch::Tensor& labels_in, int64_t views) {
    auto labels = labels_in.to(logits.device());
    // The loss is the training loss's cross-entropy for one view.
    auto prob = log_class_probs(logits, views);
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
    auto top = top_classes(prob, k).second;
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

}  // namespace

data::Dataset subset(data::Dataset d, int64_t n) {
  if (n > 0 && n < d.size()) {
    d.images = d.images.narrow(0, 0, n).contiguous();
    d.labels = d.labels.narrow(0, 0, n).contiguous();
  }
  return d;
}

EvalResult evaluate(ResNet& model, const data::Dataset& test, const data::Normalisation& norm, int64_t batch,
                    const torch::Device& dev, const std::atomic<bool>* stop) {
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

EvalResult evaluate_images(ResNet& model, const data::ImageList& list, const ImageEvalOptions& o) {
  torch::NoGradGuard no_grad;
  const bool was_training = model->is_training();
  model->eval();
  const torch::Device dev(o.device);
  const int64_t batches = list.size() / o.batch + (list.size() % o.batch != 0);  // size + batch - 1 may overflow
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
    // The images that failed so far (the loaders' threads may have found some ahead), so that
    // the line does not read "evaluated 1/1" over a run that evaluated none.
    if (const int64_t failed = errors.count.load(); o.progress && ((b + 1) % 20 == 0 || b + 1 == batches))
      console("\revaluated {}/{} images{}", std::min((b + 1) * o.batch, list.size()), list.size(),
              failed > 0 ? fmt::format(" ({} could not be read or decoded: left out)", failed) : std::string());
  }
  if (o.progress) console("\n");
  if (was_training) model->train();
  auto r = sums.result(errors.count.load());
  r.interrupted = interrupted;
  return r;
}

// ---- Checkpoints: their data and classes ----

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

namespace {

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

namespace {

std::string recorded_data_dir(const Checkpoint& ck, const std::string& given) {
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

}  // namespace

std::string checkpoint_data_dir(const Checkpoint& ck, const std::string& given) {
  const std::string dir = recorded_data_dir(ck, given);
  // MNIST's and Fashion-MNIST's files have the same names: the other one's folder was read
  // without a word, normalised by its own statistics and named with the run's classes.
  const auto dataset = ck.config.find("dataset");
  if (dataset != ck.config.end() && (dataset->second == "mnist" || dataset->second == "fashion-mnist"))
    if (const std::string kind = idx_kind(dir); !kind.empty() && kind != dataset->second)
      spdlog::warn("{}: the images in {} look like {}'s (by their mean pixel), and {} was trained on {}: if they "
                   "are not its run's images, neither are its scores and class names",
                   given.empty() ? "the checkpoint's data folder" : "--data-dir " + given, dir, kind, ck.path,
                   dataset->second);
  return dir;
}

std::string eval_precision(const std::string& requested, const std::string& trained, const torch::Device& device) {
  if (requested != "auto" || trained.empty()) return requested;
  return trained == "tf32" && !device.is_cuda() ? "fp32" : trained;
}

std::string eval_layout(const std::string& requested, const std::string& trained) {
  if (requested != "auto") return requested;
  return trained.empty() ? "nchw" : trained == "nchw" || trained == "nhwc" ? trained : requested;
}

Numerics eval_numerics(const ImageEvalOptions& o, const Checkpoint& ck, const torch::Device& device) {
  const auto trained = [&](const char* key) {
    const auto it = ck.config.find(key);
    return it == ck.config.end() ? std::string() : it->second;
  };
  return numerics_for(eval_precision(o.precision, trained("precision"), device),
                      eval_layout(o.memory_format, trained("memory_format")), device);
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
  const Numerics numerics = eval_numerics(e.options, ck, dev);
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

}  // namespace blpa
