// sluice/detail/indexed_heap.hpp — a keyed 4-ary min-heap of deadlines (not public API).
//
// The data structure behind requeue_queue, without locking or waiting. At most one entry per key;
// every operation is O(log n) or better:
//
//   heap_    4-ary min-heap of {deadline, seq, bucket}, 16 bytes for a 64-bit time point. Ordered
//            by deadline, then by seq (the order entries were scheduled or last changed), so equal
//            deadlines pop first-in first-out.
//   index_   open addressing (linear probing, backward-shift deletion, no tombstones): buckets of
//            {32-bit mixed hash, slot, heap position}, 12 bytes, load factor <= 1/2. The bucket
//            holds the heap position (not the slot), so cancel(key) reads the bucket and then the
//            key's slot and its heap node *in parallel*: two dependent cache misses, not three.
//   slots_   the entries themselves {key, item}; free slot ids are kept on a stack. Entries never
//            move while pending, so heap sifts copy only 16-byte records.
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
  using handle = std::uint32_t;  // a bucket index; valid until the next insert or erase
  static constexpr handle npos = std::numeric_limits<handle>::max();

  struct payload {
    Key key;
    T item;
  };

  explicit indexed_heap(Hash hash = Hash{}, KeyEqual eq = KeyEqual{}) : hash_(std::move(hash)), eq_(std::move(eq)) {}

  [[nodiscard]] std::size_t size() const noexcept { return heap_.size(); }
  [[nodiscard]] bool empty() const noexcept { return heap_.empty(); }

  /// Where find() looked: the key's handle (npos if absent) and, if absent, where insert() puts it.
  struct lookup {
    handle found;
    std::size_t free_bucket;
    std::uint32_t hash;
  };

  /// Handle of `key`, or npos.
  [[nodiscard]] handle find(const Key& key) const { return probe(key, mix(key)).first; }

  /// find() that also remembers where an insert would go (valid until the next change).
  [[nodiscard]] lookup locate(const Key& key) const {
    const std::uint32_t h = mix(key);
    const auto [found, free_bucket] = probe(key, h);
    return lookup{found, free_bucket, h};
  }

  [[nodiscard]] TimePoint deadline(handle b) const noexcept { return heap_[index_[b].heap_pos].deadline; }
  [[nodiscard]] TimePoint top_deadline() const noexcept { return heap_.front().deadline; }
  [[nodiscard]] payload& at(handle b) noexcept { return *slots_[index_[b].slot]; }

  /// Makes room for one more entry, so the following insert() cannot allocate. Returns true if it
  /// rebuilt the index, which invalidates earlier lookups (locate() again). Strong guarantee for
  /// the contents; on an exception the capacity reserved so far stays (see release_if_empty()).
  bool reserve_one() {
    if (size() + 1 > std::numeric_limits<std::uint32_t>::max() / 4) {
      throw std::length_error("sluice::requeue_queue: too many entries");
    }
    heap_.reserve(grown(heap_.size() + 1, heap_.capacity()));
    free_.reserve(grown(slots_.size() + 1, free_.capacity()));
    if (free_.empty()) slots_.reserve(grown(slots_.size() + 1, slots_.capacity()));
    if ((size() + 1) * 2 > index_.size()) {
      rebuild_index(std::max<std::size_t>(16, index_.size() * 2));
      return true;
    }
    return false;
  }

  /// Releases every array if there are no entries (after a failed insert on an empty heap).
  void release_if_empty() noexcept {
    if (empty()) clear();
  }

  /// Adds a new entry for `key`, which locate() reported absent, after reserve_one() and with
  /// nothing changed since (if reserve_one() returned true, the lookup must be made after it).
  /// Strong guarantee: if copying the key or constructing the item throws, nothing has changed
  /// and `item` has not been moved from.
  template <class U>
  handle insert(const lookup& where, const Key& key, U&& item, TimePoint deadline) {
    std::uint32_t s;
    if (!free_.empty()) {
      s = free_.back();
      slots_[s].emplace(payload{key, std::forward<U>(item)});  // may throw: nothing changed yet
      free_.pop_back();
    } else {
      slots_.emplace_back(std::in_place, payload{key, std::forward<U>(item)});  // capacity reserved
      s = static_cast<std::uint32_t>(slots_.size() - 1);
    }
    // From here on nothing throws: capacity is reserved everywhere.
    const handle b = static_cast<handle>(where.free_bucket);
    index_[b] = bucket{where.hash, s, static_cast<std::uint32_t>(heap_.size())};
    heap_.push_back(node{deadline, next_seq(), b});
    sift_up(heap_.size() - 1);
    return b;
  }

  /// Moves entry `b` to `deadline` (it then orders after every entry already at that deadline).
  void update(handle b, TimePoint deadline) noexcept {
    const std::uint32_t seq = next_seq();  // first: a renumbering moves heap positions
    const std::size_t pos = index_[b].heap_pos;
    heap_[pos].deadline = deadline;
    heap_[pos].seq = seq;
    restore(pos);
  }

  /// Removes entry `b` and returns its payload. Never throws.
  payload erase(handle b) noexcept {
    const bucket victim = index_[b];
    payload out = std::move(*slots_[victim.slot]);
    remove_heap_at(victim.heap_pos);
    index_erase(b);
    release_slot(victim.slot);
    return out;
  }

  /// Removes the earliest entry and returns it with its deadline. Precondition: !empty().
  std::pair<payload, TimePoint> pop_top() noexcept {
    const TimePoint d = heap_.front().deadline;
    return {erase(heap_.front().bucket), d};
  }

  /// Removes everything, calling f(payload&&, deadline) in deadline order. Releases all memory.
  /// `f` must not throw.
  template <class F>
  void drain(F&& f) {
    std::sort(heap_.begin(), heap_.end(), [](const node& a, const node& b) { return before(a, b); });
    for (const node& n : heap_) f(std::move(*slots_[index_[n.bucket].slot]), n.deadline);
    clear();
  }

  /// Bytes held by the arrays (capacity, not size): a diagnostic.
  [[nodiscard]] std::size_t memory_bytes() const noexcept {
    return heap_.capacity() * sizeof(node) + slots_.capacity() * sizeof(std::optional<payload>) +
           index_.capacity() * sizeof(bucket) + free_.capacity() * sizeof(std::uint32_t);
  }

 private:
  struct node {
    TimePoint deadline;
    std::uint32_t seq;
    handle bucket;
  };
  struct bucket {
    std::uint32_t hash = 0;
    std::uint32_t slot = npos;  // npos: empty bucket
    std::uint32_t heap_pos = 0;
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
    // Renumber before the spread of live seqs could reach 2^31 (every 2^30 schedules): the
    // sorted heap is itself a valid heap, numbered 0..n-1 in order.
    if (seq_ >= (1u << 30)) renumber();
    return seq_++;
  }

  void renumber() noexcept {
    std::sort(heap_.begin(), heap_.end(), [](const node& a, const node& b) { return before(a, b); });
    std::uint32_t i = 0;
    for (node& n : heap_) {
      n.seq = i;
      index_[n.bucket].heap_pos = i;
      ++i;
    }
    seq_ = i;
  }

  std::uint32_t mix(const Key& key) const {
    // Fibonacci hashing: spreads identity hashes (std::hash<int>) over the high bits we index by.
    const std::uint64_t h = static_cast<std::uint64_t>(hash_(key)) * 0x9E3779B97F4A7C15ull;
    return static_cast<std::uint32_t>(h >> 32);
  }
  std::size_t home(std::uint32_t h) const noexcept { return (static_cast<std::uint64_t>(h) * index_.size()) >> 32; }

  // {bucket of key or npos, first empty bucket on its probe path (where it would be inserted)}.
  std::pair<handle, std::size_t> probe(const Key& key, std::uint32_t h) const {
    if (index_.empty()) return {npos, 0};
    for (std::size_t i = home(h);; i = (i + 1) & mask_) {
      const bucket& b = index_[i];
      if (b.slot == npos) return {npos, i};
      if (b.hash == h && eq_(slots_[b.slot]->key, key)) return {static_cast<handle>(i), i};
    }
  }

  void index_erase(std::size_t i) noexcept {
    // Backward-shift deletion: pull later members of the probe run into the hole when the hole
    // lies on their path from their home bucket; their heap nodes learn the new bucket.
    for (std::size_t j = (i + 1) & mask_;; j = (j + 1) & mask_) {
      if (index_[j].slot == npos) break;
      const std::size_t hj = home(index_[j].hash);
      // j may move to i iff its home is not in the cyclic interval (i, j].
      const bool in_between = i <= j ? (hj > i && hj <= j) : (hj > i || hj <= j);
      if (!in_between) {
        index_[i] = index_[j];
        heap_[index_[i].heap_pos].bucket = static_cast<handle>(i);
        i = j;
      }
    }
    index_[i].slot = npos;
  }

  void rebuild_index(std::size_t buckets) {
    std::vector<bucket> fresh(buckets);  // may throw: nothing changed yet
    const std::size_t new_mask = buckets - 1;
    for (node& n : heap_) {
      const bucket b = index_[n.bucket];
      std::size_t i = (static_cast<std::uint64_t>(b.hash) * buckets) >> 32;
      while (fresh[i].slot != npos) i = (i + 1) & new_mask;
      fresh[i] = b;
      n.bucket = static_cast<handle>(i);
    }
    index_.swap(fresh);
    mask_ = new_mask;
  }

  void release_slot(std::uint32_t s) noexcept {
    slots_[s].reset();
    if (heap_.empty()) {
      clear();
      return;
    }
    free_.push_back(s);  // capacity >= slots_.size(), reserved by reserve_one()
    if (slots_.size() > 64 && heap_.size() * 4 < slots_.size()) compact();
  }

  void clear() noexcept {
    // Swap with empties (assigning `{}` would keep the capacity).
    std::vector<node>().swap(heap_);
    std::vector<std::optional<payload>>().swap(slots_);
    std::vector<bucket>().swap(index_);
    std::vector<std::uint32_t>().swap(free_);
    mask_ = 0;
    seq_ = 0;
  }

  // Rebuilds slots (dense, in heap order), index and heap at capacities fitting size(): returns
  // memory after a large drop in size. O(n), after >= 3n removals since the slots last grew.
  void compact() noexcept {
    try {
      const std::size_t n = heap_.size();
      std::vector<std::optional<payload>> slots(n);
      std::vector<node> heap(heap_.begin(), heap_.end());  // copy with capacity n
      std::vector<bucket> index(std::max<std::size_t>(16, std::bit_ceil(n * 2 + 1)));
      std::vector<std::uint32_t> free_ids;
      free_ids.reserve(n);
      // Nothing below throws: every allocation is done.
      const std::size_t new_mask = index.size() - 1;
      for (std::size_t k = 0; k < n; ++k) {
        bucket b = index_[heap[k].bucket];
        slots[k].emplace(std::move(*slots_[b.slot]));
        b.slot = static_cast<std::uint32_t>(k);
        std::size_t i = (static_cast<std::uint64_t>(b.hash) * index.size()) >> 32;
        while (index[i].slot != npos) i = (i + 1) & new_mask;
        index[i] = b;
        heap[k].bucket = static_cast<handle>(i);
      }
      slots_.swap(slots);
      heap_.swap(heap);
      index_.swap(index);
      free_.swap(free_ids);
      mask_ = new_mask;
    } catch (...) {
      // Out of memory while shrinking: keep the larger arrays; correctness is unaffected.
    }
  }

  void remove_heap_at(std::size_t pos) noexcept {
    const node last = heap_.back();
    heap_.pop_back();
    if (pos == heap_.size()) return;
    if (pos == 0) {
      // Floyd's bottom-up deletion: the last leaf almost always belongs near the bottom again, so
      // walk the hole down along the smaller children (3 comparisons per level instead of 4),
      // then sift the leaf up from there (usually zero or one level).
      const std::size_t n = heap_.size();
      std::size_t hole = 0;
      for (;;) {
        const std::size_t best = smallest_child(hole, n);
        if (best == n) break;
        place(hole, heap_[best]);
        hole = best;
      }
      heap_[hole] = last;
      sift_up(hole);
      return;
    }
    heap_[pos] = last;
    index_[last.bucket].heap_pos = static_cast<std::uint32_t>(pos);
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
      const std::size_t best = smallest_child(pos, n);
      if (best == n || !before(heap_[best], moving)) break;
      place(pos, heap_[best]);
      pos = best;
    }
    place(pos, moving);
  }

  // The earliest of pos's (up to four) children among the first n nodes, or n if it has none.
  // The one "smallest of four children" loop, shared by sift_down() and the bottom-up pop.
  std::size_t smallest_child(std::size_t pos, std::size_t n) const noexcept {
    const std::size_t first = pos * 4 + 1;
    if (first >= n) return n;
    std::size_t best = first;
    const std::size_t end = std::min(first + 4, n);
    for (std::size_t c = first + 1; c < end; ++c) {
      if (before(heap_[c], heap_[best])) best = c;
    }
    return best;
  }

  void place(std::size_t pos, const node& n) noexcept {
    heap_[pos] = n;
    index_[n.bucket].heap_pos = static_cast<std::uint32_t>(pos);  // a store: does not stall
  }

  std::vector<node> heap_;
  std::vector<std::optional<payload>> slots_;
  std::vector<bucket> index_;
  std::vector<std::uint32_t> free_;  // free slot ids (a stack)
  std::size_t mask_ = 0;
  std::uint32_t seq_ = 0;
  [[no_unique_address]] Hash hash_;
  [[no_unique_address]] KeyEqual eq_;
};

}  // namespace sluice::detail
