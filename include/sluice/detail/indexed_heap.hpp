// sluice/detail/indexed_heap.hpp — a keyed 4-ary min-heap of deadlines (not public API).
//
// The data structure behind requeue_queue, without locking or waiting. At most one entry per key;
// every operation is O(log n) or better:
//
//   heap_    4-ary min-heap of {deadline, seq, slot}, 16 bytes for a 64-bit time point. Ordered by
//            deadline, then by seq (the order entries were scheduled or last changed), so equal
//            deadlines pop first-in first-out.
//   slots_   the entries themselves {key, item} plus their current heap position; free slots form a
//            list. Entries never move while pending, so heap sifts copy only 16-byte records.
//   index_   open addressing (linear probing, backward-shift deletion, no tombstones) from a
//            32-bit mixed hash of the key to the slot: 8 bytes per bucket, load factor <= 1/2.
//
// Memory is bounded by the pending count: when size() falls below a quarter of the slot array the
// slots are compacted and the heap and index rebuilt (O(n), after at least 3n removals: amortised
// O(1)); when it reaches zero every array is released. So 1M keys scheduled then cancelled leave
// no memory behind.
//
// Requirements: Key copy-constructible, Key and T nothrow move-constructible (sifts and compaction
// move them and must not fail halfway). Exception safety: insert() is strong (nothing changes if
// it throws); erase/pop never throw.
#pragma once

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

namespace sluice::detail {

template <class Key, class T, class TimePoint, class Hash = std::hash<Key>, class KeyEqual = std::equal_to<Key>>
class indexed_heap {
  static_assert(std::is_nothrow_move_constructible_v<Key> && std::is_nothrow_move_constructible_v<T>,
                "sluice::requeue_queue: Key and T must be nothrow move-constructible");
  static_assert(std::is_copy_constructible_v<Key>, "sluice::requeue_queue: Key must be copy-constructible");

 public:
  using slot_id = std::uint32_t;
  static constexpr slot_id npos = std::numeric_limits<slot_id>::max();

  struct payload {
    Key key;
    T item;
  };

  explicit indexed_heap(Hash hash = Hash{}, KeyEqual eq = KeyEqual{}) : hash_(std::move(hash)), eq_(std::move(eq)) {}

  [[nodiscard]] std::size_t size() const noexcept { return heap_.size(); }
  [[nodiscard]] bool empty() const noexcept { return heap_.empty(); }

  /// Slot of `key`, or npos.
  [[nodiscard]] slot_id find(const Key& key) const {
    if (index_.empty()) return npos;
    const std::uint32_t h = mix(key);
    for (std::size_t i = home(h);; i = (i + 1) & mask_) {
      const bucket& b = index_[i];
      if (b.slot == npos) return npos;
      if (b.hash == h && eq_(slots_[b.slot].value->key, key)) return b.slot;
    }
  }

  [[nodiscard]] TimePoint deadline(slot_id s) const noexcept { return heap_[slots_[s].heap_pos].deadline; }
  [[nodiscard]] TimePoint top_deadline() const noexcept { return heap_.front().deadline; }
  [[nodiscard]] payload& at(slot_id s) noexcept { return *slots_[s].value; }

  /// Adds a new entry; `key` must not be present. Strong exception guarantee: if anything throws
  /// (allocation, copying the key, constructing the item) nothing has changed and `item` has not
  /// been moved from. Returns the new slot.
  template <class U>
  slot_id insert(const Key& key, U&& item, TimePoint deadline) {
    const std::uint32_t h = mix(key);
    if (size() + 1 > std::numeric_limits<std::uint32_t>::max() - 1) throw std::length_error("sluice::requeue_queue: too many entries");
    heap_.reserve(grown(heap_.size() + 1, heap_.capacity()));
    if ((size() + 1) * 2 > index_.size()) rebuild_index(std::max<std::size_t>(16, index_.size() * 2));
    slot_id s = free_head_;
    if (s == npos) {
      slots_.reserve(grown(slots_.size() + 1, slots_.capacity()));
      slots_.emplace_back();
      s = static_cast<slot_id>(slots_.size() - 1);
      slots_[s].next_free = npos;
    }
    try {
      slots_[s].value.emplace(payload{key, std::forward<U>(item)});
    } catch (...) {
      if (s != free_head_) slots_.pop_back();  // it was appended just now
      throw;
    }
    // From here on nothing throws: capacity is reserved everywhere.
    if (s == free_head_) free_head_ = slots_[s].next_free;
    slots_[s].hash = h;
    index_insert(h, s);
    heap_.push_back(node{deadline, next_seq(), s});
    slots_[s].heap_pos = static_cast<std::uint32_t>(heap_.size() - 1);
    sift_up(heap_.size() - 1);
    return s;
  }

  /// Moves slot `s` to `deadline` (it then orders after every entry already at that deadline).
  void update(slot_id s, TimePoint deadline) noexcept {
    const std::uint32_t seq = next_seq();  // first: a renumbering moves heap positions
    const std::size_t pos = slots_[s].heap_pos;
    heap_[pos].deadline = deadline;
    heap_[pos].seq = seq;
    restore(pos);
  }

  /// Removes slot `s` and returns its payload. Never throws.
  payload erase(slot_id s) noexcept {
    payload out = std::move(*slots_[s].value);
    remove_heap_at(slots_[s].heap_pos);
    release(s);
    return out;
  }

  /// Removes the earliest entry and returns it with its deadline. Precondition: !empty().
  std::pair<payload, TimePoint> pop_top() noexcept {
    const TimePoint d = heap_.front().deadline;
    return {erase(heap_.front().slot), d};
  }

  /// Removes everything, calling f(payload&&, deadline) in deadline order. Releases all memory.
  /// `f` must not throw.
  template <class F>
  void drain(F&& f) {
    std::sort(heap_.begin(), heap_.end(), [](const node& a, const node& b) { return before(a, b); });
    for (const node& n : heap_) f(std::move(*slots_[n.slot].value), n.deadline);
    clear();
  }

  /// Bytes held by the three arrays (capacity, not size): a diagnostic.
  [[nodiscard]] std::size_t memory_bytes() const noexcept {
    return heap_.capacity() * sizeof(node) + slots_.capacity() * sizeof(slot_type) + index_.capacity() * sizeof(bucket);
  }

 private:
  struct node {
    TimePoint deadline;
    std::uint32_t seq;
    slot_id slot;
  };
  struct slot_type {
    std::optional<payload> value;
    union {
      std::uint32_t heap_pos;   // while occupied
      slot_id next_free;        // while free
    };
    std::uint32_t hash = 0;
    slot_type() noexcept : heap_pos(0) {}
  };
  struct bucket {
    std::uint32_t hash;
    slot_id slot = npos;
  };

  static bool before(const node& a, const node& b) noexcept {
    // seq compares as a wrapping counter: seqs in the heap always span < 2^31 (see next_seq()).
    return a.deadline < b.deadline ||
           (a.deadline == b.deadline && static_cast<std::int32_t>(a.seq - b.seq) < 0);
  }

  static std::size_t grown(std::size_t need, std::size_t cap) noexcept {
    return need <= cap ? cap : std::max<std::size_t>(need, cap * 2);
  }

  std::uint32_t next_seq() noexcept {
    // Renumber before the spread of live seqs could reach 2^31 (every ~2^30 schedules): the
    // sorted heap is itself a valid heap, numbered 0..n-1 in order.
    if (seq_ - base_seq_ >= (1u << 30)) renumber();
    return seq_++;
  }

  void renumber() noexcept {
    std::sort(heap_.begin(), heap_.end(), [](const node& a, const node& b) { return before(a, b); });
    std::uint32_t i = 0;
    for (node& n : heap_) {
      n.seq = i;
      slots_[n.slot].heap_pos = i;
      ++i;
    }
    base_seq_ = 0;
    seq_ = i;
  }

  std::uint32_t mix(const Key& key) const {
    // Fibonacci hashing: spreads identity hashes (std::hash<int>) over the high bits we index by.
    const std::uint64_t h = static_cast<std::uint64_t>(hash_(key)) * 0x9E3779B97F4A7C15ull;
    return static_cast<std::uint32_t>(h >> 32);
  }
  std::size_t home(std::uint32_t h) const noexcept { return (static_cast<std::uint64_t>(h) * index_.size()) >> 32; }

  void index_insert(std::uint32_t h, slot_id s) noexcept {
    std::size_t i = home(h);
    while (index_[i].slot != npos) i = (i + 1) & mask_;
    index_[i] = bucket{h, s};
  }

  void index_erase(slot_id s) noexcept {
    const std::uint32_t h = slots_[s].hash;
    std::size_t i = home(h);
    while (index_[i].slot != s) i = (i + 1) & mask_;
    // Backward-shift deletion: pull later members of the probe run into the hole when the hole
    // lies on their path from their home bucket.
    for (std::size_t j = (i + 1) & mask_;; j = (j + 1) & mask_) {
      if (index_[j].slot == npos) break;
      const std::size_t hj = home(index_[j].hash);
      // j may move to i iff its home is not in the cyclic interval (i, j].
      const bool in_between = i <= j ? (hj > i && hj <= j) : (hj > i || hj <= j);
      if (!in_between) {
        index_[i] = index_[j];
        i = j;
      }
    }
    index_[i].slot = npos;
  }

  void rebuild_index(std::size_t buckets) {
    std::vector<bucket> fresh(buckets);  // may throw: nothing changed yet
    index_.swap(fresh);
    mask_ = buckets - 1;
    for (const node& n : heap_) index_insert(slots_[n.slot].hash, n.slot);
  }

  void release(slot_id s) noexcept {
    index_erase(s);
    slots_[s].value.reset();
    slots_[s].next_free = free_head_;
    free_head_ = s;
    if (heap_.empty()) {
      clear();
    } else if (slots_.size() > 64 && heap_.size() * 4 < slots_.size()) {
      compact();
    }
  }

  void clear() noexcept {
    // Swap with empties (assigning `{}` would keep the capacity).
    std::vector<node>().swap(heap_);
    std::vector<slot_type>().swap(slots_);
    std::vector<bucket>().swap(index_);
    mask_ = 0;
    free_head_ = npos;
    seq_ = base_seq_ = 0;
  }

  void compact() noexcept {
    try {
      const std::size_t n = heap_.size();
      std::vector<slot_type> fresh(n);
      std::vector<node> heap(heap_.begin(), heap_.end());  // copy with capacity n: returns memory
      std::vector<bucket> index(std::max<std::size_t>(16, std::bit_ceil(n * 2 + 1)));
      // Nothing below throws: every allocation is done.
      for (std::size_t i = 0; i < n; ++i) {
        slot_type& from = slots_[heap[i].slot];
        fresh[i].value.emplace(std::move(*from.value));
        fresh[i].hash = from.hash;
        fresh[i].heap_pos = static_cast<std::uint32_t>(i);
        heap[i].slot = static_cast<slot_id>(i);
      }
      slots_.swap(fresh);
      heap_.swap(heap);
      index_.swap(index);
      mask_ = index_.size() - 1;
      for (std::size_t i = 0; i < n; ++i) index_insert(slots_[i].hash, static_cast<slot_id>(i));
      free_head_ = npos;
    } catch (...) {
      // Out of memory while shrinking: keep the larger arrays; correctness is unaffected.
    }
  }

  void remove_heap_at(std::size_t pos) noexcept {
    const node last = heap_.back();
    heap_.pop_back();
    if (pos == heap_.size()) return;
    heap_[pos] = last;
    slots_[last.slot].heap_pos = static_cast<std::uint32_t>(pos);
    restore(pos);
  }

  void restore(std::size_t pos) noexcept {
    if (pos > 0 && before(heap_[pos], heap_[(pos - 1) / 4])) {
      sift_up(pos);
    } else {
      sift_down(pos);
    }
  }

  void sift_up(std::size_t pos) noexcept {
    const node moving = heap_[pos];
    while (pos > 0) {
      const std::size_t parent = (pos - 1) / 4;
      if (!before(moving, heap_[parent])) break;
      place(pos, heap_[parent]);
      pos = parent;
    }
    place(pos, moving);
  }

  void sift_down(std::size_t pos) noexcept {
    const node moving = heap_[pos];
    const std::size_t n = heap_.size();
    for (;;) {
      const std::size_t first = pos * 4 + 1;
      if (first >= n) break;
      std::size_t best = first;
      const std::size_t end = std::min(first + 4, n);
      for (std::size_t c = first + 1; c < end; ++c) {
        if (before(heap_[c], heap_[best])) best = c;
      }
      if (!before(heap_[best], moving)) break;
      place(pos, heap_[best]);
      pos = best;
    }
    place(pos, moving);
  }

  void place(std::size_t pos, const node& n) noexcept {
    heap_[pos] = n;
    slots_[n.slot].heap_pos = static_cast<std::uint32_t>(pos);
  }

  std::vector<node> heap_;
  std::vector<slot_type> slots_;
  std::vector<bucket> index_;
  std::size_t mask_ = 0;
  slot_id free_head_ = npos;
  std::uint32_t seq_ = 0;
  std::uint32_t base_seq_ = 0;
  [[no_unique_address]] Hash hash_;
  [[no_unique_address]] KeyEqual eq_;
};

}  // namespace sluice::detail
