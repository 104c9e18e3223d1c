// Native dataset readers. Every file is validated (size, record layout, magic numbers,
// label range) before its contents are kept; errors name the file and what is wrong. The
// parsing itself, with its limits, is in formats.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace blpa::data {

struct Dataset {
  std::string name;
  at::Tensor images;  // uint8, N x C x H x W
  at::Tensor labels;  // int64, N
  int64_t num_classes = 0;
  int64_t size() const { return labels.defined() ? labels.size(0) : 0; }
};

// CIFAR-10 binary version: data_batch_1..5.bin (train) or test_batch.bin, 10000 records of
// 1 label byte + 3072 pixel bytes each.
Dataset read_cifar10(const std::string& dir, bool train);
// CIFAR-100 binary version: train.bin / test.bin, records of coarse label, fine label and
// 3072 pixel bytes. Fine labels (100 classes) unless `coarse` (20 classes).
Dataset read_cifar100(const std::string& dir, bool train, bool coarse = false);
// IDX files (MNIST, Fashion-MNIST), gzip-compressed or plain: images (magic 0x00000803)
// and labels (magic 0x00000801) with the same count.
Dataset read_idx(const std::string& images_path, const std::string& labels_path, int64_t num_classes = 10);

// By name: cifar10, cifar100, cifar100-coarse, fashion-mnist, mnist. `dir` holds the files
// under their official names (for MNIST-style data: train-images-idx3-ubyte[.gz], ...).
Dataset load(const std::string& name, const std::string& dir, bool train);

// A 64-bit hash of the images' bytes and the labels, the same on every build: what a
// checkpoint records of the data it was trained on, so that a resume can tell other data
// (another copy, other labels) from the same. A change detector, not a checksum of integrity.
uint64_t content_hash(const Dataset& d);

// The directory Debian's dataset-fashion-mnist package installs to.
constexpr const char* kDebianFashionMnist = "/usr/share/datasets/fashion-mnist";

}  // namespace blpa::data
