// Readers on files written here in the official layouts; augmentation and loader determinism.
#include <blpa/dataset.h>
#include <blpa/loader.h>
#include <zlib.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>

#include "test_support.h"

namespace fs = std::filesystem;
using namespace blpa::data;

namespace {

struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() / ("blpa-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter()++));
    fs::create_directories(path);
  }
  ~TempDir() { remove_tree(path); }
  static int& counter() {
    static int c = 0;
    return c;
  }
  std::string operator/(const std::string& f) const { return (path / f).string(); }
};

void write(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

void write_gz(const std::string& path, const std::vector<uint8_t>& bytes) {
  gzFile f = gzopen(path.c_str(), "wb");
  gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size()));
  gzclose(f);
}

// CIFAR records: `label_bytes` labels then 3072 pixels; pixel k of record i is (i + k) % 251.
std::vector<uint8_t> cifar_records(int64_t n, int label_bytes, int64_t offset, int classes) {
  std::vector<uint8_t> out;
  for (int64_t i = 0; i < n; ++i) {
    for (int l = 0; l < label_bytes; ++l) out.push_back(static_cast<uint8_t>((offset + i + l * 7) % classes));
    for (int k = 0; k < 3072; ++k) out.push_back(static_cast<uint8_t>((offset + i + k) % 251));
  }
  return out;
}

std::vector<uint8_t> be32(uint32_t v) {
  return {uint8_t(v >> 24), uint8_t(v >> 16), uint8_t(v >> 8), uint8_t(v)};
}

std::vector<uint8_t> idx_images(uint32_t n, uint32_t h, uint32_t w) {
  std::vector<uint8_t> out = be32(0x803);
  for (uint32_t v : {n, h, w}) {
    auto b = be32(v);
    out.insert(out.end(), b.begin(), b.end());
  }
  for (uint32_t i = 0; i < n * h * w; ++i) out.push_back(static_cast<uint8_t>(i * 7));
  return out;
}

std::vector<uint8_t> idx_labels(uint32_t n, uint8_t max_label = 9) {
  std::vector<uint8_t> out = be32(0x801);
  auto b = be32(n);
  out.insert(out.end(), b.begin(), b.end());
  for (uint32_t i = 0; i < n; ++i) out.push_back(static_cast<uint8_t>(i + 1 < n ? i % 10 : max_label));
  return out;
}

}  // namespace

TEST_CASE("data: CIFAR-10 files decode to the written pixels and labels", "[data]") {
  TempDir dir;
  for (int b = 1; b <= 5; ++b) write(dir / ("data_batch_" + std::to_string(b) + ".bin"), cifar_records(10000, 1, (b - 1) * 10000, 10));
  write(dir / "test_batch.bin", cifar_records(10000, 1, 777, 10));
  auto train = read_cifar10(dir.path.string(), true);
  REQUIRE(train.size() == 50000);
  CHECK(train.images.sizes() == std::vector<int64_t>{50000, 3, 32, 32});
  CHECK(train.num_classes == 10);
  CHECK(train.labels[12345].item<int64_t>() == 12345 % 10);
  // Pixel k of record i is (i + k) % 251, CHW order: channel 1, row 2, column 3 is k = 1024 + 67.
  CHECK(train.images[12345][1][2][3].item<uint8_t>() == (12345 + 1024 + 67) % 251);
  auto test = read_cifar10(dir.path.string(), false);
  CHECK(test.images[0][0][0][0].item<uint8_t>() == 777 % 251);
}

TEST_CASE("data: CIFAR-100 reads fine labels by default and coarse on request", "[data]") {
  TempDir dir;
  std::vector<uint8_t> recs;
  for (int64_t i = 0; i < 10000; ++i) {
    recs.push_back(static_cast<uint8_t>(i % 20));          // coarse
    recs.push_back(static_cast<uint8_t>((i * 3) % 100));   // fine
    for (int k = 0; k < 3072; ++k) recs.push_back(static_cast<uint8_t>((i + k) % 256));
  }
  write(dir / "test.bin", recs);
  auto fine = read_cifar100(dir.path.string(), false);
  auto coarse = read_cifar100(dir.path.string(), false, true);
  CHECK(fine.num_classes == 100);
  CHECK(coarse.num_classes == 20);
  CHECK(fine.labels[4321].item<int64_t>() == (4321 * 3) % 100);
  CHECK(coarse.labels[4321].item<int64_t>() == 4321 % 20);
  CHECK(fine.images[4321][2][31][31].item<uint8_t>() == (4321 + 3071) % 256);
}

TEST_CASE("data: bad CIFAR files are refused with a message naming the file", "[data]") {
  TempDir dir;
  auto recs = cifar_records(10000, 1, 0, 10);
  write(dir / "test_batch.bin", std::vector<uint8_t>(recs.begin(), recs.end() - 100));  // truncated
  CHECK_THROWS_WITH(read_cifar10(dir.path.string(), false), Catch::Contains("test_batch.bin") && Catch::Contains("truncated"));
  auto extra = cifar_records(10001, 1, 0, 10);  // oversized: one record too many
  write(dir / "test_batch.bin", extra);
  CHECK_THROWS_WITH(read_cifar10(dir.path.string(), false), Catch::Contains("10001 records, expected 10000"));
  recs[5 * 3073] = 10;  // label out of range
  write(dir / "test_batch.bin", recs);
  CHECK_THROWS_WITH(read_cifar10(dir.path.string(), false), Catch::Contains("record 5 has label 10"));
  CHECK_THROWS_WITH(read_cifar10(dir.path.string(), true), Catch::Contains("data_batch_1.bin: not found"));
}

TEST_CASE("data: IDX files, plain and gzip, and their validation", "[data]") {
  TempDir dir;
  write(dir / "img", idx_images(5, 4, 3));
  write_gz(dir / "lab.gz", idx_labels(5));
  auto d = read_idx(dir / "img", dir / "lab.gz");
  CHECK(d.images.sizes() == std::vector<int64_t>{5, 1, 4, 3});
  CHECK(d.images[2][0][1][2].item<uint8_t>() == static_cast<uint8_t>((2 * 12 + 1 * 3 + 2) * 7));
  CHECK(d.labels[3].item<int64_t>() == 3);

  auto bad_magic = idx_images(5, 4, 3);
  bad_magic[3] = 0x02;
  write(dir / "bad", bad_magic);
  CHECK_THROWS_WITH(read_idx(dir / "bad", dir / "lab.gz"), Catch::Contains("bad: wrong magic number"));
  auto truncated = idx_images(5, 4, 3);
  truncated.pop_back();
  write(dir / "short", truncated);
  CHECK_THROWS_WITH(read_idx(dir / "short", dir / "lab.gz"), Catch::Contains("does not match its header"));
  write(dir / "lab6", idx_labels(6));
  CHECK_THROWS_WITH(read_idx(dir / "img", dir / "lab6"), Catch::Contains("has 6 labels but"));
  write(dir / "lab_hi", idx_labels(5, 12));
  CHECK_THROWS_WITH(read_idx(dir / "img", dir / "lab_hi"), Catch::Contains("outside [0, 10)"));
  write(dir / "corrupt.gz", {0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 1, 2, 3, 4});
  CHECK_THROWS_WITH(read_idx(dir / "corrupt.gz", dir / "lab.gz"), Catch::Contains("corrupt.gz"));
}

TEST_CASE("data: sizes in files are bounded before anything is allocated, and errors name the file", "[data]") {
  TempDir dir;
  // A directory where a file belongs.
  fs::create_directories(dir / "test_batch.bin");
  CHECK_THROWS_WITH(read_cifar10(dir.path.string(), false),
                    Catch::Contains(dir / "test_batch.bin") && Catch::Contains("is a directory"));
  fs::create_directories(dir / "img-dir");
  write(dir / "lab", idx_labels(5));
  CHECK_THROWS_WITH(read_idx(dir / "img-dir", dir / "lab"), Catch::Contains("img-dir: is a directory"));

  // IDX headers whose counts would overflow or ask for terabytes: refused before reading on.
  auto header = [](uint32_t n, uint32_t h, uint32_t w) {
    std::vector<uint8_t> b;
    for (uint32_t v : {0x803u, n, h, w}) {
      const auto x = be32(v);
      b.insert(b.end(), x.begin(), x.end());
    }
    return b;
  };
  write(dir / "huge", header(0xFFFFFFFFu, 1 << 16, 1 << 16));
  CHECK_THROWS_WITH(read_idx(dir / "huge", dir / "lab"),
                    Catch::Contains("huge: its header (4294967295 images of 65536x65536) asks for") &&
                        Catch::Contains("more than the limit"));
  write(dir / "wide", header(1, 1 << 17, 1));
  CHECK_THROWS_WITH(read_idx(dir / "wide", dir / "lab"), Catch::Contains("image size 131072x1 is outside 1..65536"));
  write(dir / "none", header(0, 2, 2));
  CHECK_THROWS_WITH(read_idx(dir / "none", dir / "lab"), Catch::Contains("none: holds no images"));
  // A small gzip file whose header claims a billion bytes: what is kept grows with the data.
  auto claims = header(1000000, 100, 10);
  claims.insert(claims.end(), 50, 7);
  write_gz(dir / "claims.gz", claims);
  CHECK_THROWS_WITH(read_idx(dir / "claims.gz", dir / "lab"),
                    Catch::Contains("claims.gz: size does not match its header") &&
                        Catch::Contains("the data ends after 50 of 1000000000 bytes"));

  // gzip members one after another are one file (as gzip writes them); other trailing data is
  // refused, and so is a member cut short.
  const auto img = idx_images(5, 4, 3);
  write(dir / "img", img);
  write_gz(dir / "a.gz", std::vector<uint8_t>(img.begin(), img.begin() + 20));
  write_gz(dir / "b.gz", std::vector<uint8_t>(img.begin() + 20, img.end()));
  auto bytes_of = [](const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), {});
  };
  auto two = bytes_of(dir / "a.gz");
  const auto second = bytes_of(dir / "b.gz");
  two.insert(two.end(), second.begin(), second.end());
  write(dir / "two.gz", two);
  CHECK(torch::equal(read_idx(dir / "two.gz", dir / "lab").images, read_idx(dir / "img", dir / "lab").images));
  two.insert(two.end(), {0, 0, 0, 0});
  write(dir / "padded.gz", two);
  CHECK_THROWS_WITH(read_idx(dir / "padded.gz", dir / "lab"), Catch::Contains("padded.gz: data after the end of its gzip stream"));
  two.resize(two.size() - 4 - 3);
  write(dir / "cut.gz", two);
  CHECK_THROWS_WITH(read_idx(dir / "cut.gz", dir / "lab"), Catch::Contains("cut.gz: truncated gzip data"));
}

TEST_CASE("data: the real Fashion-MNIST from Debian's package loads", "[data]") {
  if (!fs::exists(kDebianFashionMnist)) {
    std::cout << "BLPA_SKIP: dataset-fashion-mnist is not installed" << std::endl;
    return;
  }
  auto train = load("fashion-mnist", kDebianFashionMnist, true);
  auto test = load("fashion-mnist", kDebianFashionMnist, false);
  CHECK(train.images.sizes() == std::vector<int64_t>{60000, 1, 28, 28});
  CHECK(test.size() == 10000);
  CHECK(train.labels.bincount().eq(6000).all().item<bool>());
}

TEST_CASE("data: crops stay within 4 pixels, flips mirror, and both are deterministic", "[data]") {
  // Each pixel holds its own column (and row in channel 1), so the crop offset is readable.
  Dataset d;
  d.images = torch::empty({16, 2, 12, 12}, torch::kByte);
  for (int64_t y = 0; y < 12; ++y)
    for (int64_t x = 0; x < 12; ++x) {
      d.images.select(2, y).select(2, x).select(1, 0).fill_(10 + x);
      d.images.select(2, y).select(2, x).select(1, 1).fill_(10 + y);
    }
  d.labels = torch::zeros({16}, torch::kLong);
  Normalisation unit{{0, 0}, {1.0f / 255, 1.0f / 255}};  // output == raw pixel value
  Augment aug;
  std::vector<int64_t> idx(16);
  std::iota(idx.begin(), idx.end(), 0);
  auto a = make_batch(d, idx, unit, &aug, 42);
  auto b = make_batch(d, idx, unit, &aug, 42);
  auto c = make_batch(d, idx, unit, &aug, 43);
  CHECK(torch::equal(a.images, b.images));
  CHECK(!torch::equal(a.images, c.images));
  int flips = 0;
  for (int64_t i = 0; i < 16; ++i) {
    auto col = a.images[i][0], row = a.images[i][1];
    // Find a pixel inside the image to read the offsets.
    auto inside = (col > 0) & (row > 0);
    REQUIRE(inside.any().item<bool>());
    auto pos = inside.nonzero()[0];
    const int64_t y = pos[0].item<int64_t>(), x = pos[1].item<int64_t>();
    const int64_t sy = static_cast<int64_t>(row[y][x].item<float>()) - 10, sx = static_cast<int64_t>(col[y][x].item<float>()) - 10;
    CHECK(std::abs(sy - y) <= 4);
    const bool flipped = x + 1 < 12 && col[y][x + 1].item<float>() > 0 ? col[y][x + 1].item<float>() < col[y][x].item<float>()
                                                                         : col[y][x - 1].item<float>() > col[y][x].item<float>();
    flips += flipped;
    CHECK(std::abs((flipped ? 11 - x : x) - sx) <= 4);
  }
  CHECK(flips > 0);
  CHECK(flips < 16);
  auto plain = make_batch(d, idx, unit, nullptr, 0);  // evaluation: the image itself
  CHECK(torch::equal(plain.images, d.images.to(torch::kFloat)));
}

TEST_CASE("data: the training stream is a function of (seed, batch) and covers each epoch once", "[data]") {
  Dataset d;
  d.images = torch::arange(100, torch::kLong).to(torch::kByte).view({100, 1, 1, 1}).expand({100, 1, 4, 4}).contiguous();
  d.labels = torch::arange(100, torch::kLong);
  d.num_classes = 100;
  Normalisation unit{{0}, {1.0f / 255}};
  std::vector<torch::Tensor> first, resumed, other;
  {
    TrainLoader l(d, 8, 7, unit, Augment{}, 0, 3, 2);
    for (int i = 0; i < 30; ++i) first.push_back(l.next().labels);
  }
  {
    TrainLoader l(d, 8, 7, unit, Augment{}, 17, 1, 5);  // resume at batch 17, other thread count
    for (int i = 17; i < 30; ++i) resumed.push_back(l.next().labels);
  }
  for (int i = 17; i < 30; ++i) CHECK(torch::equal(first[i], resumed[i - 17]));
  {
    TrainLoader l(d, 8, 8, unit, Augment{}, 0, 2, 2);
    other.push_back(l.next().labels);
  }
  CHECK(!torch::equal(first[0], other[0]));
  // 12 batches of 8 per epoch: each sample at most once per epoch, 96 distinct.
  std::set<int64_t> seen;
  for (int i = 0; i < 12; ++i)
    for (int64_t k = 0; k < 8; ++k) CHECK(seen.insert(first[i][k].item<int64_t>()).second);
  CHECK(seen.size() == 96);
  CHECK(!torch::equal(torch::cat({first[0], first[1]}), torch::cat({first[12], first[13]})));  // reshuffled
}

// Batches bound for a GPU are pinned, so that their copies are asynchronous: a copy from
// pageable memory can wait for the stream, which would make the host wait for each replayed
// CUDA graph before it queues the next.
TEST_CASE("CUDA: training batches for a GPU are pinned and hold the same values", "[data][cuda]") {
  BLPA_REQUIRE_CUDA();
  Dataset d;
  d.images = torch::randint(0, 256, {40, 3, 6, 6}, torch::kLong).to(torch::kByte);
  d.labels = torch::randint(0, 10, {40}, torch::kLong);
  d.num_classes = 10;
  const auto norm = channel_stats(d);
  TrainLoader pageable(d, 8, 3, norm, Augment{}, 0, 1, 2);
  TrainLoader pinned(d, 8, 3, norm, Augment{}, 0, 2, 2, Shard{}, /*pinned=*/true);
  for (int i = 0; i < 6; ++i) {
    const auto a = pageable.next(), b = pinned.next();
    CHECK(!a.images.is_pinned());
    CHECK(b.images.is_pinned());
    CHECK(b.labels.is_pinned());
    CHECK(torch::equal(a.images, b.images));
    CHECK(torch::equal(a.labels, b.labels));
  }
}
