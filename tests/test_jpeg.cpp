// The TurboJPEG decoder (data/jpeg.cpp) on JPEGs made in memory by encode_jpeg: round trips,
// grey and CMYK conversion, DCT scaling, and the statuses of damaged or foreign data.
// No torch headers, so this file compiles in seconds.
#include <blpa/jpeg.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

using namespace blpa::data;

namespace {

using Bytes = std::vector<uint8_t>;
constexpr double kTwoPi = 6.283185307179586;

// A smooth test card: red and green ramps, a blue wave, and flat 32x32 tiles of saturated
// colour at multiples of 32, so their edges fall on the borders of the 8x8 luma and chroma
// blocks (no ringing inside a block).
Bytes test_card(int w, int h) {
  static const uint8_t colours[4][3] = {{230, 20, 20}, {20, 20, 230}, {250, 250, 250}, {10, 10, 10}};
  Bytes p(size_t(w) * size_t(h) * 3);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x) {
      uint8_t* q = &p[(size_t(y) * w + x) * 3];
      q[0] = uint8_t(255 * x / std::max(1, w - 1));
      q[1] = uint8_t(255 * y / std::max(1, h - 1));
      q[2] = uint8_t(128 + 100 * std::sin(kTwoPi * (x + y) / 96.0));
      const int bx = x / 32, by = y / 32;  // every third 32x32 tile of the grid is flat
      if ((bx + 2 * by) % 3 == 0 && x >= 32 && y >= 32) std::memcpy(q, colours[(bx + by) % 4], 3);
    }
  return p;
}

Bytes grey_card(int w, int h) {
  const Bytes rgb = test_card(w, h);
  Bytes g(size_t(w) * size_t(h));
  for (size_t i = 0; i < g.size(); ++i)
    g[i] = uint8_t((77 * rgb[3 * i] + 150 * rgb[3 * i + 1] + 29 * rgb[3 * i + 2]) >> 8);
  return g;
}

// Stored (Adobe, inverted) CMYK: 255 is no ink. Smooth inks, a no-ink block and a full-black block.
Bytes cmyk_card(int w, int h) {
  Bytes p(size_t(w) * size_t(h) * 4);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x) {
      uint8_t* q = &p[(size_t(y) * w + x) * 4];
      q[0] = uint8_t(255 - 200 * x / std::max(1, w - 1));
      q[1] = uint8_t(255 - 200 * y / std::max(1, h - 1));
      q[2] = uint8_t(160 + 90 * std::sin(kTwoPi * (x - y) / 128.0));
      q[3] = uint8_t(255 - 120 * (x + y) / std::max(1, w + h - 2));
      if (x < 32 && y < 32) std::memset(q, 255, 4);                                // no ink: white
      if (x >= 32 && x < 64 && y < 32) q[0] = q[1] = q[2] = 255, q[3] = 0;  // black ink only
    }
  return p;
}

// The conversion decode_jpeg documents, computed independently in floating point.
Bytes expected_rgb_of_cmyk(const Bytes& cmyk) {
  Bytes rgb(cmyk.size() / 4 * 3);
  for (size_t i = 0, j = 0; i < cmyk.size(); i += 4, j += 3)
    for (size_t c = 0; c < 3; ++c) rgb[j + c] = uint8_t(std::lround(cmyk[i + c] * cmyk[i + 3] / 255.0));
  return rgb;
}

// Mean of each f x f block (a box filter): what DCT scaling by 1/f approximates.
Bytes box_downscale(const Bytes& rgb, int w, int h, int f) {
  const int ow = w / f, oh = h / f;
  Bytes out(size_t(ow) * size_t(oh) * 3);
  for (int y = 0; y < oh; ++y)
    for (int x = 0; x < ow; ++x)
      for (int c = 0; c < 3; ++c) {
        int sum = 0;
        for (int dy = 0; dy < f; ++dy)
          for (int dx = 0; dx < f; ++dx) sum += rgb[(size_t(y * f + dy) * w + (x * f + dx)) * 3 + c];
        out[(size_t(y) * ow + x) * 3 + c] = uint8_t((sum + f * f / 2) / (f * f));
      }
  return out;
}

struct Error {
  double mean = 0;
  int max = 0;         // over all pixels
  int max_inside = 0;  // over pixels off the borders of the 32x32 tiles of the test card
};

Error error(const Bytes& a, const Bytes& b, int w = 0, int channels = 3) {
  REQUIRE(a.size() == b.size());
  Error e;
  double sum = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const int d = std::abs(int(a[i]) - int(b[i]));
    sum += d;
    e.max = std::max(e.max, d);
    const size_t pixel = i / size_t(channels);
    const size_t x = w > 0 ? pixel % size_t(w) : 1, y = w > 0 ? pixel / size_t(w) : 1;
    if (x % 32 != 0 && x % 32 != 31 && y % 32 != 0 && y % 32 != 31) e.max_inside = std::max(e.max_inside, d);
  }
  e.mean = a.empty() ? 0 : sum / double(a.size());
  return e;
}

Bytes encode(const Bytes& px, int w, int h, JpegPixels f = JpegPixels::rgb, int quality = 95,
             bool progressive = false) {
  return encode_jpeg(px.data(), w, h, f, quality, progressive);
}

Decoded decode(const Bytes& jpeg, int min_short_side = 0) {
  return decode_jpeg(jpeg.data(), jpeg.size(), min_short_side);
}

// Offset of the first marker FF m at or after `from` (JPEG markers; 0 if absent).
size_t find_marker(const Bytes& jpeg, uint8_t m, size_t from = 2) {
  for (size_t i = from; i + 1 < jpeg.size(); ++i)
    if (jpeg[i] == 0xFF && jpeg[i + 1] == m) return i;
  return 0;
}

void require_failed(const Decoded& d, DecodeStatus expected) {
  INFO("status " << to_string(d.status) << ": " << d.message);
  CHECK(d.status == expected);
  CHECK(d.image.rgb.empty());
  CHECK(d.image.width == 0);
  CHECK(!d.message.empty());
}

// A uniform mid-grey 3-component JPEG with luma sampled 4x2 and chroma 1x1 ("4:1:0"), a
// layout TurboJPEG 2.1's header reader calls unknown. Written by hand: one Huffman code "0"
// that means "DC difference 0" and "end of block", so every block is two zero bits.
Bytes grey_410_jpeg(int w, int h) {
  Bytes j = {0xFF, 0xD8, 0xFF, 0xDB, 0, 67, 0};
  j.insert(j.end(), 64, 1);  // quantisation table 0: all ones
  const Bytes sof = {0xFF, 0xC0, 0, 17, 8, uint8_t(h >> 8), uint8_t(h), uint8_t(w >> 8), uint8_t(w), 3,
                     1, 0x42, 0, 2, 0x11, 0, 3, 0x11, 0};
  Bytes dht = {0xFF, 0xC4, 0, 2 + 2 * 18};
  for (const uint8_t table : {0x00, 0x10}) {  // DC table 0, AC table 0: one code of length 1
    dht.insert(dht.end(), {table, 1});
    dht.insert(dht.end(), 15 + 1, 0);  // no longer codes; the symbol 0
  }
  const Bytes sos = {0xFF, 0xDA, 0, 12, 3, 1, 0x00, 2, 0x00, 3, 0x00, 0, 63, 0};
  for (const Bytes& seg : {sof, dht, sos}) j.insert(j.end(), seg.begin(), seg.end());
  const size_t mcus = size_t((w + 31) / 32) * size_t((h + 15) / 16), bits = mcus * 10 * 2;
  j.insert(j.end(), bits / 8, 0);
  if (bits % 8) j.push_back(uint8_t(0xFF >> (bits % 8)));  // pad the last byte with ones
  j.insert(j.end(), {0xFF, 0xD9});
  return j;
}

struct TempDir {
  std::string path;
  std::vector<std::string> files;
  TempDir() {
    const char* tmp = std::getenv("TMPDIR");
    std::string templ = std::string(tmp && *tmp ? tmp : "/tmp") + "/blpa-jpeg-XXXXXX";
    REQUIRE(::mkdtemp(templ.data()) != nullptr);
    path = templ;
  }
  ~TempDir() {  // not std::filesystem::remove_all: it crashes with one LibTorch build
    for (const auto& f : files) ::unlink(f.c_str());
    ::rmdir(path.c_str());
  }
  std::string write(const std::string& name, const Bytes& bytes) {
    files.push_back(path + "/" + name);
    const int fd = ::open(files.back().c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    REQUIRE(fd >= 0);
    REQUIRE(::write(fd, bytes.data(), bytes.size()) == ssize_t(bytes.size()));
    ::close(fd);
    return files.back();
  }
};

}  // namespace

TEST_CASE("jpeg: RGB baseline and progressive round trip", "[jpeg]") {
  const int w = 320, h = 240;
  const Bytes card = test_card(w, h);
  for (const bool progressive : {false, true}) {
    INFO("progressive " << progressive);
    const Bytes jpeg = encode(card, w, h, JpegPixels::rgb, 95, progressive);
    // SOF2 marks a progressive JPEG, SOF0 a baseline one: the flag reached the encoder.
    CHECK((find_marker(jpeg, 0xC2) != 0) == progressive);
    CHECK((find_marker(jpeg, 0xC0) != 0) == !progressive);
    const Decoded d = decode(jpeg);
    REQUIRE(d.status == DecodeStatus::ok);
    CHECK(d.message.empty());
    CHECK(d.image.width == w);
    CHECK(d.image.height == h);
    CHECK(d.full_width == w);
    CHECK(d.full_height == h);
    CHECK(d.scale_num == 1);
    CHECK(d.scale_denom == 1);
    const Error e = error(d.image.rgb, card, w);
    // Measured (both modes, which differ only in entropy coding): mean 1.57, max 8 inside
    // the tiles, 143 on their borders. Quality 95 keeps smooth areas within a few levels; on a
    // border of a saturated tile, 4:2:0 triangle upsampling blends up to 7/16 of the
    // neighbour's chroma into the pixel, which no tolerance short of 255 would bound.
    CAPTURE(e.mean, e.max, e.max_inside);
    CHECK(e.mean < 3.0);
    CHECK(e.max_inside <= 16);
    // Bytes after EOI (camera trailers, padding) are common in real files and harmless.
    Bytes trailer = jpeg;
    trailer.insert(trailer.end(), 100, 0x55);
    const Decoded t = decode(trailer);
    CHECK(t.status == DecodeStatus::ok);
    CHECK(t.image.rgb == d.image.rgb);
  }
}

TEST_CASE("jpeg: grey JPEG decodes to RGB with equal channels", "[jpeg]") {
  const int w = 160, h = 96;
  const Bytes grey = grey_card(w, h);
  const Decoded d = decode(encode(grey, w, h, JpegPixels::gray));
  REQUIRE(d.status == DecodeStatus::ok);
  REQUIRE(d.image.rgb.size() == size_t(w) * h * 3);
  Bytes r(grey.size());
  size_t unequal = 0;
  for (size_t i = 0; i < grey.size(); ++i) {
    const uint8_t* p = &d.image.rgb[3 * i];
    unequal += p[0] != p[1] || p[1] != p[2];
    r[i] = p[0];
  }
  CHECK(unequal == 0);
  const Error e = error(r, grey, w, 1);
  // Measured: mean 0.11, max 1: no chroma, and the tiles' edges lie on DCT block borders.
  CAPTURE(e.mean, e.max);
  CHECK(e.mean < 1.0);
  CHECK(e.max <= 4);
}

TEST_CASE("jpeg: CMYK JPEG decodes to RGB by the inverted-ink convention", "[jpeg]") {
  const int w = 192, h = 128;
  const Bytes cmyk = cmyk_card(w, h);
  const Decoded d = decode(encode(cmyk, w, h, JpegPixels::cmyk));
  REQUIRE(d.status == DecodeStatus::ok);
  REQUIRE(d.image.width == w);
  const Error e = error(d.image.rgb, expected_rgb_of_cmyk(cmyk), w);
  // Measured: mean 0.48, max 4 off the blocks' borders (34 on them, from 4:2:0 chroma as in
  // the RGB test; K is stored at full resolution).
  CAPTURE(e.mean, e.max, e.max_inside);
  CHECK(e.mean < 2.0);
  CHECK(e.max_inside <= 10);
  // The convention itself: stored 255s (no ink) are white, stored K = 0 is black. A decoder
  // that took the bytes for ink amounts would give the opposite.
  const uint8_t* white = &d.image.rgb[(size_t(16) * w + 16) * 3];
  const uint8_t* black = &d.image.rgb[(size_t(16) * w + 48) * 3];
  for (int c = 0; c < 3; ++c) {
    CHECK(int(white[c]) >= 250);
    CHECK(int(black[c]) <= 5);
  }
}

TEST_CASE("jpeg: DCT scaling picks the smallest factor that keeps the short side", "[jpeg]") {
  const int w = 1000, h = 800;
  const Bytes card = test_card(w, h);
  const Bytes jpeg = encode(card, w, h, JpegPixels::rgb, 90);
  struct Case {
    int min_short, width, height, num, denom;
  };
  for (const Case c : {Case{200, 250, 200, 1, 4}, Case{100, 125, 100, 1, 8}, Case{300, 375, 300, 3, 8},
                       Case{201, 375, 300, 3, 8}, Case{0, 1000, 800, 1, 1}, Case{800, 1000, 800, 1, 1},
                       Case{5000, 1000, 800, 1, 1}}) {
    INFO("min_short_side " << c.min_short);
    const Decoded d = decode(jpeg, c.min_short);
    REQUIRE(d.status == DecodeStatus::ok);
    CHECK(d.image.width == c.width);
    CHECK(d.image.height == c.height);
    CHECK(d.image.rgb.size() == size_t(c.width) * c.height * 3);
    CHECK(d.scale_num == c.num);
    CHECK(d.scale_denom == c.denom);
    CHECK(d.full_width == w);
    CHECK(d.full_height == h);
  }
  // Scaling by 1/f in the DCT domain is close to averaging f x f blocks. Measured: mean 0.56
  // and max 6 at 1/4, 0.37 and 3 at 1/8. Loose bounds: the reduced IDCT is not exactly a box
  // filter, and chroma is upsampled after scaling.
  for (const int f : {4, 8}) {
    INFO("factor 1/" << f);
    const Decoded d = decode(jpeg, 800 / f);
    REQUIRE(d.status == DecodeStatus::ok);
    REQUIRE(d.scale_denom == f);
    const Error e = error(d.image.rgb, box_downscale(card, w, h, f));
    CAPTURE(e.mean, e.max);
    CHECK(e.mean < 1.5);
    CHECK(e.max <= 16);
  }
}

TEST_CASE("jpeg: odd sizes round trip", "[jpeg]") {
  const std::pair<int, int> sizes[] = {{1, 1}, {2, 2}, {17, 9}, {9, 17}, {1, 33}, {33, 1}};
  for (const auto& [w, h] : sizes) {
    INFO(w << "x" << h);
    // Gentle per-pixel slopes: the test card squeezed into 2x2 would put four far-apart
    // colours into one 4:2:0 chroma sample, an error of subsampling, not of the decoder.
    Bytes px(size_t(w) * h * 3);
    for (int y = 0; y < h; ++y)
      for (int x = 0; x < w; ++x)
        for (int c = 0; c < 3; ++c) px[(size_t(y) * w + x) * 3 + c] = uint8_t(60 + 40 * c + 3 * x + 2 * y);
    const Bytes jpeg = encode(px, w, h);
    const Decoded d = decode(jpeg);
    REQUIRE(d.status == DecodeStatus::ok);
    CHECK(d.image.width == w);
    CHECK(d.image.height == h);
    const Error e = error(d.image.rgb, px);
    CAPTURE(e.mean, e.max);
    CHECK(e.mean < 2.0);  // measured <= 0.69
    CHECK(e.max <= 6);    // measured <= 2
    // Scaling never upsamples: an image already below the asked size comes out whole.
    const Decoded s = decode(jpeg, 256);
    CHECK(s.image.width == w);
    CHECK(s.scale_denom == 1);
  }
}

TEST_CASE("jpeg: truncated data is reported and never ok", "[jpeg]") {
  const Bytes card = test_card(200, 150);
  for (const bool progressive : {false, true}) {
    INFO("progressive " << progressive);
    const Bytes jpeg = encode(card, 200, 150, JpegPixels::rgb, 90, progressive);
    const size_t sos = find_marker(jpeg, 0xDA);
    REQUIRE(sos > 0);
    // Inside the scan data, inside the header tables, just SOI, and only the EOI missing.
    for (const size_t keep : {jpeg.size() / 2, sos / 2, size_t(2), jpeg.size() - 2}) {
      INFO("first " << keep << " of " << jpeg.size() << " bytes");
      const Decoded d = decode_jpeg(jpeg.data(), keep);
      require_failed(d, DecodeStatus::truncated);
    }
    if (progressive) {  // cut where the second scan starts: the first scan alone is a blurry image
      const size_t second = find_marker(jpeg, 0xDA, sos + 2);
      REQUIRE(second > 0);
      require_failed(decode_jpeg(jpeg.data(), second), DecodeStatus::truncated);
    }
  }
}

TEST_CASE("jpeg: damaged JPEG data is corrupt", "[jpeg]") {
  const Bytes jpeg = encode(test_card(200, 150), 200, 150);
  SECTION("an EOI marker in the middle of the scan") {
    Bytes bad = jpeg;
    bad[bad.size() / 2] = 0xFF;
    bad[bad.size() / 2 + 1] = 0xD9;
    require_failed(decode(bad), DecodeStatus::corrupt);
  }
  SECTION("a Huffman table with impossible code counts") {
    Bytes bad = jpeg;
    const size_t dht = find_marker(bad, 0xC4);
    REQUIRE(dht > 0);
    for (size_t i = 5; i < 5 + 16; ++i) bad[dht + i] = 0xFF;  // 16 lengths x 255 codes > 256
    require_failed(decode(bad), DecodeStatus::corrupt);
  }
  SECTION("garbage after a valid SOI marker") {
    Bytes bad = {0xFF, 0xD8};
    uint32_t x = 12345;
    for (int i = 0; i < 4000; ++i) bad.push_back(uint8_t((x = x * 1664525u + 1013904223u) >> 24));
    const Decoded d = decode(bad);
    INFO(to_string(d.status) << ": " << d.message);
    CHECK(d.status != DecodeStatus::ok);
    CHECK(d.image.rgb.empty());
  }
  SECTION("a frame too large to allocate is refused from its header") {
    Bytes big = jpeg;
    const size_t sof = find_marker(big, 0xC0);
    REQUIRE(sof > 0);
    big[sof + 5] = 0x34;  // 13378 x 13378: just over PIL's limit of 178,956,970 pixels
    big[sof + 6] = 0x42;
    big[sof + 7] = 0x34;
    big[sof + 8] = 0x42;
    const Decoded d = decode(big);
    require_failed(d, DecodeStatus::too_large);
    CHECK(d.full_width == 13378);
    CHECK(d.full_height == 13378);
    CHECK(d.message == "13378x13378 exceeds the limit of 178956970 pixels (PIL's, as in torchvision)");
    big[sof + 6] = big[sof + 8] = 0x41;  // 13377 x 13377: below it, so read (and short of data)
    CHECK(decode(big).status != DecodeStatus::too_large);
  }
}

TEST_CASE("jpeg: foreign and empty data get their own status", "[jpeg]") {
  Bytes png = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  png.insert(png.end(), 100, 0x42);
  require_failed(decode(png), DecodeStatus::png);
  require_failed(decode_jpeg(nullptr, 0), DecodeStatus::empty);
  const Bytes nothing;
  require_failed(decode(nothing), DecodeStatus::empty);
  const Bytes gif = {'G', 'I', 'F', '8', '9', 'a', 1, 0, 1, 0, 0, 0, 0};
  require_failed(decode(gif), DecodeStatus::not_jpeg);
  Bytes noise;
  uint32_t x = 777;
  for (int i = 0; i < 1000; ++i) noise.push_back(uint8_t((x = x * 1664525u + 1013904223u) >> 24));
  noise[0] = 0x12;
  require_failed(decode(noise), DecodeStatus::not_jpeg);
  require_failed(decode(Bytes{0xFF}), DecodeStatus::not_jpeg);
  // Every status has its own name, for warnings and counts.
  std::vector<std::string> names;
  for (auto s : {DecodeStatus::ok, DecodeStatus::empty, DecodeStatus::not_jpeg, DecodeStatus::png,
                 DecodeStatus::corrupt, DecodeStatus::truncated, DecodeStatus::too_large, DecodeStatus::unreadable})
    names.push_back(to_string(s));
  std::sort(names.begin(), names.end());
  CHECK(std::unique(names.begin(), names.end()) == names.end());
}

TEST_CASE("jpeg: unusual chroma sampling decodes", "[jpeg]") {
  const Decoded d = decode(grey_410_jpeg(64, 32));
  INFO(to_string(d.status) << ": " << d.message);
  REQUIRE(d.status == DecodeStatus::ok);
  CHECK(d.image.width == 64);
  CHECK(d.image.height == 32);
  int off = 0;
  for (uint8_t v : d.image.rgb) off = std::max(off, std::abs(int(v) - 128));
  CHECK(off <= 1);
}

TEST_CASE("jpeg: decoding from files", "[jpeg]") {
  TempDir dir;
  const Bytes card = test_card(120, 80);
  const Bytes jpeg = encode(card, 120, 80);
  const std::string path = dir.write("card.jpg", jpeg);
  const Decoded mem = decode(jpeg, 40), file = decode_jpeg_file(path, 40);
  REQUIRE(file.status == DecodeStatus::ok);
  CHECK(file.scale_denom == 2);
  CHECK(file.image.rgb == mem.image.rgb);
  // An empty file reads fine and is reported as empty.
  CHECK(decode_jpeg_file(dir.write("empty.jpg", {})).status == DecodeStatus::empty);
  const std::string missing = dir.path + "/missing.jpg";
  const Decoded gone = decode_jpeg_file(missing);
  require_failed(gone, DecodeStatus::unreadable);
  CHECK_THAT(gone.message, Catch::Contains(missing) && Catch::Contains(std::strerror(ENOENT)));
  const Decoded folder = decode_jpeg_file(dir.path);
  require_failed(folder, DecodeStatus::unreadable);
  CHECK_THAT(folder.message, Catch::Contains(std::strerror(EISDIR)));
}

TEST_CASE("jpeg: oversized files and special files are refused before they are read", "[jpeg]") {
  TempDir dir;
  // A sparse file one byte above the limit: too_large from its size alone, no disk needed.
  const std::string big = dir.write("big.JPEG", {0xFF, 0xD8});
  REQUIRE(::truncate(big.c_str(), off_t(kMaxJpegBytes) + 1) == 0);
  const Decoded d = decode_jpeg_file(big);
  require_failed(d, DecodeStatus::too_large);
  CHECK_THAT(d.message, Catch::Contains(big) && Catch::Contains("more than the limit"));
  // A named pipe under an image name: refused at once, not waited on for a writer.
  const std::string fifo = dir.path + "/pipe.JPEG";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  dir.files.push_back(fifo);
  const Decoded p = decode_jpeg_file(fifo);
  require_failed(p, DecodeStatus::unreadable);
  CHECK_THAT(p.message, Catch::Contains(fifo) && Catch::Contains("not a regular file"));
}

TEST_CASE("jpeg: decoding is a function of the bytes alone", "[jpeg]") {
  // One image's decode must not depend on what the thread decoded before: TurboJPEG handles
  // keep Huffman tables from image to image, and a JPEG without them (MJPEG style: the
  // standard tables apply) would otherwise pick up a progressive JPEG's optimised ones.
  const Bytes card = test_card(96, 64);
  const Bytes base = encode(card, 96, 64), prog = encode(card, 96, 64, JpegPixels::rgb, 90, true);
  Bytes no_dht(base.begin(), base.begin() + 2);  // the baseline JPEG without its DHT segments
  for (size_t i = 2; i < base.size();) {
    const size_t len = size_t(base[i + 2]) << 8 | base[i + 3];
    const bool scan = base[i + 1] == 0xDA;
    const auto end = scan ? base.end() : base.begin() + long(i + 2 + len);
    if (base[i + 1] != 0xC4) no_dht.insert(no_dht.end(), base.begin() + long(i), end);
    i = scan ? base.size() : i + 2 + len;
  }
  REQUIRE(no_dht.size() < base.size());
  const Bytes reference = decode(base).image.rgb;
  REQUIRE(decode(no_dht).image.rgb == reference);
  // A failed header leaves libjpeg mid-header; the next decode must not notice.
  const Bytes torn(base.begin(), base.begin() + find_marker(base, 0xDA) / 2);
  const Bytes* sequence[] = {&prog, &no_dht, &torn, &base, &prog, &no_dht};
  std::vector<std::thread> threads;
  std::vector<int> mismatches(4, 0);
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < 30; ++i) {
        const Bytes& jpeg = *sequence[(i + t) % 6];
        const Decoded d = decode(jpeg);
        const bool good = &jpeg == &torn ? d.status == DecodeStatus::truncated
                          : &jpeg == &prog ? d.status == DecodeStatus::ok
                                           : d.status == DecodeStatus::ok && d.image.rgb == reference;
        mismatches[t] += !good;
      }
    });
  for (auto& th : threads) th.join();
  CHECK(mismatches == std::vector<int>(4, 0));
}

TEST_CASE("jpeg: the encoder refuses bad arguments", "[jpeg]") {
  const Bytes px(4 * 4 * 3, 100);
  CHECK_THROWS_AS(encode_jpeg(px.data(), 4, 4, JpegPixels::rgb, 0), std::invalid_argument);
  CHECK_THROWS_AS(encode_jpeg(px.data(), 4, 4, JpegPixels::rgb, 101), std::invalid_argument);
  CHECK_THROWS_AS(encode_jpeg(px.data(), 0, 4, JpegPixels::rgb, 90), std::invalid_argument);
  CHECK_THROWS_AS(encode_jpeg(nullptr, 4, 4, JpegPixels::rgb, 90), std::invalid_argument);
  CHECK(!encode_jpeg(px.data(), 4, 4, JpegPixels::rgb, 1).empty());
}
