// sluice/limiter.hpp — a parallelism limiter: at most `max` permits held at once, FIFO waiters.
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
//  - in_use() never exceeds max().
//  - Waiters are served in arrival order: a released permit is handed directly to the oldest
//    parked waiter; while anyone waits, a newcomer never takes a permit ahead of it (no barging,
//    no starvation). Threads arriving at the same instant are ordered by the limiter's mutex.
//  - Releasing a permit happens-before the acquire that obtains it, and before a wait_idle() that
//    observes the limiter idle.
//  - With no waiter, acquire and release are one compare-and-swap each (no lock, no syscall).
//    A release makes a system call only when a thread is parked in acquire or wait_idle.
//    (libstdc++'s std::counting_semaphore makes a futex call on every release from 0, waiter or
//    not.) FIFO has a price under contention: each release with a queued waiter is a handoff,
//    never a re-take by the releaser, so a permit fought over by more threads than cores moves
//    at wake-up speed rather than at barging-mutex speed.
//
// What it never does: allocate, spin for long (a brief spin, then park), clamp a bad `max`.
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

  /// Throws std::invalid_argument if max is 0 (or too large to count).
  explicit limiter(std::size_t max) : max_(validate(max)), state_(static_cast<std::uint64_t>(max) * unit) {}

  limiter(const limiter&) = delete;
  limiter& operator=(const limiter&) = delete;

  ~limiter() {
    // Waits out a releaser still inside its locked notify (it may have made the limiter look idle
    // to wait_idle() a moment before it finished touching idle_ec_).
    std::lock_guard lock(mutex_);
    assert(waiters_.empty() && "sluice::limiter destroyed while threads wait on it");
    assert(in_use() == 0 && "sluice::limiter destroyed while permits are held");
  }

  /// Blocks until a permit is available (FIFO). Thread-safe. Never allocates. May block.
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

  /// Takes a permit if one is free and nobody waits; never blocks. Thread-safe. Never allocates.
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
    return max_ - static_cast<std::size_t>(state_.load(std::memory_order_relaxed) >> shift);
  }

  [[nodiscard]] std::size_t max() const noexcept { return max_; }

  /// Threads parked in acquire() right now (a snapshot, for monitoring and tests). Thread-safe.
  [[nodiscard]] std::size_t waiting() const noexcept {
    // relaxed: a monitoring snapshot, orders nothing.
    return waiting_.load(std::memory_order_relaxed);
  }

 private:
  // state_ = (free permits << 2) | idle_waiter_bit | queued_bit.
  // queued_bit: the waiter FIFO is non-empty; set and cleared only under mutex_. While it is set,
  //   free permits are 0 and releases hand their permit to the FIFO (slow path) — no barging.
  // idle_waiter_bit: a thread may be parked in wait_idle(); the release that makes the limiter idle
  //   clears it and notifies idle_ec_.
  static constexpr std::uint64_t queued_bit = 1;
  static constexpr std::uint64_t idle_waiter_bit = 2;
  static constexpr int shift = 2;
  static constexpr std::uint64_t unit = std::uint64_t{1} << shift;
  static constexpr int fast_spins = 32;

  static std::size_t validate(std::size_t max) {
    if (max < 1) throw std::invalid_argument("sluice::limiter: max must be >= 1, got " + std::to_string(max));
    if (max > (std::uint64_t{1} << (64 - shift - 1))) {
      throw std::invalid_argument("sluice::limiter: max must be <= 2^61, got " + std::to_string(max));
    }
    return max;
  }

  [[nodiscard]] std::size_t free_of(std::uint64_t s) const noexcept { return static_cast<std::size_t>(s >> shift); }

  // Fast path: one CAS when a permit is free and nobody is queued.
  bool try_take() noexcept {
    // relaxed: only a first guess for the CAS below.
    std::uint64_t s = state_.load(std::memory_order_relaxed);
    while (s >= unit && (s & queued_bit) == 0) {
      // acquire: pairs with the release CAS in release_one()/release_locked(), so the previous
      // holder's work happens-before ours. relaxed on failure: we only retry.
      if (state_.compare_exchange_weak(s, s - unit, std::memory_order_acquire, std::memory_order_relaxed)) {
        return true;
      }
    }
    return false;
  }

  void release_one() noexcept {
    // relaxed: only a first guess for the CAS below.
    std::uint64_t s = state_.load(std::memory_order_relaxed);
    for (;;) {
      const bool becomes_idle = free_of(s) + 1 == max_;
      if ((s & queued_bit) != 0 || (becomes_idle && (s & idle_waiter_bit) != 0)) {
        release_locked();  // hand off to a waiter, or wake wait_idle(): both under mutex_
        return;
      }
      // release: pairs with the acquire CAS in try_take() and the acquire load in idle_ready().
      if (state_.compare_exchange_weak(s, s + unit, std::memory_order_release, std::memory_order_relaxed)) return;
    }
  }

  void release_locked() noexcept {
    std::lock_guard lock(mutex_);
    if (detail::handoff_waiter* w = waiters_.pop_front()) {
      // relaxed: a monitoring counter, written only under mutex_.
      waiting_.fetch_sub(1, std::memory_order_relaxed);
      // The permit passes straight to the oldest waiter; free permits stay 0.
      // relaxed: the bit is only changed under mutex_, which orders it.
      if (waiters_.empty()) state_.fetch_and(~queued_bit, std::memory_order_relaxed);
      detail::grant(w);
      return;
    }
    // relaxed: only a first guess for the CAS below.
    std::uint64_t s = state_.load(std::memory_order_relaxed);
    for (;;) {
      const bool becomes_idle = free_of(s) + 1 == max_;
      const std::uint64_t next = becomes_idle ? ((s + unit) & ~idle_waiter_bit) : s + unit;
      // release: as in release_one().
      if (state_.compare_exchange_weak(s, next, std::memory_order_release, std::memory_order_relaxed)) {
        // Notified under mutex_ so ~limiter() (which takes mutex_) cannot run concurrently.
        if (becomes_idle && (s & idle_waiter_bit) != 0) idle_ec_.notify_all();
        return;
      }
    }
  }

  // `deadline` and `stop` may be null (no limit). (A pointer rather than an optional: GCC 12's
  // -Wmaybe-uninitialized misfires on an inlined optional<time_point>.)
  std::optional<permit> acquire_slow(const detail::steady_time* deadline, const std::stop_token* stop) {
    // Brief spin: with nobody queued a permit may come back within a few hundred cycles.
    for (int i = 0; i < fast_spins; ++i) {
      detail::cpu_relax();
      if (try_take()) return permit(this);
      // relaxed: a hint; if someone is queued, spinning cannot succeed (no barging).
      if ((state_.load(std::memory_order_relaxed) & queued_bit) != 0) break;
    }
    if (deadline != nullptr && std::chrono::steady_clock::now() >= *deadline) {
      if (try_take()) return permit(this);
      return std::nullopt;
    }
    detail::handoff_waiter self;
    {
      std::lock_guard lock(mutex_);
      // relaxed: a first guess; every decision below is a CAS.
      std::uint64_t s = state_.load(std::memory_order_relaxed);
      for (;;) {
        if ((s & queued_bit) == 0 && s >= unit) {
          // acquire: as in try_take().
          if (state_.compare_exchange_weak(s, s - unit, std::memory_order_acquire, std::memory_order_relaxed)) {
            return permit(this);
          }
          continue;
        }
        if ((s & queued_bit) != 0) break;
        // relaxed: the bit is read by releasers, who then take mutex_ (held here) before acting.
        if (state_.compare_exchange_weak(s, s | queued_bit, std::memory_order_relaxed)) break;
      }
      waiters_.push_back(&self);
      // relaxed: a monitoring counter, written only under mutex_.
      waiting_.fetch_add(1, std::memory_order_relaxed);
    }
    std::optional<detail::steady_time> limit;
    if (deadline != nullptr) limit = *deadline;
    const bool granted = detail::await_handoff(self, mutex_, limit, stop, [this, &self] {
      waiters_.remove(&self);
      // relaxed: see push_back above.
      waiting_.fetch_sub(1, std::memory_order_relaxed);
      // relaxed: changed only under mutex_ (held by await_handoff while calling this).
      if (waiters_.empty()) state_.fetch_and(~queued_bit, std::memory_order_relaxed);
    });
    if (granted) return permit(this);
    return std::nullopt;
  }

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
  alignas(detail::cache_line) std::atomic<std::uint64_t> state_;
  alignas(detail::cache_line) std::mutex mutex_;  // guards waiters_ and the queued_bit transitions
  detail::handoff_fifo waiters_;
  std::atomic<std::size_t> waiting_{0};
  detail::event_count idle_ec_;
};

}  // namespace sluice
