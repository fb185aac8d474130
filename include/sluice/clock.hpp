// sluice/clock.hpp — the clock concept every timed sluice component is written against, and the
// default adapter over std::chrono::steady_clock.
//
// What it is for: timed components (requeue_queue, and later the write-behind batcher's linger
// timers and the pipelines' workers) never call std::chrono::steady_clock directly. They take a
// `Clock` template parameter satisfying `sluice::clock_source`, read time with `clock.now()` and
// park with `clock.wait_until(ec, key, deadline)` on a sluice::event_count (event_count.hpp).
// Production code uses `sluice::steady_clock` (the default); tests use
// `sluice::testing::manual_clock` and move time by hand, without sleeping.
//
// The waiting contract (what lets a test clock interrupt a sleeping component):
//   key = ec.prepare_wait();                  // 1. register on the component's event_count
//   if (condition or deadline reached) ec.cancel_wait();   // 2. re-check (deadline via clock.now())
//   else clock.wait_until(ec, key, deadline); // 3. park; consumes the registration
// `wait_until` returns when `ec` is notified, when `deadline` is reached on *this clock*, or
// spuriously; callers always loop and re-check. steady_clock parks on a futex with a real
// deadline. manual_clock parks with no real deadline, and every advance()/set() notifies each
// event_count currently parked on it, so the component wakes, re-reads now() and sees what is due.
// `wait(ec, key)` is the same without a deadline; a component that is idle must still park through
// its clock (not on `ec` directly), so a manual clock can count it as "blocked on the clock".
// One exception: reconcile_pipeline's monitor thread ticks on real time whatever the Clock (it
// bounds how long work waits for a parked worker: liveness, not a schedule); a manual clock does
// not count it.
//
// Convention every component follows: a Clock is a cheap copyable *handle*, held by value and taken
// by value in constructors (`requeue_queue(..., Clock clock = Clock{})`). Copies of a manual_clock
// share one timeline, so the test keeps one copy and advances it while the component holds another.
// Deadlines are the clock's own `time_point`s; durations are added with `sluice::saturating_add`
// (deadline.hpp), so `hours::max()` means "as late as representable" and NaN means "now", never
// overflow or undefined behaviour.
//
// Guarantees: now() is monotonic (is_steady). wait*/wait_until never allocate on steady_clock.
// Never: spins, sleeps in a loop, or takes a lock on steady_clock.
//
// Example:
//   sluice::event_count ec;
//   sluice::steady_clock clock;
//   const auto deadline = sluice::saturating_add(clock.now(), 5ms);
//   auto key = ec.prepare_wait();
//   if (clock.now() >= deadline) ec.cancel_wait(); else clock.wait_until(ec, key, deadline);
#pragma once

#include <chrono>
#include <concepts>
#include <optional>
#include <stop_token>
#include <thread>
#include <type_traits>

#include "deadline.hpp"
#include "detail/wait.hpp"
#include "event_count.hpp"

namespace sluice {

/// A source of time a sluice component can read and park on. See the file comment for the
/// waiting contract. Models must be cheap to copy; copies must observe the same time.
template <class C>
concept clock_source =
    std::copy_constructible<C> &&
    requires(const C& c, event_count& ec, event_count::key_type key,
             typename C::time_point tp) {
      typename C::duration;
      typename C::time_point;
      { c.now() } -> std::same_as<typename C::time_point>;
      { c.wait(ec, key) } -> std::same_as<void>;
      { c.wait_until(ec, key, tp) } -> std::same_as<bool>;
    };

/// The default clock: std::chrono::steady_clock, parking on a futex with an absolute deadline.
/// Its time_point is std::chrono::steady_clock::time_point, so callers pass standard time points.
struct steady_clock {
  using base_clock = std::chrono::steady_clock;
  using rep = base_clock::rep;
  using period = base_clock::period;
  using duration = base_clock::duration;
  using time_point = base_clock::time_point;
  static constexpr bool is_steady = true;

  /// Current time. Thread-safe. Never allocates. Never blocks.
  [[nodiscard]] static time_point now() noexcept { return base_clock::now(); }

  /// Parks until `ec` is notified after prepare_wait() returned `key` (or spuriously). Consumes
  /// the registration. Thread-safe. Never allocates. May block.
  static void wait(event_count& ec, event_count::key_type key) noexcept { ec.wait(key); }

  /// As wait(), but also returns at `deadline`. Returns false if the deadline passed without a
  /// notification. Thread-safe. Never allocates. May block.
  static bool wait_until(event_count& ec, event_count::key_type key,
                         time_point deadline) noexcept {
    return ec.wait_until(key, deadline);
  }
};

static_assert(clock_source<steady_clock>);

namespace detail {

/// block_until() for components with a Clock: waits until ready() holds, the clock reaches
/// `deadline` (nullopt: no limit), or `stop` (may be null) is triggered. Spins `spins` times on
/// ready() first, then parks through clock.wait*/wait_until so a manual clock can wake it. The
/// caller's wakers make ready() true before calling ec.notify_*(). Returns ready as soon as ready()
/// is observed true. May block. Never allocates.
template <clock_source Clock, class Ready>
[[nodiscard]] wait_outcome block_on_clock(const Clock& clock, event_count& ec, Ready&& ready,
                                          const std::optional<typename Clock::time_point>& deadline,
                                          const std::stop_token* stop, int spins = default_spins) {
  return block_with(ec, ready, stop, spins, [&](event_count::key_type key) {
    if (!deadline) {
      clock.wait(ec, key);
      return true;
    }
    if (clock.now() >= *deadline) {
      ec.cancel_wait();
      return false;
    }
    clock.wait_until(ec, key, *deadline);
    return true;
  });
}

}  // namespace detail
}  // namespace sluice
