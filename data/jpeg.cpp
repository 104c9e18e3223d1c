#include "blpa/jpeg.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <turbojpeg.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <system_error>

namespace blpa::data {
namespace {

// TurboJPEG takes sizes as unsigned long; on LP64 it holds any size_t.
static_assert(sizeof(unsigned long) >= sizeof(size_t));

// A fresh TurboJPEG handle for every call, not one per thread: a handle keeps state from image
// to image, and in TurboJPEG 2.1 that state leaks. Measured here: a failed tjDecompressHeader3
// leaves the decompressor half-way through a header, so valid JPEGs then fail ("Bogus Huffman
// table definition"); a JPEG without Huffman tables (MJPEG style, legal: the standard tables
// apply) decodes with the previous image's tables; a baseline encode after a progressive one
// writes a corrupt JPEG. A handle costs ~0.13 us to create and destroy, against ~100 us for
// decoding even a 500x375 JPEG at 1/4 scale, and a per-call handle is trivially thread-safe.
using Handle = std::unique_ptr<void, int (*)(tjhandle)>;

Handle new_handle(tjhandle (*init)()) { return Handle(init(), tjDestroy); }

std::string tj_message(tjhandle h) {
  const char* s = tjGetErrorStr2(h);
  return s && *s ? s : "unknown TurboJPEG error";
}

Decoded failure(Decoded d, DecodeStatus status, std::string message) {
  d.image = Image{};
  d.status = status;
  d.message = std::move(message);
  return d;
}

// Cheap checks on the first bytes, so that other formats get a useful status and message.
DecodeStatus sniff(const uint8_t* data, size_t size) {
  static const uint8_t png[] = {0x89, 'P', 'N', 'G'};
  if (size == 0 || !data) return DecodeStatus::empty;
  if (size >= sizeof png && std::memcmp(data, png, sizeof png) == 0) return DecodeStatus::png;
  if (size < 2 || data[0] != 0xFF || data[1] != 0xD8) return DecodeStatus::not_jpeg;
  return DecodeStatus::ok;
}

// libjpeg's memory source reports running out of data as this warning (JWRN_JPEG_EOF).
bool ran_out_of_data(const std::string& message) {
  return message.find("Premature end of JPEG file") != std::string::npos;
}

// Whether the data ends inside the marker segments before the first scan. A failed header read
// cannot tell us: libjpeg's "premature end" warning is overwritten by whatever error the fake
// EOI it then inserts causes ("Bogus Huffman table definition", ...).
bool ends_before_scan(const uint8_t* data, size_t size) {
  size_t i = 2;  // after SOI
  for (;;) {
    if (i < size && data[i] != 0xFF) return false;  // no marker where one belongs: damaged
    while (i < size && data[i] == 0xFF) ++i;        // fill bytes
    if (i >= size) return true;
    const uint8_t m = data[i++];
    if (m == 0xDA || m == 0xD9 || m == 0x00) return false;  // a scan, EOI, or not a marker
    if ((m >= 0xD0 && m <= 0xD8) || m == 0x01) continue;    // markers without a length
    if (size - i < 2) return true;
    const size_t length = size_t(data[i]) << 8 | data[i + 1];  // counts its own two bytes
    if (length < 2) return false;
    if (size - i < length) return true;
    i += length;
  }
}

struct Header {
  int width = 0, height = 0, subsamp = -1, colorspace = -1;
};

// TurboJPEG 2.1 fails tjDecompressHeader3 for chroma sampling factors outside its TJSAMP list
// (4:1:0, for one) although libjpeg decodes them. It fills in the outputs before failing, and
// tjDecompress2 never asks for the subsampling, so that one error is ignored.
bool unusual_subsampling(tjhandle h, const Header& hd, const std::string& message) {
  return tjGetErrorCode(h) == TJERR_FATAL && message.find("subsampling") != std::string::npos &&
         hd.width > 0 && hd.height > 0 && hd.colorspace >= 0;
}

// Fills `hd`; returns why the header is unusable, or "" if it is fine.
std::string read_header(tjhandle h, const uint8_t* data, size_t size, Header& hd) {
  const int rc = tjDecompressHeader3(h, data, size, &hd.width, &hd.height, &hd.subsamp, &hd.colorspace);
  if (rc != 0) {
    std::string message = tj_message(h);
    return unusual_subsampling(h, hd, message) ? std::string{} : message;
  }
  // Data that ends (or reaches EOI) before a frame header is taken by TurboJPEG 2.1 for a
  // tables-only datastream: success, with the outputs left untouched.
  if (hd.width < 1 || hd.height < 1)
    return tjGetErrorCode(h) == TJERR_WARNING ? tj_message(h) : "no frame header before EOI";
  return {};
}

struct Scale {
  int num = 1, denom = 1, width = 0, height = 0;
};

// The smallest factor <= 1 that keeps the shorter side >= min_short. tjDecompress2 picks the
// first factor of its list (largest first) whose output fits the size asked for, so among
// factors giving the same size the largest is kept: that is the one libjpeg will use.
Scale choose_scale(int width, int height, int min_short) {
  Scale best{1, 1, width, height};
  int n = 0;
  const tjscalingfactor* sf = tjGetScalingFactors(&n);
  if (min_short <= 0 || !sf) return best;
  for (int i = 0; i < n; ++i) {
    if (sf[i].num > sf[i].denom) continue;
    const int w = TJSCALED(width, sf[i]), h = TJSCALED(height, sf[i]);
    if (std::min(w, h) >= min_short && size_t(w) * size_t(h) < size_t(best.width) * size_t(best.height))
      best = {sf[i].num, sf[i].denom, w, h};
  }
  return best;
}

// Stored Adobe CMYK bytes are inverted inks (see jpeg.h), so R = (1 - C)(1 - K) = c*k/255.
// (x + 127) / 255 rounds x / 255 to nearest, as PIL's MULDIV255 does.
std::vector<uint8_t> cmyk_to_rgb(const std::vector<uint8_t>& cmyk) {
  std::vector<uint8_t> rgb(cmyk.size() / 4 * 3);
  for (size_t i = 0, j = 0; i < cmyk.size(); i += 4, j += 3) {
    const unsigned k = cmyk[i + 3];
    for (size_t c = 0; c < 3; ++c) rgb[j + c] = static_cast<uint8_t>((cmyk[i + c] * k + 127) / 255);
  }
  return rgb;
}

bool is_cmyk(int colorspace) { return colorspace == TJCS_CMYK || colorspace == TJCS_YCCK; }

// libjpeg treats damaged or missing entropy data as a warning and fills the rest with grey;
// TurboJPEG 2.1's tjDecompress2 already returns -1 after any warning, and STOPONWARNING makes it
// stop at the first one instead of decoding garbage to the end. LIMITSCANS refuses progressive
// JPEGs with absurd scan counts (a known denial-of-service pattern).
constexpr int kDecodeFlags = TJFLAG_STOPONWARNING | TJFLAG_LIMITSCANS | TJFLAG_ACCURATEDCT;

Decoded decode_checked(const uint8_t* data, size_t size, int min_short_side) {
  Decoded d;
  const Handle handle = new_handle(tjInitDecompress);
  tjhandle h = handle.get();
  if (!h) return failure(std::move(d), DecodeStatus::corrupt, "tjInitDecompress: " + tj_message(nullptr));
  Header hd;
  if (std::string err = read_header(h, data, size, hd); !err.empty())
    return failure(std::move(d), ends_before_scan(data, size) ? DecodeStatus::truncated : DecodeStatus::corrupt, err);
  d.full_width = hd.width;
  d.full_height = hd.height;
  if (size_t(hd.width) * size_t(hd.height) > kMaxJpegPixels)
    return failure(std::move(d), DecodeStatus::too_large,
                   std::to_string(hd.width) + "x" + std::to_string(hd.height) + " exceeds the limit of " +
                       std::to_string(kMaxJpegPixels) + " pixels (PIL's, as in torchvision)");
  const Scale s = choose_scale(hd.width, hd.height, min_short_side);
  d.scale_num = s.num;
  d.scale_denom = s.denom;
  const bool cmyk = is_cmyk(hd.colorspace);
  std::vector<uint8_t> pixels(size_t(s.width) * size_t(s.height) * (cmyk ? 4 : 3));
  const int pf = cmyk ? TJPF_CMYK : TJPF_RGB;
  if (tjDecompress2(h, data, size, pixels.data(), s.width, 0, s.height, pf, kDecodeFlags) != 0) {
    std::string err = tj_message(h);
    return failure(std::move(d), ran_out_of_data(err) ? DecodeStatus::truncated : DecodeStatus::corrupt, err);
  }
  d.image = Image{s.width, s.height, cmyk ? cmyk_to_rgb(pixels) : std::move(pixels)};
  return d;
}

// Reads a whole file; on failure returns false with the path and the reason in `error`, and
// `status` too_large for a file above kMaxJpegBytes (refused before anything is allocated).
// Only regular files: O_NONBLOCK, so that opening a named pipe does not wait for a writer.
bool read_file(const std::string& path, std::vector<uint8_t>& bytes, std::string& error, DecodeStatus& status) {
  status = DecodeStatus::unreadable;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  struct stat st {};
  bool ok = fd >= 0 && ::fstat(fd, &st) == 0;
  if (ok && !S_ISREG(st.st_mode)) {
    error = "cannot read " + path + ": " +
            (S_ISDIR(st.st_mode) ? std::generic_category().message(EISDIR) : std::string("not a regular file"));
    ::close(fd);
    return false;
  }
  if (ok && uint64_t(st.st_size) > kMaxJpegBytes) {
    status = DecodeStatus::too_large;
    error = path + ": " + std::to_string(st.st_size) + " bytes, more than the limit of " +
            std::to_string(kMaxJpegBytes);
    ::close(fd);
    return false;
  }
  // One byte more than the file's size, so that the read that sees EOF needs no growth.
  if (ok) bytes.resize(size_t(std::max<off_t>(st.st_size, 0)) + 1);
  size_t used = 0;
  while (ok) {
    if (used == bytes.size()) {  // the file grew since fstat
      if (used > kMaxJpegBytes) {
        status = DecodeStatus::too_large;
        error = path + ": more than the limit of " + std::to_string(kMaxJpegBytes) + " bytes";
        ::close(fd);
        return false;
      }
      bytes.resize(2 * used);
    }
    const ssize_t n = ::read(fd, bytes.data() + used, bytes.size() - used);
    if (n == 0) break;
    if (n > 0) used += size_t(n);
    ok = n > 0 || errno == EINTR;
  }
  bytes.resize(used);
  if (!ok) error = "cannot read " + path + ": " + std::generic_category().message(errno);
  if (fd >= 0) ::close(fd);
  return ok;
}

}  // namespace

const char* to_string(DecodeStatus s) {
  switch (s) {
    case DecodeStatus::ok: return "ok";
    case DecodeStatus::empty: return "empty";
    case DecodeStatus::not_jpeg: return "not_jpeg";
    case DecodeStatus::png: return "png";
    case DecodeStatus::corrupt: return "corrupt";
    case DecodeStatus::truncated: return "truncated";
    case DecodeStatus::too_large: return "too_large";
    case DecodeStatus::unreadable: return "unreadable";
  }
  return "unknown";
}

Decoded decode_jpeg(const uint8_t* data, size_t size, int min_short_side) noexcept {
  switch (sniff(data, size)) {
    case DecodeStatus::empty: return failure({}, DecodeStatus::empty, "no data");
    case DecodeStatus::png: return failure({}, DecodeStatus::png, "PNG data, not JPEG");
    case DecodeStatus::not_jpeg: return failure({}, DecodeStatus::not_jpeg, "no JPEG SOI marker (FF D8) at the start");
    default: break;
  }
  try {
    return decode_checked(data, size, min_short_side);
  } catch (const std::bad_alloc&) {
    return failure({}, DecodeStatus::too_large, "out of memory");
  } catch (const std::exception& e) {
    return failure({}, DecodeStatus::corrupt, e.what());
  }
}

Decoded decode_jpeg_file(const std::string& path, int min_short_side) noexcept {
  try {
    std::vector<uint8_t> bytes;
    std::string error;
    DecodeStatus status;
    if (!read_file(path, bytes, error, status)) return failure({}, status, error);
    return decode_jpeg(bytes.data(), bytes.size(), min_short_side);
  } catch (const std::exception& e) {  // bad_alloc for a huge file
    return failure({}, DecodeStatus::corrupt, "cannot read " + path + ": " + e.what());
  }
}

std::vector<uint8_t> encode_jpeg(const uint8_t* pixels, int width, int height, JpegPixels format, int quality,
                                 bool progressive) {
  if (!pixels || width <= 0 || height <= 0 || quality < 1 || quality > 100)
    throw std::invalid_argument("encode_jpeg: need pixels, a positive size and quality in 1..100");
  const Handle handle = new_handle(tjInitCompress);
  tjhandle h = handle.get();
  if (!h) throw std::runtime_error("tjInitCompress: " + tj_message(nullptr));
  const int pf = format == JpegPixels::rgb ? TJPF_RGB : format == JpegPixels::gray ? TJPF_GRAY : TJPF_CMYK;
  const int samp = format == JpegPixels::gray ? TJSAMP_GRAY : TJSAMP_420;
  const int flags = TJFLAG_ACCURATEDCT | (progressive ? TJFLAG_PROGRESSIVE : 0);
  unsigned char* out = nullptr;
  unsigned long out_size = 0;
  const int rc = tjCompress2(h, pixels, width, 0, height, pf, &out, &out_size, samp, quality, flags);
  std::unique_ptr<unsigned char, void (*)(unsigned char*)> owned(out, tjFree);
  if (rc != 0) throw std::runtime_error("tjCompress2: " + tj_message(h));
  return std::vector<uint8_t>(out, out + out_size);
}

}  // namespace blpa::data
