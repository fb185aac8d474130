// sluice/detail/wait.hpp — spin-then-park waiting with deadlines and stop tokens (not public API).
//
// block_until(ec, ready, deadline, stop) is how every sluice blocking call waits: it checks
// `ready()` while spinning briefly (the fast path never parks), then parks on `ec` and re-checks
// after every wake-up. It returns when `ready()` is true, the deadline passes, or the stop token is
// triggered. The caller's wakers must make `ready()` true *before* calling ec.notify_*().
//
// Deadlines are std::chrono::steady_clock time points; deadline_after() and to_steady() convert a
// caller's duration or foreign-clock time point with sluice::saturating_add (deadline.hpp), the
// library's one saturating helper: a duration of hours::max() is "wait forever", a NaN duration is
// "already expired", never undefined behaviour.
#pragma once

#include <chrono>
#include <optional>
#include <stop_token>
#include <thread>
#include <type_traits>

#include "../deadline.hpp"
#include "event_count.hpp"

namespace sluice::detail {

using steady_time = std::chrono::steady_clock::time_point;

enum class wait_outcome { ready, timeout, cancelled };

/// now + d on steady_clock, through the library's one saturating helper (sluice::saturating_add,
/// deadline.hpp): saturates at steady_time::max(); d <= 0 and NaN give now (already expired).
template <class Rep, class Period>
[[nodiscard]] steady_time deadline_after(const std::chrono::duration<Rep, Period>& d) noexcept {
  const auto now = std::chrono::steady_clock::now();
  if (d <= d.zero()) return now;  // no rounding up of a negative value past now
  return sluice::saturating_add(now, d);
}

/// Converts a time point of any clock to a steady deadline (relative to that clock's now()).
/// Far-future and far-past time points saturate instead of overflowing; a NaN time point is now.
template <class Clock, class Duration>
[[nodiscard]] steady_time to_steady(const std::chrono::time_point<Clock, Duration>& tp) noexcept {
  if constexpr (std::is_same_v<Clock, std::chrono::steady_clock> &&
                std::is_same_v<Duration, std::chrono::steady_clock::duration>) {
    return tp;
  } else {
    // In long double (exact for int64 counts on x86-64 and AArch64 Linux): the difference of two
    // extreme time points cannot overflow, and a NaN stays NaN (then: now).
    using wide = std::chrono::duration<long double, typename Duration::period>;
    const auto remaining = wide(tp.time_since_epoch()) - std::chrono::duration_cast<wide>(Clock::now().time_since_epoch());
    return deadline_after(remaining);
  }
}

// The saturating helpers used to live here and in clock.hpp; the one copy is public now.
using sluice::saturating_add;
using sluice::saturating_ceil;

/// Spin iterations before parking. Short on purpose: on a machine with fewer cores than threads a
/// long spin steals the CPU from the very thread that would make the condition true.
inline constexpr int default_spins = 64;

/// The one spin-then-park loop. `park(key)` parks after prepare_wait() returned `key` and the
/// condition was re-checked false, consuming the registration; it returns false once its deadline
/// has been reached (then ready() is checked one last time). block_until() below and
/// block_on_clock() in clock.hpp differ only in the `park` they pass.
template <class Ready, class Park>
[[nodiscard]] wait_outcome block_with(event_count& ec, Ready&& ready, const std::stop_token* stop,
                                      int spins, Park&& park) {
  for (int i = 0; i < spins; ++i) {
    if (ready()) return wait_outcome::ready;
    cpu_relax();
  }
  if (ready()) return wait_outcome::ready;
  // A yield lets a preempted waker on the same core finish before we pay for a park. spins == 0
  // means the caller did its own spinning and yielding (sluice::channel): park at once.
  if (spins > 0) std::this_thread::yield();

  auto park_loop = [&]() -> wait_outcome {
    for (;;) {
      const auto key = ec.prepare_wait();
      if (ready()) {
        ec.cancel_wait();
        return wait_outcome::ready;
      }
      if (stop != nullptr && stop->stop_requested()) {
        ec.cancel_wait();
        return wait_outcome::cancelled;
      }
      if (!park(key)) return ready() ? wait_outcome::ready : wait_outcome::timeout;
    }
  };

  if (stop != nullptr && stop->stop_possible()) {
    // Wakes every parker on this event count; each re-checks its own condition and token.
    // Registered only on the slow path, so the fast path never touches the stop state.
    std::stop_callback on_stop(*stop, [&ec]() noexcept { ec.notify_all(); });
    return park_loop();
  }
  return park_loop();
}

/// Waits until ready() holds. `deadline` may be nullopt (no limit); `stop` may be null.
/// Returns ready as soon as ready() is observed true, even if the deadline also passed.
template <class Ready>
[[nodiscard]] wait_outcome block_until(event_count& ec, Ready&& ready,
                                       const std::optional<steady_time>& deadline,
                                       const std::stop_token* stop,
                                       int spins = default_spins) {
  return block_with(ec, ready, stop, spins, [&](event_count::key_type key) {
    if (!deadline) {
      ec.wait(key);
      return true;
    }
    return ec.wait_until(key, *deadline);
  });
}

}  // namespace sluice::detail
