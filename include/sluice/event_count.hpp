// sluice/event_count.hpp — park a thread until a condition may have changed.
//
// What it is for: the parking handle every blocking sluice call waits on, and the handle a Clock
// parks (clock.hpp: `clock.wait_until(ec, key, deadline)`). It is public so that you can write a
// Clock, or a component of your own that waits the way sluice's do. Like folly's EventCount, it
// hands out an opaque key.
//
// Protocol (the "event count" of Vyukov and folly's EventCount, written from the idea):
//
//   waiter                                   waker
//   ------                                   -----
//   auto key = ec.prepare_wait(); // waiters+1  make the condition true (any store)
//   if (condition()) { ec.cancel_wait(); }   ec.notify_one() / notify_all()
//   else ec.wait(key);            // parks       // syscall only if waiters > 0
//
// Requirements: every prepare_wait() is followed by exactly one cancel_wait(), wait(key) or
// wait_until(key, deadline) on the same thread, with the key it returned.
//
// Guarantees: no lost wake-ups under the protocol above: prepare_wait() increments the waiter count
// and reads the epoch with seq_cst; notify_*() issues a seq_cst fence and then reads the waiter
// count. Store-buffering is thereby excluded: either the waker sees the waiter registered (and
// bumps the epoch, so a wait() on the old key returns at once), or the waiter's re-check of the
// condition sees the waker's store. A waker that finds no waiter makes no system call at all.
// Spurious returns are possible, so callers always loop and re-check. Thread-safe.
// Never: allocates, spins, throws.
//
// Parking uses a Linux futex on the 32-bit epoch (absolute CLOCK_MONOTONIC timeouts, which is what
// std::chrono::steady_clock reads on Linux). Elsewhere, or when SLUICE_PORTABLE_PARKING is defined,
// a mutex + condition variable does the sleeping; the fast paths are identical.
//
// Example:
//   sluice::event_count ec;
//   std::atomic<bool> ready{false};
//   // waiter:
//   for (;;) { auto key = ec.prepare_wait(); if (ready) { ec.cancel_wait(); break; } ec.wait(key); }
//   // waker:
//   ready = true; ec.notify_all();
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

#if defined(__linux__) && !defined(SLUICE_PORTABLE_PARKING)
#include <cerrno>
#include <climits>
#include <ctime>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#define SLUICE_EVENT_COUNT_FUTEX 1
#else
#include <condition_variable>
#include <mutex>
#define SLUICE_EVENT_COUNT_FUTEX 0
#endif

namespace sluice {

class event_count {
 public:
  /// The ticket prepare_wait() hands out: pass it to the wait*() of the same event_count, once.
  /// Opaque and trivially copyable; only event_count can make one.
  class key_type {
    friend class event_count;
    constexpr explicit key_type(std::uint32_t epoch) noexcept : epoch_(epoch) {}
    std::uint32_t epoch_;
  };

  event_count() noexcept = default;
  event_count(const event_count&) = delete;
  event_count& operator=(const event_count&) = delete;

  /// Registers the caller as a waiter and returns the key to pass to wait(). The caller must
  /// re-check its condition after this call and then call either wait*() or cancel_wait().
  [[nodiscard]] key_type prepare_wait() noexcept {
    // seq_cst: this increment must be ordered before the caller's re-check of the condition; pairs
    // with the seq_cst fence in notify_*() (store-buffering litmus test).
    waiters_.fetch_add(1, std::memory_order_seq_cst);
    return key_type(epoch_.load(std::memory_order_seq_cst));
  }

  /// Withdraws a prepare_wait() whose condition turned out to be true already.
  void cancel_wait() noexcept {
    // relaxed: leaving only makes a later notify skip a syscall; no data is published by it.
    waiters_.fetch_sub(1, std::memory_order_relaxed);
  }

  /// Parks until notified after prepare_wait() returned `key` (or spuriously). Consumes the
  /// registration made by prepare_wait().
  void wait(key_type key) noexcept {
    while (epoch_.load(std::memory_order_acquire) == key.epoch_) {
      if (!park(key, nullptr)) break;
    }
    // relaxed: see cancel_wait().
    waiters_.fetch_sub(1, std::memory_order_relaxed);
  }

  /// As wait(), but gives up at `deadline`. Returns false if the deadline passed without a
  /// notification (the caller should still re-check its condition once).
  bool wait_until(key_type key, std::chrono::steady_clock::time_point deadline) noexcept {
    bool notified = true;
    while (epoch_.load(std::memory_order_acquire) == key.epoch_) {
      if (std::chrono::steady_clock::now() >= deadline) {
        notified = false;
        break;
      }
      park(key, &deadline);
    }
    // relaxed: see cancel_wait().
    waiters_.fetch_sub(1, std::memory_order_relaxed);
    return notified;
  }

  /// Wakes one parked waiter, if any. No system call when nobody is registered.
  void notify_one() noexcept { notify(false); }

  /// Wakes every parked waiter. No system call when nobody is registered.
  void notify_all() noexcept { notify(true); }

  /// True if some thread is between prepare_wait() and the end of its wait. A hint, for wakers
  /// that want to batch their notifications.
  [[nodiscard]] bool has_waiters() const noexcept {
    std::atomic_thread_fence(std::memory_order_seq_cst);  // pairs with prepare_wait(), as in notify()
    // relaxed: ordered by the fence above.
    return waiters_.load(std::memory_order_relaxed) != 0;
  }

  /// As has_waiters(), without the fence, for a waker whose write to the waiters' condition was
  /// itself a seq_cst read-modify-write (or seq_cst store) sequenced before this call. That write,
  /// this seq_cst load and prepare_wait()'s seq_cst increment are all in the single total order,
  /// which already excludes store-buffering: either this returns true, or the waiter's seq_cst
  /// re-check of its condition sees the write. The waker then calls notify_*() if it returns true.
  /// (sluice::channel uses it: a producer's claiming CAS is that write, so the common send makes
  /// no fence; see channel_ring.hpp.)
  [[nodiscard]] bool has_waiters_after_seq_cst_write() const noexcept {
    // seq_cst: pairs with prepare_wait()'s increment through the total order (see above).
    return waiters_.load(std::memory_order_seq_cst) != 0;
  }

 private:
  void notify(bool all) noexcept {
    // seq_cst fence: orders the caller's earlier store to the condition before the waiter-count
    // read below; pairs with the seq_cst increment in prepare_wait().
    std::atomic_thread_fence(std::memory_order_seq_cst);
    // relaxed: ordered by the fence above.
    if (waiters_.load(std::memory_order_relaxed) == 0) return;
    // release: a woken waiter that observes the new epoch also observes the caller's stores.
    epoch_.fetch_add(1, std::memory_order_release);
    wake(all);
  }

#if SLUICE_EVENT_COUNT_FUTEX
  // Returns false when the futex reported something other than a wake-up / interruption / value
  // mismatch (never expected; the caller then stops waiting rather than spin forever).
  bool park(key_type key, const std::chrono::steady_clock::time_point* deadline) noexcept {
    timespec ts{};
    timespec* timeout = nullptr;
    if (deadline != nullptr) {
      const auto since_epoch = deadline->time_since_epoch();
      const auto secs = std::chrono::duration_cast<std::chrono::seconds>(since_epoch);
      ts.tv_sec = static_cast<time_t>(secs.count());
      ts.tv_nsec = static_cast<long>(std::chrono::duration_cast<std::chrono::nanoseconds>(since_epoch - secs).count());
      timeout = &ts;
    }
    // FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC timeout (steady_clock on Linux).
    const long rc = ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&epoch_),
                              FUTEX_WAIT_BITSET | FUTEX_PRIVATE_FLAG, key.epoch_, timeout, nullptr,
                              FUTEX_BITSET_MATCH_ANY);
    return rc == 0 || errno == EAGAIN || errno == EINTR || errno == ETIMEDOUT;
  }

  void wake(bool all) noexcept {
    ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&epoch_), FUTEX_WAKE | FUTEX_PRIVATE_FLAG,
              all ? INT_MAX : 1, nullptr, nullptr, 0);
  }
  static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t) &&
                    std::atomic<std::uint32_t>::is_always_lock_free,
                "futex parking needs a lock-free 32-bit atomic with no padding");
#else
  bool park(key_type key, const std::chrono::steady_clock::time_point* deadline) noexcept {
    std::unique_lock lock(mutex_);
    // The epoch is re-checked under the mutex that wake() takes before notifying: no lost wake-up.
    if (epoch_.load(std::memory_order_acquire) != key.epoch_) return true;
    if (deadline != nullptr) {
      cv_.wait_until(lock, *deadline);
    } else {
      cv_.wait(lock);
    }
    return true;
  }

  void wake(bool all) noexcept {
    { std::lock_guard lock(mutex_); }  // serialises with a waiter between its epoch check and wait
    if (all) {
      cv_.notify_all();
    } else {
      cv_.notify_one();
    }
  }

  std::mutex mutex_;
  std::condition_variable cv_;
#endif

  std::atomic<std::uint32_t> epoch_{0};
  std::atomic<std::uint32_t> waiters_{0};
};

}  // namespace sluice
