// blpa-train's settings: checked, resolved ("auto" made what the run uses, --dataset from what
// --data-dir holds), and recorded in the checkpoint, the log and the summary.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <map>
#include <set>
#include <thread>

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "blpa/checkpoint.h"
#include "blpa/dataset.h"
#include "blpa/formats.h"
#include "blpa/train.h"
#include "train_parts.h"

namespace blpa {

namespace fs = std::filesystem;

// ---- --dataset auto: what --data-dir holds ----

namespace {

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

}  // namespace

// MNIST's and Fashion-MNIST's files have the same names: a folder of either is told by its
// images, whose mean pixel is about 33 in MNIST (and 45-50 in EMNIST and KMNIST, digits or
// letters on black) and 73 in Fashion-MNIST.
std::string idx_kind(const std::string& dir) {
  const double mean = data::idx_mean_pixel(data::idx_file(dir, "train-images-idx3-ubyte"), 1000);
  if (std::isnan(mean)) return "";
  return mean < 58 ? "mnist" : "fashion-mnist";
}

// ---- The settings as recorded (checkpoint, log, summary) ----

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
      "accum_steps={} log_every={} eval_every={} checkpoint_every={}",
      identity(), dist.world, iterations, lr, warmup, warmup_lr, fmt::join(steps, ","), factor, momentum,
      weight_decay, accum_steps, log_every, eval_every, checkpoint_every);
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

std::string TrainConfig::json() const {
  // The codes' bits, window and lift as numbers, for a sweep to group by (the mode's name holds
  // them as text, "blpa-4-l1"); 32 bits and null for plain and exact, which keep no codes.
  const bool coded = mode.mode == Mode::blpa || mode.mode == Mode::naive;
  const CodeFormat codes = coded ? mode.codes_format() : CodeFormat{};
  return fmt::format(
      "{{\"dataset\": {}, \"data_dir\": {}, \"train_subset\": {}, \"test_subset\": {}, \"augment\": {}, "
      "\"arch\": {}, \"depth\": {}, \"mode\": {}, \"bits\": {}, \"window\": {}, \"lift\": {}, \"batch\": {}, "
      "\"accum_steps\": {}, "
      "\"iterations\": {}, \"lr\": {}, \"warmup\": {}, \"warmup_lr\": {}, \"steps\": [{}], \"factor\": {}, "
      "\"momentum\": {}, \"weight_decay\": {}, \"device\": {}, \"seed\": {}, \"threads\": {}, \"workers\": {}, "
      "\"world\": {}, \"log_every\": {}, \"eval_every\": {}, \"checkpoint_every\": {}, \"cuda_graphs\": {}, "
      "\"precision\": {}, \"memory_format\": {}, \"train_list\": {}, \"val_list\": {}, \"run_id\": {}}}",
      json_string(dataset), json_string(data_dir), train_subset, test_subset, augment, json_string(arch), depth,
      json_string(mode.str()), coded ? mode.bits : 32, coded ? fmt::format("{}", codes.window) : "null",
      coded ? fmt::format("{}", codes.lift) : "null", batch, accum_steps, iterations, lr,
      warmup, warmup_lr, fmt::join(steps, ", "), factor, momentum, weight_decay, json_string(device), seed, threads,
      workers, dist.world, log_every, eval_every, checkpoint_every, json_string(cuda_graphs), json_string(precision),
      json_string(memory_format), json_string(train_list), json_string(val_list), json_string(run_id));
}

// ---- Checked and resolved ----

void TrainConfig::validate() const {
  auto bad = [](const std::string& m) { throw FlagError(m); };
  if (!std::set<std::string>{"auto", "cifar10", "cifar100", "cifar100-coarse", "fashion-mnist", "mnist", "imagenet"}
           .count(dataset))
    bad("--dataset must be auto, cifar10, cifar100, cifar100-coarse, fashion-mnist, mnist or imagenet, got '" +
        dataset + "'");
  if (batch <= 0) bad("--batch must be positive");
  if (iterations <= 0) bad("--iterations must be positive");
  // The update multiplies float32 tensors by them: past float32's range it failed mid-run,
  // naming no flag ("cannot be converted to type float without overflow").
  constexpr double kFloatMax = std::numeric_limits<float>::max();
  if (!(lr > 0) || !(warmup_lr > 0) || !(lr <= kFloatMax) || !(warmup_lr <= kFloatMax))
    bad("--lr and --warmup-lr must be positive and finite in float32 (at most 3.4e38)");
  if (warmup < 0) bad("--warmup must be >= 0");
  if (!(factor > 0 && factor <= 1)) bad("--lr-factor must be in (0, 1]");
  if (!(momentum >= 0 && momentum < 1)) bad("--momentum must be in [0, 1)");
  if (!(weight_decay >= 0) || !(weight_decay <= kFloatMax))
    bad("--weight-decay must be >= 0 and finite in float32 (at most 3.4e38)");
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
  // auto as it acts: graphs replay GPU work of one rank (their all-reduce is not captured).
  if (cuda_graphs == "auto" && (!dev.is_cuda() || dist.enabled())) cuda_graphs = "off";
  resolve_numerics();
  if (workers == 0) workers = default_workers(dataset, dist.local_world);
  // LibTorch's own count, recorded as what ran; the LOCAL_WORLD_SIZE processes of a machine
  // share its cores, as --workers does (8 ranks taking the machine's count each made 8 threads
  // a core), unless OMP_NUM_THREADS sets it (torchrun sets 1).
  if (threads == 0)
    threads = std::getenv("OMP_NUM_THREADS") ? at::get_num_threads()
                                             : std::max(1, at::get_num_threads() / std::max(dist.local_world, 1));
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

}  // namespace blpa
