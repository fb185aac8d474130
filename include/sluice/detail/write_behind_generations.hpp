// sluice/detail/write_behind_generations.hpp — the flush() bookkeeping of sluice::write_behind (not
// public API; include <sluice/write_behind.hpp>).
//
// flush() seals the open generation at the intake's accepted() count: every value whose enqueue
// returned ok before the call has an intake index below that boundary (the intake hands values out
// in index order). A value gets its generation when a flusher takes it from the intake; each
// generation counts its values not yet resolved (persisted, failed or coalesced) and, of those, the
// ones ready for a batch. A sealed generation retires once none of its values is unresolved and
// every index below its boundary has been taken; flush() returns when its own has retired. That is
// exactly "everything enqueued before the call", even with retries finishing out of order, and it
// needs no scan.
//
// Not thread-safe: the batcher's lock guards everything except completed(), which flush() reads
// without the lock.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

namespace sluice::detail {

class write_behind_generations {
 public:
  /// The generation of the value with intake index `index`. `cursor` (0 at the start of a take)
  /// carries the search across the increasing indexes of one take.
  [[nodiscard]] std::uint64_t of_index(std::uint64_t index, std::size_t& cursor) const noexcept {
    while (cursor < sealed_.size() && sealed_[cursor].boundary <= index) ++cursor;
    return first_sealed_ + cursor;
  }

  /// How many indexes from `index` on (`cursor` as of_index(index, cursor) left it) belong to the
  /// same generation as `index`: up to the next flush() boundary, or all of them.
  [[nodiscard]] std::uint64_t run_left(std::uint64_t index, std::size_t cursor) const noexcept {
    return cursor < sealed_.size() ? sealed_[cursor].boundary - index : std::numeric_limits<std::uint64_t>::max();
  }

  /// `n` values of `gen` were taken from the intake.
  void taken(std::uint64_t gen, std::uint64_t n = 1) noexcept { record(gen).outstanding += n; }
  /// `n` values of `gen` reached their end (persisted, failed or coalesced).
  void resolved(std::uint64_t gen, std::uint64_t n = 1) noexcept { record(gen).outstanding -= n; }

  /// `n` values of `gen` became ready for a batch / left the ready structures (into a batch, into
  /// the retry buffer, coalesced). While a sealed generation has ready values, batches skip linger.
  void ready_add(std::uint64_t gen, std::uint64_t n = 1) noexcept {
    record(gen).ready += n;
    if (is_sealed(gen)) sealed_ready_ += n;
  }
  void ready_sub(std::uint64_t gen, std::uint64_t n = 1) noexcept {
    record(gen).ready -= n;
    if (is_sealed(gen)) sealed_ready_ -= n;
  }
  /// Nothing is waiting for a batch any more (the drain deadline reported everything).
  void clear_ready() noexcept {
    for (generation& g : sealed_) g.ready = 0;
    open_.ready = 0;
    sealed_ready_ = 0;
  }

  /// True while a flush() is in progress whose values are ready for a batch or still in the intake
  /// (`taken` values have been taken from the intake so far): batches go out without lingering.
  /// A flushed value waiting out a retry backoff does not count: later values linger normally.
  [[nodiscard]] bool forcing(std::uint64_t taken) const noexcept {
    return sealed_ready_ != 0 || (!sealed_.empty() && taken < sealed_.back().boundary);
  }

  /// Seals the open generation at intake index `boundary` (values below it belong to it or to an
  /// earlier one) and returns its id. May throw std::bad_alloc (then nothing changed).
  std::uint64_t seal(std::uint64_t boundary) {
    sealed_.push_back(generation{boundary, open_.outstanding, open_.ready});
    sealed_ready_ += open_.ready;
    open_.outstanding = 0;
    open_.ready = 0;
    return first_sealed_ + sealed_.size() - 1;
  }

  /// Retires the sealed generations that are complete, oldest first (`taken`: values taken from
  /// the intake so far). Returns true if any retired: the caller wakes flush() waiters.
  bool retire(std::uint64_t taken) noexcept {
    std::size_t n = 0;
    while (n < sealed_.size() && sealed_[n].outstanding == 0 && taken >= sealed_[n].boundary) ++n;
    if (n == 0) return false;
    sealed_.erase(sealed_.begin(), sealed_.begin() + static_cast<std::ptrdiff_t>(n));
    first_sealed_ += n;
    // release: a flush() that sees the new count also sees everything resolved before it.
    completed_.store(first_sealed_, std::memory_order_release);
    return true;
  }

  /// Generations retired so far: the flush() that sealed generation g is done once this is > g.
  /// Thread-safe (no lock needed).
  [[nodiscard]] std::uint64_t completed() const noexcept {
    // acquire: pairs with the release in retire().
    return completed_.load(std::memory_order_acquire);
  }

 private:
  struct generation {
    std::uint64_t boundary;     // values with intake index < boundary belong to this or earlier ones
    std::uint64_t outstanding;  // values of this generation not yet resolved
    std::uint64_t ready = 0;    // ...of which waiting for a batch (not in the sink, not backing off)
  };

  [[nodiscard]] bool is_sealed(std::uint64_t gen) const noexcept { return gen - first_sealed_ < sealed_.size(); }
  generation& record(std::uint64_t gen) noexcept {
    const std::uint64_t i = gen - first_sealed_;
    return i < sealed_.size() ? sealed_[i] : open_;
  }

  std::vector<generation> sealed_;  // sealed, not yet retired; oldest first
  std::uint64_t first_sealed_ = 0;  // id of sealed_.front(); the open generation's id is first + size
  std::uint64_t sealed_ready_ = 0;  // sum of sealed_[*].ready
  generation open_{0, 0};
  std::atomic<std::uint64_t> completed_{0};
};

}  // namespace sluice::detail
