#include "blpa/formats.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <stdexcept>
#include <system_error>

namespace blpa::data {
namespace {

[[noreturn]] void fail(const std::string& name, const std::string& what) {
  throw std::runtime_error(name + ": " + what);
}

std::string os_error(int err) { return std::generic_category().message(err); }

struct File {
  int fd = -1;
  File() = default;
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  ~File() {
    if (fd >= 0) ::close(fd);
  }
};

// Opens a regular file and returns its size; anything else (missing, a directory, a pipe or
// a device) is an error naming it. O_NONBLOCK, so that opening a named pipe does not wait.
uint64_t open_regular(const std::string& path, File& f) {
  f.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (f.fd < 0) fail(path, errno == ENOENT ? "not found" : "cannot be opened (" + os_error(errno) + ")");
  struct stat st {};
  if (::fstat(f.fd, &st) != 0) fail(path, "cannot be read (" + os_error(errno) + ")");
  if (S_ISDIR(st.st_mode)) fail(path, "is a directory, not a file");
  if (!S_ISREG(st.st_mode)) fail(path, "is not a regular file");
  return static_cast<uint64_t>(st.st_size);
}

// The `size` bytes of a file opened by open_regular.
std::vector<uint8_t> read_all(const std::string& path, File& f, uint64_t size) {
  std::vector<uint8_t> bytes(size);
  for (size_t used = 0; used < bytes.size();) {
    const ssize_t n = ::read(f.fd, bytes.data() + used, bytes.size() - used);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail(path, "cannot be read (" + os_error(errno) + ")");
    if (n == 0) fail(path, "became shorter while it was read");
    used += static_cast<size_t>(n);
  }
  return bytes;
}

std::vector<uint8_t> read_file(const std::string& path, uint64_t max_bytes) {
  File f;
  const uint64_t size = open_regular(path, f);
  if (size > max_bytes)
    fail(path, "is " + std::to_string(size) + " bytes, more than this format allows (" + std::to_string(max_bytes) +
                   ")");
  return read_all(path, f, size);
}

uint32_t big_endian(const uint8_t* p) {
  return uint32_t{p[0]} << 24 | uint32_t{p[1]} << 16 | uint32_t{p[2]} << 8 | p[3];
}

bool gzip_magic(const uint8_t* p, size_t size) { return size >= 2 && p[0] == 0x1f && p[1] == 0x8b; }

// The bytes of data that may be gzip-compressed, handed out in pieces, so that what is kept
// grows with the data actually there. Plain data passes through unchanged.
class Unzipped {
 public:
  Unzipped(const uint8_t* data, size_t size, const std::string& name)
      : data_(data), size_(size), name_(name), gzip_(gzip_magic(data, size)) {
    if (gzip_ && inflateInit2(&z_, 16 + MAX_WBITS) != Z_OK) fail(name_, "zlib cannot be initialised");
  }
  ~Unzipped() {
    if (gzip_) inflateEnd(&z_);
  }
  Unzipped(const Unzipped&) = delete;
  Unzipped& operator=(const Unzipped&) = delete;

  // Appends up to n bytes to `out`; returns how many (fewer only at the end of the data).
  size_t read(size_t n, std::vector<uint8_t>& out) {
    if (!gzip_) {
      const size_t k = std::min(n, size_ - pos_);
      out.insert(out.end(), data_ + pos_, data_ + pos_ + k);
      pos_ += k;
      return k;
    }
    const size_t start = out.size();
    out.resize(start + n);
    size_t got = 0;
    while (got < n) {
      if (member_ended_) {  // more data must be another gzip member
        if (pos_ == size_) break;
        if (!gzip_magic(data_ + pos_, size_ - pos_)) fail(name_, "data after the end of its gzip stream");
        inflateReset(&z_);
        member_ended_ = false;
      }
      constexpr size_t kMaxStep = size_t{1} << 30;  // zlib counts in 32-bit uInt
      z_.next_in = const_cast<Bytef*>(data_ + pos_);
      z_.avail_in = static_cast<uInt>(std::min(size_ - pos_, kMaxStep));
      z_.next_out = out.data() + start + got;
      z_.avail_out = static_cast<uInt>(std::min(n - got, kMaxStep));
      const uInt in_before = z_.avail_in, out_before = z_.avail_out;
      const int rc = inflate(&z_, Z_NO_FLUSH);
      pos_ += in_before - z_.avail_in;
      got += out_before - z_.avail_out;
      if (rc == Z_STREAM_END)
        member_ended_ = true;
      else if (rc == Z_BUF_ERROR && pos_ == size_)
        fail(name_, "truncated gzip data");
      else if (rc != Z_OK)
        fail(name_, std::string("corrupt gzip data (") + (z_.msg ? z_.msg : zError(rc)) + ")");
    }
    out.resize(start + got);
    return got;
  }

 private:
  const uint8_t* data_;
  size_t size_, pos_ = 0;
  const std::string& name_;
  const bool gzip_;
  bool member_ended_ = false;
  z_stream z_{};
};

// Exactly `bytes` bytes of payload after a header that announced them as `header`.
void read_payload(Unzipped& in, uint64_t bytes, std::vector<uint8_t>& out, const std::string& name,
                  const std::string& header) {
  constexpr uint64_t kPiece = 1 << 16;
  while (out.size() < bytes) {
    const size_t want = static_cast<size_t>(std::min(kPiece, bytes - out.size()));
    if (in.read(want, out) < want)
      fail(name, "size does not match its header (" + header + "): the data ends after " +
                     std::to_string(out.size()) + " of " + std::to_string(bytes) + " bytes");
  }
  std::vector<uint8_t> more;
  if (in.read(1, more) != 0)
    fail(name, "size does not match its header (" + header + "): more than " + std::to_string(bytes) +
                   " bytes follow it");
}

}  // namespace

void parse_cifar(const uint8_t* data, size_t size, const CifarFormat& format, const std::string& name,
                 RawImages& out) {
  const size_t record = static_cast<size_t>(format.label_bytes + kCifarPixels);
  if (size == 0 || size % record != 0)
    fail(name, "size " + std::to_string(size) + " is not a whole number of " + std::to_string(record) +
                   "-byte records (truncated, or not the CIFAR binary version?)");
  out.channels = 3;
  out.height = out.width = 32;
  const size_t n = size / record;
  for (size_t i = 0; i < n; ++i) {
    const uint8_t* r = data + i * record;
    const int64_t label = r[format.label_index];
    if (label >= format.num_classes)
      fail(name, "record " + std::to_string(i) + " has label " + std::to_string(label) + ", outside [0, " +
                     std::to_string(format.num_classes) + ")");
    out.labels.push_back(label);
    out.pixels.insert(out.pixels.end(), r + format.label_bytes, r + record);
  }
}

void read_cifar_file(const std::string& path, const CifarFormat& format, int64_t records, RawImages& out) {
  File f;
  const uint64_t size = open_regular(path, f);
  const uint64_t record = static_cast<uint64_t>(format.label_bytes + kCifarPixels);
  if (size == 0 || size % record != 0)
    fail(path, "size " + std::to_string(size) + " is not a whole number of " + std::to_string(record) +
                   "-byte records (truncated, or not the CIFAR binary version?)");
  if (size / record != static_cast<uint64_t>(records))
    fail(path, "has " + std::to_string(size / record) + " records, expected " + std::to_string(records));
  const std::vector<uint8_t> bytes = read_all(path, f, size);
  parse_cifar(bytes.data(), bytes.size(), format, path, out);
}

RawImages parse_idx_images(const uint8_t* data, size_t size, const std::string& name) {
  Unzipped in(data, size, name);
  std::vector<uint8_t> h;
  if (in.read(16, h) < 16) fail(name, "too short for an IDX image header");
  if (big_endian(h.data()) != 0x803)
    fail(name, "wrong magic number (expected 0x00000803, unsigned bytes, 3 dims)");
  const uint32_t n = big_endian(h.data() + 4), rows = big_endian(h.data() + 8), cols = big_endian(h.data() + 12);
  const std::string header = std::to_string(n) + " images of " + std::to_string(rows) + "x" + std::to_string(cols);
  if (n == 0) fail(name, "holds no images (its header says 0)");
  if (rows == 0 || cols == 0 || rows > kMaxIdxSide || cols > kMaxIdxSide)
    fail(name, "its header's image size " + std::to_string(rows) + "x" + std::to_string(cols) + " is outside 1.." +
                   std::to_string(kMaxIdxSide));
  const uint64_t bytes = uint64_t{n} * rows * cols;  // rows * cols <= 2^32 and n < 2^32: no overflow
  if (bytes > kMaxIdxBytes)
    fail(name, "its header (" + header + ") asks for " + std::to_string(bytes) + " bytes, more than the limit of " +
                   std::to_string(kMaxIdxBytes));
  RawImages out;
  out.channels = 1;
  out.height = rows;
  out.width = cols;
  read_payload(in, bytes, out.pixels, name, header);
  return out;
}

std::vector<int64_t> parse_idx_labels(const uint8_t* data, size_t size, const std::string& name,
                                      int64_t num_classes) {
  Unzipped in(data, size, name);
  std::vector<uint8_t> h;
  if (in.read(8, h) < 8) fail(name, "too short for an IDX label header");
  if (big_endian(h.data()) != 0x801) fail(name, "wrong magic number (expected 0x00000801, unsigned bytes, 1 dim)");
  const uint32_t n = big_endian(h.data() + 4);  // < 2^32 = kMaxIdxBytes
  if (n == 0) fail(name, "holds no labels (its header says 0)");
  std::vector<uint8_t> bytes;
  read_payload(in, n, bytes, name, std::to_string(n) + " labels");
  std::vector<int64_t> labels(bytes.begin(), bytes.end());
  for (size_t i = 0; i < labels.size(); ++i)
    if (labels[i] >= num_classes)
      fail(name, "label " + std::to_string(i) + " is " + std::to_string(labels[i]) + ", outside [0, " +
                     std::to_string(num_classes) + ")");
  return labels;
}

RawImages read_idx_files(const std::string& images_path, const std::string& labels_path, int64_t num_classes) {
  // A compressed file is at most a little larger than its data (deflate's stored blocks add
  // 5 bytes per 64 KiB).
  constexpr uint64_t kMaxFile = kMaxIdxBytes + kMaxIdxBytes / 1024 + 1024;
  const std::vector<uint8_t> img = read_file(images_path, kMaxFile);
  RawImages out = parse_idx_images(img.data(), img.size(), images_path);
  const std::vector<uint8_t> lab = read_file(labels_path, kMaxFile);
  out.labels = parse_idx_labels(lab.data(), lab.size(), labels_path, num_classes);
  const uint64_t n = out.pixels.size() / static_cast<uint64_t>(out.height * out.width);
  if (out.labels.size() != n)
    fail(labels_path, "has " + std::to_string(out.labels.size()) + " labels but " + images_path + " has " +
                          std::to_string(n) + " images");
  return out;
}

std::string idx_file(const std::string& dir, const std::string& base) {
  const std::string plain = dir.empty() || dir.back() == '/' ? dir + base : dir + "/" + base;
  struct stat st {};
  return ::stat(plain.c_str(), &st) == 0 ? plain : plain + ".gz";
}

double idx_mean_pixel(const std::string& images_path, int64_t images) {
  gzFile f = gzopen(images_path.c_str(), "rb");  // reads a plain file as it is
  if (!f) return std::nan("");
  uint8_t header[16];
  double mean = std::nan("");
  if (gzread(f, header, sizeof header) == sizeof header && header[0] == 0 && header[1] == 0 && header[2] == 8 &&
      header[3] == 3) {
    std::vector<uint8_t> pixels(static_cast<size_t>(std::clamp<int64_t>(images, 1, 10000)) * 784);
    const int got = gzread(f, pixels.data(), static_cast<unsigned>(pixels.size()));
    if (got > 0) {
      uint64_t sum = 0;
      for (int i = 0; i < got; ++i) sum += pixels[static_cast<size_t>(i)];
      mean = static_cast<double>(sum) / got;
    }
  }
  gzclose(f);
  return mean;
}

}  // namespace blpa::data
