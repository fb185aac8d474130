// sluice/detail/reconcile_table.hpp — the three tables behind reconcile_pipeline (not public API).
//
//   node_slab<Node>   per-key state nodes in chunks of 256 (addresses never move, so a running
//                     reconcile can hold a reference to its node's key), recycled through per-chunk
//                     free lists, allocated from the lowest chunk with room; trailing chunks without
//                     a live node are released down to a retained floor (review r1 F12; the owner
//                     moves idle nodes out of a sparse top chunk so that it empties).
//   slot_index        open addressing (linear probing, backward-shift deletion, no tombstones) from a
//                     32-bit mixed hash to a node id; load <= 1/2, shrinks at 1/8 and is freed at
//                     empty, but never below a retained floor.
//   The floor is the pipeline's intake capacity: an idle pipeline keeps the memory for `capacity`
//   keys (which its bound allows anyway) instead of paying page faults on every burst.
//   deadline_heap     binary min-heap of {deadline, seq, id}; the node keeps its heap position, so
//                     erase/update are O(log n); equal deadlines pop in scheduling order.
//   spin_mutex        the pipeline's one lock: spins about a microsecond (by the TSC), then parks
//                     (futex via event_count), with bounded barging. Its critical sections are a few dozen nanoseconds, and
//                     std::mutex parks at the first contention: with three threads on two cores that
//                     made every other hand-off a context switch.
//
// None of them locks; reconcile_pipeline guards all three with its one mutex. Only the calls
// documented "may allocate" allocate; the owner calls them on submitting threads, so a worker's
// state transitions never allocate (the heap reserves room for every live node up front).
#pragma once

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

#include "event_count.hpp"
#include "reconcile_spin.hpp"

namespace sluice::detail {

// A futex-style lock (spin briefly, then park) with bounded barging (review r1 F14). Running
// threads may take a just-released lock ahead of parked ones (cheap hand-over between workers),
// but a parked waiter that has been woken and lost the race `max_lost_wakes` times raises the
// starving bit: from then on only it may take the lock (newcomers' CAS from 0 fail, since the
// word is non-zero), and unlock() wakes everyone so it is sure to be among them. One starving
// waiter at a time; the others keep waiting as before. An outside caller therefore waits for at
// most a few of the workers' critical sections plus its own wake-ups, not for an unbounded run.
class spin_mutex {
 public:
  static constexpr std::uint32_t locked = 1, sleepers = 2, starving = 4;
  static constexpr int max_lost_wakes = 1;

  void lock() noexcept {
    std::uint32_t expected = 0;
    // acquire: pairs with the release in unlock(); the critical section happens after it.
    if (state_.compare_exchange_strong(expected, locked, std::memory_order_acquire, std::memory_order_relaxed)) return;
    // Spin about four microseconds — a worker's critical section that finishes one claim and
    // takes the next (up to 16 keys each; a 1 µs spin made a submitter park and be woken by
    // futex calls 290k times in the no-op benchmark, once every 17 reconciles, 4 µs 11k times:
    // +15% throughput) — by elapsed time, not by a count of pauses (100 ns each on this EPYC:
    // 64 of them were 4-8 µs; review r1 F6).
    // No sched_yield: on a loaded machine one yield can give the core away for a whole time
    // slice (review r1 F6/F14); parking is cheaper and bounded.
    spin_budget<4000, 16> budget;
    do {
      cpu_relax();
      if (try_lock()) return;
    } while (!budget.expired());
    lock_slow();
  }
  bool try_lock() noexcept {
    std::uint32_t expected = 0;
    // relaxed pre-check keeps a spinning reader from stealing the line; acquire as in lock().
    return state_.load(std::memory_order_relaxed) == 0 &&
           state_.compare_exchange_strong(expected, locked, std::memory_order_acquire, std::memory_order_relaxed);
  }
  void unlock() noexcept {
    // release: publishes the critical section to the next acquirer. Clears locked and sleepers,
    // keeps starving (so nobody but the starving waiter can take the lock now).
    const std::uint32_t prev = state_.fetch_and(starving, std::memory_order_release);
    if ((prev & starving) != 0) {
      parked_.notify_all();
    } else if ((prev & sleepers) != 0) {
      parked_.notify_one();
    }
  }

 private:
  void lock_slow() noexcept {
    int lost = 0;
    bool starver = false;
    for (;;) {
      // relaxed: the CAS below that takes the lock is acquire.
      std::uint32_t s = state_.load(std::memory_order_relaxed);
      const std::uint32_t blocked_by = starver ? locked : (locked | starving);
      if ((s & blocked_by) == 0) {
        // Taken with `sleepers` set: others may be parked, so our unlock must wake one. Clears
        // starving (set only if we are the starver: otherwise blocked_by excluded it).
        if (state_.compare_exchange_weak(s, locked | sleepers,
                                         std::memory_order_acquire, std::memory_order_relaxed)) {
          return;
        }
        continue;
      }
      // Registered before announcing `sleepers`: unlock() reads the bit after our CAS and then
      // notifies, which the event_count protocol guarantees we see (no lost wake-up). Parking
      // through event_count (a plain futex) rather than std::atomic::wait, whose spin phase
      // sched_yield()s, which on a loaded machine costs a time slice (review r1 F14).
      const auto key = parked_.prepare_wait();
      std::uint32_t want = s | sleepers;
      if (!starver && lost >= max_lost_wakes && (s & starving) == 0) want |= starving;
      // relaxed: only announces intent; the acquiring CAS above orders the critical section.
      if (!state_.compare_exchange_strong(s, want, std::memory_order_relaxed, std::memory_order_relaxed)) {
        parked_.cancel_wait();
        continue;
      }
      if ((want & starving) != 0 && (s & starving) == 0) starver = true;
      parked_.wait(key);
      ++lost;
    }
  }

  std::atomic<std::uint32_t> state_{0};
  event_count parked_;
};

inline constexpr std::uint32_t no_node = std::numeric_limits<std::uint32_t>::max();

/// Mixes a std::size_t hash into 32 bits (Fibonacci hashing: the high half of a multiply).
[[nodiscard]] inline std::uint32_t mix_hash(std::size_t h) noexcept {
  return static_cast<std::uint32_t>((static_cast<std::uint64_t>(h) * 0x9E3779B97F4A7C15ULL) >> 32);
}

template <class Node>
class node_slab {
 public:
  static constexpr std::uint32_t chunk_size = 256;

  [[nodiscard]] Node& operator[](std::uint32_t id) noexcept { return chunks_[id / chunk_size][id % chunk_size]; }
  [[nodiscard]] const Node& operator[](std::uint32_t id) const noexcept {
    return chunks_[id / chunk_size][id % chunk_size];
  }
  [[nodiscard]] std::size_t live() const noexcept { return live_; }
  [[nodiscard]] std::size_t capacity() const noexcept { return chunks_.size() * chunk_size; }
  [[nodiscard]] std::size_t chunks() const noexcept { return chunks_.size(); }
  [[nodiscard]] std::size_t retained_chunks() const noexcept { return retain_chunks_; }
  [[nodiscard]] std::uint32_t chunk_live(std::size_t c) const noexcept { return info_[c].live; }
  /// The lowest chunk with a free node (chunks() if none).
  [[nodiscard]] std::size_t lowest_free_chunk() const noexcept {
    for (std::size_t w = hint_; w < bits_.size(); ++w) {
      if (bits_[w] != 0) return std::min(chunks_.size(), w * 64 + static_cast<std::size_t>(std::countr_zero(bits_[w])));
    }
    return chunks_.size();
  }

  /// Starts loading the node allocate() would return next (a hint: changes nothing).
  void prefetch_next() const noexcept {
    const std::size_t c = lowest_free_chunk();
    if (c >= chunks_.size()) return;
    const std::uint32_t id = info_[c].free;
    if (id == no_node) return;
    const char* p = reinterpret_cast<const char*>(&(*this)[id]);
    prefetch_for_write(p);
    prefetch_for_write(p + sizeof(Node) - 1);
  }

  /// Makes sure the next allocate() cannot fail. May allocate (one chunk).
  void reserve_one() {
    if (live_ < capacity()) return;
    if (chunks_.size() >= (no_node - 1) / chunk_size) throw std::length_error("sluice::reconcile_pipeline: too many keys");
    const std::size_t c = chunks_.size();
    chunks_.reserve(c + 1);
    info_.reserve(c + 1);
    if (bits_.size() <= c / 64) bits_.resize(c / 64 + 1, 0);
    auto chunk = std::make_unique<Node[]>(chunk_size);
    const auto base = static_cast<std::uint32_t>(c * chunk_size);
    for (std::uint32_t i = 0; i < chunk_size; ++i) chunk[i].next = i + 1 < chunk_size ? base + i + 1 : no_node;
    chunks_.push_back(std::move(chunk));  // capacity reserved: cannot throw from here on
    info_.push_back(chunk_info{base, 0});
    mark_free(c);
  }

  /// A free node's id, from the lowest chunk that has one (so that high chunks empty out and can
  /// be released while keys stay live). reserve_one() first. Never allocates.
  [[nodiscard]] std::uint32_t allocate() noexcept {
    const std::size_t c = lowest_free_chunk();
    hint_ = c / 64;  // every word below is empty
    chunk_info& ci = info_[c];
    const std::uint32_t id = ci.free;
    ci.free = (*this)[id].next;
    if (++ci.live == chunk_size) bits_[c / 64] &= ~(std::uint64_t{1} << (c % 64));
    ++live_;
    return id;
  }

  /// Returns a node (its members already reset by the owner). Never allocates. Trailing chunks
  /// left without a live node are released down to the retained floor, keeping one empty chunk
  /// above the highest used one (no thrash at a chunk boundary); everything beyond the floor once
  /// the slab is empty. Not while hold_shrink() is in effect: a caller walking ids 0..capacity()
  /// must not see chunks vanish under it (review r1 F1).
  void release(std::uint32_t id) noexcept {
    const std::size_t c = id / chunk_size;
    chunk_info& ci = info_[c];
    (*this)[id].next = ci.free;
    ci.free = id;
    --ci.live;
    mark_free(c);
    --live_;
    if (!hold_) trim();
  }

  /// While held, release() never shrinks; end_hold() trims once.
  void hold_shrink() noexcept { hold_ = true; }
  void end_hold() noexcept {
    hold_ = false;
    trim();
  }
  [[nodiscard]] bool held() const noexcept { return hold_; }

  /// How many nodes' worth of chunks to keep when the slab empties (rounded up to chunks).
  void set_retained(std::size_t nodes) noexcept {
    retain_chunks_ = std::max<std::size_t>(1, (nodes + chunk_size - 1) / chunk_size);
  }

 private:
  struct chunk_info {
    std::uint32_t free;  // head of this chunk's free list (ids), no_node if full
    std::uint32_t live;  // nodes in use
  };

  void mark_free(std::size_t c) noexcept {
    bits_[c / 64] |= std::uint64_t{1} << (c % 64);
    hint_ = std::min(hint_, c / 64);
  }

  void trim() noexcept {
    while (chunks_.size() > retain_chunks_) {
      const std::size_t last = chunks_.size() - 1;
      if (info_[last].live != 0) return;
      if (live_ != 0 && info_[last - 1].live != 0) return;  // the one spare above the highest used
      bits_[last / 64] &= ~(std::uint64_t{1} << (last % 64));
      info_.pop_back();
      chunks_.pop_back();  // frees the chunk (its nodes are all free: nothing to destroy but shells)
    }
  }

  std::vector<std::unique_ptr<Node[]>> chunks_;
  std::vector<chunk_info> info_;
  std::vector<std::uint64_t> bits_;  // bit c: chunk c has a free node
  std::size_t hint_ = 0;             // no word below this one has a bit set
  std::size_t live_ = 0;
  std::size_t retain_chunks_ = 1;
  bool hold_ = false;
};

class slot_index {
 public:
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] std::size_t bucket_count() const noexcept { return buckets_.size(); }

  /// The node id stored for hash `h` whose node satisfies `same(id)`, or no_node.
  template <class Same>
  [[nodiscard]] std::uint32_t find(std::uint32_t h, Same&& same) const {
    if (size_ == 0) return no_node;
    for (std::size_t i = h & mask_;; i = (i + 1) & mask_) {
      const bucket& b = buckets_[i];
      if (b.id == no_node) return no_node;
      if (b.hash == h && same(b.id)) return b.id;
    }
  }

  /// Starts loading the bucket a find() or insert() of `h` reads first (a hint: changes nothing).
  void prefetch(std::uint32_t h) const noexcept {
    if (!buckets_.empty()) prefetch_for_write(&buckets_[h & mask_]);
  }

  /// Makes sure the next insert() does not allocate. May allocate.
  void reserve_one() {
    if ((size_ + 1) * 2 > buckets_.size()) rehash(buckets_.empty() ? 16 : buckets_.size() * 2);
  }

  /// Inserts an absent key's id (reserve_one() first). Never allocates.
  void insert(std::uint32_t h, std::uint32_t id) noexcept {
    std::size_t i = h & mask_;
    while (buckets_[i].id != no_node) i = (i + 1) & mask_;
    buckets_[i] = bucket{h, id};
    ++size_;
  }

  /// The entry for node `from` (stored under hash `h`) now names node `to`. Never allocates.
  void replace(std::uint32_t h, std::uint32_t from, std::uint32_t to) noexcept {
    std::size_t i = h & mask_;
    while (buckets_[i].id != from) i = (i + 1) & mask_;
    buckets_[i].id = to;
  }

  /// Removes `id` (stored under hash `h`). Never throws; may give memory back.
  void erase(std::uint32_t h, std::uint32_t id) noexcept {
    std::size_t i = h & mask_;
    while (buckets_[i].id != id) i = (i + 1) & mask_;
    // Backward-shift deletion: pull later members of the probe run into the hole.
    for (std::size_t j = (i + 1) & mask_;; j = (j + 1) & mask_) {
      const bucket& b = buckets_[j];
      if (b.id == no_node) break;
      const std::size_t home = b.hash & mask_;
      // b may move to the hole i if its home is not cyclically within (i, j].
      const bool movable = i <= j ? (home <= i || home > j) : (home <= i && home > j);
      if (movable) {
        buckets_[i] = b;
        i = j;
      }
    }
    buckets_[i].id = no_node;
    --size_;
    if (buckets_.size() <= retain_) return;
    if (size_ == 0) {
      std::vector<bucket>().swap(buckets_);
      mask_ = 0;
    } else if (buckets_.size() > 64 && size_ * 8 < buckets_.size()) {
      try {
        rehash(buckets_.size() / 4);
      } catch (...) {  // keeping the larger array is always correct
      }
    }
  }

 private:
  struct bucket {
    std::uint32_t hash = 0;
    std::uint32_t id = no_node;
  };

  void rehash(std::size_t n) {
    std::vector<bucket> fresh(n);
    const std::size_t mask = n - 1;
    for (const bucket& b : buckets_) {
      if (b.id == no_node) continue;
      std::size_t i = b.hash & mask;
      while (fresh[i].id != no_node) i = (i + 1) & mask;
      fresh[i] = b;
    }
    buckets_.swap(fresh);
    mask_ = mask;
  }

  std::vector<bucket> buckets_;
  std::size_t mask_ = 0;
  std::size_t size_ = 0;
  std::size_t retain_ = 0;  // bucket arrays up to this size are kept when the index shrinks

 public:
  /// Keep the bucket array while it holds at most this many entries at load 1/2.
  void set_retained(std::size_t entries) noexcept { retain_ = std::bit_ceil(entries * 2); }
};

/// Min-heap of deadlines; `pos(id)` is the node's stored heap position (no_node when absent).
template <class TimePoint>
class deadline_heap {
 public:
  struct entry {
    TimePoint deadline;
    std::uint64_t seq;
    std::uint32_t id;
  };

  [[nodiscard]] std::size_t size() const noexcept { return heap_.size(); }
  [[nodiscard]] bool empty() const noexcept { return heap_.empty(); }
  [[nodiscard]] std::size_t capacity() const noexcept { return heap_.capacity(); }
  [[nodiscard]] const entry& top() const noexcept { return heap_.front(); }

  /// Room for n entries, so push() never allocates. May allocate.
  void reserve(std::size_t n) {
    if (heap_.capacity() < n) heap_.reserve(n < 2 * heap_.capacity() ? 2 * heap_.capacity() : n);
  }
  /// Gives the memory back (only when empty, and only above the retained size).
  void release() noexcept {
    if (heap_.empty() && heap_.capacity() > retain_) std::vector<entry>().swap(heap_);
  }
  /// Shrinks the array when it is more than 4x larger than `needed` (the room push() must keep)
  /// and the retained size: to max(retained, 2 x needed). May allocate; on failure keeps the
  /// larger array (always correct).
  void shrink_for(std::size_t needed) noexcept {
    const std::size_t floor = std::max(retain_, needed);
    if (heap_.capacity() <= 4 * floor) [[likely]] return;
    try {
      std::vector<entry> fresh;
      fresh.reserve(std::max(retain_, 2 * needed));
      fresh.assign(heap_.begin(), heap_.end());  // same order: stored positions stay valid
      heap_.swap(fresh);
    } catch (...) {
    }
  }
  /// The entry at `at` now belongs to node `id` (the node moved; its position did not).
  void set_id(std::uint32_t at, std::uint32_t id) noexcept { heap_[at].id = id; }
  void set_retained(std::size_t n) noexcept { retain_ = n; }

  template <class Pos>
  void push(TimePoint deadline, std::uint32_t id, Pos&& pos) noexcept {
    heap_.push_back(entry{deadline, seq_++, id});  // capacity reserved: never reallocates
    up(heap_.size() - 1, pos);
  }

  template <class Pos>
  void erase_at(std::uint32_t at, Pos&& pos) noexcept {
    pos(heap_[at].id) = no_node;
    const std::size_t last = heap_.size() - 1;
    if (at != last) {
      heap_[at] = heap_[last];
      heap_.pop_back();
      pos(heap_[at].id) = at;
      down(at, pos);
      up(at, pos);
    } else {
      heap_.pop_back();
    }
  }

  /// Moves the entry at `at` to a new deadline (after existing entries with that deadline).
  template <class Pos>
  void update(std::uint32_t at, TimePoint deadline, Pos&& pos) noexcept {
    const std::uint32_t id = heap_[at].id;
    heap_[at].deadline = deadline;
    heap_[at].seq = seq_++;
    down(at, pos);
    up(pos(id), pos);
  }

 private:
  static bool before(const entry& a, const entry& b) noexcept {
    return a.deadline < b.deadline || (a.deadline == b.deadline && a.seq < b.seq);
  }
  template <class Pos>
  void up(std::size_t i, Pos& pos) noexcept {
    const entry e = heap_[i];
    while (i > 0) {
      const std::size_t parent = (i - 1) / 2;
      if (!before(e, heap_[parent])) break;
      heap_[i] = heap_[parent];
      pos(heap_[i].id) = static_cast<std::uint32_t>(i);
      i = parent;
    }
    heap_[i] = e;
    pos(e.id) = static_cast<std::uint32_t>(i);
  }
  template <class Pos>
  void down(std::size_t i, Pos& pos) noexcept {
    const entry e = heap_[i];
    const std::size_t n = heap_.size();
    for (;;) {
      std::size_t child = 2 * i + 1;
      if (child >= n) break;
      if (child + 1 < n && before(heap_[child + 1], heap_[child])) ++child;
      if (!before(heap_[child], e)) break;
      heap_[i] = heap_[child];
      pos(heap_[i].id) = static_cast<std::uint32_t>(i);
      i = child;
    }
    heap_[i] = e;
    pos(e.id) = static_cast<std::uint32_t>(i);
  }

  std::vector<entry> heap_;
  std::uint64_t seq_ = 0;
  std::size_t retain_ = 0;
};

}  // namespace sluice::detail
