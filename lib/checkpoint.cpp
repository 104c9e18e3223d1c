#include "blpa/checkpoint.h"

#include <caffe2/serialize/inline_container.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <torch/csrc/jit/serialization/export.h>
#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/csrc/jit/serialization/pickler.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <mutex>
#include <optional>
#include <sstream>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "blpa/image_index.h"  // kMaxClasses

namespace blpa {
namespace {

namespace fs = std::filesystem;
constexpr int64_t kCheckpointFormat = 1;
// Beyond every network blpa trains (1 or 3 input channels; ResNet-1001 is the paper's deepest).
constexpr int64_t kMaxInChannels = 16, kMaxDepth = 10000;

std::string reason(int err) { return std::strerror(err); }

// The first line of an error's text that says something (TorchScript's begin with a newline).
std::string first_line(const std::string& text) {
  const size_t from = std::min(text.find_first_not_of(" \n"), text.size());
  return text.substr(from, text.find('\n', from) - from);
}

// ---- zip reading, for the CRC check -----------------------------------------------------------

struct File {
  int fd = -1;
  int64_t size = 0;
  std::string path;
  explicit File(const std::string& p) : path(p) {
    fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw CheckpointError(path + ": cannot be read (" + reason(errno) + ")");
    struct stat st{};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      throw CheckpointError(path + ": not a regular file");
    }
    size = st.st_size;
  }
  ~File() { ::close(fd); }
  [[noreturn]] void damaged(const std::string& what) const {
    throw CheckpointError(path + " is damaged or truncated: " + what);
  }
  void read(int64_t offset, void* out, int64_t n) const {
    if (offset < 0 || n < 0 || offset > size || n > size - offset) damaged("a record points past the end of the file");
    auto* p = static_cast<char*>(out);
    while (n > 0) {
      const ssize_t got = ::pread(fd, p, static_cast<size_t>(n), offset);
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) throw CheckpointError(path + ": read failed (" + (got < 0 ? reason(errno) : "end of file") + ")");
      p += got, offset += got, n -= got;
    }
  }
};

uint64_t le(const unsigned char* p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = v << 8 | p[i];
  return v;
}

struct Inflater {  // raw deflate, as zip records hold it
  z_stream s{};
  Inflater() {
    if (inflateInit2(&s, -MAX_WBITS) != Z_OK) throw CheckpointError("zlib cannot start");
  }
  ~Inflater() { inflateEnd(&s); }
  Inflater(const Inflater&) = delete;
  Inflater& operator=(const Inflater&) = delete;
};

constexpr uint32_t kLocal = 0x04034b50, kCentral = 0x02014b50, kEnd = 0x06054b50, kEnd64 = 0x06064b50,
                   kLocator64 = 0x07064b50;
// LibTorch reads a record whole into memory. It deflates only its TorchScript code, a few KB
// in a checkpoint, and the pickles are small (a ResNet-1001's data.pkl: 847 KB; the deepest
// network blpa builds, of depth 10,000, about ten times that). Either beyond this size is
// refused before anything allocates it; the tensors have no bound but the file's size.
constexpr uint64_t kMaxParsed = uint64_t{16} << 20;

std::string lower(std::string text) {
  for (char& ch : text) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return text;
}

// LibTorch's reader finds records by name whatever their case (miniz), so names are compared
// in lower case: a "data.PKL" is read as data.pkl.
bool ends_with(const std::string& name, std::string_view tail) {
  const std::string n = lower(name);
  return n.size() >= tail.size() && n.compare(n.size() - tail.size(), tail.size(), tail) == 0;
}
bool is_pickle(const std::string& name) { return ends_with(name, "pkl"); }
bool is_code(const std::string& name) { return ends_with(name, ".py"); }  // TorchScript's, read by the importer

// The bytes of one element of a storage class's type ("FloatStorage": 4), 0 for no such class.
int64_t storage_element_size(std::string_view cls) {
#define BLPA_STORAGE_CLASS(_, name) \
  if (cls == #name "Storage") return static_cast<int64_t>(c10::elementSize(c10::ScalarType::name));
  AT_FORALL_SCALAR_TYPES_WITH_COMPLEX_AND_QINTS(BLPA_STORAGE_CLASS)
#undef BLPA_STORAGE_CLASS
  return 0;
}

// What one opcode pushed, as far as the walk needs it.
struct Pushed {
  enum Kind : uint8_t { kOther, kString, kInt, kStorageType, kGlobal } kind = kOther;
  uint32_t at = 0, length = 0;  // kString: its bytes in the pickle
  int64_t number = 0;           // kInt: the value; kStorageType: the bytes of an element
  uint32_t box = 0;             // a list, dict, tuple or call's result: its entry in the walk's boxes
};

// A container's nesting: LibTorch frees nested IValues recursively (a pickle of 200 KB that
// nested a tuple 200,000 deep overflowed blpa-eval's stack). `sealed`: placed in another, or
// made by a call; adding to it then would deepen the containers that hold it unseen.
struct Box {
  int depth = 0;
  bool sealed = false;
};
constexpr int kMaxNesting = 32;  // blpa's checkpoints nest 7 deep
// Values on the stack or in the memo at once: ResNet-1001's data.pkl holds 6,044 and 33,442,
// a depth of 10,000 (the deepest blpa builds) about ten times that. Bounds the walk's memory.
constexpr size_t kMaxValues = size_t{1} << 21;

// The module classes LibTorch writes: "__torch__.Module", "__torch__.___torch_mangle_<n>.Module"
// (the mangle: how TorchScript tells classes of one name apart).
bool module_type(std::string_view s) {
  constexpr std::string_view head = "__torch__.", mangle = "___torch_mangle_", tail = "Module";
  if (s.substr(0, head.size()) != head) return false;
  s.remove_prefix(head.size());
  if (s.substr(0, mangle.size()) == mangle) {
    s.remove_prefix(mangle.size());
    size_t n = 0;
    while (n < s.size() && n < 9 && s[n] >= '0' && s[n] <= '9') ++n;
    if (n == 0 || n >= s.size() || s[n] != '.') return false;
    s.remove_prefix(n + 1);
  }
  return s == tail;
}

// The globals that blpa's checkpoints call, and what LibTorch's unpickler does for each
// (unpickler.cpp, readGlobal): pop the argument and push one value. Nothing else is admitted:
// a TorchScript custom class (__torch__.torch.classes.*) would run its C++ __setstate__ on
// the pickle's values (one crashed blpa-eval), restore_type_tag parses a type name recursively.
bool callable_global(const std::string& module, const std::string& cls) {
  return (module == "torch._utils" && cls == "_rebuild_tensor_v2") ||
         (module == "torch.jit._pickle" && (cls == "build_intlist" || cls == "build_doublelist")) ||
         (module == "collections" && cls == "OrderedDict") || (cls == "Module" && module_type(module + ".Module"));
}

// LibTorch's unpickler trusts what a pickle says. It allocates a string's length or a memo
// index before it finds that the bytes are not there (a BINUNICODE of 4 GB in a record of 1
// KB: 4.3 GB of memory for blpa-eval to refuse it, found by fuzzing), it makes a storage of
// the elements the pickle names over the record that holds them, whatever that record's size
// (a weight's record cut to 4 bytes loaded, and was read, and on --resume written, past its
// end), and it nests containers as deep as the pickle says. So each pickle is walked first on
// a model of LibTorch's stack, accepting only what LibTorch's pickler writes for blpa's
// checkpoints (protocol 2, the opcodes of torch/csrc/jit/serialization/pickler.cpp, the
// globals of callable_global): every length fits in the bytes left, every memo index is the
// next one or an earlier one, every MARK is still on the stack when its items are taken (as
// LibTorch 2.15 checks too; the older source read for this did not), keys and values come in
// pairs, containers nest at most kMaxNesting deep, every call is of a global whose effect on
// the stack is known, the pickle ends with one value, and every storage is the tuple the
// pickler writes, ('storage', torch.<Type>Storage, key, location, elements), made by the
// TUPLE just before it, whose elements fit the record <pickle's name without .pkl>/<key>.
// The model of the stack is exact because check_code admits no enums (an enum's call that
// matches no value pushes nothing). `records`: each record's size by its name in lower case.
void check_pickle(const File& f, const std::string& name, const std::vector<unsigned char>& p,
                  const std::unordered_map<std::string, uint64_t>& records) {
  size_t at = 0, op_at = 0;
  std::vector<Pushed> stack, memo;
  std::vector<Box> boxes(1, Box{0, true});   // boxes[0]: what holds nothing
  std::vector<size_t> marks;                 // the stack's size at each MARK not yet taken
  std::optional<std::vector<Pushed>> built;  // the five items of the tuple the previous opcode made
  auto bad = [&](const std::string& what) {
    f.damaged("pickle '" + name + "' (" + std::to_string(p.size()) + " bytes) " + what + " at byte " +
              std::to_string(op_at));
  };
  auto need = [&](uint64_t n) {
    if (n > p.size() - at)
      bad("needs " + std::to_string(n) + " bytes where " + std::to_string(p.size() - at) + " are left");
  };
  auto arg = [&](int bytes) {
    need(static_cast<uint64_t>(bytes));
    const uint64_t v = le(&p[at], bytes);
    at += static_cast<size_t>(bytes);
    return v;
  };
  auto line = [&] {  // GLOBAL's module and class, each up to a newline
    const auto* end = static_cast<const unsigned char*>(std::memchr(p.data() + at, '\n', p.size() - at));
    if (!end) bad("has a line without its end");
    std::string text(p.data() + at, end);
    at = static_cast<size_t>(end - p.data()) + 1;
    return text;
  };
  auto has = [](const char* op) { return std::string(op[0] == 'A' ? "has an " : "has a ") + op; };
  auto boxed = [&](int depth, bool sealed) {  // a value in a new box
    boxes.push_back({depth, sealed});
    Pushed v;
    v.box = static_cast<uint32_t>(boxes.size() - 1);
    return v;
  };
  // Items [from, end of the stack) go into a container (a new one, or `into`, which must not
  // be sealed): they are sealed, the container's depth covers theirs, and they leave the stack.
  auto contain = [&](size_t from, Pushed* into, const char* op) {
    int depth = 0;
    for (size_t i = from; i < stack.size(); ++i) {
      Box& b = boxes[stack[i].box];
      b.sealed = true;
      depth = std::max(depth, b.depth);
    }
    if (into && boxes[into->box].sealed)
      bad(has(op) + " into a container that is not a new list or dict");
    if (depth + 1 > kMaxNesting) bad("nests containers more than " + std::to_string(kMaxNesting) + " deep");
    stack.resize(from);
    if (into) {
      boxes[into->box].depth = std::max(boxes[into->box].depth, depth + 1);
      return;
    }
    stack.push_back(boxed(depth + 1, false));
  };
  auto at_least = [&](size_t n, const char* op) {
    if (stack.size() < n)
      bad(has(op) + " that takes " + std::to_string(n) + " items from a stack of " +
          std::to_string(stack.size()));
  };
  // Where the items above the last MARK begin; the MARK is taken.
  auto marked = [&](const char* op, bool pairs, bool below) {
    if (marks.empty()) bad(has(op) + " without its MARK");
    const size_t start = marks.back();
    marks.pop_back();
    if (start > stack.size()) bad(has(op) + " whose MARK is no longer on the stack");
    if (pairs && (stack.size() - start) % 2 != 0) bad(has(op) + " of a key without its value");
    if (below && start == 0) bad(has(op) + " with nothing below its MARK");
    return start;
  };
  auto text = [&](const Pushed& v) { return std::string(p.data() + v.at, p.data() + v.at + v.length); };
  const std::string dir = lower(name.substr(0, name.rfind('.'))) + "/";
  std::unordered_set<std::string> keys;  // the storages named so far
  auto check_storage = [&](const std::vector<Pushed>& t) {
    if (t.size() != 5 || t[0].kind != Pushed::kString || text(t[0]) != "storage" ||
        t[1].kind != Pushed::kStorageType || t[2].kind != Pushed::kString || t[3].kind != Pushed::kString ||
        t[4].kind != Pushed::kInt || t[4].number < 0)
      bad("has a storage whose tuple is not what LibTorch's pickler writes");
    const std::string key = text(t[2]);
    auto digit = [](char c) { return c >= '0' && c <= '9'; };
    if (key.empty() || key.size() > 18 || !std::all_of(key.begin(), key.end(), digit))
      bad("names storage '" + key.substr(0, 40) + "', where LibTorch's pickler writes a number");
    // LibTorch reads a storage's record whole at each BINPERSID (a record named 10,000 times:
    // 1.8 GB); the pickler writes each once, and a tensor that shares one takes it from the memo.
    if (!keys.insert(key).second) bad("names storage '" + key + "' a second time");
    const int64_t elements = t[4].number, element = t[1].number;
    if (elements == 0) return;  // LibTorch reads no record then
    const std::string record = dir + key;
    const auto found = records.find(record);
    if (found == records.end()) bad("names storage '" + key + "', which has no record");
    if (static_cast<uint64_t>(elements) > found->second / static_cast<uint64_t>(element))
      bad("has a storage of " + std::to_string(elements) + " elements of " + std::to_string(element) +
          " bytes in record '" + record + "' of " + std::to_string(found->second) + " bytes");
  };
  if (p.empty() || p[0] != 0x80) bad("does not begin with PROTO");
  while (at < p.size()) {
    op_at = at;
    const unsigned char op = p[at++];
    std::optional<Pushed> pushed;  // a value this opcode pushes
    std::optional<std::vector<Pushed>> made;
    switch (op) {
      case '.':  // STOP
        if (stack.size() != 1 || !marks.empty())
          bad("ends with " + std::to_string(stack.size()) + " values and " + std::to_string(marks.size()) +
              " MARKs on its stack");
        return;
      case 0x80:  // PROTO
        if (op_at != 0) bad("has a PROTO after its start");
        arg(1);
        break;
      case '(':  // MARK
        marks.push_back(stack.size());
        break;
      case 'q':  // BINPUT, LONG_BINPUT: the top of the stack into the memo; the stack is unchanged
      case 'r': {
        const uint64_t index = arg(op == 'q' ? 1 : 4);
        if (stack.empty()) bad("stores an empty stack's top in the memo");
        if (index > memo.size())
          bad("stores memo entry " + std::to_string(index) + " of a memo of " + std::to_string(memo.size()));
        if (index == memo.size()) memo.push_back(stack.back());
        else memo[index] = stack.back();
      } break;
      case 'h':  // BINGET, LONG_BINGET
      case 'j': {
        const uint64_t index = arg(op == 'h' ? 1 : 4);
        if (index >= memo.size())
          bad("reads memo entry " + std::to_string(index) + " of a memo of " + std::to_string(memo.size()));
        pushed = memo[index];
      } break;
      case 'X': {  // BINUNICODE
        const uint64_t n = arg(4);
        need(n);
        pushed = Pushed{Pushed::kString, static_cast<uint32_t>(at), static_cast<uint32_t>(n), 0};
        at += static_cast<size_t>(n);
      } break;
      case 'K': pushed = Pushed{Pushed::kInt, 0, 0, static_cast<int64_t>(arg(1))}; break;  // BININT1
      case 'M': pushed = Pushed{Pushed::kInt, 0, 0, static_cast<int64_t>(arg(2))}; break;  // BININT2
      case 'J':  // BININT
        pushed = Pushed{Pushed::kInt, 0, 0, static_cast<int32_t>(static_cast<uint32_t>(arg(4)))};
        break;
      case 0x8a:  // LONG1: LibTorch reads 8 bytes only
        if (arg(1) != 8) bad("has a LONG1 of other than 8 bytes");
        pushed = Pushed{Pushed::kInt, 0, 0, static_cast<int64_t>(arg(8))};
        break;
      case 'G': arg(8), pushed = Pushed{}; break;  // BINFLOAT
      case 'N': case 0x88: case 0x89: pushed = Pushed{}; break;  // NONE, NEWTRUE, NEWFALSE
      case ']': case '}': case ')': pushed = boxed(1, false); break;  // EMPTY_LIST, EMPTY_DICT, EMPTY_TUPLE
      case 'c': {  // GLOBAL: a storage's type, or a callable for REDUCE and BUILD
        const std::string module = line(), cls = line();
        const int64_t element = module == "torch" ? storage_element_size(cls) : 0;
        if (element > 0) pushed = Pushed{Pushed::kStorageType, 0, 0, element};
        else if (callable_global(module, cls)) pushed = Pushed{Pushed::kGlobal};
        else bad("has the global " + module.substr(0, 80) + "." + cls.substr(0, 80) + ", which blpa does not write");
      } break;
      case 't': {  // TUPLE
        const size_t start = marked("TUPLE", false, false);
        if (stack.size() - start == 5) made.emplace(stack.begin() + static_cast<std::ptrdiff_t>(start), stack.end());
        contain(start, nullptr, "TUPLE");
      } break;
      case 0x85: case 0x86: case 0x87:  // TUPLE1, TUPLE2, TUPLE3
        at_least(op - 0x84u, "TUPLE1/2/3");
        contain(stack.size() - (op - 0x84u), nullptr, "TUPLE1/2/3");
        break;
      case 'Q':  // BINPERSID: a storage, from the tuple on top
        if (!built) bad("has a storage whose tuple is not what LibTorch's pickler writes");
        check_storage(*built);
        stack.back() = Pushed{};
        break;
      case 'l':  // LIST
        contain(marked("LIST", false, false), nullptr, "LIST");
        break;
      case 'd':  // DICT
        contain(marked("DICT", true, false), nullptr, "DICT");
        break;
      case 'e':  // APPENDS, SETITEMS: into the list or dict below the MARK
      case 'u': {
        const char* name_of = op == 'e' ? "APPENDS" : "SETITEMS";
        const size_t start = marked(name_of, op == 'u', true);
        contain(start, &stack[start - 1], name_of);
      } break;
      case 's':  // SETITEM: a key and a value into the dict below them
        at_least(3, "SETITEM");
        contain(stack.size() - 2, &stack[stack.size() - 3], "SETITEM");
        break;
      case 0x81:  // NEWOBJ: drops the top
        at_least(1, "NEWOBJ");
        stack.pop_back();
        break;
      case 'b':  // BUILD, REDUCE: call the global below the top with the top
      case 'R': {
        at_least(2, op == 'b' ? "BUILD" : "REDUCE");
        if (stack[stack.size() - 2].kind != Pushed::kGlobal)
          bad(has(op == 'b' ? "BUILD" : "REDUCE") + " whose callable is not a global");
        // The result may be the argument or hold what it held (a module's attributes): as deep, and sealed.
        const Pushed argument = stack.back();
        stack.resize(stack.size() - 2);
        boxes[argument.box].sealed = true;
        pushed = boxed(boxes[argument.box].depth, true);
      } break;
      default: {
        char hex[8];
        std::snprintf(hex, sizeof hex, "0x%02x", op);
        bad(std::string("has opcode ") + hex + ", which LibTorch's pickler does not write");
      }
    }
    built = std::move(made);
    if (pushed) stack.push_back(*pushed);
    if (stack.size() > kMaxValues || memo.size() > kMaxValues)
      bad("holds more than " + std::to_string(kMaxValues) + " values on its stack or in its memo");
  }
  op_at = at;
  bad("ends before its STOP");
}

// One line of the code LibTorch writes for a C++ module's class: "class <name>(Module):", then
// indented by two spaces "__parameters__ = [\"<name>\", ...]" (or __buffers__),
// "__annotations__ = []", "__annotations__[\"<name>\"] = <type>" or "<name> : <type>", where
// a type is one that blpa's checkpoints hold: Tensor, int, float, bool, str, List[int],
// List[float] or a module class.
bool module_line(std::string_view s, std::string_view* module) {
  auto word = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; };
  auto eat = [&](std::string_view text) {
    if (s.substr(0, text.size()) != text) return false;
    s.remove_prefix(text.size());
    return true;
  };
  auto name = [&] {
    size_t n = 0;
    while (n < s.size() && word(s[n])) ++n;
    s.remove_prefix(n);
    return n > 0;
  };
  auto quoted = [&] {
    if (!eat("\"")) return false;
    const size_t end = s.find_first_of("\"\\");
    if (end == std::string_view::npos || s[end] != '"') return false;
    s.remove_prefix(end + 1);
    return true;
  };
  auto type = [&] {
    static const std::unordered_set<std::string_view> plain{"Tensor", "int",       "float",      "bool",
                                                             "str",    "List[int]", "List[float]"};
    if (!module_type(s)) return plain.count(s) > 0;
    *module = s;
    return true;
  };
  if (s.empty()) return true;
  if (eat("class ")) return name() && s == "(Module):";
  if (!eat("  ")) return false;
  if (eat("__parameters__ = [") || eat("__buffers__ = [")) {
    while (quoted())
      if (!eat(", ")) return false;
    return s == "]";
  }
  if (s == "__annotations__ = []") return true;
  if (eat("__annotations__[")) return quoted() && eat("] = ") && type();
  return name() && eat(" : ") && type();
}

// A checkpoint's TorchScript code declares its modules' attributes and nothing else (LibTorch
// writes no methods for C++ modules). Anything more is refused: TorchScript's importer would
// compile it, a class's __setstate__ would run while the pickle loads (code from the file, run
// by blpa-eval), and an enum's call that matches no value pushes nothing, which check_pickle's
// model of LibTorch's stack does not allow for. The importer's time grows as the square of a
// class's lines (a class of 100,000 lines: 4 s; of 16 MiB: over 10 minutes), so a record holds
// kMaxCodeLines at most. Returns the records of the module classes its attributes name.
constexpr size_t kMaxCodeLines = 65536;  // ResNet-1001's longest: 3,009
// The parser also makes a node of each name in a __parameters__ list: one line of 3.35 million
// took 730 MB from a file of 1.1 MB. ResNet-1001's longest line: 75 characters, 4 names.
constexpr size_t kMaxLineBytes = 1024;
std::vector<std::string> check_code(const File& f, const std::string& name, const std::vector<unsigned char>& code) {
  const std::string_view text(reinterpret_cast<const char*>(code.data()), code.size());
  const std::string low = lower(name), root = low.substr(0, low.rfind("code/"));  // "<archive>/"
  std::vector<std::string> named;
  size_t number = 1;
  for (size_t at = 0;; ++number) {
    const size_t end = std::min(text.find('\n', at), text.size());
    const std::string_view line = text.substr(at, end - at);
    std::string_view module;
    if (number > kMaxCodeLines || line.size() > kMaxLineBytes || !module_line(line, &module))
      f.damaged("record '" + name + "' line " + std::to_string(number) + " is not a module's attribute: '" +
                std::string(line.substr(0, 80)) + "'");
    if (!module.empty()) {  // __torch__[.___torch_mangle_<n>].Module: code/__torch__[/___torch_mangle_<n>].py
      std::string path(module.substr(0, module.size() - 7));
      std::replace(path.begin(), path.end(), '.', '/');
      named.push_back(root + "code/" + lower(path) + ".py");
    }
    if (end == text.size()) return named;
    at = end + 1;
  }
}

// TorchScript's importer imports a class's attribute types as it imports the class, recursively
// (a chain of 5,000 classes, each an attribute of the one before, overflowed its stack). Throws
// when a chain through `named` (each code record's module classes) is deeper than kMaxChain.
constexpr int kMaxChain = 16;  // blpa's modules nest 5 deep
void check_module_chains(const File& f, const std::unordered_map<std::string, std::vector<std::string>>& named) {
  std::unordered_map<std::string, int> depth;  // of the chains below a record, once known
  auto too_deep = [&](int levels) {
    if (levels > kMaxChain) f.damaged("has module classes nested more than " + std::to_string(kMaxChain) + " deep");
  };
  std::function<int(const std::string&, int)> below = [&](const std::string& record, int level) {
    too_deep(level);
    if (const auto known = depth.find(record); known != depth.end()) {
      too_deep(level + known->second);
      return known->second;
    }
    // A class with no code fails the import, whose error message LibTorch builds from the
    // .debug_pkl records' source ranges: a path no checkpoint of blpa's takes.
    const auto refs = named.find(record);
    if (refs == named.end()) f.damaged("names a module class whose code, " + record + ", it does not hold");
    int deepest = 0;
    for (const auto& r : refs->second) deepest = std::max(deepest, 1 + below(r, level + 1));
    depth[record] = deepest;
    return deepest;
  };
  for (const auto& [record, refs] : named) below(record, 0);
}

}  // namespace

void verify_archive(const std::string& path) {
  const File f(path);
  // A LibTorch archive begins with a zip record's signature, even one cut short: a file that
  // does not is some other file given by mistake (a log, a data file), not a damaged one.
  unsigned char head[8] = {};
  f.read(0, head, std::min<int64_t>(f.size, sizeof head));
  if (f.size >= 4 && le(head, 4) != kLocal)
    throw CheckpointError(path + " is not a blpa-train checkpoint: it is not a zip archive, as checkpoints are" +
                          (head[0] == '{' ? " (it reads as JSON: a --log or --summary file?)" : ""));
  // The end-of-central-directory record: the last 22 bytes, with no comment (LibTorch writes
  // none). Where a comment or other bytes followed it, a second directory hidden in them could
  // be the one LibTorch's reader finds (miniz looks for the last record's signature), unchecked.
  const int64_t tail = std::min<int64_t>(f.size, 22 + 56 + 20);  // with zip64's record and locator
  if (tail < 22) f.damaged("too short to be a zip archive");
  std::vector<unsigned char> t(tail);
  f.read(f.size - tail, t.data(), tail);
  const int64_t end = tail - 22;
  if (le(&t[end], 4) != kEnd || le(&t[end + 20], 2) != 0)
    f.damaged("no zip directory at its end (or bytes after it, which LibTorch does not write)");
  // LibTorch's loader takes a file whose bytes 4 to 7 say "PTMF" for a flatbuffer module, not
  // a zip archive, and would run its code; LibTorch's writer begins with a record's header.
  if (std::memcmp(head + 4, "PTMF", 4) == 0)
    f.damaged("does not begin with a zip record (a file LibTorch would read as another format)");
  uint64_t entries = le(&t[end + 10], 2), cd_size = le(&t[end + 12], 4), cd_offset = le(&t[end + 16], 4);
  // Zip64 (LibTorch writes it always): a locator just before the record points to the real one.
  if (end >= 20 && le(&t[end - 20], 4) == kLocator64) {
    unsigned char z[56];
    f.read(static_cast<int64_t>(le(&t[end - 12], 8)), z, sizeof z);
    if (le(z, 4) != kEnd64) f.damaged("bad zip64 directory record");
    entries = le(z + 32, 8), cd_size = le(z + 40, 8), cd_offset = le(z + 48, 8);
  }
  if (cd_size > static_cast<uint64_t>(f.size) || cd_offset > static_cast<uint64_t>(f.size) - cd_size)
    f.damaged("the zip directory lies outside the file");
  if (entries > cd_size / 46) f.damaged("the zip directory is too small for its entries");
  std::vector<unsigned char> cd(cd_size);
  f.read(static_cast<int64_t>(cd_offset), cd.data(), static_cast<int64_t>(cd_size));
  struct Entry {
    std::string name;
    uint64_t method, crc, compressed, size, local;
    uint64_t signature = 0, data = 0;  // of its local header, and where its bytes begin
  };
  std::vector<Entry> list;
  std::unordered_map<std::string, uint64_t> sizes;  // by name in lower case, as LibTorch's reader finds them
  size_t pos = 0;
  for (uint64_t e = 0; e < entries; ++e) {
    if (pos + 46 > cd.size() || le(&cd[pos], 4) != kCentral) f.damaged("bad zip directory entry");
    const unsigned char* h = &cd[pos];
    const uint64_t method = le(h + 10, 2), crc = le(h + 16, 4);
    uint64_t compressed = le(h + 20, 4), size = le(h + 24, 4), local = le(h + 42, 4);
    const size_t name_len = le(h + 28, 2), extra_len = le(h + 30, 2), comment_len = le(h + 32, 2);
    if (pos + 46 + name_len + extra_len + comment_len > cd.size()) f.damaged("bad zip directory entry");
    const std::string name(reinterpret_cast<const char*>(h + 46), name_len);
    // miniz returns a "directory" (attribute 0x10, or a name ending in '/') without reading it:
    // LibTorch would parse an uninitialised buffer in place of the bytes checked here. And
    // LibTorch looks records up by C strings: a name with a NUL is another record to it.
    // LibTorch writes attributes 0 and names of these characters.
    auto plain = [](char ch) {
      return std::isalnum(static_cast<unsigned char>(ch)) || (ch != '\0' && std::strchr("._/-", ch));
    };
    if (le(h + 38, 4) != 0 || name.empty() || name.back() == '/' || !std::all_of(name.begin(), name.end(), plain)) {
      std::string shown = name.substr(0, 80);  // its odd bytes as '?'
      for (char& ch : shown) ch = std::isprint(static_cast<unsigned char>(ch)) ? ch : '?';
      f.damaged("has a record named '" + shown + "' of a kind LibTorch's writer does not write");
    }
    // Sizes and offsets that do not fit 32 bits are in the zip64 extra field, in this order;
    // the first such field counts, as in LibTorch's reader (miniz).
    bool zip64 = false;
    for (size_t x = 46 + name_len; x + 4 <= 46 + name_len + extra_len && !zip64;) {
      const uint64_t id = le(h + x, 2), n = le(h + x + 2, 2);
      if (x + 4 + n > 46 + name_len + extra_len) f.damaged("bad extra field of '" + name + "'");
      if (id == 1) {
        size_t at = x + 4;
        auto next = [&](uint64_t& v) {
          if (v != 0xFFFFFFFFu) return;
          if (at + 8 > x + 4 + n) f.damaged("bad zip64 field of '" + name + "'");
          v = le(h + at, 8), at += 8;
        };
        next(size), next(compressed), next(local);
        zip64 = true;
      }
      x += 4 + n;
    }
    pos += 46 + name_len + extra_len + comment_len;
    // Two names that differ only in case are one to LibTorch's reader, which of them it finds
    // depending on their order in an unstable sort (a chain check of one was passed by the other).
    if (!sizes.emplace(lower(name), size).second)
      f.damaged("has two records named '" + name + "' but for their case");
    list.push_back({name, method, crc, compressed, size, local});
  }
  // Records one after another before the directory, as LibTorch writes them: entries that
  // share bytes would each be read whole (93 entries over one record of 32 MiB: 3.55 GB).
  std::vector<std::pair<uint64_t, uint64_t>> spans;  // each record's bytes: its header to its data's end
  for (auto& e : list) {
    unsigned char lh[30];
    f.read(static_cast<int64_t>(e.local), lh, sizeof lh);
    e.signature = le(lh, 4);
    e.data = e.local + 30 + le(lh + 26, 2) + le(lh + 28, 2);
    spans.emplace_back(e.local, e.data + e.compressed);
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 0; i < spans.size(); ++i)
    if (spans[i].second > (i + 1 < spans.size() ? spans[i + 1].first : cd_offset))
      f.damaged("has records that share bytes, or overlap its zip directory");
  std::vector<unsigned char> buffer(1 << 20), inflated(1 << 16);
  std::unordered_map<std::string, std::vector<std::string>> named;  // check_code's, by record
  uint64_t code_bytes = 0;
  for (const auto& [name, method, crc, compressed, size, local, signature, data] : list) {
    // Tensors are stored as they are; only TorchScript's code may be deflated (a tensor's record
    // of zeros inflated a thousandfold: 2 GB from a file of 2.5 MB).
    const bool pickle = is_pickle(name), code = is_code(name), keep = pickle || code;  // bytes kept to check
    if (method != 0 && !(method == 8 && code))
      f.damaged("record '" + name + "' is compressed (method " + std::to_string(method) +
                "), where LibTorch's writer deflates only code");
    if (method == 0 && compressed != size) f.damaged("bad sizes of record '" + name + "'");
    if ((method == 8 || keep) && size > kMaxParsed)
      f.damaged("record '" + name + "' holds " + std::to_string(size) + " bytes (a checkpoint's code and pickles are " +
                "under " + std::to_string(kMaxParsed >> 20) + " MiB)");
    if (signature != kLocal) f.damaged("record '" + name + "' has no local header");
    // The local header says again what the directory says of the record (LibTorch's reader
    // takes the directory's word): its name and method. A byte flipped there is damage too.
    unsigned char lh[30];
    f.read(static_cast<int64_t>(local), lh, sizeof lh);
    std::string local_name(le(lh + 26, 2), '\0');
    if (local_name.size() == name.size())
      f.read(static_cast<int64_t>(local) + 30, local_name.data(), static_cast<int64_t>(local_name.size()));
    if (local_name != name || le(lh + 8, 2) != method)
      f.damaged("record '" + name + "': its local header does not match the directory");
    int64_t at = static_cast<int64_t>(data);
    if (at > f.size || compressed > static_cast<uint64_t>(f.size - at)) f.damaged("record '" + name + "' is cut short");
    uLong c = crc32(0L, Z_NULL, 0);
    uint64_t produced = 0;
    std::vector<unsigned char> kept;
    if (method == 0) {
      for (uint64_t left = compressed; left > 0;) {
        const auto n = static_cast<int64_t>(std::min<uint64_t>(left, buffer.size()));
        f.read(at, buffer.data(), n);
        c = crc32(c, buffer.data(), static_cast<uInt>(n));
        if (keep) kept.insert(kept.end(), buffer.data(), buffer.data() + n);
        at += n, left -= static_cast<uint64_t>(n), produced += static_cast<uint64_t>(n);
      }
    } else {
      Inflater z;
      bool ended = false;
      for (uint64_t left = compressed; left > 0 && !ended && produced <= size;) {
        const auto n = static_cast<int64_t>(std::min<uint64_t>(left, buffer.size()));
        f.read(at, buffer.data(), n);
        at += n, left -= static_cast<uint64_t>(n);
        z.s.next_in = buffer.data();
        z.s.avail_in = static_cast<uInt>(n);
        do {  // until this input is used up (inflate stops when its output is full)
          z.s.next_out = inflated.data();
          z.s.avail_out = static_cast<uInt>(inflated.size());
          const int status = inflate(&z.s, Z_NO_FLUSH);
          const size_t got = inflated.size() - z.s.avail_out;
          c = crc32(c, inflated.data(), static_cast<uInt>(got));
          if (keep && produced + got <= size) kept.insert(kept.end(), inflated.data(), inflated.data() + got);
          produced += got;
          if (status == Z_STREAM_END) ended = true;
          else if (status == Z_BUF_ERROR) break;  // no progress: wants more input
          else if (status != Z_OK) f.damaged("record '" + name + "' does not inflate");
        } while (!ended && z.s.avail_out == 0 && produced <= size);
      }
      if (!ended && produced <= size) f.damaged("record '" + name + "' does not inflate");
    }
    if (produced != size || c != crc) f.damaged("record '" + name + "' fails its CRC check");
    if (pickle) check_pickle(f, name, kept, sizes);
    if (code) {
      code_bytes += kept.size();
      if (code_bytes > kMaxParsed)
        f.damaged("holds more than " + std::to_string(kMaxParsed >> 20) + " MiB of code (ResNet-1001's: 0.9 MiB)");
      named[lower(name)] = check_code(f, name, kept);
    }
  }
  check_module_chains(f, named);
}

// ---- atomic files --------------------------------------------------------------------------

namespace {
std::mutex g_transient_mutex;
std::vector<std::string> g_transient;  // few at once: a run's outputs
}  // namespace

void hold_transient(const std::string& path) {
  std::lock_guard<std::mutex> lock(g_transient_mutex);
  g_transient.push_back(path);
}

void release_transient(const std::string& path) {
  std::lock_guard<std::mutex> lock(g_transient_mutex);
  if (const auto at = std::find(g_transient.begin(), g_transient.end(), path); at != g_transient.end())
    g_transient.erase(at);
}

void remove_transient_files() noexcept {
  g_transient_mutex.lock();  // and kept: nothing new is created before the process ends
  for (const auto& path : g_transient) ::unlink(path.c_str());
}

std::string link_target(const std::string& path) {
  std::error_code ec;
  fs::path target = path;
  for (int links = 0; links < 40 && fs::is_symlink(target, ec); ++links) {  // 40: the kernel's limit
    const fs::path to = fs::read_symlink(target, ec);
    if (ec) break;
    target = to.is_absolute() ? to : target.parent_path() / to;
  }
  return target.string();
}

AtomicFile::AtomicFile(std::string path)
    : shown_(std::move(path)), path_(link_target(shown_)), tmp_(path_ + ".tmp") {
  hold_transient(tmp_);
  ::unlink(tmp_.c_str());  // a leftover of a killed run
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd_ < 0) error_ = errno;
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!tmp_.empty()) ::unlink(tmp_.c_str());
  release_transient(tmp_.empty() ? path_ + ".tmp" : tmp_);
}

size_t AtomicFile::write(const void* data, size_t n) {
  const auto* p = static_cast<const char*>(data);
  for (size_t left = n; left > 0 && !error_;) {
    const ssize_t w = ::write(fd_, p, left);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) error_ = w < 0 ? errno : EIO;
    else p += w, left -= static_cast<size_t>(w);
  }
  return n;
}

void AtomicFile::commit() {
  auto fail = [&](int err) { throw std::runtime_error(shown_ + ": cannot be written (" + reason(err) + ")"); };
  if (error_) fail(error_);
  if (::fsync(fd_) != 0) fail(errno);
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) fail(errno);
  if (::rename(tmp_.c_str(), path_.c_str()) != 0) fail(errno);
  tmp_.clear();
  // The rename itself reaches the disk with the directory.
  const fs::path parent = fs::path(path_).has_parent_path() ? fs::path(path_).parent_path() : fs::path(".");
  if (const int dir = ::open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); dir >= 0) {
    ::fsync(dir);
    ::close(dir);
  }
}

void check_output_path(const std::string& path, const std::string& flag, bool atomic, bool write) {
  auto bad = [&](const std::string& why) { throw std::invalid_argument(flag + " " + path + ": " + why); };
  if (path.empty()) bad("empty path");
  std::error_code ec;
  const auto status = fs::status(path, ec);
  if (fs::is_directory(status)) bad("is a directory");
  if (fs::exists(status) && !fs::is_regular_file(status)) {
    if (atomic) bad("is not a regular file");
    return;  // a device or a pipe: opened as it is
  }
  // Where a symbolic link points is where the file is written (and its folder created).
  const fs::path target = link_target(path);
  const fs::path parent = target.has_parent_path() ? target.parent_path() : fs::path(".");
  // An atomic file is written beside its target first, as PATH.tmp.
  const std::string tmp = target.string() + ".tmp";
  if (atomic && fs::is_directory(tmp, ec)) bad(tmp + " is a folder, where the file is written first: remove it");
  if (!write) {
    const fs::path own = fs::absolute(parent, ec);
    fs::path folder = own;  // the nearest folder that exists: where the missing ones are created
    while (!fs::exists(folder, ec) && folder.has_parent_path() && folder.parent_path() != folder)
      folder = folder.parent_path();
    if (!fs::is_directory(folder, ec)) bad(folder.string() + " is not a folder");
    const bool exists = fs::exists(target, ec);
    if (::access(folder.c_str(), W_OK | X_OK) != 0 && (atomic || !exists || folder != own))
      bad(std::string(folder == own ? "cannot be written" : "its folder cannot be created") + " (" + reason(errno) +
          ")");
    if (!atomic && exists && ::access(target.c_str(), W_OK) != 0) bad("cannot be written (" + reason(errno) + ")");
    return;
  }
  if (!fs::exists(parent, ec)) {
    fs::create_directories(parent, ec);
    // A link on the way to a folder that is not there ("File exists", where nothing is).
    for (fs::path p = parent; ec && !p.empty() && p.has_relative_path(); p = p.parent_path())
      if (std::error_code e; fs::is_symlink(fs::symlink_status(p, e)) && !fs::exists(p, e))
        bad("its folder " + p.string() + " is a link to " + fs::read_symlink(p, e).string() + ", which does not exist");
    if (ec) bad("its folder cannot be created (" + ec.message() + ")");
  } else if (!fs::is_directory(parent, ec)) {
    bad(parent.string() + " is not a folder");
  }
  // What writing will do: create a file beside the target (atomic) or open the target.
  const std::string probe = atomic ? tmp : path;
  if (atomic) ::unlink(probe.c_str());
  const bool existed = fs::exists(status);
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC | (atomic ? O_EXCL : O_APPEND), 0644);
  if (fd < 0) bad("cannot be written (" + reason(errno) + ")");
  ::close(fd);
  // Created only to be tried: a run refused after this (its data) leaves no empty file.
  if (atomic || !existed) ::unlink(atomic ? probe.c_str() : target.c_str());  // the file, not a link to it
}

// ---- checkpoints ---------------------------------------------------------------------------

std::vector<std::string> split_list(const std::string& list) {
  std::vector<std::string> items;
  for (size_t at = 0; !list.empty() && at <= list.size();) {
    const size_t comma = std::min(list.find(',', at), list.size());
    items.push_back(list.substr(at, comma - at));
    at = comma + 1;
  }
  return items;
}

Checkpoint read_checkpoint(const std::string& path) {
  verify_archive(path);
  Checkpoint c;
  c.path = path;
  c.archive = std::make_shared<torch::serialize::InputArchive>();
  try {
    c.archive->load_from(path, torch::kCPU);  // whatever device wrote it
  } catch (const c10::Error& e) {
    std::string why = e.what_without_backtrace();
    if (why.find("constants.pkl") != std::string::npos)  // a zip of pickled tensors, not a blpa archive
      throw CheckpointError(path + " is not a blpa-train checkpoint (a torch.save file, such as blpa-train --export "
                                   "writes for Python? give the file --checkpoint wrote)");
    throw CheckpointError(path + " cannot be read (" + why.substr(0, why.find(". ")) + ")");
  } catch (const std::exception& e) {  // TorchScript's unpickler throws its own errors too (a bad type name)
    std::string why = e.what();
    throw CheckpointError(path + " cannot be read (" + first_line(why) + ")");
  }
  c10::IValue v;
  auto read = [&](const char* key) -> const c10::IValue& {
    if (!c.archive->try_read(key, v)) throw CheckpointError(path + " is not a blpa-train checkpoint (no " + key + ")");
    return v;
  };
  try {
    if (!read("blpa_format").isInt() || v.toInt() != kCheckpointFormat)
      throw CheckpointError(path + " is not a blpa checkpoint of format " + std::to_string(kCheckpointFormat));
    c.identity = read("blpa_identity").toStringRef();
    std::istringstream lines(read("blpa_config").toStringRef());
    for (std::string line; std::getline(lines, line);)
      if (const auto eq = line.find('='); eq != std::string::npos) c.config[line.substr(0, eq)] = line.substr(eq + 1);
    c.state.iteration = read("blpa_iteration").toInt();
    if (c.archive->try_read("blpa_run_state", v)) {  // written since the format's first version
      const auto s = v.toDoubleVector();
      // (pending, iterations, summed loss, seconds): the count becomes an integer, which a
      // value out of its range (a NaN, -3.2e231: found by fuzzing) would make undefined.
      if (s.size() != 4 || !(s[1] >= 0 && s[1] <= 0x1p53)) throw CheckpointError(path + ": bad run state");
      c.state.pending_eval = s[0] != 0;
      c.state.window_iters = static_cast<int64_t>(s[1]);
      c.state.window_loss = s[2];
      c.state.window_seconds = s[3];
    }
    const auto shape = read("blpa_net").toIntVector();
    if (shape.size() != 2 || shape[0] <= 0 || shape[1] <= 0) throw CheckpointError(path + ": bad network shape");
    c.net.arch = c.config["arch"];
    c.net.depth = std::stoi(c.config.at("depth"));
    // A whole number >= 0 of the header's.
    const auto whole = [&](const char* key, const std::string& n) {
      int64_t v = 0;
      const auto [p, ec] = std::from_chars(n.data(), n.data() + n.size(), v);
      if (n.empty() || ec != std::errc() || p != n.data() + n.size() || v < 0)
        throw CheckpointError(path + ": bad " + key + " '" + n.substr(0, 40) + "'");
      return v;
    };
    // A count the header records: none where it is absent or empty.
    const auto count = [&](const char* key) -> std::optional<int64_t> {
      const auto it = c.config.find(key);
      if (it == c.config.end() || it->second.empty()) return std::nullopt;
      return whole(key, it->second);
    };
    if (const auto it = c.config.find("decode_failed"); it != c.config.end())
      for (const std::string& n : split_list(it->second)) c.decode_failed.push_back(whole("decode_failed", n));
    // The trainer's normalisation is the statistics of these images: readers need the number.
    c.train_subset = count("train_subset").value_or(0);
    c.stored_activation_bytes = count("stored_activation_bytes");
    c.peak_bytes = count("peak_bytes");
    c.run_train_ms = count("run_train_ms");
    c.net.mode = parse_mode_config(c.config.at("mode"));
    c.net.in_channels = shape[0];
    c.net.num_classes = shape[1];
    // Sizes from the file, bounded before load_model builds the network they describe.
    if (c.net.in_channels > kMaxInChannels || c.net.num_classes > data::kMaxClasses || c.net.depth > kMaxDepth)
      throw CheckpointError(path + " names a network of " + std::to_string(c.net.in_channels) + " input channels, " +
                            std::to_string(c.net.num_classes) + " classes and depth " + std::to_string(c.net.depth) +
                            ", beyond the limits of " + std::to_string(kMaxInChannels) + ", " +
                            std::to_string(data::kMaxClasses) + " and " + std::to_string(kMaxDepth));
  } catch (const CheckpointError&) {
    throw;
  } catch (const std::exception& e) {  // a header of the wrong type or value
    throw CheckpointError(path + " has a bad header (" + e.what() + ")");
  }
  if (c.state.iteration < 0) throw CheckpointError(path + ": negative iteration");
  return c;
}

bool all_finite(ResNet& model, torch::optim::Optimizer* optimizer) {
  std::vector<torch::Tensor> flags;
  auto add = [&](const torch::Tensor& t) {
    if (t.defined() && t.is_floating_point()) flags.push_back(torch::isfinite(t).all());
  };
  for (const auto& p : model->parameters()) add(p.detach());
  for (const auto& b : model->buffers()) add(b);
  if (optimizer)
    for (const auto& [key, state] : optimizer->state())
      if (auto* sgd = dynamic_cast<torch::optim::SGDParamState*>(state.get())) add(sgd->momentum_buffer());
  return flags.empty() || torch::stack(flags).all().item<bool>();
}

namespace {

std::string shape_and_type(const torch::Tensor& t) {
  std::ostringstream s;
  s << t.sizes() << " " << t.scalar_type();
  return s.str();
}

// The network's tensors: each parameter's and buffer's name, shape and type.
std::vector<std::pair<std::string, std::string>> tensor_shapes(ResNet& model) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& p : model->named_parameters()) out.emplace_back(p.key(), shape_and_type(p.value()));
  for (const auto& b : model->named_buffers()) out.emplace_back(b.key(), shape_and_type(b.value()));
  return out;
}

// LibTorch's Module::load takes each tensor's shape from the file (it converts types): a file
// whose tensors have other shapes than the network's loaded, and failed later, in the forward
// pass ("unit expects N x 16 x H x W input") or the optimiser's step. So the network's tensors
// after the load are compared with what the network it names makes.
void load_weights(const Checkpoint& c, ResNet& model) {
  const auto expected = tensor_shapes(model);
  try {
    torch::serialize::InputArchive m;
    c.archive->read("model", m);
    model->load(m);
  } catch (const c10::Error& e) {
    std::string why = e.what_without_backtrace();
    throw CheckpointError(c.path + ": its weights do not fit the network it names (" + first_line(why) +
                          ")");
  }
  const auto loaded = tensor_shapes(model);
  for (size_t i = 0; i < expected.size() && i < loaded.size(); ++i)
    if (loaded[i] != expected[i])
      throw CheckpointError(c.path + ": its weights do not fit the network it names (" + expected[i].first + " is " +
                            loaded[i].second + " in the file, " + expected[i].second + " in the network)");
}

}  // namespace

ResNet load_model(const Checkpoint& c) {
  ResNet model{nullptr};
  try {
    model = ResNet(c.net);
  } catch (const std::invalid_argument& e) {  // a depth that no network has
    throw CheckpointError(c.path + " names a network that does not exist (" + e.what() + ")");
  }
  load_weights(c, model);
  if (!all_finite(model))
    throw CheckpointError(c.path + " holds weights or statistics that are not finite (NaN or Inf); it was not used");
  model->eval();
  return model;
}

void load_training_state(const Checkpoint& c, ResNet& model, torch::optim::Optimizer& optimizer) {
  load_weights(c, model);
  try {
    torch::serialize::InputArchive o;
    c.archive->read("optimizer", o);
    optimizer.load(o);
  } catch (const std::exception& e) {  // LibTorch's errors, and its std::stoull of a state's key that is no number
    const auto* torch_error = dynamic_cast<const c10::Error*>(&e);
    const std::string why = torch_error ? torch_error->what_without_backtrace() : e.what();
    throw CheckpointError(c.path + ": its optimiser state cannot be loaded (" + first_line(why) + ")");
  }
  // As the weights: a momentum buffer is taken as the file has it.
  const auto params = model->named_parameters();
  for (const auto& p : params) {
    const auto state = optimizer.state().find(p.value().unsafeGetTensorImpl());
    if (state == optimizer.state().end()) continue;
    const auto* sgd = dynamic_cast<const torch::optim::SGDParamState*>(state->second.get());
    if (!sgd || !sgd->momentum_buffer().defined()) continue;
    const std::string got = shape_and_type(sgd->momentum_buffer()), want = shape_and_type(p.value());
    if (got != want)
      throw CheckpointError(c.path + ": its optimiser state does not fit the network (the momentum of " + p.key() +
                            " is " + got + " in the file, " + want + " in the network)");
  }
  if (!all_finite(model, &optimizer))
    throw CheckpointError(c.path + " holds weights or optimiser state that are not finite (NaN or Inf); it was not used");
}

void save_checkpoint(const std::string& path, const std::string& identity, const std::string& config,
                     const RunState& state, ResNet& model, torch::optim::Optimizer& optimizer) {
  torch::serialize::OutputArchive archive;
  archive.write("blpa_format", c10::IValue(kCheckpointFormat));
  archive.write("blpa_identity", c10::IValue(identity));
  archive.write("blpa_config", c10::IValue(config));
  archive.write("blpa_net", c10::IValue(std::vector<int64_t>{model->config().in_channels, model->config().num_classes}));
  archive.write("blpa_iteration", c10::IValue(state.iteration));
  archive.write("blpa_run_state", c10::IValue(std::vector<double>{state.pending_eval ? 1.0 : 0.0,
                                                                  static_cast<double>(state.window_iters),
                                                                  state.window_loss, state.window_seconds}));
  torch::serialize::OutputArchive m, o;
  model->save(m);
  optimizer.save(o);
  archive.write("model", m);
  archive.write("optimizer", o);
  AtomicFile file(path);
  archive.save_to([&](const void* data, size_t n) { return file.write(data, n); });
  file.commit();
}

// A dict of tensors in torch.save's zip format. torch::pickle_save would tag the dict with a
// TorchScript type that torch.load's default weights_only=True refuses, so the pickler runs
// here with tagging off.
void export_state_dict(const std::string& path, ResNet& model, const std::string& run_id) {
  if (!all_finite(model)) throw std::runtime_error("--export " + path + ": the weights are not finite; nothing written");
  c10::impl::GenericDict dict(c10::StringType::get(), c10::TensorType::get());
  // Contiguous (NCHW) float32 whatever the run's layout and precision: what torch.load's users
  // and tools that take only dense tensors (safetensors, .view(-1)) expect.
  for (const auto& p : model->named_parameters()) dict.insert(p.key(), p.value().detach().cpu().contiguous());
  for (const auto& b : model->named_buffers()) dict.insert(b.key(), b.value().cpu().contiguous());
  std::vector<char> pickle;
  torch::jit::Pickler pickler([&](const char* b, size_t n) { pickle.insert(pickle.end(), b, b + n); }, nullptr,
                              nullptr, nullptr, nullptr, /*tag_aggregates=*/false);
  pickler.protocol();
  pickler.pushIValue(c10::IValue(dict));
  pickler.stop();
  AtomicFile file(path);
  {
    caffe2::serialize::PyTorchStreamWriter writer([&](const void* data, size_t n) { return file.write(data, n); });
    torch::jit::writeArchiveAndTensors("data", pickle.data(), pickle.size(), pickler.tensorData(), writer);
    if (!run_id.empty()) writer.writeRecord("blpa_run_id", run_id.data(), run_id.size());
    writer.writeEndOfFile();
  }
  file.commit();
}

std::optional<std::string> exported_run_id(const std::string& path) {
  try {
    caffe2::serialize::PyTorchStreamReader reader(path);
    if (!reader.hasRecord("blpa_run_id")) return std::string();
    const auto [data, n] = reader.getRecord("blpa_run_id");
    return std::string(static_cast<const char*>(data.get()), std::min<size_t>(n, 64));
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

namespace {

// Whether the archive at `path` is a dict of tensors with the names and shapes of `net`'s
// state, as export_state_dict writes it.
bool holds_state_of(const std::string& path, const NetConfig& net) {
  try {
    std::ifstream f(path, std::ios::binary);
    const std::vector<char> bytes((std::istreambuf_iterator<char>(f)), {});
    const auto dict = torch::pickle_load(bytes).toGenericDict();
    std::unordered_map<std::string, std::vector<int64_t>> want;
    ResNet model(net);
    for (const auto& p : model->named_parameters()) want[p.key()] = p.value().sizes().vec();
    for (const auto& b : model->named_buffers()) want[b.key()] = b.value().sizes().vec();
    if (dict.size() != want.size()) return false;
    for (const auto& e : dict) {
      const auto it = e.key().isString() ? want.find(e.key().toStringRef()) : want.end();
      if (it == want.end() || !e.value().isTensor() || e.value().toTensor().sizes().vec() != it->second) return false;
    }
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

}  // namespace

std::string export_not_replaceable(const std::string& path, const std::string& run_id, const NetConfig& net) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) return "is a folder";
  const auto theirs = exported_run_id(path);
  if (!theirs) return "is not an export (not a PyTorch archive, or a damaged one)";
  if (theirs->empty()) {
    bool module = false;
    try {
      module = caffe2::serialize::PyTorchStreamReader(path).hasRecord("constants.pkl");
    } catch (const std::exception&) {
    }
    if (module) return "is a checkpoint (or another TorchScript archive), not an export";
    // A run from before run ids wrote its export without one: its own, as far as can be told.
    if (run_id.empty() && holds_state_of(path, net)) return "";
    return "holds no run id (an export from before run ids, or another program's file), so it cannot be told to "
           "be this run's";
  }
  if (*theirs != run_id) return "is the export of run " + *theirs;
  return "";
}

}  // namespace blpa
