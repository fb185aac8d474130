// sluice/detail/channel_core.hpp — what sluice::channel's calls do (not public API).
//
// channel.hpp is the contract and forwards every call here. This file holds the two paths:
//   send_some():    claim positions (channel_ring), construct and publish the items, wake the
//                   consumer if it parked; when full, apply the full mode (wait, reject, drop_write,
//                   drop_oldest's evict-and-claim).
//   receive_some(): read published items from the head, count them, let producers know slots were
//                   freed; when there is nothing, wait (channel_waiter) or say why not.
// and the counters behind accepted() == received() + dropped() + size().
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <new>
#include <optional>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <thread>
#include <utility>

#include "channel_ring.hpp"
#include "channel_wait.hpp"
#include "wait.hpp"

namespace sluice::detail {

// Status and FullMode are sluice::channel_status and sluice::channel_full_mode (defined with the
// contract, in channel.hpp).
template <class T, class Status, class FullMode>
class channel_core {
  using ring_type = channel_ring<T>;
  using pos_type = typename ring_type::pos_type;

 public:
  using deadline_type = std::optional<steady_time>;

  channel_core(std::size_t capacity, FullMode mode, std::function<void(T&&)> on_drop)
      : mode_(validate(capacity, mode)),
        on_drop_(std::move(on_drop)),
        ring_(capacity, mode == FullMode::drop_oldest),
        waiter_(capacity) {}

  // ---- producers -------------------------------------------------------------------------

  /// Sends items[0, count) as far as the call allows; returns how many were consumed (sent or
  /// dropped). `status` says how the last try ended (ok, full, closed, timeout, cancelled, dropped).
  std::size_t send_some(T* items, std::size_t count, const deadline_type& deadline, const std::stop_token* stop,
                        bool may_block, Status& status) noexcept {
    std::size_t done = 0;
    bool timed_out = false;
    status = Status::ok;
    while (done < count) {
      pos_type p{};
      std::size_t n = 0;
      const auto claimed = claim_for_send(count - done, p, n);
      if (claimed == claim_result::ok) {
        const bool wake = waiter_.must_wake_consumer();
        for (std::size_t i = 0;; p = ring_.next(p)) {
          ::new (static_cast<void*>(ring_.slot_storage(p))) T(std::move(items[done + i]));
          ring_.publish(p);
          if (++i == n) break;
        }
        done += n;
        if (wake) waiter_.wake_consumer();
        status = Status::ok;
        continue;
      }
      if (claimed == claim_result::closed) {
        status = Status::closed;
        return done;
      }
      // Full (never in drop_oldest mode: claim_for_send() evicts instead).
      if (mode_ == FullMode::drop_write) {
        for (; done < count; ++done) drop_write(items[done]);
        status = Status::dropped;
        return done;
      }
      if (mode_ == FullMode::reject || !may_block) {
        status = timed_out ? Status::timeout : Status::full;
        return done;
      }
      switch (waiter_.wait_for_space(ring_, deadline, stop)) {
        case wait_outcome::ready:
          break;
        case wait_outcome::timeout:  // one last try, then timeout instead of full
          timed_out = true;
          may_block = false;
          break;
        case wait_outcome::cancelled:
          status = Status::cancelled;
          return done;
      }
    }
    return done;
  }

  /// Stops intake and wakes everybody. Returns true for the call that closed the channel.
  bool close() noexcept {
    const bool first = ring_.close();
    waiter_.wake_all();  // blocked producers re-check and see closed; the consumer drains, then sees it
    return first;
  }

  // ---- the consumer ----------------------------------------------------------------------

  /// Takes up to `max` (>= 1) items into `sink(T&&)` (which must not throw), waiting as the call
  /// allows. Returns ok with n >= 1, or why not: closed (closed and drained, final: once seen it is
  /// answered without looking), empty (may not wait), timeout, cancelled.
  template <class Sink>
  Status receive_some(std::size_t max, Sink&& sink, std::size_t& n, const deadline_type& deadline,
                      const std::stop_token* stop, bool may_block) noexcept {
#if SLUICE_CHECKS
    const single_receiver_check::scope one_receiver(receiver_check_);
#endif
    for (;;) {
      if ((n = ring_.read(max, sink)) != 0) {
        freed(n);
        return Status::ok;
      }
      if (drained_seen_ || !may_block) return give_up(Status::empty);
      const auto outcome = waiter_.wait_for_item(ring_, deadline, stop);
      if ((n = ring_.read(max, sink)) != 0) {  // also the last look after a timeout or a stop
        freed(n);
        return Status::ok;
      }
      if (outcome == wait_outcome::timeout) return give_up(Status::timeout);
      if (outcome == wait_outcome::cancelled) return give_up(Status::cancelled);
      if (ring_.drained()) return give_up(Status::closed);
    }
  }

  // ---- observers -------------------------------------------------------------------------

  [[nodiscard]] const ring_type& ring() const noexcept { return ring_; }
  [[nodiscard]] FullMode full_mode() const noexcept { return mode_; }
  [[nodiscard]] std::uint64_t accepted() const noexcept {
    return ring_.claimed_count() + writes_dropped_.load(std::memory_order_relaxed);  // relaxed: statistics
  }
  [[nodiscard]] std::uint64_t received() const noexcept {
    // Counted by the consumer itself, not derived from head_ minus evictions: that difference could
    // be read between an eviction's two updates and come out wrong (even wrap around).
    return received_.load(std::memory_order_relaxed);  // relaxed: statistics
  }
  [[nodiscard]] std::uint64_t dropped() const noexcept {
    // relaxed: statistics
    return evicted_.load(std::memory_order_relaxed) + writes_dropped_.load(std::memory_order_relaxed);
  }
  [[nodiscard]] std::uint64_t drop_callback_errors() const noexcept {
    return drop_errors_.load(std::memory_order_relaxed);  // relaxed: statistics
  }

 private:
  static FullMode validate(std::size_t capacity, FullMode mode) {
    if (capacity == 0 || capacity > (std::size_t{1} << 40)) {
      throw std::invalid_argument(std::string("sluice::channel: capacity must be ") +
                                  (capacity == 0 ? ">= 1" : "<= 2^40") + ", got " + std::to_string(capacity));
    }
    switch (mode) {
      case FullMode::wait:
      case FullMode::drop_oldest:
      case FullMode::drop_write:
      case FullMode::reject:
        return mode;
    }
    throw std::invalid_argument("sluice::channel: full_mode must be wait, drop_oldest, drop_write or reject, got " +
                                std::to_string(static_cast<int>(mode)));
  }

  // Claims up to `want` positions. In drop_oldest mode a full ring instead evicts the oldest item
  // and claims its slot in one step (channel_ring::evict_oldest_and_claim), retrying while it loses
  // races, so full is never returned there and a send that returns closed never evicted anything.
  claim_result claim_for_send(std::size_t want, pos_type& pos, std::size_t& n) noexcept {
    for (int tries = 0;; ++tries) {
      const auto claimed = ring_.claim(want, pos, n);
      if (claimed != claim_result::full || mode_ != FullMode::drop_oldest) return claimed;
      const auto evicted = ring_.evict_oldest_and_claim(pos, [this](T&& victim) noexcept {
        evicted_.fetch_add(1, std::memory_order_relaxed);  // relaxed: statistics
        deliver_drop(std::move(victim));
      });
      if (evicted != claim_result::full) {
        n = evicted == claim_result::ok ? 1 : 0;
        return evicted;
      }
      // Lost a race (nothing evicted): the consumer is moving the oldest item out right now.
      if (tries < 64) {
        cpu_relax();
      } else {
        std::this_thread::yield();
      }
    }
  }

  void drop_write(T& value) noexcept {
    T victim(std::move(value));
    writes_dropped_.fetch_add(1, std::memory_order_relaxed);  // relaxed: statistics
    deliver_drop(std::move(victim));
  }

  // Hands a dropped item to the callback; counted by the caller before this runs.
  void deliver_drop(T&& victim) noexcept {
    if (!on_drop_) return;
    try {
      on_drop_(std::move(victim));
    } catch (...) {
      drop_errors_.fetch_add(1, std::memory_order_relaxed);  // relaxed: statistics
    }
  }

  // Consumer: counts what was received and lets the waiter wake producers for the freed slots.
  void freed(std::size_t n) noexcept {
    // relaxed: a statistic with a single writer (this consumer); a plain load + store, no RMW.
    received_.store(received_.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
    waiter_.freed(n);
  }

  // Consumer, returning empty-handed: producers waiting for freed slots go first; closed wins over
  // any other reason once the channel is closed and drained.
  Status give_up(Status why) noexcept {
    waiter_.flush_wakes();
    if (drained_seen_ || (drained_seen_ = ring_.drained())) return Status::closed;
    return why;
  }

  const FullMode mode_;
  const std::function<void(T&&)> on_drop_;
  ring_type ring_;
  channel_waiter waiter_;  // spin/yield/park policy and the two event counts
  // Consumer-private (one consumer at a time): never written by producers.
  alignas(cache_line) std::atomic<std::uint64_t> received_{0};  // written in freed() only
  bool drained_seen_ = false;  // closed and drained is final: later receives return at once
  single_receiver_check receiver_check_;  // used only when SLUICE_CHECKS (the layout is the same)
  // Slow-path counters, on their own line: producers touch them only when dropping.
  alignas(cache_line) std::atomic<std::uint64_t> evicted_{0};
  std::atomic<std::uint64_t> writes_dropped_{0};
  std::atomic<std::uint64_t> drop_errors_{0};
};

}  // namespace sluice::detail
