// sluice/ready_accumulator.hpp — push-based ready-partition accumulator (a Kafka-style record
// accumulator whose sender cycle costs O(what became ready), not O(all partitions)).
//
// What it is for: the buffering half of a producer. append(partition, record, bytes) adds a record
// to that partition's open batch; a batch *seals* when it reaches batch_bytes or batch_records, when
// its oldest record has waited `linger`, or on flush()/close(). A sender loop calls wait_ready()
// (parks until something happened), ready() (which destinations have sendable batches) and
// drain(destination, max_request_bytes) (take them), then settles every drained batch with
// complete(), fail() or reenqueue(batch, backoff).
//
// How "ready" stays cheap and never loses work (the lessons of Dekaf PR #527 and its follow-ups):
// - Every partition is in exactly one place: nowhere, the notification queue, one destination's
//   ready list, or the unknown-destination list (`where`, the "already queued" flag). A partition
//   that has a sendable head batch and is not muted is never nowhere: the single function settle()
//   runs after every change to a partition's head, mute count or backoff and puts it where it
//   belongs. So a notification is either queued or its work is done; audit() checks exactly that.
// - A partition is queued at most once, so the notification queue is bounded by the partition
//   count, and a leader move of many partitions is one re-notification each (Dekaf#660).
// - Muted partitions are dropped from the queues; the last unmute re-notifies. A head batch in
//   retry backoff has one entry in a deadline heap (indexed by partition) and is re-notified once
//   when it expires. Linger and delivery-timeout deadlines are first-append time + a constant, so
//   they are monotonic and live in FIFOs (O(1) per batch; stale entries are skipped lazily).
// - drain() takes at most one batch per partition per call, pops partitions from the front of the
//   destination's list and puts the ones that still have batches at the back (round-robin across
//   calls), stops at max_request_bytes but always takes one batch; partitions it did not reach
//   simply stay in the list: nothing is "consumed and forgotten".
//
// Requirements: Partition and Destination satisfy sluice::hashable_key (with Hash/KeyEqual and
// DestHash/DestEqual). Record is nothrow move-constructible. `destination_of(partition)` returns
// std::optional<Destination> (nullopt: unknown); it is called under the accumulator's lock (from
// ready() and drain()), so it must not call back into the accumulator; if it throws, the
// partition counts as unknown (reported, re-checked on destinations_refreshed()). Clock models
// clock_source.
//
// Guarantees:
// - Per partition, drain() hands out batches in append order; reenqueue() puts a failed batch back
//   at the front, ahead of newer batches, and several failed batches in their original order.
// - ready() costs O(notifications consumed + unknown partitions + destinations with work);
//   wait_ready() parks with no polling interval and wakes on a seal, an unmute, a backoff, linger
//   or delivery-timeout expiry, a flush(), a close(), wake() or destination_changed().
// - Buffer memory (sum of record bytes not yet completed, failed, expired or taken) never exceeds
//   buffer_bytes; blocked appenders are served first-in first-out, and try_append() does not barge
//   ahead of them. While appenders wait, linger is overridden (open batches are sealed, new ones
//   are due at once) so memory is not held back by batches waiting out their linger. A call that
//   does not return `ok` leaves the record with the caller.
// - Conservation: appended = delivered + failed + expired + taken + pending, exactly (stats()).
// - Every member function is thread-safe (any number of appenders and senders). Partitions are
//   spread over append lanes by hash: an append to an open batch that neither opens nor seals one
//   takes only its lane's lock and reserves memory from its lane's credit, so appenders to
//   different partitions rarely meet; opening or sealing a batch and every sender operation take
//   the one accumulator lock (locks spin briefly before they park), then the lane of a batch they
//   open, seal or expire; flush(), close(), take_pending(), stats(), audit() and the first appender
//   that blocks take every lane's lock. Hash and KeyEqual are called concurrently.
// - An allocation that fails (std::bad_alloc propagates) loses and double-counts nothing: sealing
//   never allocates (the notification queue has room for every partition), handle vectors grow
//   before a batch is taken (take_pending/take_partition: all or nothing), and a partition whose
//   routing or rotation allocation fails stays queued, with the sender told to look again.
// Never: scans partitions in append/ready/drain/wait_ready (only audit(), take_pending(), flush()
// and close(), which walk open batches or everything), polls, or busy-waits. A batch handle that is
// destroyed without being settled counts its records as failed (nothing vanishes).
//
// Example:
//   sluice::ready_accumulator<int, std::string, int> acc({}, [](int p) { return std::optional(p % 3); });
//   (void)acc.append(7, std::string("hello"), 5);
//   acc.flush();
//   if (acc.wait_ready() == sluice::ready_status::ready)
//     for (int node : acc.ready().destinations) {
//       std::vector<decltype(acc)::batch_handle> batches;
//       acc.drain(node, 1 << 20, batches);
//       for (auto& b : batches) acc.complete(std::move(b));   // or fail() / reenqueue(b, 100ms)
//     }
#pragma once

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <thread>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "clock.hpp"
#include "detail/event_count.hpp"
#include "detail/indexed_heap.hpp"
#include "detail/lock_table_mutex.hpp"
#include "key.hpp"

namespace sluice {

/// Configuration of a ready_accumulator. Defaults follow Kafka's producer (batch.size 16 KiB,
/// max.request.size 1 MiB, buffer.memory 32 MiB, linger 5 ms).
struct ready_accumulator_options {
  std::size_t batch_bytes = 16 * 1024;          ///< a batch seals when its bytes reach this, >= 1
  std::size_t batch_records = std::numeric_limits<std::size_t>::max();  ///< ... or its record count, >= 1
  std::size_t max_request_bytes = 1024 * 1024;  ///< larger records are refused (too_large), >= 1
  std::size_t buffer_bytes = 32 * 1024 * 1024;  ///< cap on buffered record bytes, >= 1
  std::chrono::nanoseconds linger = std::chrono::milliseconds(5);  ///< open batch seals after, >= 0
  std::optional<std::chrono::nanoseconds> delivery_timeout{};      ///< expire batches older, > 0
};

/// Result of the append family. Only `ok` consumes the record.
enum class append_status {
  ok,         ///< appended
  full,       ///< try_append: buffer memory is exhausted (or appenders are already waiting)
  closed,     ///< close() was called
  timeout,    ///< the _for/_until deadline passed while waiting for buffer memory
  cancelled,  ///< the stop token was triggered while waiting for buffer memory
  too_large,  ///< the record exceeds max_request_bytes or buffer_bytes: it can never be sent
};

/// Result of the wait_ready family.
enum class ready_status {
  ready,      ///< something happened: call ready() (and expire() if expiry_due)
  timeout,    ///< the deadline passed first
  cancelled,  ///< the stop token was triggered
  closed,     ///< closed, and nothing is left in the accumulator (in-flight batches may remain)
};

/// Counters of a ready_accumulator, all taken under one lock (consistent with each other).
struct ready_accumulator_stats {
  std::uint64_t appended = 0;   ///< records accepted by append
  std::uint64_t delivered = 0;  ///< records of batches settled with complete()
  std::uint64_t failed = 0;     ///< records of batches settled with fail() (or abandoned handles)
  std::uint64_t expired = 0;    ///< records handed out by expire()
  std::uint64_t taken = 0;      ///< records handed out by take_pending()
  std::uint64_t pending = 0;    ///< records still in the accumulator or in flight
  std::uint64_t in_flight = 0;  ///< records in batches handed out by drain() and not yet settled
  std::uint64_t batches_sealed = 0;   ///< batches that left the open state
  std::uint64_t batches_retried = 0;  ///< reenqueue() calls
  std::size_t buffer_used = 0;        ///< bytes of pending records
  std::size_t buffer_capacity = 0;    ///< options().buffer_bytes
  std::size_t waiting_appenders = 0;  ///< appenders blocked on buffer memory
  std::size_t partitions = 0;         ///< partitions ever seen
  std::size_t queued_notifications = 0;  ///< entries in the notification queue
};

template <class Partition, class Record, class Destination, clock_source Clock = steady_clock,
          class UserHash = std::hash<Partition>, class UserKeyEqual = std::equal_to<Partition>,
          class UserDestHash = std::hash<Destination>, class UserDestEqual = std::equal_to<Destination>>
class ready_accumulator {
  static_assert(hashable_key<Partition, UserHash, UserKeyEqual>,
                "sluice::ready_accumulator<Partition, Record, Destination>: Partition must be copyable, hashable and "
                "equality-comparable: give it a std::hash<Partition> specialisation and operator==, or pass "
                "Hash / KeyEqual (see sluice::hashable_key in <sluice/key.hpp>)");
  static_assert(hashable_key<Destination, UserDestHash, UserDestEqual>,
                "sluice::ready_accumulator<Partition, Record, Destination>: Destination must be copyable, hashable and "
                "equality-comparable: give it a std::hash<Destination> specialisation and operator==, or pass "
                "DestHash / DestEqual (see sluice::hashable_key in <sluice/key.hpp>)");
  // The hash and equality used below: the caller's, or stand-ins when an assertion above fails (so
  // that it is the only error).
  using Hash = detail::checked_hash<Partition, UserHash, UserKeyEqual>;
  using KeyEqual = detail::checked_key_equal<Partition, UserHash, UserKeyEqual>;
  using DestHash = detail::checked_hash<Destination, UserDestHash, UserDestEqual>;
  using DestEqual = detail::checked_key_equal<Destination, UserDestHash, UserDestEqual>;
  static_assert(std::is_nothrow_move_constructible_v<Record>,
                "sluice::ready_accumulator: Record must be nothrow move-constructible");
  struct batch_node;
  struct partition_state;

 public:
  using partition_type = Partition;
  using record_type = Record;
  using destination_type = Destination;
  using clock_type = Clock;
  using time_point = typename Clock::time_point;
  using duration = typename Clock::duration;
  using destination_lookup = std::function<std::optional<Destination>(const Partition&)>;

  /// A sealed batch handed out by drain() (in flight), expire() or take_pending() (already
  /// counted). Move-only. The records may be read and modified by the holder. A drained handle
  /// must be settled with complete(), fail() or reenqueue(); destroyed unsettled, it counts as
  /// failed. The accumulator must outlive its handles.
  class batch_handle {
   public:
    batch_handle() noexcept = default;
    batch_handle(batch_handle&& o) noexcept : acc_(std::exchange(o.acc_, nullptr)), node_(std::exchange(o.node_, nullptr)) {}
    batch_handle& operator=(batch_handle&& o) noexcept {
      if (this != &o) {
        reset();
        acc_ = std::exchange(o.acc_, nullptr);
        node_ = std::exchange(o.node_, nullptr);
      }
      return *this;
    }
    batch_handle(const batch_handle&) = delete;
    batch_handle& operator=(const batch_handle&) = delete;
    ~batch_handle() { reset(); }

    [[nodiscard]] bool owns() const noexcept { return node_ != nullptr; }
    explicit operator bool() const noexcept { return owns(); }

    /// The batch's partition, records (append order), total bytes, first-append time and how
    /// many times it was reenqueued. Precondition: owns(). Never blocks.
    [[nodiscard]] const Partition& partition() const noexcept { return *node_->partition; }
    [[nodiscard]] std::span<Record> records() noexcept { return node_->records; }
    [[nodiscard]] std::span<const Record> records() const noexcept { return node_->records; }
    [[nodiscard]] std::size_t bytes() const noexcept { return node_->bytes; }
    [[nodiscard]] time_point first_append() const noexcept { return node_->created; }
    [[nodiscard]] std::uint32_t attempts() const noexcept { return node_->attempts; }
    /// True for a batch from drain() that still has to be settled.
    [[nodiscard]] bool in_flight() const noexcept { return node_ != nullptr && node_->st == state::in_flight; }

   private:
    friend class ready_accumulator;
    batch_handle(ready_accumulator* acc, batch_node* node) noexcept : acc_(acc), node_(node) {}
    void reset() noexcept {
      if (node_ != nullptr) acc_->release(node_, outcome::abandoned);
      node_ = nullptr;
      acc_ = nullptr;
    }
    ready_accumulator* acc_ = nullptr;
    batch_node* node_ = nullptr;
  };

  /// A counted mute of one partition (move-only RAII). While any token for a partition is alive,
  /// ready()/drain() skip it; when the last goes, it is re-notified if it has sealed batches.
  class mute_token {
   public:
    mute_token() noexcept = default;
    mute_token(mute_token&& o) noexcept : acc_(std::exchange(o.acc_, nullptr)), part_(o.part_) {}
    mute_token& operator=(mute_token&& o) noexcept {
      if (this != &o) {
        release();
        acc_ = std::exchange(o.acc_, nullptr);
        part_ = o.part_;
      }
      return *this;
    }
    mute_token(const mute_token&) = delete;
    mute_token& operator=(const mute_token&) = delete;
    ~mute_token() { release(); }

    [[nodiscard]] bool owns() const noexcept { return acc_ != nullptr; }
    explicit operator bool() const noexcept { return owns(); }
    /// Gives up this mute now (the partition unmutes if this was the last). Thread-safe.
    void release() noexcept {
      if (acc_ != nullptr) std::exchange(acc_, nullptr)->unmute(part_);
    }

   private:
    friend class ready_accumulator;
    mute_token(ready_accumulator* acc, std::uint32_t part) noexcept : acc_(acc), part_(part) {}
    ready_accumulator* acc_ = nullptr;
    std::uint32_t part_ = 0;
  };

  /// What ready() found.
  struct ready_result {
    std::vector<Destination> destinations;  ///< destinations with sendable batches (each once)
    std::vector<Partition> unknown;         ///< partitions with sealed batches and no destination
    bool expiry_due = false;                ///< expire() has batches to hand out
  };

  /// What audit() found; clean() when nothing.
  struct audit_report {
    std::vector<Partition> orphans;      ///< sealed batches no path will ever deliver
    std::size_t duplicate_entries = 0;   ///< partitions with more than one live queue entry
    bool counters_consistent = true;     ///< resident records / bytes match the batches
    [[nodiscard]] bool clean() const noexcept { return orphans.empty() && duplicate_entries == 0 && counters_consistent; }
  };

  /// Validates `options` (std::invalid_argument naming the field and value). `destination_of`
  /// must be callable (std::invalid_argument otherwise). May allocate.
  explicit ready_accumulator(ready_accumulator_options options, destination_lookup destination_of,
                             Clock clock = Clock{}, Hash hash = Hash{}, KeyEqual eq = KeyEqual{})
      : options_(validate(options)),
        destination_of_(std::move(destination_of)),
        clock_(std::move(clock)),
        hash_(std::move(hash)),
        eq_(std::move(eq)) {
    if (!destination_of_) throw std::invalid_argument("sluice::ready_accumulator: destination_of must be callable");
  }

  ready_accumulator(const ready_accumulator&) = delete;
  ready_accumulator& operator=(const ready_accumulator&) = delete;
  /// Destroying with blocked callers or live handles/tokens is undefined: close(), join, settle.
  ~ready_accumulator() = default;

  [[nodiscard]] const ready_accumulator_options& options() const noexcept { return options_; }

  // ---- append ------------------------------------------------------------------------------

  /// Appends `record` (`bytes` long) to `partition`'s open batch, blocking (FIFO-fair) while the
  /// buffer is full. Moves the record only on `ok`. Thread-safe. May block. May allocate.
  [[nodiscard]] append_status append(const Partition& partition, Record&& record, std::size_t bytes) {
    return append_impl(partition, record, bytes, true, nullptr, nullptr);
  }
  /// As append(), giving up with `cancelled` when `stop` is triggered.
  [[nodiscard]] append_status append(const Partition& partition, Record&& record, std::size_t bytes,
                                     std::stop_token stop) {
    return append_impl(partition, record, bytes, true, nullptr, &stop);
  }
  /// As append(), but returns `full` instead of waiting. Never blocks (other than the lock).
  [[nodiscard]] append_status try_append(const Partition& partition, Record&& record, std::size_t bytes) {
    return append_impl(partition, record, bytes, false, nullptr, nullptr);
  }
  /// As append(), waiting at most `timeout` on the Clock.
  template <class Rep, class Period>
  [[nodiscard]] append_status try_append_for(const Partition& partition, Record&& record, std::size_t bytes,
                                             const std::chrono::duration<Rep, Period>& timeout) {
    const time_point deadline = detail::saturating_add(clock_.now(), timeout);
    return append_impl(partition, record, bytes, true, &deadline, nullptr);
  }
  /// As append(), waiting until `deadline` on the Clock.
  [[nodiscard]] append_status try_append_until(const Partition& partition, Record&& record, std::size_t bytes,
                                               time_point deadline) {
    return append_impl(partition, record, bytes, true, &deadline, nullptr);
  }

  /// Seals every open batch now (they become sendable). O(open batches). Thread-safe.
  void flush() {
    {
      std::lock_guard lock(mutex_);
      lanes_lock lanes(*this);  // seals open batches
      seal_all_open_locked();
      kick_ = true;
    }
    sender_ec_.notify_all();
  }

  /// Starts a flush that overrides linger until end_flush(): seals every open batch now, and
  /// batches opened meanwhile are sendable at the sender's next cycle (they still collect the
  /// records appended until then). Counted: nested begin/end pairs are fine. Thread-safe.
  void begin_flush() {
    {
      std::lock_guard lock(mutex_);
      lanes_lock lanes(*this);  // seals open batches
      ++flushing_;
      seal_all_open_locked();
      kick_ = true;
    }
    sender_ec_.notify_all();
  }
  /// Ends one begin_flush(). Thread-safe.
  void end_flush() {
    std::lock_guard lock(mutex_);
    if (flushing_ > 0) --flushing_;  // read when a batch opens, under mutex_
  }

  // ---- sender side -------------------------------------------------------------------------

  /// Processes due linger/backoff deadlines and the notification queue; returns the destinations
  /// with sendable batches, the partitions whose destination is unknown (each once per call), and
  /// whether expire() has work. O(notifications + unknown + destinations). Thread-safe.
  [[nodiscard]] ready_result ready() {
    ready_result out;
    ready(out);
    return out;
  }
  /// As ready(), reusing `out`'s vectors (cleared first).
  void ready(ready_result& out) {
    out.destinations.clear();
    out.unknown.clear();
    std::lock_guard lock(mutex_);
    const time_point now = clock_.now();
    kick_ = false;
    recheck_unknown_ = false;
    process_timers_locked(now);
    advance_expiry_locked(now);
    // Re-check partitions already known to lack a destination (reported again, once).
    const std::size_t old_unknown = unknown_.size();
    // An allocation that fails below (a new destination, a list entry, a backoff entry, `out`)
    // leaves the partition listed or queued, so nothing is lost; the exception propagates.
    std::size_t keep = 0;
    std::size_t i = 0;
    try {
      for (; i < old_unknown; ++i) {
        const entry e = unknown_[i];
        partition_state& p = parts_[e.part];
        if (!live(e, p, where_kind::unknown)) continue;
        if (!sendable(p, now)) {
          p.where = where_kind::none;
          settle_locked(e.part, now);
          continue;
        }
        if (auto d = route(p.key)) {
          to_destination_locked(e.part, *d);  // strong guarantee
        } else {
          out.unknown.push_back(p.key);  // first: if it throws, the entry is still unprocessed
          unknown_[keep++] = e;
        }
      }
    } catch (...) {
      kick_ = recheck_unknown_ = true;  // the sender must look again (review of the lanes, L1)
      if (parts_[unknown_[i].part].where == where_kind::none) notify_locked(unknown_[i].part);  // settle threw
      for (; i < old_unknown; ++i) unknown_[keep++] = unknown_[i];
      unknown_.erase(unknown_.begin() + static_cast<std::ptrdiff_t>(keep), unknown_.begin() + static_cast<std::ptrdiff_t>(old_unknown));
      throw;
    }
    // (settle_locked above cannot append to unknown_: it only queues on the notification queue.)
    unknown_.erase(unknown_.begin() + static_cast<std::ptrdiff_t>(keep), unknown_.begin() + static_cast<std::ptrdiff_t>(old_unknown));
    while (!notify_.empty()) {
      const entry e = notify_.pop_front();
      partition_state& p = parts_[e.part];
      if (!live(e, p, where_kind::notify)) continue;
      p.where = where_kind::none;
      try {
        if (!sendable(p, now)) {
          settle_locked(e.part, now);  // arms the backoff entry if that is why; else nothing to do
          continue;
        }
        if (auto d = route(p.key)) {
          to_destination_locked(e.part, *d);  // strong guarantee
        } else {
          unknown_.push_back(entry{e.part, p.gen + 1});  // may throw: nothing changed yet
          ++p.gen;
          p.where = where_kind::unknown;
          out.unknown.push_back(p.key);  // may throw: it is listed, and reported next time
        }
      } catch (...) {
        kick_ = true;  // the sender must look again
        if (p.where == where_kind::none) notify_locked(e.part);  // back on the queue (it just left it: room)
        throw;
      }
    }
    for (std::uint32_t d : active_) out.destinations.push_back(dests_[d].key);
    out.expiry_due = !expired_.empty();
    need_wake_ = false;  // this sender has seen everything queued so far
  }

  /// Blocks until ready() would have something new: see the file comment for the events. Returns
  /// `closed` once closed and nothing is left to send. Thread-safe. May block. Never polls.
  [[nodiscard]] ready_status wait_ready() { return wait_impl(nullptr, nullptr); }
  [[nodiscard]] ready_status wait_ready(std::stop_token stop) { return wait_impl(nullptr, &stop); }
  template <class Rep, class Period>
  [[nodiscard]] ready_status wait_ready_for(const std::chrono::duration<Rep, Period>& timeout) {
    const time_point deadline = detail::saturating_add(clock_.now(), timeout);
    return wait_impl(&deadline, nullptr);
  }
  [[nodiscard]] ready_status wait_ready_until(time_point deadline) { return wait_impl(&deadline, nullptr); }
  [[nodiscard]] ready_status wait_ready_until(time_point deadline, std::stop_token stop) {
    return wait_impl(&deadline, &stop);
  }

  /// Makes a waiting (or the next) wait_ready() return `ready` (for the caller's own events, e.g.
  /// in-flight capacity freed). Thread-safe. Never blocks.
  void wake() {
    {
      std::lock_guard lock(mutex_);
      kick_ = true;
    }
    sender_ec_.notify_all();
  }

  /// Takes sealed batches of `destination`'s ready partitions into `out` (appended): at most one
  /// per partition, starting where the previous call stopped, until the next would exceed
  /// `max_request_bytes` — but at least one. With `mute_drained`, each drained batch's partition
  /// is muted until the batch is settled (per-partition order with one request in flight).
  /// Returns the number of batches taken. Thread-safe. May allocate (out's growth).
  std::size_t drain(const Destination& destination, std::size_t max_request_bytes, std::vector<batch_handle>& out,
                    bool mute_drained = false) {
    return drain_impl(destination, max_request_bytes, out, mute_drained, nullptr);
  }
  /// As drain(), and sets `more` to whether `destination` still has ready partitions after it (a
  /// sender that drains again only while `more` makes no empty call). Thread-safe.
  std::size_t drain(const Destination& destination, std::size_t max_request_bytes, std::vector<batch_handle>& out,
                    bool mute_drained, bool& more) {
    return drain_impl(destination, max_request_bytes, out, mute_drained, &more);
  }

 private:
  std::size_t drain_impl(const Destination& destination, std::size_t max_request_bytes,
                         std::vector<batch_handle>& out, bool mute_drained, bool* more) {
    if (more != nullptr) *more = false;
    std::unique_lock lock(mutex_);
    auto it = dest_index_.find(destination);
    if (it == dest_index_.end()) return 0;
    const std::uint32_t did = it->second;
    dest_state& ds = dests_[did];
    const time_point now = clock_.now();
    std::size_t total = 0;
    std::size_t taken = 0;
    bool moved = false;
    std::size_t budget = ds.list.size();  // each entry is looked at most once per call
    out.reserve(out.size() + budget);     // may throw: nothing taken yet (no push_back below can)
    while (!ds.list.empty() && budget-- > 0) {
      const entry e = ds.list.front();
      partition_state& p = parts_[e.part];
      if (!live(e, p, where_kind::dest) || p.dest != did) {
        ds.list.pop_front();
        continue;
      }
      if (!sendable(p, now)) {
        ds.list.pop_front();
        p.where = where_kind::none;
        settle_or_notify_locked(e.part, now);
        continue;
      }
      auto d = route(p.key);
      if (!d || !dest_index_.key_eq()(*d, destination)) {  // moved (or lost its leader): route it afresh
        ds.list.pop_front();
        p.where = where_kind::none;
        notify_locked(e.part);
        moved = true;
        continue;
      }
      batch_node* b = p.head;
      if (taken > 0 && total + b->bytes > max_request_bytes) break;  // stays at the front
      // Still has batches after this one: back of the line (rotation). Queued before anything is
      // taken, so a failed allocation leaves the partition where it was (review of the lanes, M1).
      const bool rotate = b->next != nullptr && !mute_drained;
      if (rotate) {
        try {
          ds.list.push_back(e);
        } catch (...) {
          kick_ = true;  // nothing changed, but the caller's next wait_ready() must not park on it
          throw;
        }
      }
      ds.list.pop_front();
      unlink_locked(p, b);
      b->st = state::in_flight;
      b->muted = mute_drained;
      if (mute_drained) ++p.mutes;
      records_out_ += b->records.size();
      in_flight_records_ += b->records.size();
      out.push_back(batch_handle(this, b));
      total += b->bytes;
      ++taken;
      if (!rotate) {
        p.where = where_kind::none;
        if (p.head != nullptr) settle_or_notify_locked(e.part, now);
      }
    }
    if (ds.list.empty()) deactivate_locked(did);
    if (more != nullptr) *more = !ds.list.empty();
    const bool wake = std::exchange(need_wake_, false) || moved;
    lock.unlock();
    if (wake) sender_ec_.notify_all();  // other senders: a partition was re-routed or re-queued
    return taken;
  }

 public:

  /// Settles a drained batch as delivered. Precondition: b.in_flight(). Thread-safe.
  void complete(batch_handle&& b) noexcept { settle_handle(b, outcome::delivered); }
  /// Settles every owning, in-flight handle of `batches` as delivered under one lock acquisition
  /// (the handles are left empty). Thread-safe.
  void complete(std::span<batch_handle> batches) noexcept {
    bool wake_space = false;
    bool wake_sender = false;
    {
      std::lock_guard lock(mutex_);
      for (batch_handle& b : batches) {
        batch_node* n = std::exchange(b.node_, nullptr);
        b.acc_ = nullptr;
        if (n != nullptr) wake_space = release_locked(n, outcome::delivered) || wake_space;
      }
      wake_sender = std::exchange(need_wake_, false);
    }
    if (wake_space) space_ec_.notify_all();
    if (wake_sender) sender_ec_.notify_all();
  }
  /// Settles a drained batch as failed for good (its records count as failed). Thread-safe.
  void fail(batch_handle&& b) noexcept { settle_handle(b, outcome::failed); }
  /// Settles a drained batch as failed now (counted failed, its buffer memory and its mute
  /// released, its partition free to send again) but leaves `b` owning the records, readable until
  /// `b` is destroyed (for a request another thread still reads). The accumulator must outlive `b`.
  /// Precondition: b.in_flight(). Thread-safe.
  void fail_detached(batch_handle& b) noexcept {
    if (b.node_ == nullptr) return;
    bool wake_space = false;
    bool wake_sender = false;
    {
      std::lock_guard lock(mutex_);
      if (b.node_->st == state::in_flight) {
        wake_space = account_in_flight_locked(b.node_, outcome::failed);
        b.node_->st = state::settled;  // counted; the node returns to the pool with the handle
      }
      wake_sender = std::exchange(need_wake_, false);
    }
    if (wake_space) space_ec_.notify_all();
    if (wake_sender) sender_ec_.notify_all();
  }

  /// Puts a drained batch back at the front of its partition (ahead of newer batches; several in
  /// their original order), sendable again after `backoff` (<= 0: at once). A batch past its
  /// delivery_timeout goes to expire() instead. Precondition: b.in_flight(). Thread-safe. If it
  /// throws (allocation), nothing changed and `b` still owns the batch.
  template <class Rep, class Period>
  void reenqueue(batch_handle&& b, const std::chrono::duration<Rep, Period>& backoff) {
    if (b.node_ == nullptr) return;
    bool wake_sender = false;
    {
      std::lock_guard lock(mutex_);
      // Everything that can allocate first (r3 F6): on an exception nothing changed and `b` still
      // owns the batch.
      backoff_heap_.reserve_one();
      if (expired_.size() == expired_.capacity()) expired_.reserve(std::max<std::size_t>(16, expired_.size() * 2));
      batch_node* n = std::exchange(b.node_, nullptr);
      b.acc_ = nullptr;
      const time_point now = clock_.now();
      partition_state& p = parts_[n->part];
      in_flight_records_ -= n->records.size();
      records_out_ -= n->records.size();
      ++n->attempts;
      ++retried_;
      const bool expired = n->expiry_passed || (options_.delivery_timeout && now >= expiry_deadline(n));
      n->retry_at = backoff > backoff.zero() ? detail::saturating_add(now, backoff) : no_retry();
      if (expired) {
        n->st = state::expiring;
        expired_.push_back(n);
        wake_sender = true;
      } else {
        n->st = state::sealed;
        insert_sorted_locked(p, n);
      }
      if (n->muted) {
        n->muted = false;
        --p.mutes;
      }
      settle_locked(n->part, now);
      wake_sender = wake_sender || need_wake_;
      need_wake_ = false;
    }
    if (wake_sender) sender_ec_.notify_all();
  }

  /// Hands out every batch past its delivery_timeout (first append + timeout; open, sealed or in
  /// backoff — never one in flight: that one expires when it is reenqueued). O(expired).
  /// Returns the number appended to `out`. Thread-safe.
  std::size_t expire(std::vector<batch_handle>& out) {
    std::size_t n = 0;
    std::size_t freed = 0;
    {
      std::lock_guard lock(mutex_);
      const time_point now = clock_.now();
      advance_expiry_locked(now);
      out.reserve(out.size() + expired_.size());  // may throw: nothing handed out yet (see hand_out_locked)
      for (batch_node* b : expired_) {
        b->st = state::settled;
        records_out_ += b->records.size();
        expired_records_ += b->records.size();
        // relaxed: exact readers hold every lock a writer of it holds (see buffer_reserved_)
        buffer_reserved_.fetch_sub(b->bytes, std::memory_order_relaxed);
        freed += b->bytes;
        out.push_back(batch_handle(this, b));
        ++n;
      }
      expired_.clear();
    }
    if (freed > 0) space_ec_.notify_all();
    if (need_wake_exchange()) sender_ec_.notify_all();
    return n;
  }

  /// Mutes `partition` (counted; see mute_token). Thread-safe. May allocate (first sight).
  [[nodiscard]] mute_token mute(const Partition& partition) {
    const std::uint32_t h = mix(partition);
    lane& ln = lane_for(h);
    std::lock_guard lock(mutex_);
    std::lock_guard lane_guard(ln.mutex);  // creates the partition on first sight
    const std::uint32_t id = part_id_locked(ln, h, partition);
    ++parts_[id].mutes;
    return mute_token(this, id);
  }

  /// Mute count of `partition` (0 if never seen). Thread-safe.
  [[nodiscard]] std::uint32_t mutes(const Partition& partition) const {
    const std::uint32_t id = find_part(partition);
    if (id == no_part) return 0;
    std::lock_guard lock(mutex_);
    return parts_[id].mutes;
  }

  /// Tell the accumulator `partition`'s destination changed (leader move): it is routed afresh,
  /// and its head batch's retry backoff is cut short (KAFKA-15415). One re-notification, however
  /// often it is called. Thread-safe.
  void destination_changed(const Partition& partition) {
    const std::uint32_t id = find_part(partition);  // ids are never reused: no lock needed after
    if (id == no_part) return;
    {
      std::lock_guard lock(mutex_);
      partition_state& p = parts_[id];
      if (p.head != nullptr && p.head->retry_at != no_retry()) p.head->retry_at = no_retry();
      if (p.where == where_kind::dest) {
        p.where = where_kind::none;  // the entry in the old list goes stale (gen)
        ++p.gen;
      } else if (p.where == where_kind::unknown) {
        recheck_unknown_ = true;
        need_wake_ = true;
      }
      settle_locked(id, clock_.now());
    }
    if (need_wake_exchange()) sender_ec_.notify_all();
  }

  /// Tell the accumulator the destination lookup may know more now (e.g. after a metadata
  /// refresh): a waiting sender wakes and the next ready() re-checks the unknown partitions.
  void destinations_refreshed() {
    {
      std::lock_guard lock(mutex_);
      recheck_unknown_ = true;
    }
    sender_ec_.notify_all();
  }

  // ---- shutdown and accounting ---------------------------------------------------------------

  /// Refuses further appends (blocked appenders return `closed`), seals every open batch and wakes
  /// waiting senders. Idempotent. Thread-safe.
  void close() {
    {
      std::lock_guard lock(mutex_);
      lanes_lock lanes(*this);  // appenders read closed_ under their lane's lock
      closed_ = true;
      seal_all_open_locked();
      kick_ = true;
    }
    sender_ec_.notify_all();
    space_ec_.notify_all();
  }
  [[nodiscard]] bool closed() const {
    std::lock_guard lock(mutex_);
    return closed_;
  }

  /// Hands out every batch still in the accumulator (open, sealed, in backoff, expired but not
  /// yet handed out), counted as taken (expired ones as expired). In-flight batches stay with their
  /// holders. O(partitions). Returns the number appended to `out`. Thread-safe.
  std::size_t take_pending(std::vector<batch_handle>& out) {
    std::size_t n = 0;
    {
      std::lock_guard lock(mutex_);
      lanes_lock lanes(*this);  // takes open batches
      // Room for every handle first (review of the lanes, N1: a throw half-way left partitions
      // reset while their queue entries stayed, and the notification ring overflowed). Nothing
      // below throws.
      std::size_t batches = expired_.size();
      for (std::uint32_t id = 0; id < parts_.size(); ++id) {
        const partition_state& p = parts_[id];
        batches += p.open != nullptr ? 1 : 0;
        for (const batch_node* b = p.head; b != nullptr; b = b->next) ++batches;
      }
      out.reserve(out.size() + batches);  // may throw: nothing taken
      for (std::uint32_t id = 0; id < parts_.size(); ++id) {
        partition_state& p = parts_[id];
        if (p.open != nullptr) {
          batch_node* b = std::exchange(p.open, nullptr);
          ++sealed_;
          hand_out_locked(b, out, taken_records_);
          ++n;
        }
        while (p.head != nullptr) {
          batch_node* b = p.head;
          unlink_locked(p, b);
          hand_out_locked(b, out, taken_records_);
          ++n;
        }
        if (p.in_heap) {
          backoff_heap_.erase(backoff_heap_.find(id));
          p.in_heap = false;
        }
        if (p.where != where_kind::none) {
          p.where = where_kind::none;
          ++p.gen;
        }
      }
      for (batch_node* b : expired_) {
        hand_out_locked(b, out, expired_records_);
        ++n;
      }
      expired_.clear();
      notify_.clear();
      unknown_.clear();
      for (std::uint32_t d : active_) {
        dests_[d].list.clear();
        dests_[d].active = false;
      }
      active_.clear();
    }
    space_ec_.notify_all();
    return n;
  }

  /// Hands out every batch of `partition` still in the accumulator (open, sealed, in backoff),
  /// counted as taken: for a caller that fails the rest of a partition after one batch failed for
  /// good (gapless order). O(that partition's batches). Thread-safe.
  std::size_t take_partition(const Partition& partition, std::vector<batch_handle>& out) {
    std::size_t n = 0;
    {
      const std::uint32_t h = mix(partition);
      lane& ln = lane_for(h);
      std::lock_guard lock(mutex_);
      std::lock_guard lane_guard(ln.mutex);  // takes its open batch
      const std::uint32_t id = find_part_locked(ln, h, partition);
      if (id == no_part) return 0;
      partition_state& p = parts_[id];
      // All or nothing (gapless order relies on it): room for every handle first.
      std::size_t batches = p.open != nullptr ? 1 : 0;
      for (const batch_node* b = p.head; b != nullptr; b = b->next) ++batches;
      out.reserve(out.size() + batches);  // may throw: nothing taken
      while (p.head != nullptr) {
        batch_node* b = p.head;
        unlink_locked(p, b);
        hand_out_locked(b, out, taken_records_);
        ++n;
      }
      if (p.open != nullptr) {
        batch_node* b = std::exchange(p.open, nullptr);
        ++sealed_;
        hand_out_locked(b, out, taken_records_);
        ++n;
      }
      settle_or_notify_locked(id, clock_.now());  // drops its backoff entry; a stale queue entry is skipped later
    }
    if (n > 0) space_ec_.notify_all();
    return n;
  }

  /// Whether any record is waiting in the accumulator (not in flight). O(1). Thread-safe.
  [[nodiscard]] bool has_pending_work() const {
    std::lock_guard lock(mutex_);
    return resident_locked() > 0;
  }

  /// Records accepted so far (stats().appended without the locks: it reads each lane's counter).
  /// Every append that happens-before the call is counted. Thread-safe. Never blocks.
  [[nodiscard]] std::uint64_t appended() const noexcept { return appended_total(); }

  /// Consistent snapshot of the counters. Thread-safe. O(lanes); locks every lane.
  [[nodiscard]] ready_accumulator_stats stats() const {
    std::lock_guard lock(mutex_);
    lanes_lock lanes(*this);  // appended counts and credit live in the lanes
    ready_accumulator_stats s;
    s.appended = appended_total();
    s.delivered = delivered_;
    s.failed = failed_;
    s.expired = expired_records_;
    s.taken = taken_records_;
    s.pending = resident_locked() + in_flight_records_;
    s.in_flight = in_flight_records_;
    s.batches_sealed = sealed_;
    s.batches_retried = retried_;
    s.buffer_used = buffer_used_locked();
    s.buffer_capacity = options_.buffer_bytes;
    s.waiting_appenders = waiting_count_.load(std::memory_order_relaxed);  // relaxed: under mutex_, which every change holds
    s.partitions = parts_.size();
    s.queued_notifications = notify_.size();
    return s;
  }

  /// For tests and debug builds: scans everything and reports sealed batches that no path will
  /// deliver (not queued, not muted, not in backoff, not in flight), partitions with more than one
  /// live queue entry, and counter mismatches. O(partitions + queue entries). Thread-safe.
  [[nodiscard]] audit_report audit() const {
    std::lock_guard lock(mutex_);
    lanes_lock lanes(*this);  // reads open batches
    audit_report r;
    const time_point now = clock_.now();
    std::vector<std::uint32_t> live_entries(parts_.size(), 0);
    auto count = [&](const entry& e, where_kind w) {
      const partition_state& p = parts_[e.part];
      if (p.gen == e.gen && p.where == w) ++live_entries[e.part];
    };
    notify_.for_each([&](const entry& e) { count(e, where_kind::notify); });
    for (const entry& e : unknown_) count(e, where_kind::unknown);
    for (std::uint32_t d = 0; d < dests_.size(); ++d) {
      for (const entry& e : dests_[d].list) {
        const partition_state& p = parts_[e.part];
        if (p.gen == e.gen && p.where == where_kind::dest && p.dest == d) ++live_entries[e.part];
      }
    }
    std::unordered_set<const batch_node*> lingering;
    for (const timed& t : linger_fifo_) {
      if (t.node->gen == t.gen && t.node->st == state::open) lingering.insert(t.node);
    }
    std::uint64_t records = 0;
    std::size_t bytes = 0;
    for (std::uint32_t id = 0; id < parts_.size(); ++id) {
      const partition_state& p = parts_[id];
      if (live_entries[id] > 1) ++r.duplicate_entries;
      const bool queued = live_entries[id] == 1;
      if ((p.where != where_kind::none) != queued) ++r.duplicate_entries;  // flag and queues disagree
      if (p.open != nullptr) {
        records += p.open->records.size();
        bytes += p.open->bytes;
        if (!lingering.contains(p.open)) r.orphans.push_back(p.key);  // would never seal by linger
      }
      for (const batch_node* b = p.head; b != nullptr; b = b->next) {
        records += b->records.size();
        bytes += b->bytes;
      }
      if (p.head == nullptr || p.mutes > 0 || queued) continue;
      if (p.head->retry_at != no_retry() && p.head->retry_at > now) {
        const auto h = backoff_heap_.find(id);
        if (h != heap_t::npos && backoff_heap_.deadline(h) == p.head->retry_at) continue;
      } else if (p.in_heap) {
        continue;  // due now: the next ready() re-notifies it
      }
      r.orphans.push_back(p.key);
    }
    for (const batch_node* b : expired_) {
      records += b->records.size();
      bytes += b->bytes;
    }
    for (const batch_node* b : all_nodes_view()) {
      if (b->st == state::in_flight) bytes += b->bytes;
    }
    r.counters_consistent = records == resident_locked() && bytes == buffer_used_locked() &&
                            appended_total() == delivered_ + failed_ + expired_records_ + taken_records_ + resident_locked() +
                                             in_flight_records_;
    return r;
  }

 private:
  enum class state : std::uint8_t { free, open, sealed, in_flight, expiring, settled };
  enum class where_kind : std::uint8_t { none, notify, dest, unknown };
  enum class outcome : std::uint8_t { delivered, failed, abandoned };

  struct batch_node {
    std::vector<Record> records;
    std::size_t bytes = 0;
    const Partition* partition = nullptr;
    std::uint32_t part = 0;
    std::uint32_t gen = 0;  // bumped when the node returns to the pool: FIFO entries go stale
    std::uint64_t seq = 0;  // creation order, for reenqueue's ordered insert
    time_point created{};
    time_point retry_at{};  // no_retry(): not in backoff
    std::uint32_t attempts = 0;
    state st = state::free;
    bool expiry_passed = false;
    bool muted = false;  // drained with mute_drained: holds one mute of its partition
    batch_node* prev = nullptr;
    batch_node* next = nullptr;
  };

  struct partition_state {
    explicit partition_state(const Partition& k) : key(k) {}
    Partition key;
    batch_node* open = nullptr;
    batch_node* head = nullptr;  // sealed batches, head = next to send
    batch_node* tail = nullptr;
    std::uint32_t mutes = 0;
    std::uint32_t gen = 0;   // bumped whenever the partition is queued somewhere: older entries go stale
    std::uint32_t dest = 0;  // valid when where == dest
    std::uint32_t lane = 0;  // its append lane
    where_kind where = where_kind::none;
    bool in_heap = false;
  };

  struct entry {
    std::uint32_t part;
    std::uint32_t gen;
  };
  // The notification queue: a ring with room for every partition (a partition is in it at most
  // once), grown when a partition is created, so queueing one never allocates: sealing a batch,
  // after its record was counted, cannot throw (review of the lanes: an append that threw there
  // gave its memory back although the record stayed).
  class entry_ring {
   public:
    void reserve(std::size_t n) {  // may throw: nothing changed
      if (n <= buf_.size()) return;
      std::vector<entry> bigger(std::bit_ceil(std::max<std::size_t>(n, 16)));
      for (std::size_t i = 0; i < size_; ++i) bigger[i] = buf_[(head_ + i) & (buf_.size() - 1)];
      buf_.swap(bigger);
      head_ = 0;
    }
    void push_back(entry e) noexcept {
      if (size_ == buf_.size()) invariant_broken("notification queue overflow (a partition queued twice)");
      buf_[(head_ + size_) & (buf_.size() - 1)] = e;
      ++size_;
    }
    [[nodiscard]] entry pop_front() noexcept {
      const entry e = buf_[head_];
      head_ = (head_ + 1) & (buf_.size() - 1);
      --size_;
      return e;
    }
    [[nodiscard]] bool empty() const noexcept { return size_ == 0; }
    [[nodiscard]] std::size_t size() const noexcept { return size_; }
    void clear() noexcept { head_ = size_ = 0; }
    template <class F>
    void for_each(F&& f) const {
      for (std::size_t i = 0; i < size_; ++i) f(buf_[(head_ + i) & (buf_.size() - 1)]);
    }

   private:
    std::vector<entry> buf_;
    std::size_t head_ = 0;
    std::size_t size_ = 0;
  };
  struct timed {
    batch_node* node;
    std::uint32_t gen;
    time_point deadline;
  };
  struct dest_state {
    explicit dest_state(const Destination& k) : key(k) {}
    Destination key;
    std::deque<entry> list;
    bool active = false;
  };
  struct appender {
    appender* next = nullptr;
  };
  using heap_t = detail::indexed_heap<std::uint32_t, unsigned char, time_point>;

  static constexpr time_point no_retry() noexcept { return time_point::min(); }

  // A broken internal invariant (a bug in this file): say which, and stop before anything is lost
  // silently.
  [[noreturn]] static void invariant_broken(const char* what) noexcept {
    std::fprintf(stderr, "sluice::ready_accumulator: internal invariant broken: %s\n", what);
    std::abort();
  }

  static ready_accumulator_options validate(const ready_accumulator_options& o) {
    auto fail = [](const char* field, const std::string& what) {
      throw std::invalid_argument(std::string("sluice::ready_accumulator: ") + field + " must be " + what);
    };
    if (o.batch_bytes < 1) fail("batch_bytes", ">= 1, got 0");
    if (o.batch_records < 1) fail("batch_records", ">= 1, got 0");
    if (o.max_request_bytes < 1) fail("max_request_bytes", ">= 1, got 0");
    if (o.buffer_bytes < 1) fail("buffer_bytes", ">= 1, got 0");
    if (o.linger < o.linger.zero()) fail("linger", ">= 0, got " + std::to_string(o.linger.count()) + "ns");
    if (o.delivery_timeout && *o.delivery_timeout <= o.delivery_timeout->zero()) {
      fail("delivery_timeout", "> 0, got " + std::to_string(o.delivery_timeout->count()) + "ns");
    }
    return o;
  }

  static bool live(const entry& e, const partition_state& p, where_kind w) noexcept {
    return p.gen == e.gen && p.where == w;
  }

  // A partition whose head batch may be drained now (ignoring mutes, checked separately).
  static bool sendable(const partition_state& p, time_point now) noexcept {
    return p.head != nullptr && p.mutes == 0 && (p.head->retry_at == no_retry() || p.head->retry_at <= now);
  }

  time_point expiry_deadline(const batch_node* b) const noexcept {
    return detail::saturating_add(b->created, *options_.delivery_timeout);
  }

  bool need_wake_exchange() {
    std::lock_guard lock(mutex_);
    return std::exchange(need_wake_, false);
  }

  // ---- append lanes ----------------------------------------------------------------------------
  // Partitions are spread over lanes by hash. A lane's lock guards its part of the partition index
  // and the open batch of each of its partitions (records, bytes); an append to an open batch that
  // neither opens nor seals one takes only that lock, so appenders to different lanes share no lock
  // and no written line. Everything else (the sealed lists, queues, timers, pool, counters) is
  // under mutex_. Lock order: mutex_, then lanes (several only in index order, by one thread at a
  // time: it holds mutex_). An appender never holds its lane while it waits for mutex_, so a
  // sender under mutex_ waits for a lane only as long as one append into an open batch takes. A
  // batch opens and leaves the open state only under its lane's lock and mutex_, so p.open and a
  // node's state may be read under either, its records and bytes under the lane's.
  static constexpr std::uint32_t no_part = std::numeric_limits<std::uint32_t>::max();
  struct index_slot {
    std::uint32_t hash = 0;
    std::uint32_t id = no_part;
    partition_state* part = nullptr;  // parts_[id], stable
  };
  struct alignas(detail::cache_line) lane {
    mutable detail::lock_table_mutex mutex;
    std::size_t credit = 0;  // buffer bytes this lane reserved and has not used yet (see reserve_locked)
    std::atomic<std::uint64_t> appended{0};  // written under `mutex` only; atomic for appended() and has_pending_work()
    std::vector<index_slot> index;  // open addressing (linear probing) over {mixed hash, id}
    std::size_t size = 0;
  };

  // Locks every lane (in index order) under mutex_, for the paths that seal or take every open
  // batch or read every lane's counters. unlock() lets go early (before mutex_).
  class lanes_lock {
   public:
    explicit lanes_lock(const ready_accumulator& a) noexcept : a_(a) {
      for (std::size_t i = 0; i < a_.lane_count_; ++i) a_.lanes_[i].mutex.lock();
    }
    lanes_lock(const lanes_lock&) = delete;
    lanes_lock& operator=(const lanes_lock&) = delete;
    ~lanes_lock() { unlock(); }
    void unlock() noexcept {
      if (!std::exchange(held_, false)) return;
      for (std::size_t i = a_.lane_count_; i-- > 0;) a_.lanes_[i].mutex.unlock();
    }

   private:
    const ready_accumulator& a_;
    bool held_ = true;
  };

  // Under mutex_: holds one partition's lane at a time, for the timer paths that seal or expire
  // open batches one by one (appenders in other lanes go on meanwhile).
  class lane_hold {
   public:
    explicit lane_hold(const ready_accumulator& a) noexcept : a_(a) {}
    lane_hold(const lane_hold&) = delete;
    lane_hold& operator=(const lane_hold&) = delete;
    ~lane_hold() { release(); }
    void take(const partition_state& p) noexcept {
      lane* l = &a_.lanes_[p.lane];
      if (l == held_) return;
      release();
      l->mutex.lock();
      held_ = l;
    }
    void release() noexcept {
      if (held_ != nullptr) std::exchange(held_, nullptr)->mutex.unlock();
    }

   private:
    const ready_accumulator& a_;
    lane* held_ = nullptr;
  };

  static std::size_t lane_count_for_machine() noexcept {
    // Enough lanes that a few appenders per core rarely meet in one; few enough that locking them
    // all (linger seals, flush, stats) stays a few hundred nanoseconds.
    const std::size_t cores = std::max(1u, std::thread::hardware_concurrency());
    return std::bit_ceil(std::clamp<std::size_t>(4 * cores, 16, 64));
  }

  std::uint32_t mix(const Partition& partition) const {
    // Fibonacci hashing: spreads identity hashes (std::hash<int>) over the bits we index by.
    const std::uint64_t h = static_cast<std::uint64_t>(hash_(partition)) * 0x9E3779B97F4A7C15ull;
    return static_cast<std::uint32_t>(h >> 32);
  }
  // The lane takes the hash's top bits; the lane's index its low bits.
  lane& lane_for(std::uint32_t h) const noexcept { return lanes_[h >> lane_shift_]; }

  // Under ln.mutex. One probe usually finds the slot, and the key compare touches the partition
  // state the caller needs next anyway. Partitions are never removed, so there are no tombstones.
  const index_slot* find_slot_locked(const lane& ln, std::uint32_t h, const Partition& partition) const {
    if (ln.index.empty()) return nullptr;
    const std::size_t mask = ln.index.size() - 1;
    for (std::size_t i = h & mask;; i = (i + 1) & mask) {
      const index_slot& s = ln.index[i];
      if (s.id == no_part) return nullptr;
      if (s.hash == h && eq_(s.part->key, partition)) return &s;
    }
  }
  std::uint32_t find_part_locked(const lane& ln, std::uint32_t h, const Partition& partition) const {
    const index_slot* s = find_slot_locked(ln, h, partition);
    return s == nullptr ? no_part : s->id;
  }
  // Takes the partition's lane lock for the lookup; the id stays valid without it.
  std::uint32_t find_part(const Partition& partition) const {
    const std::uint32_t h = mix(partition);
    const lane& ln = lane_for(h);
    std::lock_guard lane_guard(ln.mutex);
    return find_part_locked(ln, h, partition);
  }

  static void place(std::vector<index_slot>& table, index_slot slot) noexcept {
    const std::size_t mask = table.size() - 1;
    std::size_t i = slot.hash & mask;
    while (table[i].id != no_part) i = (i + 1) & mask;
    table[i] = slot;
  }

  // Under ln.mutex and mutex_: the partition's id, created on first sight.
  std::uint32_t part_id_locked(lane& ln, std::uint32_t h, const Partition& partition) {
    const std::uint32_t found = find_part_locked(ln, h, partition);
    if (found != no_part) return found;
    if (parts_.size() >= std::numeric_limits<std::uint32_t>::max() / 4) {
      throw std::length_error("sluice::ready_accumulator: too many partitions");
    }
    if ((ln.size + 1) * 2 > ln.index.size()) {  // keep the load factor <= 1/2
      std::vector<index_slot> bigger(ln.index.empty() ? 16 : ln.index.size() * 2);  // may throw: nothing changed
      for (const index_slot& s : ln.index) {
        if (s.id != no_part) place(bigger, s);
      }
      ln.index.swap(bigger);
    }
    notify_.reserve(parts_.size() + 1);  // may throw: nothing changed (room grows, nothing else)
    const auto id = static_cast<std::uint32_t>(parts_.size());
    parts_.emplace_back(partition);  // stable: references to other partitions stay valid; may throw
    parts_[id].lane = static_cast<std::uint32_t>(&ln - lanes_.get());
    place(ln.index, index_slot{h, id, &parts_[id]});
    ++ln.size;
    return id;
  }

  // ---- buffer memory ---------------------------------------------------------------------------
  // buffer_reserved_ = record bytes buffered or in flight + every lane's unused credit, <= the cap.
  // A lane takes credit in slices, so most appends reserve memory without touching a shared line;
  // when an appender is about to wait (or try_append about to report full) every lane's credit is
  // given back first (reclaim_credit_locked), so nobody waits while memory sits unused in a lane.

  // Under ln.mutex: takes `bytes` of buffer memory for this lane's next append. False if an
  // appender is waiting (they go first) or the cap would be passed: the caller takes the slow path.
  bool reserve_locked(lane& ln, std::size_t bytes) noexcept {
    // relaxed: its 0 -> 1 step happens under every lane's lock, so under ours 0 means nobody waits
    // (a stale non-zero only sends this append down the slow path).
    if (waiting_count_.load(std::memory_order_relaxed) != 0) return false;
    if (ln.credit >= bytes) {
      ln.credit -= bytes;
      return true;
    }
    const std::size_t cap = options_.buffer_bytes;
    const std::size_t need = bytes - ln.credit;
    // relaxed: buffer_reserved_ publishes nothing; exact readers (the slow path, stats, audit) hold
    // every lane's lock and mutex_, i.e. exclude every writer.
    std::size_t cur = buffer_reserved_.load(std::memory_order_relaxed);
    for (;;) {
      if (cur > cap || cap - cur < need) return false;
      const std::size_t grant = std::min(cap - cur, std::max(need, credit_slice_));
      if (buffer_reserved_.compare_exchange_weak(cur, cur + grant, std::memory_order_relaxed)) {
        ln.credit += grant - bytes;
        return true;
      }
    }
  }

  // Under every lane's lock and mutex_: gives every lane's unused credit back.
  void reclaim_credit_locked() noexcept {
    std::size_t freed = 0;
    for (std::size_t i = 0; i < lane_count_; ++i) freed += std::exchange(lanes_[i].credit, 0);
    if (freed > 0) buffer_reserved_.fetch_sub(freed, std::memory_order_relaxed);  // relaxed: as above
  }

  // Under every lane's lock and mutex_ (stats(), audit()): exact.
  std::size_t buffer_used_locked() const noexcept {
    std::size_t credit = 0;
    for (std::size_t i = 0; i < lane_count_; ++i) credit += lanes_[i].credit;
    return buffer_reserved_.load(std::memory_order_relaxed) - credit;  // relaxed: writers excluded
  }
  std::uint64_t appended_total() const noexcept {
    std::uint64_t n = 0;
    // relaxed: exact under every lane's lock; a hint otherwise (has_pending_work), and a record
    // counted in records_out_ was appended before (through the locks), so the difference is >= 0.
    for (std::size_t i = 0; i < lane_count_; ++i) n += lanes_[i].appended.load(std::memory_order_relaxed);
    return n;
  }
  // Records in the accumulator (open, sealed, in backoff, expired but not handed out). Under mutex_.
  std::uint64_t resident_locked() const noexcept { return appended_total() - records_out_; }

  std::uint32_t dest_id_locked(const Destination& d) {
    auto it = dest_index_.find(d);
    if (it != dest_index_.end()) return it->second;
    const auto id = static_cast<std::uint32_t>(dests_.size());
    dests_.emplace_back(d);  // may throw: nothing changed
    try {
      dest_index_.emplace(d, id);
    } catch (...) {
      dests_.pop_back();
      throw;
    }
    return id;
  }

  batch_node* new_node_locked(std::uint32_t part, time_point now) {
    batch_node* b;
    if (!free_nodes_.empty()) {
      b = free_nodes_.back();
      free_nodes_.pop_back();
    } else {
      nodes_.push_back(std::make_unique<batch_node>());
      b = nodes_.back().get();
    }
    b->part = part;
    b->partition = &parts_[part].key;
    b->seq = next_seq_++;
    b->created = now;
    b->retry_at = no_retry();
    b->attempts = 0;
    b->bytes = 0;
    b->expiry_passed = false;
    b->muted = false;
    b->prev = b->next = nullptr;
    b->st = state::open;
    return b;
  }

  void notify_locked(std::uint32_t id) noexcept {
    partition_state& p = parts_[id];
    if (p.where != where_kind::none) return;  // already queued: at most once
    p.where = where_kind::notify;
    notify_.push_back(entry{id, ++p.gen});
    need_wake_ = true;
  }

  // The one place that decides where a partition belongs after any change to it.
  void settle_locked(std::uint32_t id, time_point now) {
    partition_state& p = parts_[id];
    if (p.head == nullptr) {
      if (p.in_heap) {
        backoff_heap_.erase(backoff_heap_.find(id));
        p.in_heap = false;
      }
      return;
    }
    const time_point r = p.head->retry_at;
    if (r != no_retry() && r > now) {
      if (p.in_heap) {
        const auto h = backoff_heap_.find(id);
        if (backoff_heap_.deadline(h) != r) backoff_heap_.update(h, r);
      } else {
        backoff_heap_.reserve_one();
        const auto where = backoff_heap_.locate(id);
        backoff_heap_.insert(where, id, static_cast<unsigned char>(0), r);
        p.in_heap = true;
      }
      if (backoff_heap_.top_deadline() == r) need_wake_ = true;  // a waiting sender must re-arm
      return;
    }
    if (p.in_heap) {
      backoff_heap_.erase(backoff_heap_.find(id));
      p.in_heap = false;
    }
    if (p.mutes == 0) notify_locked(id);
  }

  // Strong guarantee: if an allocation throws, the partition is as it was.
  // settle_locked() that cannot fail: if the backoff heap cannot grow, the partition is queued for
  // the sender instead, whose next ready() settles it again.
  void settle_or_notify_locked(std::uint32_t id, time_point now) noexcept {
    try {
      settle_locked(id, now);
    } catch (...) {
      notify_locked(id);
    }
  }

  void to_destination_locked(std::uint32_t id, const Destination& d) {
    const std::uint32_t did = dest_id_locked(d);
    partition_state& p = parts_[id];
    dest_state& ds = dests_[did];
    if (!ds.active && active_.size() == active_.capacity()) active_.reserve(std::max<std::size_t>(8, active_.capacity() * 2));
    ds.list.push_back(entry{id, p.gen + 1});
    ++p.gen;
    p.where = where_kind::dest;
    p.dest = did;
    if (!ds.active) {
      ds.active = true;
      active_.push_back(did);  // reserved above: does not throw
    }
  }

  void deactivate_locked(std::uint32_t did) {
    dest_state& ds = dests_[did];
    if (!ds.active) return;
    ds.active = false;
    for (std::size_t i = 0; i < active_.size(); ++i) {
      if (active_[i] == did) {
        active_[i] = active_.back();
        active_.pop_back();
        break;
      }
    }
  }

  void link_tail_locked(partition_state& p, batch_node* b) noexcept {
    b->prev = p.tail;
    b->next = nullptr;
    if (p.tail != nullptr) p.tail->next = b; else p.head = b;
    p.tail = b;
  }

  // Ordered by creation: failed batches go back in front of newer ones, in their original order.
  void insert_sorted_locked(partition_state& p, batch_node* b) noexcept {
    batch_node* after = nullptr;
    batch_node* at = p.head;
    while (at != nullptr && at->seq < b->seq) {
      after = at;
      at = at->next;
    }
    b->prev = after;
    b->next = at;
    if (after != nullptr) after->next = b; else p.head = b;
    if (at != nullptr) at->prev = b; else p.tail = b;
  }

  void unlink_locked(partition_state& p, batch_node* b) noexcept {
    if (b->prev != nullptr) b->prev->next = b->next; else p.head = b->next;
    if (b->next != nullptr) b->next->prev = b->prev; else p.tail = b->prev;
    b->prev = b->next = nullptr;
  }

  // Never throws: an append calls it after its record was counted.
  void seal_locked(partition_state& p) noexcept {
    batch_node* b = std::exchange(p.open, nullptr);
    b->st = state::sealed;
    ++sealed_;
    link_tail_locked(p, b);
    if (p.head != b) return;  // behind older sealed batches: the partition is settled already
    // settle_locked() for a fresh head, which is never in backoff: no heap insert, nothing to allocate.
    if (p.in_heap) {
      backoff_heap_.erase(backoff_heap_.find(b->part));
      p.in_heap = false;
    }
    if (p.mutes == 0) notify_locked(b->part);
  }

  void seal_all_open_locked() {
    for (const timed& t : linger_fifo_) {
      batch_node* b = t.node;
      if (b->gen == t.gen && b->st == state::open) seal_locked(parts_[b->part]);
    }
    linger_fifo_.clear();
  }

  // Under mutex_ (not a lane's lock: each due open batch's lane is taken here).
  void process_timers_locked(time_point now) {
    lane_hold hold(*this);
    while (!linger_fifo_.empty() && linger_fifo_.front().deadline <= now) {
      const timed t = linger_fifo_.front();
      linger_fifo_.pop_front();
      if (t.node->gen == t.gen && t.node->st == state::open) {
        partition_state& p = parts_[t.node->part];
        hold.take(p);
        seal_locked(p);
      }
    }
    hold.release();
    while (!backoff_heap_.empty() && backoff_heap_.top_deadline() <= now) {
      const std::uint32_t id = backoff_heap_.pop_top().first.key;
      parts_[id].in_heap = false;
      settle_locked(id, now);
    }
  }

  // Drops stale entries from the fronts of the FIFOs, so the next deadline is a real one.
  void prune_locked() {
    while (!linger_fifo_.empty()) {
      const timed& t = linger_fifo_.front();
      if (t.node->gen == t.gen && t.node->st == state::open) break;
      linger_fifo_.pop_front();
    }
    while (!expiry_fifo_.empty() && !expiry_live(expiry_fifo_.front())) expiry_fifo_.pop_front();
  }

  static bool expiry_live(const timed& t) noexcept {
    return t.node->gen == t.gen &&
           (t.node->st == state::open || t.node->st == state::sealed || t.node->st == state::in_flight);
  }

  // Moves every batch past its delivery deadline onto expired_ (in-flight ones are only marked:
  // they expire when reenqueued). O(entries whose deadline passed). Under mutex_ (not a lane's
  // lock: an open batch's lane is taken here).
  void advance_expiry_locked(time_point now) {
    if (!options_.delivery_timeout) return;
    lane_hold hold(*this);
    while (!expiry_fifo_.empty() && expiry_fifo_.front().deadline <= now) {
      // What can allocate first: on a throw this entry is still queued and nothing changed.
      if (expired_.size() == expired_.capacity()) expired_.reserve(std::max<std::size_t>(16, expired_.capacity() * 2));
      backoff_heap_.reserve_one();  // for settle_locked() below
      const timed e = expiry_fifo_.front();
      expiry_fifo_.pop_front();
      if (!expiry_live(e)) continue;
      batch_node* b = e.node;
      if (b->st == state::in_flight) {
        b->expiry_passed = true;
        continue;
      }
      partition_state& p = parts_[b->part];
      if (b->st == state::open) {
        hold.take(p);  // no append may be adding to it
        p.open = nullptr;
        ++sealed_;
      } else {
        unlink_locked(p, b);
      }
      b->st = state::expiring;
      expired_.push_back(b);
      settle_locked(b->part, now);
    }
  }

  // Earliest time something becomes due without anyone calling in.
  std::optional<time_point> next_timer_locked() {
    prune_locked();
    std::optional<time_point> t;
    auto consider = [&](time_point x) {
      if (!t || x < *t) t = x;
    };
    if (!linger_fifo_.empty()) consider(linger_fifo_.front().deadline);
    if (!backoff_heap_.empty()) consider(backoff_heap_.top_deadline());
    if (options_.delivery_timeout && !expiry_fifo_.empty()) consider(expiry_fifo_.front().deadline);
    return t;
  }

  bool events_locked(time_point now) {
    if (kick_ || recheck_unknown_ || !notify_.empty() || !expired_.empty()) return true;
    const auto t = next_timer_locked();
    return t && *t <= now;
  }

  ready_status wait_impl(const time_point* deadline, const std::stop_token* stop) {
    struct waker {
      detail::event_count* ec;
      void operator()() const noexcept { ec->notify_all(); }
    };
    std::optional<std::stop_callback<waker>> on_stop;
    if (stop != nullptr && stop->stop_possible()) on_stop.emplace(*stop, waker{&sender_ec_});
    for (;;) {
      const auto key = sender_ec_.prepare_wait();
      std::optional<time_point> wake_at;
      {
        std::lock_guard lock(mutex_);
        const time_point now = clock_.now();
        if (events_locked(now)) {
          sender_ec_.cancel_wait();
          return ready_status::ready;
        }
        if (closed_ && resident_locked() == 0) {  // closed: no lane appends any more
          sender_ec_.cancel_wait();
          return ready_status::closed;
        }
        if (stop != nullptr && stop->stop_requested()) {
          sender_ec_.cancel_wait();
          return ready_status::cancelled;
        }
        if (deadline != nullptr && now >= *deadline) {
          sender_ec_.cancel_wait();
          return ready_status::timeout;
        }
        wake_at = next_timer_locked();
        if (deadline != nullptr && (!wake_at || *deadline < *wake_at)) wake_at = *deadline;
      }
      if (wake_at) {
        (void)clock_.wait_until(sender_ec_, key, *wake_at);
      } else {
        clock_.wait(sender_ec_, key);
      }
    }
  }

  // The record is moved from only when ok is returned.
  append_status append_impl(const Partition& partition, Record& record, std::size_t bytes, bool wait,
                            const time_point* deadline, const std::stop_token* stop) {
    if (bytes > options_.max_request_bytes || bytes > options_.buffer_bytes) {
      std::lock_guard lock(mutex_);  // closed wins, as for every other record
      return closed_ ? append_status::closed : append_status::too_large;
    }
    const std::uint32_t h = mix(partition);  // may throw (the caller's hash): nothing changed
    lane& ln = lane_for(h);
    {
      // The common case: the lane alone.
      std::lock_guard lane_guard(ln.mutex);
      if (closed_) return append_status::closed;
      if (reserve_locked(ln, bytes)) {
        bool appended = false;
        try {
          appended = append_to_open_locked(ln, h, partition, record, bytes);
        } catch (...) {
          ln.credit += bytes;  // nothing was counted: the reservation goes back
          throw;
        }
        if (appended) return append_status::ok;
        ln.credit += bytes;  // re-reserved below, under both locks
      }
    }
    // A batch opens or seals (or the partition is new): mutex_, then the lane.
    std::unique_lock lock(mutex_);
    {
      std::unique_lock lane_guard(ln.mutex);
      if (closed_) return append_status::closed;
      if (reserve_locked(ln, bytes)) {
        try {
          append_locked(ln, h, partition, record, bytes);
        } catch (...) {
          ln.credit += bytes;
          throw;
        }
        const bool wake = std::exchange(need_wake_, false);
        lane_guard.unlock();
        lock.unlock();
        if (wake) sender_ec_.notify_all();
        return append_status::ok;
      }
    }
    // Slow path (mutex_ held): appenders wait, or this lane's credit and the shared pool are
    // exhausted. The first waiter locks every lane, takes their unused credit back and checks the
    // cap exactly; while anyone waits no lane takes credit, so later waiters need only mutex_ (and
    // their own lane to append).
    if (waiting_head_ == nullptr) {
      lanes_lock lanes(*this);
      reclaim_credit_locked();
      if (take_exact_locked(bytes)) {
        append_reserved_locked(ln, h, partition, record, bytes);
        const bool wake = std::exchange(need_wake_, false);
        lanes.unlock();
        lock.unlock();
        if (wake) sender_ec_.notify_all();
        return append_status::ok;
      }
      if (!wait) return append_status::full;
      // The buffer is exhausted: waiting out the linger of open batches would only keep memory
      // tied up, so everything open is sendable now, and batches opened while appenders wait are
      // due at once (Kafka's RecordAccumulator treats an exhausted buffer the same way).
      seal_all_open_locked();
      kick_ = true;
      need_wake_ = true;
      // 0 -> 1 under every lane's lock: from now on no lane takes credit (see reserve_locked).
      waiting_count_.store(1, std::memory_order_relaxed);  // relaxed: the lane locks order it
    } else {
      if (!wait) return append_status::full;  // no barging past the waiters
      waiting_count_.fetch_add(1, std::memory_order_relaxed);  // relaxed: stays > 0, as lanes read it
    }
    struct waker {
      detail::event_count* ec;
      void operator()() const noexcept { ec->notify_all(); }
    };
    appender self;
    if (waiting_tail_ != nullptr) waiting_tail_->next = &self; else waiting_head_ = &self;
    waiting_tail_ = &self;
    auto leave = [&]() noexcept {
      // Unlink self (FIFO list; O(waiters) in the rare timeout/cancel case).
      appender* prev = nullptr;
      for (appender* a = waiting_head_; a != nullptr; prev = a, a = a->next) {
        if (a == &self) {
          if (prev != nullptr) prev->next = a->next; else waiting_head_ = a->next;
          if (waiting_tail_ == a) waiting_tail_ = prev;
          break;
        }
      }
      // relaxed: a lane that still reads the old count only takes the slow path once more.
      waiting_count_.fetch_sub(1, std::memory_order_relaxed);
    };
    const bool wake_sender = std::exchange(need_wake_, false);
    lock.unlock();
    if (wake_sender) sender_ec_.notify_all();
    std::optional<std::stop_callback<waker>> on_stop;
    if (stop != nullptr && stop->stop_possible()) on_stop.emplace(*stop, waker{&space_ec_});
    for (;;) {
      const auto key = space_ec_.prepare_wait();
      lock.lock();
      append_status result = append_status::ok;
      bool done = true;
      if (closed_) {
        result = append_status::closed;
      } else if (waiting_head_ == &self && take_exact_locked(bytes)) {
        try {
          std::lock_guard lane_guard(ln.mutex);
          append_reserved_locked(ln, h, partition, record, bytes);
        } catch (...) {
          leave();
          lock.unlock();
          space_ec_.cancel_wait();
          space_ec_.notify_all();  // the next waiter re-checks
          throw;
        }
      } else if (stop != nullptr && stop->stop_requested()) {
        result = append_status::cancelled;
      } else if (deadline != nullptr && clock_.now() >= *deadline) {
        result = append_status::timeout;
      } else {
        done = false;
      }
      if (done) {
        const bool was_head = waiting_head_ == &self;
        leave();
        const bool next_waits = was_head && waiting_head_ != nullptr;
        const bool wake = std::exchange(need_wake_, false);
        lock.unlock();
        space_ec_.cancel_wait();
        if (next_waits) space_ec_.notify_all();  // the new head re-checks the space
        if (wake) sender_ec_.notify_all();
        return result;
      }
      lock.unlock();
      if (deadline != nullptr) {
        (void)clock_.wait_until(space_ec_, key, *deadline);
      } else {
        clock_.wait(space_ec_, key);
      }
    }
  }

  // Under mutex_, with no lane holding credit (every lane locked after reclaim_credit_locked(), or
  // appenders waiting): takes exactly `bytes` if they fit.
  bool take_exact_locked(std::size_t bytes) noexcept {
    const std::size_t cur = buffer_reserved_.load(std::memory_order_relaxed);  // relaxed: writers excluded
    if (cur > options_.buffer_bytes || options_.buffer_bytes - cur < bytes) return false;
    buffer_reserved_.fetch_add(bytes, std::memory_order_relaxed);  // relaxed: as above
    return true;
  }
  // Appends with `bytes` already taken by take_exact_locked(); gives them back if it throws.
  void append_reserved_locked(lane& ln, std::uint32_t h, const Partition& partition, Record& record, std::size_t bytes) {
    try {
      append_locked(ln, h, partition, record, bytes);
    } catch (...) {
      buffer_reserved_.fetch_sub(bytes, std::memory_order_relaxed);  // relaxed: as above
      throw;
    }
  }

  // The common case, under ln.mutex alone: the partition exists and its open batch takes the
  // record without sealing. False (nothing done) when mutex_ is needed: a new partition, no open
  // batch, or a seal before or after.
  bool append_to_open_locked(lane& ln, std::uint32_t h, const Partition& partition, Record& record,
                             std::size_t bytes) {
    const index_slot* s = find_slot_locked(ln, h, partition);
    if (s == nullptr) return false;
    batch_node* b = s->part->open;
    if (b == nullptr || b->bytes + bytes >= options_.batch_bytes || b->records.size() + 1 >= options_.batch_records) {
      return false;
    }
    b->records.push_back(std::move(record));  // may throw (allocation): nothing counted yet
    b->bytes += bytes;
    count_appended(ln);
    return true;
  }

  void count_appended(lane& ln) noexcept {
    // relaxed: the lane's only writer holds its lock; readers see it through the locks (or as a hint).
    ln.appended.store(ln.appended.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  }

  // Under ln.mutex and mutex_, with the buffer memory reserved.
  void append_locked(lane& ln, std::uint32_t h, const Partition& partition, Record& record, std::size_t bytes) {
    const std::uint32_t id = part_id_locked(ln, h, partition);
    partition_state& p = parts_[id];
    if (bytes > options_.batch_bytes) {
      // A record larger than a batch gets a batch of its own, sealed at once (behind the open one,
      // which is sealed first so order is kept).
      if (p.open != nullptr) seal_locked(p);
      const time_point now = clock_.now();
      open_batch_locked(id, p, now);
      push_record_locked(ln, p, record, bytes);
      seal_locked(p);
      return;
    }
    if (p.open != nullptr && p.open->bytes + bytes > options_.batch_bytes) seal_locked(p);
    if (p.open == nullptr) open_batch_locked(id, p, clock_.now());
    push_record_locked(ln, p, record, bytes);
    if (p.open->bytes >= options_.batch_bytes || p.open->records.size() >= options_.batch_records) seal_locked(p);
  }

  void open_batch_locked(std::uint32_t id, partition_state& p, time_point now) {
    // Reserve FIFO room first so nothing below can fail halfway.
    batch_node* b = new_node_locked(id, now);
    try {
      if (flushing_ > 0 || waiting_head_ != nullptr) {
        // Due at once. At the front: every entry behind it is either due already or due later,
        // so "the front is due" still means "something is due" (what the waiters rely on).
        linger_fifo_.push_front(timed{b, b->gen, now});
        need_wake_ = true;
      } else {
        linger_fifo_.push_back(timed{b, b->gen, detail::saturating_add(now, options_.linger)});
      }
      if (options_.delivery_timeout) {
        try {
          expiry_fifo_.push_back(timed{b, b->gen, expiry_deadline(b)});
        } catch (...) {
          if (flushing_ > 0 || waiting_head_ != nullptr) linger_fifo_.pop_front(); else linger_fifo_.pop_back();
          throw;
        }
      }
    } catch (...) {
      b->st = state::free;
      free_nodes_.push_back(b);
      throw;
    }
    if (linger_fifo_.size() == 1) need_wake_ = true;  // a waiting sender must arm the linger deadline
    if (options_.delivery_timeout && expiry_fifo_.size() == 1) need_wake_ = true;
    p.open = b;
  }

  void push_record_locked(lane& ln, partition_state& p, Record& record, std::size_t bytes) {
    p.open->records.push_back(std::move(record));  // may throw (allocation): nothing counted yet
    p.open->bytes += bytes;
    count_appended(ln);
  }

  // Precondition: the caller reserved room in `out` (review of the lanes: a push_back that threw
  // destroyed the new handle, whose destructor re-took the lock this thread holds).
  void hand_out_locked(batch_node* b, std::vector<batch_handle>& out, std::uint64_t& counter) noexcept {
    b->st = state::settled;
    records_out_ += b->records.size();
    counter += b->records.size();
    buffer_reserved_.fetch_sub(b->bytes, std::memory_order_relaxed);  // relaxed: see buffer_reserved_
    out.push_back(batch_handle(this, b));
  }

  void settle_handle(batch_handle& h, outcome o) noexcept {
    batch_node* n = std::exchange(h.node_, nullptr);
    h.acc_ = nullptr;
    if (n != nullptr) release(n, o);
  }

  // Returns a handle's node to the pool, counting its records if it was in flight.
  void release(batch_node* n, outcome o) noexcept {
    bool wake_space = false;
    bool wake_sender = false;
    {
      std::lock_guard lock(mutex_);
      wake_space = release_locked(n, o);
      wake_sender = std::exchange(need_wake_, false);
    }
    if (wake_space) space_ec_.notify_all();
    if (wake_sender) sender_ec_.notify_all();
  }

  // Returns whether blocked appenders should look at the buffer again.
  bool release_locked(batch_node* n, outcome o) noexcept {
    const bool wake_space = n->st == state::in_flight && account_in_flight_locked(n, o);
    n->records.clear();
    n->st = state::free;
    ++n->gen;
    try {
      free_nodes_.push_back(n);
    } catch (...) {
      // keep the node allocated but unused; it is still owned by nodes_
    }
    return wake_space;
  }

  // Counts an in-flight batch's records as settled (delivered or failed), frees its buffer memory
  // and its mute. Returns whether blocked appenders should look at the buffer again.
  bool account_in_flight_locked(batch_node* n, outcome o) noexcept {
    bool wake_space = false;
    {
      const auto k = n->records.size();
      in_flight_records_ -= k;
      (o == outcome::delivered ? delivered_ : failed_) += k;
      buffer_reserved_.fetch_sub(n->bytes, std::memory_order_relaxed);  // relaxed: see buffer_reserved_
      wake_space = waiting_head_ != nullptr;
      if (n->muted) {
        partition_state& p = parts_[n->part];
        --p.mutes;
        n->muted = false;
        if (p.mutes == 0) {
          try {
            settle_now_locked(n->part);
          } catch (...) {
            notify_locked(n->part);  // only the backoff heap can throw (allocation)
          }
        }
      }
    }
    return wake_space;
  }

  // destination_of through a noexcept door (r3 F2): a throwing lookup reads as "unknown" (the
  // partition is reported in ready().unknown and re-checked by destinations_refreshed()), so no
  // path that already took a partition off a queue can lose it to an exception.
  std::optional<Destination> route(const Partition& key) const noexcept {
    try {
      return destination_of_(key);
    } catch (...) {
      return std::nullopt;
    }
  }

  // settle_locked() reading the clock only when the head batch is in backoff (the common unmute
  // and seal paths need no time).
  void settle_now_locked(std::uint32_t id) {
    const partition_state& p = parts_[id];
    const bool in_backoff = p.head != nullptr && p.head->retry_at != no_retry();
    settle_locked(id, in_backoff ? clock_.now() : time_point{});
  }

  void unmute(std::uint32_t id) noexcept {
    bool wake = false;
    {
      std::lock_guard lock(mutex_);
      partition_state& p = parts_[id];
      if (--p.mutes == 0) {
        try {
          settle_now_locked(id);
        } catch (...) {
          // only the backoff heap insert can throw (allocation); queue the partition instead
          notify_locked(id);
        }
      }
      wake = std::exchange(need_wake_, false);
    }
    if (wake) sender_ec_.notify_all();
  }

  std::vector<const batch_node*> all_nodes_view() const {
    std::vector<const batch_node*> v;
    v.reserve(nodes_.size());
    for (const auto& n : nodes_) v.push_back(n.get());
    return v;
  }

  // Partition states by id: stable addresses (batch nodes point at their keys) and inline
  // indexing (std::deque's operator[] was an out-of-line call on every append).
  template <class T>
  class stable_vector {
   public:
    T& operator[](std::size_t i) noexcept { return *items_[i]; }
    const T& operator[](std::size_t i) const noexcept { return *items_[i]; }
    [[nodiscard]] std::size_t size() const noexcept { return items_.size(); }
    template <class... Args>
    void emplace_back(Args&&... args) {  // strong guarantee
      auto item = std::make_unique<T>(std::forward<Args>(args)...);
      items_.push_back(std::move(item));
    }

   private:
    std::vector<std::unique_ptr<T>> items_;
  };

  const ready_accumulator_options options_;
  const destination_lookup destination_of_;
  Clock clock_;
  Hash hash_;
  KeyEqual eq_;
  const std::size_t lane_count_ = lane_count_for_machine();
  const unsigned lane_shift_ = 32u - static_cast<unsigned>(std::countr_zero(lane_count_));
  const std::unique_ptr<lane[]> lanes_ = std::make_unique<lane[]>(lane_count_);
  // Slice of buffer memory a lane takes at a time: at most 64 KiB, and all lanes' slices together
  // at most an eighth of the buffer.
  const std::size_t credit_slice_ = std::clamp<std::size_t>(options_.buffer_bytes / (8 * lane_count_), 1, 64 * 1024);
  // Shared by lanes (credit) and settling senders: see reserve_locked.
  alignas(detail::cache_line) std::atomic<std::size_t> buffer_reserved_{0};
  // The lock spins briefly before parking: senders and appenders that open or seal a batch hold it
  // for tens of nanoseconds, and a std::mutex parks at once on contention.
  alignas(detail::cache_line) mutable detail::lock_table_mutex mutex_;
  appender* waiting_head_ = nullptr;  // FIFO of appenders blocked on buffer memory
  std::uint64_t records_out_ = 0;     // appended records no longer resident (drained, handed out)
  std::uint32_t flushing_ = 0;  // begin_flush() calls not yet ended
  bool closed_ = false;         // written under every lane's lock and mutex_
  bool need_wake_ = false;  // a sender may have to look again: notify sender_ec_ after unlocking
  stable_vector<partition_state> parts_;
  std::unordered_map<Destination, std::uint32_t, DestHash, DestEqual> dest_index_;
  std::deque<dest_state> dests_;
  std::vector<std::uint32_t> active_;  // destinations whose list is non-empty
  entry_ring notify_;                  // the notification queue
  std::vector<entry> unknown_;         // partitions with sendable batches and no destination
  std::deque<timed> linger_fifo_;      // open batches by linger deadline (monotonic)
  std::deque<timed> expiry_fifo_;      // batches by delivery deadline (monotonic)
  heap_t backoff_heap_;                // partitions whose head batch is in retry backoff
  std::vector<batch_node*> expired_;   // expired, not yet handed out by expire()
  std::vector<std::unique_ptr<batch_node>> nodes_;  // the pool (bounded by peak live batches)
  std::vector<batch_node*> free_nodes_;
  appender* waiting_tail_ = nullptr;
  std::atomic<std::size_t> waiting_count_{0};  // appenders in the FIFO; changed under mutex_ (0 -> 1 under every lane's lock too)
  std::uint64_t next_seq_ = 0;
  std::uint64_t delivered_ = 0, failed_ = 0, expired_records_ = 0, taken_records_ = 0;
  std::uint64_t in_flight_records_ = 0, sealed_ = 0, retried_ = 0;
  bool kick_ = false;
  bool recheck_unknown_ = false;
  // Own lines: a sender registering in wait_ready() writes here without the lock.
  alignas(detail::cache_line) detail::event_count sender_ec_;  // senders parked in wait_ready
  alignas(detail::cache_line) detail::event_count space_ec_;   // appenders parked on buffer memory
};

}  // namespace sluice
