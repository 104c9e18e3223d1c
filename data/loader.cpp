#include "blpa/loader.h"

#include <ATen/ATen.h>

#include <cmath>
#include <numeric>
#include <stdexcept>

namespace blpa::data {
namespace {

// splitmix64: a counter-based hash, the same on every platform and standard library.
uint64_t mix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

}  // namespace

uint64_t counter_hash(uint64_t a, uint64_t b, uint64_t c) { return mix(mix(mix(a) ^ b) ^ c); }

Normalisation channel_stats(const Dataset& d) {
  // One pass over the uint8 pixels with exact integer sums: no float copy of the data set.
  const int64_t n = d.images.size(0), C = d.images.size(1), plane = d.images.size(2) * d.images.size(3);
  const uint8_t* p = d.images.data_ptr<uint8_t>();
  std::vector<uint64_t> sum(C, 0), sq(C, 0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < C; ++c) {
      const uint8_t* q = p + (i * C + c) * plane;
      uint64_t s = 0, s2 = 0;
      for (int64_t k = 0; k < plane; ++k) s += q[k], s2 += uint64_t{q[k]} * q[k];
      sum[c] += s, sq[c] += s2;
    }
  Normalisation out;
  const double count = static_cast<double>(n * plane);
  for (int64_t c = 0; c < C; ++c) {
    const double mean = sum[c] / count, var = sq[c] / count - mean * mean;
    out.mean.push_back(static_cast<float>(mean / 255.0));
    out.std.push_back(static_cast<float>(std::max(std::sqrt(std::max(var, 0.0)) / 255.0, 1e-6)));
  }
  return out;
}

Batch make_batch(const Dataset& d, const std::vector<int64_t>& indices, const Normalisation& norm,
                 const Augment* augment, uint64_t stream, bool pinned) {
  const int64_t C = d.images.size(1), H = d.images.size(2), W = d.images.size(3);
  const int64_t B = static_cast<int64_t>(indices.size());
  Batch out;
  out.images = at::empty({B, C, H, W}, at::TensorOptions(at::kFloat).pinned_memory(pinned));
  out.labels = at::empty({B}, at::TensorOptions(at::kLong).pinned_memory(pinned));
  const uint8_t* src = d.images.data_ptr<uint8_t>();
  const int64_t* lab = d.labels.data_ptr<int64_t>();
  float* dst = out.images.data_ptr<float>();
  int64_t* dlab = out.labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) {
    const int64_t s = indices[i];
    dlab[i] = lab[s];
    int64_t dy = 0, dx = 0;
    bool flip = false;
    if (augment) {
      const uint64_t h = counter_hash(stream, static_cast<uint64_t>(s));
      const int64_t span = 2 * augment->pad + 1;
      dy = static_cast<int64_t>(h % span) - augment->pad;
      dx = static_cast<int64_t>((h >> 16) % span) - augment->pad;
      flip = augment->flip && ((h >> 32) & 1);
    }
    for (int64_t c = 0; c < C; ++c) {
      const float scale = 1.0f / (255.0f * norm.std[c]), shift = norm.mean[c] / norm.std[c];
      const uint8_t* plane = src + (s * C + c) * H * W;
      float* o = dst + (i * C + c) * H * W;
      for (int64_t y = 0; y < H; ++y) {
        const int64_t sy = y + dy;
        for (int64_t x = 0; x < W; ++x) {
          const int64_t sx = (flip ? W - 1 - x : x) + dx;
          const bool inside = sy >= 0 && sy < H && sx >= 0 && sx < W;
          o[y * W + x] = inside ? plane[sy * W + sx] * scale - shift : 0.0f;
        }
      }
    }
  }
  return out;
}

namespace {

int64_t checked_per_epoch(int64_t n, int64_t batch_size) {
  const int64_t per_epoch = batch_size > 0 ? n / batch_size : 0;
  if (per_epoch == 0)
    throw std::invalid_argument("batch size " + std::to_string(batch_size) + " exceeds the data set (" +
                                std::to_string(n) + " samples)");
  return per_epoch;
}

// Fisher-Yates with counter-based draws: the order of an epoch depends only on (seed, epoch).
std::vector<int64_t> epoch_order(int64_t n, uint64_t seed, int64_t epoch) {
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  for (int64_t i = n - 1; i > 0; --i) {
    const uint64_t r = counter_hash(seed, static_cast<uint64_t>(epoch), static_cast<uint64_t>(i));
    std::swap(order[i], order[r % static_cast<uint64_t>(i + 1)]);
  }
  return order;
}

// Rank `shard.rank`'s slice of global batch `pos` of an epoch's order.
std::vector<int64_t> shard_of(const std::vector<int64_t>& order, int64_t batch_size, Shard shard, int64_t pos) {
  const auto first = order.begin() + (pos * shard.world + shard.rank) * batch_size;
  return std::vector<int64_t>(first, first + batch_size);
}

}  // namespace

std::vector<int64_t> batch_indices(int64_t n, int64_t batch_size, uint64_t seed, int64_t b) {
  return shard_indices(n, batch_size, Shard{}, seed, b);
}

std::vector<int64_t> shard_indices(int64_t n, int64_t batch_size, Shard shard, uint64_t seed, int64_t b) {
  const int64_t per_epoch = checked_per_epoch(n, batch_size * shard.world);
  return shard_of(epoch_order(n, seed, b / per_epoch), batch_size, shard, b % per_epoch);
}

ShardSampler::ShardSampler(int64_t n, int64_t batch_size, Shard shard, uint64_t seed)
    : n_(n), batch_(batch_size), shard_(shard), seed_(seed), per_epoch_(checked_per_epoch(n, batch_size * shard.world)) {}

std::vector<int64_t> ShardSampler::indices(int64_t b) {
  return shard_of(*order(b / per_epoch_), batch_, shard_, b % per_epoch_);
}

std::shared_ptr<const std::vector<int64_t>> ShardSampler::order(int64_t epoch) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto& kept = epochs_[epoch];
  if (!kept) kept = std::make_shared<const std::vector<int64_t>>(epoch_order(n_, seed_, epoch));
  auto order = kept;  // copied before the erase below can drop the map's entry
  while (epochs_.size() > 2) epochs_.erase(epochs_.begin());  // the oldest first
  return order;
}

TrainLoader::TrainLoader(const Dataset& d, int64_t batch_size, uint64_t seed, Normalisation norm, Augment augment,
                         int64_t first_batch, int workers, int prefetch, Shard shard, bool pinned)
    : sampler_(std::make_shared<ShardSampler>(d.size(), batch_size, shard, seed)),
      stream_(
          [&d, seed, norm = std::move(norm), augment, pinned, sampler = sampler_](int64_t b) {
            const int64_t epoch = b / sampler->batches_per_epoch();
            return make_batch(d, sampler->indices(b), norm, &augment, counter_hash(seed, 0xA5A5A5A5ull, epoch),
                              pinned);
          },
          first_batch, workers, prefetch) {}

BatchStream::BatchStream(std::function<Batch(int64_t)> make, int64_t first_batch, int workers, int prefetch)
    : make_(std::move(make)),
      workers_(std::max(1, workers)),
      prefetch_(std::max(prefetch, workers_)),  // fewer would leave workers idle
      next_(first_batch) {
  for (int w = 0; w < workers_; ++w) threads_.emplace_back([this, first_batch, w] { work(first_batch + w); });
}

BatchStream::~BatchStream() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
}

namespace {
thread_local bool loader_thread = false;
}  // namespace

bool on_loader_thread() { return loader_thread; }

void BatchStream::work(int64_t b) {
  loader_thread = true;
  for (;; b += workers_) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      cv_.wait(lock, [&] { return stop_ || b < next_ + prefetch_; });
      if (stop_) return;
    }
    Batch batch;
    std::exception_ptr error;
    try {
      batch = make_(b);
    } catch (...) {
      error = std::current_exception();
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (error)
        failed_.emplace(b, error);
      else
        ready_.emplace(b, std::move(batch));
    }
    cv_.notify_all();
    if (error) return;  // this worker's later batches would be waited for in vain; next() rethrows
  }
}

Batch BatchStream::next() {
  std::unique_lock<std::mutex> lock(mutex_);
  cv_.wait(lock, [&] { return ready_.count(next_) > 0 || failed_.count(next_) > 0; });
  if (auto f = failed_.find(next_); f != failed_.end()) std::rethrow_exception(f->second);
  Batch b = std::move(ready_.at(next_));
  ready_.erase(next_);
  ++next_;
  lock.unlock();
  cv_.notify_all();
  return b;
}

}  // namespace blpa::data
