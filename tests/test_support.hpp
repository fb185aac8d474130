// Shared helpers for sluice's tests: seeds, sanitizer-aware scaling, CPU-time measurement.
#pragma once

#include <catch2/catch.hpp>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <string>

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
