#include "blpa/image_index.h"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <climits>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string_view>
#include <system_error>
#include <thread>

namespace blpa::data {
namespace {

// Directory walking uses POSIX calls, not std::filesystem: LibTorch 2.11 exports a copy of
// parts of std::filesystem that can shadow the standard library's (see tests/test_support.h).
struct Entry {
  std::string name;
  bool dir;
};

std::string os_error(int err) { return std::generic_category().message(err); }

std::vector<Entry> list_dir(const std::string& dir) {
  DIR* d = ::opendir(dir.c_str());
  if (!d) throw std::runtime_error(dir + ": cannot open directory (" + os_error(errno) + ")");
  std::vector<Entry> out;
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name == "." || name == "..") continue;
    bool is_dir = e->d_type == DT_DIR;
    if (e->d_type == DT_UNKNOWN || e->d_type == DT_LNK) {  // some file systems, and symlinks
      struct stat st {};
      is_dir = ::stat((dir + "/" + name).c_str(), &st) == 0 && S_ISDIR(st.st_mode);
    }
    out.push_back({name, is_dir});
  }
  ::closedir(d);
  std::sort(out.begin(), out.end(), [](const Entry& a, const Entry& b) { return a.name < b.name; });
  return out;
}

bool is_image_name(std::string_view n) {
  const auto dot = n.rfind('.');
  if (dot == std::string_view::npos) return false;
  const std::string_view ext = n.substr(dot + 1);
  auto is = [&](std::string_view lower) {
    return ext.size() == lower.size() && std::equal(ext.begin(), ext.end(), lower.begin(), [](char a, char b) {
             return std::tolower(static_cast<unsigned char>(a)) == b;
           });
  };
  return is("jpeg") || is("jpg");
}

// Text from a file, fit for a one-line message: at most 80 characters, control bytes escaped.
std::string shown(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size() && i < 80; ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c != 0x7f) {
      out += static_cast<char>(c);
    } else {
      char hex[8];
      std::snprintf(hex, sizeof hex, "\\x%02x", c);
      out += hex;
    }
  }
  if (s.size() > 80) out += "...";
  return out;
}

// A whole decimal number: digits only (no sign, space or '+'), at most `max`.
bool parse_count(std::string_view s, int64_t max, int64_t& value) {
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
  return !s.empty() && s[0] != '-' && ec == std::errc() && end == s.data() + s.size() && value <= max;
}

// What identifies a class folder's state: its modification time and status-change time. The
// second cannot be set back by a copy that keeps times (rsync -a, cp -p, tar x restore the
// modification time after adding files), since setting the first sets it to now. (Not the
// inode: overlay and FUSE file systems may give a folder another one at each mount.)
std::string folder_state(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return "-";
  auto ns = [](const timespec& t) { return std::to_string(int64_t{t.tv_sec} * 1000000000 + t.tv_nsec); };
  return ns(st.st_mtim) + ":" + ns(st.st_ctim);
}

uint64_t fnv1a(uint64_t h, const std::string& s) {
  for (unsigned char c : s) h = (h ^ c) * 0x100000001B3ull;
  return (h ^ 0xFF) * 0x100000001B3ull;  // a separator, so ("ab","c") != ("a","bc")
}

}  // namespace

uint64_t list_hash(const ImageList& list) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (size_t i = 0; i < list.paths.size(); ++i) h = fnv1a(h, list.paths[i] + "," + std::to_string(list.labels[i]));
  return h;
}

namespace {

std::string absolute(const std::string& p) {
  char buf[PATH_MAX];
  return ::realpath(p.c_str(), buf) ? std::string(buf) : p;
}

// The cache is keyed by the folder and, for each class folder, its name and state (its
// modification and status-change times), which changes whenever an entry is added, removed
// or renamed in it, even where a copy puts the modification time back. The name starts
// with the folder's own hash, so that the lists of its earlier states can be found and removed
// (ImageNet's is some 45 MB, and each change of the tree made another).
std::string cache_prefix(const std::string& dir) {
  char name[64];
  std::snprintf(name, sizeof name, "image-index-%016llx-",
                static_cast<unsigned long long>(fnv1a(0xCBF29CE484222325ull, absolute(dir))));
  return name;
}

std::string cache_path(const std::string& cache_dir, const std::string& dir, const std::vector<std::string>& classes) {
  uint64_t h = fnv1a(0xCBF29CE484222325ull, absolute(dir));
  for (const auto& c : classes) h = fnv1a(fnv1a(h, c), folder_state(dir + "/" + c));
  char name[32];
  std::snprintf(name, sizeof name, "%016llx.txt", static_cast<unsigned long long>(h));
  return cache_dir + "/" + cache_prefix(dir) + name;
}

// Removes the cached lists of `dir` other than `kept` (its earlier states), lists named as
// before a list's name began with its folder's hash (image-index-<16 hex>.txt, which nothing
// reads any more), and temporaries of writers that died.
void remove_stale_caches(const std::string& cache_dir, const std::string& dir, const std::string& kept) {
  const std::string prefix = cache_prefix(dir), name = kept.substr(kept.rfind('/') + 1);
  auto old_format = [](const std::string& n) {
    auto hex = [](char c) { return std::isxdigit(static_cast<unsigned char>(c)) != 0; };
    return n.size() == 32 && n.rfind("image-index-", 0) == 0 && n.compare(28, 4, ".txt") == 0 &&
           std::all_of(n.begin() + 12, n.begin() + 28, hex);
  };
  auto orphan = [](const std::string& n) {  // <list>.tmp<pid> of a process that is gone
    const auto at = n.rfind(".tmp");
    if (n.rfind("image-index-", 0) != 0 || at == std::string::npos || at + 4 >= n.size()) return false;
    const long pid = std::strtol(n.c_str() + at + 4, nullptr, 10);
    return pid > 0 && ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH;
  };
  try {
    for (const auto& e : list_dir(cache_dir))
      if (!e.dir && ((e.name.rfind(prefix, 0) == 0 && e.name != name && e.name.find(".tmp") == std::string::npos) ||
                     old_format(e.name) || orphan(e.name)))
        ::unlink((cache_dir + "/" + e.name).c_str());
  } catch (const std::exception&) {  // a cache folder that cannot be listed keeps what it has
  }
}

// Format 2 also keeps what the scan reported (entries that are not images, unreadable
// images), so that a run reading the cache reports it too. An index of format 1 is scanned
// again without a warning.
constexpr const char* kIndexMagic = "blpa-image-index 2";
constexpr const char* kOlderIndex = "blpa-image-index 1";

// A cache that cannot be written is not an error (the next run scans again); returns why not,
// or "" when it was written.
std::string write_cache(const std::string& path, const ImageList& list, const ScanReport& r) {
  for (const auto* names : {&list.paths, &r.unreadable})
    for (const auto& p : *names)
      if (p.find('\n') != std::string::npos)  // no index line can hold it
        return path + ": not written (a file name holds a newline: " + p.substr(0, p.find('\n')) + "...)";
  const std::string tmp = path + ".tmp" + std::to_string(::getpid());
  {
    std::ofstream out(tmp);
    if (!out) return path + ": cannot be written (" + os_error(errno) + ")";
    out << kIndexMagic << '\n'
        << list.num_classes << ' ' << list.size() << ' ' << r.skipped << ' ' << r.unreadable.size() << '\n';
    for (int64_t i = 0; i < list.size(); ++i) out << list.labels[i] << '\t' << list.paths[i] << '\n';
    for (const auto& p : r.unreadable) {  // their labels: the class folders they are in
      const auto c = std::lower_bound(list.classes.begin(), list.classes.end(), p.substr(0, p.find('/')));
      out << 'u' << (c - list.classes.begin()) << '\t' << p << '\n';
    }
    if (!out) {
      std::remove(tmp.c_str());
      return path + ": cannot be written";
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = os_error(errno);
    std::remove(tmp.c_str());
    return path + ": cannot be written (" + why + ")";
  }
  return "";
}

// What parse_image_index says of an index of format 1 (or a missing file): no warning.
constexpr const char* kOlderIndexRead = "line 1: an index of format 1, written by an earlier blpa";

}  // namespace

std::string parse_image_index(std::istream& in, const std::vector<std::string>& classes, ImageList& out,
                              ScanReport* report) {
  std::string line;
  if (!std::getline(in, line)) return "line 1: not a blpa image index";
  if (line == kOlderIndex) return kOlderIndexRead;
  if (line != kIndexMagic) return "line 1: not a blpa image index";
  int64_t n_classes = 0, n_files = 0, n_skipped = 0, n_unreadable = 0;
  {
    std::getline(in, line);
    std::vector<std::string_view> fields;
    for (size_t at = 0; at <= line.size();) {
      const size_t space = std::min(line.find(' ', at), line.size());
      fields.push_back(std::string_view(line).substr(at, space - at));
      at = space + 1;
    }
    if (fields.size() != 4 || !parse_count(fields[0], kMaxClasses, n_classes) ||
        !parse_count(fields[1], INT64_MAX, n_files) || !parse_count(fields[2], INT64_MAX, n_skipped) ||
        !parse_count(fields[3], INT64_MAX, n_unreadable))
      return "line 2: expected '<classes> <images> <other entries> <unreadable images>'";
  }
  if (n_classes != static_cast<int64_t>(classes.size()))
    return "line 2: an index of " + std::to_string(n_classes) + " classes; the folder has " +
           std::to_string(classes.size());
  std::vector<std::string> paths, unreadable;
  std::vector<int64_t> labels;
  for (int64_t no = 3; std::getline(in, line); ++no) {
    auto at = [&] { return "line " + std::to_string(no) + ": "; };
    const bool readable = line.empty() || line[0] != 'u';  // "u<label>\t<path>": an unreadable image
    if (static_cast<int64_t>((readable ? paths : unreadable).size()) == (readable ? n_files : n_unreadable))
      return at() + "more " + (readable ? "images" : "unreadable images") + " than the " +
             std::to_string(readable ? n_files : n_unreadable) + " on line 2";
    const auto tab = line.find('\t');
    int64_t label = 0;
    if (tab == std::string::npos ||
        !parse_count(std::string_view(line).substr(!readable, tab - !readable), n_classes - 1, label))
      return at() + "expected '[u]<label below " + std::to_string(n_classes) + ">\\t<class>/<image>', got '" +
             shown(line) + "'";
    // Only what a scan writes: a file name with an image extension, directly inside the
    // folder of its label's class. No '/' in the name, so no "..", no absolute path.
    const std::string_view path = std::string_view(line).substr(tab + 1), cls = classes[label];
    const std::string_view name = path.substr(std::min(path.size(), cls.size() + 1));
    if (path.size() <= cls.size() + 1 || path.substr(0, cls.size()) != cls || path[cls.size()] != '/' ||
        name.find('/') != std::string_view::npos || name.find('\0') != std::string_view::npos ||
        !is_image_name(name))
      return at() + "'" + shown(path) + "' is not an image file directly inside class folder " + shown(cls) +
             " (label " + std::to_string(label) + ")";
    if (!readable) {
      unreadable.emplace_back(path);
      continue;
    }
    paths.emplace_back(path);
    labels.push_back(label);
  }
  if (static_cast<int64_t>(paths.size()) != n_files || static_cast<int64_t>(unreadable.size()) != n_unreadable)
    return "ends after " + std::to_string(paths.size()) + " of the " + std::to_string(n_files) + " images and " +
           std::to_string(unreadable.size()) + " of the " + std::to_string(n_unreadable) +
           " unreadable ones on line 2";
  out.paths = std::move(paths);
  out.labels = std::move(labels);
  if (report) {
    report->files = out.size();
    report->skipped = n_skipped;
    report->unreadable = std::move(unreadable);
    std::vector<bool> has(classes.size());
    for (const int64_t label : out.labels) has[static_cast<size_t>(label)] = true;
    for (size_t c = 0; c < classes.size(); ++c)
      if (!has[c]) report->empty_classes.push_back(classes[c]);
  }
  return {};
}

ImageList scan_image_folder(const std::string& dir, const std::string& cache_dir, int threads, ScanReport* report) {
  ScanReport local;
  ScanReport& r = report ? *report : local;
  r = ScanReport{};
  ImageList out;
  out.root = dir;
  std::vector<std::string> loose;  // read at every scan, cached or not: the folder's own listing
  for (const auto& e : list_dir(dir)) {
    if (e.dir) out.classes.push_back(e.name);
    else if (is_image_name(e.name)) loose.push_back(e.name);
  }
  if (out.classes.empty()) {
    const std::string images = std::to_string(loose.size()) + (loose.size() == 1 ? " image" : " images");
    throw std::runtime_error(dir + ": no class folders (expected " + dir + "/<class>/*.JPEG)" +
                             (loose.empty() ? std::string()
                                            : "; its " + images + " (first: " + loose[0] +
                                                  ") must be sorted into one folder per class"));
  }
  out.num_classes = static_cast<int64_t>(out.classes.size());
  if (out.num_classes > kMaxClasses)
    throw std::runtime_error(dir + ": " + std::to_string(out.num_classes) + " class folders, more than the limit of " +
                             std::to_string(kMaxClasses));

  const std::string cache = cache_dir.empty() ? "" : cache_path(cache_dir, dir, out.classes);
  if (!cache.empty()) {
    std::ifstream in(cache);
    ScanReport cached;
    const std::string why = in ? parse_image_index(in, out.classes, out, &cached) : kOlderIndexRead;
    // An image unreadable at the scan that can be read now (a link whose target has come, a
    // file given read permission) changes no folder's times: the folder is scanned again.
    const bool stale = std::any_of(cached.unreadable.begin(), cached.unreadable.end(),
                                   [&](const std::string& p) { return ::access((dir + "/" + p).c_str(), R_OK) == 0; });
    if (why.empty() && !stale) {
      r = std::move(cached);
      r.from_cache = true;
      r.loose = std::move(loose);
      return out;
    }
    out.paths.clear();
    out.labels.clear();
    if (why != kOlderIndexRead && !why.empty()) r.cache_refused = cache + ": " + why;
  }

  // One task per class folder; results are joined in class order, so the list does not
  // depend on the number of threads.
  struct ClassFiles {
    std::vector<std::string> files, unreadable;
    int64_t skipped = 0;
    std::string error;
  };
  std::vector<ClassFiles> per_class(out.classes.size());
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t c; (c = next++) < per_class.size();) {
      ClassFiles& f = per_class[c];
      const std::string cdir = dir + "/" + out.classes[c];
      try {
        for (const auto& e : list_dir(cdir)) {
          if (e.dir || !is_image_name(e.name)) {
            ++f.skipped;
            continue;
          }
          const std::string rel = out.classes[c] + "/" + e.name;
          (::access((dir + "/" + rel).c_str(), R_OK) == 0 ? f.files : f.unreadable).push_back(rel);
        }
      } catch (const std::exception& ex) {
        f.error = ex.what();
      }
    }
  };
  std::vector<std::thread> pool;
  for (int t = 0; t < std::max(1, threads); ++t) pool.emplace_back(work);
  for (auto& t : pool) t.join();

  for (size_t c = 0; c < per_class.size(); ++c) {
    ClassFiles& f = per_class[c];
    if (!f.error.empty()) throw std::runtime_error(f.error);
    if (f.files.empty()) r.empty_classes.push_back(out.classes[c]);
    for (auto& p : f.files) {
      out.paths.push_back(std::move(p));
      out.labels.push_back(static_cast<int64_t>(c));
    }
    r.unreadable.insert(r.unreadable.end(), f.unreadable.begin(), f.unreadable.end());
    r.skipped += f.skipped;
  }
  r.files = out.size();
  r.loose = std::move(loose);
  if (out.paths.empty()) throw std::runtime_error(dir + ": no .JPEG/.jpg images in its " + std::to_string(out.num_classes) + " class folders");
  if (!cache.empty()) {
    for (size_t slash = cache_dir.find('/', 1); slash != std::string::npos; slash = cache_dir.find('/', slash + 1))
      ::mkdir(cache_dir.substr(0, slash).c_str(), 0755);  // mkdir -p; failures show as a missing cache
    ::mkdir(cache_dir.c_str(), 0755);
    r.cache_unwritten = write_cache(cache, out, r);
    if (r.cache_unwritten.empty()) remove_stale_caches(cache_dir, dir, cache);
  }
  return out;
}

ImageList spread_subset(ImageList list, int64_t n) {
  if (n <= 0 || n >= list.size()) return list;
  std::vector<std::vector<size_t>> of_label(static_cast<size_t>(list.num_classes));
  for (size_t i = 0; i < list.paths.size(); ++i) of_label[static_cast<size_t>(list.labels[i])].push_back(i);
  std::vector<size_t> present;  // labels with entries, smallest first (water-filling)
  for (size_t c = 0; c < of_label.size(); ++c)
    if (!of_label[c].empty()) present.push_back(c);
  std::stable_sort(present.begin(), present.end(),
                   [&](size_t a, size_t b) { return of_label[a].size() < of_label[b].size(); });
  std::vector<size_t> kept;
  int64_t left = n;
  for (size_t j = 0; j < present.size(); ++j) {
    const auto& entries = of_label[present[j]];
    const auto size = static_cast<int64_t>(entries.size());
    const int64_t take = std::min(size, left / static_cast<int64_t>(present.size() - j));
    for (int64_t i = 0; i < take; ++i) kept.push_back(entries[static_cast<size_t>(i * size / take)]);
    left -= take;
  }
  std::sort(kept.begin(), kept.end());
  ImageList out;
  out.root = std::move(list.root);
  out.classes = std::move(list.classes);
  out.num_classes = list.num_classes;
  for (const size_t i : kept) {
    out.paths.push_back(std::move(list.paths[i]));
    out.labels.push_back(list.labels[i]);
  }
  return out;
}

ListLine split_list_line(std::string line, bool first) {
  if (!line.empty() && line.back() == '\r') line.pop_back();
  if (first && line.rfind("\xEF\xBB\xBF", 0) == 0) line.erase(0, 3);  // a UTF-8 byte-order mark, invisible
  ListLine l;
  if (first && (line.rfind("\xFF\xFE", 0) == 0 || line.rfind("\xFE\xFF", 0) == 0))
    l.unreadable = "is UTF-16 text (a list saved as \"Unicode\"): save it as UTF-8";
  else if (line.find('\r') != std::string::npos)
    l.unreadable = "has lines ended by a carriage return alone ('" + shown(line) +
                   "'): save the list with LF (or CRLF) line ends";
  // Indentation and trailing blanks are no part of the line, nor blanks around its comma.
  const auto trim = [](std::string& s) {
    s.erase(s.find_last_not_of(" \t") + 1);
    s.erase(0, std::min(s.size(), s.find_first_not_of(" \t")));
  };
  trim(line);
  l.ignored = line.empty() || line[0] == '#';
  const auto comma = line.rfind(',');  // paths may contain commas, labels do not
  l.has_comma = comma != std::string::npos;
  l.path = line.substr(0, comma);
  if (l.has_comma) l.label = line.substr(comma + 1);
  trim(l.path);   // "path , 3"
  trim(l.label);  // "path, 3"
  l.line = std::move(line);
  return l;
}

ImageList parse_image_list(std::istream& in, const std::string& name, const std::string& root) {
  ImageList out;
  out.root = root;
  std::string text;
  for (int64_t no = 1; std::getline(in, text); ++no) {
    const ListLine l = split_list_line(std::move(text), no == 1);
    const std::string& line = l.line;
    const std::string at = name + ":" + std::to_string(no) + ": ";
    if (!l.unreadable.empty()) throw std::runtime_error(at + l.unreadable);
    if (l.ignored) continue;
    int64_t label = 0;
    if (!l.has_comma || l.path.empty() || l.label.empty() ||
        !std::all_of(l.label.begin(), l.label.end(), [](char c) { return c >= '0' && c <= '9'; }))
      throw std::runtime_error(at + "expected 'relative/path,label' with label >= 0, got '" + shown(line) + "'");
    if (!parse_count(l.label, kMaxClasses - 1, label))
      throw std::runtime_error(at + "label " + shown(l.label) + " is above the limit of " +
                               std::to_string(kMaxClasses - 1) + " (at most " + std::to_string(kMaxClasses) +
                               " classes)");
    out.paths.push_back(l.path);
    out.labels.push_back(label);
    out.num_classes = std::max<int64_t>(out.num_classes, label + 1);
  }
  if (out.paths.empty()) throw std::runtime_error(name + ": no entries");
  return out;
}

ImageList read_image_list(const std::string& list_file, const std::string& root) {
  struct stat st {};
  if (::stat(list_file.c_str(), &st) != 0)
    throw std::runtime_error(list_file + ": cannot be opened (" + os_error(errno) + ")");
  if (!S_ISREG(st.st_mode))
    throw std::runtime_error(list_file + (S_ISDIR(st.st_mode) ? ": is a directory" : ": is not a regular file") +
                             ", not a list file");
  std::ifstream in(list_file);
  if (!in) throw std::runtime_error(list_file + ": cannot be opened (" + os_error(errno) + ")");
  std::string dir = root;
  if (dir.empty()) {
    const auto slash = list_file.rfind('/');
    dir = slash == std::string::npos ? "." : list_file.substr(0, slash);
  }
  ImageList out = parse_image_list(in, list_file, dir);
  if (in.bad()) throw std::runtime_error(list_file + ": cannot be read (" + os_error(errno) + ")");
  return out;
}

void print_scan_warnings(const ScanReport& r, const std::string& dir) {
  if (!r.cache_refused.empty())
    std::fprintf(stderr, "warning: %s; the folder was scanned again\n", r.cache_refused.c_str());
  if (!r.cache_unwritten.empty())
    std::fprintf(stderr, "warning: the scanned list of %s is not cached (%s): the next run scans it again\n",
                 dir.c_str(), r.cache_unwritten.c_str());
  if (!r.empty_classes.empty())
    std::fprintf(stderr, "warning: %s: %zu empty class folders (first: %s)\n", dir.c_str(), r.empty_classes.size(),
                 r.empty_classes[0].c_str());
  if (!r.loose.empty())  // as torchvision's ImageFolder, which reads class folders only
    std::fprintf(stderr, "warning: %s: %zu %s in the folder itself, outside any class folder, %s left out "
                 "(first: %s)\n",
                 dir.c_str(), r.loose.size(), r.loose.size() == 1 ? "image" : "images",
                 r.loose.size() == 1 ? "is" : "are", r.loose[0].c_str());
  if (!r.unreadable.empty())
    std::fprintf(stderr, "warning: %s: %zu unreadable images left out (first: %s)\n", dir.c_str(),
                 r.unreadable.size(), r.unreadable[0].c_str());
  if (r.skipped > 0)  // torchvision's ImageFolder would read a PNG among them
    std::fprintf(stderr, "warning: %s: %lld entries in class folders are not .jpg/.jpeg files (other files, or "
                 "folders) and are left out\n",
                 dir.c_str(), static_cast<long long>(r.skipped));
}

ImageNetSplits load_imagenet(const std::string& root, const std::string& cache_dir, int threads) {
  ImageNetSplits s;
  for (auto [name, list] : {std::pair{"train", &s.train}, std::pair{"val", &s.val}}) {
    ScanReport r;
    *list = scan_image_folder(root + "/" + name, cache_dir, threads, &r);
    print_scan_warnings(r, root + "/" + name);
  }
  if (s.train.classes != s.val.classes) {
    // What differs, by name (the counts may agree where a folder is named otherwise).
    auto only_in = [](const std::vector<std::string>& a, const std::vector<std::string>& b, const char* split) {
      std::vector<std::string> d;
      std::set_difference(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(d));
      if (d.empty()) return std::string();
      return "; only in " + std::string(split) + "/: " + d.front() +
             (d.size() > 1 ? " and " + std::to_string(d.size() - 1) + " more" : std::string());
    };
    throw std::runtime_error(root + ": train/ has " + std::to_string(s.train.num_classes) + " classes and val/ " +
                             std::to_string(s.val.num_classes) + ", which must be the same folders" +
                             only_in(s.train.classes, s.val.classes, "train") +
                             only_in(s.val.classes, s.train.classes, "val"));
  }
  // A class with validation images and no training ones would be scored, never trained (a
  // --val-list is refused for it too).
  std::vector<bool> trained(static_cast<size_t>(s.train.num_classes));
  for (const int64_t label : s.train.labels) trained[static_cast<size_t>(label)] = true;
  for (const int64_t label : s.val.labels)
    if (!trained[static_cast<size_t>(label)])
      throw std::runtime_error(root + ": class folder train/" + s.train.classes[static_cast<size_t>(label)] +
                               " has no images, val/" + s.val.classes[static_cast<size_t>(label)] +
                               " has some: the network would be scored on a class it was never trained on");
  return s;
}

}  // namespace blpa::data
