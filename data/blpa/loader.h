// Batches for training and evaluation: per-channel normalisation, the paper's CIFAR
// augmentation (pad-4 random crop, horizontal flip), and worker threads with bounded
// prefetch. The stream is a pure function of (seed, batch number): the epoch's order and
// each sample's crop and flip come from counter-based hashes, never from shared RNG state,
// so a run that resumes at batch b sees exactly the batches it would have seen.
#pragma once

#include <ATen/core/Tensor.h>

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "blpa/dataset.h"

namespace blpa::data {

struct Normalisation {
  std::vector<float> mean, std;  // per channel, of pixel / 255
};

// splitmix64 of (a, b, c): the counter-based hash behind every random choice of the data
// pipeline (the same on every platform and standard library).
uint64_t counter_hash(uint64_t a, uint64_t b, uint64_t c = 0);

// Per-channel mean and standard deviation of a data set's pixels (scaled to [0, 1]).
Normalisation channel_stats(const Dataset& d);

struct Augment {
  int pad = 4;       // zero padding (in normalised units, i.e. the mean colour) before the crop
  bool flip = true;  // random horizontal flip
};

struct Batch {
  at::Tensor images;  // float32, B x C x H x W, normalised
  at::Tensor labels;  // int64, B
  // ImageNet training: the list indices of the images that could not be decoded (each
  // replaced by another), so that whoever trains on the batch counts them, not its maker.
  std::vector<int64_t> failed = {};
};

// One batch of the given samples; `augment` null for evaluation. `stream` seeds each
// sample's crop/flip together with its index. `pinned`: images and labels are made in pinned
// host memory, so that copies to a GPU are asynchronous (needs CUDA).
Batch make_batch(const Dataset& d, const std::vector<int64_t>& indices, const Normalisation& norm,
                 const Augment* augment, uint64_t stream, bool pinned = false);

// The samples of training batch `b`: epoch b / per_epoch in an order shuffled by (seed, epoch).
std::vector<int64_t> batch_indices(int64_t dataset_size, int64_t batch_size, uint64_t seed, int64_t b);

// Batches 0, 1, 2, ... of `make` (a pure function of the batch number), computed by
// `workers` threads at most max(prefetch, workers) batches ahead of next(). An exception
// thrown by `make` is rethrown by the next() that would have returned that batch.
// on_loader_thread() is true on those threads: blpa's CPU memory counter leaves what they
// allocate out, so that a step's figures do not depend on how many batches were ready.
class BatchStream {
 public:
  BatchStream(std::function<Batch(int64_t)> make, int64_t first_batch, int workers, int prefetch);
  ~BatchStream();
  BatchStream(const BatchStream&) = delete;
  BatchStream& operator=(const BatchStream&) = delete;

  Batch next();

 private:
  void work(int64_t first);

  const std::function<Batch(int64_t)> make_;
  const int workers_, prefetch_;
  int64_t next_;  // the batch next() returns
  std::map<int64_t, Batch> ready_;
  std::map<int64_t, std::exception_ptr> failed_;
  std::mutex mutex_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

bool on_loader_thread();

// Data parallelism: rank `rank` of `world` takes the rank-th slice of each global batch of
// batch_size * world samples, so the ranks' shards of an epoch are disjoint, cover it, and
// follow the same global order for a seed.
struct Shard {
  int rank = 0, world = 1;
};
std::vector<int64_t> shard_indices(int64_t dataset_size, int64_t batch_size, Shard shard, uint64_t seed, int64_t b);

// shard_indices for a training run: each epoch's order is computed once and shared by the
// threads that ask (recomputing it per batch costs 4 ms at ImageNet's 1.28M samples). The
// last two epochs asked for are kept; an older one is computed again. Thread-safe.
class ShardSampler {
 public:
  ShardSampler(int64_t dataset_size, int64_t batch_size, Shard shard, uint64_t seed);
  std::vector<int64_t> indices(int64_t b);  // equals shard_indices(dataset_size, batch_size, shard, seed, b)
  int64_t batches_per_epoch() const { return per_epoch_; }

 private:
  std::shared_ptr<const std::vector<int64_t>> order(int64_t epoch);

  const int64_t n_, batch_;
  const Shard shard_;
  const uint64_t seed_;
  const int64_t per_epoch_;
  std::mutex mutex_;
  std::map<int64_t, std::shared_ptr<const std::vector<int64_t>>> epochs_;
};

// An endless stream of training batches (the last partial batch of an epoch is dropped), in
// pinned memory when `pinned` (as make_batch).
class TrainLoader {
 public:
  TrainLoader(const Dataset& d, int64_t batch_size, uint64_t seed, Normalisation norm, Augment augment,
              int64_t first_batch, int workers, int prefetch, Shard shard = {}, bool pinned = false);

  Batch next() { return stream_.next(); }
  int64_t batches_per_epoch() const { return sampler_->batches_per_epoch(); }

 private:
  const std::shared_ptr<ShardSampler> sampler_;  // shared with the stream's threads
  BatchStream stream_;
};

}  // namespace blpa::data
