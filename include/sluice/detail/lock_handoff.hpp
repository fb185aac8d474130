// sluice/detail/lock_handoff.hpp — hand-off with bounded unfairness (not public API).
//
// Shared by limiter (a counted resource: permits) and key_lock_table (a binary one: a key). Both
// follow the rule Go's sync.Mutex made popular, with a count in place of Go's 1 ms:
//
//  - Normal mode. A released resource becomes free; a *running* thread may take it at once even
//    though others are parked ("barging": no futex wake-up and no scheduler decision sits between
//    a release and the next acquire). The release wakes the oldest parked waiter (the head) only
//    if no head is already awake and looking ("woken"), so a stream of releases makes one system
//    call per head wake-up, not one each. Every barging take while someone is queued counts as
//    one *bypass* of the head.
//  - Starvation mode. Once the head has been bypassed `max_bypasses` times, no newcomer may take
//    the resource: every release hands it straight to the head (FIFO, as before), and newcomers
//    queue behind. The mode ends by itself as soon as the head is a waiter with bypasses to spare.
//
// The bound is per waiter, not only for the head: each waiter remembers the "bypass clock" when
// it queued (handoff_waiter::arrival); the owner keeps the head's count `c`, i.e. clock minus the
// head's arrival. Any waiter's bypasses = clock - its arrival <= c <= max_bypasses, because
// bargers are refused once c reaches the bound. When the head leaves, the owner subtracts the
// arrival gap to its successor (handoff_fifo::head_gap). Parked waiters among
// themselves are always served in arrival order: only the head ever takes a free resource.
//
// Waiting: a waiter puts a handoff_waiter on its own stack, links it under the owner's mutex and
// parks on the waiter's own event_count (await_turn). Under that same mutex an owner either
// grants the resource to the head directly (signal = granted) or tells the head to look
// (signal = woken); the head then re-checks under the mutex, takes a free resource or parks again.
//
// Lifetime rule: other threads touch a waiter node only under the owner's mutex while it is
// linked (grant() unlinks it first, in the same critical section), and await_turn() takes that
// mutex before returning, so the node cannot be destroyed while someone else still uses it.
//
// Never allocates. The fifo is not synchronized: callers hold their mutex.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <optional>
#include <stop_token>

#include "event_count.hpp"
#include "wait.hpp"

namespace sluice::detail {

/// How often a queued waiter can be overtaken by threads that arrived after it, at most.
/// At 10-20 ns per barging acquire this is 0.2-0.3 ms of others' work, the order of Go's 1 ms.
/// Why not smaller: each switch to starvation mode costs a wake-up of a waiter that is usually
/// still asleep (on a loaded 2-vCPU guest we measured that the woken waiter had not yet run after
/// 4096 bypasses, ~60 us), during which the resource is idle. At 4096 that cost 10-20% of the
/// two-thread hand-off throughput; at 16384 it is a few percent. Documented in the limiter and
/// key_lock_table headers; tested by both.
inline constexpr std::uint32_t max_bypasses = 16384;

/// Constructor tag for tests only: a smaller bypass bound, so that stress tests reach starvation
/// mode (and its interplay with timeouts and cancellation) often. 1 <= value <= max_bypasses.
struct bypass_bound_for_testing {
  std::uint32_t value;
};

struct handoff_waiter {
  enum : std::uint32_t { none = 0, woken = 1, granted = 2 };
  handoff_waiter* prev = nullptr;
  handoff_waiter* next = nullptr;
  std::uint64_t arrival = 0;  // the bypass clock when this waiter queued (see the file comment)
  std::atomic<std::uint32_t> signal{none};
  event_count ec;
};

/// Intrusive doubly linked FIFO of waiters with the bypass clock. O(1) push, remove. Caller holds
/// the owner's mutex.
class handoff_fifo {
 public:
  [[nodiscard]] bool empty() const noexcept { return head_ == nullptr; }
  [[nodiscard]] handoff_waiter* front() const noexcept { return head_; }

  /// Links `w` at the tail. `head_bypasses` is the owner's current count for the head (0 when empty).
  void push_back(handoff_waiter* w, std::uint32_t head_bypasses) noexcept {
    w->arrival = head_ != nullptr ? head_->arrival + head_bypasses : 0;
    w->next = nullptr;
    w->prev = tail_;
    if (tail_ != nullptr) {
      tail_->next = w;
    } else {
      head_ = w;
    }
    tail_ = w;
  }

  /// How many fewer times the second waiter has been bypassed than the head (0 if none): what the
  /// owner subtracts from the head's count when the head leaves.
  [[nodiscard]] std::uint64_t head_gap() const noexcept {
    return head_ != nullptr && head_->next != nullptr ? head_->next->arrival - head_->arrival : 0;
  }

  /// Unlinks `w` (anywhere in the fifo).
  void remove(handoff_waiter* w) noexcept {
    (w->prev != nullptr ? w->prev->next : head_) = w->next;
    (w->next != nullptr ? w->next->prev : tail_) = w->prev;
    w->prev = w->next = nullptr;
  }

 private:
  handoff_waiter* head_ = nullptr;
  handoff_waiter* tail_ = nullptr;
};

/// Hands the resource to `w` (already unlinked) and wakes it. Call with the owner's mutex held.
inline void grant(handoff_waiter* w) noexcept {
  // release: the granter's writes (the previous holder's critical section) happen-before the
  // waiter's acquire load of `signal` in await_turn().
  w->signal.store(handoff_waiter::granted, std::memory_order_release);
  w->ec.notify_one();  // a system call only if the waiter is really parked
}

/// Tells the head `w` to look at the resource again. Call with the owner's mutex held.
inline void wake(handoff_waiter* w) noexcept {
  // relaxed: signal is only written under the owner's mutex (held); the waiter re-reads it and
  // the resource state under that mutex.
  if (w->signal.load(std::memory_order_relaxed) != handoff_waiter::none) return;
  // release: pairs with the acquire load in await_turn()'s wait condition.
  w->signal.store(handoff_waiter::woken, std::memory_order_release);
  w->ec.notify_one();
}

/// Waits, as the linked waiter `w`, until the resource is ours. `lock` holds the owner's mutex on
/// entry and on return. With the mutex held:
///  - `attempt()` is called after a woken signal (w is then the head): it takes the free resource
///    for `w` and unlinks it (returns true), or records that no head is looking and returns false;
///  - `abandon()` is called on timeout or cancellation when nothing was granted: it unlinks `w`.
/// Returns true if the resource is now ours. A grant that races with a timeout wins.
template <class Mutex, class Attempt, class Abandon>
[[nodiscard]] bool await_turn(handoff_waiter& w, std::unique_lock<Mutex>& lock,
                              const std::optional<steady_time>& deadline, const std::stop_token* stop,
                              Attempt&& attempt, Abandon&& abandon) {
  for (;;) {
    lock.unlock();
    // acquire: pairs with the release stores in grant() and wake().
    const wait_outcome outcome =
        block_until(w.ec, [&w] { return w.signal.load(std::memory_order_acquire) != handoff_waiter::none; },
                    deadline, stop);
    lock.lock();  // also waits out a granter still inside grant() (lifetime rule)
    // relaxed: the mutex orders this read after any signal written under it.
    const std::uint32_t sig = w.signal.load(std::memory_order_relaxed);
    if (sig == handoff_waiter::granted) return true;
    if (sig == handoff_waiter::woken) {
      // relaxed: only written under the mutex (held).
      w.signal.store(handoff_waiter::none, std::memory_order_relaxed);
      if (attempt()) return true;
    }
    if (outcome != wait_outcome::ready) {
      abandon();
      return false;
    }
  }
}

}  // namespace sluice::detail
