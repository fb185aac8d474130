// sluice/detail/reconcile_types.hpp — the vocabulary of sluice::reconcile_pipeline: results,
// context, options, metrics, dead letters (public types; the file is an internal part of
// <sluice/reconcile_pipeline.hpp>, which documents them — include that header, not this one).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <limits>
#include <mutex>
#include <optional>
#include <random>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "../backoff.hpp"
#include "../clock.hpp"
#include "event_count.hpp"
#include "reconcile_histogram.hpp"
#include "reconcile_spin.hpp"
#include "../key.hpp"

namespace sluice {

/// Why a reconcile runs (kube-rs's ReconcileReason).
enum class reconcile_reason : std::uint8_t {
  created,              ///< submitted with submit_options::reason = created
  updated,              ///< submitted (the default reason of a submission)
  requeue_requested,    ///< the previous run returned requeue_after(d) and d has passed
  retry_after_failure,  ///< the previous run failed and its backoff delay has passed
};

enum class conflict_strategy : std::uint8_t { coalesce, discard, requeue_after, wait };

/// Result of submit and its family. Only `ok` consumes the entity.
enum class submit_status : std::uint8_t {
  ok,         ///< accepted (queued, scheduled, or merged into the key's pending version)
  full,       ///< intake at capacity (try_ forms)
  closed,     ///< stop(), drain() or a fault closed the intake
  timeout,    ///< _for / _until gave up
  cancelled,  ///< the stop_token was triggered
  discarded,  ///< conflict_strategy::discard and the key is running: counted, entity left with you
  busy,       ///< conflict_strategy::wait, the key is running and this was a try_ form
};

enum class dead_letter_reason : std::uint8_t { retries_exhausted, terminal };

/// Where a version was when shutdown reported it as not processed.
enum class pending_state : std::uint8_t { queued, scheduled, waiting };

/// The error of a failed reconcile: a message, and the exception if one was thrown (rethrow it to
/// inspect its type).
struct reconcile_error {
  std::string message;
  std::exception_ptr exception;
};

namespace detail {
template <class Rep, class Period>
[[nodiscard]] std::chrono::nanoseconds clamp_ns(const std::chrono::duration<Rep, Period>& d) noexcept {
  using wide = std::chrono::duration<long double, std::nano>;
  const wide w = std::chrono::duration_cast<wide>(d);
  if (!(w == w) || w <= wide::zero()) return std::chrono::nanoseconds::zero();  // NaN, negative: now
  if (!(w < wide(std::chrono::nanoseconds::max()))) return std::chrono::nanoseconds::max();
  return std::chrono::ceil<std::chrono::nanoseconds>(w);
}
template <class TimePoint>
[[nodiscard]] TimePoint add_ns(TimePoint tp, std::chrono::nanoseconds d) noexcept {
  using dur = typename TimePoint::duration;
  using wide = std::chrono::duration<long double, typename dur::period>;
  const wide sum = wide(tp.time_since_epoch()) + std::chrono::duration_cast<wide>(d);
  if (!(sum < wide(dur::max()))) return TimePoint::max();
  if (d <= std::chrono::nanoseconds::zero()) return tp;
  const dur dd = std::chrono::ceil<dur>(d);
  return tp.time_since_epoch() > dur::max() - dd ? TimePoint::max() : tp + dd;
}
}  // namespace detail


/// What a reconcile returns. Cheap to build; only failures carry a string.
class reconcile_result {
 public:
  enum class kind : std::uint8_t { done, requeue, failure, terminal };

  [[nodiscard]] static reconcile_result done() noexcept { return reconcile_result(kind::done); }
  /// Success; reconcile the same version again after `d` (a periodic re-check).
  template <class Rep, class Period>
  [[nodiscard]] static reconcile_result requeue_after(const std::chrono::duration<Rep, Period>& d) noexcept {
    reconcile_result r(kind::requeue);
    r.delay_ = detail::clamp_ns(d);
    return r;
  }
  /// Failure: retried after the key's backoff delay.
  [[nodiscard]] static reconcile_result failure(std::string message) {
    reconcile_result r(kind::failure);
    r.error_.message = std::move(message);
    return r;
  }
  /// Failure that also asks for a delay: retried after max(backoff delay, d) (see the file comment).
  template <class Rep, class Period>
  [[nodiscard]] static reconcile_result failure(std::string message, const std::chrono::duration<Rep, Period>& d) {
    reconcile_result r = failure(std::move(message));
    r.delay_ = detail::clamp_ns(d);
    return r;
  }
  /// Failure carrying an exception (its what() becomes the message when it is a std::exception).
  [[nodiscard]] static reconcile_result failure(std::exception_ptr e) {
    reconcile_result r(kind::failure);
    r.error_.message = describe(e);
    r.error_.exception = std::move(e);
    return r;
  }
  /// Terminal failure: never retried; the entity goes to on_dead_letter.
  [[nodiscard]] static reconcile_result terminal(std::string message) {
    reconcile_result r(kind::terminal);
    r.error_.message = std::move(message);
    return r;
  }

  [[nodiscard]] kind result_kind() const noexcept { return kind_; }
  [[nodiscard]] std::chrono::nanoseconds delay() const noexcept { return delay_; }
  [[nodiscard]] const reconcile_error& error() const noexcept { return error_; }
  [[nodiscard]] reconcile_error&& take_error() noexcept { return std::move(error_); }

  static std::string describe(const std::exception_ptr& e) {
    if (!e) return "unknown error";
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& ex) {
      return ex.what();
    } catch (...) {
      return "non-standard exception";
    }
  }

 private:
  explicit reconcile_result(kind k) noexcept : kind_(k) {}
  kind kind_;
  std::chrono::nanoseconds delay_{0};
  reconcile_error error_;
};

/// What a reconcile is told about its run.
template <class Key>
struct reconcile_context {
  const Key& key;
  std::uint32_t attempt;    ///< 1 + consecutive failures of this key so far
  reconcile_reason reason;  ///< why this run happens
  int priority;
  const std::stop_token& stop;  ///< requested by stop(), cancel(key) and reconcile_timeout
};

/// Per-submission options. The dedup rule (file comment) merges these with a pending version's.
struct submit_options {
  int priority = 0;                                   ///< 0 .. priority_levels-1, higher first
  reconcile_reason reason = reconcile_reason::updated;  ///< created or updated
  std::chrono::nanoseconds delay{0};                  ///< > 0: not before now + delay (scheduled)
};

template <class Key, class Entity>
struct dead_letter {
  Key key;
  Entity entity;
  reconcile_error error;   ///< the last error
  std::uint32_t failures;  ///< consecutive failures recorded
  dead_letter_reason reason;
};

template <class Key, class Entity>
struct unprocessed {
  Key key;
  Entity entity;
  pending_state state;
  std::uint32_t failures;
};

/// What cancel(key) did.
struct cancel_result {
  bool removed_pending = false;  ///< a queued, scheduled or waiting version was removed
  bool stop_requested = false;   ///< the key was running: its stop token was requested
  explicit operator bool() const noexcept { return removed_pending || stop_requested; }
};

/// A snapshot of the pipeline's counters and gauges (one lock, consistent with itself).
struct reconcile_metrics {
  std::uint64_t submitted = 0;          ///< accepted submissions (discarded ones included)
  std::uint64_t reconciled = 0;         ///< callback runs finished
  std::uint64_t succeeded = 0;          ///< runs that returned done()
  std::uint64_t failed = 0;             ///< runs that failed (returned, thrown, timed out, terminal)
  std::uint64_t retries = 0;            ///< failures scheduled for a retry
  std::uint64_t requeues = 0;           ///< runs that returned requeue_after(d)
  std::uint64_t dead_lettered = 0;
  std::uint64_t discarded = 0;
  std::uint64_t coalesced = 0;          ///< versions replaced by a newer one before they ran
  std::uint64_t cancelled = 0;
  std::uint64_t unprocessed = 0;        ///< reported to on_unprocessed at shutdown
  std::uint64_t conflict_requeues = 0;  ///< conflict_strategy::requeue_after deferrals (each submission's and each re-deferral)
  std::uint64_t timeouts = 0;           ///< runs that overran reconcile_timeout
  std::uint64_t callback_errors = 0;    ///< exceptions thrown by on_* hooks (caught)
  std::uint64_t claims = 0;             ///< worker critical sections that took keys (reconciled / claims: keys per claim)
  std::uint64_t monitor_wakes = 0;      ///< parked workers woken by the monitor: queued work had seen no claim for a tick (a run that turned out long)
  std::uint64_t revoked = 0;            ///< claimed keys the monitor took back from a worker stuck in an earlier run of the claim
  std::size_t queued = 0;               ///< ready, waiting for a worker
  std::size_t scheduled = 0;            ///< waiting for a deadline (requeues, retries, delays)
  std::size_t waiting = 0;              ///< coalesced behind a running version of the same key
  std::size_t in_flight = 0;            ///< claimed by a worker: running now, or next in its claim
  std::size_t keys = 0;                 ///< keys with any state
  std::size_t idle_keys = 0;            ///< key states kept after a successful last run (see keep_idle_keys)
  std::size_t max_parallel = 0;
  std::chrono::nanoseconds oldest_queued_age{0};
  std::chrono::nanoseconds longest_running{0};
  reconcile_histogram queue_latency;       ///< ready -> started
  reconcile_histogram reconcile_duration;  ///< started -> finished
  bool faulted = false;
  bool stopped = false;
  [[nodiscard]] std::size_t pending() const noexcept { return queued + scheduled + waiting + in_flight; }
  /// The conservation identity. Every snapshot satisfies it (each transition moves one unit between
  /// two of its terms under the pipeline's lock); so does reconciled == succeeded + failed + requeues.
  [[nodiscard]] bool balanced() const noexcept {
    return submitted == succeeded + dead_lettered + discarded + coalesced + cancelled + unprocessed + pending();
  }
};

template <class Key, class Entity>
struct reconcile_options {
  std::size_t max_parallel = 4;  ///< worker threads, >= 1
  std::size_t capacity = 1024;   ///< ready versions submitters may add before submit waits, >= 1
  conflict_strategy on_conflict = conflict_strategy::coalesce;
  std::chrono::nanoseconds conflict_delay = std::chrono::milliseconds(100);  ///< for requeue_after
  int priority_levels = 2;             ///< 1 .. 255
  std::uint32_t starvation_limit = 8;  ///< >= 1 (see the starvation bound)
  backoff_options backoff = default_backoff();
  std::optional<std::chrono::nanoseconds> reconcile_timeout{};  ///< > 0 when set
  std::function<void(dead_letter<Key, Entity>&&)> on_dead_letter{};
  std::function<void(unprocessed<Key, Entity>&&)> on_unprocessed{};
  std::function<void(const Key&, const reconcile_error&, std::uint32_t attempt)> on_failure{};
  std::uint64_t jitter_seed = 0;  ///< 0: seeded from std::random_device
  /// Keys whose last run succeeded keep their state (key, index entry; not the entity) for the
  /// key's next submission, up to this many; unset: `capacity`; 0: none; at most 2^30.
  std::optional<std::size_t> keep_idle_keys{};

  /// client-go's per-item defaults (5 ms doubling to 1000 s) with the Java Operator SDK's budget of 5.
  static backoff_options default_backoff() {
    backoff_options b;
    b.max_retries = 5;
    return b;
  }
};

/// KeyFn that reads a data member: sluice::key_member<&pod::uid>.
template <auto Member>
struct key_member {
  template <class E>
  decltype(auto) operator()(const E& e) const noexcept {
    return (e.*Member);
  }
};

namespace detail {
template <class KeyFn, class Entity>
using pipeline_key_t = std::remove_cvref_t<std::invoke_result_t<const KeyFn&, const Entity&>>;
}

}  // namespace sluice
