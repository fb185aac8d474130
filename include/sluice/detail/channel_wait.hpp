// sluice/detail/channel_wait.hpp — how sluice::channel's producers and consumer wait for each other
// (not public API).
//
// channel.hpp is the contract; channel_ring.hpp moves items and never waits; this file decides when
// to spin, when to yield and when to park, and who wakes whom. Parking itself is the library's one
// spin-then-park loop (detail::block_until in wait.hpp) on two event counts: producers park on
// not_full_, the consumer on not_empty_.
//
// Producers waiting for space (full_mode::wait) wait for a chunk (an eighth of the capacity), not
// for one slot: otherwise every slot the consumer frees is fought over at once and the consumer's
// head line bounces between cores on every item. They poll with exponential backoff, yield a few
// times (with more producers than cores, the consumer may be queued behind them), then park. The
// consumer wakes one parked producer per quarter of the capacity it frees, and all of them when it
// runs dry (about to park or to return empty-handed): a futex hop per freed slot would cost
// several-fold on a small machine. Until then the buffer stays at least 3/4 full, so the consumer
// never starves for it. While some producer is polling (it will take the space without a system
// call), the consumer skips its quarter wake-up, at most three times in a row: a parked producer
// is bypassed for at most one lap of the ring.
//
// The consumer spins adaptively on the head slot's stamp (the line the next item's producer writes
// anyway): the spin doubles while spinning pays and halves while it does not, between 256 and 2048
// pauses. Every 16 pauses it yields, timing the yield: a yield that
// took long means another thread ran on this core, and after a few such yields in a row the
// consumer stops yielding and parks, so that the producer's wake-up lets the scheduler move it to
// an idle core (otherwise both sides stay cache-hot on one core, handing off by sched_yield while
// the other core idles). Producers wake a parked consumer once per sleep, not once per item: the
// first producer whose claim finds it registered (consumer_woken_) does it, after publishing.
//
// The numbers are ratios of the capacity, pause and yield counts, and one time (a yield over 2 us
// means another thread ran); what each is for, and what was measured, is in the README's design
// notes.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <stop_token>
#include <thread>

#include "event_count.hpp"
#include "wait.hpp"

// SLUICE_CHECKS: misuse checks that cost an atomic operation per call (today: a channel's second
// concurrent receiver). On by default in debug builds (!NDEBUG) and under AddressSanitizer or
// ThreadSanitizer; define SLUICE_CHECKS to 1 or 0 to force it either way.
#ifndef SLUICE_CHECKS
#if !defined(NDEBUG) || defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define SLUICE_CHECKS 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define SLUICE_CHECKS 1
#else
#define SLUICE_CHECKS 0
#endif
#else
#define SLUICE_CHECKS 0
#endif
#endif

namespace sluice::detail {

/// Reports a misuse that the library cannot recover from and aborts (the calls involved are
/// noexcept, so an exception would terminate anyway; a message first says what went wrong).
[[noreturn]] inline void channel_misuse(const char* what) noexcept {
  std::fputs(what, stderr);
  std::fputc('\n', stderr);
  std::fflush(stderr);
  std::abort();
}

/// SLUICE_CHECKS only: catches two threads inside the consumer side of one channel at once.
class single_receiver_check {
 public:
  class scope {
   public:
    explicit scope(single_receiver_check& c) noexcept : c_(c) {
      // relaxed: detection only needs the RMW's atomicity; it must not add synchronization that
      // would hide a data race from ThreadSanitizer.
      if (c_.busy_.exchange(true, std::memory_order_relaxed)) {
        channel_misuse(
            "sluice::channel: two threads are receiving from one channel at the same time; a "
            "channel has one consumer (receive*, try_receive*, receive_batch*, iteration): give "
            "each consumer its own channel, or hand the consumer role over with synchronization");
      }
    }
    ~scope() { c_.busy_.store(false, std::memory_order_relaxed); }  // relaxed: as above
    scope(const scope&) = delete;
    scope& operator=(const scope&) = delete;

   private:
    single_receiver_check& c_;
  };

 private:
  std::atomic<bool> busy_{false};
};

/// The waiting state of one channel, both sides. Producer-side members may be called by any number
/// of threads; consumer-side members by the single consumer only.
class channel_waiter {
 public:
  explicit channel_waiter(std::size_t capacity) noexcept
      : wake_batch_(std::max<std::size_t>(1, capacity / 4)), space_chunk_(std::max<std::size_t>(1, capacity / 8)) {}

  channel_waiter(const channel_waiter&) = delete;
  channel_waiter& operator=(const channel_waiter&) = delete;

  // ---- producers -------------------------------------------------------------------------

  /// Right after a successful claim: must this producer wake the consumer once its items are
  /// published? Only if the consumer is registered to park, and only the first producer to see
  /// that: one system call per consumer sleep, however many producers send meanwhile. The claim was
  /// a seq_cst CAS on the condition the consumer parks on (channel_ring::pending_or_closed), so no
  /// fence is needed; why the flag cannot lose a wake-up is explained at park_consumer().
  [[nodiscard]] bool must_wake_consumer() noexcept {
    return not_empty_.has_waiters_after_seq_cst_write() &&
           !consumer_woken_.exchange(true, std::memory_order_seq_cst);  // seq_cst: see park_consumer()
  }
  void wake_consumer() noexcept { not_empty_.notify_one(); }

  /// full_mode::wait: waits until a chunk of the capacity is free, or the ring is closed. A send
  /// whose deadline passes still takes any single free slot (the caller's last try), so only its
  /// timing, never its outcome, depends on the chunk.
  template <class Ring>
  [[nodiscard]] wait_outcome wait_for_space(const Ring& ring, const std::optional<steady_time>& deadline,
                                            const std::stop_token* stop) noexcept {
    auto ready = [&ring, chunk = space_chunk_] { return ring.has_space_or_closed(chunk); };
    {
      const polling_producer polling(polling_producers_);
      for (int pause = 1, total = 0; total < producer_spin_pauses; total += pause, pause = std::min(2 * pause, 32)) {
        for (int i = 0; i < pause; ++i) cpu_relax();
        if (ready()) return wait_outcome::ready;
      }
      for (int i = 0; i < producer_yields; ++i) {
        std::this_thread::yield();
        if (ready()) return wait_outcome::ready;
      }
    }
    return block_until(not_full_, ready, deadline, stop, 0);
  }

  // ---- the consumer ----------------------------------------------------------------------

  /// After freeing n slots: wakes one parked producer per quarter of the capacity freed, unless a
  /// producer is polling for space right now (it will take the space without a system call, and
  /// the consumer's futex call would only slow the bottleneck down). A quarter wake-up is skipped
  /// that way at most three times in a row, so a parked producer waits at most one lap of the
  /// ring longer than with a wake-up every quarter.
  void freed(std::size_t n) noexcept {
    freed_since_wake_ += n;
    if (freed_since_wake_ < next_wake_) return;
    // relaxed: a hint; a stale value only moves a wake-up by a quarter, never loses one (parked
    // producers re-check after registering, and flush_wakes() wakes them all).
    if (polling_producers_.load(std::memory_order_relaxed) != 0 && ++skipped_wakes_ < 4) {
      next_wake_ += wake_batch_;
      return;
    }
    freed_since_wake_ = 0;
    next_wake_ = wake_batch_;
    skipped_wakes_ = 0;
    not_full_.notify_one();
  }

  /// About to park or to return empty-handed: wakes every parked producer. Unconditionally (no
  /// system call when none is parked): a producer woken by an earlier notify_one() may have left
  /// with a timeout or a stop instead of sending, and nobody else would wake the rest.
  void flush_wakes() noexcept {
    freed_since_wake_ = 0;
    next_wake_ = wake_batch_;
    skipped_wakes_ = 0;
    not_full_.notify_all();
  }

  /// Waits until an item is readable or the ring is drained (or the deadline / stop token).
  ///
  /// It parks only while no producer has claimed the head position (pending_or_closed() false): a
  /// producer that claims one after the consumer registered sees it and wakes it after publishing.
  /// A producer that claimed before does not wake it, so an item claimed but not yet published is
  /// awaited here by spinning, then yielding, then polling every 50 us: that lasts only while a
  /// producer is descheduled between its claim and its publish (a few instructions otherwise).
  template <class Ring>
  [[nodiscard]] wait_outcome wait_for_item(const Ring& ring, const std::optional<steady_time>& deadline,
                                           const std::stop_token* stop) noexcept {
    const steady_time until = deadline.value_or(steady_time::max());
    for (;;) {
      const auto outcome = park_consumer(ring, deadline, stop);
      if (outcome != wait_outcome::ready) return outcome;
      for (int i = 0; !ring.readable_or_drained(); ++i) {
        if (!ring.pending_or_closed()) break;  // an evictor took the head item: park again
        if (i < 256) {
          cpu_relax();
          continue;
        }
        if (stop != nullptr && stop->stop_requested()) return wait_outcome::cancelled;
        if (std::chrono::steady_clock::now() >= until) return wait_outcome::timeout;
        if (i < 256 + 16) {
          std::this_thread::yield();
        } else {
          std::this_thread::sleep_for(std::chrono::microseconds(50));
        }
      }
      if (ring.readable_or_drained()) return wait_outcome::ready;
    }
  }

  // ---- anyone ----------------------------------------------------------------------------

  /// close(): every blocked producer and the consumer re-check (and see the closed flag).
  void wake_all() noexcept {
    not_full_.notify_all();
    not_empty_.notify_all();
  }

 private:
  // The consumer's spin, then block_until() on not_empty_. Its ready() also clears
  // consumer_woken_, so the next producer that sees the consumer registered wakes it. No lost
  // wake-up: inside block_until, registration (seq_cst RMW), the clear (seq_cst store) and the
  // re-check of tail_ (seq_cst load) are in that order in the single total order S; a producer's
  // claim (seq_cst CAS), its waiter check (seq_cst load) and its exchange (seq_cst RMW) likewise.
  // If the producer misses the registration, the re-check sees its claim. If its exchange reads a
  // stale `true`, the exchange precedes the clear in S, so again the re-check sees the claim.
  // Otherwise it wins the exchange and notifies after publishing. (Clears outside a registration,
  // from the same ready(), only ever cause an extra wake-up.)
  template <class Ring>
  [[nodiscard]] wait_outcome park_consumer(const Ring& ring, const std::optional<steady_time>& deadline,
                                           const std::stop_token* stop) noexcept {
    const int spins = consumer_spins_;
    bool shared_core = shared_core_yields_ >= max_shared_core_yields;
    for (int i = 0; i < spins && !shared_core; ++i) {
      if (ring.readable()) {
        consumer_spins_ = std::min(spins * 2, max_consumer_spins);  // spinning paid: spin longer
        return wait_outcome::ready;
      }
      if ((i & 15) == 15) {
        shared_core = timed_yield();
      } else {
        cpu_relax();
      }
    }
    if (!shared_core) consumer_spins_ = std::max(spins / 2, min_consumer_spins);  // did not pay: spin less
    if (ring.pending_or_closed()) return wait_outcome::ready;
    flush_wakes();  // about to park: producers waiting for the slots we freed go first
    // A yield lets a preempted producer on this core finish first; not when sharing the core is
    // the very thing parking should end.
    if (!shared_core) std::this_thread::yield();
    shared_core_yields_ = 0;
    auto ready = [this, &ring]() noexcept {
      consumer_woken_.store(false, std::memory_order_seq_cst);  // seq_cst: see above
      return ring.pending_or_closed();
    };
    return block_until(not_empty_, ready, deadline, stop, 0);
  }

  // Counts a producer in its spin/yield phase for the scope's lifetime.
  class polling_producer {
   public:
    explicit polling_producer(std::atomic<int>& n) noexcept : n_(n) {
      n_.fetch_add(1, std::memory_order_relaxed);  // relaxed: a hint for freed(), see there
    }
    ~polling_producer() { n_.fetch_sub(1, std::memory_order_relaxed); }  // relaxed: as above
    polling_producer(const polling_producer&) = delete;
    polling_producer& operator=(const polling_producer&) = delete;

   private:
    std::atomic<int>& n_;
  };

  // Yields; returns true once yields that let another thread run on this core (they took over
  // shared_core_yield) have come max_shared_core_yields times in a row.
  bool timed_yield() noexcept {
    const auto start = std::chrono::steady_clock::now();
    std::this_thread::yield();
    if (std::chrono::steady_clock::now() - start < shared_core_yield) {
      shared_core_yields_ = 0;
      return false;
    }
    return ++shared_core_yields_ >= max_shared_core_yields;
  }

  static constexpr int producer_spin_pauses = 64;  // polled 7 times with exponential backoff
  static constexpr int producer_yields = 16;       // then up to 16 yields before parking
  // The consumer's spin adapts between about a futex wake-up's cost (below that, a partner that
  // just parked can never be caught, and both sides would settle into a park/wake per hand-off) and
  // eight times that, however well spinning pays.
  static constexpr int min_consumer_spins = 256;  // pauses
  static constexpr int max_consumer_spins = 2048;
  // A yield this long let another thread run on this core (an uncontended one returns in < 1 us).
  static constexpr std::chrono::microseconds shared_core_yield{2};
  static constexpr int max_shared_core_yields = 4;  // such yields in a row: park instead of yielding

  const std::size_t wake_batch_;   // freed slots per producer wake-up: capacity / 4
  const std::size_t space_chunk_;  // free slots a waiting producer waits for: capacity / 8
  // Consumer-private (one consumer at a time): not atomic, never touched by producers.
  alignas(cache_line) std::size_t freed_since_wake_ = 0;
  std::size_t next_wake_ = wake_batch_;  // freed_since_wake_ at which the next wake-up is due
  int consumer_spins_ = 512;
  int shared_core_yields_ = 0;  // consecutive yields during which another thread ran on this core
  int skipped_wakes_ = 0;       // quarter wake-ups skipped in a row because a producer was polling
  // Producers between "full" and parking: written only on that slow path; read once per quarter.
  alignas(cache_line) std::atomic<int> polling_producers_{0};
  // Each event count on its own line: producers park on not_full_, the consumer on not_empty_.
  alignas(cache_line) event_count not_full_;
  alignas(cache_line) event_count not_empty_;
  std::atomic<bool> consumer_woken_{false};  // see park_consumer()
};

}  // namespace sluice::detail
