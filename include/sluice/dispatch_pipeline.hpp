// sluice/dispatch_pipeline.hpp — the sending side of a Kafka-style producer, over ready_accumulator.
//
// What it is for: records go in per partition (send), batches go out per destination through the
// caller's sink, and every accepted record gets exactly one delivery report. Owned sender threads
// park in ready_accumulator::wait_ready() (no polling), drain each ready destination up to
// max_request_bytes and hand the request to the sink, which completes it at once (synchronous) or
// later from any thread (asynchronous; up to max_in_flight_per_destination requests per
// destination). A partition with a request in flight is muted until it completes, so records of a
// partition are delivered in send order; a retriable failure puts the batch back at the front with
// per-partition exponential backoff (no sender thread waits it out).
//
// Requirements: as ready_accumulator (Partition/Destination hashable, Record nothrow
// move-constructible); `size_of(record)` gives a record's bytes; `destination_of(partition)` is
// called from sender threads and completions (not under any pipeline lock other than the
// accumulator's). The sink should complete every request it was given (complete(), possibly from
// another thread), with `timed_out` when the answer never came; a request destroyed uncompleted
// counts as timed_out, one left untouched after the sink returns as not_sent. A request still
// unanswered request_timeout after it was handed over is abandoned by the pipeline: its records
// are reported failed (delivery_timeout, possibly persisted; the pipeline cannot resend records
// the sink still holds), its partitions are free again, and the sink's late complete() is a
// no-op; the request's accessors stay valid for as long as the sink holds it, even past the
// pipeline's destruction.
//
// Guarantees:
// - Exactly once: each accepted record carries a final state that is set once (the envelope's
//   `done` flag, set by the only function that invokes the callback); delivered, or failed with a
//   reason (retries exhausted, delivery timeout, permanent sink error, shutdown, too large) and a
//   persistence (not persisted / possibly persisted / persisted), like librdkafka's reports.
// - Per partition, records are delivered in send order. With `gapless`, once a record of a
//   partition fails for good every record buffered after it in that partition fails too.
// - A not_sent request (never reached the destination) is retried at once and does not consume a
//   retry; a retry after a leader move (destination_of changed) skips the backoff (KAFKA-15415).
// - The budget is delivery_timeout from send (>= linger + request_timeout, validated), and
//   optionally retry_backoff.max_retries.
// - stop(), drain() and the destructor are idempotent and thread-safe; nothing accepted vanishes:
//   what is not delivered is reported failed with `shutdown`. They never wait longer than
//   request_timeout for an unanswered request; drain_for/_until abandon requests still in flight
//   at their deadline (`shutdown`, possibly persisted). When quiescent, accepted = delivered
//   + failed + pending exactly (metrics()).
// - User callbacks (delivery, sink, lookup) may throw: counted, never fatal. A throwing sink
//   fails the request as retriable.
// Never: polls, scans partitions, or calls a delivery callback under a lock.
//
// Delivery reports go to the pipeline-wide `on_delivery` (a constructor argument: the fast path,
// nothing per record but the record itself), or to a callback given with the record
// (send(p, r, callback): carried on the heap, one allocation per record).
//
// Example:
//   using pipeline = sluice::dispatch_pipeline<int, std::string, int>;
//   pipeline p({}, [](int part) { return std::optional(part % 3); },
//              [](pipeline::request&& r) { r.complete(sluice::send_result::ok); },
//              [](const std::string& s) { return s.size(); },
//              [](const std::string&, const sluice::delivery_report& d) { if (!d) std::puts("failed"); });
//   (void)p.send(7, std::string("hello"));                  // reported to the pipeline-wide callback
//   (void)p.send(8, std::string("bye"), [](const std::string&, const sluice::delivery_report&) {});
//   p.flush();
#pragma once

#include <array>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <span>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "backoff.hpp"
#include "clock.hpp"
#include "detail/event_count.hpp"
#include "key.hpp"
#include "ready_accumulator.hpp"

namespace sluice {

/// Why a record failed (none: it was delivered).
enum class failure_reason : std::uint8_t {
  none,
  retries_exhausted,
  delivery_timeout,
  permanent_error,
  shutdown,
  too_large,
};
inline constexpr std::size_t failure_reason_count = 6;

/// Whether the destination may hold the record (librdkafka's msg status).
enum class persistence : std::uint8_t { not_persisted, possibly_persisted, persisted };

/// What a sink reports for one batch of a request.
enum class send_result : std::uint8_t {
  ok,         ///< persisted
  retriable,  ///< refused with a retriable error (not persisted); retried with backoff
  timed_out,  ///< sent, but no answer came (possibly persisted); retried with backoff
  not_sent,   ///< never left for the destination; retried at once, no retry consumed
  permanent,  ///< refused for good (not persisted)
  too_large,  ///< refused as too large for the destination (not persisted)
};

/// A record's one delivery report. Converts to true when delivered.
struct delivery_report {
  failure_reason reason = failure_reason::none;
  persistence persisted = persistence::not_persisted;
  std::uint32_t retries = 0;  ///< retries spent on the record's batch
  explicit operator bool() const noexcept { return reason == failure_reason::none; }
};

/// A log2-bucketed latency histogram (nanoseconds). Thread-safe; never allocates.
class latency_histogram {
 public:
  static constexpr std::size_t buckets = 64;
  /// Counts `n` samples of duration `d`.
  void record(std::chrono::nanoseconds d, std::uint64_t n = 1) noexcept {
    const auto v = static_cast<std::uint64_t>(d.count() < 1 ? 1 : d.count());
    // relaxed: statistics only; nothing is published through these counters.
    if (n > 0) counts_[static_cast<std::size_t>(std::bit_width(v) - 1)].fetch_add(n, std::memory_order_relaxed);
  }
  struct snapshot {
    std::array<std::uint64_t, buckets> counts{};
    [[nodiscard]] std::uint64_t total() const noexcept {
      std::uint64_t t = 0;
      for (auto c : counts) t += c;
      return t;
    }
    /// Upper bound of the bucket holding the q-quantile (0 < q <= 1); zero if empty.
    [[nodiscard]] std::chrono::nanoseconds percentile(double q) const noexcept {
      const std::uint64_t t = total();
      if (t == 0) return std::chrono::nanoseconds::zero();
      const auto want = static_cast<std::uint64_t>(std::ceil(q * static_cast<double>(t)));
      std::uint64_t seen = 0;
      for (std::size_t i = 0; i < buckets; ++i) {
        seen += counts[i];
        if (seen >= want && counts[i] > 0) {
          return std::chrono::nanoseconds(i >= 62 ? INT64_MAX : static_cast<std::int64_t>((std::uint64_t{2} << i) - 1));
        }
      }
      return std::chrono::nanoseconds(INT64_MAX);
    }
  };
  [[nodiscard]] snapshot read() const noexcept {
    snapshot s;
    // relaxed: statistics only.
    for (std::size_t i = 0; i < buckets; ++i) s.counts[i] = counts_[i].load(std::memory_order_relaxed);
    return s;
  }

 private:
  std::array<std::atomic<std::uint64_t>, buckets> counts_{};
};

/// Configuration of a dispatch_pipeline.
struct dispatch_pipeline_options {
  /// Batching, buffer and linger; delivery_timeout defaults to Kafka's 120 s when unset.
  ready_accumulator_options accumulator{};
  /// How long a request may stay unanswered: then the pipeline abandons it (its records fail with
  /// delivery_timeout, possibly persisted). delivery_timeout >= linger + request_timeout, as Kafka
  /// requires. > 0.
  std::chrono::nanoseconds request_timeout = std::chrono::seconds(30);
  std::size_t max_in_flight_per_destination = 5;  ///< >= 1
  std::size_t sender_threads = 1;                 ///< >= 1
  /// Retry backoff per batch (Kafka KIP-580: 100 ms doubling to 1 s); max_retries optional.
  backoff_options retry_backoff{std::chrono::milliseconds(100), std::chrono::seconds(1), 2.0, jitter_mode::equal,
                                std::nullopt};
  /// franz-go's gapless order: a record failing for good fails the rest of its partition.
  bool gapless = false;
};

/// Counters of a dispatch_pipeline (each read atomically; consistent when quiescent).
struct dispatch_metrics {
  std::uint64_t accepted = 0;   ///< records accepted by send
  std::uint64_t delivered = 0;  ///< reported delivered
  std::uint64_t failed = 0;     ///< reported failed (all reasons)
  std::array<std::uint64_t, failure_reason_count> failed_by_reason{};  ///< indexed by failure_reason
  std::uint64_t pending = 0;           ///< accepted - delivered - failed
  std::uint64_t retried = 0;           ///< records put back for another attempt
  std::uint64_t expired = 0;           ///< records failed by delivery_timeout
  std::uint64_t batches = 0;           ///< batches sent in requests
  std::uint64_t requests = 0;          ///< requests handed to the sink
  std::uint64_t in_flight = 0;         ///< requests handed to the sink and not completed
  std::uint64_t callback_errors = 0;   ///< exceptions from delivery callbacks
  std::uint64_t sink_errors = 0;       ///< exceptions from the sink
  std::uint64_t unknown_destinations = 0;  ///< partitions reported without a destination
  std::size_t buffer_used = 0;
  std::size_t buffer_available = 0;
  std::size_t waiting_appenders = 0;
  latency_histogram::snapshot queue_time;       ///< batch's first append -> report, per delivered record
  latency_histogram::snapshot request_latency;  ///< sink call -> completion
};

template <class Partition, class Record, class Destination, clock_source Clock = steady_clock,
          class UserHash = std::hash<Partition>, class UserKeyEqual = std::equal_to<Partition>,
          class UserDestHash = std::hash<Destination>, class UserDestEqual = std::equal_to<Destination>>
class dispatch_pipeline {
  static_assert(hashable_key<Partition, UserHash, UserKeyEqual>,
                "sluice::dispatch_pipeline<Partition, Record, Destination>: Partition must be copyable, hashable and "
                "equality-comparable: give it a std::hash<Partition> specialisation and operator==, or pass "
                "Hash / KeyEqual (see sluice::hashable_key in <sluice/key.hpp>)");
  static_assert(hashable_key<Destination, UserDestHash, UserDestEqual>,
                "sluice::dispatch_pipeline<Partition, Record, Destination>: Destination must be copyable, hashable and "
                "equality-comparable: give it a std::hash<Destination> specialisation and operator==, or pass "
                "DestHash / DestEqual (see sluice::hashable_key in <sluice/key.hpp>)");
  // The hash and equality used below: the caller's, or stand-ins when an assertion above fails (so
  // that it is the only error).
  using Hash = detail::checked_hash<Partition, UserHash, UserKeyEqual>;
  using KeyEqual = detail::checked_key_equal<Partition, UserHash, UserKeyEqual>;
  using DestHash = detail::checked_hash<Destination, UserDestHash, UserDestEqual>;
  using DestEqual = detail::checked_key_equal<Destination, UserDestHash, UserDestEqual>;
 public:
  using time_point = typename Clock::time_point;
  using send_status = append_status;
  using delivery_callback = std::function<void(const Record&, const delivery_report&)>;
  using destination_lookup = std::function<std::optional<Destination>(const Partition&)>;
  using size_function = std::function<std::size_t(const Record&)>;

 private:
  // One accepted record. `done` is the final state, set exactly once by report(). A record sent
  // with a callback of its own carries it on the heap; the common case (the pipeline-wide
  // on_delivery) carries a null pointer: 8 bytes instead of a 32-byte std::function per record.
  struct envelope {
    envelope(Record&& r, std::unique_ptr<delivery_callback>&& c) noexcept
        : record(std::move(r)), callback(std::move(c)) {}
    envelope(envelope&& o) noexcept
        : record(std::move(o.record)), callback(std::move(o.callback)), retries(o.retries), possibly(o.possibly),
          done(std::exchange(o.done, true)) {}
    envelope& operator=(envelope&&) = delete;
    Record record;
    std::unique_ptr<delivery_callback> callback;
    std::uint32_t retries = 0;
    bool possibly = false;  // some attempt may have been persisted
    bool done = false;
  };
  using acc_t = ready_accumulator<Partition, envelope, Destination, Clock, Hash, KeyEqual, DestHash, DestEqual>;
  using handle = typename acc_t::batch_handle;

  // One request's shared state: the sink's `request` and the pipeline's in-flight list both own it.
  // Whoever sets `claimed` first settles it: the sink's complete(), or the pipeline when
  // request_timeout passed (or at shutdown); the other side's attempt is then a no-op.
  struct flight;
  using flight_list = std::list<std::shared_ptr<flight>>;
  struct flight {
    flight(dispatch_pipeline* p, const Destination& d, std::vector<handle>&& b)
        : pipe(p), dest(d), batches(std::move(b)), results(batches.size()) {}
    std::shared_ptr<acc_t> keep;  // set when the pipeline abandoned it: the handles may outlive the pipeline
    dispatch_pipeline* pipe;
    Destination dest;
    std::vector<handle> batches;  // destroyed before `keep`
    std::vector<std::optional<send_result>> results;
    time_point started{};
    time_point deadline{};  // started + request_timeout
    typename flight_list::iterator pos{};  // in the pipeline's flights_ while `linked` (its mutex_)
    bool linked = false;
    std::atomic<bool> claimed{false};
  };

 public:
  /// One request to one destination, handed to the sink. Move-only; complete it exactly once,
  /// from any thread. Records of batch i: records(i); per-batch results with set_result().
  class request {
   public:
    request(request&& o) noexcept : f_(std::move(o.f_)) {}
    request& operator=(request&&) = delete;
    request(const request&) = delete;
    ~request() {
      if (f_ != nullptr) complete(send_result::timed_out);
    }
    /// Whether this handle still has to be completed (false once moved from or completed).
    [[nodiscard]] bool owns() const noexcept { return f_ != nullptr; }
    explicit operator bool() const noexcept { return owns(); }
    /// The accessors stay valid while this handle owns the request, even after the pipeline
    /// abandoned it at request_timeout (or was destroyed).
    [[nodiscard]] const Destination& destination() const noexcept { return f_->dest; }
    [[nodiscard]] std::size_t size() const noexcept { return f_->batches.size(); }
    [[nodiscard]] const Partition& partition(std::size_t i) const noexcept { return f_->batches[i].partition(); }
    [[nodiscard]] std::size_t bytes(std::size_t i) const noexcept { return f_->batches[i].bytes(); }
    [[nodiscard]] std::size_t record_count(std::size_t i) const noexcept { return f_->batches[i].records().size(); }
    [[nodiscard]] const Record& record(std::size_t i, std::size_t j) const noexcept {
      return f_->batches[i].records()[j].record;
    }
    /// Sets batch i's result (default: the one passed to complete()).
    void set_result(std::size_t i, send_result r) noexcept { f_->results[i] = r; }
    /// Finishes the request: batches without a result of their own get `rest`. Thread-safe with
    /// respect to the pipeline; call once. Runs delivery callbacks on the calling thread. A no-op
    /// for the records if the pipeline already gave up on the request (request_timeout, shutdown).
    void complete(send_result rest = send_result::ok) noexcept {
      if (f_ == nullptr) return;
      const std::shared_ptr<flight> f = std::move(f_);
      // acq_rel: the winner of `claimed` settles the batches; pairs with abandon_flights().
      if (f->claimed.exchange(true, std::memory_order_acq_rel)) return;
      for (auto& r : f->results) {
        if (!r) r = rest;
      }
      f->pipe->finish(*f);
    }

   private:
    friend class dispatch_pipeline;
    explicit request(std::shared_ptr<flight> f) noexcept : f_(std::move(f)) {}
    std::shared_ptr<flight> f_;
  };
  using sink_function = std::function<void(request&&)>;

  /// Validates the options (std::invalid_argument naming field and value) and starts the sender
  /// threads. `on_delivery` is the report hook for records sent without their own callback.
  dispatch_pipeline(dispatch_pipeline_options options, destination_lookup destination_of, sink_function sink,
                    size_function size_of, delivery_callback on_delivery = {}, Clock clock = Clock{})
      : options_(validate(std::move(options))),
        lookup_(std::move(destination_of)),
        sink_(std::move(sink)),
        size_of_(std::move(size_of)),
        on_delivery_(std::move(on_delivery)),
        clock_(clock),
        acc_owner_(std::make_shared<acc_t>(options_.accumulator, [this](const Partition& p) { return lookup(p); }, clock)),
        acc_(*acc_owner_),
        rng_(std::random_device{}()) {
    if (!sink_) throw std::invalid_argument("sluice::dispatch_pipeline: sink must be callable");
    if (!size_of_) throw std::invalid_argument("sluice::dispatch_pipeline: size_of must be callable");
    if (!lookup_) throw std::invalid_argument("sluice::dispatch_pipeline: destination_of must be callable");
    senders_.reserve(options_.sender_threads);
    for (std::size_t i = 0; i < options_.sender_threads; ++i) {
      senders_.emplace_back([this](std::stop_token st) { sender_loop(st); });
    }
  }
  dispatch_pipeline(const dispatch_pipeline&) = delete;
  dispatch_pipeline& operator=(const dispatch_pipeline&) = delete;
  /// stop(): in-flight requests are awaited, everything else is reported `shutdown`.
  ~dispatch_pipeline() { stop(); }

  [[nodiscard]] const dispatch_pipeline_options& options() const noexcept { return options_; }

  // ---- send ------------------------------------------------------------------------------------

  /// Accepts `record` for `partition`, blocking (FIFO-fair) while buffer memory is exhausted. Its
  /// report goes to the pipeline-wide on_delivery (the fast path), or to `on_delivery` when given
  /// (one heap allocation per record when it is non-empty). On any status but ok the record and
  /// callback are left with the caller. Thread-safe.
  [[nodiscard]] send_status send(const Partition& partition, Record&& record) {
    return send_impl(record, nullptr, [&](auto&& env, std::size_t b) { return acc_.append(partition, std::move(env), b); });
  }
  [[nodiscard]] send_status send(const Partition& partition, Record&& record, delivery_callback on_delivery) {
    return send_impl(record, &on_delivery,
                     [&](auto&& env, std::size_t b) { return acc_.append(partition, std::move(env), b); });
  }
  /// As send(), giving up with `cancelled` when `stop` is triggered while it waits.
  [[nodiscard]] send_status send(const Partition& partition, Record&& record, std::stop_token stop) {
    return send_impl(record, nullptr,
                     [&](auto&& env, std::size_t b) { return acc_.append(partition, std::move(env), b, stop); });
  }
  [[nodiscard]] send_status send(const Partition& partition, Record&& record, delivery_callback on_delivery,
                                 std::stop_token stop) {
    return send_impl(record, &on_delivery,
                     [&](auto&& env, std::size_t b) { return acc_.append(partition, std::move(env), b, stop); });
  }
  /// As send(), but returns `full` instead of waiting. Never blocks (other than the lock).
  [[nodiscard]] send_status try_send(const Partition& partition, Record&& record) {
    return send_impl(record, nullptr,
                     [&](auto&& env, std::size_t b) { return acc_.try_append(partition, std::move(env), b); });
  }
  [[nodiscard]] send_status try_send(const Partition& partition, Record&& record, delivery_callback on_delivery) {
    return send_impl(record, &on_delivery,
                     [&](auto&& env, std::size_t b) { return acc_.try_append(partition, std::move(env), b); });
  }
  /// As send(), waiting at most `timeout` on the Clock.
  template <class Rep, class Period>
  [[nodiscard]] send_status try_send_for(const Partition& partition, Record&& record,
                                         const std::chrono::duration<Rep, Period>& timeout) {
    return send_impl(record, nullptr, [&](auto&& env, std::size_t b) {
      return acc_.try_append_for(partition, std::move(env), b, timeout);
    });
  }
  template <class Rep, class Period>
  [[nodiscard]] send_status try_send_for(const Partition& partition, Record&& record, delivery_callback on_delivery,
                                         const std::chrono::duration<Rep, Period>& timeout) {
    return send_impl(record, &on_delivery, [&](auto&& env, std::size_t b) {
      return acc_.try_append_for(partition, std::move(env), b, timeout);
    });
  }
  /// As send(), waiting until `deadline` on the Clock.
  [[nodiscard]] send_status try_send_until(const Partition& partition, Record&& record, time_point deadline) {
    return send_impl(record, nullptr, [&](auto&& env, std::size_t b) {
      return acc_.try_append_until(partition, std::move(env), b, deadline);
    });
  }
  [[nodiscard]] send_status try_send_until(const Partition& partition, Record&& record, delivery_callback on_delivery,
                                           time_point deadline) {
    return send_impl(record, &on_delivery, [&](auto&& env, std::size_t b) {
      return acc_.try_append_until(partition, std::move(env), b, deadline);
    });
  }

  /// Tell the pipeline `partition`'s destination changed (leader move): re-routed once, its
  /// backoff cut short. Thread-safe.
  void destination_changed(const Partition& partition) { acc_.destination_changed(partition); }
  /// The destination lookup may know more now (metadata refreshed). Thread-safe.
  void destinations_refreshed() { acc_.destinations_refreshed(); }

  // ---- flush and shutdown ------------------------------------------------------------------------

  /// Seals every batch and overrides linger until every accepted record has been reported
  /// (including records sent while it runs). Thread-safe. May block.
  void flush() { (void)flush_impl(nullptr); }
  template <class Rep, class Period>
  [[nodiscard]] bool flush_for(const std::chrono::duration<Rep, Period>& timeout) {
    const time_point deadline = detail::saturating_add(clock_.now(), timeout);
    return flush_impl(&deadline);
  }
  [[nodiscard]] bool flush_until(time_point deadline) { return flush_impl(&deadline); }

  /// Stops accepting, keeps sending until every accepted record is reported (or the deadline),
  /// then stop(). Returns whether everything was reported before the deadline. Idempotent.
  bool drain() { return drain_impl(nullptr); }
  template <class Rep, class Period>
  bool drain_for(const std::chrono::duration<Rep, Period>& timeout) {
    const time_point deadline = detail::saturating_add(clock_.now(), timeout);
    return drain_impl(&deadline);
  }
  bool drain_until(time_point deadline) { return drain_impl(&deadline); }

  /// Stops accepting and stops the senders; waits for in-flight requests to complete (each at most
  /// until its request_timeout, then abandoned), reports everything else `shutdown`. Idempotent;
  /// thread-safe; not from a callback or the sink.
  void stop() { stop_impl(false); }

 private:
  void stop_impl(bool abandon_now) {
    std::lock_guard once(stop_mutex_);
    if (stopped_) return;
    // relaxed: completions re-check under the same conditions after the senders are joined; the
    // final take_pending() below catches a retry that raced with this store.
    stopping_.store(true, std::memory_order_relaxed);
    acc_.close();
    for (auto& t : senders_) t.request_stop();
    for (auto& t : senders_) {
      if (t.joinable()) t.join();
    }
    fail_pending(failure_reason::shutdown);
    // Requests in flight: awaited until their request_timeout, then abandoned (their records
    // reported possibly persisted); with abandon_now (drain past its deadline) abandoned at once.
    for (;;) {
      const auto due = abandon_flights(abandon_now, abandon_now ? failure_reason::shutdown
                                                                : failure_reason::delivery_timeout);
      if (wait_pipeline([&] { return in_flight_.load(std::memory_order_acquire) == 0; }, due ? &*due : nullptr)) break;
    }
    { std::lock_guard barrier(mutex_); }  // the last completion has left finish() (see there)
    fail_pending(failure_reason::shutdown);
    stopped_ = true;
  }

  // Abandons the requests whose request_timeout passed (all: every request in flight): their
  // records are reported `reason`, possibly persisted, their partitions are free again, and a
  // later complete() from the sink is a no-op (the sink's handle keeps the records readable).
  // Returns the deadline of the oldest request still in flight.
  std::optional<time_point> abandon_flights(bool all, failure_reason reason) noexcept {
    // acquire: a linked flight is counted in in_flight_ until it is unlinked, so 0 means none.
    if (in_flight_.load(std::memory_order_acquire) == 0) return std::nullopt;
    std::vector<std::shared_ptr<flight>> due;
    std::optional<time_point> next;
    bool wake = false;
    {
      std::lock_guard lock(mutex_);
      if (flights_.empty()) return std::nullopt;
      const time_point now = clock_.now();
      try {
        due.reserve(flights_.size());
      } catch (...) {
        return flights_.front()->deadline;  // out of memory: try again at the next wake-up
      }
      while (!flights_.empty() && (all || flights_.front()->deadline <= now)) {
        std::shared_ptr<flight> f = std::move(flights_.front());
        flights_.pop_front();
        f->linked = false;
        // acq_rel: pairs with request::complete(); the loser leaves the batches alone.
        if (f->claimed.exchange(true, std::memory_order_acq_rel)) continue;  // the sink is completing it
        auto it = dest_in_flight_.find(f->dest);
        if (it != dest_in_flight_.end()) {
          wake = wake || it->second >= options_.max_in_flight_per_destination;
          --it->second;
        }
        f->keep = acc_owner_;
        due.push_back(std::move(f));  // reserved: does not throw
      }
      if (!flights_.empty()) next = flights_.front()->deadline;
    }
    for (auto& f : due) abandon_one(*f, reason);
    if (wake) acc_.wake();
    if (!due.empty()) idle_ec_.notify_all();
    return next;
  }

  void abandon_one(flight& f, failure_reason reason) noexcept {
    for (handle& b : f.batches) {
      for (envelope& e : b.records()) e.possibly = true;  // sent, and the answer never came
      fail_batch(b, reason, settle_mode::detach);
    }
    // release: pairs with the acquire in stop(): the batches above are settled.
    in_flight_.fetch_sub(1, std::memory_order_release);
  }


 public:
  /// Counters and histograms. Thread-safe.
  [[nodiscard]] dispatch_metrics metrics() const {
    dispatch_metrics m;
    // relaxed: statistics; quiescent readers have joined (or synchronised with) every writer.
    m.delivered = delivered_.load(std::memory_order_relaxed);
    for (std::size_t i = 0; i < failure_reason_count; ++i) {
      m.failed_by_reason[i] = failed_[i].load(std::memory_order_relaxed);
      m.failed += m.failed_by_reason[i];
    }
    const auto s = acc_.stats();  // read after the reports: every reported record was appended before
    m.accepted = s.appended;
    m.pending = m.accepted - m.delivered - m.failed;
    m.retried = retried_.load(std::memory_order_relaxed);
    m.expired = m.failed_by_reason[static_cast<std::size_t>(failure_reason::delivery_timeout)];
    m.batches = batches_.load(std::memory_order_relaxed);
    m.requests = requests_.load(std::memory_order_relaxed);
    m.in_flight = in_flight_.load(std::memory_order_relaxed);
    m.callback_errors = callback_errors_.load(std::memory_order_relaxed);
    m.sink_errors = sink_errors_.load(std::memory_order_relaxed);
    m.unknown_destinations = unknown_.load(std::memory_order_relaxed);
    m.buffer_used = s.buffer_used;
    m.buffer_available = s.buffer_capacity - s.buffer_used;
    m.waiting_appenders = s.waiting_appenders;
    m.queue_time = queue_time_.read();
    m.request_latency = request_latency_.read();
    return m;
  }

  /// The accumulator's audit (for tests): sealed batches no path will deliver. Thread-safe.
  [[nodiscard]] auto audit() const { return acc_.audit(); }

 private:
  static dispatch_pipeline_options validate(dispatch_pipeline_options o) {
    using namespace std::string_literals;
    auto ns = [](std::chrono::nanoseconds d) { return std::to_string(d.count()) + "ns"; };
    if (!o.accumulator.delivery_timeout) o.accumulator.delivery_timeout = std::chrono::seconds(120);
    if (o.request_timeout <= o.request_timeout.zero()) {
      throw std::invalid_argument("sluice::dispatch_pipeline: request_timeout must be > 0, got "s + ns(o.request_timeout));
    }
    if (o.max_in_flight_per_destination < 1) {
      throw std::invalid_argument("sluice::dispatch_pipeline: max_in_flight_per_destination must be >= 1, got 0");
    }
    if (o.sender_threads < 1) throw std::invalid_argument("sluice::dispatch_pipeline: sender_threads must be >= 1, got 0");
    // saturating (r3 F7): linger + request_timeout may exceed the duration's range
    const std::chrono::nanoseconds floor_ =
        o.accumulator.linger > std::chrono::nanoseconds::max() - o.request_timeout
            ? std::chrono::nanoseconds::max()
            : o.accumulator.linger + o.request_timeout;
    if (*o.accumulator.delivery_timeout < floor_) {
      throw std::invalid_argument("sluice::dispatch_pipeline: delivery_timeout must be >= linger + request_timeout ("s +
                                  ns(floor_) + "), got " +
                                  ns(*o.accumulator.delivery_timeout));
    }
    (void)backoff<int>(o.retry_backoff);  // validates base / max / multiplier, naming them
    return o;
  }

  std::optional<Destination> lookup(const Partition& p) const {
    try {
      return lookup_(p);
    } catch (...) {
      return std::nullopt;  // a throwing lookup reads as "unknown": reported, retried later
    }
  }

  template <class Append>
  send_status send_impl(Record& record, delivery_callback* cb, Append&& append) {
    const std::size_t bytes = size_of_(record);  // may throw: nothing was taken
    std::unique_ptr<delivery_callback> own;
    if (cb != nullptr && *cb) own = std::make_unique<delivery_callback>(std::move(*cb));  // may throw: idem
    envelope env(std::move(record), std::move(own));
    const send_status s = append(std::move(env), bytes);  // counts it as accepted (the accumulator's appended)
    if (s != send_status::ok) {
      record = std::move(env.record);  // back to the caller
      if (cb != nullptr && env.callback) *cb = std::move(*env.callback);
      env.done = true;
    }
    return s;
  }

  // The only place a callback runs: the final state is set once, here. Returns whether it was set
  // now (the caller counts reports in bulk).
  bool report(envelope& e, const delivery_report& r) noexcept {
    if (std::exchange(e.done, true)) return false;
    try {
      if (e.callback) {
        (*e.callback)(e.record, r);
      } else if (on_delivery_) {
        on_delivery_(e.record, r);
      }
    } catch (...) {
      callback_errors_.fetch_add(1, std::memory_order_relaxed);  // relaxed: statistic
    }
    return true;
  }

  void count_failed(failure_reason reason, std::uint64_t n) noexcept {
    // release: pairs with quiescent()'s acquire (see there).
    if (n > 0) failed_[static_cast<std::size_t>(reason)].fetch_add(n, std::memory_order_release);
  }

  enum class settle_mode : std::uint8_t { drop, fail, detach };  // handle already settled / fail() / fail_detached()

  void fail_batch(handle& b, failure_reason reason, settle_mode mode) noexcept {
    const Partition partition = b.partition();
    std::uint64_t n = 0;
    for (envelope& e : b.records()) {
      n += report(e, delivery_report{reason, e.possibly ? persistence::possibly_persisted : persistence::not_persisted,
                                     e.retries});
    }
    count_failed(reason, n);
    // gapless: the rest of the partition is taken while `b` still holds its mute (r3 F3), so no
    // sender can send a later batch in between. ("Buffered after" = buffered when this runs.)
    std::vector<handle> rest;
    if (options_.gapless && reason != failure_reason::shutdown) {
      try {
        acc_.take_partition(partition, rest);
      } catch (...) {
      }
    }
    if (mode == settle_mode::fail) {
      acc_.fail(std::move(b));
    } else if (mode == settle_mode::detach) {
      acc_.fail_detached(b);  // the sink may still read the records: b keeps them
    } else {
      b = handle{};
    }
    std::uint64_t m = 0;
    for (handle& h : rest) {
      for (envelope& e : h.records()) m += report(e, delivery_report{reason, persistence::not_persisted, e.retries});
    }
    count_failed(reason, m);
  }

  void fail_pending(failure_reason reason) {
    std::vector<handle> rest;
    acc_.take_pending(rest);
    for (handle& h : rest) fail_batch(h, reason, settle_mode::drop);
    idle_ec_.notify_all();
  }

  std::chrono::nanoseconds retry_delay(std::uint32_t retries) {
    const auto& o = options_.retry_backoff;
    const double v = static_cast<double>(o.base.count()) * std::pow(o.multiplier, static_cast<double>(retries - 1));
    double d = v < static_cast<double>(o.max.count()) ? v : static_cast<double>(o.max.count());
    if (o.jitter != jitter_mode::none) {
      std::lock_guard lock(rng_mutex_);
      const double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng_);
      d = o.jitter == jitter_mode::full ? d * u : d / 2 + d / 2 * u;
    }
    return std::chrono::nanoseconds(static_cast<std::int64_t>(d));
  }

  // Completion of a request (any thread, once).
  void finish(flight& rq) noexcept {
    const time_point now = clock_.now();
    request_latency_.record(std::chrono::duration_cast<std::chrono::nanoseconds>(now - rq.started));
    const bool stopping = stopping_.load(std::memory_order_relaxed);  // relaxed: see stop()
    for (std::size_t i = 0; i < rq.batches.size(); ++i) {
      handle& b = rq.batches[i];
      const send_result r = *rq.results[i];
      switch (r) {
        case send_result::ok: {
          // Queue time from the batch's first append: an upper bound for its later records, and
          // one clock read per batch instead of one per record.
          std::uint64_t n = 0;
          for (envelope& e : b.records()) n += report(e, delivery_report{failure_reason::none, persistence::persisted, e.retries});
          queue_time_.record(std::chrono::duration_cast<std::chrono::nanoseconds>(now - b.first_append()), n);
          delivered_.fetch_add(n, std::memory_order_release);  // release: pairs with quiescent()
          break;  // settled below, with the request's other delivered batches, under one lock
        }
        case send_result::permanent:
          fail_batch(b, failure_reason::permanent_error, settle_mode::fail);
          break;
        case send_result::too_large:
          fail_batch(b, failure_reason::too_large, settle_mode::fail);
          break;
        case send_result::retriable:
        case send_result::timed_out:
        case send_result::not_sent: {
          const bool counts = r != send_result::not_sent;
          std::uint32_t retries = b.records().empty() ? 0 : b.records()[0].retries;
          if (counts) ++retries;
          for (envelope& e : b.records()) {
            e.retries = retries;
            if (r == send_result::timed_out) e.possibly = true;
          }
          if (stopping) {
            fail_batch(b, failure_reason::shutdown, settle_mode::fail);
            break;
          }
          const auto& max = options_.retry_backoff.max_retries;
          if (counts && max && retries > *max) {
            fail_batch(b, failure_reason::retries_exhausted, settle_mode::fail);
            break;
          }
          // not_sent consumes no retry but still waits the base backoff (r3 F4: a sink that keeps
          // declining must not turn the sender into a busy loop).
          std::chrono::nanoseconds delay = counts ? retry_delay(retries) : options_.retry_backoff.base;
          const auto now_dest = lookup(b.partition());
          if (now_dest && !DestEqual{}(*now_dest, rq.dest)) delay = std::chrono::nanoseconds::zero();  // leader moved
          retried_.fetch_add(b.records().size(), std::memory_order_relaxed);  // relaxed: statistic
          try {
            acc_.reenqueue(std::move(b), delay);
          } catch (...) {
            // out of memory for the backoff entry: reenqueue left the handle owning it
            if (b.owns()) fail_batch(b, failure_reason::retries_exhausted, settle_mode::fail);
          }
          break;
        }
      }
    }
    acc_.complete(std::span<handle>(rq.batches));  // the delivered ones (the others were moved out)
    // Under mutex_ to the end: stop() sees in_flight_ == 0 and then takes mutex_ once, so this
    // thread has stopped touching the pipeline before stop() returns (r3 F5: a completion racing
    // the destructor). Lock order mutex_ -> the accumulator's mutex (wake) is the only one.
    std::lock_guard lock(mutex_);
    if (std::exchange(rq.linked, false)) flights_.erase(rq.pos);
    auto it = dest_in_flight_.find(rq.dest);
    if (it != dest_in_flight_.end()) {
      if (it->second >= options_.max_in_flight_per_destination) acc_.wake();  // its partitions wait: look again
      --it->second;
    }
    // release: pairs with the acquire in stop(): the batches above are settled.
    in_flight_.fetch_sub(1, std::memory_order_release);
    idle_ec_.notify_all();
  }

  void sender_loop(std::stop_token st) {
    typename acc_t::ready_result r;
    std::vector<handle> batches;
    while (!st.stop_requested()) {
      // The oldest unanswered request bounds the wait: at its deadline it is abandoned.
      const std::optional<time_point> due = abandon_flights(false, failure_reason::delivery_timeout);
      const ready_status s = due ? acc_.wait_ready_until(*due, st) : acc_.wait_ready(st);
      if (s == ready_status::cancelled) break;
      if (s == ready_status::timeout) continue;
      if (s == ready_status::closed) {
        // Closed and empty: only a completion putting a batch back can bring work now.
        wait_pipeline([&] { return st.stop_requested() || acc_.has_pending_work() || in_flight_.load() == 0; },
                      due ? &*due : nullptr, &st);
        if (!acc_.has_pending_work() && in_flight_.load() == 0) {
          idle_ec_.notify_all();
          wait_pipeline([&] { return st.stop_requested() || acc_.has_pending_work(); }, nullptr, &st);
        }
        continue;
      }
      acc_.ready(r);
      if (r.expiry_due) {
        batches.clear();
        acc_.expire(batches);
        for (handle& h : batches) fail_batch(h, failure_reason::delivery_timeout, settle_mode::drop);
        batches.clear();
        idle_ec_.notify_all();
      }
      if (!r.unknown.empty()) unknown_.fetch_add(r.unknown.size(), std::memory_order_relaxed);  // relaxed: statistic
      for (const Destination& d : r.destinations) send_to(d, batches);
    }
  }

  void send_to(const Destination& d, std::vector<handle>& batches) {
    for (;;) {
      {
        std::lock_guard lock(mutex_);
        auto& n = dest_in_flight_[d];
        if (n >= options_.max_in_flight_per_destination) return;  // finish() wakes us
        ++n;
      }
      in_flight_.fetch_add(1, std::memory_order_relaxed);  // relaxed: ordered by the sink hand-off
      batches.clear();
      bool more = false;  // d still has ready partitions: drain again (else the next cycle will)
      if (acc_.drain(d, options_.accumulator.max_request_bytes, batches, true, more) == 0) {
        {
          std::lock_guard lock(mutex_);
          auto it = dest_in_flight_.find(d);
          --it->second;
        }
        in_flight_.fetch_sub(1, std::memory_order_release);
        idle_ec_.notify_all();
        return;
      }
      requests_.fetch_add(1, std::memory_order_relaxed);  // relaxed: statistics
      batches_.fetch_add(batches.size(), std::memory_order_relaxed);
      auto f = std::make_shared<flight>(this, d, std::move(batches));
      batches = std::vector<handle>();
      try {
        batches.reserve(f->batches.size());  // one allocation for the next request, not one per doubling
      } catch (...) {
        // out of memory: the next drain grows it (or fails there, before anything is taken)
      }
      {
        std::lock_guard lock(mutex_);
        // Read under the lock, so flights_ is in deadline order (the clock is monotonic).
        f->started = clock_.now();
        f->deadline = detail::saturating_add(f->started, options_.request_timeout);
        f->pos = flights_.insert(flights_.end(), f);
        f->linked = true;
      }
      request rq(std::move(f));
      try {
        sink_(std::move(rq));
        if (rq.owns()) rq.complete(send_result::not_sent);  // the sink neither completed nor kept it
      } catch (...) {
        sink_errors_.fetch_add(1, std::memory_order_relaxed);
        if (rq.owns()) rq.complete(send_result::retriable);
      }
      if (!more) return;
    }
  }

  template <class Pred>
  bool wait_pipeline(Pred&& pred, const time_point* deadline, const std::stop_token* stop = nullptr) {
    struct waker {
      detail::event_count* ec;
      void operator()() const noexcept { ec->notify_all(); }
    };
    std::optional<std::stop_callback<waker>> on_stop;
    if (stop != nullptr && stop->stop_possible()) on_stop.emplace(*stop, waker{&idle_ec_});
    for (;;) {
      const auto key = idle_ec_.prepare_wait();
      if (pred()) {
        idle_ec_.cancel_wait();
        return true;
      }
      if (deadline != nullptr && clock_.now() >= *deadline) {
        idle_ec_.cancel_wait();
        return false;
      }
      if (deadline != nullptr) {
        (void)clock_.wait_until(idle_ec_, key, *deadline);
      } else {
        clock_.wait(idle_ec_, key);
      }
    }
  }

  bool quiescent() const {
    // acquire: a report counted here happened after its record's append (through the
    // accumulator's locks), so appended() read after it counts that append too, on any CPU:
    // reports can never cover for a record not yet reported (review of the lanes, N2).
    std::uint64_t reported = delivered_.load(std::memory_order_acquire);
    for (const auto& f : failed_) reported += f.load(std::memory_order_acquire);
    return reported >= acc_.appended();  // lock-free; counts every send that happened-before
  }

  bool flush_impl(const time_point* deadline) {
    acc_.begin_flush();
    const bool ok = wait_pipeline([&] { return quiescent(); }, deadline);
    acc_.end_flush();
    return ok;
  }

  bool drain_impl(const time_point* deadline) {
    acc_.close();  // refuse new records; the senders keep going (close seals every open batch)
    const bool ok = wait_pipeline([&] { return quiescent(); }, deadline);
    stop_impl(!ok);  // past the deadline: requests still in flight are abandoned at once
    return ok;
  }

  const dispatch_pipeline_options options_;
  const destination_lookup lookup_;
  const sink_function sink_;
  const size_function size_of_;
  const delivery_callback on_delivery_;
  Clock clock_;
  // Shared so that requests the pipeline abandoned (their sink still holds them) keep the
  // accumulator their batch handles point into alive past the pipeline.
  std::shared_ptr<acc_t> acc_owner_;
  acc_t& acc_;
  std::mutex rng_mutex_;
  std::mt19937_64 rng_;
  std::mutex mutex_;  // dest_in_flight_
  // Requests in flight per destination. Entries stay at zero (one per destination ever sent to):
  // erasing them cost an allocation and a free per request.
  std::unordered_map<Destination, std::size_t, DestHash, DestEqual> dest_in_flight_;
  flight_list flights_;  // requests handed to the sink and not settled, oldest first
  std::atomic<std::uint64_t> delivered_{0}, retried_{0}, batches_{0}, requests_{0}, in_flight_{0};
  std::atomic<std::uint64_t> callback_errors_{0}, sink_errors_{0}, unknown_{0};
  std::array<std::atomic<std::uint64_t>, failure_reason_count> failed_{};
  latency_histogram queue_time_;
  latency_histogram request_latency_;
  detail::event_count idle_ec_;  // flush/drain/stop waiters and closed senders
  std::atomic<bool> stopping_{false};
  std::mutex stop_mutex_;
  bool stopped_ = false;
  std::vector<std::jthread> senders_;  // last: started after everything above exists
};

}  // namespace sluice
