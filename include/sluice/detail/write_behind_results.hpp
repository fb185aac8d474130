// sluice/detail/write_behind_results.hpp — the public vocabulary types of sluice::write_behind
// (status, failure report, per-item sink results, metrics). Included by <sluice/write_behind.hpp>;
// include that header, not this one.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace sluice {

/// Outcome of an enqueue. Only ok consumes the caller's value.
enum class write_behind_status {
  ok,         ///< accepted: it will be persisted, coalesced (keyed) or reported through on_failed
  full,       ///< not accepted: the intake is full and the call may not wait (try_enqueue)
  closed,     ///< not accepted: stop() was called
  timeout,    ///< not accepted: the intake was still full at the deadline
  cancelled,  ///< not accepted: the stop token was triggered while waiting for space
};

/// Why a value was given up on (the reason passed to on_failed).
enum class write_behind_reason {
  retries_exhausted,  ///< the sink asked for a retry once more than retry.max_retries allows
  permanent,          ///< the sink marked it fail(i, reason): the message is the sink's text
  shutdown,           ///< stop() and drain_timeout passed before it could be persisted
};

[[nodiscard]] constexpr std::string_view to_string(write_behind_reason r) noexcept {
  switch (r) {
    case write_behind_reason::retries_exhausted: return "retries_exhausted";
    case write_behind_reason::permanent: return "permanent";
    case write_behind_reason::shutdown: return "shutdown";
  }
  return "unknown";
}

/// What on_failed receives next to the value.
struct write_behind_failure {
  write_behind_reason reason = write_behind_reason::permanent;
  std::string message;        ///< permanent: the sink's reason; otherwise a description (with the
                              ///< last exception's text when the last attempt threw)
  std::uint32_t attempts = 0;  ///< sink calls that included this value
};

/// What the sink decided for one item of its batch.
enum class write_behind_outcome {
  persisted,  ///< written (the default: a sink that marks nothing persisted the whole batch)
  retry,      ///< not written, try again after a backoff (and at least the item's min_delay)
  fail,       ///< not written and never will be: reported to on_failed as permanent
};

/// Per-item results of one sink call. The sink receives it with every item persisted and marks
/// the exceptions. Indexes are positions in the batch span. Not thread-safe (one sink call).
class write_behind_results {
 public:
  write_behind_results() = default;

  [[nodiscard]] std::size_t size() const noexcept { return outcomes_.size(); }

  /// Item i was not written; retry it after its backoff, and no sooner than `min_delay` from now
  /// (a server's retry-after hint; it may exceed retry.max). Throws std::out_of_range for a bad i.
  void retry(std::size_t i, std::chrono::nanoseconds min_delay = std::chrono::nanoseconds::zero()) {
    check(i);
    outcomes_[i] = write_behind_outcome::retry;
    marked_ = true;
    if (min_delay > min_delay.zero()) {
      if (delays_.size() != outcomes_.size()) delays_.assign(outcomes_.size(), std::chrono::nanoseconds::zero());
      delays_[i] = min_delay;
    } else if (!delays_.empty()) {
      delays_[i] = std::chrono::nanoseconds::zero();
    }
  }

  /// Item i failed permanently with `reason` (passed to on_failed). Throws std::out_of_range.
  void fail(std::size_t i, std::string reason) {
    check(i);
    outcomes_[i] = write_behind_outcome::fail;
    marked_ = true;
    if (reasons_.size() != outcomes_.size()) reasons_.resize(outcomes_.size());
    reasons_[i] = std::move(reason);
  }

  /// Every item: retry (as retry(i, min_delay)).
  void retry_all(std::chrono::nanoseconds min_delay = std::chrono::nanoseconds::zero()) {
    for (std::size_t i = 0; i < size(); ++i) retry(i, min_delay);
  }
  /// Every item: permanent failure with `reason`.
  void fail_all(std::string_view reason) {
    for (std::size_t i = 0; i < size(); ++i) fail(i, std::string(reason));
  }
  /// Item i back to persisted (undoes retry/fail).
  void persisted(std::size_t i) {
    check(i);
    outcomes_[i] = write_behind_outcome::persisted;
  }

  [[nodiscard]] write_behind_outcome outcome(std::size_t i) const {
    check(i);
    return outcomes_[i];
  }
  [[nodiscard]] std::chrono::nanoseconds min_delay(std::size_t i) const {
    check(i);
    return delays_.empty() ? std::chrono::nanoseconds::zero() : delays_[i];
  }
  [[nodiscard]] std::string_view reason(std::size_t i) const {
    check(i);
    return reasons_.empty() ? std::string_view{} : std::string_view(reasons_[i]);
  }

  /// True if some item was marked retry or fail (it may have been set back to persisted since).
  [[nodiscard]] bool any_marked() const noexcept { return marked_; }

  /// Starts a new sink call of n items, all persisted. (Used by write_behind.)
  void reset(std::size_t n) {
    marked_ = false;
    outcomes_.assign(n, write_behind_outcome::persisted);
    delays_.clear();
    reasons_.clear();
  }
  /// Moves out item i's reason (used by write_behind when reporting).
  [[nodiscard]] std::string take_reason(std::size_t i) noexcept {
    return reasons_.empty() ? std::string() : std::move(reasons_[i]);
  }

 private:
  void check(std::size_t i) const {
    if (i >= outcomes_.size()) {
      throw std::out_of_range("sluice::write_behind_results: index " + std::to_string(i) + " out of range (batch of " +
                              std::to_string(outcomes_.size()) + ")");
    }
  }

  std::vector<write_behind_outcome> outcomes_;
  std::vector<std::chrono::nanoseconds> delays_;  // empty until some retry carries a hint
  std::vector<std::string> reasons_;              // empty until some item fails
  bool marked_ = false;
};

/// A snapshot of a batcher's counters (write_behind::metrics()). Counters are monotonic and
/// counted after the fact: a value is persisted once the sink returned success for it. Always
///   enqueued == persisted + failed + coalesced + in_intake + pending + in_retry + in_flight
/// up to values entering the intake during the snapshot; exactly when quiescent, with every
/// gauge 0: enqueued == persisted + failed + coalesced.
struct write_behind_metrics {
  std::uint64_t enqueued = 0;          ///< enqueue calls that returned ok
  std::uint64_t persisted = 0;         ///< values the sink reported written
  std::uint64_t failed = 0;            ///< values reported through on_failed (any reason)
  std::uint64_t coalesced = 0;         ///< keyed: values superseded by a newer value of their key
  std::uint64_t retries = 0;           ///< times a value was scheduled for another attempt
  std::uint64_t batches = 0;           ///< sink calls that returned (or threw)
  std::uint64_t sink_errors = 0;       ///< sink calls that threw
  std::uint64_t on_failed_errors = 0;  ///< on_failed calls that threw (caught)
  std::size_t in_intake = 0;           ///< accepted, still in the bounded intake
  std::size_t pending = 0;             ///< taken from the intake, waiting for a batch (not retries)
  std::size_t in_retry = 0;            ///< retries: waiting for their deadline, or due and not yet in a batch
  std::size_t in_flight = 0;           ///< in a sink call, or being reported to on_failed
  /// Age, counted from when a flusher took it from the intake (keyed: from when its key's first
  /// still-unwritten value was taken; coalescing keeps that stamp), of the oldest of: the head of the
  /// ready queue (the value linger counts from), the first due retry, and every batch in the sink.
  /// An estimate, one lock and no scan: values waiting out a retry backoff are not considered (see
  /// in_retry), nor values in the intake (unstamped); in keyed mode a value behind the head may be
  /// older by up to one sink call (its key was in flight when it was taken). Zero when none.
  std::chrono::nanoseconds oldest_pending_age{0};
};

}  // namespace sluice
