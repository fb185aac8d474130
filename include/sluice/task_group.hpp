// sluice/task_group.hpp — run tasks on at most `max_parallel` reusable worker threads, with
// backpressure and every task's exception collected.
//
// What it is for: the seed's "Task.Run per queue entry + List<Task>" done so it cannot grow: the
// group owns max_parallel worker threads (started lazily, reused, never a thread per task) and
// spawn() blocks while max_parallel tasks are running. Nothing tracks finished tasks, so memory is
// O(max_parallel) however many tasks are spawned (plus one exception_ptr per failed task until
// wait() hands them over).
//
// Requirements: a task is a callable `void()` (its result is ignored), move-constructible, whose
// destructor does not throw. A task must not call the blocking spawn() or wait() of its own group
// (with every worker busy that would wait for itself); try_spawn() from a task is fine.
//
// Guarantees:
//  - At most max_parallel tasks run at once; spawn() returns only when its task has a worker.
//  - A task that throws does not stop the other tasks or the worker. wait() blocks until every
//    task spawned before it (and any spawned meanwhile) has finished, then throws
//    sluice::task_errors holding the std::exception_ptr of every task that failed since the last
//    wait(). Everything a task did happens-before wait() returns or throws.
//  - Callables of up to 96 bytes are stored inline in the worker's slot: no heap allocation per
//    task. A larger callable costs one allocation.
//  - A failed spawn (timeout, cancelled, try_spawn with every worker busy, or an exception from
//    starting a worker thread) does not consume the callable: `f` is moved from only on success.
//  - Errors go one of two ways. By default they are kept until wait() throws them (memory grows
//    by one exception_ptr per failed task until then). With an `on_error` hook they are handed to
//    the hook on the worker thread as they happen and never stored, so memory stays
//    O(max_parallel) even if nobody calls wait(); failed() counts every failure either way.
//  - The destructor waits for all tasks, then stops and joins the workers. It never throws:
//    errors not yet collected by wait() are discarded (call wait() first, or use on_error).
//
// What it never does: create a thread per task, keep a list of finished tasks, busy-wait when idle
// (idle workers park: zero CPU), or terminate the process because a task threw.
//
// Example:
//   sluice::task_group group(10);
//   for (auto& entry : queue) group.spawn([&entry] { reconcile(entry); });  // blocks at 10 running
//   try { group.wait(); }
//   catch (const sluice::task_errors& e) { for (auto& ep : e.errors()) log(ep); }
#pragma once

#include <atomic>
#include <cassert>
#include <chrono>
#include <concepts>
#include <cstddef>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/event_count.hpp"
#include "detail/task_group_fn.hpp"
#include "detail/wait.hpp"
#include "limiter.hpp"

namespace sluice {

/// Thrown by task_group::wait(): every exception that escaped a task since the previous wait().
class task_errors : public std::exception {
 public:
  task_errors(std::vector<std::exception_ptr> errors, std::size_t unrecorded) noexcept
      : errors_(std::move(errors)), unrecorded_(unrecorded) {}

  [[nodiscard]] const char* what() const noexcept override { return "sluice::task_group: one or more tasks failed"; }

  /// One entry per failed task, in the order the failures were recorded.
  [[nodiscard]] const std::vector<std::exception_ptr>& errors() const noexcept { return errors_; }

  /// Failed tasks whose exception_ptr could not be stored (out of memory); normally 0.
  [[nodiscard]] std::size_t unrecorded() const noexcept { return unrecorded_; }

  /// Number of failed tasks: errors().size() + unrecorded().
  [[nodiscard]] std::size_t failed() const noexcept { return errors_.size() + unrecorded_; }

 private:
  std::vector<std::exception_ptr> errors_;
  std::size_t unrecorded_;
};

template <class F>
concept task_callable = std::invocable<std::decay_t<F>&> && std::constructible_from<std::decay_t<F>, F>;

class task_group {
 public:
  /// Throws std::invalid_argument if max_parallel is 0. Starts no thread yet (workers start on
  /// demand, at most max_parallel).
  explicit task_group(std::size_t max_parallel) : task_group(max_parallel, {}) {}

  /// As task_group(max_parallel), reporting each task's exception to `on_error` (called on the
  /// worker thread, possibly concurrently from several workers) instead of storing it for wait().
  /// An exception thrown by on_error itself is stored for wait() instead. An empty hook means
  /// "store for wait()".
  task_group(std::size_t max_parallel, std::function<void(std::exception_ptr)> on_error)
      : limit_(validate(max_parallel)),
        on_error_(std::move(on_error)),
        slots_(std::make_unique<slot[]>(max_parallel)) {
    idle_.reserve(max_parallel);  // never reallocates afterwards: at most max_parallel entries
  }

  task_group(const task_group&) = delete;
  task_group& operator=(const task_group&) = delete;

  /// Waits for every task, then stops and joins the workers. Never throws; uncollected task
  /// errors are discarded.
  ~task_group() {
    limit_.wait_idle();
    for (std::size_t i = 0; i < started_; ++i) slots_[i].thread.request_stop();
    slots_.reset();  // joins
  }

  /// Runs f() on a worker; blocks while max_parallel tasks run. Thread-safe. Allocates only for
  /// callables larger than 96 bytes (and when a worker thread is first started). May block.
  template <task_callable F>
  void spawn(F&& f) {
    start(limit_.acquire(), std::forward<F>(f));
  }

  /// As spawn(f); returns false without consuming f if `stop` is requested while waiting.
  template <task_callable F>
  [[nodiscard]] bool spawn(std::stop_token stop, F&& f) {
    return start_opt(limit_.acquire(std::move(stop)), std::forward<F>(f));
  }

  /// Starts f() only if a worker is free now; otherwise returns false and leaves f untouched.
  template <task_callable F>
  [[nodiscard]] bool try_spawn(F&& f) {
    return start_opt(limit_.try_acquire(), std::forward<F>(f));
  }

  /// As spawn(f), giving up after `timeout` (f untouched). May block.
  template <class Rep, class Period, task_callable F>
  [[nodiscard]] bool try_spawn_for(const std::chrono::duration<Rep, Period>& timeout, F&& f) {
    return start_opt(limit_.try_acquire_for(timeout), std::forward<F>(f));
  }

  /// As spawn(f), giving up at `deadline` of any clock (f untouched). May block.
  template <class Clock, class Duration, task_callable F>
  [[nodiscard]] bool try_spawn_until(const std::chrono::time_point<Clock, Duration>& deadline, F&& f) {
    return start_opt(limit_.try_acquire_until(deadline), std::forward<F>(f));
  }

  /// Blocks until no task is running, then throws task_errors if any task failed since the last
  /// wait() (and forgets them). Thread-safe (but not from inside a task of this group). May block.
  void wait() {
    limit_.wait_idle();
    rethrow_collected();
  }

  /// As wait(), but returns false if tasks are still running after `timeout`.
  template <class Rep, class Period>
  [[nodiscard]] bool wait_for(const std::chrono::duration<Rep, Period>& timeout) {
    if (!limit_.wait_idle_for(timeout)) return false;
    rethrow_collected();
    return true;
  }

  /// As wait(), but returns false if tasks are still running at `deadline` (any clock).
  template <class Clock, class Duration>
  [[nodiscard]] bool wait_until(const std::chrono::time_point<Clock, Duration>& deadline) {
    if (!limit_.wait_idle_until(deadline)) return false;
    rethrow_collected();
    return true;
  }

  /// Tasks running (or being handed to a worker) right now: a snapshot. Thread-safe.
  [[nodiscard]] std::size_t running() const noexcept { return limit_.in_use(); }

  [[nodiscard]] std::size_t max_parallel() const noexcept { return limit_.max_parallel(); }

  /// Tasks that have thrown since construction (reported to on_error or stored for wait()).
  /// Thread-safe.
  [[nodiscard]] std::size_t failed() const noexcept {
    // relaxed: a statistic; wait() returning orders it after the tasks it waited for.
    return failed_.load(std::memory_order_relaxed);
  }

 private:
  struct alignas(detail::cache_line) slot {
    std::atomic<bool> has_task{false};  // set by the spawner (release), cleared by the worker
    detail::event_count ec;             // the worker parks here while idle
    detail::task_group_fn fn;           // written by the spawner before has_task
    limiter::permit permit;             // held for as long as the task runs
    std::jthread thread;                // started on first use
  };

  static std::size_t validate(std::size_t max_parallel) {
    if (max_parallel < 1) {
      throw std::invalid_argument("sluice::task_group: max_parallel must be >= 1, got " +
                                  std::to_string(max_parallel));
    }
    return max_parallel;
  }

  template <class F>
  bool start_opt(std::optional<limiter::permit> p, F&& f) {
    if (!p) return false;
    start(std::move(*p), std::forward<F>(f));
    return true;
  }

  template <class F>
  void start(limiter::permit p, F&& f) {
    const std::size_t i = take_worker();  // may throw (thread start): p returns itself, f untouched
    slot& s = slots_[i];
    try {
      s.fn.emplace(std::forward<F>(f));
    } catch (...) {
      return_worker(i);
      throw;
    }
    s.permit = std::move(p);
    // release: publishes fn and permit to the worker's acquire load of has_task.
    s.has_task.store(true, std::memory_order_release);
    s.ec.notify_one();
  }

  // A caller holding a permit always finds a worker: every busy worker holds a permit of its own
  // until after it is back on idle_, so busy workers < max_parallel.
  std::size_t take_worker() {
    std::lock_guard lock(idle_mutex_);
    if (!idle_.empty()) {
      const std::size_t i = idle_.back();  // LIFO: the most recently active worker may still spin
      idle_.pop_back();
      return i;
    }
    assert(started_ < limit_.max_parallel());
    const std::size_t i = started_;
    slots_[i].thread = std::jthread([this, i](std::stop_token stop) { run(i, stop); });
    ++started_;
    return i;
  }

  void return_worker(std::size_t i) noexcept {
    std::lock_guard lock(idle_mutex_);
    idle_.push_back(i);  // capacity reserved up front: never allocates, never throws
  }

  void run(std::size_t i, const std::stop_token& stop) {
    slot& s = slots_[i];
    for (;;) {
      // acquire: pairs with the release store in start().
      const auto outcome = detail::block_until(
          s.ec, [&s] { return s.has_task.load(std::memory_order_acquire); }, std::nullopt, &stop);
      if (outcome != detail::wait_outcome::ready) return;  // stop requested and no task pending
      try {
        s.fn();
      } catch (...) {
        record(std::current_exception());
      }
      s.fn.reset();
      limiter::permit p = std::move(s.permit);
      // relaxed: published to the next spawner by idle_mutex_ in return_worker().
      s.has_task.store(false, std::memory_order_relaxed);
      return_worker(i);
      p.release();  // only now may another spawn() proceed (and wait() see this task finished)
    }
  }

  void record(std::exception_ptr e) noexcept {
    // relaxed: a counter; the permit release after the task orders it for wait().
    failed_.fetch_add(1, std::memory_order_relaxed);
    if (on_error_) {
      try {
        on_error_(std::move(e));
        return;
      } catch (...) {
        e = std::current_exception();  // the hook failed: keep its exception for wait()
      }
    }
    std::lock_guard lock(errors_mutex_);
    try {
      errors_.push_back(std::move(e));
    } catch (...) {
      ++unrecorded_;
    }
  }

  void rethrow_collected() {
    std::vector<std::exception_ptr> errors;
    std::size_t unrecorded = 0;
    {
      std::lock_guard lock(errors_mutex_);
      errors.swap(errors_);
      unrecorded = std::exchange(unrecorded_, 0);
    }
    if (!errors.empty() || unrecorded != 0) throw task_errors(std::move(errors), unrecorded);
  }

  limiter limit_;  // declared first: destroyed after the workers are joined
  std::function<void(std::exception_ptr)> on_error_;  // empty: store errors for wait()
  std::atomic<std::size_t> failed_{0};
  std::mutex errors_mutex_;
  std::vector<std::exception_ptr> errors_;
  std::size_t unrecorded_ = 0;
  std::mutex idle_mutex_;
  std::vector<std::size_t> idle_;  // idle started workers, LIFO
  std::size_t started_ = 0;        // guarded by idle_mutex_ (read unguarded only in ~task_group)
  std::unique_ptr<slot[]> slots_;  // declared last: destroyed (joined) first
};

}  // namespace sluice
