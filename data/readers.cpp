#include "blpa/dataset.h"

#include <ATen/ATen.h>
#include <zlib.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <vector>

namespace blpa::data {
namespace {

namespace fs = std::filesystem;

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw std::runtime_error(path + ": " + what);
}

std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail(path, fs::exists(path) ? "cannot be read" : "not found");
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), {});
}

// gzread reads plain files unchanged, so one path serves both forms.
std::vector<uint8_t> read_maybe_gzip(const std::string& path) {
  if (!fs::exists(path)) fail(path, "not found");
  gzFile f = gzopen(path.c_str(), "rb");
  if (!f) fail(path, "cannot be opened");
  std::vector<uint8_t> out;
  std::vector<uint8_t> buf(1 << 20);
  for (;;) {
    const int n = gzread(f, buf.data(), static_cast<unsigned>(buf.size()));
    if (n < 0) {
      int err = 0;
      std::string msg = gzerror(f, &err);
      gzclose(f);
      fail(path, "corrupt gzip data (" + msg + ")");
    }
    if (n == 0) break;
    out.insert(out.end(), buf.begin(), buf.begin() + n);
  }
  gzclose(f);
  return out;
}

uint32_t big_endian(const uint8_t* p) {
  return uint32_t{p[0]} << 24 | uint32_t{p[1]} << 16 | uint32_t{p[2]} << 8 | p[3];
}

constexpr int64_t kCifarPixels = 3 * 32 * 32;

// Appends the records of one CIFAR file: `label_bytes` label bytes (the last one is used
// unless `label_index` says otherwise), then 3072 pixels.
void read_cifar_file(const std::string& path, int label_bytes, int label_index, int64_t num_classes,
                     std::vector<uint8_t>& pixels, std::vector<int64_t>& labels) {
  const auto bytes = read_file(path);
  const int64_t record = label_bytes + kCifarPixels;
  if (bytes.empty() || bytes.size() % record != 0)
    fail(path, "size " + std::to_string(bytes.size()) + " is not a whole number of " + std::to_string(record) +
                   "-byte records (truncated, or not the CIFAR binary version?)");
  const int64_t n = static_cast<int64_t>(bytes.size()) / record;
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t* r = bytes.data() + i * record;
    const int64_t label = r[label_index];
    if (label >= num_classes)
      fail(path, "record " + std::to_string(i) + " has label " + std::to_string(label) + ", outside [0, " +
                     std::to_string(num_classes) + ")");
    labels.push_back(label);
    pixels.insert(pixels.end(), r + label_bytes, r + record);
  }
}

Dataset make(std::string name, std::vector<uint8_t>& pixels, std::vector<int64_t>& labels, int64_t c, int64_t h,
             int64_t w, int64_t classes) {
  Dataset d;
  d.name = std::move(name);
  const int64_t n = static_cast<int64_t>(labels.size());
  d.images = at::from_blob(pixels.data(), {n, c, h, w}, at::kByte).clone();
  d.labels = at::from_blob(labels.data(), {n}, at::kLong).clone();
  d.num_classes = classes;
  return d;
}

}  // namespace

Dataset read_cifar10(const std::string& dir, bool train) {
  std::vector<uint8_t> pixels;
  std::vector<int64_t> labels;
  std::vector<std::string> files;
  if (train)
    for (int i = 1; i <= 5; ++i) files.push_back("data_batch_" + std::to_string(i) + ".bin");
  else
    files.push_back("test_batch.bin");
  for (const auto& f : files) {
    const std::string path = (fs::path(dir) / f).string();
    const size_t before = labels.size();
    read_cifar_file(path, 1, 0, 10, pixels, labels);
    if (labels.size() - before != 10000)
      fail(path, "has " + std::to_string(labels.size() - before) + " records, expected 10000");
  }
  return make("cifar10", pixels, labels, 3, 32, 32, 10);
}

Dataset read_cifar100(const std::string& dir, bool train, bool coarse) {
  std::vector<uint8_t> pixels;
  std::vector<int64_t> labels;
  const std::string path = (fs::path(dir) / (train ? "train.bin" : "test.bin")).string();
  const int64_t classes = coarse ? 20 : 100;
  read_cifar_file(path, 2, coarse ? 0 : 1, classes, pixels, labels);
  const size_t expected = train ? 50000 : 10000;
  if (labels.size() != expected)
    fail(path, "has " + std::to_string(labels.size()) + " records, expected " + std::to_string(expected));
  return make(coarse ? "cifar100-coarse" : "cifar100", pixels, labels, 3, 32, 32, classes);
}

Dataset read_idx(const std::string& images_path, const std::string& labels_path, int64_t num_classes) {
  auto img = read_maybe_gzip(images_path);
  auto lab = read_maybe_gzip(labels_path);
  if (img.size() < 16) fail(images_path, "too short for an IDX image header");
  if (lab.size() < 8) fail(labels_path, "too short for an IDX label header");
  if (big_endian(img.data()) != 0x803)
    fail(images_path, "wrong magic number (expected 0x00000803, unsigned bytes, 3 dims)");
  if (big_endian(lab.data()) != 0x801)
    fail(labels_path, "wrong magic number (expected 0x00000801, unsigned bytes, 1 dim)");
  const int64_t n = big_endian(img.data() + 4), h = big_endian(img.data() + 8), w = big_endian(img.data() + 12);
  const int64_t nl = big_endian(lab.data() + 4);
  if (static_cast<int64_t>(img.size()) != 16 + n * h * w)
    fail(images_path, "size " + std::to_string(img.size()) + " does not match its header (" + std::to_string(n) +
                          " images of " + std::to_string(h) + "x" + std::to_string(w) + ")");
  if (static_cast<int64_t>(lab.size()) != 8 + nl)
    fail(labels_path, "size " + std::to_string(lab.size()) + " does not match its header (" + std::to_string(nl) +
                          " labels)");
  if (nl != n)
    fail(labels_path, "has " + std::to_string(nl) + " labels but " + images_path + " has " + std::to_string(n) +
                          " images");
  std::vector<uint8_t> pixels(img.begin() + 16, img.end());
  std::vector<int64_t> labels(n);
  for (int64_t i = 0; i < n; ++i) {
    labels[i] = lab[8 + i];
    if (labels[i] >= num_classes)
      fail(labels_path, "label " + std::to_string(i) + " is " + std::to_string(labels[i]) + ", outside [0, " +
                            std::to_string(num_classes) + ")");
  }
  return make("idx", pixels, labels, 1, h, w, num_classes);
}

Dataset load(const std::string& name, const std::string& dir, bool train) {
  if (name == "cifar10") return read_cifar10(dir, train);
  if (name == "cifar100") return read_cifar100(dir, train, false);
  if (name == "cifar100-coarse") return read_cifar100(dir, train, true);
  if (name == "fashion-mnist" || name == "mnist") {
    const std::string prefix = train ? "train" : "t10k";
    auto pick = [&](const std::string& base) {
      const fs::path plain = fs::path(dir) / base;
      return fs::exists(plain) ? plain.string() : plain.string() + ".gz";
    };
    Dataset d = read_idx(pick(prefix + "-images-idx3-ubyte"), pick(prefix + "-labels-idx1-ubyte"));
    d.name = name;
    return d;
  }
  throw std::invalid_argument("unknown dataset '" + name +
                              "' (expected cifar10, cifar100, cifar100-coarse, fashion-mnist or mnist)");
}

}  // namespace blpa::data
