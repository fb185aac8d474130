// sluice/testing/manual_clock.hpp — a clock that moves only when a test says so.
//
// What it is for: testing timed components (sluice's and your own) deterministically, without
// sleeping. It models `sluice::clock_source`: give a copy to the component, keep one in the test,
// and move time with advance()/set(). Copies are handles onto one shared timeline.
//
// How waking works: a component parks through `clock.wait(ec, key)` / `clock.wait_until(ec, key,
// tp)`. While parked, its event_count is in this clock's registry (one entry per parked thread,
// removed as soon as it stops waiting, so the registry is bounded by the number of waiting
// threads). advance()/set() moves time, then notifies every registered event_count and *empties
// the registry*: each woken thread re-reads now(), handles what became due, and parks again
// (re-registering) once it has nothing left to do.
//
// Observing "the component has caught up" (for components with their own threads):
//   clock.advance(30s);
//   clock.wait_for_waiters(1);    // returns once the worker is parked on the clock again, i.e. it
//                                 // processed everything due at the new time and went back to sleep
// waiters() counts threads currently parked on the clock. Because advance() empties the registry,
// the count drops to 0 and rises again only when the woken threads come back to wait — never
// counting a thread that has not yet seen the new time. A consumer-driven component (requeue_queue
// with try_pop) needs none of this: a try_pop after advance() sees the due entries directly.
// Caveats: a thread that, after waking, blocks on something that is *not* this clock (a mutex, a
// channel that does not wait through the clock) is not counted until it parks on the clock again.
// A thread woken by its component's own notification (not by advance()) stays counted until it
// runs; so use the count right after advance()/set(), with no due-now work scheduled concurrently.
//
// Guarantees: time never goes backwards (advance by a negative duration or set() to an earlier
// time throws std::invalid_argument). A time change happens-before the return of every wait it
// wakes. Thread-safe; advance()/set() may be called from any thread.
// Never: sleeps, spins, or advances by itself.
//
// Example:
//   sluice::testing::manual_clock clock;
//   sluice::requeue_queue<int, std::string, sluice::testing::manual_clock> q(clock);
//   (void)q.schedule(1, "retry", 30s);
//   clock.advance(30s);
//   assert(q.try_pop()->item == "retry");
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>

#include "../clock.hpp"
#include "../deadline.hpp"
#include "../event_count.hpp"

namespace sluice::testing {

class manual_clock {
 public:
  using rep = std::chrono::nanoseconds::rep;
  using period = std::chrono::nanoseconds::period;
  using duration = std::chrono::nanoseconds;
  using time_point = std::chrono::time_point<manual_clock, duration>;
  static constexpr bool is_steady = true;

  /// A new timeline starting at `start` (default: the epoch). Allocates its shared state.
  explicit manual_clock(time_point start = time_point{}) : state_(std::make_shared<state>()) {
    state_->now = start;
  }

  /// Current time of the shared timeline. Thread-safe. Never allocates. Never blocks (takes the
  /// clock's internal lock briefly).
  [[nodiscard]] time_point now() const noexcept {
    std::lock_guard lock(state_->mutex);
    return state_->now;
  }

  /// Moves time forward by `d` (>= 0, else std::invalid_argument) and wakes every thread parked
  /// on this clock. Thread-safe. Never allocates.
  template <class Rep, class Period>
  void advance(const std::chrono::duration<Rep, Period>& d) {
    if (d < d.zero()) {
      throw std::invalid_argument("sluice::manual_clock: advance duration must be >= 0, got " +
                                  std::to_string(std::chrono::duration_cast<duration>(d).count()) + "ns");
    }
    std::lock_guard lock(state_->mutex);
    state_->now = saturating_add(state_->now, d);
    wake_all_locked();
  }

  /// Sets the time to `tp` (>= now(), else std::invalid_argument) and wakes every thread parked
  /// on this clock. Thread-safe. Never allocates.
  void set(time_point tp) {
    std::lock_guard lock(state_->mutex);
    if (tp < state_->now) {
      throw std::invalid_argument("sluice::manual_clock: set time must be >= now(), got " +
                                  std::to_string(tp.time_since_epoch().count()) + "ns < " +
                                  std::to_string(state_->now.time_since_epoch().count()) + "ns");
    }
    state_->now = tp;
    wake_all_locked();
  }

  /// Number of threads parked on this clock right now (see the file comment). Thread-safe.
  [[nodiscard]] std::size_t waiters() const noexcept {
    std::lock_guard lock(state_->mutex);
    return state_->count;
  }

  /// Blocks (in real time, parked) until at least `n` threads are parked on this clock.
  /// Thread-safe. May block.
  void wait_for_waiters(std::size_t n) const noexcept {
    for (;;) {
      const auto key = state_->registered.prepare_wait();
      if (waiters() >= n) {
        state_->registered.cancel_wait();
        return;
      }
      state_->registered.wait(key);
    }
  }

  /// As wait_for_waiters(), but gives up after `real_timeout` of real (steady) time; returns
  /// whether `n` waiters were reached. For tests that prefer a failed check to a hang.
  template <class Rep, class Period>
  [[nodiscard]] bool wait_for_waiters_for(std::size_t n,
                                          const std::chrono::duration<Rep, Period>& real_timeout) const noexcept {
    const auto deadline = saturating_add(std::chrono::steady_clock::now(), real_timeout);
    for (;;) {
      const auto key = state_->registered.prepare_wait();
      if (waiters() >= n) {
        state_->registered.cancel_wait();
        return true;
      }
      if (!state_->registered.wait_until(key, deadline) && waiters() < n) return false;
    }
  }

  /// clock_source: parks on `ec` until notified or until any advance()/set(). Consumes the
  /// registration made by ec.prepare_wait(). Thread-safe. Never allocates. May block.
  void wait(event_count& ec, event_count::key_type key) const noexcept {
    park(ec, key, nullptr);
  }

  /// clock_source: parks on `ec` until notified, or until time reaches `deadline` (via advance()
  /// or set()). Returns false if `deadline` has been reached. Thread-safe. Never allocates. May
  /// block.
  bool wait_until(event_count& ec, event_count::key_type key, time_point deadline) const noexcept {
    return park(ec, key, &deadline);
  }

 private:
  // One per parked thread, on that thread's stack; linked into the registry while parked.
  struct waiter {
    event_count* ec;
    waiter* prev = nullptr;
    waiter* next = nullptr;
    bool linked = false;
  };

  struct state {
    mutable std::mutex mutex;
    time_point now{};
    waiter* head = nullptr;  // registry of parked threads (intrusive list, guarded by mutex)
    std::size_t count = 0;   // length of the registry
    event_count registered;  // notified whenever a thread joins the registry
  };

  bool park(event_count& ec, event_count::key_type key, const time_point* deadline) const noexcept {
    waiter self{&ec};
    {
      std::lock_guard lock(state_->mutex);
      if (deadline != nullptr && state_->now >= *deadline) {
        ec.cancel_wait();
        return false;
      }
      // Registered under the same lock advance() takes: either advance() ran before (and we saw
      // its time above) or it runs after and notifies `ec`, bumping the epoch `key` was read from.
      self.next = state_->head;
      if (self.next != nullptr) self.next->prev = &self;
      state_->head = &self;
      self.linked = true;
      ++state_->count;
    }
    state_->registered.notify_all();
    ec.wait(key);
    std::lock_guard lock(state_->mutex);
    if (self.linked) unlink_locked(self);
    return deadline == nullptr || state_->now < *deadline;
  }

  void unlink_locked(waiter& w) const noexcept {
    if (w.prev != nullptr) w.prev->next = w.next; else state_->head = w.next;
    if (w.next != nullptr) w.next->prev = w.prev;
    w.linked = false;
    --state_->count;
  }

  void wake_all_locked() noexcept {
    // Every registered thread is between prepare_wait() and the end of ec.wait(), so each notify
    // finds a waiter and bumps the epoch; the threads then re-register when they park again.
    for (waiter* w = state_->head; w != nullptr;) {
      waiter* next = w->next;
      w->ec->notify_all();
      w->linked = false;
      w->prev = w->next = nullptr;
      w = next;
    }
    state_->head = nullptr;
    state_->count = 0;
  }

  std::shared_ptr<state> state_;
};

static_assert(clock_source<manual_clock>);

}  // namespace sluice::testing
