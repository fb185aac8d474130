// sluice/detail/lock_table_mutex.hpp — a 12-byte mutex for key_lock_table's shards (not public API).
//
// std::mutex is 40 bytes; a shard's lock, counters and first bucket heads must share one cache
// line, because with keys spread over shards every operation usually finds that line in the other
// core's cache, and each extra line is one more cross-core transfer. Three states (after Drepper,
// "Futexes Are Tricky"): 0 free, 1 locked, 2 locked and someone may be parked. Parking goes
// through detail::event_count, the one parking mechanism every sluice component uses; unlock
// notifies only from state 2, so an uncontended unlock is one atomic exchange and never a fence or
// a system call (and event_count itself makes no system call when nobody is registered).
#pragma once

#include <atomic>
#include <cstdint>

#include "event_count.hpp"

namespace sluice::detail {

class lock_table_mutex {
 public:
  lock_table_mutex() noexcept = default;
  lock_table_mutex(const lock_table_mutex&) = delete;
  lock_table_mutex& operator=(const lock_table_mutex&) = delete;

  void lock() noexcept {
    std::uint32_t expected = 0;
    // acquire: pairs with the release exchange in unlock(): the previous critical section
    // happens-before ours. relaxed on failure: the slow path re-reads.
    if (state_.compare_exchange_strong(expected, 1, std::memory_order_acquire, std::memory_order_relaxed)) return;
    lock_contended();
  }

  bool try_lock() noexcept {
    std::uint32_t expected = 0;
    // acquire/relaxed: as in lock().
    return state_.compare_exchange_strong(expected, 1, std::memory_order_acquire, std::memory_order_relaxed);
  }

  void unlock() noexcept {
    // release: publishes the critical section to the next lock(). A previous value of 2 means a
    // thread may be parked: only then notify (event_count's fence pairs with prepare_wait()).
    if (state_.exchange(0, std::memory_order_release) == 2) ec_.notify_one();
  }

 private:
  static constexpr int spins = 100;

  void lock_contended() noexcept {
    for (int i = 0; i < spins; ++i) {
      cpu_relax();
      // relaxed: only a hint before the CAS, which orders.
      if (state_.load(std::memory_order_relaxed) == 0 && try_lock()) return;
    }
    // Mark "contended" so the holder's unlock notifies; park while it stays marked.
    // acquire: as in lock(), for the exchange that finds the mutex free.
    while (state_.exchange(2, std::memory_order_acquire) != 0) {
      const event_count::key_type key = ec_.prepare_wait();
      // seq_cst: the re-check after registering (event_count's protocol): either unlock()'s
      // notify sees us registered, or this load sees its exchange to 0.
      if (state_.load(std::memory_order_seq_cst) != 2) {
        ec_.cancel_wait();
        continue;
      }
      ec_.wait(key);
    }
  }

  std::atomic<std::uint32_t> state_{0};
  event_count ec_;
};

}  // namespace sluice::detail
