// sluice/detail/reconcile_spin.hpp — time-bounded spinning for reconcile_pipeline (not public API).
//
// Spin loops bounded by a *count* of pause instructions cost whatever a pause costs on the host:
// ~10 cycles on some CPUs, ~100 ns on this EPYC VM, where 512 pauses spun 30-60 µs — longer than
// the futex park they were meant to avoid (review r1 F6). These spins are bounded by elapsed time
// instead, read from the CPU's time-stamp counter where there is one (x86), else by a short count.
//
//   tsc_ns_per_tick()     nanoseconds per TSC tick, calibrated once per process (2 ms against
//                         std::chrono::steady_clock), 1.0 without a TSC.
//   spin_budget(ns)       `while (!b.expired()) { cpu_relax(); ... }` spins for about `ns`.
#pragma once

#include <chrono>
#include <cstdint>

#include "event_count.hpp"

#if (defined(__x86_64__) || defined(__i386__)) && !defined(SLUICE_NO_TSC)
#include <x86intrin.h>
#define SLUICE_DETAIL_PIPELINE_TSC 1
#else
#define SLUICE_DETAIL_PIPELINE_TSC 0
#endif

namespace sluice::detail {

/// Starts loading a cache line the caller is about to write (a hint; a no-op where unsupported).
inline void prefetch_for_write(const void* p) noexcept {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 1);
#else
  (void)p;
#endif
}

/// Nanoseconds per time-stamp-counter tick, measured once per process over 2 ms against
/// std::chrono::steady_clock (both clocks run through any preemption, so the ratio holds).
inline double tsc_ns_per_tick() noexcept {
#if SLUICE_DETAIL_PIPELINE_TSC
  static const double value = [] {
    const auto s0 = std::chrono::steady_clock::now();
    const auto t0 = __rdtsc();
    auto s1 = s0;
    while (s1 - s0 < std::chrono::milliseconds(2)) s1 = std::chrono::steady_clock::now();
    const auto t1 = __rdtsc();
    const double ns = static_cast<double>(std::chrono::duration_cast<std::chrono::nanoseconds>(s1 - s0).count());
    return t1 > t0 ? ns / static_cast<double>(t1 - t0) : 1.0;
  }();
  return value;
#else
  return 1.0;
#endif
}

/// TSC ticks in `ns` nanoseconds (at least 1).
inline std::uint64_t tsc_ticks_for(double ns) noexcept {
  const double t = ns / tsc_ns_per_tick();
  return t < 1.0 ? 1 : static_cast<std::uint64_t>(t);
}

/// A spin that ends after about `Ns` nanoseconds (TSC), or after `Fallback` checks without a TSC.
template <unsigned Ns, unsigned Fallback>
class spin_budget {
 public:
  spin_budget() noexcept {
#if SLUICE_DETAIL_PIPELINE_TSC
    end_ = __rdtsc() + ticks();
#endif
  }
  /// Call once per spin iteration.
  [[nodiscard]] bool expired() noexcept {
#if SLUICE_DETAIL_PIPELINE_TSC
    return __rdtsc() >= end_;
#else
    return ++checks_ >= Fallback;
#endif
  }

 private:
#if SLUICE_DETAIL_PIPELINE_TSC
  static std::uint64_t ticks() noexcept {
    static const std::uint64_t value = tsc_ticks_for(static_cast<double>(Ns));
    return value;
  }
  std::uint64_t end_;
#else
  unsigned checks_ = 0;
#endif
};

}  // namespace sluice::detail
