// Shared helpers for sluice's tests: seeds, sanitizer-aware scaling, thread-count sweeps, bounded
// waits and watchdogs (a test that would hang fails instead), CPU-time measurement.
#pragma once

#include <catch2/catch.hpp>

#include <array>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <future>
#include <random>
#include <string>
#include <thread>
#include <utility>

#include <sys/resource.h>
#include <sys/time.h>

namespace sluice_test {

/// True when built with a sanitizer that slows execution by 5-20x.
constexpr bool under_sanitizer =
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
    true;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer)
    true;
#else
    false;
#endif
#else
    false;
#endif

/// Scales an iteration count down under sanitizers so stress tests keep their shape but fit the
/// CI budget.
constexpr std::size_t scaled(std::size_t n, std::size_t divisor = 10) {
  return under_sanitizer ? (n / divisor > 0 ? n / divisor : 1) : n;
}

/// The seed for a randomized test: SLUICE_TEST_SEED from the environment, else a fixed default so
/// runs are reproducible. Tests INFO() it, so a failure prints the seed to re-run with.
inline std::uint64_t seed(std::uint64_t fallback = 0x5eed5eedULL) {
  if (const char* env = std::getenv("SLUICE_TEST_SEED")) return std::strtoull(env, nullptr, 0);
  return fallback;
}

/// The thread counts a concurrency test sweeps: one thread, the machine's two cores, and more
/// threads than cores (where parking, not spinning, has to carry the load).
/// `for (int threads : sluice_test::thread_counts<>)`, or `thread_counts<std::size_t>`.
template <class T = int>
inline constexpr std::array<T, 4> thread_counts{T{1}, T{2}, T{4}, T{8}};

/// Polls `pred` (yielding) until it holds. False once `bound` of real time has passed, so a state
/// that never comes is a failed check instead of a hang. For "wait until a thread got there", never
/// for "wait until a deadline" (timed tests use sluice::testing::manual_clock).
template <class Pred>
bool eventually(Pred&& pred, std::chrono::milliseconds bound = std::chrono::seconds(20)) {
  const auto give_up = std::chrono::steady_clock::now() + bound;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > give_up) return false;
    std::this_thread::yield();
  }
  return true;
}

/// A watchdog for a call that might block forever: runs `f` on a thread and, if it has not
/// returned after `bound` (real time), calls `unblock` (close / release / notify) and waits for f,
/// so the test fails instead of hanging. True if f returned on its own within the bound. f's
/// exception, if any, is rethrown here.
template <class F, class U>
bool returns_within(std::chrono::milliseconds bound, F&& f, U&& unblock) {
  auto done = std::async(std::launch::async, std::forward<F>(f));
  if (done.wait_for(bound) == std::future_status::ready) {
    done.get();
    return true;
  }
  unblock();
  done.get();
  return false;
}

/// CPU time consumed so far by the calling thread.
inline std::chrono::microseconds thread_cpu_time() {
  rusage usage{};
  getrusage(RUSAGE_THREAD, &usage);
  return std::chrono::seconds(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
         std::chrono::microseconds(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec);
}

/// CPU time consumed so far by the whole process.
inline std::chrono::microseconds process_cpu_time() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return std::chrono::seconds(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
         std::chrono::microseconds(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec);
}

}  // namespace sluice_test
