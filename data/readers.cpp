#include "blpa/dataset.h"

#include <ATen/ATen.h>

#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <vector>

#include "blpa/formats.h"

namespace blpa::data {
namespace {

namespace fs = std::filesystem;

Dataset make(std::string name, RawImages& raw, int64_t classes) {
  Dataset d;
  d.name = std::move(name);
  const int64_t n = raw.size();
  d.images = at::from_blob(raw.pixels.data(), {n, raw.channels, raw.height, raw.width}, at::kByte).clone();
  d.labels = at::from_blob(raw.labels.data(), {n}, at::kLong).clone();
  d.num_classes = classes;
  return d;
}

}  // namespace

Dataset read_cifar10(const std::string& dir, bool train) {
  RawImages raw;
  std::vector<std::string> files;
  if (train)
    for (int i = 1; i <= 5; ++i) files.push_back("data_batch_" + std::to_string(i) + ".bin");
  else
    files.push_back("test_batch.bin");
  for (const auto& f : files) read_cifar_file((fs::path(dir) / f).string(), kCifar10, 10000, raw);
  return make("cifar10", raw, kCifar10.num_classes);
}

Dataset read_cifar100(const std::string& dir, bool train, bool coarse) {
  RawImages raw;
  const CifarFormat& format = coarse ? kCifar100Coarse : kCifar100Fine;
  read_cifar_file((fs::path(dir) / (train ? "train.bin" : "test.bin")).string(), format, train ? 50000 : 10000, raw);
  return make(coarse ? "cifar100-coarse" : "cifar100", raw, format.num_classes);
}

Dataset read_idx(const std::string& images_path, const std::string& labels_path, int64_t num_classes) {
  RawImages raw = read_idx_files(images_path, labels_path, num_classes);
  return make("idx", raw, num_classes);
}

Dataset load(const std::string& name, const std::string& dir, bool train) {
  if (name == "cifar10") return read_cifar10(dir, train);
  if (name == "cifar100") return read_cifar100(dir, train, false);
  if (name == "cifar100-coarse") return read_cifar100(dir, train, true);
  if (name == "fashion-mnist" || name == "mnist") {
    const std::string prefix = train ? "train" : "t10k";
    Dataset d = read_idx(idx_file(dir, prefix + "-images-idx3-ubyte"), idx_file(dir, prefix + "-labels-idx1-ubyte"));
    d.name = name;
    return d;
  }
  throw std::invalid_argument("unknown dataset '" + name +
                              "' (expected cifar10, cifar100, cifar100-coarse, fashion-mnist or mnist)");
}

uint64_t content_hash(const Dataset& d) {
  uint64_t h = 0xCBF29CE484222325ull;
  auto add = [&h](const at::Tensor& t) {
    const at::Tensor c = t.contiguous();
    const auto* p = static_cast<const unsigned char*>(c.data_ptr());
    const size_t n = c.nbytes();
    auto mix = [&h](uint64_t w) {
      h = (h ^ w) * 0x100000001B3ull;
      h ^= h >> 29;  // the product carries a word's high bytes only upwards: fold them back
    };
    size_t i = 0;
    for (uint64_t w; i + 8 <= n; i += 8) {
      std::memcpy(&w, p + i, 8);
      if constexpr (__BYTE_ORDER__ == __ORDER_BIG_ENDIAN__) w = __builtin_bswap64(w);  // the same hash on every host
      mix(w);
    }
    for (; i < n; ++i) mix(p[i]);
    mix(n);
  };
  add(d.images);
  add(d.labels);
  return h;
}

}  // namespace blpa::data
