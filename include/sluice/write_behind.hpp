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
//    full batch while it lingers).
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

#include <algorithm>
#include <atomic>
#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <limits>
#include <mutex>
#include <optional>
#include <random>
#include <span>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <thread>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "backoff.hpp"
#include "channel.hpp"
#include "clock.hpp"
#include "detail/event_count.hpp"
#include "detail/indexed_heap.hpp"
#include "detail/write_behind_results.hpp"
#include "key.hpp"

namespace sluice {

/// Configuration of a write_behind. Every field is validated by the constructor
/// (std::invalid_argument naming the field and the value).
template <class T, class Key = void>
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
  std::chrono::nanoseconds drain_timeout = std::chrono::seconds(30);  ///< >= 0; how long stop() keeps flushing
  /// Receives every value given up on. May be empty (the values are then only counted).
  std::function<void(T&&, const write_behind_failure&)> on_failed{};
  /// Keyed mode only: the key of a value. Empty: value.key is used (it must exist then).
  std::function<Key(const T&)> key_of{};
  /// Seed of the jitter's random engine; 0: from std::random_device.
  std::uint64_t seed = 0;
};

namespace detail {
template <class T, class Key>
concept has_key_member = requires(const T& v) {
  { v.key } -> std::convertible_to<Key>;
};
template <class F>
struct is_std_function : std::false_type {};
template <class R, class... A>
struct is_std_function<std::function<R(A...)>> : std::true_type {};
}  // namespace detail

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

  static constexpr bool keyed = !std::is_void_v<Key>;
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
  // Hash / KeyEqual, or stand-ins when the assertion above fails (so it is the only error).
  template <class K, bool = std::is_void_v<K>>
  struct key_types {
    using hash = detail::checked_hash<K, Hash, KeyEqual>;
    using equal = detail::checked_key_equal<K, Hash, KeyEqual>;
  };
  template <class K>
  struct key_types<K, true> {
    using hash = std::hash<std::uint64_t>;
    using equal = std::equal_to<std::uint64_t>;
  };
  using hash_type = typename key_types<Key>::hash;
  using key_equal_type = typename key_types<Key>::equal;
  using time_point = typename Clock::time_point;

  // One value and what the batcher knows about it. This is also the intake's item type.
  struct slot {
    T value;
    time_point enqueued;
    std::uint64_t gen = 0;       // flush generation (assigned when taken from the intake)
    std::uint32_t attempts = 0;  // sink calls that included it so far
  };
  struct meta {
    time_point enqueued;
    std::uint64_t gen;
    std::uint32_t attempts;
  };
  struct failure_item {
    T value;
    write_behind_failure failure;
    std::uint64_t gen;
  };

  struct entry;  // keyed: per-key state
  struct no_entry {};
  using entry_ptr = std::conditional_t<keyed, entry*, no_entry>;

  // What one flusher carries through a sink call; reused from call to call.
  struct batch_buffer {
    std::vector<T> values;
    std::vector<meta> metas;
    std::vector<entry_ptr> owners;  // keyed: the key of each value
    write_behind_results results;
    std::vector<failure_item> failures;  // to report, outside the lock
    time_point oldest{};
    bool in_sink = false;
    bool threw = false;   // the last sink call threw
    std::string thrown;   // ...with this text
  };

  using retry_key = std::conditional_t<keyed, Key, std::uint64_t>;
  using retry_hash = hash_type;  // std::hash<std::uint64_t> in unkeyed mode
  using retry_eq = key_equal_type;
  // When T cannot move (the static_asserts above fail), the intake and the heap hold a stand-in
  // so that the assertion is the only error, not a cascade from inside them.
  struct unusable_slot {};
  using stored_slot = std::conditional_t<std::is_nothrow_move_constructible_v<T>, slot, unusable_slot>;
  using retry_heap = detail::indexed_heap<retry_key, stored_slot, time_point, retry_hash, retry_eq>;

 public:
  using value_type = T;
  using key_type = Key;
  using clock_type = Clock;
  using options_type = write_behind_options<T, Key>;
  using sink_type = std::function<void(std::span<const T>, write_behind_results&)>;

  /// Starts options.flushers flusher threads. `sink` is callable as sink(span<const T>,
  /// write_behind_results&) or sink(span<const T>). Throws std::invalid_argument for bad options
  /// (naming the field and value) or an empty sink; std::bad_alloc / std::system_error from setup.
  template <class Sink>
    requires(std::is_invocable_v<Sink&, std::span<const T>, write_behind_results&> ||
             std::is_invocable_v<Sink&, std::span<const T>>)
  write_behind(options_type options, Sink sink, Clock clock = Clock{})
      : options_(validate(std::move(options))),
        sink_(wrap(std::move(sink))),
        clock_(std::move(clock)),
        intake_(options_.capacity),
        heap_(make_retry_heap()),
        policy_(options_.retry),
        rng_(options_.seed != 0 ? options_.seed : std::random_device{}()),
        buffers_(options_.flushers) {
    if (!sink_) throw std::invalid_argument("sluice::write_behind: sink must be callable, got an empty function");
    if constexpr (keyed) {
      if (!options_.key_of) {
        if constexpr (detail::has_key_member<T, Key>) {
          options_.key_of = [](const T& v) -> Key { return Key(v.key); };
        } else {
          throw std::invalid_argument(
              "sluice::write_behind: key_of must be set (T has no .key member convertible to Key), got an empty function");
        }
      }
    }
    threads_.reserve(options_.flushers);
    try {
      for (std::size_t i = 0; i < options_.flushers; ++i) {
        threads_.emplace_back([this, i] { flusher_main(buffers_[i]); });
      }
    } catch (...) {
      stop();
      throw;
    }
  }

  write_behind(const write_behind&) = delete;
  write_behind& operator=(const write_behind&) = delete;

  /// stop(): drains for up to drain_timeout, reports the rest, joins the flushers.
  ~write_behind() { stop(); }

  // ---- intake ---------------------------------------------------------------------------
  // Each form returns ok and takes the value, or returns another status and leaves `value` as it
  // was. Thread-safe. Never allocates. Only enqueue, the stop_token form and the timed forms block.

  /// Enqueues, waiting while the intake is full (backpressure). ok or closed. May block.
  [[nodiscard]] write_behind_status enqueue(T&& value) noexcept { return put(value, std::nullopt, nullptr, true); }
  /// As enqueue(), but returns cancelled if `stop` is triggered while waiting. May block.
  [[nodiscard]] write_behind_status enqueue(T&& value, std::stop_token stop) noexcept {
    return put(value, std::nullopt, &stop, true);
  }
  /// Enqueues only if there is room now: full instead of waiting. Never blocks.
  [[nodiscard]] write_behind_status try_enqueue(T&& value) noexcept { return put(value, std::nullopt, nullptr, false); }
  /// Waits at most `timeout` (on Clock) for room. May block.
  template <class Rep, class Period>
  [[nodiscard]] write_behind_status try_enqueue_for(T&& value, const std::chrono::duration<Rep, Period>& timeout) noexcept {
    return put(value, detail::saturating_add(clock_.now(), timeout), nullptr, true);
  }
  /// Waits until `deadline` (a Clock time point) for room. May block.
  [[nodiscard]] write_behind_status try_enqueue_until(T&& value, time_point deadline) noexcept {
    return put(value, deadline, nullptr, true);
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
  void flush() { (void)flush_impl(std::nullopt); }
  /// As flush(), giving up after `timeout` on Clock; returns whether everything was done.
  template <class Rep, class Period>
  [[nodiscard]] bool flush_for(const std::chrono::duration<Rep, Period>& timeout) {
    return flush_impl(detail::saturating_add(clock_.now(), timeout));
  }
  /// As flush(), giving up at `deadline` on Clock; returns whether everything was done.
  [[nodiscard]] bool flush_until(time_point deadline) { return flush_impl(deadline); }

  /// Stops intake, flushes (retries included) until done or drain_timeout, reports the rest with
  /// reason shutdown, joins the flushers. Idempotent; concurrent callers all return once it is done.
  /// Must not be called from the sink or on_failed. Thread-safe. May block.
  void stop() noexcept {
    std::lock_guard stop_lock(stop_mutex_);
    if (stopped_) return;
    {
      std::lock_guard lock(m_);
      stopping_ = true;
      drain_deadline_ = detail::saturating_add(clock_.now(), options_.drain_timeout);
    }
    intake_.close();
    work_ec_.notify_all();
    space_ec_.notify_all();
    for (auto& t : threads_) {
      if (t.joinable()) t.join();
    }
    // Flushers that could not start (constructor failure) leave their work here.
    {
      std::unique_lock lock(m_);
      drain_deadline_ = time_point::min();
      batch_buffer& b = buffers_.front();
      expire_locked(b);
      report_failures(lock, b);
    }
    stopped_ = true;
    done_ec_.notify_all();
  }

  // ---- observers --------------------------------------------------------------------------

  /// A consistent snapshot of the counters (see write_behind_metrics). Thread-safe. Never blocks
  /// for long (takes the flushers' lock briefly).
  [[nodiscard]] write_behind_metrics metrics() const {
    std::lock_guard lock(m_);
    write_behind_metrics out;
    out.enqueued = intake_.accepted();
    out.in_intake = intake_.size();
    out.persisted = persisted_;
    out.failed = failed_;
    out.coalesced = coalesced_;
    out.retries = retries_;
    out.batches = batches_;
    out.sink_errors = sink_errors_;
    out.on_failed_errors = on_failed_errors_;
    // Due retries count as in_retry until a batch takes them, in both modes (keyed: they sit in
    // their key's pending slot, ready_retries_ of them).
    if constexpr (keyed) {
      out.pending = pending_values_ - ready_retries_;
      out.in_retry = heap_.size() + ready_retries_;
    } else {
      out.pending = pending_count_locked();
      out.in_retry = heap_.size() + retry_ready_.size();
    }
    out.in_flight = in_flight_;
    std::optional<time_point> oldest;
    auto consider = [&](time_point t) {
      if (!oldest || t < *oldest) oldest = t;
    };
    if constexpr (keyed) {
      if (ready_head_ != nullptr) consider(ready_head_->pending->enqueued);
    } else {
      if (staged_head_ < staged_.size()) consider(staged_[staged_head_].enqueued);
      if (!retry_ready_.empty()) consider(retry_ready_.front().enqueued);
    }
    for (const auto& b : buffers_) {
      if (b.in_sink) consider(b.oldest);
    }
    if (oldest) {
      const auto age = clock_.now() - *oldest;
      out.oldest_pending_age = std::max(std::chrono::duration_cast<std::chrono::nanoseconds>(age),
                                        std::chrono::nanoseconds::zero());
    }
    return out;
  }

  [[nodiscard]] const options_type& options() const noexcept { return options_; }
  [[nodiscard]] std::size_t capacity() const noexcept { return options_.capacity; }
  /// True once stop() has begun. Thread-safe.
  [[nodiscard]] bool is_stopped() const noexcept { return intake_.is_closed(); }

 private:
  // Keyed: per-key state; exists only while the key has a pending value, a value in flight or a
  // value waiting to be retried.
  struct entry {
    std::optional<slot> pending;  // newest value not yet handed to the sink (not retry-waiting)
    const Key* key = nullptr;     // the map's own copy
    entry* next = nullptr;        // ready FIFO link
    bool in_flight = false;       // a value of this key is in a sink call
    bool retry_waiting = false;   // a value of this key is in heap_
    bool queued = false;          // in the ready FIFO
  };
  struct no_map {};
  using entry_map = std::conditional_t<keyed, std::unordered_map<Key, entry, hash_type, key_equal_type>, no_map>;
  template <class M>
  struct node_of {
    using type = typename M::node_type;
  };
  template <class M>
    requires std::is_same_v<M, no_map>
  struct node_of<M> {
    using type = no_map;
  };
  using spare_node = typename node_of<entry_map>::type;

  struct generation {
    std::uint64_t boundary;     // values with intake index < boundary belong to this or earlier gens
    std::uint64_t outstanding;  // values of this gen not yet resolved
    std::uint64_t ready = 0;    // ...of which waiting for a batch (not in the sink, not backing off)
  };

  // ---- construction helpers ----
  static options_type validate(options_type o) {
    using std::to_string;
    auto bad = [](const std::string& what) { throw std::invalid_argument("sluice::write_behind: " + what); };
    auto ns = [](std::chrono::nanoseconds d) { return to_string(d.count()) + "ns"; };
    if (o.capacity == 0) bad("capacity must be >= 1, got 0");
    if (o.capacity > (std::size_t{1} << 32)) bad("capacity must be <= 2^32, got " + to_string(o.capacity));
    if (o.max_batch == 0) bad("max_batch must be >= 1, got 0");
    if (o.max_batch > o.capacity) {
      bad("max_batch must be <= capacity (" + to_string(o.capacity) + "), got " + to_string(o.max_batch));
    }
    if (o.linger < o.linger.zero()) bad("linger must be >= 0, got " + ns(o.linger));
    if (o.flushers == 0 || o.flushers > 256) bad("flushers must be in [1, 256], got " + to_string(o.flushers));
    if (o.drain_timeout < o.drain_timeout.zero()) bad("drain_timeout must be >= 0, got " + ns(o.drain_timeout));
    if (o.retry.base <= o.retry.base.zero()) bad("retry.base must be > 0, got " + ns(o.retry.base));
    if (o.retry.max < o.retry.base) {
      bad("retry.max must be >= retry.base (" + ns(o.retry.base) + "), got " + ns(o.retry.max));
    }
    if (!(o.retry.multiplier >= 1.0) || !(o.retry.multiplier < std::numeric_limits<double>::infinity())) {
      bad("retry.multiplier must be finite and >= 1, got " + to_string(o.retry.multiplier));
    }
    switch (o.retry.jitter) {
      case jitter_mode::none:
      case jitter_mode::full:
      case jitter_mode::equal:
        break;
      default:
        bad("retry.jitter must be none, full or equal, got " + to_string(static_cast<int>(o.retry.jitter)));
    }
    return o;
  }

  template <class Sink>
  static sink_type wrap(Sink sink) {
    if constexpr (std::is_pointer_v<Sink> || detail::is_std_function<Sink>::value) {
      if (!sink) return sink_type{};  // an empty std::function or a null pointer
    }
    if constexpr (std::is_invocable_v<Sink&, std::span<const T>, write_behind_results&>) {
      return sink_type(std::move(sink));
    } else {
      return [s = std::move(sink)](std::span<const T> batch, write_behind_results&) mutable { s(batch); };
    }
  }

  retry_heap make_retry_heap() {
    if constexpr (keyed) {
      return retry_heap(hash_type{}, key_equal_type{});
    } else {
      return retry_heap();
    }
  }

  // ---- intake ----
  write_behind_status put(T& value, const std::optional<time_point>& deadline, const std::stop_token* stop,
                          bool may_block) noexcept {
    // No clock read here: on these VMs a steady_clock::now() costs as much as the whole send.
    // The flusher stamps values as it takes them from the intake (see take_from_intake_locked()).
    slot s{std::move(value), time_point{}, 0, 0};
    channel_status st = intake_.try_send(std::move(s));
    if (st == channel_status::full && may_block) {
      auto ready = [&] {
        st = intake_.try_send(std::move(s));
        return st != channel_status::full;
      };
      const auto outcome = detail::block_on_clock(clock_, space_ec_, ready, deadline, stop);
      if (st == channel_status::full) {
        value = std::move(s.value);
        return outcome == detail::wait_outcome::cancelled ? write_behind_status::cancelled : write_behind_status::timeout;
      }
    }
    switch (st) {
      case channel_status::ok:
        wake_flusher();
        return write_behind_status::ok;
      case channel_status::closed:
        value = std::move(s.value);
        return write_behind_status::closed;
      default:
        value = std::move(s.value);
        return write_behind_status::full;
    }
  }

  // A producer that just sent: wake a parked flusher if the intake now holds what it waits for.
  void wake_flusher() noexcept {
    // seq_cst fence: orders our send (the channel's claim) before the waiter-count read; pairs with
    // the fence after prepare_wait() in park_locked() (store-buffering: one of us sees the other).
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (!work_ec_.has_waiters_after_seq_cst_write()) return;
    // seq_cst: the threshold is stored before the flusher's seq_cst prepare_wait(), which our
    // seq_cst waiter-count read observed, so this load sees that threshold or a later one.
    if (intake_.size() < wake_threshold_.load(std::memory_order_seq_cst)) return;
    // Only the first producer to get here wakes: until the flusher runs again its registration
    // stays visible, and without the flag every send in that window would make a system call.
    // seq_cst: the flusher clears the flag between registering and re-checking (park_locked()).
    if (wake_sent_.load(std::memory_order_seq_cst) || wake_sent_.exchange(true, std::memory_order_seq_cst)) return;
    // The one clock read on the producer side, once per flusher sleep: what the flusher takes next
    // counts from now, not from when it gets a core (see take_from_intake_locked()).
    // relaxed: a hint; the flusher reads it after the wake-up, which the notify orders.
    woken_at_.store(std::chrono::duration_cast<std::chrono::nanoseconds>(clock_.now().time_since_epoch()).count(),
                    std::memory_order_relaxed);
    work_ec_.notify_one();
  }

  // ---- flusher ----
  void flusher_main(batch_buffer& b) noexcept {
    std::unique_lock lock(m_);
    for (;;) {
      time_point now = clock_.now();
      if (stopping_ && now >= drain_deadline_) expire_locked(b);
      promote_due_retries_locked(now);
      take_from_intake_locked(b, now);
      if (!b.failures.empty()) {
        report_failures(lock, b);
        continue;
      }
      if (batch_due_locked(now)) {
        take_batch_locked(b);
        if (options_.flushers > 1) {
          if (batch_due_locked(now) || intake_.size() >= options_.max_batch) {
            work_ec_.notify_one();  // more than one batch's worth: let another flusher take it
          }
          // This flusher is no longer the one producers woke: the next value that completes what
          // the parked ones wait for must wake one of them.
          wake_threshold_.store(threshold_locked(), std::memory_order_seq_cst);  // seq_cst: see wake_flusher()
          wake_sent_.store(false, std::memory_order_seq_cst);
        }
        lock.unlock();
        run_sink(b);
        lock.lock();
        complete_batch_locked(b, clock_.now());
        report_failures(lock, b);
        continue;
      }
      if (stopping_ && all_done_locked()) {
        work_ec_.notify_all();  // the other flushers see it too and exit
        return;
      }
      park_locked(lock, now);
    }
  }

  [[nodiscard]] bool force_locked() const noexcept {
    return stopping_ || sealed_ready_ != 0 || (!sealed_.empty() && taken_ < sealed_.back().boundary);
  }

  [[nodiscard]] std::size_t held_locked() const noexcept {
    if constexpr (keyed) {
      return entries_.size();
    } else {
      return (staged_.size() - staged_head_) + retry_ready_.size() + heap_.size();
    }
  }

  [[nodiscard]] std::size_t pending_count_locked() const noexcept {
    if constexpr (keyed) {
      return pending_values_;
    } else {
      return staged_.size() - staged_head_;
    }
  }

  [[nodiscard]] std::size_t ready_count_locked() const noexcept {
    if constexpr (keyed) {
      return ready_count_;
    } else {
      return (staged_.size() - staged_head_) + retry_ready_.size();
    }
  }

  [[nodiscard]] bool all_done_locked() const noexcept {
    return intake_.is_drained() && held_locked() == 0 && in_flight_ == 0;
  }

  // The flush generation of the value with intake index `index`.
  [[nodiscard]] std::uint64_t gen_for_index(std::uint64_t index, std::size_t& cursor) const noexcept {
    while (cursor < sealed_.size() && sealed_[cursor].boundary <= index) ++cursor;
    return first_sealed_ + cursor;
  }
  generation& gen_record(std::uint64_t gen) noexcept {
    const std::uint64_t i = gen - first_sealed_;
    return i < sealed_.size() ? sealed_[i] : open_;
  }
  // A value of generation `gen` became ready for a batch / left the ready structures. flush()
  // skips linger only while a sealed generation has ready values (or values still in the intake):
  // a flushed value backing off for seconds must not turn every later value into a batch of one.
  void ready_add_locked(std::uint64_t gen) noexcept {
    ++gen_record(gen).ready;
    if (gen - first_sealed_ < sealed_.size()) ++sealed_ready_;
  }
  void ready_sub_locked(std::uint64_t gen) noexcept {
    --gen_record(gen).ready;
    if (gen - first_sealed_ < sealed_.size()) --sealed_ready_;
  }
  // A value of generation `gen` reached its end (persisted, failed or coalesced).
  void resolve_locked(std::uint64_t gen) noexcept { --gen_record(gen).outstanding; }
  // resolve_locked() for every value of a batch (runs of one generation at a time).
  void resolve_all_locked(const std::vector<meta>& metas) noexcept {
    std::size_t i = 0;
    while (i < metas.size()) {
      const std::uint64_t gen = metas[i].gen;
      std::size_t j = i + 1;
      while (j < metas.size() && metas[j].gen == gen) ++j;
      gen_record(gen).outstanding -= j - i;
      i = j;
    }
  }

  void retire_generations_locked() noexcept {
    bool any = false;
    while (!sealed_.empty() && sealed_.front().outstanding == 0 && taken_ >= sealed_.front().boundary) {
      sealed_.erase(sealed_.begin());
      ++first_sealed_;
      any = true;
    }
    if (any) {
      // release: a flush() that sees the new count also sees everything resolved before it.
      completed_gens_.store(first_sealed_, std::memory_order_release);
      done_ec_.notify_all();
    }
  }

  // Moves values from the intake into the flushers' hands, while they hold fewer than capacity.
  //
  // Values are stamped here, with one clock read per take: the time a value starts to count toward
  // linger and oldest_pending_age. A flusher that is idle or lingering is woken by the first value
  // (and by a full batch), so the stamp is the enqueue time plus a wake-up; while every flusher is
  // in the sink, values wait in the intake unstamped and a full batch goes as soon as one returns.
  void take_from_intake_locked(batch_buffer& b, time_point now) {
    // A producer that woke us stamped the time it enqueued: values taken now are no younger.
    // relaxed: a hint (see wake_flusher()).
    const time_point took_at = now;
    if (const auto w = woken_at_.exchange(no_stamp, std::memory_order_relaxed); w != no_stamp) {
      const time_point at(std::chrono::duration_cast<typename Clock::duration>(std::chrono::nanoseconds(w)));
      if (at < now) now = at;
    }
    // Values that arrived while no flusher was parked idle (all in the sink, or lingering) woke
    // nobody and carry no stamp; they all came after the last take that emptied the intake, so
    // they count from that take: at worst a little early, never a sink call late (the take time
    // would make a value that arrived as a sink call began wait linger + that call).
    if (empty_since_ && *empty_since_ < now) now = *empty_since_;
    const std::size_t held = held_locked();
    const bool unlimited = stopping_ && drain_expired_;
    if (!unlimited && held >= options_.capacity) return;
    const std::size_t room = unlimited ? intake_.capacity() : options_.capacity - held;
    std::size_t got = 0;
    std::size_t cursor = 0;
    if constexpr (keyed) {
      got = intake_.try_receive_batch(scratch_, room);
      for (slot& s : scratch_) {
        s.enqueued = now;
        s.gen = gen_for_index(taken_++, cursor);
        ++gen_record(s.gen).outstanding;
        absorb_locked(std::move(s), b);
      }
      scratch_.clear();
    } else {
      got = intake_.try_receive_batch(staged_, room);
      for (std::size_t i = staged_.size() - got; i < staged_.size(); ++i) {
        staged_[i].enqueued = now;
        staged_[i].gen = gen_for_index(taken_++, cursor);
        ++gen_record(staged_[i].gen).outstanding;
        ready_add_locked(staged_[i].gen);
      }
    }
    if (got < room) empty_since_ = took_at;  // it gave us everything it had
    if (got != 0) {
      space_ec_.notify_all();  // producers waiting for room (no system call if none is parked)
      if (unlimited) expire_locked(b);
    }
    retire_generations_locked();
  }

  // Keyed: a value taken from the intake meets its key's state.
  void absorb_locked(slot&& s, batch_buffer& b) {
    if constexpr (keyed) {
      std::optional<Key> k;
      try {
        k.emplace(options_.key_of(s.value));
      } catch (...) {
        ++in_flight_;  // reported below, counted as in flight until then
        b.failures.push_back(failure_item{std::move(s.value),
                                          write_behind_failure{write_behind_reason::permanent,
                                                               "key_of threw: " + current_what(), 0},
                                          s.gen});
        return;
      }
      // The user's Hash / KeyEqual and Key's move may throw (and a new map node may not be
      // allocated): the value is then reported permanent, never allowed to kill the flusher. A key
      // that hashed once is hashed again later (retry heap, erase): Hash must be deterministic.
      entry* found = nullptr;
      try {
        auto it = entries_.find(*k);
        if (it == entries_.end()) {
          if (!spare_.empty()) {
            // Reuse a node of a key that left: no allocation per key on the steady path.
            auto node = std::move(spare_.back());
            spare_.pop_back();
            node.key() = std::move(*k);
            node.mapped() = entry{};
            it = entries_.insert(std::move(node)).position;
          } else {
            it = entries_.try_emplace(std::move(*k)).first;
          }
          it->second.key = &it->first;
        }
        found = &it->second;
        if (!found->pending && found->retry_waiting) {
          // A newer value supersedes the one waiting to be retried: the old one is never written.
          auto old = heap_.erase(heap_.find(*found->key));
          ++coalesced_;
          resolve_locked(old.item.gen);
          found->retry_waiting = false;
        }
      } catch (...) {
        ++in_flight_;  // reported below, counted as in flight until then
        b.failures.push_back(failure_item{std::move(s.value),
                                          write_behind_failure{write_behind_reason::permanent,
                                                               "key lookup threw: " + current_what(), 0},
                                          s.gen});
        return;
      }
      entry& e = *found;
      if (e.pending) {
        if (e.pending->attempts > 0) --ready_retries_;
        ++coalesced_;
        resolve_locked(e.pending->gen);
        ready_sub_locked(e.pending->gen);
        ready_add_locked(s.gen);
        // The key has had a value waiting since the older stamp: linger (and oldest_pending_age)
        // count from it, or a key updated more often than linger at the FIFO head would defer the
        // batch again and again (each newer value restarting the wait).
        const time_point since = std::min(e.pending->enqueued, s.enqueued);
        *e.pending = std::move(s);  // keeps its place in the ready FIFO
        e.pending->enqueued = since;
        return;
      }
      ready_add_locked(s.gen);
      e.pending.emplace(std::move(s));
      ++pending_values_;
      if (!e.in_flight) push_ready(e);
    } else {
      (void)s;
      (void)b;
    }
  }

  void push_ready(entry& e) noexcept {
    e.queued = true;
    e.next = nullptr;
    if (ready_tail_ == nullptr) {
      ready_head_ = ready_tail_ = &e;
    } else {
      ready_tail_->next = &e;
      ready_tail_ = &e;
    }
    ++ready_count_;
  }

  // A key whose newer value waited behind its in-flight one was stamped when taken, maybe before
  // the FIFO head: then it goes first, so linger keeps counting from the oldest ready value.
  void push_ready_by_age(entry& e) noexcept {
    if (ready_head_ != nullptr && e.pending->enqueued < ready_head_->pending->enqueued) {
      e.queued = true;
      e.next = ready_head_;
      ready_head_ = &e;
      ++ready_count_;
    } else {
      push_ready(e);
    }
  }

  entry* pop_ready() noexcept {
    entry* e = ready_head_;
    ready_head_ = e->next;
    if (ready_head_ == nullptr) ready_tail_ = nullptr;
    e->next = nullptr;
    e->queued = false;
    --ready_count_;
    return e;
  }

  void erase_entry(entry& e) noexcept {
    if constexpr (keyed) {
      auto node = entries_.extract(entries_.find(*e.key));
      // Keep up to max_batch nodes for the next new keys (bounded; the rest are freed).
      if (spare_.size() < options_.max_batch) {
        try {
          spare_.push_back(std::move(node));
        } catch (...) {
        }
      }
    }
  }

  void promote_due_retries_locked(time_point now) {
    while (!heap_.empty() && heap_.top_deadline() <= now) {
      auto [payload, due] = heap_.pop_top();
      (void)due;
      if constexpr (keyed) {
        entry& e = entries_.find(payload.key)->second;
        e.retry_waiting = false;
        ready_add_locked(payload.item.gen);
        e.pending.emplace(std::move(payload.item));
        ++pending_values_;
        ++ready_retries_;
        push_ready(e);
      } else {
        ready_add_locked(payload.item.gen);
        retry_ready_.push_back(std::move(payload.item));
      }
    }
  }

  [[nodiscard]] std::optional<time_point> linger_start_locked() const noexcept {
    if constexpr (keyed) {
      if (ready_head_ != nullptr) return ready_head_->pending->enqueued;
    } else {
      if (staged_head_ < staged_.size()) return staged_[staged_head_].enqueued;
    }
    return std::nullopt;
  }

  [[nodiscard]] bool batch_due_locked(time_point now) const noexcept {
    const std::size_t n = ready_count_locked();
    if (n == 0) return false;
    if (n >= options_.max_batch || force_locked()) return true;
    if constexpr (keyed) {
      if (ready_retries_ > 0) return true;
    } else {
      if (!retry_ready_.empty()) return true;
    }
    const auto start = linger_start_locked();
    return start && now >= detail::saturating_add(*start, options_.linger);
  }

  void add_to_batch(batch_buffer& b, slot&& s) {
    if (b.values.empty() || s.enqueued < b.oldest) b.oldest = s.enqueued;
    b.values.push_back(std::move(s.value));
    b.metas.push_back(meta{s.enqueued, s.gen, s.attempts});
    ready_sub_locked(s.gen);
  }

  void take_batch_locked(batch_buffer& b) {
    b.values.clear();
    b.metas.clear();
    b.owners.clear();
    const std::size_t max = options_.max_batch;
    if constexpr (keyed) {
      while (b.values.size() < max && ready_head_ != nullptr) {
        entry* e = pop_ready();
        slot& s = *e->pending;
        if (s.attempts > 0) --ready_retries_;
        add_to_batch(b, std::move(s));
        e->pending.reset();
        --pending_values_;
        e->in_flight = true;
        b.owners.push_back(e);
      }
    } else {
      std::size_t r = 0;
      for (; r < retry_ready_.size() && b.values.size() < max; ++r) add_to_batch(b, std::move(retry_ready_[r]));
      retry_ready_.erase(retry_ready_.begin(), retry_ready_.begin() + static_cast<std::ptrdiff_t>(r));
      while (b.values.size() < max && staged_head_ < staged_.size()) add_to_batch(b, std::move(staged_[staged_head_++]));
      if (staged_head_ == staged_.size()) {
        staged_.clear();
        staged_head_ = 0;
      } else if (staged_head_ >= 4096 && staged_head_ * 2 >= staged_.size()) {
        staged_.erase(staged_.begin(), staged_.begin() + static_cast<std::ptrdiff_t>(staged_head_));
        staged_head_ = 0;
      }
    }
    in_flight_ += b.values.size();
    b.in_sink = true;
  }

  static std::string current_what() {
    try {
      throw;
    } catch (const std::exception& e) {
      return e.what();
    } catch (...) {
      return "unknown exception";
    }
  }

  // Outside the lock: one sink call; a throw makes the whole batch retryable.
  void run_sink(batch_buffer& b) noexcept {
    b.threw = false;
    try {
      b.results.reset(b.values.size());
      sink_(std::span<const T>(b.values.data(), b.values.size()), b.results);
    } catch (...) {
      b.threw = true;
      try {
        b.thrown = current_what();
      } catch (...) {
        b.thrown.clear();
      }
    }
  }

  [[nodiscard]] std::chrono::nanoseconds retry_delay_locked(std::uint32_t failures, std::chrono::nanoseconds hint) {
    std::chrono::nanoseconds d = policy_.exponential(failures);
    const double v = static_cast<double>(d.count());
    const double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng_);
    switch (options_.retry.jitter) {
      case jitter_mode::none: break;
      case jitter_mode::full: d = std::chrono::nanoseconds(static_cast<std::int64_t>(v * u)); break;
      case jitter_mode::equal: d = std::chrono::nanoseconds(static_cast<std::int64_t>(v / 2 + v / 2 * u)); break;
    }
    return std::max(d, hint);
  }

  void fail_later(batch_buffer& b, T&& value, write_behind_reason reason, std::string message, std::uint32_t attempts,
                  std::uint64_t gen) {
    b.failures.push_back(failure_item{std::move(value), write_behind_failure{reason, std::move(message), attempts}, gen});
  }

  void complete_batch_locked(batch_buffer& b, time_point now) {
    const std::size_t n = b.values.size();
    b.in_sink = false;
    ++batches_;
    if (b.threw) ++sink_errors_;
    std::size_t resolved_here = 0;
    if constexpr (!keyed) {
      if (!b.threw && !b.results.any_marked()) {  // the common case: the whole batch persisted
        persisted_ += n;
        resolve_all_locked(b.metas);
        in_flight_ -= n;
        retire_generations_locked();
        return;
      }
    }
    for (std::size_t i = 0; i < n; ++i) {
      meta& m = b.metas[i];
      const std::uint32_t attempts = m.attempts + 1;
      const write_behind_outcome outcome = b.threw ? write_behind_outcome::retry : b.results.outcome(i);
      [[maybe_unused]] entry_ptr owner{};
      if constexpr (keyed) {
        owner = b.owners[i];
        owner->in_flight = false;
      }
      switch (outcome) {
        case write_behind_outcome::persisted:
          ++persisted_;
          resolve_locked(m.gen);
          ++resolved_here;
          break;
        case write_behind_outcome::fail:
          fail_later(b, std::move(b.values[i]), write_behind_reason::permanent, b.results.take_reason(i), attempts, m.gen);
          break;
        case write_behind_outcome::retry: {
          bool superseded = false;
          if constexpr (keyed) superseded = owner->pending.has_value();
          if (superseded) {
            ++coalesced_;  // a newer value of the key is pending: this one must never be written
            resolve_locked(m.gen);
            ++resolved_here;
          } else if (stopping_ && drain_expired_) {
            fail_later(b, std::move(b.values[i]), write_behind_reason::shutdown,
                       with_cause("stopped: drain_timeout passed while retrying", b), attempts, m.gen);
          } else if (options_.retry.max_retries && attempts > *options_.retry.max_retries) {
            fail_later(b, std::move(b.values[i]), write_behind_reason::retries_exhausted,
                       with_cause("retries exhausted after " + std::to_string(attempts) + " attempts", b), attempts,
                       m.gen);
          } else {
            const auto hint = b.threw ? std::chrono::nanoseconds::zero() : b.results.min_delay(i);
            const auto due = detail::saturating_add(now, retry_delay_locked(attempts, hint));
            // Growing the heap may fail (bad_alloc), and so may copying the Key or the user's Hash:
            // the value is then reported permanent instead of killing the flusher.
            // insert() is strong: on a throw nothing changed and `s` was not moved from.
            slot s{std::move(b.values[i]), m.enqueued, m.gen, attempts};
            std::string trouble;
            try {
              heap_.reserve_one();
              if constexpr (keyed) {
                const auto where = heap_.locate(*owner->key);
                heap_.insert(where, *owner->key, std::move(s), due);
                owner->retry_waiting = true;
              } else {
                const std::uint64_t id = next_retry_id_++;
                heap_.insert(heap_.locate(id), id, std::move(s), due);
              }
            } catch (...) {
              trouble = "could not schedule the retry: " + current_what();
            }
            if (trouble.empty()) {
              ++retries_;
              ++resolved_here;  // no longer in flight
            } else {
              heap_.release_if_empty();
              fail_later(b, std::move(s.value), write_behind_reason::permanent, with_cause(std::move(trouble), b),
                         attempts, m.gen);
            }
          }
          break;
        }
      }
      if constexpr (keyed) {
        if (owner->pending) {
          if (!owner->queued) push_ready_by_age(*owner);
        } else if (!owner->retry_waiting) {
          erase_entry(*owner);
        }
      }
    }
    in_flight_ -= resolved_here;  // the rest is in flight until reported
    retire_generations_locked();
  }

  std::string with_cause(std::string text, const batch_buffer& b) const {
    if (b.threw) text += "; last error: " + b.thrown;
    return text;
  }

  // At the drain deadline: everything held and everything left in the intake is reported shutdown.
  void expire_locked(batch_buffer& b) {
    drain_expired_ = true;
    const std::string why = "stopped: drain_timeout passed before it was persisted";
    std::size_t cursor = 0;
    for (;;) {
      scratch_.clear();
      if (intake_.try_receive_batch(scratch_, intake_.capacity()) == 0) break;
      for (slot& s : scratch_) {
        s.gen = gen_for_index(taken_++, cursor);
        ++gen_record(s.gen).outstanding;
        ++in_flight_;
        fail_later(b, std::move(s.value), write_behind_reason::shutdown, why, s.attempts, s.gen);
      }
    }
    scratch_.clear();
    heap_.drain([&](typename retry_heap::payload&& p, time_point) {
      ++in_flight_;
      fail_later(b, std::move(p.item.value), write_behind_reason::shutdown,
                 "stopped: drain_timeout passed while waiting to retry", p.item.attempts, p.item.gen);
      if constexpr (keyed) entries_.find(p.key)->second.retry_waiting = false;
    });
    if constexpr (keyed) {
      while (ready_head_ != nullptr) pop_ready();
      ready_retries_ = 0;
      for (auto it = entries_.begin(); it != entries_.end();) {
        entry& e = it->second;
        if (e.pending) {
          ++in_flight_;
          fail_later(b, std::move(e.pending->value), write_behind_reason::shutdown, why, e.pending->attempts,
                     e.pending->gen);
          e.pending.reset();
          --pending_values_;
        }
        if (!e.in_flight && !e.retry_waiting) {
          it = entries_.erase(it);
        } else {
          ++it;
        }
      }
    } else {
      for (slot& s : retry_ready_) {
        ++in_flight_;
        fail_later(b, std::move(s.value), write_behind_reason::shutdown, why, s.attempts, s.gen);
      }
      retry_ready_.clear();
      for (; staged_head_ < staged_.size(); ++staged_head_) {
        slot& s = staged_[staged_head_];
        ++in_flight_;
        fail_later(b, std::move(s.value), write_behind_reason::shutdown, why, s.attempts, s.gen);
      }
      staged_.clear();
      staged_head_ = 0;
    }
    for (generation& g : sealed_) g.ready = 0;  // nothing is left waiting for a batch
    open_.ready = 0;
    sealed_ready_ = 0;
    space_ec_.notify_all();
    retire_generations_locked();
  }

  // Calls on_failed for b.failures outside the lock, then counts them failed.
  void report_failures(std::unique_lock<std::mutex>& lock, batch_buffer& b) noexcept {
    if (b.failures.empty()) return;
    lock.unlock();
    std::uint64_t errors = 0;
    for (failure_item& f : b.failures) {
      if (!options_.on_failed) continue;
      try {
        options_.on_failed(std::move(f.value), f.failure);
      } catch (...) {
        ++errors;
      }
    }
    lock.lock();
    on_failed_errors_ += errors;
    for (const failure_item& f : b.failures) resolve_locked(f.gen);
    failed_ += b.failures.size();
    in_flight_ -= b.failures.size();
    b.failures.clear();
    retire_generations_locked();
  }

  // How many values in the intake make it worth waking a parked flusher.
  [[nodiscard]] std::size_t threshold_locked() const noexcept {
    const std::size_t ready = ready_count_locked();
    if (held_locked() >= options_.capacity && !(stopping_ && drain_expired_)) {
      return std::numeric_limits<std::size_t>::max();  // no room: intake values cannot help
    }
    if (ready == 0 || force_locked()) return 1;
    return ready >= options_.max_batch ? 1 : options_.max_batch - ready;  // what fills the batch
  }

  // Parks the flusher until there is something to do: intake values it waits for (producers wake
  // it), a deadline (linger, retry, drain), or a state change by another thread (flush, stop, another
  // flusher finishing a batch).
  void park_locked(std::unique_lock<std::mutex>& lock, time_point now) {
    std::optional<time_point> deadline;
    auto consider = [&](time_point t) {
      if (!deadline || t < *deadline) deadline = t;
    };
    const std::size_t ready = ready_count_locked();
    if (ready != 0) {
      if (const auto start = linger_start_locked()) consider(detail::saturating_add(*start, options_.linger));
    }
    if (!heap_.empty()) consider(heap_.top_deadline());
    if (stopping_ && !drain_expired_) consider(drain_deadline_);
    const std::size_t threshold = threshold_locked();
    // Parked idle, the first value wakes us and its producer stamps the time: no bound needed.
    if (ready == 0 && threshold == 1) empty_since_.reset();
    // seq_cst: read by producers after they observe our registration (see wake_flusher()).
    wake_threshold_.store(threshold, std::memory_order_seq_cst);
    const auto key = work_ec_.prepare_wait();
    // seq_cst: the next producer that sees us registered and the threshold reached wakes us.
    wake_sent_.store(false, std::memory_order_seq_cst);
    // seq_cst fence: our registration and the flag's clear before the intake re-check; pairs with
    // wake_flusher()'s fence (either it sees us registered with the flag clear, or we see its value).
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (intake_.size() >= threshold) {
      work_ec_.cancel_wait();
      // Values the loop could not take yet were claimed but not published: let their producers finish.
      lock.unlock();
      std::this_thread::yield();
      lock.lock();
      return;
    }
    (void)now;
    lock.unlock();
    if (deadline) {
      clock_.wait_until(work_ec_, key, *deadline);
    } else {
      clock_.wait(work_ec_, key);
    }
    lock.lock();
  }

  bool flush_impl(const std::optional<time_point>& deadline) {
    std::uint64_t gen;
    {
      std::lock_guard lock(m_);
      // Every value accepted before this point has an intake index below the boundary.
      const std::uint64_t boundary = intake_.accepted();
      sealed_.push_back(generation{boundary, open_.outstanding, open_.ready});
      sealed_ready_ += open_.ready;
      open_.outstanding = 0;
      open_.ready = 0;
      gen = first_sealed_ + sealed_.size() - 1;
      retire_generations_locked();
    }
    work_ec_.notify_all();  // batches go out now, without lingering
    auto done = [&] {
      // acquire: pairs with the release in retire_generations_locked().
      return completed_gens_.load(std::memory_order_acquire) > gen;
    };
    const auto outcome = detail::block_on_clock(clock_, done_ec_, done, deadline, nullptr);
    return outcome == detail::wait_outcome::ready;
  }

  // ---- state ----
  options_type options_;
  const sink_type sink_;
  const Clock clock_;
  channel<stored_slot> intake_;

  mutable std::mutex m_;  // everything below, except the atomics and the event counts
  std::vector<slot> staged_;      // unkeyed: taken from the intake, waiting for a batch
  std::size_t staged_head_ = 0;   // unkeyed: first live element of staged_
  std::vector<slot> retry_ready_;  // unkeyed: retries whose deadline has come
  std::vector<slot> scratch_;      // keyed: values just taken from the intake
  entry_map entries_;
  std::vector<spare_node> spare_;  // keyed: extracted map nodes kept for reuse
  entry* ready_head_ = nullptr;  // keyed: FIFO of keys with a pending value and none in flight
  entry* ready_tail_ = nullptr;
  std::size_t ready_count_ = 0;
  std::size_t ready_retries_ = 0;   // keyed: ready values that are retries (due at once)
  std::size_t pending_values_ = 0;  // keyed: entries with a pending value
  retry_heap heap_;
  std::uint64_t next_retry_id_ = 0;
  backoff<std::uint64_t> policy_;  // the delay formula (its per-key state is unused)
  std::mt19937_64 rng_;
  std::vector<batch_buffer> buffers_;  // one per flusher

  std::uint64_t taken_ = 0;  // values taken from the intake (the next one's intake index)
  std::vector<generation> sealed_;  // flush generations not yet complete, oldest first
  std::uint64_t sealed_ready_ = 0;  // sum of sealed_[*].ready
  std::uint64_t first_sealed_ = 0;  // id of sealed_.front(); the open generation's id is first + size
  generation open_{0, 0};
  std::atomic<std::uint64_t> completed_gens_{0};

  std::uint64_t persisted_ = 0, failed_ = 0, coalesced_ = 0, retries_ = 0, batches_ = 0, sink_errors_ = 0,
                on_failed_errors_ = 0;
  std::size_t in_flight_ = 0;
  bool stopping_ = false;
  bool drain_expired_ = false;
  time_point drain_deadline_ = time_point::max();

  alignas(detail::cache_line) std::atomic<std::size_t> wake_threshold_{1};
  std::atomic<bool> wake_sent_{false};  // a producer has woken a parked flusher (see wake_flusher())
  static constexpr std::int64_t no_stamp = std::numeric_limits<std::int64_t>::min();
  std::optional<time_point> empty_since_;  // the last take that emptied the intake (see take_from_intake_locked())
  std::atomic<std::int64_t> woken_at_{no_stamp};  // when the waking producer enqueued (ns since epoch)
  alignas(detail::cache_line) detail::event_count work_ec_;   // flushers park here
  alignas(detail::cache_line) detail::event_count space_ec_;  // producers wait for room here
  alignas(detail::cache_line) detail::event_count done_ec_;   // flush() waits here

  std::mutex stop_mutex_;
  bool stopped_ = false;
  std::vector<std::jthread> threads_;
};

}  // namespace sluice
