// examples/common/progress.hpp — the examples' live progress line on stderr: redrawn in place
// ("\r") every `tty_period` when stderr is a terminal, printed as a new line every 2 s when it is
// not (CI logs), and never with --quiet. The caller renders the text; the line adds the elapsed
// time in front ("[  3.2s] ...").
#pragma once

#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <functional>
#include <mutex>
#include <stop_token>
#include <string>
#include <thread>
#include <utility>

namespace example {

/// A thread that prints the progress line until stop() (or destruction).
class progress_line {
 public:
  using clock = std::chrono::steady_clock;
  /// render(now) returns the line's text at `now`; it runs on the progress thread only.
  using render_fn = std::function<std::string(clock::time_point now)>;

  /// Starts printing: `start` is time zero of the elapsed-time prefix.
  progress_line(bool quiet, clock::time_point start, std::chrono::milliseconds tty_period, render_fn render)
      : tty_(!quiet && ::isatty(STDERR_FILENO) != 0), quiet_(quiet), start_(start), render_(std::move(render)) {
    if (quiet_) return;
    thread_ = std::jthread([this, tty_period](std::stop_token stop) { run(stop, tty_period); });
  }
  ~progress_line() { stop(); }
  progress_line(const progress_line&) = delete;
  progress_line& operator=(const progress_line&) = delete;

  /// Stops the thread (at once, not at its next tick) and ends a terminal line with a newline.
  void stop() {
    if (!thread_.joinable()) return;
    thread_.request_stop();
    thread_.join();
    if (tty_) std::fprintf(stderr, "\n");
  }

  /// True when the line is redrawn in place (stderr is a terminal and not --quiet).
  bool tty() const noexcept { return tty_; }

 private:
  void run(const std::stop_token& stop, std::chrono::milliseconds tty_period) {
    std::mutex m;
    std::condition_variable_any cv;  // never notified: the wait ends on its timeout or on stop()
    std::unique_lock lk(m);
    // Off a terminal the first line comes after 100 ms, then one every 2 s.
    auto period = tty_ ? tty_period : std::chrono::milliseconds(100);
    while (!cv.wait_for(lk, stop, period, [&stop] { return stop.stop_requested(); })) {
      if (!tty_) period = std::chrono::milliseconds(2000);
      const auto now = clock::now();
      const std::string text = render_(now);
      std::fprintf(stderr, "%s[%5.1fs] %s   %s", tty_ ? "\r" : "",
                   std::chrono::duration<double>(now - start_).count(), text.c_str(), tty_ ? "" : "\n");
    }
  }

  bool tty_;
  bool quiet_;
  clock::time_point start_;
  render_fn render_;
  std::jthread thread_;  // last: starts after, and is joined before, the members it reads
};

}  // namespace example
