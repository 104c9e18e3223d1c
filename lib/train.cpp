#include "blpa/train.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fmt/format.h>
#include <fstream>
#include <sstream>
#include <torch/torch.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/export.h>
#include <torch/csrc/jit/serialization/pickler.h>

#include "blpa/dataset.h"
#include "blpa/loader.h"
#include "blpa/memory.h"
#include "blpa/resnet.h"

namespace blpa {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
constexpr int64_t kCheckpointFormat = 1;

std::string resolve_dataset(const TrainConfig& c) {
  if (c.data_dir.empty() && c.dataset != "auto" && c.dataset != "fashion-mnist")
    throw std::invalid_argument("--dataset " + c.dataset + " needs --data-dir (only Fashion-MNIST has a default)");
  if (c.dataset != "auto") return c.dataset;
  if (c.data_dir.empty()) return "fashion-mnist";
  const fs::path d(c.data_dir);
  if (fs::exists(d / "data_batch_1.bin")) return "cifar10";
  if (fs::exists(d / "train.bin")) return "cifar100";
  if (fs::exists(d / "train-images-idx3-ubyte") || fs::exists(d / "train-images-idx3-ubyte.gz"))
    return "fashion-mnist";
  throw std::runtime_error("--data-dir " + c.data_dir +
                           ": no CIFAR-10 (data_batch_1.bin), CIFAR-100 (train.bin) or IDX "
                           "(train-images-idx3-ubyte[.gz]) files found; name the data set with --dataset");
}

data::Dataset subset(data::Dataset d, int64_t n) {
  if (n > 0 && n < d.size()) {
    d.images = d.images.narrow(0, 0, n).contiguous();
    d.labels = d.labels.narrow(0, 0, n).contiguous();
  }
  return d;
}

// Atomic: written to a temporary file in the same directory, flushed to disk, renamed over
// the old checkpoint. A crash at any point leaves the previous checkpoint intact.
void save_checkpoint(const std::string& path, const TrainConfig& c, int64_t iteration, ResNet& model,
                     torch::optim::SGD& opt) {
  torch::serialize::OutputArchive archive;
  archive.write("blpa_format", c10::IValue(kCheckpointFormat));
  archive.write("blpa_identity", c10::IValue(c.identity()));
  archive.write("blpa_config", c10::IValue(c.describe()));
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
                             "\nresume with the same data set, model, mode, bits, batch and seed");
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

struct Eval {
  double loss, acc;
};

Eval evaluate(ResNet& model, const data::Dataset& test, const data::Normalisation& norm, int64_t batch,
              const torch::Device& dev) {
  torch::NoGradGuard no_grad;
  model->eval();
  double loss = 0;
  int64_t correct = 0;
  for (int64_t s = 0; s < test.size(); s += batch) {
    std::vector<int64_t> idx;
    for (int64_t i = s; i < std::min(test.size(), s + batch); ++i) idx.push_back(i);
    auto b = data::make_batch(test, idx, norm, nullptr, 0);
    auto out = model->forward(b.images.to(dev));
    auto labels = b.labels.to(dev);
    loss += torch::nn::functional::cross_entropy(
                out, labels, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
                .item<double>();
    correct += out.argmax(1).eq(labels).sum().item<int64_t>();
  }
  model->train();
  return {loss / test.size(), static_cast<double>(correct) / test.size()};
}

std::string duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const int64_t t = static_cast<int64_t>(s);
  return t >= 3600 ? fmt::format("{}h{:02d}m", t / 3600, t / 60 % 60) : fmt::format("{}m{:02d}s", t / 60, t % 60);
}

}  // namespace

double TrainConfig::lr_at(int64_t it) const {
  if (it < warmup) return warmup_lr;
  double r = lr;
  for (int64_t s : steps)
    if (it >= s) r *= factor;
  return r;
}

std::string TrainConfig::identity() const {
  return fmt::format("dataset={} train_subset={} arch={} depth={} mode={} batch={} seed={}", dataset, train_subset,
                     arch, depth, mode.str(), batch, seed);
}

std::string TrainConfig::describe() const {
  return fmt::format(
      "dataset={}\ndata_dir={}\ntrain_subset={}\ntest_subset={}\naugment={}\narch={}\ndepth={}\nmode={}\nbatch={}\n"
      "iterations={}\nlr={}\nwarmup={}\nwarmup_lr={}\nsteps={}\nfactor={}\nmomentum={}\nweight_decay={}\ndevice={}\n"
      "seed={}\nthreads={}\nworkers={}\n",
      dataset, data_dir, train_subset, test_subset, augment, arch, depth, mode.str(), batch, iterations, lr, warmup,
      warmup_lr, fmt::join(steps, ","), factor, momentum, weight_decay, device, seed, threads, workers);
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
  if ((mode.mode == Mode::blpa || mode.mode == Mode::naive) && mode.bits != 8 && mode.bits != 4)
    bad("--bits must be 8 or 4");
  if (resume && checkpoint.empty()) bad("--resume needs --checkpoint PATH");
  if (log_every <= 0 || eval_every < 0 || checkpoint_every <= 0)
    bad("--log-every and --checkpoint-every must be positive, --eval-every >= 0");
  if (workers <= 0 || prefetch <= 0) bad("--workers and --prefetch must be positive");
}

TrainResult train(const TrainConfig& config_in, const std::atomic<bool>* stop) {
  TrainConfig config = config_in;
  config.validate();
  config.dataset = resolve_dataset(config);
  const std::string dir = config.data_dir.empty() ? std::string(data::kDebianFashionMnist) : config.data_dir;
  if (config.threads > 0) torch::set_num_threads(config.threads);
  const torch::Device dev(config.device);
  if (dev.is_cuda() && !torch::cuda::is_available()) throw std::runtime_error("--device cuda: no CUDA device");
  memory::install_cpu_counter();

  const data::Dataset train_set = subset(data::load(config.dataset, dir, true), config.train_subset);
  const data::Dataset test_set = subset(data::load(config.dataset, dir, false), config.test_subset);
  if (train_set.images.sizes().slice(1) != test_set.images.sizes().slice(1))
    throw std::runtime_error("training and test images differ in shape");
  const data::Normalisation norm = data::channel_stats(train_set);
  spdlog::info("{}: {} training / {} test images of {}x{}x{}, {} classes", config.dataset, train_set.size(),
               test_set.size(), train_set.images.size(1), train_set.images.size(2), train_set.images.size(3),
               train_set.num_classes);

  NetConfig net;
  net.arch = config.arch;
  net.depth = config.depth;
  net.in_channels = train_set.images.size(1);
  net.num_classes = train_set.num_classes;
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
  std::ofstream log;
  if (!config.log_path.empty()) {
    log.open(config.log_path, config.resume ? std::ios::app : std::ios::trunc);
    if (!log) throw std::runtime_error("--log " + config.log_path + ": cannot be opened for writing");
  }
  int64_t params = 0;
  for (const auto& p : model->parameters()) params += p.numel();
  spdlog::info("model {}-{} ({} parameters), mode {}, batch {}, {} iterations, device {}", config.arch, config.depth,
               params, config.mode.str(), config.batch, config.iterations, dev.str());

  data::TrainLoader loader(train_set, config.batch, config.seed, norm, data::Augment{config.augment ? 4 : 0, config.augment},
                           it, config.workers, config.prefetch);
  TrainResult result;
  const bool tty = config.progress && ::isatty(STDERR_FILENO);
  auto window_start = Clock::now();
  const auto run_start = Clock::now();
  const int64_t first = it;
  int64_t window_iters = 0;
  double window_loss = 0;
  int64_t stored = 0;
  memory::reset_peak(dev);
  auto checkpoint = [&] {
    if (config.checkpoint.empty()) return;
    save_checkpoint(config.checkpoint, config, it, model, opt);
  };

  while (it < config.iterations) {
    const double lr = config.lr_at(it);
    for (auto& g : opt.param_groups()) static_cast<torch::optim::SGDOptions&>(g.options()).lr(lr);
    auto batch = loader.next();
    auto x = batch.images.to(dev), y = batch.labels.to(dev);
    opt.zero_grad();
    const int64_t before = memory::allocated(dev);
    auto out = model->forward(x);
    stored = memory::allocated(dev) - before - static_cast<int64_t>(out.nbytes());
    auto loss = torch::nn::functional::cross_entropy(out, y);
    loss.backward();
    // Read the loss only once backward is queued: on CUDA an earlier read would stall the
    // launch of backward behind the whole forward pass. A bad loss still changes nothing: the
    // update is not applied and no checkpoint is written.
    const double loss_v = loss.item<double>();
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
      const double ips = window_iters * config.batch / secs;
      const double total = std::chrono::duration<double>(Clock::now() - run_start).count();
      const double eta = total / (it - first) * (config.iterations - it);
      const int64_t peak = memory::peak(dev);
      if (log)
        log << fmt::format("{{\"type\": \"train\", \"iter\": {}, \"epoch\": {:.3f}, \"loss\": {:.6g}, \"lr\": {:.6g}, "
                           "\"images_per_s\": {:.2f}, \"stored_activation_bytes\": {}, \"peak_bytes\": {}}}\n",
                           it, double(it) / loader.batches_per_epoch(), window_loss / window_iters, lr, ips, stored,
                           peak)
            << std::flush;
      const std::string line =
          fmt::format("iter {}/{}  loss {:.4f}  lr {:.4g}  {:.1f} img/s  stored {:.1f} MiB  ETA {}", it,
                      config.iterations, window_loss / window_iters, lr, ips, stored / 1048576.0, duration(eta));
      if (tty)
        fmt::print(stderr, "\r{:<100}", line);
      else if (config.progress)
        fmt::print(stderr, "{}\n", line);
      window_start = Clock::now();
      window_iters = 0;
      window_loss = 0;
      memory::reset_peak(dev);
    }
    if ((config.eval_every > 0 && it % config.eval_every == 0) || last) {
      const Eval e = evaluate(model, test_set, norm, config.batch, dev);
      result.test_loss = e.loss;
      result.test_acc = e.acc;
      if (log)
        log << fmt::format("{{\"type\": \"eval\", \"iter\": {}, \"test_loss\": {:.6g}, \"test_acc\": {:.6f}}}\n", it,
                           e.loss, e.acc)
            << std::flush;
      if (tty) fmt::print(stderr, "\n");
      spdlog::info("iteration {}: test loss {:.4f}, test error {:.2f}%", it, e.loss, 100 * (1 - e.acc));
    }
    if (it % config.checkpoint_every == 0 || last) checkpoint();
    if (stop && stop->load() && !last) {
      checkpoint();
      if (tty) fmt::print(stderr, "\n");
      result.interrupted = true;
      break;
    }
  }
  result.iteration = it;
  if (!config.export_path.empty() && !result.interrupted) export_state_dict(config.export_path, model);
  return result;
}

}  // namespace blpa
