// sluice/limiter.hpp — a parallelism limiter: at most `max_parallel()` permits held at once.
//
// What it is for: the global half of two-level locking ("at most N reconciliations at once").
// acquire() returns a movable RAII `permit`; the permit is returned when it is destroyed, so an
// exception can never leak one, and a permit that was never acquired cannot be released (the
// only way to release is through a permit object, which exists only after a successful acquire).
//
// Requirements: none on the caller beyond destroying the limiter only after every permit has been
// released and no thread is blocked in it (checked by assert in debug builds).
//
// Guarantees:
//  - in_use() never exceeds max_parallel().
//  - Bounded unfairness (as Go's sync.Mutex): a running thread may take a free permit even while
//    others are queued, but no queued thread is overtaken more than `max_bypasses` (16384) times
//    by threads that arrived after it. Once the oldest waiter has been overtaken that often, every
//    release hands its permit straight to the oldest waiter and newcomers queue (strict FIFO)
//    until the waiters that were overtaken have been served. Queued threads are always served
//    among themselves in arrival order. Not guaranteed: FIFO between a queued thread and a thread
//    that has not queued yet.
//  - Releasing a permit happens-before the acquire that obtains it, and before a wait_idle() that
//    observes the limiter idle.
//  - Acquire and release are one compare-and-swap each (no lock, no system call), also while
//    others wait, except when the oldest waiter must be woken or is starving: then the release
//    takes the limiter's mutex. A release makes a system call only to wake a parked waiter that
//    nobody has woken yet (one per wake-up of the oldest waiter, not one per release), or a thread
//    parked in wait_idle. (libstdc++'s std::counting_semaphore makes a futex call on every release
//    from 0, waiter or not.)
//
// What it never does: allocate, spin for long (a brief spin, then park), clamp a bad `max`, let a
// free permit sit while every waiter sleeps.
//
// Example:
//   sluice::limiter limit(8);                       // at most 8 reconciles at once
//   {
//     sluice::limiter::permit p = limit.acquire();  // blocks while 8 are held
//     reconcile(entity);                            // may throw: the permit is still returned
//   }
//   limit.wait_idle();                              // all permits back
#pragma once

#include <atomic>
#include <cassert>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <utility>

#include "detail/event_count.hpp"
#include "detail/lock_handoff.hpp"
#include "detail/wait.hpp"

namespace sluice {

class limiter {
 public:
  /// One held permit. Move-only; returns itself to the limiter when destroyed or release()d.
  class permit {
   public:
    permit() noexcept = default;
    permit(permit&& other) noexcept : owner_(std::exchange(other.owner_, nullptr)) {}
    permit& operator=(permit&& other) noexcept {
      if (this != &other) {
        release();
        owner_ = std::exchange(other.owner_, nullptr);
      }
      return *this;
    }
    permit(const permit&) = delete;
    permit& operator=(const permit&) = delete;
    ~permit() { release(); }

    /// Returns the permit now (if still held). Afterwards the object is empty; a second call is a
    /// no-op. Never blocks for long. Never allocates. Not thread-safe on the same permit object.
    void release() noexcept {
      if (limiter* owner = std::exchange(owner_, nullptr)) owner->release_one();
    }

    /// True while this object holds a permit.
    [[nodiscard]] bool owns() const noexcept { return owner_ != nullptr; }
    explicit operator bool() const noexcept { return owns(); }

   private:
    friend class limiter;
    explicit permit(limiter* owner) noexcept : owner_(owner) {}
    limiter* owner_ = nullptr;
  };

  /// Throws std::invalid_argument if max is 0 (or above 2^44).
  explicit limiter(std::size_t max) : limiter(max, detail::bypass_bound_for_testing{max_bypasses}) {}

  /// For sluice's own tests: as limiter(max) with a smaller bypass bound (not public API).
  limiter(std::size_t max, detail::bypass_bound_for_testing bound)
      : max_(validate(max)),
        bypass_bound_(bound.value),
        state_(static_cast<std::uint64_t>(max) * unit) {
    assert(bound.value >= 1 && bound.value <= max_bypasses);
  }

  limiter(const limiter&) = delete;
  limiter& operator=(const limiter&) = delete;

  ~limiter() {
    // Waits out a releaser still inside its locked notify (it may have made the limiter look idle
    // to wait_idle() a moment before it finished touching idle_ec_).
    std::lock_guard lock(mutex_);
    assert(waiters_.empty() && "sluice::limiter destroyed while threads wait on it");
    assert(in_use() == 0 && "sluice::limiter destroyed while permits are held");
  }

  /// Blocks until a permit is available. Thread-safe. Never allocates. May block.
  [[nodiscard]] permit acquire() {
    if (try_take()) return permit(this);
    return *acquire_slow(nullptr, nullptr);
  }

  /// As acquire(), but returns nullopt once `stop` is requested while waiting. Thread-safe.
  /// Never allocates. May block.
  [[nodiscard]] std::optional<permit> acquire(std::stop_token stop) {
    if (try_take()) return permit(this);
    if (stop.stop_requested()) return std::nullopt;
    return acquire_slow(nullptr, &stop);
  }

  /// Takes a permit if one is free (and the oldest waiter has bypasses to spare); never blocks.
  /// Thread-safe. Never allocates.
  [[nodiscard]] std::optional<permit> try_acquire() noexcept {
    if (try_take()) return permit(this);
    return std::nullopt;
  }

  /// As acquire(), giving up after `timeout`. Thread-safe. Never allocates. May block.
  template <class Rep, class Period>
  [[nodiscard]] std::optional<permit> try_acquire_for(const std::chrono::duration<Rep, Period>& timeout) {
    if (try_take()) return permit(this);
    const detail::steady_time deadline = detail::deadline_after(timeout);
    return acquire_slow(&deadline, nullptr);
  }

  /// As acquire(), giving up at `deadline` (any clock). Thread-safe. Never allocates. May block.
  template <class Clock, class Duration>
  [[nodiscard]] std::optional<permit> try_acquire_until(const std::chrono::time_point<Clock, Duration>& deadline) {
    if (try_take()) return permit(this);
    const detail::steady_time steady_deadline = detail::to_steady(deadline);
    return acquire_slow(&steady_deadline, nullptr);
  }

  /// Blocks until no permit is held. Thread-safe. Never allocates. May block.
  void wait_idle() { (void)idle_wait(std::nullopt, nullptr); }

  /// As wait_idle(); returns false if `stop` was requested first. May block.
  [[nodiscard]] bool wait_idle(std::stop_token stop) { return idle_wait(std::nullopt, &stop); }

  /// As wait_idle(); returns false on timeout. May block.
  template <class Rep, class Period>
  [[nodiscard]] bool wait_idle_for(const std::chrono::duration<Rep, Period>& timeout) {
    return idle_wait(detail::deadline_after(timeout), nullptr);
  }

  /// As wait_idle(); returns false if `deadline` (any clock) passes first. May block.
  template <class Clock, class Duration>
  [[nodiscard]] bool wait_idle_until(const std::chrono::time_point<Clock, Duration>& deadline) {
    return idle_wait(detail::to_steady(deadline), nullptr);
  }

  /// Permits held right now (a snapshot). Thread-safe. Never blocks.
  [[nodiscard]] std::size_t in_use() const noexcept {
    // relaxed: a monitoring snapshot, orders nothing.
    return max_ - free_of(state_.load(std::memory_order_relaxed));
  }

  /// The most permits held at once (the constructor's argument).
  [[nodiscard]] std::size_t max_parallel() const noexcept { return max_; }

  /// Threads queued in acquire() right now (a snapshot, for monitoring and tests). Thread-safe.
  [[nodiscard]] std::size_t waiting() const noexcept {
    // relaxed: a monitoring snapshot, orders nothing.
    return waiting_.load(std::memory_order_relaxed);
  }

  /// How many times a queued thread can be overtaken by later arrivals, at most.
  static constexpr std::uint32_t max_bypasses = detail::max_bypasses;

 private:
  // state_ = (free permits << free_shift) | (head's bypass count << bypass_shift) | woken_bit |
  //          idle_waiter_bit | queued_bit. Everything a decision needs is in one word, so the fast
  //          paths are one CAS each.
  // queued_bit: the waiter fifo is non-empty; set and cleared only under mutex_.
  // woken_bit: the head waiter has been told to look (or is about to be), so releases need not
  //   wake anyone. Invariant: queued && free > 0 implies woken (a free permit never sits unseen
  //   while everybody is parked).
  // bypass count: barging takes while queued, counted against the head (lock_handoff.hpp); when
  //   it reaches max_bypasses newcomers are refused and releases hand permits to the head.
  // idle_waiter_bit: a thread may be parked in wait_idle(); the release that makes the limiter idle
  //   clears it and notifies idle_ec_.
  static constexpr std::uint64_t queued_bit = 1;
  static constexpr std::uint64_t idle_waiter_bit = 2;
  static constexpr std::uint64_t woken_bit = 4;
  static constexpr int bypass_shift = 3;
  static constexpr int bypass_bits = 16;
  static constexpr int free_shift = bypass_shift + bypass_bits;
  static constexpr std::uint64_t bypass_unit = std::uint64_t{1} << bypass_shift;
  static constexpr std::uint64_t bypass_mask = ((std::uint64_t{1} << bypass_bits) - 1) << bypass_shift;
  static constexpr std::uint64_t unit = std::uint64_t{1} << free_shift;
  static constexpr std::uint64_t largest_max = std::uint64_t{1} << (64 - free_shift - 1);
  static constexpr int fast_spins = 32;
  static_assert(max_bypasses < (std::uint64_t{1} << bypass_bits), "the bypass count must fit its field");

  static std::size_t validate(std::size_t max) {
    if (max < 1) throw std::invalid_argument("sluice::limiter: max must be >= 1, got " + std::to_string(max));
    if (max > largest_max) {
      throw std::invalid_argument("sluice::limiter: max must be <= 2^44, got " + std::to_string(max));
    }
    return max;
  }

  [[nodiscard]] static std::size_t free_of(std::uint64_t s) noexcept { return static_cast<std::size_t>(s >> free_shift); }
  [[nodiscard]] static std::uint64_t bypasses_of(std::uint64_t s) noexcept { return (s & bypass_mask) >> bypass_shift; }
  [[nodiscard]] bool starving(std::uint64_t s) const noexcept {
    return (s & queued_bit) != 0 && bypasses_of(s) >= bypass_bound_;
  }
  // The state once the head leaves the fifo: `last` if it was the only waiter, else the new head
  // has been bypassed `gap` times fewer (handoff_fifo::head_gap) and must look iff a permit is free.
  [[nodiscard]] static std::uint64_t after_head_left(std::uint64_t s, std::uint64_t gap, bool last) noexcept {
    if (last) return s & ~(queued_bit | woken_bit | bypass_mask);
    s -= gap << bypass_shift;
    return free_of(s) > 0 ? (s | woken_bit) : (s & ~woken_bit);
  }

  // Fast path: one CAS when a permit is free and no waiter is starving. Counts a bypass when
  // someone is queued.
  bool try_take() noexcept {
    // relaxed: only a first guess for the CAS below.
    std::uint64_t s = state_.load(std::memory_order_relaxed);
    while (s >= unit && !starving(s)) {
      const std::uint64_t next = s - unit + ((s & queued_bit) != 0 ? bypass_unit : 0);
      // acquire: pairs with the release CAS in release_one()/release_locked(), so the previous
      // holder's work happens-before ours. relaxed on failure: we only retry.
      if (state_.compare_exchange_weak(s, next, std::memory_order_acquire, std::memory_order_relaxed)) return true;
    }
    return false;
  }

  void release_one() noexcept {
    // relaxed: only a first guess for the CAS below.
    std::uint64_t s = state_.load(std::memory_order_relaxed);
    for (;;) {
      const bool becomes_idle = free_of(s) + 1 == max_;
      if (starving(s) || (s & (queued_bit | woken_bit)) == queued_bit ||
          (becomes_idle && (s & idle_waiter_bit) != 0)) {
        // Hand over to the head, wake the head, or wake wait_idle(): all under mutex_, which
        // ~limiter() takes too, so the limiter cannot be destroyed while we still touch it.
        release_locked();
        return;
      }
      // release: pairs with the acquire CAS in try_take() and the acquire load in idle_ready().
      if (state_.compare_exchange_weak(s, s + unit, std::memory_order_release, std::memory_order_relaxed)) return;
    }
  }

  [[gnu::noinline]] void release_locked() noexcept {
    std::lock_guard lock(mutex_);
    // relaxed: only a first guess for the CAS below.
    std::uint64_t s = state_.load(std::memory_order_relaxed);
    for (;;) {
      if (starving(s)) {
        // Starvation mode: the permit passes straight to the head (queued_bit set: the fifo is
        // not empty; it cannot change while we hold mutex_). Free permits are unchanged.
        detail::handoff_waiter* w = waiters_.front();
        (void)leave_fifo(*w);
        detail::grant(w);
        return;
      }
      const bool becomes_idle = free_of(s) + 1 == max_;
      const bool wake = (s & (queued_bit | woken_bit)) == queued_bit;
      std::uint64_t next = (s + unit) | (wake ? woken_bit : 0);
      if (becomes_idle) next &= ~idle_waiter_bit;
      // release: as in release_one().
      if (state_.compare_exchange_weak(s, next, std::memory_order_release, std::memory_order_relaxed)) {
        if (wake) detail::wake(waiters_.front());  // a free permit: the head must look
        // Notified under mutex_ so ~limiter() (which takes mutex_) cannot run concurrently.
        if (becomes_idle && (s & idle_waiter_bit) != 0) idle_ec_.notify_all();
        return;
      }
    }
  }

  // `deadline` and `stop` may be null (no limit). (A pointer rather than an optional: GCC 12's
  // -Wmaybe-uninitialized misfires on an inlined optional<time_point>.) The slow paths are kept
  // out of line (gnu::noinline, honoured by GCC and Clang) so that acquire() and release() inline
  // as one CAS each: inlined, they made an uncontended acquire/release pair ~1 ns (15%) slower.
  [[gnu::noinline]] std::optional<permit> acquire_slow(const detail::steady_time* deadline, const std::stop_token* stop) {
    // Brief spin: a permit may come back within a few hundred cycles.
    for (int i = 0; i < fast_spins; ++i) {
      detail::cpu_relax();
      if (try_take()) return permit(this);
      // relaxed: a hint; while the head is starving, spinning cannot succeed.
      if (starving(state_.load(std::memory_order_relaxed))) break;
    }
    if (deadline != nullptr && std::chrono::steady_clock::now() >= *deadline) {
      if (try_take()) return permit(this);
      return std::nullopt;
    }
    detail::handoff_waiter self;
    std::unique_lock lock(mutex_);
    // relaxed: a first guess; every decision below is a CAS.
    std::uint64_t s = state_.load(std::memory_order_relaxed);
    for (;;) {
      if (s >= unit && !starving(s)) {
        const std::uint64_t next = s - unit + ((s & queued_bit) != 0 ? bypass_unit : 0);
        // acquire: as in try_take().
        if (state_.compare_exchange_weak(s, next, std::memory_order_acquire, std::memory_order_relaxed)) {
          return permit(this);
        }
        continue;
      }
      if ((s & queued_bit) != 0) break;  // (free > 0 here means starving: the head is woken)
      // relaxed: the bit is read by releasers and bargers, who act on it with CAS or under
      // mutex_ (held here). The fifo is empty, so the count and woken_bit are 0.
      if (state_.compare_exchange_weak(s, s | queued_bit, std::memory_order_relaxed)) break;
    }
    waiters_.push_back(&self, static_cast<std::uint32_t>(bypasses_of(s)));
    // relaxed: a monitoring counter, written only under mutex_.
    waiting_.fetch_add(1, std::memory_order_relaxed);
    std::optional<detail::steady_time> limit;
    if (deadline != nullptr) limit = *deadline;
    const bool granted = detail::await_turn(
        self, lock, limit, stop, [this, &self] { return head_attempt(self); },
        [this, &self] { leave(self); });
    if (granted) return permit(this);
    return std::nullopt;
  }

  // With mutex_ held: unlinks `w` and updates queued_bit, woken_bit and the bypass count, taking
  // a permit for `w` too if `take` (then only if one is free: returns false, changing nothing,
  // if none is). Wakes the new head if it must look at a free permit.
  bool leave_fifo(detail::handoff_waiter& w, bool take = false) noexcept {
    const bool head = waiters_.front() == &w;
    const bool last = head && w.next == nullptr;
    const std::uint64_t gap = head ? waiters_.head_gap() : 0;
    // relaxed: only a first guess for the CAS below.
    std::uint64_t s = state_.load(std::memory_order_relaxed);
    std::uint64_t next = 0;
    for (;;) {
      if (take && s < unit) return false;
      next = take ? s - unit : s;
      if (head) next = after_head_left(next, gap, last);
      // acquire (when taking): as in try_take(). Otherwise only the fifo's own bits change,
      // which are ordered by mutex_ (held); relaxed on failure: we only retry.
      if (next == s || state_.compare_exchange_weak(s, next, take ? std::memory_order_acquire : std::memory_order_relaxed,
                                                    std::memory_order_relaxed)) {
        break;
      }
    }
    waiters_.remove(&w);
    // relaxed: a monitoring counter, written only under mutex_.
    waiting_.fetch_sub(1, std::memory_order_relaxed);
    if (head && !last && free_of(next) > 0) detail::wake(waiters_.front());
    return true;
  }

  // With mutex_ held, `self` the woken head: take a free permit, or record that no head is
  // looking any more (woken_bit off: the next release that frees a permit wakes us again).
  bool head_attempt(detail::handoff_waiter& self) noexcept {
    for (;;) {
      if (leave_fifo(self, true)) return true;
      // relaxed: only a first guess for the CAS below.
      std::uint64_t s = state_.load(std::memory_order_relaxed);
      // relaxed: a release that adds a permit after this CAS sees woken_bit clear and wakes the
      // head under mutex_, after await_turn() has registered us on our event_count. If a permit
      // came back meanwhile (its release saw woken_bit still set), take it instead.
      if (s < unit && state_.compare_exchange_strong(s, s & ~woken_bit, std::memory_order_relaxed)) return false;
    }
  }

  // Timeout or cancellation, mutex_ held: unlink `self`.
  void leave(detail::handoff_waiter& self) noexcept { (void)leave_fifo(self); }

  // True when idle; otherwise makes sure idle_waiter_bit is set so the idling release notifies.
  bool idle_ready() noexcept {
    // acquire: pairs with the release CAS of the last releaser.
    std::uint64_t s = state_.load(std::memory_order_acquire);
    for (;;) {
      if (free_of(s) == max_) return true;
      if ((s & idle_waiter_bit) != 0) return false;
      // acquire: as above, when the CAS fails and reloads.
      if (state_.compare_exchange_weak(s, s | idle_waiter_bit, std::memory_order_acquire)) return false;
    }
  }

  bool idle_wait(const std::optional<detail::steady_time>& deadline, const std::stop_token* stop) {
    if (idle_ready()) return true;
    return detail::block_until(idle_ec_, [this] { return idle_ready(); }, deadline, stop) ==
           detail::wait_outcome::ready;
  }

  const std::size_t max_;
  const std::uint64_t bypass_bound_;  // max_bypasses, except in sluice's own tests
  alignas(detail::cache_line) std::atomic<std::uint64_t> state_;
  alignas(detail::cache_line) std::mutex mutex_;  // guards waiters_ and the queued_bit transitions
  detail::handoff_fifo waiters_;
  std::atomic<std::size_t> waiting_{0};
  detail::event_count idle_ec_;
};

}  // namespace sluice
