#include "blpa/train.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fmt/format.h>
#include <fstream>
#include <map>
#include <sstream>
#include <thread>
#include <torch/torch.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/export.h>
#include <torch/csrc/jit/serialization/pickler.h>

#include "blpa/dataset.h"
#include "blpa/imagenet.h"
#include "blpa/loader.h"
#include "blpa/memory.h"
#include "blpa/resnet.h"

namespace blpa {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
constexpr int64_t kCheckpointFormat = 1;

std::string resolve_dataset(const TrainConfig& c) {
  if (c.data_dir.empty() && c.dataset != "auto" && c.dataset != "fashion-mnist" && c.train_list.empty())
    throw std::invalid_argument("--dataset " + c.dataset + " needs --data-dir (only Fashion-MNIST has a default)");
  if (!c.train_list.empty() || !c.val_list.empty()) {
    if (c.train_list.empty() || c.val_list.empty()) throw std::invalid_argument("--train-list and --val-list go together");
    if (c.dataset != "auto" && c.dataset != "imagenet")
      throw std::invalid_argument("--train-list and --val-list are for --dataset imagenet");
    return "imagenet";
  }
  if (c.dataset != "auto") return c.dataset;
  if (c.data_dir.empty()) return "fashion-mnist";
  const fs::path d(c.data_dir);
  if (fs::exists(d / "train") && fs::exists(d / "val")) return "imagenet";
  if (fs::exists(d / "data_batch_1.bin")) return "cifar10";
  if (fs::exists(d / "train.bin")) return "cifar100";
  if (fs::exists(d / "train-images-idx3-ubyte") || fs::exists(d / "train-images-idx3-ubyte.gz"))
    return "fashion-mnist";
  throw std::runtime_error("--data-dir " + c.data_dir +
                           ": no CIFAR-10 (data_batch_1.bin), CIFAR-100 (train.bin), IDX "
                           "(train-images-idx3-ubyte[.gz]) files or ImageNet folders (train/, val/) found; name the "
                           "data set with --dataset");
}

data::Dataset subset(data::Dataset d, int64_t n) {
  if (n > 0 && n < d.size()) {
    d.images = d.images.narrow(0, 0, n).contiguous();
    d.labels = d.labels.narrow(0, 0, n).contiguous();
  }
  return d;
}

// N images spread evenly over the list (which is sorted by class), so that all classes stay.
data::ImageList strided_subset(data::ImageList l, int64_t n) {
  if (n <= 0 || n >= l.size()) return l;
  data::ImageList out;
  out.root = l.root;
  out.classes = l.classes;
  out.num_classes = l.num_classes;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = i * l.size() / n;
    out.paths.push_back(l.paths[k]);
    out.labels.push_back(l.labels[k]);
  }
  return out;
}

// Atomic: written to a temporary file in the same directory, flushed to disk, renamed over
// the old checkpoint. A crash at any point leaves the previous checkpoint intact.
void save_checkpoint(const std::string& path, const TrainConfig& c, int64_t iteration, ResNet& model,
                     torch::optim::SGD& opt) {
  torch::serialize::OutputArchive archive;
  archive.write("blpa_format", c10::IValue(kCheckpointFormat));
  archive.write("blpa_identity", c10::IValue(c.identity()));
  archive.write("blpa_config", c10::IValue(c.describe()));
  archive.write("blpa_net", c10::IValue(std::vector<int64_t>{model->config().in_channels, model->config().num_classes}));
  archive.write("blpa_iteration", c10::IValue(iteration));
  torch::serialize::OutputArchive m, o;
  model->save(m);
  opt.save(o);
  archive.write("model", m);
  archive.write("optimizer", o);
  const fs::path target(path);
  if (target.has_parent_path()) fs::create_directories(target.parent_path());
  const std::string tmp = path + ".tmp";
  archive.save_to(tmp);
  const int fd = ::open(tmp.c_str(), O_RDONLY);
  if (fd < 0 || ::fsync(fd) != 0) {
    if (fd >= 0) ::close(fd);
    throw std::runtime_error("checkpoint " + tmp + ": cannot flush to disk");
  }
  ::close(fd);
  fs::rename(tmp, target);
}

// Returns the iteration stored in the checkpoint, after loading model and optimiser.
int64_t load_checkpoint(const std::string& path, const TrainConfig& c, ResNet& model, torch::optim::SGD& opt) {
  if (!fs::exists(path)) throw std::runtime_error("--resume: checkpoint " + path + " does not exist");
  torch::serialize::InputArchive archive;
  try {
    archive.load_from(path);
  } catch (const c10::Error& e) {
    std::string why = e.what_without_backtrace();
    why = why.substr(0, why.find(". "));  // the reader's first sentence; the rest is generic advice
    throw std::runtime_error("checkpoint " + path + " is damaged or truncated and was not used (" + why + ")");
  }
  c10::IValue v;
  if (!archive.try_read("blpa_format", v) || v.toInt() != kCheckpointFormat)
    throw std::runtime_error("checkpoint " + path + " is not a blpa checkpoint of format " +
                             std::to_string(kCheckpointFormat));
  archive.read("blpa_identity", v);
  const std::string saved = v.toStringRef();
  if (saved != c.identity())
    throw std::runtime_error("checkpoint " + path + " was written by an incompatible configuration:\n  checkpoint: " +
                             saved + "\n  this run:   " + c.identity() +
                             "\nresume with the same data set, model, mode, bits, window, lift, batch and seed");
  archive.read("blpa_iteration", v);
  const int64_t iteration = v.toInt();
  torch::serialize::InputArchive m, o;
  archive.read("model", m);
  archive.read("optimizer", o);
  model->load(m);
  opt.load(o);
  return iteration;
}

// A dict of tensors in torch.save's zip format. torch::pickle_save would tag the dict with a
// TorchScript type that torch.load's default weights_only=True refuses, so the pickler runs
// here with tagging off.
void export_state_dict(const std::string& path, ResNet& model) {
  c10::impl::GenericDict dict(c10::StringType::get(), c10::TensorType::get());
  for (const auto& p : model->named_parameters()) dict.insert(p.key(), p.value().detach().cpu());
  for (const auto& b : model->named_buffers()) dict.insert(b.key(), b.value().cpu());
  std::vector<char> pickle;
  torch::jit::Pickler pickler([&](const char* b, size_t n) { pickle.insert(pickle.end(), b, b + n); }, nullptr,
                              nullptr, nullptr, nullptr, /*tag_aggregates=*/false);
  pickler.protocol();
  pickler.pushIValue(c10::IValue(dict));
  pickler.stop();
  const std::string tmp = path + ".tmp";
  {
    caffe2::serialize::PyTorchStreamWriter writer(tmp);
    torch::jit::writeArchiveAndTensors("data", pickle.data(), pickle.size(), pickler.tensorData(), writer);
    writer.writeEndOfFile();
  }
  fs::rename(tmp, path);
}

// Loss, top-1 and top-5 over batches whose labels may be -1 (an image that failed to
// decode: left out). `views` rows of the batch belong to each label (10-crop: 10); their
// softmax outputs are averaged.
struct EvalSums {
  double loss = 0;
  int64_t top1 = 0, top5 = 0, count = 0;
  void add(const torch::Tensor& logits, const torch::Tensor& labels_in, int64_t views) {
    auto labels = labels_in.to(logits.device());
    auto prob = torch::softmax(logits.to(torch::kFloat), 1);
    if (views > 1) prob = prob.view({labels.size(0), views, -1}).mean(1);
    auto valid = labels.ge(0);
    const int64_t n = valid.sum().item<int64_t>();
    if (n == 0) return;
    if (n < labels.size(0)) {
      auto keep = valid.nonzero().squeeze(1);
      prob = prob.index_select(0, keep);
      labels = labels.index_select(0, keep);
    }
    loss += torch::nll_loss(prob.clamp_min(1e-30).log(), labels, {}, at::Reduction::Sum).item<double>();
    auto k = std::min<int64_t>(5, prob.size(1));
    auto top = std::get<1>(prob.topk(k, 1));
    auto hit = top.eq(labels.unsqueeze(1));
    top1 += hit.select(1, 0).sum().item<int64_t>();
    top5 += hit.any(1).sum().item<int64_t>();
    count += n;
  }
  EvalResult result(int64_t failed) const {
    const double n = std::max<int64_t>(count, 1);
    return {loss / n, top1 / n, top5 / n, count, failed};
  }
};

EvalResult evaluate(ResNet& model, const data::Dataset& test, const data::Normalisation& norm, int64_t batch,
                    const torch::Device& dev) {
  torch::NoGradGuard no_grad;
  model->eval();
  EvalSums sums;
  for (int64_t s = 0; s < test.size(); s += batch) {
    std::vector<int64_t> idx;
    for (int64_t i = s; i < std::min(test.size(), s + batch); ++i) idx.push_back(i);
    auto b = data::make_batch(test, idx, norm, nullptr, 0);
    sums.add(model->forward(b.images.to(dev)), b.labels, 1);
  }
  model->train();
  return sums.result(0);
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
  for (int64_t b = 0; b < batches; ++b) {
    auto batch = stream.next();
    sums.add(model->forward(batch.images.to(dev, /*non_blocking=*/true)), batch.labels, o.ten_crop ? 10 : 1);
    if (o.progress && ((b + 1) % 20 == 0 || b + 1 == batches))
      fmt::print(stderr, "\revaluated {}/{} images", std::min((b + 1) * o.batch, list.size()), list.size());
  }
  if (o.progress) fmt::print(stderr, "\n");
  if (was_training) model->train();
  return sums.result(errors.count.load());
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

CheckpointNetwork load_checkpoint_network(const std::string& path) {
  torch::serialize::InputArchive archive;
  try {
    archive.load_from(path);
  } catch (const c10::Error& err) {
    std::string why = err.what_without_backtrace();
    throw std::runtime_error("checkpoint " + path + " cannot be read (" + why.substr(0, why.find(". ")) + ")");
  }
  c10::IValue v;
  if (!archive.try_read("blpa_format", v) || v.toInt() != kCheckpointFormat || !archive.try_read("blpa_config", v))
    throw std::runtime_error("checkpoint " + path + " is not a blpa checkpoint");
  CheckpointNetwork out;
  std::map<std::string, std::string>& kv = out.config;
  std::istringstream lines(v.toStringRef());
  for (std::string line; std::getline(lines, line);)
    if (const auto eq = line.find('='); eq != std::string::npos) kv[line.substr(0, eq)] = line.substr(eq + 1);
  NetConfig net;
  net.arch = kv["arch"];
  net.depth = std::stoi(kv["depth"]);
  net.mode = parse_mode_config(kv["mode"]);  // checkpoints from before windows existed: the paper's 6
  if (!archive.try_read("blpa_net", v)) throw std::runtime_error("checkpoint " + path + " predates blpa-eval (no network shape)");
  const auto shape = v.toIntVector();
  net.in_channels = shape.at(0);
  net.num_classes = shape.at(1);
  archive.read("blpa_iteration", v);
  out.iteration = v.toInt();
  out.model = ResNet(net);
  torch::serialize::InputArchive m;
  archive.read("model", m);
  out.model->load(m);
  return out;
}

EvalResult evaluate_checkpoint(const CheckpointEval& e) {
  CheckpointNetwork stored = load_checkpoint_network(e.checkpoint);
  ResNet& model = stored.model;
  std::map<std::string, std::string>& kv = stored.config;
  const NetConfig& net = model->config();
  const std::string dataset = kv["dataset"];
  const std::string dir = !e.data_dir.empty() ? e.data_dir
                          : !kv["data_dir"].empty() ? kv["data_dir"]
                                                    : std::string(data::kDebianFashionMnist);
  const torch::Device dev(e.options.device);
  model->to(dev);
  model->eval();
  if (dataset == "imagenet") {
    data::ScanReport report;
    data::ImageList val = !e.val_list.empty() ? data::read_image_list(e.val_list, e.data_dir)
                          : !kv["val_list"].empty() ? data::read_image_list(kv["val_list"], kv["data_dir"])
                          : data::scan_image_folder(dir + "/val", e.index_cache, std::max(4, e.options.workers), &report);
    if (val.num_classes > net.num_classes)
      throw std::runtime_error("the validation labels go up to " + std::to_string(val.num_classes - 1) +
                               "; the network has " + std::to_string(net.num_classes) + " classes");
    if (!val.classes.empty()) val.num_classes = net.num_classes;
    return evaluate_images(model, strided_subset(std::move(val), e.subset), e.options);
  }
  // The normalisation is the trainer's: the statistics of the training images it used.
  const int64_t train_subset = kv["train_subset"].empty() ? 0 : std::stoll(kv["train_subset"]);
  const data::Dataset train = subset(data::load(dataset, dir, true), train_subset);
  const data::Dataset test = subset(data::load(dataset, dir, false), e.subset);
  return evaluate(model, test, data::channel_stats(train), e.options.batch, dev);
}

double TrainConfig::lr_at(int64_t it) const {
  if (it < warmup) return warmup_lr;
  double r = lr;
  for (int64_t s : steps)
    if (it >= s) r *= factor;
  return r;
}

std::string TrainConfig::identity() const {
  return fmt::format("dataset={} train_subset={} arch={} depth={} mode={} batch={} seed={}{}", dataset, train_subset,
                     arch, depth, mode.str(), batch, seed,
                     dist.enabled() ? fmt::format(" world={}", dist.world) : std::string());
}

std::string TrainConfig::describe() const {
  return fmt::format(
      "dataset={}\ndata_dir={}\ntrain_subset={}\ntest_subset={}\naugment={}\narch={}\ndepth={}\nmode={}\nbatch={}\n"
      "iterations={}\nlr={}\nwarmup={}\nwarmup_lr={}\nsteps={}\nfactor={}\nmomentum={}\nweight_decay={}\ndevice={}\n"
      "seed={}\nthreads={}\nworkers={}\naccum_steps={}\ntrain_list={}\nval_list={}\n",
      dataset, data_dir, train_subset, test_subset, augment, arch, depth, mode.str(), batch, iterations, lr, warmup,
      warmup_lr, fmt::join(steps, ","), factor, momentum, weight_decay, device, seed, threads, workers, accum_steps,
      train_list, val_list);
}

void TrainConfig::validate() const {
  auto bad = [](const std::string& m) { throw std::invalid_argument(m); };
  if (batch <= 0) bad("--batch must be positive");
  if (iterations <= 0) bad("--iterations must be positive");
  if (!(lr > 0) || !(warmup_lr > 0)) bad("--lr and --warmup-lr must be positive");
  if (warmup < 0) bad("--warmup must be >= 0");
  if (!(factor > 0 && factor <= 1)) bad("--lr-factor must be in (0, 1]");
  if (!(momentum >= 0 && momentum < 1)) bad("--momentum must be in [0, 1)");
  if (!(weight_decay >= 0)) bad("--weight-decay must be >= 0");
  for (size_t i = 0; i < steps.size(); ++i)
    if (steps[i] <= 0 || (i > 0 && steps[i] <= steps[i - 1])) bad("--lr-steps must be positive and increasing");
  if ((mode.mode == Mode::blpa || mode.mode == Mode::naive) && mode.bits != 8 && mode.bits != 4 && mode.bits != 2)
    bad("--bits must be 8, 4 or 2");
  if (!(mode.window == 0 || (std::isfinite(mode.window) && mode.window > 0)))
    bad("--window must be a positive width in units of x_hat");
  if (mode.lift && !std::isfinite(*mode.lift)) bad("--lift must be a finite number of units of x_hat");
  if (resume && checkpoint.empty()) bad("--resume needs --checkpoint PATH");
  if (log_every <= 0 || eval_every < 0 || checkpoint_every <= 0)
    bad("--log-every and --checkpoint-every must be positive, --eval-every >= 0");
  if (workers < 0 || prefetch <= 0) bad("--workers must be >= 0 and --prefetch positive");
  if (dist.local_world < 1) bad("LOCAL_WORLD_SIZE must be positive");
  if (accum_steps <= 0 || batch % accum_steps != 0) bad("--accum-steps must be positive and divide --batch");
}

TrainResult train(const TrainConfig& config_in, const std::atomic<bool>* stop) {
  TrainConfig config = config_in;
  config.validate();
  config.dataset = resolve_dataset(config);
  const std::string dir = config.data_dir.empty() ? std::string(data::kDebianFashionMnist) : config.data_dir;
  if (config.threads > 0) torch::set_num_threads(config.threads);
  torch::Device dev(config.device);
  if (dev.is_cuda() && !torch::cuda::is_available()) throw std::runtime_error("--device cuda: no CUDA device");
  if (dev.is_cuda() && config.dist.enabled() && !dev.has_index())
    dev = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(config.dist.local_rank));
  config.device = dev.str();
  memory::install_cpu_counter();
  std::unique_ptr<Distributed> dist;
  const bool lead = config.dist.rank == 0;  // writes the log and the checkpoints
  if (config.dist.enabled()) {
    dist = std::make_unique<Distributed>(config.dist, dev.is_cuda() ? "nccl" : "gloo");
    spdlog::info("rank {} of {} ({}, {} backend), batch {} per rank, {} in all", config.dist.rank, config.dist.world,
                 dev.str(), dist->backend(), config.batch, config.batch * config.dist.world);
  }
  const data::Shard shard{config.dist.rank, config.dist.world};
  if (config.workers == 0) config.workers = default_workers(config.dataset, config.dist.local_world);

  // The data: in memory (CIFAR, MNIST-style) or JPEG folders decoded on the fly (ImageNet).
  const bool pin = dev.is_cuda();
  data::Dataset train_set, test_set;
  data::ImageList train_list, val_list;
  data::Normalisation norm;
  int64_t in_channels = 3, num_classes = 0;
  if (config.dataset == "imagenet") {
    data::ImageNetSplits splits;
    if (!config.train_list.empty()) {  // paths relative to --data-dir if given, else to each list's folder
      splits.train = data::read_image_list(config.train_list, config.data_dir);
      splits.val = data::read_image_list(config.val_list, config.data_dir);
      splits.train.num_classes = splits.val.num_classes = std::max(splits.train.num_classes, splits.val.num_classes);
    } else {
      splits = data::load_imagenet(dir, config.index_cache, std::max(4, config.workers));
    }
    train_list = strided_subset(std::move(splits.train), config.train_subset);
    val_list = strided_subset(std::move(splits.val), config.test_subset);
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

  NetConfig net;
  net.arch = config.arch;
  net.depth = config.depth;
  net.in_channels = in_channels;
  net.num_classes = num_classes;
  net.mode = config.mode;
  torch::manual_seed(config.seed);
  ResNet model(net);
  model->to(dev);
  model->train();

  // Weight decay on conv and linear weights only (tensors of rank > 1), not on gamma, beta, biases.
  std::vector<torch::Tensor> decay, no_decay;
  for (auto& p : model->parameters()) (p.dim() > 1 ? decay : no_decay).push_back(p);
  auto opts = [&](double wd) {
    return std::make_unique<torch::optim::SGDOptions>(
        torch::optim::SGDOptions(config.lr_at(0)).momentum(config.momentum).weight_decay(wd));
  };
  torch::optim::SGD opt({torch::optim::OptimizerParamGroup(decay, opts(config.weight_decay)),
                         torch::optim::OptimizerParamGroup(no_decay, opts(0.0))},
                        torch::optim::SGDOptions(config.lr_at(0)).momentum(config.momentum));

  int64_t it = 0;
  if (config.resume) {
    it = load_checkpoint(config.checkpoint, config, model, opt);
    if (it >= config.iterations)
      throw std::runtime_error(fmt::format("checkpoint {} is at iteration {}: --iterations {} leaves nothing to train",
                                           config.checkpoint, it, config.iterations));
    spdlog::info("resumed from {} at iteration {}", config.checkpoint, it);
  }
  std::unique_ptr<GradientReducer> reducer;
  if (dist) {
    // Every rank starts from rank 0's weights and statistics (the same seed gives the same
    // initialisation, and every rank resumes from the same file; this makes sure of it).
    std::vector<torch::Tensor> state;
    for (const auto& p : model->parameters()) state.push_back(p.detach());
    for (const auto& b : model->buffers()) state.push_back(b);
    dist->broadcast(state);
    reducer = dist->reducer(model->parameters());
  }
  std::ofstream log;
  if (!config.log_path.empty() && lead) {
    log.open(config.log_path, config.resume ? std::ios::app : std::ios::trunc);
    if (!log) throw std::runtime_error("--log " + config.log_path + ": cannot be opened for writing");
  }
  int64_t params = 0;
  for (const auto& p : model->parameters()) params += p.numel();
  spdlog::info("model {}-{} ({} parameters), mode {}, batch {}, {} iterations, device {}", config.arch, config.depth,
               params, config.mode.str(), config.batch, config.iterations, dev.str());

  std::unique_ptr<data::TrainLoader> memory_loader;
  std::unique_ptr<data::BatchStream> image_loader;
  data::DecodeErrors decode_errors;
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
      o.batch = config.batch, o.workers = config.workers, o.device = config.device;
      return evaluate_images(model, val_list, o);
    };
  } else {
    memory_loader = std::make_unique<data::TrainLoader>(
        train_set, config.batch, config.seed, norm, data::Augment{config.augment ? 4 : 0, config.augment}, it,
        config.workers, config.prefetch, shard);
    per_epoch = memory_loader->batches_per_epoch();
    next_batch = [&] { return memory_loader->next(); };
    run_eval = [&] { return evaluate(model, test_set, norm, config.batch, dev); };
  }
  TrainResult result;
  const bool tty = config.progress && lead && ::isatty(STDERR_FILENO);
  auto window_start = Clock::now();
  const auto run_start = Clock::now();
  const int64_t first = it;
  int64_t window_iters = 0;
  double window_loss = 0;
  int64_t stored = 0;
  memory::reset_peak(dev);
  auto checkpoint = [&] {
    if (config.checkpoint.empty() || !lead) return;
    save_checkpoint(config.checkpoint, config, it, model, opt);
  };

  try {
  while (it < config.iterations) {
    const double lr = config.lr_at(it);
    for (auto& g : opt.param_groups()) static_cast<torch::optim::SGDOptions&>(g.options()).lr(lr);
    auto batch = next_batch();
    auto x = batch.images.to(dev, /*non_blocking=*/true), y = batch.labels.to(dev, /*non_blocking=*/true);
    opt.zero_grad();
    // A bad loss changes nothing: the update is not applied and no checkpoint is written.
    double loss_v = accumulate_gradients(model, x, y, config.accum_steps, &stored, reducer.get());
    bool stopping = stop && stop->load();
    if (dist) {  // the mean loss over ranks, and a stop asked for on any rank stops them all
      const auto sums = dist->sum({loss_v, stopping ? 1.0 : 0.0});
      loss_v = sums[0] / config.dist.world;
      stopping = sums[1] > 0;
    }
    if (!std::isfinite(loss_v)) {
      throw NonFiniteLoss(fmt::format(
          "the loss became {} at iteration {} (learning rate {}); training stopped. {}", loss_v, it + 1, lr,
          config.checkpoint.empty() ? std::string("No checkpoint was configured.")
                                    : "The last good checkpoint, " + config.checkpoint + ", was kept."));
    }
    opt.step();
    if (config.mode.mode != Mode::plain) model->constrain_();
    ++it;
    ++window_iters;
    window_loss += loss_v;
    result.last_loss = loss_v;

    const bool last = it == config.iterations;
    if (it % config.log_every == 0 || last) {
      const double secs = std::chrono::duration<double>(Clock::now() - window_start).count();
      double ips = window_iters * config.batch / secs;
      int64_t peak = memory::peak(dev), peak_total = peak, stored_total = stored;
      if (dist) {  // per rank (this one, rank 0) and in total
        const auto sums = dist->sum({ips, static_cast<double>(peak), static_cast<double>(stored)});
        ips = sums[0];
        peak_total = static_cast<int64_t>(sums[1]);
        stored_total = static_cast<int64_t>(sums[2]);
      }
      const double total = std::chrono::duration<double>(Clock::now() - run_start).count();
      const double eta = total / (it - first) * (config.iterations - it);
      if (log)
        log << fmt::format("{{\"type\": \"train\", \"iter\": {}, \"epoch\": {:.3f}, \"loss\": {:.6g}, \"lr\": {:.6g}, "
                           "\"images_per_s\": {:.2f}, \"stored_activation_bytes\": {}, \"peak_bytes\": {}, "
                           "\"decode_failures\": {}{}}}\n",
                           it, double(it) / per_epoch, window_loss / window_iters, lr, ips, stored, peak,
                           decode_errors.count.load(),
                           dist ? fmt::format(", \"world\": {}, \"global_batch\": {}, \"images_per_s_per_rank\": {:.2f}, "
                                              "\"stored_activation_bytes_total\": {}, \"peak_bytes_total\": {}",
                                              config.dist.world, config.batch * config.dist.world,
                                              ips / config.dist.world, stored_total, peak_total)
                                : std::string())
            << std::flush;
      const std::string line =
          fmt::format("iter {}/{}  loss {:.4f}  lr {:.4g}  {:.1f} img/s  stored {:.1f} MiB  ETA {}", it,
                      config.iterations, window_loss / window_iters, lr, ips, stored / 1048576.0, duration(eta));
      if (tty)
        fmt::print(stderr, "\r{:<100}", line);
      else if (config.progress && lead)
        fmt::print(stderr, "{}\n", line);
      window_start = Clock::now();
      window_iters = 0;
      window_loss = 0;
      memory::reset_peak(dev);
    }
    // Evaluation and checkpoints are not training: their time is kept out of the next
    // window's images/s, on every rank (the others wait for rank 0 at a barrier).
    const auto pause = Clock::now();
    const bool evaluating = (config.eval_every > 0 && it % config.eval_every == 0) || last;
    const bool checkpointing = it % config.checkpoint_every == 0 || last;
    // Rank 0 evaluates.
    if (lead && evaluating) {
      if (tty) fmt::print(stderr, "\n");
      const EvalResult e = run_eval();
      result.test_loss = e.loss;
      result.test_acc = e.top1;
      result.test_top5 = e.top5;
      if (log)
        log << fmt::format("{{\"type\": \"eval\", \"iter\": {}, \"test_loss\": {:.6g}, \"test_acc\": {:.6f}, "
                           "\"test_top5\": {:.6f}, \"images\": {}, \"failed\": {}}}\n",
                           it, e.loss, e.top1, e.top5, e.count, e.failed)
            << std::flush;
      spdlog::info("iteration {}: test loss {:.4f}, test error {:.2f}% (top-5 {:.2f}%)", it, e.loss,
                   100 * (1 - e.top1), 100 * (1 - e.top5));
    }
    if (checkpointing) checkpoint();
    if (dist && (evaluating || checkpointing)) dist->barrier();
    window_start += Clock::now() - pause;
    if (stopping && !last) {
      checkpoint();
      if (tty) fmt::print(stderr, "\n");
      result.interrupted = true;
      break;
    }
  }
  } catch (const PeerLost& e) {
    // A peer that died or went silent: every rank stops, with the reason, instead of hanging.
    throw std::runtime_error(fmt::format("rank {} of {}: lost the other ranks during iteration {} ({}). {}",
                                         config.dist.rank, config.dist.world, it + 1, e.what(),
                                         config.checkpoint.empty() ? std::string("No checkpoint was configured.")
                                                                   : "Resume all ranks from " + config.checkpoint + "."));
  }
  result.iteration = it;
  if (!config.export_path.empty() && !result.interrupted) export_state_dict(config.export_path, model);
  return result;
}

}  // namespace blpa
