// sluice/write_behind.hpp — write-behind batcher: callers hand values over and return at once;
// flusher threads persist them in batches through a sink you provide.
//
// What it is for: a cache or a reconcile loop whose writes (status updates, upserts) may be late by a
// few milliseconds but must never be lost, duplicated, reordered per key or replayed stale. It is the
// seed's write-behind queue to PostgreSQL done right: retries never re-enter the bounded intake,
// each item of a batch has its own result, retries back off, counters move only after the sink has
// returned, a retried old value never lands after a newer value of its key, and nothing pending is
// lost at shutdown.
//
// Two modes:
//   write_behind<T>            unkeyed: every value is written, in enqueue order, except that a
//                              retried value is written after values enqueued later than it (and with
//                              flushers > 1, batches in the sink concurrently may finish in any order).
//   write_behind<T, Key>       keyed: at most one pending value per key, the newest wins (the older one
//                              is counted coalesced and never written). A value of key k is never in
//                              the sink while an earlier value of k is, and never written after a newer
//                              value of k was: a retry of an old value is superseded, not replayed.
//                              The key is options.key_of(value), or value.key if key_of is empty.
//
// Requirements: T nothrow-move-constructible, nothrow-move-assignable, nothrow-destructible. Key
// (keyed) satisfies sluice::hashable_key<Key, Hash, KeyEqual>; Hash, KeyEqual and Key's copy may
// throw: a value whose key cannot be hashed, compared or copied goes to on_failed (permanent). Clock satisfies sluice::clock_source.
// The sink is callable as sink(std::span<const T>, write_behind_results&) or, for a sink that
// never fails an item, sink(std::span<const T>). It runs on a flusher thread; with flushers > 1
// several calls run at once (on disjoint keys in keyed mode). It may throw anything: the whole batch
// is then retryable (marks it made are ignored) with the exception's text as the reason.
// on_failed(T&&, const write_behind_failure&) runs on a flusher thread (or in stop()), never under a
// lock; it may throw (caught, counted in on_failed_errors). The sink and on_failed must not call
// flush() or stop() of the same batcher, nor block on its full intake.
//
// Guarantees:
//  - Nothing accepted is lost: a value whose enqueue returned ok ends persisted, coalesced (keyed),
//    or passed to on_failed with a reason, exactly once. A call that does not return ok leaves the
//    caller's value as it was (moved back; the const T& forms copy first and never touch it).
//  - Retries wait outside the intake, in a retry buffer ordered by deadline (a 4-ary heap, no scan):
//    a full intake never drops or delays a retry, and a retrying key never blocks other keys.
//    The n-th retry of a value waits max(backoff(n), the sink's min_delay hint).
//  - Bounded: the intake holds at most `capacity` values; the flushers take from it only while the
//    values they hold (pending + retrying; keyed: keys with state) are fewer than `capacity`, so a
//    failing sink turns into backpressure, never into growth.
//  - A batch goes to the sink when it has max_batch values, when its oldest value has waited
//    `linger`, when a retry is due, or at once while a flush() or stop() is in progress. Waiting is
//    counted from when a flusher takes the value from the intake, or from when the producer that
//    woke it enqueued (one clock read per take and one per wake-up, none per enqueue). While every
//    flusher is in the sink, values wait in the intake and a full batch goes as soon as one returns.
//  - flush() returns once everything enqueued before the call is persisted or reported failed.
//  - stop() closes the intake (blocked and later enqueues return closed), keeps flushing, retries
//    included, until everything is done or drain_timeout has passed, then reports everything still
//    unwritten to on_failed with reason shutdown; it returns once the flushers have exited (a sink
//    call in progress is waited for, never abandoned). Idempotent, safe from several threads; the
//    destructor calls it, so a destructor may block for up to drain_timeout (30 s by default, on
//    Clock) plus one sink call when the sink keeps failing; with testing::manual_clock another
//    thread must advance the clock past the drain deadline (or use drain_timeout 0).
//  - Idle costs nothing: flushers park through the clock and wake on the first value, on the linger
//    or retry deadline, on flush()/stop() — never on a polling tick. Producers make a system call
//    only when a flusher is parked and their value completes what it waits for (the first value, or a
//    full batch while it lingers). A producer blocked on a full intake parks until a quarter of it is
//    free (or the flushers go idle), then takes any free slot.
//
// Never: drops, duplicates or silently loses a value; writes a value after a newer one of its key;
// retries through the intake; lets a sink or on_failed exception escape; spins while idle.
//
// Example:
//   struct row { std::string key; std::string value; };
//   sluice::write_behind<row, std::string> wb({.max_batch = 256, .linger = 5ms},
//       [&](std::span<const row> batch, sluice::write_behind_results& r) {
//         for (std::size_t i = 0; i < batch.size(); ++i) if (!db.upsert(batch[i])) r.retry(i);
//       });
//   (void)wb.enqueue(row{"user:1", "alice"});
//   wb.flush();      // everything above is written (or reported to on_failed)
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <stop_token>
#include <type_traits>
#include <utility>

#include "backoff.hpp"
#include "clock.hpp"
#include "detail/write_behind_engine.hpp"
#include "detail/write_behind_results.hpp"
#include "key.hpp"

namespace sluice {

/// Configuration of a write_behind. Every field is validated by the constructor
/// (std::invalid_argument naming the field and the value).
template <class T, class Key = void>  // Key = void: unkeyed
struct write_behind_options {
  std::size_t capacity = 8192;  ///< intake size (>= 1, >= max_batch); also bounds what flushers hold
  std::size_t max_batch = 512;  ///< values per sink call (>= 1)
  std::chrono::nanoseconds linger = std::chrono::milliseconds(5);  ///< >= 0; max wait of a batch's oldest value
  /// Retry policy: the n-th retry of a value waits about base * multiplier^(n-1), at most max,
  /// jittered; after max_retries retries (nullopt: no limit) the value is reported retries_exhausted.
  backoff_options retry{.base = std::chrono::milliseconds(100),
                        .max = std::chrono::seconds(1),
                        .multiplier = 2.0,
                        .jitter = jitter_mode::equal,
                        .max_retries = 10};
  std::size_t flushers = 1;  ///< flusher threads = sink calls at once (1..256)
  /// 0, or 100us..100ms: each flusher thread asks Linux's scheduler (EEVDF, kernel >= 6.12) for this
  /// time slice instead of the default (sched_attr.sched_runtime; unprivileged; nice and policy are
  /// kept). A flusher runs briefly, and a short slice lets its wake-up (a full batch, linger, a sink
  /// call returning) preempt a CPU-bound task sooner: on a loaded machine the linger bound then
  /// holds far more often. 0 leaves the threads alone; elsewhere, or on older kernels, it has no effect.
  std::chrono::nanoseconds flusher_slice{0};
  std::chrono::nanoseconds drain_timeout = std::chrono::seconds(30);  ///< >= 0; how long stop() keeps flushing
  /// Receives every value given up on. May be empty (the values are then only counted).
  std::function<void(T&&, const write_behind_failure&)> on_failed{};
  /// Keyed mode only: the key of a value. Empty: value.key is used (it must exist then).
  std::function<Key(const T&)> key_of{};
  /// Seed of the jitter's random engine; 0: from std::random_device.
  std::uint64_t seed = 0;
};

template <class T, class Key = void, clock_source Clock = steady_clock, class Hash = std::hash<Key>,
          class KeyEqual = std::equal_to<Key>>
class write_behind {
  static_assert(std::is_object_v<T> && !std::is_const_v<T> && !std::is_array_v<T>,
                "sluice::write_behind<T>: T must be a non-const, non-array object type");
  // One message per case (a type that cannot move at all is not told to mark a move noexcept).
  static_assert(!std::is_object_v<T> || std::is_move_constructible_v<T>,
                "sluice::write_behind<T>: T can be neither moved nor copied (std::mutex, for example), and values "
                "are moved into the batcher and back to the caller: enqueue a std::unique_ptr<T> instead");
  static_assert(!std::is_move_constructible_v<T> || std::is_nothrow_move_constructible_v<T>,
                "sluice::write_behind<T>: T's move constructor (or, if it has none, its copy constructor) may "
                "throw, which could lose a value halfway through an enqueue: mark the move constructor "
                "noexcept, or enqueue a std::unique_ptr<T> instead");
  static_assert(!std::is_move_constructible_v<T> || std::is_move_assignable_v<T>,
                "sluice::write_behind<T>: T must be move-assignable (a refused value is moved back to the caller)");
  static_assert(!std::is_move_constructible_v<T> || !std::is_move_assignable_v<T> ||
                    std::is_nothrow_move_assignable_v<T>,
                "sluice::write_behind<T>: T's move assignment (or, if it has none, its copy assignment) may throw, "
                "and a refused value is moved back to the caller with it: mark the move assignment noexcept");
  static_assert(std::is_nothrow_destructible_v<T>,
                "sluice::write_behind<T>: T's destructor must be accessible and must not throw");

  struct key_check {
    template <class K>
    static constexpr bool ok() {
      if constexpr (std::is_void_v<K>) {
        return true;
      } else {
        return hashable_key<K, Hash, KeyEqual>;
      }
    }
  };
  static_assert(key_check::template ok<Key>(),
                "sluice::write_behind<T, Key>: Key must be copyable, hashable and equality-comparable: "
                "give it a std::hash<Key> specialisation and operator==, or pass Hash / KeyEqual "
                "(see sluice::hashable_key in <sluice/key.hpp>)");

  // Every requirement above holds: the real engine; otherwise a stand-in, so that the failed
  // assertion is the only error.
  static constexpr bool usable = std::is_object_v<T> && !std::is_const_v<T> && !std::is_array_v<T> &&
                                 std::is_nothrow_move_constructible_v<T> && std::is_nothrow_move_assignable_v<T> &&
                                 std::is_nothrow_destructible_v<T> && key_check::template ok<Key>();
  using engine_type = std::conditional_t<usable, detail::write_behind_engine<T, Key, Clock, Hash, KeyEqual>,
                                         detail::write_behind_unusable_engine<T, Key, Clock>>;

 public:
  using value_type = T;
  using key_type = Key;
  using clock_type = Clock;
  using time_point = typename Clock::time_point;
  using options_type = write_behind_options<T, Key>;
  using sink_type = std::function<void(std::span<const T>, write_behind_results&)>;

  /// Starts options.flushers flusher threads. `sink` is callable as sink(span<const T>,
  /// write_behind_results&) or sink(span<const T>). Throws std::invalid_argument for bad options
  /// (naming the field and value) or an empty sink; std::bad_alloc / std::system_error from setup.
  template <class Sink>
    requires(std::is_invocable_v<Sink&, std::span<const T>, write_behind_results&> ||
             std::is_invocable_v<Sink&, std::span<const T>>)
  write_behind(options_type options, Sink sink, Clock clock = Clock{})
      : engine_(std::move(options), detail::make_write_behind_sink<T>(std::move(sink)), std::move(clock)) {}

  write_behind(const write_behind&) = delete;
  write_behind& operator=(const write_behind&) = delete;

  /// stop(): drains for up to drain_timeout, reports the rest, joins the flushers.
  ~write_behind() = default;

  // ---- intake ---------------------------------------------------------------------------
  // Each form returns ok and takes the value, or returns another status and leaves `value` as it
  // was. Thread-safe. Never allocates. Only enqueue, the stop_token form and the timed forms block.

  /// Enqueues, waiting while the intake is full (backpressure). ok or closed. May block.
  [[nodiscard]] write_behind_status enqueue(T&& value) noexcept { return engine_.put(value, std::nullopt, nullptr, true); }
  /// As enqueue(), but returns cancelled if `stop` is triggered while waiting. May block.
  [[nodiscard]] write_behind_status enqueue(T&& value, std::stop_token stop) noexcept {
    return engine_.put(value, std::nullopt, &stop, true);
  }
  /// Enqueues only if there is room now: full instead of waiting. Never blocks.
  [[nodiscard]] write_behind_status try_enqueue(T&& value) noexcept {
    return engine_.put(value, std::nullopt, nullptr, false);
  }
  /// Waits at most `timeout` (on Clock) for room. May block.
  template <class Rep, class Period>
  [[nodiscard]] write_behind_status try_enqueue_for(T&& value, const std::chrono::duration<Rep, Period>& timeout) noexcept {
    return engine_.put(value, detail::saturating_add(engine_.clock().now(), timeout), nullptr, true);
  }
  /// Waits until `deadline` (a Clock time point) for room. May block.
  [[nodiscard]] write_behind_status try_enqueue_until(T&& value, time_point deadline) noexcept {
    return engine_.put(value, deadline, nullptr, true);
  }

  // Copying forms: the copy is made first, so the caller's value is never touched. May throw what
  // T's copy constructor throws (before anything is enqueued).
  [[nodiscard]] write_behind_status enqueue(const T& value) requires std::is_copy_constructible_v<T> {
    return enqueue(T(value));
  }
  [[nodiscard]] write_behind_status enqueue(const T& value, std::stop_token stop) requires std::is_copy_constructible_v<T> {
    return enqueue(T(value), std::move(stop));
  }
  [[nodiscard]] write_behind_status try_enqueue(const T& value) requires std::is_copy_constructible_v<T> {
    return try_enqueue(T(value));
  }
  template <class Rep, class Period>
  [[nodiscard]] write_behind_status try_enqueue_for(const T& value, const std::chrono::duration<Rep, Period>& timeout)
    requires std::is_copy_constructible_v<T> { return try_enqueue_for(T(value), timeout); }
  [[nodiscard]] write_behind_status try_enqueue_until(const T& value, time_point deadline)
    requires std::is_copy_constructible_v<T> { return try_enqueue_until(T(value), deadline); }

  // ---- flush and stop -------------------------------------------------------------------

  /// Blocks until everything enqueued before the call is persisted or reported failed (batches
  /// go out without lingering meanwhile; retries still wait their backoff). Thread-safe. May block.
  void flush() { (void)engine_.flush(std::nullopt); }
  /// As flush(), giving up after `timeout` on Clock; returns whether everything was done.
  template <class Rep, class Period>
  [[nodiscard]] bool flush_for(const std::chrono::duration<Rep, Period>& timeout) {
    return engine_.flush(detail::saturating_add(engine_.clock().now(), timeout));
  }
  /// As flush(), giving up at `deadline` on Clock; returns whether everything was done.
  [[nodiscard]] bool flush_until(time_point deadline) { return engine_.flush(deadline); }

  /// Stops intake, flushes (retries included) until done or drain_timeout, reports the rest with
  /// reason shutdown, joins the flushers. Idempotent; concurrent callers all return once it is done.
  /// Must not be called from the sink or on_failed. Thread-safe. May block.
  void stop() noexcept { engine_.stop(); }

  // ---- observers --------------------------------------------------------------------------

  /// A consistent snapshot of the counters (see write_behind_metrics). Thread-safe. Never blocks
  /// for long (takes the flushers' lock briefly).
  [[nodiscard]] write_behind_metrics metrics() const { return engine_.metrics(); }

  [[nodiscard]] const options_type& options() const noexcept { return engine_.options(); }
  [[nodiscard]] std::size_t capacity() const noexcept { return engine_.options().capacity; }
  /// True once stop() has begun. Thread-safe.
  [[nodiscard]] bool is_stopped() const noexcept { return engine_.is_stopped(); }

 private:
  engine_type engine_;  // the flushers, the intake and the held values (detail/write_behind_engine.hpp)
};

}  // namespace sluice
