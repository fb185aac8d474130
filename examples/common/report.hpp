// examples/common/report.hpp — how the examples print their end-of-run report: printf-style
// formatting into a std::string, summary-table rows (label padded to 44 columns, then the value)
// and the verification block ("[ ok ]" / "[FAIL]" per check, then "verification passed" or
// "verification FAILED", which the examples' shell tests look for).
#pragma once

#include <cstdarg>
#include <cstdio>
#include <string>

namespace example {

/// printf into a std::string (the format is checked by the compiler like printf's).
[[gnu::format(printf, 1, 2)]] inline std::string format(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  va_list again;
  va_copy(again, args);
  const int n = std::vsnprintf(nullptr, 0, fmt, args);
  va_end(args);
  std::string out(n > 0 ? static_cast<std::size_t>(n) : 0, '\0');
  if (n > 0) std::vsnprintf(out.data(), out.size() + 1, fmt, again);
  va_end(again);
  return out;
}

/// One row of a summary table on stdout: "  <what, padded to 44> <value>".
inline void summary_row(const char* what, const std::string& value) { std::printf("  %-44s %s\n", what, value.c_str()); }

/// The verification block on stdout: a heading, one line per check, and a verdict.
class verification {
 public:
  /// Prints the heading; `width` pads the check names (the examples' tables differ slightly).
  explicit verification(int width = 44) : width_(width) { std::printf("verification\n"); }

  /// Prints "  [ ok ] what detail" or "  [FAIL] what detail" and remembers a failure.
  void check(const char* what, bool pass, const std::string& detail) {
    std::printf("  [%s] %-*s %s\n", pass ? " ok " : "FAIL", width_, what, detail.c_str());
    ok_ = ok_ && pass;
  }

  /// Prints the verdict line, flushes stdout, and returns whether every check passed.
  bool finish() {
    std::printf("%s\n", ok_ ? "verification passed" : "verification FAILED");
    std::fflush(stdout);
    return ok_;
  }

 private:
  int width_;
  bool ok_ = true;
};

}  // namespace example
