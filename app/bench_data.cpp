// blpa-bench data: decode + augmentation throughput of the ImageNet pipeline on JPEGs of
// ImageNet's typical size, generated here, per worker count.
#include <ATen/Parallel.h>
#include <blpa/imagenet.h>
#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cxxopts.hpp>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>

#include "bench.h"
#include "flags.h"

namespace {

using Clock = std::chrono::steady_clock;
using namespace blpa::data;

// A photo-like test image: smooth colour fields, a few hard-edged shapes and mild noise, so
// that quality-90 files have ImageNet's typical size (about 110 KB at 500 x 375).
std::vector<uint8_t> photo(int w, int h, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(0, 1);
  std::normal_distribution<float> noise(0, 20);
  const float fx = 2 + 6 * u(rng), fy = 2 + 6 * u(rng), ph = 6.28f * u(rng);
  struct Disc {
    float x, y, r, c[3];
  };
  std::vector<Disc> discs(12);
  for (auto& d : discs) d = {w * u(rng), h * u(rng), 10 + 60 * u(rng), {255 * u(rng), 255 * u(rng), 255 * u(rng)}};
  std::vector<uint8_t> px(size_t(w) * h * 3);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x) {
      float c[3] = {128 + 100 * std::sin(fx * x / w + ph), 128 + 100 * std::cos(fy * y / h), 128 + 90 * std::sin((x + y) * 0.01f)};
      for (const auto& d : discs)
        if ((x - d.x) * (x - d.x) + (y - d.y) * (y - d.y) < d.r * d.r) std::copy(d.c, d.c + 3, c);
      for (int k = 0; k < 3; ++k)
        px[(size_t(y) * w + x) * 3 + k] = static_cast<uint8_t>(std::clamp(c[k] + noise(rng), 0.0f, 255.0f));
    }
  return px;
}

// --workers: a comma list of worker counts, each 1 to blpa's most.
std::vector<int> parse_workers(const std::string& s) {
  std::vector<int> out;
  for (const auto& t : blpa::comma_list("--workers", s)) {
    out.push_back(blpa::parse_number<int>("--workers", t));
    if (out.back() < 1 || out.back() > blpa::kMaxWorkers)
      throw std::invalid_argument("--workers: each count must be 1 to " + std::to_string(blpa::kMaxWorkers));
  }
  return out;
}

int scan_bench(const std::string& dir, bool json) {
  namespace fs = std::filesystem;
  const std::string cache = (fs::temp_directory_path() / ("blpa-scan-cache-" + std::to_string(::getpid()))).string();
  const int threads = std::max(1L, ::sysconf(_SC_NPROCESSORS_ONLN));
  ScanReport r;
  auto t0 = Clock::now();
  const ImageList list = scan_image_folder(dir, cache, threads, &r);
  const double scan_s = std::chrono::duration<double>(Clock::now() - t0).count();
  t0 = Clock::now();
  scan_image_folder(dir, cache, threads, &r);
  const double cached_s = std::chrono::duration<double>(Clock::now() - t0).count();
  std::error_code ec;
  for (auto& f : fs::directory_iterator(cache, ec)) ::unlink(f.path().c_str());
  ::rmdir(cache.c_str());
  if (json)
    fmt::print("{{\"bench\": \"scan\", \"files\": {}, \"classes\": {}, \"threads\": {}, \"scan_s\": {:.3f}, "
               "\"cached_s\": {:.3f}, \"from_cache\": {}}}\n",
               list.size(), list.num_classes, threads, scan_s, cached_s, r.from_cache);
  else
    fmt::print("{}: {} images in {} classes: scanned in {:.2f} s with {} threads, {:.2f} s from the cache\n", dir,
               list.size(), list.num_classes, scan_s, threads, cached_s);
  return 0;
}

}  // namespace

int data_main(int argc, char** argv) {
  cxxopts::Options o("blpa-bench data",
                     "Images per second through the ImageNet training pipeline (read, DCT-scaled decode, random\n"
                     "scale/crop/flip, colour jitter, normalisation) on JPEGs generated at ImageNet's typical size,\n"
                     "for each number of decode workers. LibTorch's own threads are set to 1, so `workers` is the\n"
                     "number of cores used.");
  o.add_options()("images", "JPEGs to generate", cxxopts::value<std::string>()->default_value("200"))(
      "width", "Width of the JPEGs", cxxopts::value<std::string>()->default_value("500"))(
      "height", "Height", cxxopts::value<std::string>()->default_value("375"))(
      "quality", "JPEG quality", cxxopts::value<std::string>()->default_value("90"))(
      "workers", "Comma list of worker counts", cxxopts::value<std::string>()->default_value(std::to_string(std::max(1L, ::sysconf(_SC_NPROCESSORS_ONLN)))))(
      "batch", "Images per batch", cxxopts::value<std::string>()->default_value("32"))(
      "seconds", "Time measured per worker count", cxxopts::value<std::string>()->default_value("4"))(
      "scan", "Instead: time the scan of an image folder (<dir>/<class>/*.JPEG), uncached and from the cache",
      cxxopts::value<std::string>())(
      "write-tree", "Instead: write an ImageNet-layout tree of generated JPEGs (train/ and val/, 10 classes, --images "
      "per split) into this directory and exit, for trying the pipeline end to end",
      cxxopts::value<std::string>())("json", "One JSON object")("h,help", "This help");
  auto args = blpa::parse_flags(o, argc, argv);
  blpa::refuse_unmatched(args);
  if (blpa::switched_on(args, "help")) {
    std::cout << o.help() << std::endl;
    return 0;
  }
  if (args.count("scan")) {  // a scan takes no other setting: one given beside it was ignored without a word
    for (const char* other : {"write-tree", "images", "width", "height", "quality", "workers", "batch", "seconds"})
      if (args.count(other))
        throw std::invalid_argument(std::string("--") + other + " does not apply to --scan, which times a folder's "
                                    "scan with every core: give them in two commands");
    return scan_bench(args["scan"].as<std::string>(), blpa::switched_on(args, "json"));
  }
  const int n = blpa::number<int>(args, "images"), w = blpa::number<int>(args, "width");
  const int h = blpa::number<int>(args, "height"), quality = blpa::number<int>(args, "quality");
  // Images the pipeline refuses as too large (kMaxJpegPixels) would time nothing.
  if (n <= 0 || w <= 0 || h <= 0 || size_t(w) * size_t(h) > kMaxJpegPixels)
    throw std::invalid_argument("--images, --width and --height must be positive, with at most " +
                                std::to_string(kMaxJpegPixels) + " pixels an image");
  if (quality < 1 || quality > 100) throw std::invalid_argument("--quality must be 1 to 100");
  if (args.count("write-tree")) {
    for (const char* other : {"workers", "batch", "seconds", "json"})  // it times nothing: ignored without a word
      if (std::string(other) == "json" ? blpa::switched_on(args, other) : args.count(other) > 0)
        throw std::invalid_argument(std::string("--") + other + " does not apply to --write-tree, which only writes "
                                    "a tree (of --images, --width, --height, --quality): give them in two commands");
    namespace fs = std::filesystem;
    const fs::path root = args["write-tree"].as<std::string>();
    std::error_code ec;
    // Into a folder of its own: added to a real data set by mistake, it would mix in fake classes.
    if (fs::exists(root, ec) && !(fs::is_directory(root, ec) && fs::is_empty(root, ec)))
      throw std::invalid_argument("--write-tree " + root.string() + ": exists and is not an empty folder (it writes a "
                                  "generated tree: give a new folder)");
    for (const char* split : {"train", "val"})
      for (int i = 0; i < n; ++i) {
        const auto px = photo(w, h, static_cast<uint32_t>(i + (split[0] == 'v' ? 1000000 : 0)));
        const auto jpg = encode_jpeg(px.data(), w, h, JpegPixels::rgb, quality);
        const fs::path cls = root / split / fmt::format("n{:08d}", i % 10);
        fs::create_directories(cls);
        const fs::path file = cls / fmt::format("{}_{:05d}.JPEG", split, i);
        std::ofstream out(file, std::ios::binary);
        out.write(reinterpret_cast<const char*>(jpg.data()), static_cast<std::streamsize>(jpg.size()));
        if (!out.flush()) throw std::runtime_error(file.string() + ": cannot be written");
      }
    fmt::print("wrote {} JPEGs per split under {}/train and {}/val\n", n, root.string(), root.string());
    return 0;
  }
  const int batch = blpa::number<int>(args, "batch");
  const auto workers = parse_workers(args["workers"].as<std::string>());
  const double seconds = blpa::number<double>(args, "seconds");
  if (batch <= 0 || seconds <= 0) throw std::invalid_argument("--batch and --seconds must be positive");
  if (batch > n)
    throw std::invalid_argument(fmt::format("--batch {} is more than the --images {} generated: give fewer or more",
                                            batch, n));
  at::set_num_threads(1);

  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("blpa-bench-data-" + std::to_string(::getpid()));
  size_t bytes = 0;
  for (int i = 0; i < n; ++i) {
    const auto px = photo(w, h, static_cast<uint32_t>(i));
    const auto jpg = encode_jpeg(px.data(), w, h, JpegPixels::rgb, quality);
    bytes += jpg.size();
    fs::create_directories(dir / fmt::format("n{:02d}", i % 10));
    std::ofstream(dir / fmt::format("n{:02d}", i % 10) / fmt::format("{:05d}.JPEG", i), std::ios::binary)
        .write(reinterpret_cast<const char*>(jpg.data()), static_cast<std::streamsize>(jpg.size()));
  }
  const ImageList list = scan_image_folder(dir.string(), "", 1, nullptr);
  const ImageNetAugment aug;
  const Normalisation norm = imagenet_normalisation();

  // The decode alone (one thread, at the DCT scale the training views ask for), to tell how
  // much of an image's time is augmentation.
  double decode_per_s = 0;
  {
    const auto t0 = Clock::now();
    int64_t done = 0;
    double elapsed = 0;
    for (uint64_t k = 0; elapsed < seconds / 2; ++k, ++done) {
      const Decoded d = decode_jpeg_file(list.path(k % list.size()), train_short_side(aug, k));
      if (d.status != DecodeStatus::ok) throw std::runtime_error("generated JPEG failed to decode: " + d.message);
      elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
    }
    decode_per_s = done / elapsed;
  }

  struct Point {
    int workers;
    double per_s;
  };
  std::vector<Point> points;
  for (int wk : workers) {
    if (wk <= 0) throw std::invalid_argument("--workers must be positive");
    ShardSampler sampler(list.size(), batch, {}, 1);
    BatchStream stream(
        [&](int64_t b) {
          const auto idx = sampler.indices(b);
          return imagenet_train_batch(list, idx, aug, norm, counter_hash(1, b), nullptr);
        },
        0, wk, 2 * wk);
    stream.next();  // warm-up: threads started, files in the page cache
    const auto t0 = Clock::now();
    int64_t images = 0;
    double elapsed = 0;
    while (elapsed < seconds) {
      images += stream.next().labels.size(0);
      elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
    }
    points.push_back({wk, images / elapsed});
  }
  std::error_code ec;
  for (auto& p : fs::directory_iterator(dir, ec))
    for (auto& f : fs::directory_iterator(p.path(), ec)) ::unlink(f.path().c_str());
  for (auto& p : fs::directory_iterator(dir, ec)) ::rmdir(p.path().c_str());
  ::rmdir(dir.c_str());

  const Point& best = points.back();
  if (blpa::switched_on(args, "json")) {
    std::string scaling;
    for (const auto& p : points)
      scaling += fmt::format("{}{{\"workers\": {}, \"images_per_s\": {:.1f}}}", scaling.empty() ? "" : ", ", p.workers, p.per_s);
    fmt::print("{{\"bench\": \"data\", \"width\": {}, \"height\": {}, \"quality\": {}, \"mean_file_bytes\": {}, "
               "\"batch\": {}, \"workers\": {}, \"images_per_s\": {:.1f}, \"images_per_s_per_worker\": {:.1f}, "
               "\"decode_only_images_per_s\": {:.1f}, \"scaling\": [{}]}}\n",
               w, h, quality, bytes / n, batch, best.workers, best.per_s, best.per_s / best.workers, decode_per_s,
               scaling);
  } else {
    fmt::print("{} JPEGs of {}x{} at quality {} (mean {} KB), batches of {}\n", n, w, h, quality, bytes / n / 1024, batch);
    fmt::print("  decode alone: {:8.1f} images/s on one thread\n", decode_per_s);
    for (const auto& p : points)
      fmt::print("  {:3d} workers: {:8.1f} images/s  ({:.1f} per worker)\n", p.workers, p.per_s, p.per_s / p.workers);
  }
  return 0;
}
