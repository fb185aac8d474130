// sluice/detail/lock_table_shard.hpp — one shard of key_lock_table: a small chained hash map of
// live lock entries plus a bounded pool of spare entry nodes (not public API).
//
// Not synchronized: key_lock_table calls every member with the shard's mutex held. An entry is in
// the map exactly while it has a holder or a waiter; erase() is only ever called when it has
// neither (by the holder's unlock finding no waiter, or by the last waiter giving up on a free
// key), under that same mutex.
#pragma once

#include <atomic>
#include <cassert>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <utility>

#include "event_count.hpp"
#include "lock_handoff.hpp"
#include "lock_table_mutex.hpp"

namespace sluice::detail {

/// splitmix64's finaliser: spreads a user hash (std::hash<int> is the identity) over 64 bits.
[[nodiscard]] inline std::uint64_t lock_table_mix(std::uint64_t z) noexcept {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Cache-line aligned: nodes of different shards, locked by different cores at the same time,
// never share a line (false sharing measurably halved 2-thread throughput).
template <class Key>
struct alignas(cache_line) lock_table_entry {
  lock_table_entry* next = nullptr;  // bucket chain, or the pool's free list
  std::uint64_t hash = 0;            // mixed hash of *key
  handoff_fifo waiters;              // threads waiting for this key, oldest first
  // A node fresh or from the pool is already in the state insert() hands out (held, not woken,
  // no bypasses): erase() is only called in that state, so insert() need not write these.
  std::uint32_t bypasses = 0;        // barging takes while the head waited (lock_handoff.hpp)
  bool held = true;                  // a guard owns the key (else only waiters keep the entry)
  bool woken = false;                // the head waiter has been told to look at a free key
  std::optional<Key> key;            // engaged while the entry is in the map
};

template <class Key>
class alignas(cache_line) lock_table_shard {
 public:
  using entry = lock_table_entry<Key>;
  static constexpr std::size_t inline_buckets = 2;

  lock_table_shard() = default;
  lock_table_shard(const lock_table_shard&) = delete;
  lock_table_shard& operator=(const lock_table_shard&) = delete;

  ~lock_table_shard() {
    while (pool_ != nullptr) delete std::exchange(pool_, pool_->next);
    if (buckets_ != inline_heads_) delete[] buckets_;
    // Entries still in the map would be a precondition violation (a guard outliving the table).
  }

  void set_pool_limit(std::size_t limit) noexcept {
    pool_limit_ = static_cast<std::uint32_t>(limit < UINT32_MAX ? limit : UINT32_MAX);
  }

  template <class K, class Eq>
  [[nodiscard]] entry* find(std::uint64_t hash, const K& key, const Eq& eq) const {
    for (entry* e = buckets_[hash & mask_]; e != nullptr; e = e->next) {
      if (e->hash == hash && eq(*e->key, key)) return e;
    }
    return nullptr;
  }

  /// Adds an entry for `key` (not present). Strong exception guarantee: if growing the bucket
  /// array, allocating a node or copying the key throws, the map is unchanged.
  template <class K>
  entry* insert(std::uint64_t hash, const K& key) {
    const std::uint32_t n = count_.load(std::memory_order_relaxed);  // relaxed: we hold the mutex
    if (n + std::size_t{1} > std::size_t{mask_} + 1) rehash((std::size_t{mask_} + 1) * 2);
    entry* e = pool_;
    if (e != nullptr) {
      pool_ = e->next;
      --pooled_;
    } else {
      e = new entry;
    }
    try {
      e->key.emplace(key);
    } catch (...) {
      recycle(e);
      throw;
    }
    e->hash = hash;
    entry*& head = buckets_[hash & mask_];
    e->next = head;
    head = e;
    // relaxed: written under the mutex; size() only reads a snapshot.
    count_.store(n + 1, std::memory_order_relaxed);
    return e;
  }

  /// Unlinks `e` (no waiter left, held, not woken, no bypasses: see lock_table_entry) and recycles
  /// its node. Never throws.
  void erase(entry* e) noexcept {
    assert(e->held && !e->woken && e->bypasses == 0 && e->waiters.empty());
    entry** link = &buckets_[e->hash & mask_];
    while (*link != e) link = &(*link)->next;
    *link = e->next;
    const std::uint32_t n = count_.load(std::memory_order_relaxed) - 1;  // relaxed: as in insert()
    count_.store(n, std::memory_order_relaxed);
    recycle(e);
    const std::size_t buckets = std::size_t{mask_} + 1;
    if (buckets > inline_buckets && std::size_t{n} * 8 < buckets) {
      // Shrinking only gives memory back after a burst; if the smaller array cannot be allocated
      // the larger one simply stays. An empty shard goes straight back to its inline heads (which
      // never allocates), so an idle table holds no bucket arrays at all.
      try {
        rehash(n == 0 ? inline_buckets : buckets / 2);
      } catch (...) {
      }
    }
  }

  /// Live entries: a snapshot (exact when no other thread is locking or unlocking).
  [[nodiscard]] std::size_t live() const noexcept {
    // relaxed: a snapshot.
    return count_.load(std::memory_order_relaxed);
  }

  /// Threads queued on this shard's entries (a snapshot). Changed only under the mutex.
  [[nodiscard]] std::size_t waiting() const noexcept {
    // relaxed: a monitoring snapshot.
    return waiting_.load(std::memory_order_relaxed);
  }
  void add_waiting(int d) noexcept {
    // relaxed: a monitoring counter, only written with the mutex held.
    waiting_.store(waiting_.load(std::memory_order_relaxed) + static_cast<std::uint32_t>(d), std::memory_order_relaxed);
  }

  [[nodiscard]] std::size_t pooled() const noexcept { return pooled_; }
  [[nodiscard]] std::size_t bucket_count() const noexcept { return std::size_t{mask_} + 1; }

  // Everything an operation touches is on this one cache line (for small shards): the mutex,
  // the counters, the pool head and the first bucket heads.
  lock_table_mutex mutex;

 private:
  void recycle(entry* e) noexcept {
    e->key.reset();
    if (pooled_ < pool_limit_) {
      e->next = pool_;
      pool_ = e;
      ++pooled_;
    } else {
      delete e;
    }
  }

  void rehash(std::size_t n) {
    entry** fresh = inline_heads_;
    if (n > inline_buckets) {
      fresh = new entry*[n]();  // value-initialised: all nullptr; may throw (nothing changed yet)
    } else {
      for (auto& head : inline_heads_) head = nullptr;  // not in use: buckets_ is on the heap
    }
    const std::size_t new_mask = n - 1;
    for (std::size_t b = 0; b <= mask_; ++b) {
      for (entry* e = buckets_[b]; e != nullptr;) {
        entry* next = e->next;
        entry*& head = fresh[e->hash & new_mask];
        e->next = head;
        head = e;
        e = next;
      }
    }
    if (buckets_ != inline_heads_) delete[] buckets_;
    buckets_ = fresh;
    mask_ = static_cast<std::uint32_t>(new_mask);
  }

  std::atomic<std::uint32_t> count_{0};
  std::atomic<std::uint32_t> waiting_{0};
  std::uint32_t mask_ = inline_buckets - 1;
  std::uint32_t pooled_ = 0;
  std::uint32_t pool_limit_ = 0;
  entry** buckets_ = inline_heads_;  // power-of-two size: inline_heads_ or a heap array
  entry* pool_ = nullptr;
  entry* inline_heads_[inline_buckets] = {};
};

}  // namespace sluice::detail
