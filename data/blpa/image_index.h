// Lists of images: ImageNet-style folders (scanned in parallel, the result cached) and list
// files. No torch headers: the fuzz targets (tests/fuzz/) call the parsers directly.
//
// Layout: <dir>/<wnid>/*.JPEG. Class k is the k-th wnid in sorted order, as torchvision's
// ImageFolder numbers them, so labels agree with the Python ecosystem. Or a list file of
// "relative/path,label" lines.
//
// What is read from a file is checked before it is used: labels and class counts are at
// most kMaxClasses, and a cached index is used only if every path in it names an image file
// directly inside the class folder of its label, so it cannot lead the loader out of the
// data folder (a damaged or crafted index is reported and the folder scanned again).
#pragma once

#include <cstdint>
#include <istream>
#include <string>
#include <vector>

namespace blpa::data {

// The most classes a data set may have (ImageNet-21k has 21841): a label read from a file
// beyond it is an error, before the network's last layer is sized by it.
inline constexpr int64_t kMaxClasses = 100000;

struct ImageList {
  std::string root;                  // what the paths are relative to
  std::vector<std::string> paths;    // relative to root
  std::vector<int64_t> labels;       // class index of each path
  std::vector<std::string> classes;  // class names (wnids) in label order; empty for list files
  int64_t num_classes = 0;
  int64_t size() const { return static_cast<int64_t>(paths.size()); }
  // Where entry i is: its path under root, or the path itself where a list gave it absolute.
  std::string path(int64_t i) const {
    const std::string& p = paths[static_cast<size_t>(i)];
    return !p.empty() && p[0] == '/' ? p : root + "/" + p;
  }
};

struct ScanReport {
  int64_t files = 0;                       // images listed
  int64_t skipped = 0;                     // entries that are not image files (other extensions)
  std::vector<std::string> unreadable;     // image files the process cannot read (not listed)
  std::vector<std::string> empty_classes;  // class folders without images (still numbered)
  std::vector<std::string> loose;          // image files in the folder itself, outside any class (not listed)
  bool from_cache = false;
  std::string cache_refused;               // the cached index found and not used, and why ("": none)
  std::string cache_unwritten;             // the index could not be cached, and why ("": it was, or no cache)
};

// Scans <dir>/<class>/* for .JPEG/.jpeg/.jpg files, one thread per class folder (`threads`
// at a time). The result is cached in `cache_dir` (empty: no cache) under a name derived from
// the folder's path and the names, modification and status-change times of its class
// folders, so adding, removing or renaming images in any class invalidates it, even where
// the copy that did it set the modification time back. Throws when `dir` has no class
// folders, more than kMaxClasses, or no images at all.
ImageList scan_image_folder(const std::string& dir, const std::string& cache_dir, int threads, ScanReport* report);
// Prints the report's warnings on stderr (a refused or unwritten cache, empty class folders,
// unreadable images), naming `dir`, the folder scanned.
void print_scan_warnings(const ScanReport& r, const std::string& dir);

// A list file: one "relative/path,label" per line (or an absolute path; blank lines and lines whose
// first character other than a space or tab is '#' ignored), labels in [0, kMaxClasses). Throws
// with the file and line number on a malformed line or a label out of range. `root` empty: the
// paths are relative to the list's folder.
ImageList read_image_list(const std::string& list_file, const std::string& root);

// FNV-1a (64 bits, the same on every build) of a list's "path,label" entries in order: what
// fixes the data order of a run trained on it.
uint64_t list_hash(const ImageList& list);
// A list line read as blpa reads lists: the line less a UTF-8 byte-order mark when it is the
// first (`first`), a '\r' ending, its indentation and its trailing blanks, and, at its last
// comma, the path before it and the label after it (blanks around the comma dropped); `label`
// empty where the line has no comma. Shared by read_image_list and blpa-predict's --list.
// `ignored`: a blank line or a comment (its first character other than a space or tab is '#').
// `unreadable`: why the whole list cannot be read as lines, else empty: UTF-16 text (the first
// line starts with its byte-order mark: a list saved as "Unicode"), or lines ended by CR alone
// (classic Mac OS: this "line" is the whole file, which would be taken for one huge path).
// Readers throw it after the list's name (and line number) and stop.
struct ListLine {
  std::string line, path, label, unreadable;
  bool has_comma = false, ignored = false;
};
ListLine split_list_line(std::string line, bool first);

// The parser of read_image_list, on text from `in`; `name` starts every error message.
ImageList parse_image_list(std::istream& in, const std::string& name, const std::string& root);

// The parser of the index cache: fills out.paths and out.labels from `in` and returns "" if
// it is an index of a folder with these class folders, else says why not (starting with the
// line number) and leaves `out` unchanged. `report` (if given) gets what the scan that wrote
// it reported: the counts, the unreadable images and the empty class folders.
std::string parse_image_index(std::istream& in, const std::vector<std::string>& classes, ImageList& out,
                              ScanReport* report = nullptr);

// N entries of `list` spread over its classes (all of them when N >= the list's size or N <=
// 0): each label present gets N / (labels present) of them, or all of its own where it has
// fewer (the rest going to the others), taken evenly along its entries; the entries keep the
// list's order. Where the classes are the same size and N a multiple of their number, these
// are every (size / N)-th entry; a class smaller than that stride is not left out.
ImageList spread_subset(ImageList list, int64_t n);

// train and val of an ImageNet root: the two splits must name the same classes. Empty class
// folders, unreadable images and a refused index cache are reported on stderr.
struct ImageNetSplits {
  ImageList train, val;
};
ImageNetSplits load_imagenet(const std::string& root, const std::string& cache_dir, int threads);

}  // namespace blpa::data
