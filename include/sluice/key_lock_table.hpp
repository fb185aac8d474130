// sluice/key_lock_table.hpp — per-key mutual exclusion with entries that exist only while needed.
//
// What it is for: the per-entity half of two-level locking ("never reconcile one entity twice at
// once") without the seed's failure modes. lock(key) returns a movable RAII `guard`; the key is
// unlocked when the guard is destroyed, so an exception in the critical section leaves nothing
// behind, and nobody can unlock a key they never locked (unlocking needs a guard).
//
// Requirements: Key is copy-constructible; Hash and KeyEqual are callable as for
// std::unordered_map. Destroy the table only after every guard is gone and no thread waits on it.
//
// Guarantees:
//  - At most one guard per key at a time (keys compared with KeyEqual).
//  - Waiters for one key are served in arrival order: unlock hands the key straight to the oldest
//    waiter, so a newcomer never overtakes a queued thread. Unlocking happens-before the next
//    holder's lock returns.
//  - An entry exists only while a holder owns the key; waiters queue on it, so it is never removed
//    while someone waits on it. It is removed, under the same shard mutex that decides it is
//    unused, by the unlock that finds no waiter; a waiter that times out or is cancelled unlinks
//    itself under that mutex. size() therefore returns to 0 whenever nothing is held.
//  - Keys are spread over `shards` independently locked shards: operations on distinct keys
//    rarely share a lock. Each shard recycles up to `pooled_entries_per_shard` entry nodes, so
//    steady-state lock/unlock does not allocate.
//  - Unlock makes a system call only when the next holder is parked.
//  - Fairness has a price on a hot key: every unlock with a waiter is a handoff (a wake-up if the
//    waiter parked), where a barging std::mutex lets the unlocker take the key straight back. On
//    one key hammered by 2 threads that costs several-fold in throughput; on distinct keys the
//    table is far faster than a global-mutex map (see bench/key_lock_table_bench.cpp).
//
// What it never does: grow without bound (live entries = keys held now; pooled nodes <= shards x
// pooled_entries_per_shard), remove an entry someone waits on, spin for long, clamp a bad config.
//
// Example:
//   sluice::key_lock_table<std::string> locks;
//   {
//     auto guard = locks.lock(entity.uid);   // serialises work on this entity
//     reconcile(entity);                     // may throw: the key is still unlocked
//   }
//   if (auto g = locks.try_lock(uid)) { ... } else { /* busy: requeue */ }
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <utility>

#include "detail/lock_handoff.hpp"
#include "detail/lock_table_shard.hpp"
#include "detail/wait.hpp"
#include "key.hpp"

namespace sluice {

template <class Key, class UserHash = std::hash<Key>, class UserKeyEqual = std::equal_to<Key>>
class key_lock_table {
  static_assert(hashable_key<Key, UserHash, UserKeyEqual>,
                "sluice::key_lock_table<Key>: Key must be copyable, hashable and equality-comparable: "
                "give it a std::hash<Key> specialisation and operator==, or pass Hash / KeyEqual "
                "(see sluice::hashable_key in <sluice/key.hpp>)");
  // The caller's Hash / KeyEqual, or stand-ins when the assertion above fails (so it is the only
  // error, with no cascade from the code below).
  using Hash = detail::checked_hash<Key, UserHash, UserKeyEqual>;
  using KeyEqual = detail::checked_key_equal<Key, UserHash, UserKeyEqual>;
  using shard_type = detail::lock_table_shard<Key>;
  using entry = typename shard_type::entry;

 public:
  using key_type = Key;
  static constexpr std::size_t default_shards = 64;
  static constexpr std::size_t default_pooled_entries_per_shard = 16;
  static constexpr std::size_t max_shards = std::size_t{1} << 16;

  /// Exclusive ownership of one key. Move-only; unlocks when destroyed or unlock()ed.
  class guard {
   public:
    guard() noexcept = default;
    guard(guard&& other) noexcept
        : table_(std::exchange(other.table_, nullptr)), entry_(std::exchange(other.entry_, nullptr)) {}
    guard& operator=(guard&& other) noexcept {
      if (this != &other) {
        unlock();
        table_ = std::exchange(other.table_, nullptr);
        entry_ = std::exchange(other.entry_, nullptr);
      }
      return *this;
    }
    guard(const guard&) = delete;
    guard& operator=(const guard&) = delete;
    ~guard() { unlock(); }

    /// Unlocks now (if still owned); a second call is a no-op. Never throws. Never allocates.
    void unlock() noexcept {
      if (key_lock_table* t = std::exchange(table_, nullptr)) t->unlock(std::exchange(entry_, nullptr));
    }

    [[nodiscard]] bool owns_lock() const noexcept { return table_ != nullptr; }
    explicit operator bool() const noexcept { return owns_lock(); }

    /// The locked key. Precondition: owns_lock().
    [[nodiscard]] const Key& key() const noexcept { return *entry_->key; }

   private:
    friend class key_lock_table;
    guard(key_lock_table* table, entry* e) noexcept : table_(table), entry_(e) {}
    key_lock_table* table_ = nullptr;
    entry* entry_ = nullptr;
  };

  /// Throws std::invalid_argument if shards is 0 or above 65536.
  explicit key_lock_table(std::size_t shards = default_shards,
                          std::size_t pooled_entries_per_shard = default_pooled_entries_per_shard,
                          const Hash& hash = Hash(), const KeyEqual& equal = KeyEqual())
      : shard_count_(validate(shards)),
        shards_(std::make_unique<shard_type[]>(shard_count_)),
        hash_(hash),
        equal_(equal) {
    for (std::size_t i = 0; i < shard_count_; ++i) shards_[i].set_pool_limit(pooled_entries_per_shard);
  }

  key_lock_table(const key_lock_table&) = delete;
  key_lock_table& operator=(const key_lock_table&) = delete;

  /// Blocks until `key` is free, FIFO among waiters for that key. Thread-safe. Allocates only
  /// when the shard's node pool or bucket array must grow. May block.
  [[nodiscard]] guard lock(const Key& key) { return *acquire(key, true, std::nullopt, nullptr); }

  /// As lock(key), but returns nullopt if `stop` is requested while waiting. May block.
  [[nodiscard]] std::optional<guard> lock(const Key& key, std::stop_token stop) {
    return acquire(key, !stop.stop_requested(), std::nullopt, &stop);
  }

  /// Locks `key` only if it is free now; never blocks (beyond the shard mutex). Leaves no entry
  /// behind on failure.
  [[nodiscard]] std::optional<guard> try_lock(const Key& key) { return acquire(key, false, std::nullopt, nullptr); }

  /// As lock(key), giving up after `timeout`. May block.
  template <class Rep, class Period>
  [[nodiscard]] std::optional<guard> try_lock_for(const Key& key, const std::chrono::duration<Rep, Period>& timeout) {
    return acquire_until(key, detail::deadline_after(timeout));
  }

  /// As lock(key), giving up at `deadline` (any clock). May block.
  template <class Clock, class Duration>
  [[nodiscard]] std::optional<guard> try_lock_until(const Key& key,
                                                    const std::chrono::time_point<Clock, Duration>& deadline) {
    return acquire_until(key, detail::to_steady(deadline));
  }

  /// True if some guard holds `key` right now (a snapshot). Thread-safe.
  [[nodiscard]] bool is_locked(const Key& key) const {
    const std::uint64_t h = mixed_hash(key);
    shard_type& s = shard_for(h);
    std::lock_guard lock(s.mutex);
    return s.find(h, key, equal_) != nullptr;
  }

  /// Live entries (keys held now) across all shards: a snapshot, exact when quiescent.
  /// Thread-safe. Never blocks.
  [[nodiscard]] std::size_t size() const noexcept {
    std::size_t n = 0;
    for (std::size_t i = 0; i < shard_count_; ++i) n += shards_[i].live();
    return n;
  }

  /// Threads queued for some key right now (a snapshot, for monitoring and tests). Thread-safe.
  [[nodiscard]] std::size_t waiting() const noexcept {
    std::size_t n = 0;
    for (std::size_t i = 0; i < shard_count_; ++i) n += shards_[i].waiting();
    return n;
  }

  /// Spare entry nodes kept for reuse across all shards (<= shards x pooled_entries_per_shard).
  /// A snapshot. Thread-safe.
  [[nodiscard]] std::size_t pooled() const {
    std::size_t n = 0;
    for (std::size_t i = 0; i < shard_count_; ++i) {
      std::lock_guard lock(shards_[i].mutex);
      n += shards_[i].pooled();
    }
    return n;
  }

  [[nodiscard]] std::size_t shard_count() const noexcept { return shard_count_; }

 private:
  static std::size_t validate(std::size_t shards) {
    if (shards < 1) throw std::invalid_argument("sluice::key_lock_table: shards must be >= 1, got 0");
    if (shards > max_shards) {
      throw std::invalid_argument("sluice::key_lock_table: shards must be <= 65536, got " + std::to_string(shards));
    }
    return shards;
  }

  [[nodiscard]] std::uint64_t mixed_hash(const Key& key) const {
    return detail::lock_table_mix(static_cast<std::uint64_t>(hash_(key)));
  }

  [[nodiscard]] shard_type& shard_for(std::uint64_t h) const noexcept {
    // High 32 bits pick the shard (multiply-shift range reduction); low bits pick the bucket.
    return shards_[static_cast<std::size_t>(((h >> 32) * shard_count_) >> 32)];
  }

  std::optional<guard> acquire_until(const Key& key, detail::steady_time deadline) {
    const bool may_wait = std::chrono::steady_clock::now() < deadline;
    return acquire(key, may_wait, deadline, nullptr);
  }

  std::optional<guard> acquire(const Key& key, bool may_wait, const std::optional<detail::steady_time>& deadline,
                               const std::stop_token* stop) {
    const std::uint64_t h = mixed_hash(key);  // user hash may throw: nothing changed yet
    shard_type& s = shard_for(h);
    detail::handoff_waiter self;
    entry* e = nullptr;
    {
      std::lock_guard lock(s.mutex);
      e = s.find(h, key, equal_);
      if (e == nullptr) return guard(this, s.insert(h, key));  // free: this entry is ours
      if (!may_wait) return std::nullopt;
      e->waiters.push_back(&self);  // e cannot vanish: its holder hands it to us or to a waiter
      s.add_waiting(1);
    }
    const bool granted = detail::await_handoff(self, s.mutex, deadline, stop, [&s, e, &self] {
      e->waiters.remove(&self);
      s.add_waiting(-1);
    });
    if (granted) return guard(this, e);
    return std::nullopt;
  }

  void unlock(entry* e) noexcept {
    shard_type& s = shard_for(e->hash);
    std::lock_guard lock(s.mutex);
    if (detail::handoff_waiter* w = e->waiters.pop_front()) {
      s.add_waiting(-1);
      detail::grant(w);  // ownership passes directly; the entry stays
      return;
    }
    s.erase(e);  // no holder, no waiter: removed under the mutex that decided it is unused
  }

  const std::size_t shard_count_;
  std::unique_ptr<shard_type[]> shards_;
  [[no_unique_address]] Hash hash_;
  [[no_unique_address]] KeyEqual equal_;
};

}  // namespace sluice
