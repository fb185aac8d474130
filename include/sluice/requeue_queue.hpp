// sluice/requeue_queue.hpp — timed requeue queue: "look at this key again in 30 s", deduplicated.
//
// What it is for: a reconcile loop's delayed work. schedule(key, item, delay) makes `item` due at
// now + delay; at most one entry is pending per key (a repeat is merged by a schedule_policy);
// cancel(key) removes it; pop() hands out entries in deadline order once they are due. No timer
// object per entry and no periodic scan: entries sit in a 4-ary indexed heap (O(log n) schedule,
// cancel and reschedule; detail/indexed_heap.hpp), and a waiting consumer sleeps until exactly the
// earliest deadline.
//
// Requirements: Key satisfies sluice::hashable_key<Key, Hash, KeyEqual> (key.hpp: copyable,
// hashable, equality-comparable; a key without std::hash is reported in one readable line); Key and
// T nothrow move-constructible. Clock models sluice::clock_source (clock.hpp) and is held by value.
//
// Guarantees:
// - Order: entries pop in deadline order; equal deadlines pop in the order they were scheduled (or
//   last changed). An entry is never handed out before its deadline on `Clock`.
// - Deadlines: a zero, negative or NaN delay is due now; a delay beyond `horizon` (100 years, also
//   +inf) is clamped to now + horizon, and time points are added with saturation
//   (sluice::saturating_add): nothing overflows (kube-rs#1779). try_pop_for(NaN) polls once.
// - Nothing vanishes: each accepted entry is popped exactly once, cancelled, replaced by a later
//   schedule of the same key (the policy says how), or returned by take_all(). A schedule that is
//   not accepted (unchanged / full / closed) does not consume the caller's item.
// - Happens-before: everything before a schedule() happens-before the pop() that returns its entry.
// - Waking: a parked pop() wakes only at the earliest deadline, when an earlier deadline is
//   scheduled, on close(), or on its stop token. Schedulers make a wake-up system call only when
//   their entry becomes earlier than the deadline a parked consumer sleeps until.
// - Bounded: one entry per key, optionally at most `capacity` entries; memory shrinks with size()
//   (at most ~4x the pending count plus the arrays' doubling slack; all of it released at zero).
// - Threads: every member function is thread-safe; any number of schedulers and of consumers. With
//   several blocked consumers, one (the "leader") sleeps until the earliest deadline and the rest
//   sleep without a deadline until the leader hands over, so a deadline wakes one thread, not all.
// Never: spins while waiting (the condition is time: a spin cannot bring a deadline closer, and an
// earlier schedule wakes the sleeper directly), scans entries, or calls user code under its lock
// other than Key/T copies and moves, Hash and KeyEqual. pop and cancel allocate only to shrink the
// arrays after size() fell to a quarter (amortised O(1); if that allocation fails the shrink is
// skipped and nothing else changes).
//
// Example:
//   sluice::requeue_queue<std::string, int> q;
//   (void)q.schedule("pod/a", 1, 30s);                         // due in 30 s
//   (void)q.schedule("pod/a", 2, 5s);                          // keep_earliest: now due in 5 s
//   if (auto e = q.pop()) reconcile(e->key, e->item);          // blocks until due (or close())
//   q.close(); auto rest = q.take_all();                       // nothing vanishes
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <utility>
#include <vector>

#include "clock.hpp"
#include "deadline.hpp"
#include "detail/indexed_heap.hpp"
#include "event_count.hpp"
#include "key.hpp"

namespace sluice {

/// How schedule() merges with an entry already pending for the same key.
enum class schedule_policy {
  keep_earliest,  ///< the earlier deadline wins, with its item (client-go's AddAfter)
  replace,        ///< the new item and deadline always win
  keep_existing,  ///< the pending entry is left alone
};

/// What schedule() did. Only `added` and `changed` consume the item.
enum class schedule_status {
  added,      ///< no entry was pending for the key; one is now
  changed,    ///< the pending entry took the new item and deadline
  unchanged,  ///< the pending entry was kept (policy); the item was not consumed
  full,       ///< `capacity` entries are pending; the item was not consumed
  closed,     ///< the queue is closed; the item was not consumed
};

template <class Key, class T, clock_source Clock = steady_clock, class Hash = std::hash<Key>,
          class KeyEqual = std::equal_to<Key>>
class requeue_queue {
  static_assert(hashable_key<Key, Hash, KeyEqual>,
                "sluice::requeue_queue<Key, T>: Key must be copyable, hashable and equality-comparable: "
                "give it a std::hash<Key> specialisation and operator==, or pass Hash / KeyEqual "
                "(see sluice::hashable_key in <sluice/key.hpp>)");
  // Hash / KeyEqual, or stand-ins when the assertion above fails (so it is the only error).
  using hash_type = detail::checked_hash<Key, Hash, KeyEqual>;
  using key_equal_type = detail::checked_key_equal<Key, Hash, KeyEqual>;

 public:
  using key_type = Key;
  using item_type = T;
  using clock_type = Clock;
  using time_point = typename Clock::time_point;
  using duration = typename Clock::duration;
  static_assert(std::chrono::duration<long double>(Clock::duration::max()) >
                    std::chrono::duration<long double>(std::chrono::hours(24 * 365 * 200)),
                "sluice::requeue_queue: Clock::duration must span at least 200 years (the 100-year horizon, "
                "added to now())");

  /// An entry handed out by pop() / take_all().
  struct entry {
    Key key;
    T item;
    time_point deadline;  ///< when it became due (after horizon clamping)
  };

  /// Delays beyond this are clamped to it: about 100 years, i.e. "never" in practice.
  static constexpr duration horizon =
      std::chrono::duration_cast<duration>(std::chrono::hours(24 * 365 * 100));

  /// No limit other than one entry per key.
  static constexpr std::size_t unbounded = std::numeric_limits<std::size_t>::max();

  /// `capacity`: the most entries that may be pending (>= 1, else std::invalid_argument);
  /// schedule() reports `full` beyond it. May allocate (the clock's copy).
  explicit requeue_queue(Clock clock = Clock{}, std::size_t capacity = unbounded, hash_type hash = hash_type{},
                         key_equal_type eq = key_equal_type{})
      : clock_(std::move(clock)), capacity_(capacity), heap_(std::move(hash), std::move(eq)) {
    if (capacity == 0) throw std::invalid_argument("sluice::requeue_queue: capacity must be >= 1, got 0");
  }

  requeue_queue(const requeue_queue&) = delete;
  requeue_queue& operator=(const requeue_queue&) = delete;

  /// Destroying a queue with blocked consumers is undefined: close() and join them first.
  ~requeue_queue() = default;

  // ---- scheduling ------------------------------------------------------------------------

  /// Makes `item` due for `key` at now() + delay (delay <= 0 or NaN: due now; > horizon, +inf:
  /// clamped).
  /// Moves `item` only when the result is added or changed. Thread-safe. May allocate (amortised
  /// O(1) array growth); O(log n). Wakes a parked consumer only if this deadline is earlier than
  /// the one it sleeps until.
  template <class Rep, class Period>
  [[nodiscard]] schedule_status schedule(const Key& key, T&& item, const std::chrono::duration<Rep, Period>& delay,
                                         schedule_policy policy = schedule_policy::keep_earliest) {
    return schedule_impl(key, std::move(item), &delay, nullptr, policy);
  }
  template <class Rep, class Period>
  [[nodiscard]] schedule_status schedule(const Key& key, const T& item, const std::chrono::duration<Rep, Period>& delay,
                                         schedule_policy policy = schedule_policy::keep_earliest) {
    return schedule_impl(key, item, &delay, nullptr, policy);
  }

  /// As schedule(), at an absolute deadline of Clock (a past one is due now; beyond now() +
  /// horizon it is clamped). Thread-safe. May allocate. O(log n).
  [[nodiscard]] schedule_status schedule_at(const Key& key, T&& item, time_point deadline,
                                            schedule_policy policy = schedule_policy::keep_earliest) {
    return schedule_impl(key, std::move(item), static_cast<const duration*>(nullptr), &deadline, policy);
  }
  [[nodiscard]] schedule_status schedule_at(const Key& key, const T& item, time_point deadline,
                                            schedule_policy policy = schedule_policy::keep_earliest) {
    return schedule_impl(key, item, static_cast<const duration*>(nullptr), &deadline, policy);
  }

  /// Removes the entry pending for `key`; returns whether there was one. Thread-safe. O(log n),
  /// amortised O(1) extra when it shrinks the arrays (the only allocation). Never wakes anyone.
  bool cancel(const Key& key) {
    std::lock_guard lock(mutex_);
    const auto s = heap_.find(key);
    if (s == heap_t::npos) return false;
    (void)heap_.erase(s);
    return true;
  }

  /// Whether an entry is pending for `key`. Thread-safe. Never allocates.
  [[nodiscard]] bool contains(const Key& key) const {
    std::lock_guard lock(mutex_);
    return heap_.find(key) != heap_t::npos;
  }

  /// The deadline pending for `key`, if any. Thread-safe. Never allocates.
  [[nodiscard]] std::optional<time_point> deadline_of(const Key& key) const {
    std::lock_guard lock(mutex_);
    const auto s = heap_.find(key);
    if (s == heap_t::npos) return std::nullopt;
    return heap_.deadline(s);
  }

  /// Pending entries (due or not). Thread-safe. Never allocates.
  [[nodiscard]] std::size_t size() const noexcept {
    std::lock_guard lock(mutex_);
    return heap_.size();
  }
  [[nodiscard]] bool empty() const noexcept { return size() == 0; }

  /// The earliest pending deadline, if any. Thread-safe. Never allocates.
  [[nodiscard]] std::optional<time_point> next_deadline() const noexcept {
    std::lock_guard lock(mutex_);
    if (heap_.empty()) return std::nullopt;
    return heap_.top_deadline();
  }

  // ---- consuming -------------------------------------------------------------------------

  /// Blocks until the earliest entry is due and returns it; std::nullopt once the queue is
  /// closed. Thread-safe. May block. Allocates only to shrink (see the file comment).
  [[nodiscard]] std::optional<entry> pop() { return pop_impl(std::nullopt, nullptr); }

  /// As pop(), but also returns std::nullopt when `stop` is triggered. Thread-safe. May block.
  [[nodiscard]] std::optional<entry> pop(std::stop_token stop) { return pop_impl(std::nullopt, &stop); }

  /// The earliest entry if it is due now, else std::nullopt (also when closed). Thread-safe.
  /// Never blocks (other than on the internal lock). Allocates only to shrink.
  [[nodiscard]] std::optional<entry> try_pop() {
    std::unique_lock lock(mutex_);
    if (closed_ || !top_due_locked()) return std::nullopt;
    return take_top_locked();
  }

  /// As pop(), giving up after `timeout` on Clock (a manual clock must be advanced past it). A
  /// zero, negative or NaN timeout polls once. Thread-safe. May block.
  template <class Rep, class Period>
  [[nodiscard]] std::optional<entry> try_pop_for(const std::chrono::duration<Rep, Period>& timeout) {
    return pop_impl(saturating_add(clock_.now(), timeout), nullptr);
  }

  /// As pop(), giving up at `deadline` on Clock. Thread-safe. May block.
  [[nodiscard]] std::optional<entry> try_pop_until(time_point deadline) { return pop_impl(deadline, nullptr); }

  /// Moves every due entry, up to `max`, to `out` (an output iterator over `entry`), in deadline
  /// order, under one lock acquisition; returns how many. 0 when closed. Thread-safe. Never
  /// blocks. Allocates only if `out` does; if writing to `out` throws, the entry being written is
  /// lost with the exception (use a nothrow sink such as a reserved vector's back_inserter).
  template <class OutputIt>
  std::size_t pop_due(OutputIt out, std::size_t max = unbounded) {
    std::unique_lock lock(mutex_);
    if (closed_) return 0;
    std::size_t n = 0;
    while (n < max && top_due_locked()) {
      *out = take_top_locked();
      ++out;
      ++n;
    }
    return n;
  }

  // ---- shutdown --------------------------------------------------------------------------

  /// Stops the queue: later schedules report `closed`, pops return std::nullopt, and every
  /// blocked pop wakes. Pending entries stay until take_all(). Idempotent. Thread-safe.
  void close() noexcept {
    {
      std::lock_guard lock(mutex_);
      closed_ = true;
    }
    leader_ec_.notify_all();
    follower_ec_.notify_all();
  }

  [[nodiscard]] bool is_closed() const noexcept {
    std::lock_guard lock(mutex_);
    return closed_;
  }

  /// Removes and returns every pending entry (due or not) in deadline order, and releases the
  /// queue's memory. Works open or closed. Thread-safe. Allocates the result.
  [[nodiscard]] std::vector<entry> take_all() {
    std::vector<entry> out;
    std::lock_guard lock(mutex_);
    out.reserve(heap_.size());  // may throw: nothing taken yet
    heap_.drain([&](typename heap_t::payload&& p, time_point d) noexcept {
      out.push_back(entry{std::move(p.key), std::move(p.item), d});
    });
    return out;
  }

  /// A copy of the queue's clock handle. Thread-safe.
  [[nodiscard]] Clock clock() const { return clock_; }

  /// Bytes held by the queue's arrays (a diagnostic; excludes heap memory owned by Key/T).
  [[nodiscard]] std::size_t memory_bytes() const noexcept {
    std::lock_guard lock(mutex_);
    return heap_.memory_bytes();
  }

 private:
  using heap_t = detail::indexed_heap<Key, T, time_point, hash_type, key_equal_type>;

  // The deadline for a schedule, clamped to now() + horizon. A schedule_at() whose deadline is
  // below a bound computed from an earlier now() needs no clock read (now() only grows).
  time_point deadline_locked(const duration* delay, const time_point* at) noexcept {
    if (at != nullptr && *at <= clamp_free_until_) return *at;
    const time_point now = now_locked();
    const time_point limit = clamp_free_until_;
    if (at != nullptr) return *at < limit ? *at : limit;
    if (*delay <= duration::zero()) return now;
    return *delay < horizon ? saturating_add(now, *delay) : limit;
  }

  template <class U, class Rep, class Period>
  schedule_status schedule_impl(const Key& key, U&& item, const std::chrono::duration<Rep, Period>* delay,
                                const time_point* at, schedule_policy policy) {
    // Convert a foreign duration to Clock's, saturating, before taking the lock.
    duration d{};
    if (delay != nullptr) {
      d = (*delay <= delay->zero()) ? duration::zero()
          : (std::chrono::duration<long double>(*delay) >= std::chrono::duration<long double>(horizon))
              ? horizon
              : saturating_ceil<duration>(*delay);
    }
    bool wake = false;
    schedule_status result;
    {
      std::lock_guard lock(mutex_);
      if (closed_) return schedule_status::closed;
      const time_point deadline = deadline_locked(delay != nullptr ? &d : nullptr, at);
      auto where = heap_.locate(key);  // Hash / KeyEqual may throw: nothing changed yet
      const auto s = where.found;
      if (s == heap_t::npos) {
        if (heap_.size() >= capacity_) return schedule_status::full;
        try {
          // Grow only for an insert; a grown index moved the buckets, so look again (rare:
          // amortised O(1) growth steps).
          if (heap_.reserve_one()) where = heap_.locate(key);
          heap_.insert(where, key, std::forward<U>(item), deadline);  // strong guarantee
        } catch (...) {
          // A throwing Key/T copy, Hash or KeyEqual (or bad_alloc) on an empty queue must not
          // leave the arrays just reserved behind: "all of it released at zero" (issue 7).
          heap_.release_if_empty();
          throw;
        }
        result = schedule_status::added;
      } else if (policy == schedule_policy::keep_existing ||
                 (policy == schedule_policy::keep_earliest && !(deadline < heap_.deadline(s)))) {
        return schedule_status::unchanged;
      } else {
        heap_.at(s).item = std::forward<U>(item);
        heap_.update(s, deadline);
        result = schedule_status::changed;
      }
      // Wake the leader only if it sleeps past this deadline; record that it will now wake by
      // then, so concurrent schedulers of later deadlines do not notify again.
      if (leader_present_ && deadline < leader_wake_at_) {
        leader_wake_at_ = deadline;
        wake = true;
      }
    }
    if (wake) leader_ec_.notify_one();
    return result;
  }

  // Reads the clock and remembers the reading: now() never decreases, so any earlier reading is
  // a lower bound of the current time.
  time_point now_locked() noexcept {
    last_now_ = clock_.now();
    clamp_free_until_ = saturating_add(last_now_, horizon);
    return last_now_;
  }

  // Whether the earliest entry is due. Skips the clock read (~20 ns, more on VMs) when the entry
  // is due by an earlier reading already: the common case while a consumer drains a backlog.
  bool top_due_locked() noexcept {
    if (heap_.empty()) return false;
    const time_point top = heap_.top_deadline();
    return top <= last_now_ || top <= now_locked();
  }

  entry take_top_locked() noexcept {
    auto [p, d] = heap_.pop_top();
    return entry{std::move(p.key), std::move(p.item), d};
  }

  struct stop_waker {
    requeue_queue* q;
    void operator()() const noexcept {
      q->leader_ec_.notify_all();
      q->follower_ec_.notify_all();
    }
  };

  // Leader/follower waiting. The leader parks until min(earliest deadline, caller's deadline) and
  // is the only thread schedulers ever wake; followers park until the caller's deadline or until
  // a leader leaves (then one follower is woken to take over). Registration (prepare_wait) happens
  // under mutex_, and wakers decide under mutex_ too, so no wake-up is lost; the one waker that
  // does not take mutex_ (the stop callback) is covered by re-checking the token after
  // registering.
  std::optional<entry> pop_impl(std::optional<time_point> until, const std::stop_token* stop) {
    std::optional<std::stop_callback<stop_waker>> on_stop;
    std::unique_lock lock(mutex_);
    std::optional<entry> result;
    for (;;) {
      if (closed_) break;
      if (stop != nullptr && stop->stop_requested()) break;
      if (top_due_locked()) {
        result.emplace(take_top_locked());
        break;
      }
      if (until && now_locked() >= *until) break;
      if (stop != nullptr && !on_stop && stop->stop_possible()) {
        lock.unlock();  // the callback may run inline and must not need our lock (it does not)
        on_stop.emplace(*stop, stop_waker{this});
        lock.lock();
        continue;
      }
      if (!leader_present_) {
        leader_present_ = true;
        std::optional<time_point> wake_at = until;
        if (!heap_.empty() && (!wake_at || heap_.top_deadline() < *wake_at)) wake_at = heap_.top_deadline();
        leader_wake_at_ = wake_at ? *wake_at : time_point::max();
        const auto key = leader_ec_.prepare_wait();
        // The stop callback notifies without mutex_, so a stop requested after the check at the
        // top of the loop is seen only here, after registering (else its notify found no waiter).
        if (stop != nullptr && stop->stop_requested()) {
          leader_ec_.cancel_wait();
          leader_present_ = false;
          break;
        }
        lock.unlock();
        if (wake_at) {
          (void)clock_.wait_until(leader_ec_, key, *wake_at);
        } else {
          clock_.wait(leader_ec_, key);
        }
        lock.lock();
        leader_present_ = false;
      } else {
        ++followers_;
        const auto key = follower_ec_.prepare_wait();
        if (stop != nullptr && stop->stop_requested()) {  // as for the leader above
          follower_ec_.cancel_wait();
          --followers_;
          break;
        }
        lock.unlock();
        if (until) {
          (void)clock_.wait_until(follower_ec_, key, *until);
        } else {
          clock_.wait(follower_ec_, key);
        }
        lock.lock();
        --followers_;
      }
    }
    // Leaving without leadership while followers sleep: hand over, or they would sleep past the
    // next deadline.
    const bool hand_over = !leader_present_ && followers_ > 0 && !closed_;
    lock.unlock();
    if (hand_over) follower_ec_.notify_one();
    return result;
  }

  mutable std::mutex mutex_;
  Clock clock_;
  const std::size_t capacity_;
  heap_t heap_;
  bool closed_ = false;
  bool leader_present_ = false;
  time_point leader_wake_at_ = time_point::max();
  time_point last_now_ = time_point::min();          // the latest clock reading (a lower bound of now)
  time_point clamp_free_until_ = time_point::min();  // last_now_ + horizon: deadlines <= this need no clamping
  std::size_t followers_ = 0;
  event_count leader_ec_;
  event_count follower_ec_;
};

}  // namespace sluice
