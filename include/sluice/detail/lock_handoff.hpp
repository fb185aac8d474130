// sluice/detail/lock_handoff.hpp — FIFO direct handoff to parked waiters (not public API).
//
// Shared by limiter and key_lock_table. A thread that must wait puts a handoff_waiter on its own
// stack, links it into an intrusive handoff_fifo under the owner's mutex, unlocks, and parks on
// the waiter's own event_count. The releaser, under the same mutex, pops the oldest waiter and
// grants it the resource directly (the resource never becomes "free", so no newcomer can barge in
// front of the queue), then notifies that one waiter: a system call only if it is really parked.
//
// Lifetime rule: the granter touches the waiter node only while holding the owner's mutex, and
// await_handoff() takes that mutex once before returning, so the node (on the waiter's stack)
// cannot be destroyed while a granter still uses it.
//
// Never allocates. The fifo is not synchronized: callers hold their mutex.
#pragma once

#include <atomic>
#include <mutex>
#include <optional>
#include <stop_token>

#include "event_count.hpp"
#include "wait.hpp"

namespace sluice::detail {

struct handoff_waiter {
  handoff_waiter* prev = nullptr;
  handoff_waiter* next = nullptr;
  std::atomic<bool> granted{false};
  event_count ec;
};

/// Intrusive doubly linked FIFO of waiters. O(1) push, pop and remove. Caller holds the mutex.
class handoff_fifo {
 public:
  [[nodiscard]] bool empty() const noexcept { return head_ == nullptr; }

  void push_back(handoff_waiter* w) noexcept {
    w->next = nullptr;
    w->prev = tail_;
    if (tail_ != nullptr) {
      tail_->next = w;
    } else {
      head_ = w;
    }
    tail_ = w;
  }

  /// Removes and returns the oldest waiter, or nullptr.
  handoff_waiter* pop_front() noexcept {
    handoff_waiter* w = head_;
    if (w != nullptr) remove(w);
    return w;
  }

  void remove(handoff_waiter* w) noexcept {
    (w->prev != nullptr ? w->prev->next : head_) = w->next;
    (w->next != nullptr ? w->next->prev : tail_) = w->prev;
    w->prev = w->next = nullptr;
  }

 private:
  handoff_waiter* head_ = nullptr;
  handoff_waiter* tail_ = nullptr;
};

/// Hands the resource to `w` and wakes it. Call with the owner's mutex held (see lifetime rule).
inline void grant(handoff_waiter* w) noexcept {
  // release: the granter's writes (the previous holder's critical section) happen-before the
  // waiter's acquire load of `granted` in await_handoff().
  w->granted.store(true, std::memory_order_release);
  w->ec.notify_one();
}

/// Parks until `w` is granted, the deadline passes or `stop` is triggered. `w` must already be
/// linked (under `mutex`). Returns true if granted (the caller now owns the resource). Otherwise
/// calls `abandon()` with `mutex` held — it must unlink `w` — and returns false. A grant that
/// races with a timeout or cancellation wins: the waiter keeps what it was given.
template <class Mutex, class Abandon>
[[nodiscard]] bool await_handoff(handoff_waiter& w, Mutex& mutex,
                                 const std::optional<steady_time>& deadline,
                                 const std::stop_token* stop, Abandon&& abandon) {
  // acquire: pairs with the release store in grant().
  (void)block_until(w.ec, [&w] { return w.granted.load(std::memory_order_acquire); }, deadline, stop);
  std::lock_guard lock(mutex);  // also waits out a granter still inside grant() (lifetime rule)
  // relaxed: the mutex orders this read after any grant() made under it.
  if (w.granted.load(std::memory_order_relaxed)) return true;
  abandon();
  return false;
}

}  // namespace sluice::detail
