// JPEG decoding (and, for tests and benchmarks, encoding) through libjpeg-turbo's TurboJPEG
// API. Standard library only -- no torch -- so it compiles fast and is usable on its own.
//
// Thread safety: every function may be called from any number of threads at once. Each call
// uses a TurboJPEG handle of its own (handles are not thread-safe, and jpeg.cpp says why they
// are not kept per thread either), so a decode depends on its bytes alone.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace blpa::data {

// 8-bit RGB, rows top to bottom, pixels interleaved R,G,B (HWC).
struct Image {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;  // width * height * 3
};

// unreadable: the file could not be read (missing, a folder, no permission), before decoding.
enum class DecodeStatus { ok, empty, not_jpeg, png, corrupt, truncated, too_large, unreadable };
const char* to_string(DecodeStatus s);

// Decoding refuses JPEGs whose own (unscaled) size is above this many pixels, before
// allocating anything: libjpeg keeps a whole-image coefficient buffer for progressive JPEGs
// even when it scales the output down, so the full size is what costs memory (about 1.5 GB
// for a 16384x16384 progressive JPEG, per worker). The limit is PIL's: Image.open raises
// DecompressionBombError above twice its MAX_IMAGE_PIXELS (89,478,485), so a torchvision
// pipeline refuses the same images.
inline constexpr size_t kMaxJpegPixels = 2 * size_t{89'478'485};
// decode_jpeg_file refuses files above this many bytes before reading them (a JPEG of
// kMaxJpegPixels at quality 100 takes a few hundred MB).
inline constexpr uint64_t kMaxJpegBytes = uint64_t{1} << 30;

struct Decoded {
  Image image;  // empty unless status is ok
  DecodeStatus status = DecodeStatus::ok;
  std::string message;                  // why it failed, for a warning (empty when ok)
  int full_width = 0, full_height = 0;  // the JPEG's own size (0 if the header could not be read)
  int scale_num = 1, scale_denom = 1;   // the DCT scaling factor used
};

// Decodes JPEG bytes to RGB. Never throws.
//
// min_short_side > 0 uses libjpeg's DCT-domain downscaling: the smallest of TurboJPEG's scaling
// factors <= 1 (1/8, 1/4, 3/8, ..., 7/8, 1) whose scaled shorter side is still >= min_short_side,
// so a 4000x3000 photo asked for >= 256 decodes at 1/8 = 500x375, far faster than at full size.
// An image already smaller than min_short_side decodes at full size (no upscaling). 0: full size.
//
// Grayscale JPEGs come out as R = G = B. CMYK and YCCK JPEGs carry an Adobe APP14 marker and,
// as Photoshop writes them (a few ImageNet training images among them), hold *inverted* inks: a
// stored byte c means ink 1 - c/255; libjpeg hands the stored bytes over untouched. They are
// converted with R = c*k/255, G = m*k/255, B = y*k/255 (rounded) on the stored bytes, i.e.
// (1 - C)(1 - K) on inks: no colour management, the same formula as libjpeg-turbo's own
// cmyk_to_rgb and, to +-1, PIL's convert("RGB") (torchvision's ImageNet pipeline), so pixels
// match those tools. (A 4-channel JPEG without the Adobe marker is rare; it gets the same
// formula, where PIL would read its bytes as non-inverted inks.)
//
// Failures: zero bytes -> empty; PNG signature -> png; anything else without a JPEG SOI
// marker -> not_jpeg; more than kMaxJpegPixels -> too_large (also if allocation fails); a JPEG
// whose data ends early -> truncated (even if only the final EOI marker is missing: libjpeg
// warns then too); any other libjpeg error *or warning* -> corrupt, so a partly grey image is
// never returned as ok.
Decoded decode_jpeg(const uint8_t* data, size_t size, int min_short_side = 0) noexcept;

// Reads the file and decodes it. An unreadable file, or anything but a regular file, gets
// status unreadable with the path and the reason in message; a file above kMaxJpegBytes
// too_large. Never throws.
Decoded decode_jpeg_file(const std::string& path, int min_short_side = 0) noexcept;

enum class JpegPixels { rgb, gray, cmyk };

// Encoder, for tests and for benchmarks that generate ImageNet-sized JPEGs. `pixels` are
// interleaved rows top to bottom (3 bytes a pixel for rgb, 1 for gray, 4 for cmyk); quality
// 1..100; 4:2:0 chroma subsampling for rgb and cmyk, none for gray; accurate (islow) DCT.
// cmyk bytes are written exactly as given, as a YCCK JPEG with an Adobe marker, which is how
// TurboJPEG writes TJPF_CMYK: pass *inverted* inks (255 = no ink) to get the JPEG a
// Photoshop-style writer would produce (see decode_jpeg). Throws std::invalid_argument for bad
// arguments and std::runtime_error with TurboJPEG's message if compression fails.
std::vector<uint8_t> encode_jpeg(const uint8_t* pixels, int width, int height, JpegPixels format, int quality,
                                 bool progressive = false);

}  // namespace blpa::data
