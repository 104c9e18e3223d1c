// blpa-predict: the classes a blpa-train checkpoint gives to images, as JSON lines. ImageNet-
// style checkpoints read JPEG files, folders or a list file with the evaluation transform of
// blpa-eval (shorter side 256, centre crop or 10 crops); checkpoints of the in-memory data sets
// classify records of their data set (--from-dataset N..M), normalised as the trainer did.
#include <blpa/checkpoint.h>
#include <blpa/dataset.h>
#include <blpa/imagenet.h>
#include <blpa/jpeg.h>
#include <blpa/loader.h>
#include <blpa/train.h>
#include <dirent.h>
#include <fmt/format.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <cxxopts.hpp>
#include <fstream>
#include <iostream>
#include <map>

#include "flags.h"

namespace {

using blpa::FlagError;

const char* kHelp =
    "Classify images with a blpa-train checkpoint and print, for each, one JSON line: the top-k classes "
    "with their probabilities (softmax; with --ten-crop averaged over the crops; equal ones in class "
    "order, as blpa-eval ranks them), the class index and, "
    "where the data set names its classes, the name (ImageNet: the wnid of the class folder; CIFAR-10/100, "
    "MNIST, Fashion-MNIST: the class name):\n"
    "  {\"file\": \"a.JPEG\", \"top\": [{\"class\": 3, \"name\": \"n01443537\", \"prob\": 0.91}, ...]}\n"
    "ImageNet-style checkpoints take JPEG files, folders (searched recursively for .jpg/.jpeg; links to "
    "folders are not followed) and --list files; checkpoints of CIFAR, MNIST or Fashion-MNIST take "
    "--from-dataset N..M, records of their data set (\"index\" and the true \"label\" are printed with "
    "each). An image that cannot be decoded is reported on stderr and as a JSON line with an \"error\" "
    "field, and skipped.\n"
    "Exit codes: 0 at least one image classified, 1 an error or no image could be classified, 2 bad flags, 3 the "
    "network's outputs overflow (finite weights too large, as a run's about to diverge: blpa-eval's 3 too).\n";

// ---- class names ---------------------------------------------------------------------------

// The names of the in-memory data sets' classes, in label order (the data sets' own metadata).
std::vector<std::string> fixed_class_names(const std::string& dataset) {
  if (dataset == "cifar10")
    return {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"};
  if (dataset == "fashion-mnist")
    return {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"};
  if (dataset == "mnist") return {"0", "1", "2", "3", "4", "5", "6", "7", "8", "9"};
  if (dataset == "cifar100-coarse")
    return {"aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
            "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
            "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "large_omnivores_and_herbivores",
            "medium_mammals", "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
            "vehicles_1", "vehicles_2"};
  if (dataset == "cifar100")
    return {"apple",      "aquarium_fish", "baby",       "bear",         "beaver",     "bed",       "bee",
            "beetle",     "bicycle",       "bottle",     "bowl",         "boy",        "bridge",    "bus",
            "butterfly",  "camel",         "can",        "castle",       "caterpillar", "cattle",   "chair",
            "chimpanzee", "clock",         "cloud",      "cockroach",    "couch",      "crab",      "crocodile",
            "cup",        "dinosaur",      "dolphin",    "elephant",     "flatfish",   "forest",    "fox",
            "girl",       "hamster",       "house",      "kangaroo",     "keyboard",   "lamp",      "lawn_mower",
            "leopard",    "lion",          "lizard",     "lobster",      "man",        "maple_tree", "motorcycle",
            "mountain",   "mouse",         "mushroom",   "oak_tree",     "orange",     "orchid",    "otter",
            "palm_tree",  "pear",          "pickup_truck", "pine_tree",  "plain",      "plate",     "poppy",
            "porcupine",  "possum",        "rabbit",     "raccoon",      "ray",        "road",      "rocket",
            "rose",       "sea",           "seal",       "shark",        "shrew",      "skunk",     "skyscraper",
            "snail",      "snake",         "spider",     "squirrel",     "streetcar",  "sunflower", "sweet_pepper",
            "table",      "tank",          "telephone",  "television",   "tiger",      "tractor",   "train",
            "trout",      "tulip",         "turtle",     "wardrobe",     "whale",      "willow_tree", "wolf",
            "woman",      "worm"};
  return {};
}

// Directory entries, sorted by name (POSIX calls, as data/imagenet.cpp: see its note on
// LibTorch and std::filesystem).
struct Entry {
  std::string name;
  bool dir;   // a folder, or a link to one
  bool link;  // a symbolic link
};
std::vector<Entry> list_dir(const std::string& dir) {
  std::vector<Entry> out;
  DIR* d = ::opendir(dir.c_str());
  if (!d) return out;
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name == "." || name == "..") continue;
    const std::string path = dir + "/" + name;
    struct stat st{}, lst{};
    out.push_back({name, ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode),
                   ::lstat(path.c_str(), &lst) == 0 && S_ISLNK(lst.st_mode)});
  }
  ::closedir(d);
  std::sort(out.begin(), out.end(), [](const Entry& a, const Entry& b) { return a.name < b.name; });
  return out;
}

bool is_dir(const std::string& p) {
  struct stat st{};
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

// A file's lines without their CR and the first line's UTF-8 byte-order mark. A file that
// does not exist, or a folder, is a bad flag (exit 2, as a --checkpoint folder).
std::vector<std::string> read_lines(const std::string& path, const std::string& flag) {
  blpa::require_file(flag, path);
  errno = 0;
  std::ifstream f(path);
  if (!f)
    throw std::runtime_error(flag + " " + path + ": cannot be read" +
                             (errno ? std::string(" (") + std::strerror(errno) + ")" : std::string()));
  std::vector<std::string> lines;
  for (std::string line; std::getline(f, line);) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (lines.empty() && line.rfind("\xEF\xBB\xBF", 0) == 0) line.erase(0, 3);
    lines.push_back(line);
  }
  return lines;
}

// --class-names FILE, else the data set's fixed names, else (ImageNet trained from folders)
// the names the checkpoint recorded, or for one from before it recorded them the class folders
// of <data_dir>/train in sorted order, as the trainer numbered them. Empty when none are known
// or they do not fit the network.
std::vector<std::string> class_names(const blpa::Checkpoint& ck, const std::string& names_file) {
  const int64_t classes = ck.net.num_classes;
  if (!names_file.empty()) {
    auto names = read_lines(names_file, "--class-names");
    while (!names.empty() && names.back().empty()) names.pop_back();
    // A blank line within was taken as a class named "", and every later name as the one after it.
    if (const auto blank = std::find(names.begin(), names.end(), ""); blank != names.end())
      throw FlagError(fmt::format("--class-names {}: line {} is blank (one name a line, class 0 first)", names_file,
                                  blank - names.begin() + 1));
    if (static_cast<int64_t>(names.size()) != classes)
      throw FlagError(fmt::format("--class-names {}: {} names for a network of {} classes", names_file, names.size(),
                                  classes));  // another data set's names: a flag that does not fit, exit 2
    return names;
  }
  auto kv = ck.config;
  std::vector<std::string> names = fixed_class_names(kv["dataset"]);
  if (const auto trained = blpa::checkpoint_classes(ck); static_cast<int64_t>(trained.size()) == classes)
    return trained;  // as the run numbered them
  if (kv["dataset"] == "imagenet" && !kv["data_dir"].empty() && kv["train_list"].empty()) {
    for (const auto& e : list_dir(kv["data_dir"] + "/train"))
      if (e.dir) names.push_back(e.name);
  }
  if (!names.empty() && static_cast<int64_t>(names.size()) != classes) {
    std::cerr << fmt::format("blpa-predict: warning: {} class names found for a network of {} classes; printing "
                             "class indices only (--class-names FILE gives names)\n",
                             names.size(), classes);
    names.clear();
  }
  return names;
}

// ---- inputs --------------------------------------------------------------------------------

struct Input {
  std::string path;
  int64_t label = -1;  // from a list file's "path,label" line, else -1
};

bool is_jpeg_name(const std::string& n) {
  const auto dot = n.rfind('.');
  if (dot == std::string::npos) return false;
  std::string ext = n.substr(dot + 1);
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  return ext == "jpeg" || ext == "jpg";
}

// Its JPEGs, in sorted order, depth first. Links to folders are not followed (as find does
// not), so a link to a folder above cannot make the walk endless.
void add_folder(const std::string& dir, std::vector<Input>& out) {
  for (const auto& e : list_dir(dir)) {
    const std::string p = dir + "/" + e.name;
    if (e.dir && !e.link) add_folder(p, out);
    else if (!e.dir && is_jpeg_name(e.name)) out.push_back({p});
  }
}

// One image per line, or "path,label" as blpa's list files (spaces around the label, and a
// byte-order mark, taken as blpa-train takes them); blank lines and '#' comments are skipped;
// relative paths are relative to the list's folder. A label must be one of the network's
// `classes`: a list of another data set's labels is refused.
void add_list(const std::string& list, int64_t classes, std::vector<Input>& out) {
  const auto slash = list.rfind('/');
  const std::string base = slash == std::string::npos ? "" : list.substr(0, slash + 1);
  bool first = true;
  for (std::string text : read_lines(list, "--list")) {
    const auto l = blpa::data::split_list_line(std::move(text), first);
    first = false;
    std::string line = l.line;  // without its indentation and trailing blanks, as blpa-train's
    if (!l.unreadable.empty()) throw std::runtime_error("--list " + list + ": " + l.unreadable);
    if (l.ignored) continue;
    Input in;
    if (l.has_comma) {
      bool labelled = false;
      try {
        in.label = blpa::parse_number<int64_t>("label", l.label);
        line = l.path;
        labelled = true;
      } catch (const std::exception&) {  // a comma that is part of the name
      }
      if (labelled && in.label < 0)  // refused, as blpa-train refuses it (-1 would read as "no label")
        throw std::runtime_error(fmt::format("--list {}: label {} of {} is negative: labels are classes, 0 to {}", list,
                                             in.label, line, classes - 1));
      if (in.label >= classes)
        throw std::runtime_error(fmt::format("--list {}: label {} of {} is not a class of the network, which has {}",
                                             list, in.label, line, classes));
    }
    if (line.empty()) throw std::runtime_error("--list " + list + ": a line without a path");
    in.path = line[0] == '/' ? line : base + line;
    out.push_back(in);
  }
}

// "N..M": records N to M-1; "N..": N to the end. end = -1 for the end.
std::pair<int64_t, int64_t> parse_range(const std::string& s) {
  const auto dots = s.find("..");
  if (dots == std::string::npos) throw FlagError("--from-dataset: '" + s + "' is not N..M (records N to M-1)");
  const int64_t first = blpa::parse_number<int64_t>("--from-dataset", s.substr(0, dots));
  const std::string rest = s.substr(dots + 2);
  const int64_t end = rest.empty() ? -1 : blpa::parse_number<int64_t>("--from-dataset", rest);
  if (first < 0 || (!rest.empty() && end <= first))  // a negative M is no "to the end"
    throw FlagError("--from-dataset " + s + ": needs 0 <= N < M");
  return {first, end};
}

// ---- output --------------------------------------------------------------------------------

// Finite weights whose outputs overflow (those of a run about to diverge): probabilities of
// NaN, which are no answer and no JSON. blpa-eval refuses such a network with exit 3 too.
struct Overflow : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Printer {
  std::vector<std::string> names;
  int64_t top_k = 5;

  // `logp`: one row of log_class_probs, ranked as blpa-eval ranks it.
  std::string top(const torch::Tensor& logp) const {
    if (!torch::isfinite(logp).all().item<bool>())
      throw Overflow("the network's outputs overflow (its weights are finite but too large, as those of a run about "
                     "to diverge): no probabilities");
    auto [best, idx] = blpa::top_classes(logp, top_k);
    const auto p = best.exp();
    std::string s = "[";
    for (int64_t j = 0; j < p.size(0); ++j) {
      const int64_t k = idx[j].item<int64_t>();
      s += fmt::format("{}{{\"class\": {}{}, \"prob\": {:.6g}}}", j ? ", " : "", k,
                       names.empty() ? "" : ", \"name\": " + blpa::json_string(names[k]), p[j].item<float>());
    }
    return s + "]";
  }
};

struct Options {
  std::string checkpoint, list, data_dir, names_file, device = "cpu", split = "test", range;
  std::vector<std::string> paths;
  blpa::ImageEvalOptions eval;
  int64_t top_k = 5;
};

int64_t predict_images(blpa::ResNet& model, const std::vector<Input>& inputs, const Options& o, const Printer& out) {
  const auto& e = o.eval;
  const int64_t views = e.ten_crop ? 10 : 1, n = static_cast<int64_t>(inputs.size());
  const int64_t batches = n / e.batch + (n % e.batch != 0);  // n + batch - 1 may overflow
  const auto norm = blpa::data::imagenet_normalisation();
  const torch::Device dev(o.device);
  std::vector<std::string> errors(inputs.size());  // each written by the one thread that decodes it
  blpa::data::BatchStream stream(
      [&](int64_t b) {
        if (b >= batches) return blpa::data::Batch{};
        const int64_t first = b * e.batch, count = std::min(e.batch, n - first);
        // labels: 1 for an image that decoded, -1 for one that did not (its views stay zeros)
        blpa::data::Batch batch{
            torch::zeros({count * views, 3, e.crop, e.crop}, torch::TensorOptions().pinned_memory(dev.is_cuda())),
            torch::ones({count}, torch::kLong)};
        for (int64_t i = 0; i < count; ++i) {
          const auto d = blpa::data::decode_jpeg_file(inputs[first + i].path, e.resize_short);
          if (d.status != blpa::data::DecodeStatus::ok) {
            errors[first + i] = blpa::data::to_string(d.status) + (d.message.empty() ? "" : ": " + d.message);
            batch.labels.data_ptr<int64_t>()[i] = -1;
            continue;
          }
          blpa::data::eval_views(d.image, e.resize_short, e.crop, e.ten_crop, norm,
                                 batch.images.narrow(0, i * views, views));
        }
        return batch;
      },
      0, e.workers, e.workers + 1);
  torch::NoGradGuard no_grad;
  int64_t classified = 0;
  for (int64_t b = 0; b < batches; ++b) {
    auto batch = stream.next();
    const int64_t first = b * e.batch, count = batch.labels.size(0);
    const auto logp = blpa::log_class_probs(model->forward(batch.images.to(dev, /*non_blocking=*/true)), views).cpu();
    for (int64_t i = 0; i < count; ++i) {
      const Input& in = inputs[first + i];
      const std::string label = in.label >= 0 ? fmt::format(", \"label\": {}", in.label) : "";
      if (batch.labels[i].item<int64_t>() < 0) {
        std::cerr << "blpa-predict: " << in.path << ": skipped (" << errors[first + i] << ")\n";
        fmt::print("{{\"file\": {}{}, \"error\": {}}}\n", blpa::json_string(in.path), label, blpa::json_string(errors[first + i]));
        continue;
      }
      fmt::print("{{\"file\": {}{}, \"top\": {}}}\n", blpa::json_string(in.path), label, out.top(logp[i]));
      ++classified;
    }
    std::fflush(stdout);
  }
  return classified;
}

int64_t predict_records(blpa::ResNet& model, const blpa::Checkpoint& ck, const Options& o, const Printer& out) {
  auto kv = ck.config;
  const std::string dataset = kv["dataset"];
  const std::string dir = blpa::checkpoint_data_dir(ck, o.data_dir);
  // The trainer's normalisation: the statistics of the training images it used (the first
  // train_subset of them).
  auto train = blpa::data::load(dataset, dir, true);
  blpa::data::Dataset used = train;
  if (ck.train_subset > 0 && ck.train_subset < train.size()) used.images = train.images.narrow(0, 0, ck.train_subset);
  const auto norm = blpa::data::channel_stats(used);
  const auto records = o.split == "train" ? train : blpa::data::load(dataset, dir, false);
  if (records.images.size(1) != ck.net.in_channels)
    throw std::runtime_error(fmt::format("{}: images of {} channels, the network takes {}", dir,
                                         records.images.size(1), ck.net.in_channels));
  auto [first, end] = parse_range(o.range);
  if (end < 0) end = records.size();
  if (end > records.size() || first >= end)
    throw FlagError(fmt::format("--from-dataset {}: the {} split of {} has {} records", o.range, o.split, dataset,
                                records.size()));
  const torch::Device dev(o.device);
  torch::NoGradGuard no_grad;
  for (int64_t s = first; s < end;) {
    const int64_t n = std::min(o.eval.batch, end - s);  // s + batch may overflow
    std::vector<int64_t> idx;
    for (int64_t i = s; i < s + n; ++i) idx.push_back(i);
    s += n;
    auto b = blpa::data::make_batch(records, idx, norm, nullptr, 0);
    const auto logp = blpa::log_class_probs(model->forward(b.images.to(dev)), 1).cpu();
    for (size_t i = 0; i < idx.size(); ++i)
      fmt::print("{{\"index\": {}, \"label\": {}, \"top\": {}}}\n", idx[i], b.labels[i].item<int64_t>(),
                 out.top(logp[static_cast<int64_t>(i)]));
    std::fflush(stdout);
  }
  return end - first;
}

}  // namespace

static int run(int argc, char** argv) {
  blpa::quiet_library_log();
  cxxopts::Options opts("blpa-predict", kHelp);
  opts.positional_help("[IMAGE|FOLDER]...");
  // clang-format off
  opts.add_options()
    ("checkpoint", "Checkpoint written by blpa-train --checkpoint", cxxopts::value<std::string>())
    ("list", "ImageNet-style: a file of image paths, one per line ('path,label' lines too: the label is printed); relative paths are relative to its folder", cxxopts::value<std::string>())
    ("from-dataset", "CIFAR/MNIST-style: records N to M-1 of the checkpoint's data set (N..M; N.. to the end)", cxxopts::value<std::string>())
    ("split", "Which split --from-dataset reads: test or train", cxxopts::value<std::string>()->default_value("test"))
    ("data-dir", "Where that data set is (default: the one the checkpoint was trained on)", cxxopts::value<std::string>())
    ("top-k", "Classes printed per image, most probable first", cxxopts::value<std::string>()->default_value("5"))
    ("class-names", "A file of class names, one per line in class order (default: the data set's)", cxxopts::value<std::string>())
    ("ten-crop", "ImageNet-style: average the probabilities of the 10 crops (4 corners + centre, and their mirrors) instead of the centre crop")
    ("resize", "ImageNet-style: shorter side before cropping", cxxopts::value<std::string>()->default_value("256"))
    ("crop", "ImageNet-style: crop size", cxxopts::value<std::string>()->default_value("224"))
    ("batch", "Images per batch (10-crop: times 10 crops)", cxxopts::value<std::string>()->default_value("50"))
    ("workers", "JPEG decode threads, 0 to 256 (0: one per core, at most 16, as blpa-train's for ImageNet)", cxxopts::value<std::string>()->default_value("0"))
    ("threads", "LibTorch CPU threads, 0 to 1024 (0: its default, one per core)", cxxopts::value<std::string>()->default_value("0"))
    ("device", "cpu, cuda or cuda:N", cxxopts::value<std::string>()->default_value("cpu"))
    ("precision", "fp32, tf32 (CUDA only), bf16 or auto: the one the network was trained in (tf32 is fp32 on the CPU; a checkpoint from before --precision: tf32 on CUDA, fp32 on the CPU)", cxxopts::value<std::string>()->default_value("auto"))
    ("memory-format", "nchw, nhwc or auto (the checkpoint's layout, as blpa-train's --resume takes it: NCHW for one from before the flag)", cxxopts::value<std::string>()->default_value("auto"))
    ("h,help", "This help");
  // clang-format on
  // The images and folders are the arguments that are not flags, taken whole: as a positional
  // option of vector type, cxxopts would split "photo, beach.jpg" at its comma.
  Options o;
  try {
    auto a = blpa::parse_flags(opts, argc, argv);
    if (blpa::switched_on(a, "help")) {
      std::cout << opts.help() << std::endl;
      return 0;
    }
    if (!a.count("checkpoint")) throw FlagError("--checkpoint is required");
    o.checkpoint = a["checkpoint"].as<std::string>();
    o.paths = a.unmatched();
    if (a.count("list")) o.list = a["list"].as<std::string>();
    if (a.count("from-dataset")) o.range = a["from-dataset"].as<std::string>();
    if (a.count("data-dir")) o.data_dir = a["data-dir"].as<std::string>();
    if (a.count("class-names")) o.names_file = a["class-names"].as<std::string>();
    o.split = a["split"].as<std::string>();
    o.top_k = blpa::number<int64_t>(a, "top-k");
    o.eval.ten_crop = blpa::switched_on(a, "ten-crop");
    o.eval.resize_short = blpa::number<int>(a, "resize");
    o.eval.crop = blpa::number<int>(a, "crop");
    o.eval.batch = blpa::number<int64_t>(a, "batch");
    o.eval.workers = blpa::number<int>(a, "workers");
    blpa::set_threads(blpa::number<int>(a, "threads"));
    o.device = a["device"].as<std::string>();
    o.eval.precision = a["precision"].as<std::string>();
    o.eval.memory_format = a["memory-format"].as<std::string>();
    if (o.top_k <= 0) throw FlagError("--top-k must be positive");
    if (o.split != "test" && o.split != "train")
      throw FlagError("--split must be test or train, got '" + o.split + "'");
    if (o.eval.batch <= 0) throw FlagError("--batch must be positive");
    if (o.eval.workers < 0 || o.eval.workers > blpa::kMaxWorkers)
      throw FlagError("--workers must be 0 (automatic) to " + std::to_string(blpa::kMaxWorkers));
    if (o.eval.workers == 0) o.eval.workers = blpa::default_workers("imagenet", 1);
    if (o.eval.resize_short <= 0) throw FlagError("--resize must be positive");
    if (o.eval.crop <= 0 || o.eval.resize_short < o.eval.crop)
      throw FlagError("--crop must be positive and at most --resize");
    if (a.count("split") && o.range.empty())  // it was ignored
      throw FlagError("--split chooses the split that --from-dataset reads; image files and --list have none");
    if (!o.range.empty()) parse_range(o.range);
    if (!o.range.empty() && (!o.paths.empty() || !o.list.empty()))
      throw FlagError("--from-dataset classifies records of the data set; it takes no image files or --list");
    for (const char* flag : {"resize", "crop", "ten-crop"})  // they were ignored, as blpa-eval refuses them
      if (!o.range.empty() && a.count(flag))
        throw FlagError(std::string("--") + flag + " is for ImageNet-style images; --from-dataset records are "
                        "classified whole");
    if (o.range.empty() && o.paths.empty() && o.list.empty())
      throw FlagError("nothing to classify: give image files or folders, --list FILE, or --from-dataset N..M");
    torch::Device device(torch::kCPU);
    try {
      device = blpa::parse_device(o.device);
    } catch (const std::invalid_argument& e) {
      throw FlagError(e.what());
    }
    blpa::numerics_for(o.eval.precision, o.eval.memory_format, device);  // the names
    blpa::require_file("--checkpoint", o.checkpoint);  // last: the other flags' errors come first
  } catch (const std::exception& ex) {
    std::cerr << "blpa-predict: " << blpa::error_message(ex) << "\nRun blpa-predict --help for the options.\n";
    return 2;
  }
  if (blpa::parse_device(o.device).is_cuda() && !torch::cuda::is_available()) {  // cpu:0 is the CPU
    std::cerr << "blpa-predict: --device " << o.device << ": this machine has no CUDA device\n";
    return 2;
  }
  try {
    const blpa::Checkpoint ck = blpa::read_checkpoint(o.checkpoint);
    auto kv = ck.config;
    const bool images = kv["dataset"] == "imagenet";
    if (images && !o.range.empty())
      throw FlagError("--from-dataset is for checkpoints of CIFAR, MNIST or Fashion-MNIST; " + o.checkpoint +
                      " was trained on ImageNet-style images: give image files, folders or --list");
    if (!images && o.range.empty())
      throw FlagError(o.checkpoint + " was trained on " + kv["dataset"] +
                      ": classify records of that data set with --from-dataset N..M (image files are for "
                      "ImageNet-style checkpoints)");
    if (!images && o.eval.ten_crop) throw FlagError("--ten-crop is for ImageNet-style checkpoints");
    Printer out{class_names(ck, o.names_file), o.top_k};
    blpa::ResNet model = blpa::load_model(ck);
    const torch::Device dev(o.device);
    model->to(dev);
    const blpa::Numerics numerics = blpa::eval_numerics(o.eval, ck, dev);
    model->set_numerics(numerics);
    blpa::apply_precision(numerics.precision, dev);
    if (!images) return predict_records(model, ck, o, out) > 0 ? 0 : 1;

    std::vector<Input> inputs;
    for (const auto& p : o.paths) {
      if (!is_dir(p)) {
        inputs.push_back({p});  // a file named explicitly is tried whatever its name
        continue;
      }
      const size_t before = inputs.size();
      std::string folder = p;  // "photos/" lists photos/a.JPEG, not photos//a.JPEG
      while (folder.size() > 1 && folder.back() == '/') folder.pop_back();
      add_folder(folder, inputs);
      if (inputs.size() == before) std::cerr << "blpa-predict: warning: " << p << ": no .jpg/.jpeg files\n";
    }
    if (!o.list.empty()) {
      const size_t before = inputs.size();
      add_list(o.list, ck.net.num_classes, inputs);
      if (inputs.size() == before) std::cerr << "blpa-predict: warning: --list " << o.list << ": no entries\n";
    }
    if (inputs.empty()) throw std::runtime_error("no images to classify");
    const int64_t classified = predict_images(model, inputs, o, out);
    if (classified == 0) {
      std::cerr << "blpa-predict: none of the " << inputs.size() << " images could be classified\n";
      return 1;
    }
    return 0;
  } catch (const FlagError& ex) {
    std::cerr << "blpa-predict: " << ex.what() << "\n";
    return 2;
  } catch (const Overflow& ex) {
    std::cerr << "blpa-predict: " << o.checkpoint << ": " << ex.what() << "\n";
    return 3;
  } catch (const std::exception& ex) {
    std::cerr << "blpa-predict: " << blpa::error_message(ex) << "\n";
    return 1;
  }
}

int main(int argc, char** argv) { return blpa::checked_output("blpa-predict", run(argc, argv)); }
