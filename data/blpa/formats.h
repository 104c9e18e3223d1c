// CIFAR and IDX files as bytes, before they become tensors (dataset.h does that). No torch
// headers: the fuzz targets (tests/fuzz/) call the byte-level parsers directly.
//
// Every size and label read from a file is checked before anything is allocated for it:
// a file's own size against its format before it is read, an IDX header's counts against
// the limits below before its payload is decompressed (which then grows with the data
// actually found, never with what the header claims). Errors are std::runtime_error with
// one line that starts with the file's name.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace blpa::data {

// Images and labels as a file holds them.
struct RawImages {
  int64_t channels = 0, height = 0, width = 0;
  std::vector<uint8_t> pixels;  // size() x channels x height x width
  std::vector<int64_t> labels;
  int64_t size() const { return static_cast<int64_t>(labels.size()); }
};

// A CIFAR binary record: `label_bytes` label bytes, the one at `label_index` used, then
// 3 x 32 x 32 pixels.
struct CifarFormat {
  int label_bytes = 1, label_index = 0;
  int64_t num_classes = 10;
};
inline constexpr CifarFormat kCifar10{1, 0, 10}, kCifar100Fine{2, 1, 100}, kCifar100Coarse{2, 0, 20};
inline constexpr int64_t kCifarPixels = 3 * 32 * 32;

// Appends the records in data[0, size) to `out`; `name` starts every error message.
void parse_cifar(const uint8_t* data, size_t size, const CifarFormat& format, const std::string& name,
                 RawImages& out);
// The same for a file, which must be a regular file of exactly `records` records.
void read_cifar_file(const std::string& path, const CifarFormat& format, int64_t records, RawImages& out);

// IDX limits: each image side, and the bytes of pixels or labels a file may hold (MNIST
// holds 47 MB, EMNIST's largest 550 MB).
inline constexpr uint32_t kMaxIdxSide = 1 << 16;
inline constexpr uint64_t kMaxIdxBytes = uint64_t{1} << 32;

// IDX images (magic 0x00000803: N x H x W unsigned bytes) and labels (0x00000801: N bytes,
// each below num_classes), plain or gzip-compressed (told by gzip's magic number; several
// gzip members are read one after the other, as gzip writes and zlib reads them).
RawImages parse_idx_images(const uint8_t* data, size_t size, const std::string& name);
std::vector<int64_t> parse_idx_labels(const uint8_t* data, size_t size, const std::string& name,
                                      int64_t num_classes);
// Both files of a data set: their counts must agree.
RawImages read_idx_files(const std::string& images_path, const std::string& labels_path, int64_t num_classes);

// An IDX file of `dir` as it is there: DIR/BASE where it exists, else DIR/BASE.gz.
std::string idx_file(const std::string& dir, const std::string& base);

// The mean pixel (0 to 255) of the first `images` x 784 pixels (as many 28 x 28 images) of an
// IDX images file, plain or gzip-compressed, reading only those; NaN where it is not one.
// MNIST's and Fashion-MNIST's files have the same names and formats: their means (about 33 and
// 73) tell them apart.
double idx_mean_pixel(const std::string& images_path, int64_t images);

}  // namespace blpa::data
