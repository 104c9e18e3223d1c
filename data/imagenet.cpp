#include "blpa/imagenet.h"

#include <ATen/ATen.h>
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <mutex>
#include <numbers>
#include <sstream>
#include <stdexcept>
#include <thread>

namespace blpa::data {
namespace {

// Directory walking uses POSIX calls, not std::filesystem: LibTorch 2.11 exports a copy of
// parts of std::filesystem that can shadow the standard library's (see tests/test_support.h).
struct Entry {
  std::string name;
  bool dir;
};

std::vector<Entry> list_dir(const std::string& dir) {
  DIR* d = ::opendir(dir.c_str());
  if (!d) throw std::runtime_error(dir + ": cannot open directory (" + std::strerror(errno) + ")");
  std::vector<Entry> out;
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name == "." || name == "..") continue;
    bool is_dir = e->d_type == DT_DIR;
    if (e->d_type == DT_UNKNOWN || e->d_type == DT_LNK) {  // some file systems, and symlinks
      struct stat st{};
      is_dir = ::stat((dir + "/" + name).c_str(), &st) == 0 && S_ISDIR(st.st_mode);
    }
    out.push_back({name, is_dir});
  }
  ::closedir(d);
  std::sort(out.begin(), out.end(), [](const Entry& a, const Entry& b) { return a.name < b.name; });
  return out;
}

bool is_image_name(const std::string& n) {
  const auto dot = n.rfind('.');
  if (dot == std::string::npos) return false;
  std::string ext = n.substr(dot + 1);
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  return ext == "jpeg" || ext == "jpg";
}

int64_t mtime_ns(const std::string& path) {
  struct stat st{};
  if (::stat(path.c_str(), &st) != 0) return -1;
  return int64_t{st.st_mtim.tv_sec} * 1000000000 + st.st_mtim.tv_nsec;
}

uint64_t fnv1a(uint64_t h, const std::string& s) {
  for (unsigned char c : s) h = (h ^ c) * 0x100000001B3ull;
  return (h ^ 0xFF) * 0x100000001B3ull;  // a separator, so ("ab","c") != ("a","bc")
}

std::string absolute(const std::string& p) {
  char buf[PATH_MAX];
  return ::realpath(p.c_str(), buf) ? std::string(buf) : p;
}

// The cache is keyed by the folder and, for each class folder, its name and modification
// time, which changes whenever an entry is added, removed or renamed in it.
std::string cache_path(const std::string& cache_dir, const std::string& dir, const std::vector<std::string>& classes) {
  uint64_t h = fnv1a(0xCBF29CE484222325ull, absolute(dir));
  for (const auto& c : classes) h = fnv1a(fnv1a(h, c), std::to_string(mtime_ns(dir + "/" + c)));
  char name[64];
  std::snprintf(name, sizeof name, "/image-index-%016llx.txt", static_cast<unsigned long long>(h));
  return cache_dir + name;
}

constexpr const char* kIndexMagic = "blpa-image-index 1";

bool read_cache(const std::string& path, const std::vector<std::string>& classes, ImageList& out) {
  std::ifstream in(path);
  std::string line;
  if (!in || !std::getline(in, line) || line != kIndexMagic) return false;
  int64_t n_classes = 0, n_files = 0;
  if (!(in >> n_classes >> n_files) || n_classes != static_cast<int64_t>(classes.size())) return false;
  std::getline(in, line);
  out.paths.reserve(n_files);
  out.labels.reserve(n_files);
  while (std::getline(in, line)) {
    const auto tab = line.find('\t');
    if (tab == std::string::npos) return false;
    const int64_t label = std::strtoll(line.c_str(), nullptr, 10);
    if (label < 0 || label >= n_classes) return false;
    out.labels.push_back(label);
    out.paths.push_back(line.substr(tab + 1));
  }
  return out.size() == n_files;
}

void write_cache(const std::string& path, const ImageList& list) {
  const std::string tmp = path + ".tmp" + std::to_string(::getpid());
  {
    std::ofstream out(tmp);
    if (!out) return;  // a cache that cannot be written is not an error
    out << kIndexMagic << '\n' << list.num_classes << ' ' << list.size() << '\n';
    for (int64_t i = 0; i < list.size(); ++i) out << list.labels[i] << '\t' << list.paths[i] << '\n';
    if (!out) return;
  }
  std::rename(tmp.c_str(), path.c_str());
}

}  // namespace

ImageList scan_image_folder(const std::string& dir, const std::string& cache_dir, int threads, ScanReport* report) {
  ScanReport local;
  ScanReport& r = report ? *report : local;
  r = ScanReport{};
  ImageList out;
  out.root = dir;
  for (const auto& e : list_dir(dir))
    if (e.dir) out.classes.push_back(e.name);
  if (out.classes.empty()) throw std::runtime_error(dir + ": no class folders (expected " + dir + "/<class>/*.JPEG)");
  out.num_classes = static_cast<int64_t>(out.classes.size());

  const std::string cache = cache_dir.empty() ? "" : cache_path(cache_dir, dir, out.classes);
  if (!cache.empty() && read_cache(cache, out.classes, out)) {
    r.files = out.size();
    r.from_cache = true;
    return out;
  }
  out.paths.clear();
  out.labels.clear();

  // One task per class folder; results are joined in class order, so the list does not
  // depend on the number of threads.
  struct ClassFiles {
    std::vector<std::string> files, unreadable;
    int64_t skipped = 0;
    std::string error;
  };
  std::vector<ClassFiles> per_class(out.classes.size());
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t c; (c = next++) < per_class.size();) {
      ClassFiles& f = per_class[c];
      const std::string cdir = dir + "/" + out.classes[c];
      try {
        for (const auto& e : list_dir(cdir)) {
          if (e.dir || !is_image_name(e.name)) {
            ++f.skipped;
            continue;
          }
          const std::string rel = out.classes[c] + "/" + e.name;
          (::access((dir + "/" + rel).c_str(), R_OK) == 0 ? f.files : f.unreadable).push_back(rel);
        }
      } catch (const std::exception& ex) {
        f.error = ex.what();
      }
    }
  };
  std::vector<std::thread> pool;
  for (int t = 0; t < std::max(1, threads); ++t) pool.emplace_back(work);
  for (auto& t : pool) t.join();

  for (size_t c = 0; c < per_class.size(); ++c) {
    ClassFiles& f = per_class[c];
    if (!f.error.empty()) throw std::runtime_error(f.error);
    if (f.files.empty()) r.empty_classes.push_back(out.classes[c]);
    for (auto& p : f.files) {
      out.paths.push_back(std::move(p));
      out.labels.push_back(static_cast<int64_t>(c));
    }
    r.unreadable.insert(r.unreadable.end(), f.unreadable.begin(), f.unreadable.end());
    r.skipped += f.skipped;
  }
  r.files = out.size();
  if (out.paths.empty()) throw std::runtime_error(dir + ": no .JPEG/.jpg images in its " + std::to_string(out.num_classes) + " class folders");
  if (!cache.empty()) {
    for (size_t slash = 1; slash != std::string::npos; slash = cache_dir.find('/', slash + 1))
      ::mkdir(cache_dir.substr(0, slash).c_str(), 0755);  // mkdir -p; failures show as a missing cache
    ::mkdir(cache_dir.c_str(), 0755);
    write_cache(cache, out);
  }
  return out;
}

ImageList read_image_list(const std::string& list_file, const std::string& root) {
  std::ifstream in(list_file);
  if (!in) throw std::runtime_error(list_file + ": cannot be opened (" + std::strerror(errno) + ")");
  ImageList out;
  out.root = root;
  if (out.root.empty()) {
    const auto slash = list_file.rfind('/');
    out.root = slash == std::string::npos ? "." : list_file.substr(0, slash);
  }
  std::string line;
  for (int64_t no = 1; std::getline(in, line); ++no) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || line[0] == '#') continue;
    const auto comma = line.rfind(',');  // paths may contain commas, labels do not
    char* end = nullptr;
    const long long label = comma == std::string::npos ? -1 : std::strtoll(line.c_str() + comma + 1, &end, 10);
    if (comma == std::string::npos || comma == 0 || end == line.c_str() + comma + 1 || *end != '\0' || label < 0)
      throw std::runtime_error(list_file + ":" + std::to_string(no) + ": expected 'relative/path,label' with label >= 0, got '" + line + "'");
    out.paths.push_back(line.substr(0, comma));
    out.labels.push_back(label);
    out.num_classes = std::max<int64_t>(out.num_classes, label + 1);
  }
  if (out.paths.empty()) throw std::runtime_error(list_file + ": no entries");
  return out;
}

ImageNetSplits load_imagenet(const std::string& root, const std::string& cache_dir, int threads) {
  ImageNetSplits s;
  for (auto [name, list] : {std::pair{"train", &s.train}, std::pair{"val", &s.val}}) {
    ScanReport r;
    *list = scan_image_folder(root + "/" + name, cache_dir, threads, &r);
    if (!r.empty_classes.empty())
      std::fprintf(stderr, "warning: %s/%s: %zu empty class folders (first: %s)\n", root.c_str(), name,
                   r.empty_classes.size(), r.empty_classes[0].c_str());
    if (!r.unreadable.empty())
      std::fprintf(stderr, "warning: %s/%s: %zu unreadable images left out (first: %s)\n", root.c_str(), name,
                   r.unreadable.size(), r.unreadable[0].c_str());
  }
  if (s.train.classes != s.val.classes) {
    std::string first;
    for (size_t i = 0; i < std::max(s.train.classes.size(), s.val.classes.size()); ++i) {
      const std::string t = i < s.train.classes.size() ? s.train.classes[i] : "(none)";
      const std::string v = i < s.val.classes.size() ? s.val.classes[i] : "(none)";
      if (t != v) {
        first = "class " + std::to_string(i) + " is " + t + " in train but " + v + " in val";
        break;
      }
    }
    throw std::runtime_error(root + ": train has " + std::to_string(s.train.num_classes) + " classes and val " +
                             std::to_string(s.val.num_classes) + "; they must be the same (" + first + ")");
  }
  return s;
}

// ---- geometry ------------------------------------------------------------------------------

namespace {

// The source box that becomes a crop x crop window at (cx, cy) of the image resized by f.
CropBox source_box(int w, int h, double f, double cx, double cy, int crop) {
  CropBox b;
  b.w = std::clamp(static_cast<int>(std::lround(crop / f)), 1, w);
  b.h = std::clamp(static_cast<int>(std::lround(crop / f)), 1, h);
  b.x = std::clamp(static_cast<int>(std::lround(cx / f)), 0, w - b.w);
  b.y = std::clamp(static_cast<int>(std::lround(cy / f)), 0, h - b.h);
  return b;
}

std::array<float, 9> inverse(const std::array<float, 9>& a) {  // 3 x 3, by cofactors
  auto at = [&](int r, int c) { return static_cast<double>(a[r * 3 + c]); };
  std::array<double, 9> cof{};
  for (int r = 0; r < 3; ++r)
    for (int c = 0; c < 3; ++c)
      cof[c * 3 + r] = at((r + 1) % 3, (c + 1) % 3) * at((r + 2) % 3, (c + 2) % 3) -
                       at((r + 1) % 3, (c + 2) % 3) * at((r + 2) % 3, (c + 1) % 3);
  const double det = at(0, 0) * cof[0] + at(0, 1) * cof[3] + at(0, 2) * cof[6];
  std::array<float, 9> out{};
  for (int i = 0; i < 9; ++i) out[i] = static_cast<float>(cof[i] / det);
  return out;
}

double uniform(uint64_t key, uint64_t salt) {  // in [0, 1)
  return static_cast<double>(counter_hash(key, salt) >> 11) * 0x1.0p-53;
}

}  // namespace

int train_short_side(const ImageNetAugment& a, uint64_t key) {
  return a.min_short + static_cast<int>(counter_hash(key, 1) % static_cast<uint64_t>(a.max_short - a.min_short + 1));
}

TrainView train_view(int w, int h, const ImageNetAugment& a, uint64_t key) {
  TrainView v;
  v.short_side = train_short_side(a, key);
  const double f = static_cast<double>(v.short_side) / std::min(w, h);
  const double rw = w * f, rh = h * f;  // the resized image
  const double cx = std::max(0.0, rw - a.crop) * uniform(key, 2), cy = std::max(0.0, rh - a.crop) * uniform(key, 3);
  v.box = source_box(w, h, f, cx, cy, a.crop);
  v.flip = a.flip && (counter_hash(key, 4) & 1);
  return v;
}

CropBox center_crop_box(int w, int h, int resize_short, int crop) {
  const double f = static_cast<double>(resize_short) / std::min(w, h);
  return source_box(w, h, f, (w * f - crop) / 2, (h * f - crop) / 2, crop);
}

std::array<CropBox, 5> five_crop_boxes(int w, int h, int resize_short, int crop) {
  const double f = static_cast<double>(resize_short) / std::min(w, h);
  const double right = w * f - crop, bottom = h * f - crop;
  return {source_box(w, h, f, 0, 0, crop), source_box(w, h, f, right, 0, crop), source_box(w, h, f, 0, bottom, crop),
          source_box(w, h, f, right, bottom, crop), center_crop_box(w, h, resize_short, crop)};
}

at::Tensor resize_crop(const Image& img, const CropBox& box, int out, bool flip) {
  auto whole = at::from_blob(const_cast<uint8_t*>(img.rgb.data()), {img.height, img.width, 3}, at::kByte);
  auto crop = whole.narrow(0, box.y, box.h).narrow(1, box.x, box.w).permute({2, 0, 1}).unsqueeze(0).to(at::kFloat);
  // Antialiased bilinear (a triangle filter widened by the shrink factor), as PIL and
  // torchvision's antialias=True resize; for enlargement it is plain bilinear.
  auto r = (box.w == out && box.h == out)
               ? crop
               : at::_upsample_bilinear2d_aa(crop, {out, out}, /*align_corners=*/false, std::nullopt, std::nullopt);
  r = r.squeeze(0);
  return flip ? r.flip({2}) : r.contiguous();
}

ColourMap jitter_map(const Jitter& j, float mean_grey, uint64_t key) {
  auto factor = [&](float s, uint64_t salt) { return static_cast<float>(1.0 - s + 2.0 * s * uniform(key, salt)); };
  const float b = factor(j.brightness, 11), c = factor(j.contrast, 12), s = factor(j.saturation, 13);
  const float hue = static_cast<float>((2.0 * uniform(key, 14) - 1.0) * j.hue);
  using M3 = std::array<float, 9>;
  auto mul = [](const M3& x, const M3& y) {
    M3 z{};
    for (int r = 0; r < 3; ++r)
      for (int k = 0; k < 3; ++k)
        for (int q = 0; q < 3; ++q) z[r * 3 + q] += x[r * 3 + k] * y[k * 3 + q];
    return z;
  };
  const float L[3] = {0.299f, 0.587f, 0.114f};  // luma, as torchvision's rgb_to_grayscale
  // saturation: grey + s (rgb - grey), grey = L . rgb
  M3 S{};
  for (int r = 0; r < 3; ++r)
    for (int q = 0; q < 3; ++q) S[r * 3 + q] = (r == q ? s : 0.0f) + (1 - s) * L[q];
  // hue: a rotation of the chroma plane of YIQ by 2 pi hue (luma unchanged)
  const M3 T{0.299f, 0.587f, 0.114f, 0.596f, -0.274f, -0.322f, 0.211f, -0.523f, 0.312f};
  const M3 Ti = inverse(T);  // exact, so hue 0 is the identity and greys stay grey
  const float th = 2.0f * std::numbers::pi_v<float> * hue, cs = std::cos(th), sn = std::sin(th);
  const M3 R{1, 0, 0, 0, cs, -sn, 0, sn, cs};
  const M3 HS = mul(mul(Ti, mul(R, T)), S);
  // brightness then contrast: c (b rgb - g) + g with g the mean grey after brightness
  ColourMap out;
  for (int i = 0; i < 9; ++i) out.m[i] = HS[i] * b * c;
  const float g = (1 - c) * b * mean_grey;
  for (int r = 0; r < 3; ++r) out.o[r] = (HS[r * 3] + HS[r * 3 + 1] + HS[r * 3 + 2]) * g;
  return out;
}

Normalisation imagenet_normalisation() { return {{0.485f, 0.456f, 0.406f}, {0.229f, 0.224f, 0.225f}}; }

// ---- batches -------------------------------------------------------------------------------

namespace {

// 3 x S x S floats in [0, 255] -> normalised, after an optional colour map (values in [0, 1]).
void finish(const at::Tensor& crop, const ColourMap* map, const Normalisation& norm, const at::Tensor& dst) {
  auto x = crop.reshape({3, -1}).div(255.0f);
  if (map) {
    auto m = at::from_blob(const_cast<float*>(map->m.data()), {3, 3}, at::kFloat);
    auto o = at::from_blob(const_cast<float*>(map->o.data()), {3, 1}, at::kFloat);
    x = at::addmm(o, m, x).clamp_(0.0f, 1.0f);
  }
  auto mean = at::from_blob(const_cast<float*>(norm.mean.data()), {3, 1}, at::kFloat);
  auto std = at::from_blob(const_cast<float*>(norm.std.data()), {3, 1}, at::kFloat);
  dst.copy_(x.sub_(mean).div_(std).view(dst.sizes()));
}

float mean_grey(const at::Tensor& crop) {  // of a 3 x S x S crop in [0, 255], in [0, 1]
  auto means = crop.reshape({3, -1}).mean(1);
  const float* p = means.data_ptr<float>();
  return (0.299f * p[0] + 0.587f * p[1] + 0.114f * p[2]) / 255.0f;
}

void note(DecodeErrors* errors, const std::string& path, const Decoded& d) {
  if (!errors) return;
  if (errors->count++ < 10)
    std::fprintf(stderr, "warning: %s: skipped (%s%s%s)\n", path.c_str(), to_string(d.status),
                 d.message.empty() ? "" : ": ", d.message.c_str());
}

}  // namespace

Batch imagenet_train_batch(const ImageList& list, const std::vector<int64_t>& indices, const ImageNetAugment& a,
                           const Normalisation& norm, uint64_t stream, DecodeErrors* errors, bool pinned) {
  const int64_t B = static_cast<int64_t>(indices.size());
  Batch out{at::empty({B, 3, a.crop, a.crop}, at::TensorOptions().pinned_memory(pinned)), at::empty({B}, at::kLong)};
  int64_t* labels = out.labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) {
    const uint64_t key = counter_hash(stream, static_cast<uint64_t>(indices[i]));
    const int short_side = train_short_side(a, key);  // decoded at the smallest DCT scale that keeps it
    // An image that does not decode is replaced by the next one in the list that does.
    for (int64_t tries = 0, idx = indices[i];; ++tries, idx = (idx + 1) % list.size()) {
      if (tries == 100) throw std::runtime_error(list.root + ": 100 images in a row failed to decode");
      const std::string path = list.root + "/" + list.paths[idx];
      Decoded d = decode_jpeg_file(path, short_side);
      if (d.status != DecodeStatus::ok) {
        note(errors, path, d);
        continue;
      }
      const TrainView v = train_view(d.image.width, d.image.height, a, key);
      auto crop = resize_crop(d.image, v.box, a.crop, v.flip);
      ColourMap map;
      if (a.jitter_on) map = jitter_map(a.jitter, mean_grey(crop), key);
      finish(crop, a.jitter_on ? &map : nullptr, norm, out.images[i]);
      labels[i] = list.labels[idx];
      break;
    }
  }
  return out;
}

Batch imagenet_eval_batch(const ImageList& list, int64_t first, int64_t count, int resize_short, int crop,
                          bool ten_crop, const Normalisation& norm, DecodeErrors* errors, bool pinned) {
  const int64_t views = ten_crop ? 10 : 1;
  Batch out{at::zeros({count * views, 3, crop, crop}, at::TensorOptions().pinned_memory(pinned)),
            at::empty({count}, at::kLong)};
  int64_t* labels = out.labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i) {
    const std::string path = list.root + "/" + list.paths[first + i];
    Decoded d = decode_jpeg_file(path, resize_short);
    if (d.status != DecodeStatus::ok) {  // left out of the accuracy: label -1
      note(errors, path, d);
      labels[i] = -1;
      continue;
    }
    labels[i] = list.labels[first + i];
    eval_views(d.image, resize_short, crop, ten_crop, norm, out.images.narrow(0, i * views, views));
  }
  return out;
}

void eval_views(const Image& img, int resize_short, int crop, bool ten_crop, const Normalisation& norm,
                const at::Tensor& dst) {
  const int w = img.width, h = img.height;
  if (!ten_crop) {
    finish(resize_crop(img, center_crop_box(w, h, resize_short, crop), crop, false), nullptr, norm, dst[0]);
    return;
  }
  const auto boxes = five_crop_boxes(w, h, resize_short, crop);
  for (int k = 0; k < 5; ++k) {
    auto c = resize_crop(img, boxes[k], crop, false);
    finish(c, nullptr, norm, dst[k]);
    finish(c.flip({2}), nullptr, norm, dst[5 + k]);
  }
}

}  // namespace blpa::data
