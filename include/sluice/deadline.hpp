// sluice/deadline.hpp — saturating time arithmetic: "now + timeout" that cannot overflow.
//
// What it is for: every sluice call that takes a timeout turns it into a deadline with
// `sluice::saturating_add(clock.now(), timeout)`, and so can a Clock or a component you write
// (see clock.hpp). This is the library's one saturating helper; nothing else converts caller
// durations.
//
// Requirements: the time point's duration has an integral representation (every std clock's does);
// the added duration may be of any representation and period, integral or floating point.
//
// Guarantees (no undefined behaviour for any input):
// - tp + d saturates at time_point::max() / min() instead of overflowing: hours::max() means "as
//   late as representable", hours::min() "as early as representable".
// - Results are rounded up to the time point's resolution (1.5 ns at ns resolution is 2 ns), so a
//   deadline is never earlier than asked.
// - NaN counts as zero: saturating_add(tp, NaN) == tp, i.e. a NaN timeout is "due now" / already
//   expired — a try_*_for(NaN) call polls once and returns instead of waiting forever, and a
//   requeue_queue entry scheduled with a NaN delay is due at once. +inf and -inf saturate like any
//   value too large to represent.
// Never: allocates, throws, reads a clock.
//
// Example:
//   const auto deadline = sluice::saturating_add(std::chrono::steady_clock::now(), timeout);
//   auto forever = sluice::saturating_add(std::chrono::steady_clock::now(), std::chrono::hours::max());
//   // forever == std::chrono::steady_clock::time_point::max()
#pragma once

#include <chrono>
#include <type_traits>

namespace sluice {

namespace detail {
// Tested on the caller's own representation, before any arithmetic (NaN arithmetic is not a
// constant expression).
template <class Rep, class Period>
constexpr bool is_nan(const std::chrono::duration<Rep, Period>& d) noexcept {
  if constexpr (std::chrono::treat_as_floating_point_v<Rep>) {
    return d.count() != d.count();
  } else {
    return false;
  }
}
}  // namespace detail

/// `d` converted to the integral duration To, rounded up, saturating at To::max()/To::min()
/// instead of overflowing; NaN gives To::zero(). Thread-safe. Never allocates.
template <class To, class Rep, class Period>
[[nodiscard]] constexpr To saturating_ceil(const std::chrono::duration<Rep, Period>& d) noexcept {
  static_assert(!std::chrono::treat_as_floating_point_v<typename To::rep>,
                "sluice::saturating_ceil: the target duration must have an integral representation");
  if constexpr (std::is_same_v<std::chrono::duration<Rep, Period>, To>) {
    return d;
  } else {
    // long double holds every int64 exactly on x86-64 and AArch64 Linux. Where it is only a
    // double, the strict comparisons against the rounded-up wide(To::max()) still keep every
    // conversion below in range; only precision near the ends is lost.
    if (detail::is_nan(d)) return To::zero();
    using wide = std::chrono::duration<long double, typename To::period>;
    const wide w = std::chrono::duration_cast<wide>(d);
    if (!(w < wide(To::max()))) return To::max();
    if (!(w > wide(To::min()))) return To::min();
    return std::chrono::ceil<To>(w);
  }
}

/// tp + d, saturating at time_point::max()/min(); a NaN `d` counts as zero (tp is returned).
/// `d` may be of any duration type. Thread-safe. Never allocates.
template <class Clock, class Dur, class Rep, class Period>
[[nodiscard]] constexpr std::chrono::time_point<Clock, Dur> saturating_add(
    const std::chrono::time_point<Clock, Dur>& tp, const std::chrono::duration<Rep, Period>& d) noexcept {
  static_assert(!std::chrono::treat_as_floating_point_v<typename Dur::rep>,
                "sluice::saturating_add: the time point must have an integral representation");
  using tp_type = std::chrono::time_point<Clock, Dur>;
  const Dur since = tp.time_since_epoch();
  const auto add_fitting = [&](Dur dd) {
    // Integer addition, checked against the range before adding.
    if (dd > Dur::zero() && since > Dur::max() - dd) return tp_type::max();
    if (dd < Dur::zero() && since < Dur::min() - dd) return tp_type::min();
    return tp + dd;
  };
  if constexpr (std::is_same_v<std::chrono::duration<Rep, Period>, Dur>) {
    return add_fitting(d);  // the common case (a clock's own duration): integers only
  } else {
    if (detail::is_nan(d)) return tp;  // due now
    using wide = std::chrono::duration<long double, typename Dur::period>;
    const wide w = std::chrono::duration_cast<wide>(d);
    if (w < wide(Dur::max()) && w > wide(Dur::min())) return add_fitting(saturating_ceil<Dur>(d));
    // d alone is out of Dur's range; the sum may still be in range (tp far from the epoch).
    const wide sum = wide(since) + w;
    if (!(sum < wide(Dur::max()))) return tp_type::max();
    if (!(sum > wide(Dur::min()))) return tp_type::min();
    return tp_type(std::chrono::ceil<Dur>(sum));
  }
}

}  // namespace sluice
