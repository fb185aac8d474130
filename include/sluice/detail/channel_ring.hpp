// sluice/detail/channel_ring.hpp — the lock-free bounded ring behind sluice::channel (not public API).
//
// `capacity` slots addressed by 64-bit positions in a lap/index encoding, so that any capacity works
// without a division on the hot path:
//
//   position = lap | index     index < capacity, lap a multiple of one_lap = bit_ceil(capacity + 1)
//
// Producers claim positions with a CAS on `tail_`, construct the item, then publish it by storing
// `p + 1` into the slot's stamp (the per-slot sequence number of Vyukov's bounded queue). The reader
// of position p waits for exactly that stamp, so it never reads a half-built item.
//
// Slots are handed back to producers in bulk, not one by one: a reader moves items out and then
// publishes the new `head_` once (release). A producer may claim position t only when
// t < head + one_lap (the slot's previous item, position t - one_lap, has been read), which it
// checks against a cached copy of head_ that it refreshes only when the cache says "full". So on the
// fast path a producer reads no line the consumer writes, and the consumer writes no line a producer
// reads: one batch of N items costs the consumer N stamp reads and one store.
//
// Bit 63 of `tail_` is the closed flag: close() sets it with one fetch_or, so a producer's CAS either
// lands before the close (its item will be received) or fails and sees the flag. "Drained" is
// therefore exact: closed, and head == tail.
//
// Readers: the single consumer, and in drop_oldest mode producers evicting the oldest item. Since
// head_ is also the release point, a reader must finish moving items out before it advances head_;
// when evictors exist, readers therefore take turns through `read_lock_` (held for one batch or one
// eviction: a few moves, no user code). Without evictors the consumer owns head_ and takes no lock.
//
// This class does no waiting and no notification: channel.hpp layers blocking on top of it.
// Thread-safe as described above. Allocates once, in the constructor.
#pragma once

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <thread>
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
        slots_(std::make_unique<slot[]>(capacity)) {}  // stamps 0: no position p has stamp p + 1

  channel_ring(const channel_ring&) = delete;
  channel_ring& operator=(const channel_ring&) = delete;

  ~channel_ring() {
    // No other thread may use the ring now, so every position in [head, tail) holds an item.
    const pos_type t = tail_.load(std::memory_order_relaxed) & ~closed_bit;
    for (pos_type h = head_.load(std::memory_order_relaxed); h != t; h = next(h)) at(h).item()->~T();
  }

  [[nodiscard]] std::size_t capacity() const noexcept { return cap_; }

  // ---- producers -------------------------------------------------------------------------

  /// Claims up to `want` (>= 1) consecutive free positions. On ok, `first` is the first claimed
  /// position and `count` how many; the caller must construct an item in each and publish() it.
  claim_result claim(std::size_t want, pos_type& first, std::size_t& count) noexcept {
    // relaxed: a stale tail only makes the CAS below fail and retry.
    pos_type t = tail_.load(std::memory_order_relaxed);
    for (;;) {
      if (t & closed_bit) return claim_result::closed;
      // acquire: pairs with the release in refresh_head_cache(), itself chained to the reader's
      // release of head_, so the previous lap's move-out happens-before we construct.
      pos_type limit = head_cache_.load(std::memory_order_acquire) + one_lap_;
      if (t >= limit) {
        limit = refresh_head_cache() + one_lap_;
        if (t >= limit) {
          const pos_type again = tail_.load(std::memory_order_relaxed);  // relaxed: as above
          if (again == t) return claim_result::full;
          t = again;
          continue;
        }
      }
      std::size_t n = 1;
      pos_type end = next(t);
      if (want > 1) {
        const std::uint64_t room = to_count(limit) - to_count(t);
        n = static_cast<std::size_t>(std::min<std::uint64_t>(want, room));
        end = advance(t, n);
      }
      // seq_cst on success: this claim is the write a parked consumer's pending_or_closed()
      // re-check reads; the caller's following seq_cst waiter check pairs with the consumer's
      // prepare_wait() through the total order (event_count::has_waiters_after_seq_cst_write).
      // Relaxed on failure: we only retry with the value it loaded.
      if (tail_.compare_exchange_weak(t, end, std::memory_order_seq_cst, std::memory_order_relaxed)) {
        first = t;
        count = n;
        return claim_result::ok;
      }
    }
  }

  [[nodiscard]] T* slot_storage(pos_type p) noexcept { return at(p).item(); }

  /// Makes the item constructed at p visible to its reader.
  void publish(pos_type p) noexcept {
    // release: pairs with the acquire stamp loads in read()/evict_oldest_and_claim(); the construction
    // happens-before the move-out.
    at(p).stamp.store(p + 1, std::memory_order_release);
  }

  /// The position after p (index wraps to 0 at capacity, moving to the next lap).
  [[nodiscard]] pos_type next(pos_type p) const noexcept {
    const pos_type index = p & (one_lap_ - 1);
    return index + 1 < cap_ ? p + 1 : (p & ~(one_lap_ - 1)) + one_lap_;
  }

  /// True if at least `room` (1..capacity) positions are free, or the ring is closed. The predicate
  /// a blocked producer re-checks. seq_cst loads: they pair with the reader's seq_cst fence in
  /// event_count::notify_*() after it advanced head_.
  [[nodiscard]] bool has_space_or_closed(std::size_t room) const noexcept {
    const pos_type t = tail_.load(std::memory_order_seq_cst);
    if ((t & closed_bit) != 0) return true;
    return to_count(head_.load(std::memory_order_seq_cst)) + cap_ >= to_count(t) + room;
  }

  /// drop_oldest, on a full ring: evicts the oldest item and claims the slot it frees for the
  /// caller, as one step, so an eviction never happens without the caller's item taking its
  /// place. Under the read lock: if the channel is closed, returns closed (nothing evicted); if the
  /// ring is no longer exactly full, another reader holds the lock, the oldest item is still being
  /// published, or another producer moves tail_ first, returns full (nothing evicted; the caller
  /// retries its send). Otherwise claims position tail (one lap after head) by CAS, moves the
  /// oldest item out, advances head_, and hands the item to `victim_fn(T&&)` outside the lock;
  /// `claimed` is then the caller's position to construct into and publish.
  template <class VictimFn>
  claim_result evict_oldest_and_claim(pos_type& claimed, VictimFn&& victim_fn) noexcept {
    if (!try_lock_readers()) return claim_result::full;
    const pos_type h = head_.load(std::memory_order_relaxed);  // relaxed: written under the lock
    // seq_cst: the same ordering as claim()'s CAS; also reads the closed bit exactly once, here.
    pos_type t = tail_.load(std::memory_order_seq_cst);
    if (t & closed_bit) {
      unlock_readers();
      return claim_result::closed;
    }
    // acquire: pairs with publish(); construction happens-before our move-out.
    if (t != h + one_lap_ || at(h).stamp.load(std::memory_order_acquire) != h + 1) {
      unlock_readers();
      return claim_result::full;
    }
    // seq_cst: this claim is the write a parked consumer's re-check reads, as in claim(). A
    // failure (another producer claimed, or close() set the bit) evicts nothing. Relaxed on failure.
    if (!tail_.compare_exchange_strong(t, next(t), std::memory_order_seq_cst, std::memory_order_relaxed)) {
      unlock_readers();
      return claim_result::full;
    }
    T* item = at(h).item();
    T victim(std::move(*item));
    item->~T();
    // release: pairs with producers' acquire of head (through refresh_head_cache()).
    head_.store(next(h), std::memory_order_release);
    unlock_readers();
    victim_fn(std::move(victim));
    claimed = t;  // the slot h occupied, one lap later: free now, and ours
    return claim_result::ok;
  }

  /// Sets the closed flag. Returns true for the call that closed it.
  bool close() noexcept {
    // seq_cst: is_closed()/drained() readers and blocked threads' predicates read tail_ seq_cst; the
    // notify after this call pairs with their prepare_wait().
    return (tail_.fetch_or(closed_bit, std::memory_order_seq_cst) & closed_bit) == 0;
  }

  [[nodiscard]] bool is_closed() const noexcept {
    return (tail_.load(std::memory_order_seq_cst) & closed_bit) != 0;
  }

  // ---- readers (the consumer) ------------------------------------------------------------

  /// True if the item at the head is published. Touches only that slot's line, which its producer
  /// writes anyway: what a spinning consumer polls.
  [[nodiscard]] bool readable() const noexcept {
    const pos_type h = head_.load(std::memory_order_acquire);  // acquire: pairs with evictors' release
    return at(h).stamp.load(std::memory_order_acquire) == h + 1;  // acquire: pairs with publish()
  }

  /// True if the item at the head is published, or the ring is closed and drained.
  [[nodiscard]] bool readable_or_drained() const noexcept {
    const pos_type h = head_.load(std::memory_order_acquire);  // acquire: pairs with evictors' release
    if (at(h).stamp.load(std::memory_order_acquire) == h + 1) return true;  // acquire: pairs with publish()
    const pos_type t = tail_.load(std::memory_order_seq_cst);  // seq_cst: pairs with close()
    return (t & closed_bit) != 0 && (t & ~closed_bit) == h;
  }

  /// True if some producer has claimed the head position (its item is published or about to be),
  /// or the ring is closed. The condition a consumer parks on: producers make it true with their
  /// seq_cst claiming CAS, so they can decide whether to wake the consumer before publishing,
  /// with no fence (seq_cst loads: pair with that CAS through the total order).
  [[nodiscard]] bool pending_or_closed() const noexcept {
    const pos_type t = tail_.load(std::memory_order_seq_cst);
    return (t & closed_bit) != 0 || t != head_.load(std::memory_order_seq_cst);
  }

  /// Closed, and every claimed position has been read: nothing will ever come out again.
  [[nodiscard]] bool drained() const noexcept {
    const pos_type t = tail_.load(std::memory_order_seq_cst);
    return (t & closed_bit) != 0 && (t & ~closed_bit) == head_.load(std::memory_order_seq_cst);
  }

  /// Moves up to `max` (>= 1) published items from the head into `sink(T&&)`, in order, then
  /// hands their slots back to producers with one store. Returns how many. Consumer only. `sink`
  /// must not throw.
  template <class Sink>
  std::size_t read(std::size_t max, Sink&& sink) noexcept {
    if (evicting_) lock_readers();
    // relaxed: only readers write head_, and they take turns (the consumer alone, or under the lock).
    const pos_type h = head_.load(std::memory_order_relaxed);
    pos_type p = h;
    std::size_t n = 0;
    // acquire: pairs with publish(); construction happens-before our move-out.
    for (; n < max && at(p).stamp.load(std::memory_order_acquire) == p + 1; ++n, p = next(p)) {
      T* item = at(p).item();
      sink(std::move(*item));
      item->~T();
    }
    // release: pairs with producers' acquire of head (refresh_head_cache()); our move-outs and
    // destroys happen-before they construct into these slots.
    if (n != 0) head_.store(p, std::memory_order_release);
    if (evicting_) unlock_readers();
    return n;
  }

  // ---- accounting ------------------------------------------------------------------------

  /// Number of positions ever claimed by producers.
  [[nodiscard]] std::uint64_t claimed_count() const noexcept {
    return to_count(tail_.load(std::memory_order_acquire) & ~closed_bit);  // acquire: a snapshot
  }
  /// Number of positions ever taken from the head (received or evicted).
  [[nodiscard]] std::uint64_t read_count() const noexcept {
    return to_count(head_.load(std::memory_order_acquire));  // acquire: a snapshot
  }

 private:
  // Slots never straddle a cache line: small ones are padded to a power of two (an 8-byte item
  // makes a 16-byte slot, four to a line), larger ones to whole lines. A slot split across two
  // lines shares both with its neighbours, which costs up to 2x on 64-byte items.
  struct slot_layout {
    std::atomic<pos_type> stamp;
    alignas(T) unsigned char storage[sizeof(T)];
  };
  static constexpr std::size_t slot_align =
      std::max(alignof(slot_layout),
               sizeof(slot_layout) <= cache_line ? std::bit_ceil(sizeof(slot_layout)) : cache_line);
  struct alignas(slot_align) slot {
    std::atomic<pos_type> stamp{0};
    alignas(T) unsigned char storage[sizeof(T)];
    T* item() noexcept { return std::launder(reinterpret_cast<T*>(storage)); }
  };

  // Reloads head_ into the producers' shared cache; returns the fresh value.
  pos_type refresh_head_cache() noexcept {
    // seq_cst (at least acquire): pairs with the readers' release of head_; seq_cst also keeps a
    // producer that is about to report "full" and park from missing the consumer's notify.
    const pos_type h = head_.load(std::memory_order_seq_cst);
    // release: a producer that reads the cache (acquire, in claim()) inherits our synchronization
    // with the reader. Racing refreshes may store an older value: harmless, it only causes another
    // refresh (head_ itself is monotonic).
    head_cache_.store(h, std::memory_order_release);
    return h;
  }

  bool try_lock_readers() noexcept {
    // acquire: pairs with unlock_readers(); the previous reader's head_ update is visible.
    return !read_lock_.exchange(true, std::memory_order_acquire);
  }
  void lock_readers() noexcept {
    // The holder only moves a few items out (no user code), so a short spin, then yields.
    for (int spins = 0; !try_lock_readers(); ++spins) {
      if (spins < 64) {
        cpu_relax();
      } else {
        std::this_thread::yield();
      }
    }
  }
  void unlock_readers() noexcept {
    read_lock_.store(false, std::memory_order_release);  // release: pairs with try_lock_readers()
  }

  [[nodiscard]] slot& at(pos_type p) const noexcept { return slots_[p & (one_lap_ - 1)]; }

  [[nodiscard]] std::uint64_t to_count(pos_type p) const noexcept {
    return (p >> lap_shift_) * cap_ + (p & (one_lap_ - 1));
  }
  [[nodiscard]] pos_type from_count(std::uint64_t c) const noexcept {
    return ((c / cap_) << lap_shift_) | (c % cap_);
  }
  [[nodiscard]] pos_type advance(pos_type p, std::size_t n) const noexcept { return from_count(to_count(p) + n); }

  const std::size_t cap_;
  const pos_type one_lap_;
  const unsigned lap_shift_;
  const bool evicting_;
  std::unique_ptr<slot[]> slots_;
  // Producers' line: they CAS tail_ and share a cached copy of head_, so the common claim touches
  // no line the consumer writes.
  alignas(cache_line) std::atomic<pos_type> tail_{0};
  std::atomic<pos_type> head_cache_{0};
  // Readers' line.
  alignas(cache_line) std::atomic<pos_type> head_{0};
  std::atomic<bool> read_lock_{false};  // used only when evicting
};

}  // namespace sluice::detail
