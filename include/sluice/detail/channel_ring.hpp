// sluice/detail/channel_ring.hpp — the lock-free bounded ring behind sluice::channel (not public API).
//
// A ring of `capacity` slots, each with a 64-bit stamp that says whose turn the slot is (the
// per-slot sequence number of Vyukov's bounded MPMC queue, with the lap/index encoding that lets
// the capacity be any number instead of a power of two):
//
//   position  = lap | index        index < capacity, lap a multiple of one_lap = bit_ceil(capacity + 1)
//   stamp == p      the slot is empty and waits for the producer that claims position p
//   stamp == p + 1  the slot holds the item written at position p, waiting for the reader of p
//
// Producers claim positions with a CAS on `tail_` (only when the slot's stamp says it is empty), write
// the item, then publish it by storing `p + 1`. Readers claim positions from `head_`, move the item
// out, and hand the slot to the next lap by storing `p + one_lap`. Bit 63 of `tail_` is the closed
// flag: close() sets it with one fetch_or, so a producer's CAS either lands before the close (its
// item will be received) or fails and sees the flag. "Drained" is therefore exact: closed, and
// head == tail.
//
// Readers are the single consumer, and — only in drop_oldest mode — producers evicting the oldest
// item. When no evictor can exist, the consumer owns `head_` and advances it with plain stores; when
// one can, every reader (consumer included) claims positions with a CAS on `head_`. That is the one
// mechanism: whoever wins the CAS on a full slot at the head owns that item.
//
// This class does no waiting and no notification: channel.hpp layers blocking on top of it.
// Thread-safe as described above. Allocates once, in the constructor.
#pragma once

#include <atomic>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>

#include "event_count.hpp"

namespace sluice::detail {

enum class claim_result { ok, full, closed };

template <class T>
class channel_ring {
 public:
  using pos_type = std::uint64_t;
  static constexpr pos_type closed_bit = pos_type{1} << 63;

  /// `capacity` must be >= 1 (the public constructor validates it). `evicting` = producers may
  /// take items from the head (drop_oldest mode).
  channel_ring(std::size_t capacity, bool evicting)
      : cap_(capacity),
        one_lap_(std::bit_ceil(static_cast<pos_type>(capacity) + 1)),
        lap_shift_(static_cast<unsigned>(std::countr_zero(one_lap_))),
        evicting_(evicting),
        slots_(std::make_unique<slot[]>(capacity)) {
    for (std::size_t i = 0; i < cap_; ++i) {
      // relaxed: construction happens-before any use of the ring by other threads.
      slots_[i].stamp.store(i, std::memory_order_relaxed);
    }
  }

  channel_ring(const channel_ring&) = delete;
  channel_ring& operator=(const channel_ring&) = delete;

  ~channel_ring() {
    // No other thread may use the ring now, so every position in [head, tail) holds an item.
    pos_type h = head_.load(std::memory_order_relaxed);
    const pos_type t = tail_.load(std::memory_order_relaxed) & ~closed_bit;
    for (; h != t; h = next(h)) at(h).item()->~T();
  }

  [[nodiscard]] std::size_t capacity() const noexcept { return cap_; }
  [[nodiscard]] bool evicting() const noexcept { return evicting_; }

  // ---- producers -------------------------------------------------------------------------

  /// Claims up to `want` (>= 1) consecutive empty positions. On ok, `first` is the first claimed
  /// position and `count` how many; the caller must construct an item in each and publish() it.
  claim_result claim(std::size_t want, pos_type& first, std::size_t& count) noexcept {
    // relaxed: a stale tail only makes the stamp check or the CAS below fail and retry.
    pos_type t = tail_.load(std::memory_order_relaxed);
    for (;;) {
      if (t & closed_bit) return claim_result::closed;
      // acquire: pairs with the release in release_slot(), so the reader's move-out and destroy of
      // the previous lap's item happen-before we construct into the slot.
      const pos_type stamp = at(t).stamp.load(std::memory_order_acquire);
      if (stamp == t) {
        pos_type end = next(t);
        std::size_t n = 1;
        while (n < want && at(end).stamp.load(std::memory_order_acquire) == end) {  // acquire: as above
          end = next(end);
          ++n;
        }
        // seq_cst on success: this claim is the write a parked consumer's pending_or_closed()
        // re-check reads; the caller's following seq_cst waiter check pairs with the consumer's
        // prepare_wait() through the total order (event_count::has_waiters_after_seq_cst_write).
        // Relaxed on failure: we only retry. Slot contents are ordered by the stamps instead.
        if (tail_.compare_exchange_weak(t, end, std::memory_order_seq_cst, std::memory_order_relaxed)) {
          first = t;
          count = n;
          return claim_result::ok;
        }
      } else if (stamp + one_lap_ == t + 1) {
        // The slot still holds the item of position t - one_lap: full, unless tail moved meanwhile.
        const pos_type again = tail_.load(std::memory_order_relaxed);  // relaxed: as at the top
        if (again == t) return claim_result::full;
        t = again;
      } else {
        // Another producer claimed t and tail has moved on.
        cpu_relax();
        t = tail_.load(std::memory_order_relaxed);  // relaxed: as at the top
      }
    }
  }

  [[nodiscard]] T* slot_storage(pos_type p) noexcept { return at(p).item(); }

  /// The position after p (index wraps to 0 at capacity, moving to the next lap).
  [[nodiscard]] pos_type next(pos_type p) const noexcept {
    const pos_type index = p & (one_lap_ - 1);
    return index + 1 < cap_ ? p + 1 : (p & ~(one_lap_ - 1)) + one_lap_;
  }

  /// Makes the item constructed at p visible to readers.
  void publish(pos_type p, std::memory_order order = std::memory_order_release) noexcept {
    // release (or stronger, chosen by the caller): pairs with the acquire in try_read()/ready(), so
    // the item's construction happens-before the reader's move-out.
    at(p).stamp.store(p + 1, order);
  }

  /// True if the position the next producer would claim is free (or the ring is closed). The
  /// predicate a blocked producer re-checks; seq_cst loads so that it pairs with the consumer's
  /// seq_cst fence in event_count::notify_all().
  [[nodiscard]] bool has_space_or_closed() const noexcept {
    const pos_type t = tail_.load(std::memory_order_seq_cst);
    if (t & closed_bit) return true;
    return at(t).stamp.load(std::memory_order_seq_cst) + one_lap_ != t + 1;
  }

  /// drop_oldest: if the ring is full with its oldest item still unclaimed, claims that item,
  /// moves it into `victim_fn(T&&)` and frees its slot. Returns false if there is nothing to evict
  /// right now (space appeared, or the consumer is moving the oldest item out: retry).
  template <class VictimFn>
  bool evict_oldest(VictimFn&& victim_fn) noexcept {
    // acquire: pairs with the CAS/stores of other readers on head_ (monotonic; no ABA).
    pos_type h = head_.load(std::memory_order_acquire);
    for (;;) {
      const pos_type t = tail_.load(std::memory_order_relaxed) & ~closed_bit;  // relaxed: a hint
      // Evict only the item sitting in the very slot the next producer needs (h == t - one_lap
      // in lap terms): anything else means space is about to appear without dropping.
      if (h + one_lap_ != t) return false;
      // acquire: pairs with publish(); the item's construction happens-before our move-out.
      if (at(h).stamp.load(std::memory_order_acquire) != h + 1) return false;
      // acquire on success: pairs with other readers' CAS so their release of earlier slots is seen.
      if (head_.compare_exchange_weak(h, next(h), std::memory_order_acquire, std::memory_order_acquire)) {
        T* item = at(h).item();
        T victim(std::move(*item));
        item->~T();
        release_slot(h);
        victim_fn(std::move(victim));
        return true;
      }
    }
  }

  /// Sets the closed flag. Returns true for the call that closed it.
  bool close() noexcept {
    // seq_cst: is_closed()/drained() readers and blocked producers' predicates read tail_ seq_cst;
    // the notify after this call pairs with their prepare_wait().
    return (tail_.fetch_or(closed_bit, std::memory_order_seq_cst) & closed_bit) == 0;
  }

  [[nodiscard]] bool is_closed() const noexcept {
    return (tail_.load(std::memory_order_seq_cst) & closed_bit) != 0;
  }

  // ---- readers (the consumer) ------------------------------------------------------------

  /// The consumer's view of the head (in evicting mode, producers may advance it too).
  [[nodiscard]] pos_type head() const noexcept {
    // acquire: in evicting mode, pairs with evictors' CAS; otherwise only the consumer writes it.
    return head_.load(std::memory_order_acquire);
  }

  /// True if the item at the head is published, or the ring is closed and drained.
  [[nodiscard]] bool readable_or_drained() const noexcept {
    const pos_type h = head_.load(std::memory_order_acquire);  // acquire: as in head()
    // acquire: pairs with publish().
    if (at(h).stamp.load(std::memory_order_acquire) == h + 1) return true;
    const pos_type t = tail_.load(std::memory_order_seq_cst);  // seq_cst: pairs with close()
    return (t & closed_bit) != 0 && (t & ~closed_bit) == h;
  }

  /// True if some producer has claimed the head position (its item is published or about to be),
  /// or the ring is closed. The condition a consumer parks on: producers make it true with their
  /// seq_cst claiming CAS, so they can decide whether to wake the consumer before publishing,
  /// with no fence (seq_cst load: pairs with that CAS through the total order).
  [[nodiscard]] bool pending_or_closed() const noexcept {
    const pos_type t = tail_.load(std::memory_order_seq_cst);
    return (t & closed_bit) != 0 || t != head_.load(std::memory_order_seq_cst);
  }

  /// Closed, and every claimed position has been read: nothing will ever come out again.
  [[nodiscard]] bool drained() const noexcept {
    const pos_type t = tail_.load(std::memory_order_seq_cst);
    return (t & closed_bit) != 0 && (t & ~closed_bit) == head_.load(std::memory_order_seq_cst);
  }

  /// Moves up to `max` (>= 1) published items from the head into `sink(T&&)`, in order, and
  /// frees their slots. Returns how many. Consumer only. `sink` must not throw.
  template <class Sink>
  std::size_t read(std::size_t max, Sink&& sink) noexcept {
    pos_type h = head_.load(std::memory_order_relaxed);  // relaxed: re-validated by the stamps / CAS below
    pos_type end = h;
    std::size_t n = 0;
    for (;;) {
      // acquire: pairs with publish(); construction happens-before our move-out.
      while (n < max && at(end).stamp.load(std::memory_order_acquire) == end + 1) {
        end = next(end);
        ++n;
      }
      if (n == 0) return 0;
      if (!evicting_) {
        // relaxed: only the consumer writes head_ in this mode; other threads read it for size()
        // and drained(), which tolerate a stale value (drained() is also ordered by the stamps).
        head_.store(end, std::memory_order_relaxed);
        break;
      }
      // acquire: pairs with an evictor's CAS, so we don't read a slot it freed (we re-scan then).
      if (head_.compare_exchange_strong(h, end, std::memory_order_acq_rel, std::memory_order_acquire)) break;
      end = h;  // an evictor took the head item(s); re-scan from the new head
      n = 0;
    }
    for (pos_type p = h; p != end; p = next(p)) {
      T* item = at(p).item();
      sink(std::move(*item));
      item->~T();
      release_slot(p);
    }
    return n;
  }

  // ---- accounting ------------------------------------------------------------------------

  /// Number of positions ever claimed by producers.
  [[nodiscard]] std::uint64_t claimed_count() const noexcept {
    return to_count(tail_.load(std::memory_order_acquire) & ~closed_bit);
  }
  /// Number of positions ever taken from the head (received or evicted).
  [[nodiscard]] std::uint64_t read_count() const noexcept {
    return to_count(head_.load(std::memory_order_acquire));
  }

 private:
  struct alignas(cache_line) slot {
    std::atomic<pos_type> stamp{0};
    alignas(T) unsigned char storage[sizeof(T)];
    T* item() noexcept { return std::launder(reinterpret_cast<T*>(storage)); }
  };

  void release_slot(pos_type p) noexcept {
    // release: pairs with the acquire in claim(); our move-out and destroy happen-before the next
    // lap's producer constructs into this slot.
    at(p).stamp.store(p + one_lap_, std::memory_order_release);
  }

  [[nodiscard]] slot& at(pos_type p) const noexcept { return slots_[p & (one_lap_ - 1)]; }

  [[nodiscard]] std::uint64_t to_count(pos_type p) const noexcept {
    return (p >> lap_shift_) * cap_ + (p & (one_lap_ - 1));
  }

  const std::size_t cap_;
  const pos_type one_lap_;
  const unsigned lap_shift_;
  const bool evicting_;
  std::unique_ptr<slot[]> slots_;
  // Producers hammer tail_; the consumer owns head_: separate lines so they never false-share.
  alignas(cache_line) std::atomic<pos_type> tail_{0};
  alignas(cache_line) std::atomic<pos_type> head_{0};
};

}  // namespace sluice::detail
