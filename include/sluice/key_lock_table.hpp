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
//  - At most one guard per key at a time (keys compared with KeyEqual). Unlocking happens-before
//    the next holder's lock returns.
//  - Bounded unfairness per key (as Go's sync.Mutex; one mechanism with limiter, see
//    detail/lock_handoff.hpp): unlock makes the key free and wakes its oldest waiter, and a thread
//    that is running may lock the free key first; but no queued thread is overtaken more than
//    `max_bypasses` (16384) times by threads that arrived after it. Once the oldest waiter has been
//    overtaken that often, unlock hands the key straight to it and newcomers queue (strict FIFO)
//    until the overtaken waiters are served. Queued threads are always served among themselves
//    in arrival order. Not guaranteed: FIFO between a queued thread and one not queued yet.
//  - An entry exists only while the key is held or waited for, so it is never removed while
//    someone waits on it. It is removed, under the same shard mutex that decides it is unused, by
//    the unlock that finds no waiter, or by the last waiter giving up (timeout, cancellation) on a
//    key nobody holds. size() therefore returns to 0 whenever nothing is held or awaited.
//  - Keys are spread over `shards` independently locked shards: operations on distinct keys
//    rarely share a lock. Each shard recycles up to `pooled_entries_per_shard` entry nodes, so
//    steady-state lock/unlock does not allocate.
//  - Unlock makes a system call only to wake a parked waiter that nobody has woken yet.
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
//   if (auto g = locks.try_lock(uid)) { reconcile(entity); } else { /* busy: requeue */ }
#pragma once

#include <cassert>
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
  /// How many times a queued thread can be overtaken on its key by later arrivals, at most.
  static constexpr std::uint32_t max_bypasses = detail::max_bypasses;

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

    /// True while this object holds its key.
    [[nodiscard]] bool owns() const noexcept { return table_ != nullptr; }
    explicit operator bool() const noexcept { return owns(); }

    /// The locked key. Precondition: owns().
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

  /// For sluice's own tests: a smaller bypass bound (not public API).
  key_lock_table(std::size_t shards, std::size_t pooled_entries_per_shard, detail::bypass_bound_for_testing bound)
      : key_lock_table(shards, pooled_entries_per_shard) {
    assert(bound.value >= 1 && bound.value <= max_bypasses);
    bypass_bound_ = bound.value;
  }

  key_lock_table(const key_lock_table&) = delete;
  key_lock_table& operator=(const key_lock_table&) = delete;

  /// Blocks until `key` is ours (bounded unfairness, see the file comment). Thread-safe. Allocates only
  /// when the shard's node pool or bucket array must grow. May block.
  [[nodiscard]] guard lock(const Key& key) { return guard(this, acquire(key, true, std::nullopt, nullptr)); }

  /// As lock(key), but returns nullopt if `stop` is requested while waiting. May block.
  [[nodiscard]] std::optional<guard> lock(const Key& key, std::stop_token stop) {
    return as_guard(acquire(key, !stop.stop_requested(), std::nullopt, &stop));
  }

  /// Locks `key` only if it is free now and its oldest waiter (if any) has bypasses to spare;
  /// never blocks (beyond the shard mutex). Leaves no entry behind on failure.
  [[nodiscard]] std::optional<guard> try_lock(const Key& key) {
    return as_guard(acquire(key, false, std::nullopt, nullptr));
  }

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
    const entry* e = s.find(h, key, equal_);
    return e != nullptr && e->held;
  }

  /// Live entries (keys held or waited for now) across all shards: a snapshot, exact when quiescent.
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
    return as_guard(acquire(key, may_wait, deadline, nullptr));
  }

  std::optional<guard> as_guard(entry* e) noexcept {
    if (e == nullptr) return std::nullopt;
    return guard(this, e);
  }

  // The entry now held by the caller, or nullptr (busy and may not wait, timeout, cancelled).
  // Returns a pointer, not an optional<guard>: whether or not the compiler inlines this, the
  // uncontended lock() then passes the result in a register (returned through memory, it cost
  // a distinct-key lock/unlock ~10 ns more when inlining went the other way).
  entry* acquire(const Key& key, bool may_wait, const std::optional<detail::steady_time>& deadline,
                 const std::stop_token* stop) {
    const std::uint64_t h = mixed_hash(key);  // user hash may throw: nothing changed yet
    shard_type& s = shard_for(h);
    std::unique_lock lock(s.mutex);
    entry* e = s.find(h, key, equal_);
    if (e == nullptr) return s.insert(h, key);  // absent: a new entry, held by us
    if (!e->held && (e->waiters.empty() || e->bypasses < bypass_bound_)) {
      e->held = true;  // free: ours, even if someone is queued (a bypass, counted)
      if (!e->waiters.empty()) ++e->bypasses;
      return e;
    }
    if (!may_wait) return nullptr;
    return wait_for(s, e, lock, deadline, stop);
  }

  // Slow path of acquire(): queue on `e` (locked shard `s`) and wait for our turn. A separate
  // function so the uncontended path stays small enough to inline (written inline, it made a
  // distinct-key lock/unlock ~2x slower).
  entry* wait_for(shard_type& s, entry* e, std::unique_lock<detail::lock_table_mutex>& lock,
                  const std::optional<detail::steady_time>& deadline, const std::stop_token* stop) {
    detail::handoff_waiter self;  // e cannot vanish while we are linked into it
    e->waiters.push_back(&self, e->bypasses);
    s.add_waiting(1);
    const bool granted = detail::await_turn(
        self, lock, deadline, stop,
        [&s, e, &self] {  // woken head: take the key if it is free
          if (e->held) {
            e->woken = false;  // the next unlock wakes us again
            return false;
          }
          e->held = true;
          leave_queue(s, e, self);
          return true;
        },
        [&s, e, &self] {  // timeout or cancellation
          leave_queue(s, e, self);
          if (e->held) return;
          if (e->waiters.empty()) {
            e->held = true;  // the state erase() recycles nodes in (lock_table_entry)
            s.erase(e);      // nobody holds or awaits it any more
          } else {
            wake_head(e);  // we may have been the head that was to take the free key
          }
        });
    return granted ? e : nullptr;
  }

  // Shard mutex held: unlinks `self` from e's queue and rebases the bypass count if it was the head.
  static void leave_queue(shard_type& s, entry* e, detail::handoff_waiter& self) noexcept {
    const bool head = e->waiters.front() == &self;
    if (head) {
      e->bypasses -= static_cast<std::uint32_t>(e->waiters.head_gap());
      e->woken = false;
    }
    e->waiters.remove(&self);
    if (e->waiters.empty()) e->bypasses = 0;
    s.add_waiting(-1);
  }

  // Shard mutex held, e free and queued on: make sure its head is looking.
  static void wake_head(entry* e) noexcept {
    if (e->woken) return;
    e->woken = true;
    detail::wake(e->waiters.front());
  }

  void unlock(entry* e) noexcept {
    shard_type& s = shard_for(e->hash);
    std::lock_guard lock(s.mutex);
    if (e->waiters.empty()) {
      s.erase(e);  // no holder, no waiter: removed under the mutex that decided it is unused
      return;
    }
    if (e->bypasses >= bypass_bound_) {
      // Starvation mode: the key passes straight to the head (it stays held, the entry stays).
      detail::handoff_waiter* w = e->waiters.front();
      leave_queue(s, e, *w);
      detail::grant(w);
      return;
    }
    e->held = false;  // normal mode: free for whoever comes first; the head is told to look
    wake_head(e);
  }

  const std::size_t shard_count_;
  std::uint32_t bypass_bound_ = max_bypasses;  // smaller only in sluice's own tests
  std::unique_ptr<shard_type[]> shards_;
  [[no_unique_address]] Hash hash_;
  [[no_unique_address]] KeyEqual equal_;
};

}  // namespace sluice
