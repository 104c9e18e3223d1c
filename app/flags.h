// Numbers from the command line, parsed whole and named in errors. cxxopts' own conversion
// says only "Argument 'abc' failed to parse", without the flag, so numeric options are
// declared as strings and converted here.
#pragma once

#include <blpa/train.h>

#include <algorithm>
#include <charconv>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cxxopts.hpp>
#include <iostream>
#include <limits>
#include <set>
#include <sys/stat.h>
#include <string>
#include <type_traits>
#include <vector>

namespace blpa {

template <typename T>
T parse_number(const std::string& flag, const std::string& text) {
  T v{};
  // from_chars takes no '+', which strtod took: "+0.1" is 0.1 (and "+-1" still no number).
  const char* begin = text.data() + (text.size() > 1 && text[0] == '+' && text[1] != '-' ? 1 : 0);
  const char* end = text.data() + text.size();
  if constexpr (std::is_integral_v<T>) {
    const auto [p, ec] = std::from_chars(begin, end, v);
    if (ec == std::errc::result_out_of_range) throw FlagError(flag + ": '" + text + "' is out of range");
    if (ec != std::errc() || p != end || text.empty())
      throw FlagError(flag + ": '" + text + "' is not " + (std::is_signed_v<T> ? "an integer" : "a non-negative integer"));
  } else {
    // As the integers: decimal only (strtod also took hex and leading spaces), and a value past
    // T's range named as such (1e39 became a float's inf, called "not finite").
    double d = 0;
    const auto [p, ec] = std::from_chars(begin, end, d);
    if (ec == std::errc::result_out_of_range) throw FlagError(flag + ": '" + text + "' is out of range");
    if (ec != std::errc() || p != end || text.empty()) throw FlagError(flag + ": '" + text + "' is not a number");
    if (!std::isfinite(d)) throw FlagError(flag + ": '" + text + "' is not a finite number");
    v = static_cast<T>(d);
    if (std::abs(d) > std::numeric_limits<T>::max() || (d != 0 && v == 0))  // 1e-50 is no float's 0
      throw FlagError(flag + ": '" + text + "' is out of range");
  }
  return v;
}

// A comma list given to `flag`: at least one item, none empty ("3,,5" is a typo, not 3,5).
inline std::vector<std::string> comma_list(const std::string& flag, const std::string& list) {
  std::vector<std::string> out;
  for (size_t at = 0;;) {
    const size_t comma = list.find(',', at);
    out.push_back(list.substr(at, comma == std::string::npos ? std::string::npos : comma - at));
    if (out.back().empty())
      throw FlagError(list.empty() ? flag + " needs a value"
                                   : flag + ": '" + list + "' has an empty item (a stray comma?)");
    if (comma == std::string::npos) return out;
    at = comma + 1;
  }
}

// The value of a numeric option declared with cxxopts::value<std::string>().
template <typename T>
T number(const cxxopts::ParseResult& a, const std::string& name) {
  return parse_number<T>("--" + name, a[name].as<std::string>());
}

// A switch (an option without a value): given, and not given as --name=false (or =0, =f;
// cxxopts takes no other word), which cxxopts parses but counts as given.
inline bool switched_on(const cxxopts::ParseResult& a, const std::string& name) {
  return a.count(name) > 0 && a[name].as<bool>();
}

// The long names of the options, or of the switches (options without a value) only.
inline std::set<std::string> long_names(cxxopts::Options& o, bool switches_only = false) {
  std::set<std::string> names;
  for (const auto& group : o.groups())
    for (const auto& option : o.group_help(group).options)
      if (option.is_boolean || !switches_only) names.insert(option.l.begin(), option.l.end());
  return names;
}

// Edits (insert, delete, replace) from a to b.
inline size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = up;
    }
  }
  return row[b.size()];
}

// " (did you mean --X?)" for a mistyped option: first the options that share a word with it
// (--port: --master-port; --augment: --no-augment; --batch-size: --batch) or that it begins,
// as a plural too (--iters: --iterations); else those within two edits (one for three letters
// or fewer). Nothing where more than three are that close.
inline std::string did_you_mean(cxxopts::Options& o, const std::string& typed) {
  const std::string stem = typed.size() > 3 && typed.back() == 's' ? typed.substr(0, typed.size() - 1) : typed;
  std::vector<std::string> strong, near;
  for (const auto& name : long_names(o)) {
    const std::string words = "-" + name + "-", typed_words = "-" + typed + "-";
    if (words.find(typed_words) != std::string::npos ||
        (name.size() >= 4 && typed_words.find(words) != std::string::npos) ||
        (stem.size() >= 3 && name.rfind(stem, 0) == 0))
      strong.push_back("--" + name);
    else if (edit_distance(typed, name) <= (typed.size() <= 3 ? 1 : 2))
      near.push_back("--" + name);
  }
  // A near name that holds a strong one is the more specific (--checkpoint-evry: not
  // --checkpoint, which it holds, but --checkpoint-every).
  for (auto& s : strong)
    for (const auto& n : near)
      if (n.find(s) != std::string::npos) s = n;
  std::sort(strong.begin(), strong.end());
  strong.erase(std::unique(strong.begin(), strong.end()), strong.end());
  const auto& close = strong.empty() ? near : strong;
  if (close.empty() || close.size() > 3) return "";
  std::string list = close[0];
  for (size_t i = 1; i < close.size(); ++i) list += (i + 1 == close.size() ? " or " : ", ") + close[i];
  return " (did you mean " + list + "?)";
}

// The name in "--name" or "--name=value"; "" for any other argument.
inline std::string flag_name(const std::string& arg) {
  if (arg.rfind("--", 0) != 0 || arg.size() == 2) return "";
  const auto eq = arg.find('=');
  return arg.substr(2, eq == std::string::npos ? std::string::npos : eq - 2);
}

// cxxopts' parse, its errors as FlagError. A switch given a word it does not take
// (--overwrite=no) is named: cxxopts said only "Argument 'no' failed to parse". (Numeric
// options are strings, so only switches fail this way.) An unknown option is followed by
// those it may have meant ("--out-dir does not exist" read as a missing folder).
inline cxxopts::ParseResult parse_flags(cxxopts::Options& o, int argc, const char* const* argv) {
  // An option whose value is left out takes the next flag as its value ("--precision
  // --print-config" said "--precision must be ..., got '--print-config'"; a path flag would
  // have taken it as a file name).
  const std::set<std::string> names = long_names(o), switches = long_names(o, /*switches_only=*/true);
  const auto option_name = [&](const std::string& arg) {  // flag_name where it is one of o's
    const std::string name = flag_name(arg);
    return names.count(name) ? name : std::string();
  };
  for (int i = 1; i + 1 < argc; ++i) {
    const std::string arg = argv[i], name = option_name(arg);
    if (arg == "--") break;
    if (name.empty() || switches.count(name) || arg.find('=') != std::string::npos) continue;
    if (!option_name(argv[i + 1]).empty())
      throw FlagError(arg + " needs a value, and was followed by the flag " + argv[i + 1]);
    ++i;  // its value
  }
  try {
    return o.parse(argc, argv);
  } catch (const cxxopts::exceptions::missing_argument& e) {  // Option 'name' is missing an argument: the last
    if (argc > 1 && !option_name(argv[argc - 1]).empty()) throw FlagError(std::string(argv[argc - 1]) + " needs a value");
    throw FlagError(e.what());
  } catch (const cxxopts::exceptions::no_such_option& e) {
    const std::string what = e.what();  // Option 'name' does not exist (or with Unicode quotes)
    const auto names_it = [&](const std::string& name) {
      return what.find("'" + name + "'") != std::string::npos ||
             what.find("\u2018" + name + "\u2019") != std::string::npos;
    };
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i], name = flag_name(arg);
      if (!name.empty() && names_it(name))  // as the flag is typed
        throw FlagError("unknown option --" + name + did_you_mean(o, name));
      if (name.empty() && arg.size() >= 2 && arg[0] == '-' && arg[1] != '-' && names_it(arg.substr(1, 1)))  // -x
        throw FlagError("unknown option -" + arg.substr(1, 1) + " (the options are long ones, --name; -h is --help)");
    }
    throw FlagError(what);
  } catch (const cxxopts::exceptions::incorrect_argument_type& e) {
    const std::string what = e.what();
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      const auto eq = arg.find('=');
      if (arg.rfind("--", 0) != 0 || eq == std::string::npos || !switches.count(arg.substr(2, eq - 2))) continue;
      const std::string value = arg.substr(eq + 1);  // quoted as 'value' or, with Unicode, as ‘value’
      if (what == "Argument '" + value + "' failed to parse" ||
          what == "Argument \u2018" + value + "\u2019 failed to parse")
        throw FlagError(arg + ": " + arg.substr(0, eq) + " is a switch: give it alone, or =true or =false");
    }
    throw FlagError(what);
  } catch (const cxxopts::exceptions::exception& e) {
    throw FlagError(e.what());
  }
}

// Arguments no option took ("--json false" leaves "false"): refused, not ignored.
inline void refuse_unmatched(const cxxopts::ParseResult& a) {
  if (!a.unmatched().empty()) throw FlagError("unexpected argument '" + a.unmatched()[0] + "'");
}

// A file a flag names, to be read (a checkpoint): one that does not exist, or a folder, is a
// bad flag (exit 2, as blpa-train's --resume of a missing checkpoint), where one that cannot
// be read, or is damaged, is an error of the run (exit 1), found as it is read.
inline void require_file(const std::string& flag, const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT || errno == ENOTDIR) throw FlagError(flag + " " + path + ": no such file");
    return;  // EACCES and the like: said by the reader, with its reason
  }
  if (S_ISDIR(st.st_mode)) throw FlagError(flag + " " + path + ": is a directory");
}

// --threads n: LibTorch's CPU threads, 0 for its default.
inline void set_threads(int n) {
  check_threads(n);
  if (n > 0) torch::set_num_threads(n);
}

// What a program prints on standard output is its result (scores, predictions, JSON, a
// configuration): where it could not all be written (a full disk), the program fails, with
// exit 1 where it would have exited 0, and says so. Called with the code main returns.
inline int checked_output(const char* program, int code) {
  errno = 0;
  std::cout.flush();  // with stdio synchronised, this is the fflush that fails
  const int cout_err = std::cout ? 0 : errno;
  errno = 0;
  const bool flush_failed = std::fflush(stdout) != 0;
  const int err = flush_failed ? errno : cout_err;  // an earlier write's errno is not kept: none is said
  if (!flush_failed && !std::ferror(stdout) && std::cout) return code;
  std::cerr << program << ": standard output could not be written"
            << (err ? std::string(" (") + std::strerror(err) + ")" : std::string())
            << "; what it holds is incomplete\n";
  return code == 0 ? 1 : code;
}

}  // namespace blpa
