// sluice/detail/write_behind_keys.hpp — the keyed mode's per-key state of sluice::write_behind (not
// public API; include <sluice/write_behind.hpp>).
//
// One entry per key that has a pending value (the newest not yet handed to the sink), a value in
// flight, or a value waiting out a retry backoff; the entry goes when none of the three is left.
// Entries whose pending value may go into the next batch (none of the key in flight) are linked in
// a FIFO through the entries themselves, so building a batch touches only the keys that go into it.
// Map nodes of keys that left are kept (up to a limit) and reused for new keys: no allocation per
// key on the steady path.
//
// Not thread-safe: the batcher's lock guards it.
#pragma once

#include <cstddef>
#include <optional>
#include <unordered_map>
#include <utility>
#include <vector>

namespace sluice::detail {

template <class Key, class Slot, class Hash, class KeyEqual>
class write_behind_keys {
 public:
  struct entry {
    std::optional<Slot> pending;  // newest value not yet handed to the sink (not retry-waiting)
    const Key* key = nullptr;     // the map's own copy
    entry* next = nullptr;        // ready FIFO link
    bool in_flight = false;       // a value of this key is in a sink call
    bool retry_waiting = false;   // a value of this key is in the retry buffer
    bool queued = false;          // in the ready FIFO
  };

  explicit write_behind_keys(std::size_t spare_limit) : spare_limit_(spare_limit) {}

  // ---- the map ----

  /// The entry of `key`, created if there is none. Throws what Hash, KeyEqual, Key's move or the
  /// node allocation throw; the map is unchanged then (a spare node may be freed).
  entry& find_or_insert(Key&& key) {
    auto it = map_.find(key);
    if (it == map_.end()) {
      if (!spare_.empty()) {
        // Reuse a node of a key that left: no allocation per key on the steady path.
        auto node = std::move(spare_.back());
        spare_.pop_back();
        node.key() = std::move(key);
        node.mapped() = entry{};
        it = map_.insert(std::move(node)).position;
      } else {
        it = map_.try_emplace(std::move(key)).first;
      }
      it->second.key = &it->first;
    }
    return it->second;
  }

  /// The entry of a key known to have one (Hash must be deterministic).
  [[nodiscard]] entry& at(const Key& key) { return map_.find(key)->second; }

  /// Removes `e`, keeping its node for a later key while fewer than spare_limit are kept.
  void erase(entry& e) {
    auto node = map_.extract(map_.find(*e.key));
    if (spare_.size() < spare_limit_) {
      try {
        spare_.push_back(std::move(node));
      } catch (...) {  // std::bad_alloc: the node is freed instead of kept
      }
    }
  }

  /// Keys with state.
  [[nodiscard]] std::size_t size() const noexcept { return map_.size(); }

  /// Calls f(entry&) for every entry and then removes it if keep(entry&) is false.
  template <class F, class Keep>
  void sweep(F&& f, Keep&& keep) {
    for (auto it = map_.begin(); it != map_.end();) {
      f(it->second);
      if (keep(it->second)) {
        ++it;
      } else {
        it = map_.erase(it);
      }
    }
  }

  // ---- the ready FIFO ----

  [[nodiscard]] entry* ready_front() const noexcept { return head_; }
  [[nodiscard]] std::size_t ready_count() const noexcept { return count_; }

  void push_ready(entry& e) noexcept {
    e.queued = true;
    e.next = nullptr;
    if (tail_ == nullptr) {
      head_ = tail_ = &e;
    } else {
      tail_->next = &e;
      tail_ = &e;
    }
    ++count_;
  }

  /// A key whose newer value waited behind its in-flight one was stamped when taken, maybe before
  /// the FIFO head: then it goes first, so linger keeps counting from the oldest ready value.
  void push_ready_by_age(entry& e) noexcept {
    if (head_ != nullptr && e.pending->enqueued < head_->pending->enqueued) {
      e.queued = true;
      e.next = head_;
      head_ = &e;
      ++count_;
    } else {
      push_ready(e);
    }
  }

  entry* pop_ready() noexcept {
    entry* e = head_;
    head_ = e->next;
    if (head_ == nullptr) tail_ = nullptr;
    e->next = nullptr;
    e->queued = false;
    --count_;
    return e;
  }

 private:
  using map_type = std::unordered_map<Key, entry, Hash, KeyEqual>;
  map_type map_;
  std::vector<typename map_type::node_type> spare_;  // extracted nodes kept for reuse
  std::size_t spare_limit_;
  entry* head_ = nullptr;  // FIFO of keys with a pending value and none in flight
  entry* tail_ = nullptr;
  std::size_t count_ = 0;
};

}  // namespace sluice::detail
