// sluice/detail/reconcile_core.hpp — the implementation of sluice::reconcile_pipeline (not public
// API: include <sluice/reconcile_pipeline.hpp>, which documents the guarantees). One keyed state
// machine under one lock: per-key nodes in a slab (detail/reconcile_table.hpp), ready keys in one
// intrusive FIFO per priority, scheduled ones in a deadline heap, workers that finish a run and pick
// the next in one critical section, a timer keeper among the parked workers, a watchdog thread
// for reconcile_timeout, and a monitor thread that bounds how long queued or claimed work can wait
// for a run that turned out long while a worker sleeps (see note_queued_locked, monitor_main).
// reconcile_pipeline derives from reconcile_core privately and re-exports its public members.
#pragma once

#include <algorithm>
#include <array>
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
#include "reconcile_types.hpp"
#include "reconcile_table.hpp"
#include "../key.hpp"

namespace sluice::detail {

template <class Entity, class KeyFn, clock_source Clock, class Hash, class KeyEqual>
  requires hashable_key<pipeline_key_t<KeyFn, Entity>, Hash, KeyEqual>
class reconcile_core {
  static_assert(std::is_nothrow_move_constructible_v<Entity>,
                "sluice::reconcile_pipeline: Entity must be nothrow move-constructible");

 public:
  using key_type = detail::pipeline_key_t<KeyFn, Entity>;
  using entity_type = Entity;
  using clock_type = Clock;
  using time_point = typename Clock::time_point;
  using options = reconcile_options<key_type, Entity>;
  using context = reconcile_context<key_type>;
  using reconcile_fn = std::function<reconcile_result(const Entity&, const context&)>;

  /// Starts max_parallel workers, and a watchdog thread when reconcile_timeout is set, else a
  /// monitor thread when max_parallel >= 2 (monitor_main). Bad options throw
  /// std::invalid_argument naming the field and value.
  template <class F>
  reconcile_core(options opts, F&& reconcile, Clock clock = Clock{}, KeyFn key_fn = KeyFn{},
                 Hash hash = Hash{}, KeyEqual eq = KeyEqual{})
      : opts_(std::move(opts)),
        clock_(std::move(clock)),
        key_fn_(std::move(key_fn)),
        hash_(std::move(hash)),
        eq_(std::move(eq)),
        fn_(adapt(std::forward<F>(reconcile))),
        rng_(opts_.jitter_seed != 0 ? opts_.jitter_seed : std::random_device{}()) {
    validate();
    idle_limit_ = opts_.keep_idle_keys.value_or(opts_.capacity);
    space_threshold_ = opts_.capacity - std::max<std::size_t>(1, opts_.capacity / 4);
    slab_.set_retained(opts_.capacity);
    index_.set_retained(opts_.capacity);
    heap_.set_retained(opts_.capacity);
    levels_.resize(static_cast<std::size_t>(opts_.priority_levels));
    workers_ = std::vector<worker_state>(opts_.max_parallel);
    stop_scratch_.resize(opts_.max_parallel * max_claim, std::stop_source(std::nostopstate));
    watchdog_scratch_.resize(opts_.max_parallel, std::stop_source(std::nostopstate));
    try {
      threads_.reserve(opts_.max_parallel);
      for (std::size_t w = 0; w < opts_.max_parallel; ++w) threads_.emplace_back([this, w] { worker_main(w); });
      if (opts_.reconcile_timeout) watchdog_ = std::jthread([this] { watchdog_main(); });
      if (defers_wakes_) monitor_ = std::jthread([this] { monitor_main(); });
    } catch (...) {
      {
        std::lock_guard lk(mu_);
        closed_ = stopping_ = finalizing_ = finalized_ = true;
      }
      wake_everyone();
      threads_.clear();
      throw;
    }
  }

  reconcile_core(const reconcile_core&) = delete;
  reconcile_core& operator=(const reconcile_core&) = delete;

  /// stop(), then joins the workers. Must not run on one of the pipeline's own threads.
  ~reconcile_core() {
    stop();
    threads_.clear();
    if (watchdog_.joinable()) watchdog_.join();
    if (monitor_.joinable()) monitor_.join();
  }

  // ---- intake --------------------------------------------------------------------------------
  // Every form leaves `e` untouched unless it returns ok. Thread-safe. May block (not the try_
  // forms). May allocate (a new key's state). Exceptions from KeyFn, Hash or KeyEqual propagate,
  // with nothing changed.
  // From a callback on one of this pipeline's workers, a blocking form never waits for itself
  // (review r1 F10): see would_stall_locked() and the conflict_strategy::wait case.

  [[nodiscard]] submit_status submit(Entity&& e, const submit_options& so = {}) {
    return submit_impl(e, so, std::nullopt, nullptr, false);
  }
  [[nodiscard]] submit_status submit(Entity&& e, std::stop_token stop, const submit_options& so = {}) {
    return submit_impl(e, so, std::nullopt, &stop, false);
  }
  [[nodiscard]] submit_status try_submit(Entity&& e, const submit_options& so = {}) {
    return submit_impl(e, so, std::nullopt, nullptr, true);
  }
  template <class Rep, class Period>
  [[nodiscard]] submit_status try_submit_for(Entity&& e, const std::chrono::duration<Rep, Period>& d,
                                             const submit_options& so = {}) {
    return submit_impl(e, so, detail::add_ns(clock_.now(), detail::clamp_ns(d)), nullptr, false);
  }
  [[nodiscard]] submit_status try_submit_until(Entity&& e, time_point deadline, const submit_options& so = {}) {
    return submit_impl(e, so, deadline, nullptr, false);
  }

  /// Removes `key`'s pending version (queued, scheduled or waiting; counted cancelled) and forgets
  /// its backoff. If the key is running and `stop_running`, requests its stop token, and that
  /// run's outcome is not retried or requeued (a done() still counts as succeeded). Thread-safe.
  cancel_result cancel(const key_type& key, bool stop_running = true) {
    const std::uint32_t h = detail::mix_hash(hash_(key));
    std::optional<Entity> dropped;  // destroyed after the lock is released (review r1 L6)
    std::unique_lock lk(mu_);
    const std::uint32_t id = find_locked(h, key);
    cancel_result out;
    if (id == detail::no_node) return out;
    node& n = slab_[id];
    if (n.pend != pend_none) {
      unlink_pending_locked(id, n);
      dropped.emplace(std::move(*n.entity));
      n.entity.reset();
      ++m_.cancelled;
      out.removed_pending = true;
    }
    n.failures = 0;
    std::stop_source to_stop(std::nostopstate);
    if (n.running) {
      if (stop_running) {
        n.cancel_run = true;
        to_stop = take_slot_stop_locked(workers_[n.worker].slots[n.slot]);
        out.stop_requested = true;
      }
    } else {
      free_node_locked(id, n);
    }
    const bool notify_idle = idle_waiters_ > 0;
    const bool notify_space = submit_waiters_ > 0;
    lk.unlock();
    // After unlocking (review r1 F11): request_stop() runs the user's std::stop_callbacks on this
    // thread, and they may call back into the pipeline.
    to_stop.request_stop();
    if (notify_idle) idle_ec_.notify_all();
    if (notify_space) submit_ec_.notify_all();
    return out;
  }

  // ---- shutdown ------------------------------------------------------------------------------

  /// Closes intake, requests stop on running reconciles, waits for them, then reports every
  /// pending version to on_unprocessed. Idempotent; thread-safe; from inside a callback it begins
  /// the shutdown and returns at once (the last running worker finishes it).
  void stop() {
    std::unique_lock lk(mu_);
    const bool first = begin_stop_locked();
    lk.unlock();
    if (first) fire_stops(stop_scratch_);  // outside the lock: user stop_callbacks run here (r1 F11)
    wake_everyone();
    if (tl_self_ == this) return;
    lk.lock();
    while (running_ > 0 || delivering_ > 0) park_locked(lk, idle_ec_, idle_waiters_, std::nullopt);
    finalize_locked(lk);
    while (!finalized_ || delivering_ > 0) park_locked(lk, idle_ec_, idle_waiters_, std::nullopt);
  }

  /// Closes intake, runs everything accepted (including requeues and retries falling due before
  /// `deadline`), then stop()s. Returns true if nothing was left to report. From inside a callback
  /// it only closes intake and returns false.
  bool drain_until(time_point deadline) { return drain_impl(deadline, nullptr); }
  template <class Rep, class Period>
  bool drain_for(const std::chrono::duration<Rep, Period>& d) {
    return drain_until(detail::add_ns(clock_.now(), detail::clamp_ns(d)));
  }
  /// As drain_until, without a deadline (every requeue and retry is waited for, however late),
  /// until `stop` is requested; then stop()s. Returns true if nothing was left to report.
  bool drain(std::stop_token stop) { return drain_impl(std::nullopt, &stop); }

 private:
  bool drain_impl(const std::optional<time_point>& deadline, const std::stop_token* stop) {
    std::optional<std::stop_callback<waker>> on_stop;
    if (stop != nullptr && stop->stop_possible()) on_stop.emplace(*stop, waker{&idle_ec_});
    std::unique_lock lk(mu_);
    closed_ = true;
    // Submitters parked on a full intake (or on a key, conflict_strategy::wait) return `closed`
    // now, not when a pick or stop() happens to wake them (review r1 L11).
    if (submit_waiters_ > 0 || key_waiters_ > 0) submit_ec_.notify_all();
    if (tl_self_ == this) return false;
    for (;;) {
      if (stopping_ || fault_) break;
      const bool runnable_done = queued_ == 0 && running_ == 0 && waiting_ == 0 && delivering_ == 0;
      if (runnable_done && (heap_.empty() || (deadline && heap_.top().deadline > *deadline))) break;
      if (deadline && clock_.now() >= *deadline) break;
      if (stop != nullptr && stop->stop_requested()) break;
      park_locked(lk, idle_ec_, idle_waiters_, deadline, stop);
    }
    const bool complete = slab_.live() == idle_keys_ && !fault_;
    lk.unlock();
    on_stop.reset();  // before stop(): its callback must not outlive this frame's waits
    this->stop();
    return complete;
  }

 public:

  /// Blocks until the pipeline has stopped (stop(), drain() or destructor) or faulted; rethrows
  /// the fault. Thread-safe. The timed and stop_token forms return false if they gave up first.
  void wait() { (void)wait_stopped_impl(std::nullopt, nullptr); }
  [[nodiscard]] bool wait(std::stop_token stop) { return wait_stopped_impl(std::nullopt, &stop); }
  template <class Rep, class Period>
  [[nodiscard]] bool wait_for(const std::chrono::duration<Rep, Period>& d) {
    return wait_stopped_impl(detail::add_ns(clock_.now(), detail::clamp_ns(d)), nullptr);
  }
  [[nodiscard]] bool wait_until(time_point deadline) { return wait_stopped_impl(deadline, nullptr); }

  /// Blocks until no key has any state (nothing queued, scheduled, waiting or running), or the
  /// pipeline stopped or faulted (rethrown). Thread-safe. The timed and stop_token forms return
  /// false if they gave up first.
  void wait_idle() { (void)wait_idle_impl(std::nullopt, nullptr); }
  [[nodiscard]] bool wait_idle(std::stop_token stop) { return wait_idle_impl(std::nullopt, &stop); }
  template <class Rep, class Period>
  [[nodiscard]] bool wait_idle_for(const std::chrono::duration<Rep, Period>& d) {
    return wait_idle_impl(detail::add_ns(clock_.now(), detail::clamp_ns(d)), nullptr);
  }
  [[nodiscard]] bool wait_idle_until(time_point deadline) { return wait_idle_impl(deadline, nullptr); }

  // ---- observation ---------------------------------------------------------------------------

  /// One consistent snapshot. Thread-safe. Copies two 2 KiB histograms.
  [[nodiscard]] reconcile_metrics metrics() const {
    std::unique_lock lk(mu_);
    reconcile_metrics m = m_;
    for (const worker_state& ws : workers_) {
      m.queue_latency.merge(ws.queue_latency);
      m.reconcile_duration.merge(ws.reconcile_duration);
    }
    m.queued = queued_;
    m.scheduled = heap_.size();
    m.waiting = waiting_;
    m.in_flight = running_;
    m.keys = slab_.live() - idle_keys_;
    m.idle_keys = idle_keys_;
    m.max_parallel = opts_.max_parallel;
    m.faulted = static_cast<bool>(fault_);
    m.stopped = finalized_;
    std::int64_t now = 0;
    try {
      now = stamp_now();
    } catch (...) {  // a broken clock (the pipeline is faulted): ages read as zero
      return m;
    }
    for (const level& l : levels_) {
      if (l.head == detail::no_node) continue;
      // The head is the oldest, except for versions queued behind younger ones (review r1 L5).
      const std::int64_t oldest = l.out_of_order > 0 ? std::min(slab_[l.head].ready_at, l.oldest_out_of_order)
                                                     : slab_[l.head].ready_at;
      m.oldest_queued_age = std::max(m.oldest_queued_age, since(oldest, now));
    }
    for (const worker_state& ws : workers_) {
      // relaxed: a diagnostic; the worker writes it without the lock at each run's start.
      const std::int64_t started = ws.current_start.load(std::memory_order_relaxed);
      if (started != no_run) m.longest_running = std::max(m.longest_running, since(started, now));
    }
    return m;
  }

  /// Sizes of the internal tables (for tests of the "returns to empty" guarantee).
  struct table_sizes {
    std::size_t keys;       ///< keys with any state (idle ones not counted)
    std::size_t idle_keys;  ///< states kept for keys whose last run succeeded (see keep_idle_keys)
    std::size_t slab_capacity, index_entries, index_buckets, heap_entries, heap_capacity, queued, waiting;
    std::uint64_t relocated;  ///< idle key states moved down so that a sparse slab chunk could be freed
  };
  [[nodiscard]] table_sizes internal_sizes() const {
    std::lock_guard lk(mu_);
    return table_sizes{slab_.live() - idle_keys_, idle_keys_, slab_.capacity(), index_.size(), index_.bucket_count(), heap_.size(),
                       heap_.capacity(), queued_, waiting_, relocated_};
  }

  [[nodiscard]] std::size_t max_parallel() const noexcept { return opts_.max_parallel; }
  [[nodiscard]] std::size_t capacity() const noexcept { return opts_.capacity; }
  [[nodiscard]] bool is_closed() const {
    std::lock_guard lk(mu_);
    return closed_;
  }

 private:
  enum : std::uint8_t { pend_none, pend_queued, pend_scheduled, pend_waiting };

  struct node {
    std::optional<key_type> key;
    std::optional<Entity> entity;  // the pending version (the running one is on its worker's stack)
    std::int64_t ready_at = 0;     // stamp (see stamp_now) when it became ready
    time_point deadline{};
    std::uint32_t hash = 0;
    std::uint32_t next = detail::no_node;  // FIFO link, or free list
    std::uint32_t prev = detail::no_node;
    std::uint32_t heap_pos = detail::no_node;
    std::uint32_t failures = 0;
    std::uint32_t worker = 0;
    std::uint32_t seq = 0;  // while queued: its place in its level's FIFO (queue_seq_ when queued)
    std::uint8_t pend = pend_none;
    std::uint8_t priority = 0;
    std::uint8_t slot = 0;  // while running: its worker's claim slot
    reconcile_reason reason = reconcile_reason::updated;
    bool running = false;
    bool cancel_run = false;
    bool idle = false;  // kept after a successful run with nothing pending (see keep_idle_locked)
    bool out_of_order = false;  // queued behind a version that became ready after it (see push_queued_locked)
  };

  struct level {
    std::uint32_t head = detail::no_node;
    std::uint32_t tail = detail::no_node;
    std::size_t size = 0;
    std::uint32_t skipped = 0;
    std::uint32_t out_of_order = 0;        // queued nodes with node::out_of_order
    std::int64_t oldest_out_of_order = 0;  // the oldest ready_at among them (or older), while any
  };

  // The keys a worker claimed in one critical section (see claim_limit_locked), each with its own
  // stop source: cancel(key) stops exactly its run.
  static constexpr std::size_t max_claim = 16;
  static constexpr double claim_budget_ns = 20000;  // about one futex park-and-wake on these VMs
  static constexpr std::chrono::microseconds monitor_tick{500};  // see monitor_main
  enum : std::uint8_t { run_going, run_timed_out, run_finished };
  enum : std::uint8_t { turn_waiting, turn_started, turn_revoked };
  static constexpr std::int64_t no_run = std::numeric_limits<std::int64_t>::min();

  struct run_slot {
    std::uint32_t node = detail::no_node;
    const key_type* key = nullptr;  // the node's key: read by the run without the lock
    std::optional<Entity> entity;  // the claimed version; runs from here
    std::optional<reconcile_result> result;
    std::optional<dead_letter<key_type, Entity>> dead;
    std::stop_source stop;
    std::stop_token token = stop.get_token();  // handed to the run by reference: no refcount traffic
    time_point end{};
    std::int64_t ready_at = 0;
    std::int64_t start_stamp = 0;
    std::int64_t end_stamp = 0;
    std::uint32_t attempt = 1;
    std::uint32_t seq = 0;  // the node's place in its level's FIFO when claimed
    int priority = 0;
    reconcile_reason reason = reconcile_reason::updated;
    bool stop_used = false;
    bool timed_out = false;  // the run overran reconcile_timeout (decided by `ending`, below)
    // Who ended the run first, the watchdog (timed out: the run's stop is requested) or the worker
    // (finished in time): one exchange each, so both agree (slot 0 only: timed pipelines claim one
    // key). The worker then reports a timed-out run to on_failure whatever it returned (r1 L4).
    std::atomic<std::uint8_t> ending{run_going};
    bool skipped = false;    // its stop came before its run: not run
    // Slots behind the first in a claim: whether the worker started it (turn_started) or the
    // monitor took it back while an earlier run of the claim would not end (turn_revoked; see
    // revoke_unstarted_locked). One exchange each, so exactly one of them owns the slot.
    std::atomic<std::uint8_t> turn{turn_started};
  };

  // One cache line or more per worker: a worker's run bookkeeping and its histograms are written
  // by that worker alone, so they do not bounce between the workers' cores.
  struct alignas(64) worker_state {
    // Each worker records its runs into its own histograms; metrics() merges them. Shared ones
    // moved four cache lines between cores with every reconcile (a sixth of a worker's time).
    reconcile_histogram queue_latency;
    reconcile_histogram reconcile_duration;
    std::array<run_slot, max_claim> slots;
    std::size_t claimed = 0;  // slots in use, under the lock
    double peak_run_ns = claim_budget_ns;  // recent longest run, decaying (1/64 per run); the worker's own
    bool short_claim = false;  // under the lock: its claim counts in short_claims_
    std::uint64_t claim_seq = 0;  // under the lock: m_.claims when its current claim was made
    // Runs started, written by the worker alone at each start; the monitor reads it to tell a
    // worker stuck in one run from one making progress.
    std::atomic<std::uint32_t> runs_started{0};
    std::atomic<std::int64_t> current_start{no_run};  // stamp of the run in progress, or no_run
    time_point started{};  // on the Clock, when the claim was made; read only when reconcile_timeout is set
    time_point parked_until = time_point::max();  // while parked: the deadline it will wake at
  };

  template <class F>
  static reconcile_fn adapt(F&& f) {
    using G = std::decay_t<F>;
    if constexpr (std::is_invocable_r_v<reconcile_result, G&, const Entity&, const context&>) {
      return reconcile_fn(std::forward<F>(f));
    } else {
      static_assert(std::is_invocable_r_v<reconcile_result, G&, const Entity&, std::stop_token>,
                    "sluice::reconcile_pipeline: the reconcile callback must be callable as "
                    "(const Entity&, const reconcile_context<Key>&) or (const Entity&, std::stop_token) "
                    "and return sluice::reconcile_result");
      return reconcile_fn([g = G(std::forward<F>(f))](const Entity& e, const context& c) mutable {
        return g(e, c.stop);
      });
    }
  }

  // Histograms and ages are measured with cheap stamps: the CPU's time-stamp counter when the Clock
  // is sluice::steady_clock on x86 (a fraction of the cost of clock_gettime on a VM, and reconciles
  // are counted in the millions per second), else the Clock itself in nanoseconds. Deadlines always
  // use the Clock.
  static constexpr bool use_tsc = SLUICE_DETAIL_PIPELINE_TSC && std::is_same_v<Clock, steady_clock>;
  std::int64_t stamp_now() const {
#if SLUICE_DETAIL_PIPELINE_TSC
    if constexpr (use_tsc) return static_cast<std::int64_t>(__rdtsc());
#endif
    return std::chrono::duration_cast<std::chrono::nanoseconds>(clock_.now().time_since_epoch()).count();
  }
  std::chrono::nanoseconds since(std::int64_t then, std::int64_t now) const noexcept {
    if (now <= then) return std::chrono::nanoseconds(0);
    if constexpr (use_tsc) {
      return std::chrono::nanoseconds(static_cast<std::int64_t>(static_cast<double>(now - then) * ns_per_tick_));
    }
    return std::chrono::nanoseconds(now - then);
  }

  void validate() const {
    const std::string who = "sluice::reconcile_pipeline: ";
    if (opts_.max_parallel < 1 || opts_.max_parallel > 65535) {
      throw std::invalid_argument(who + "max_parallel must be in [1, 65535], got " + std::to_string(opts_.max_parallel));
    }
    // Key states are numbered with 32 bits, and capacity sizes the tables kept when idle (r1 L7).
    if (const std::size_t capacity = opts_.capacity; capacity == 0 || capacity > (std::size_t{1} << 30)) {
      throw std::invalid_argument(who + "capacity must be in [1, 1073741824], got " + std::to_string(capacity));
    }
    if (opts_.keep_idle_keys && *opts_.keep_idle_keys > (std::size_t{1} << 30)) {
      throw std::invalid_argument(who + "keep_idle_keys must be in [0, 1073741824], got " +
                                  std::to_string(*opts_.keep_idle_keys));
    }
    if (opts_.priority_levels < 1 || opts_.priority_levels > 255) {
      throw std::invalid_argument(who + "priority_levels must be in [1, 255], got " + std::to_string(opts_.priority_levels));
    }
    if (opts_.starvation_limit < 1) throw std::invalid_argument(who + "starvation_limit must be >= 1, got 0");
    if (opts_.conflict_delay < std::chrono::nanoseconds::zero() ||
        (opts_.on_conflict == conflict_strategy::requeue_after && opts_.conflict_delay == std::chrono::nanoseconds::zero())) {
      throw std::invalid_argument(who + "conflict_delay must be > 0, got " + std::to_string(opts_.conflict_delay.count()) + "ns");
    }
    if (opts_.reconcile_timeout && *opts_.reconcile_timeout <= std::chrono::nanoseconds::zero()) {
      throw std::invalid_argument(who + "reconcile_timeout must be > 0, got " +
                                  std::to_string(opts_.reconcile_timeout->count()) + "ns");
    }
    const backoff_options& b = opts_.backoff;
    if (b.base <= std::chrono::nanoseconds::zero()) {
      throw std::invalid_argument(who + "backoff.base must be > 0, got " + std::to_string(b.base.count()) + "ns");
    }
    if (b.max < b.base) {
      throw std::invalid_argument(who + "backoff.max must be >= backoff.base, got " + std::to_string(b.max.count()) + "ns");
    }
    if (!(b.multiplier >= 1.0) || !std::isfinite(b.multiplier)) {
      throw std::invalid_argument(who + "backoff.multiplier must be finite and >= 1, got " + std::to_string(b.multiplier));
    }
  }

  // ---- state helpers (all under mu_) ---------------------------------------------------------

  std::uint32_t find_locked(std::uint32_t h, const key_type& key) const {
    return index_.find(h, [&](std::uint32_t id) { return static_cast<bool>(eq_(*slab_[id].key, key)); });
  }

  void push_queued_locked(std::uint32_t id, node& n) noexcept {
    level& l = levels_[n.priority];
    n.seq = ++queue_seq_;
    n.pend = pend_queued;
    n.next = detail::no_node;
    n.prev = l.tail;
    // A version that became ready before the tail did (moved up a priority, or put back at
    // stop) is out of order: metrics() must not take the head's age as the oldest (r1 L5).
    n.out_of_order = false;
    if (l.tail != detail::no_node && n.ready_at < slab_[l.tail].ready_at) mark_out_of_order_locked(l, n);
    if (l.tail != detail::no_node) slab_[l.tail].next = id; else l.head = id;
    l.tail = id;
    ++l.size;
    ++queued_;
  }

  // A claimed key taken back (revoke_unstarted_locked) returns to its place in its level: before
  // the first node queued after it (n.seq is the one it was queued with). Only other keys taken
  // back can be queued before it (it was at the front when claimed), so the walk is short.
  // Out-of-order marks (see push_queued_locked) for it and for the node it now precedes.
  void insert_queued_in_order_locked(std::uint32_t id, node& n) noexcept {
    level& l = levels_[n.priority];
    std::uint32_t before = detail::no_node;
    std::uint32_t after = l.head;
    // Sequence numbers wrap: compare by signed distance (fewer than 2^31 queued apart).
    while (after != detail::no_node && static_cast<std::int32_t>(slab_[after].seq - n.seq) < 0) {
      before = after;
      after = slab_[after].next;
    }
    n.pend = pend_queued;
    n.prev = before;
    n.next = after;
    if (before != detail::no_node) slab_[before].next = id; else l.head = id;
    if (after != detail::no_node) slab_[after].prev = id; else l.tail = id;
    ++l.size;
    ++queued_;
    n.out_of_order = false;
    if (before != detail::no_node && n.ready_at < slab_[before].ready_at) mark_out_of_order_locked(l, n);
    if (after != detail::no_node && slab_[after].ready_at < n.ready_at) mark_out_of_order_locked(l, slab_[after]);
  }

  // A queued node behind one that became ready after it: counted, with the level's oldest such
  // stamp, so metrics() does not take the head's age as the oldest (r1 L5).
  void mark_out_of_order_locked(level& l, node& x) noexcept {
    if (x.out_of_order) return;
    x.out_of_order = true;
    l.oldest_out_of_order = l.out_of_order++ == 0 ? x.ready_at : std::min(l.oldest_out_of_order, x.ready_at);
  }

  void unlink_queued_locked(std::uint32_t id, node& n) noexcept {
    level& l = levels_[n.priority];
    if (n.prev != detail::no_node) slab_[n.prev].next = n.next; else l.head = n.next;
    if (n.next != detail::no_node) slab_[n.next].prev = n.prev; else l.tail = n.prev;
    n.prev = n.next = detail::no_node;
    if (n.out_of_order) {
      n.out_of_order = false;
      --l.out_of_order;  // the oldest stays as it was (an over-estimate) until none is left
    }
    if (--l.size == 0) l.skipped = 0;
    --queued_;
    (void)id;
  }

  auto pos_fn() noexcept {
    return [this](std::uint32_t id) -> std::uint32_t& { return slab_[id].heap_pos; };
  }

  void heap_erase_locked(std::uint32_t at, auto&& pos) noexcept {
    heap_.erase_at(at, pos);
    // relaxed: a hint for workers deciding whether to read the Clock (see worker_main).
    scheduled_hint_.store(heap_.size(), std::memory_order_relaxed);
  }

  void schedule_locked(std::uint32_t id, node& n, time_point deadline, bool& wake_timer) noexcept {
    n.pend = pend_scheduled;
    n.deadline = deadline;
    heap_.push(deadline, id, pos_fn());
    scheduled_hint_.store(heap_.size(), std::memory_order_relaxed);  // relaxed: as in heap_erase_locked
    note_deadline_locked(deadline, wake_timer);
  }

  void unlink_pending_locked(std::uint32_t id, node& n) noexcept {
    switch (n.pend) {
      case pend_queued: unlink_queued_locked(id, n); break;
      case pend_scheduled: heap_erase_locked(n.heap_pos, pos_fn()); break;
      case pend_waiting: --waiting_; break;
      default: break;
    }
    n.pend = pend_none;
  }

  void free_node_locked(std::uint32_t id, node& n) noexcept {
    if (n.idle) {
      n.idle = false;
      --idle_keys_;
    }
    index_.erase(n.hash, id);
    n.key.reset();
    n.entity.reset();
    n.failures = 0;
    n.cancel_run = false;
    n.heap_pos = detail::no_node;
    slab_.release(id);
    if (slab_.live() == 0) {
      heap_.release();
    } else {
      heap_.shrink_for(slab_.live() + 1);  // every live node may be scheduled: push never allocates
      if (slab_.chunks() > slab_.retained_chunks() + 1) compact_locked();  // cheap test first: hot path
    }
  }

  // Memory returns after a burst while keys stay live (review r1 F12): when the slab is mostly
  // empty, the idle nodes of its highest used chunk move to free slots below, so the chunk empties
  // and is released. A running node cannot move (its reconcile holds a reference to the key); it
  // blocks compaction until its run ends. Each step empties a chunk, so the work is bounded by
  // the chunks given back. Not while finalize_locked walks the slab (it holds the shrink).
  void compact_locked() noexcept {
    if constexpr (std::is_nothrow_move_constructible_v<key_type>) {
      constexpr std::size_t chunk = detail::node_slab<node>::chunk_size;
      while (compact_blocker_ == detail::no_node && !slab_.held() && slab_.chunks() > 1) {
        std::size_t top = slab_.chunks() - 1;
        if (top > 0 && slab_.chunk_live(top) == 0) --top;  // the spare the slab keeps
        if (top < slab_.retained_chunks() || slab_.live() * 2 > top * chunk) return;
        const std::size_t chunks_before = slab_.chunks();
        const auto base = static_cast<std::uint32_t>(top * chunk);
        for (std::uint32_t id = base; id < base + chunk && slab_.chunk_live(top) != 0; ++id) {
          node& n = slab_[id];
          if (!n.key) continue;
          if (n.running) {
            compact_blocker_ = id;  // finish_locked resumes once this run ends
            return;
          }
          relocate_locked(id, n);
          if (slab_.chunks() <= top) break;  // the chunk is gone: stop reading it
        }
        if (slab_.chunks() == chunks_before && slab_.chunks() > top && slab_.chunk_live(top) != 0) return;
      }
    }
  }

  // Moves an idle live node to the lowest free slot (below it: compact_locked's condition) and
  // points every reference at the new id: the index, and its FIFO neighbours or heap entry.
  void relocate_locked(std::uint32_t from, node& a) noexcept {
    const std::uint32_t to = slab_.allocate();
    node& b = slab_[to];
    b.key.emplace(std::move(*a.key));
    if (a.entity) b.entity.emplace(std::move(*a.entity));
    b.ready_at = a.ready_at;
    b.deadline = a.deadline;
    b.hash = a.hash;
    b.next = a.next;
    b.prev = a.prev;
    b.heap_pos = a.heap_pos;
    b.failures = a.failures;
    b.worker = a.worker;
    b.pend = a.pend;
    b.priority = a.priority;
    b.reason = a.reason;
    b.running = false;
    b.cancel_run = a.cancel_run;
    b.idle = a.idle;
    a.idle = false;
    b.out_of_order = a.out_of_order;
    a.out_of_order = false;
    index_.replace(b.hash, from, to);
    ++relocated_;
    if (b.pend == pend_queued) {
      level& l = levels_[b.priority];
      if (b.prev != detail::no_node) slab_[b.prev].next = to; else l.head = to;
      if (b.next != detail::no_node) slab_[b.next].prev = to; else l.tail = to;
    } else if (b.pend == pend_scheduled) {
      heap_.set_id(b.heap_pos, to);
    }
    a.key.reset();
    a.entity.reset();
    a.failures = 0;
    a.cancel_run = false;
    a.pend = pend_none;
    a.heap_pos = a.prev = detail::no_node;
    slab_.release(from);
  }

  std::chrono::nanoseconds backoff_delay_locked(std::uint32_t failures) {
    const backoff_options& b = opts_.backoff;
    const double base = static_cast<double>(b.base.count());
    const double cap = static_cast<double>(b.max.count());
    const double v = base * std::pow(b.multiplier, static_cast<double>(failures == 0 ? 0 : failures - 1));
    const double d = v < cap ? v : cap;
    double out = d;
    if (b.jitter != jitter_mode::none) {
      const double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng_);
      out = b.jitter == jitter_mode::full ? d * u : d / 2 + (d / 2) * u;
    }
    // Never convert a double at or above the cap (2^63 for nanoseconds::max(), which is out of
    // int64's range: UB, and INT64_MIN on x86, i.e. an immediate retry; review r1 F7).
    if (!(out > 0)) return std::chrono::nanoseconds(0);
    if (out >= cap) return b.max;
    return std::chrono::nanoseconds(static_cast<std::int64_t>(out));
  }

  // ---- intake --------------------------------------------------------------------------------

  submit_status submit_impl(Entity& e, const submit_options& so, const std::optional<time_point>& deadline,
                            const std::stop_token* stop, bool try_only) {
    if (so.priority < 0 || so.priority >= opts_.priority_levels) {
      throw std::invalid_argument("sluice::reconcile_pipeline: priority must be in [0, " +
                                  std::to_string(opts_.priority_levels - 1) + "], got " + std::to_string(so.priority));
    }
    if (so.reason != reconcile_reason::created && so.reason != reconcile_reason::updated) {
      throw std::invalid_argument("sluice::reconcile_pipeline: a submission's reason must be created or updated");
    }
    key_type key = key_fn_(std::as_const(e));
    const std::uint32_t h = detail::mix_hash(hash_(key));
    const auto prio = static_cast<std::uint8_t>(so.priority);
    std::optional<std::stop_callback<waker>> on_stop;
    // The Clock is read only for a delayed submission (or the requeue_after strategy below).
    const bool delayed = so.delay > std::chrono::nanoseconds::zero();
    std::int64_t stamp = stamp_now();
    time_point due = delayed ? detail::add_ns(clock_.now(), so.delay) : time_point{};
    std::optional<Entity> replaced;  // destroyed after the lock is released (declared before it)
    std::unique_lock lk(mu_);
    // The key's bucket and the node a new key would get may have been last written by a worker on
    // another core (a key kept idle is only read; a freed one was written): start both misses now
    // so they overlap (+5% in the no-op benchmark before idle keys; an A/B without the node's
    // prefetch after them showed no gain, so both stay).
    index_.prefetch(h);
    slab_.prefetch_next();
    for (bool first = true;; first = false) {
      if (closed_) return submit_status::closed;
      if (!first) {  // woke up after waiting: time has moved
        stamp = stamp_now();
        if (delayed) due = detail::add_ns(clock_.now(), so.delay);
      }
      bool immediate = !delayed;
      std::uint32_t id = find_locked(h, key);
      bool wake_worker = false;
      bool wake_timer = false;
      bool deferred = false;
      if (id != detail::no_node) {
        node& n = slab_[id];
        if (n.running) {
          switch (opts_.on_conflict) {
            case conflict_strategy::discard:
              ++m_.submitted;
              ++m_.discarded;
              return submit_status::discarded;
            case conflict_strategy::wait:
              // Not from inside a callback on one of this pipeline's workers: the key may be this
              // worker's own (or one later in its claim), or its worker may be waiting back for
              // this one's key (review r1 F10b). Such a submission coalesces behind the run.
              if (!on_own_worker()) {
                if (try_only) return submit_status::busy;
                const auto w = block_locked(lk, deadline, stop, on_stop, key_waiters_);
                if (w != submit_status::ok) return w;
                continue;
              }
              break;
            case conflict_strategy::requeue_after: {
              const time_point later = detail::add_ns(clock_.now(), opts_.conflict_delay);
              due = immediate ? later : std::max(due, later);
              immediate = false;
              deferred = true;  // counted once placed (review r1 F9: the first deferral was missed)
              break;
            }
            default: break;
          }
        }
        if (n.pend == pend_none && immediate && queued_ + waiting_ >= opts_.capacity) {
          if (try_only || would_stall_locked()) return submit_status::full;
          const auto w = block_for_room_locked(lk, deadline, stop, on_stop);
          if (w != submit_status::ok) return w;
          continue;
        }
        place_locked(id, n, e, immediate, due, stamp, prio, so.reason, wake_worker, wake_timer, replaced);
      } else {
        if (immediate && queued_ + waiting_ >= opts_.capacity) {
          if (try_only || would_stall_locked()) return submit_status::full;
          const auto w = block_for_room_locked(lk, deadline, stop, on_stop);
          if (w != submit_status::ok) return w;
          continue;
        }
        slab_.reserve_one();  // these three may throw bad_alloc: nothing has changed yet
        index_.reserve_one();
        heap_.reserve(slab_.live() + 1);
        id = slab_.allocate();
        node& n = slab_[id];
        n.key.emplace(std::move(key));  // std::move: key is not used again on this path
        n.hash = h;
        index_.insert(h, id);
        place_locked(id, n, e, immediate, due, stamp, prio, so.reason, wake_worker, wake_timer, replaced);
      }
      ++m_.submitted;
      if (deferred) ++m_.conflict_requeues;
      lk.unlock();
      // One worker suffices for a new earliest deadline: it re-parks with the heap's top.
      if (wake_timer || wake_worker) work_ec_.notify_one();
      return submit_status::ok;
    }
  }

  // Puts `e` into node `n` as its pending version, merging with one already there (dedup rule).
  // `immediate`: due now; else due at `due` (on the Clock). `stamp`: now, for latency.
  // `replaced` receives the version this one replaces: the caller destroys it after unlocking
  // (an Entity's destructor is user code; review r1 L6).
  void place_locked(std::uint32_t id, node& n, Entity& e, bool immediate, time_point due, std::int64_t stamp,
                    std::uint8_t prio, reconcile_reason reason, bool& wake_worker, bool& wake_timer,
                    std::optional<Entity>& replaced) noexcept {
    if (n.pend != pend_none) {
      ++m_.coalesced;
      replaced.emplace(std::move(*n.entity));
      n.entity.reset();
      n.entity.emplace(std::move(e));
      // The reason goes with the deadline that decides when the version runs (review r1 F8): a
      // merge that keeps a scheduled retry's deadline, or meets a due retry or requeue already
      // queued, keeps that reason, so the run still counts as the retry that waited (it
      // escalates the backoff). A merge that makes it run earlier takes the submission's reason.
      const bool pending_waited = n.reason == reconcile_reason::retry_after_failure ||
                                  n.reason == reconcile_reason::requeue_requested;
      if (n.pend != pend_scheduled && !pending_waited) n.reason = reason;
      const std::uint8_t new_prio = std::max(n.priority, prio);
      if (n.pend == pend_scheduled) {
        if (immediate) {
          heap_erase_locked(n.heap_pos, pos_fn());
          n.reason = reason;
          n.priority = new_prio;
          n.ready_at = stamp;
          if (n.running) {
            n.pend = pend_waiting;
            ++waiting_;
          } else {
            push_queued_locked(id, n);
            note_queued_locked(wake_worker, short_claims_ > 0);
          }
        } else {
          n.priority = new_prio;
          if (due < n.deadline) {
            n.deadline = due;
            n.reason = reason;
            heap_.update(n.heap_pos, due, pos_fn());
            note_deadline_locked(due, wake_timer);
          }
        }
      } else if (n.pend == pend_queued && new_prio != n.priority) {
        unlink_queued_locked(id, n);
        n.priority = new_prio;
        push_queued_locked(id, n);
      } else {
        n.priority = new_prio;
      }
      return;
    }
    if (n.idle) {  // a kept key comes back: its state is reused as it stands (index, slab, key)
      n.idle = false;
      --idle_keys_;
    }
    n.entity.emplace(std::move(e));
    n.reason = reason;
    n.priority = prio;
    n.ready_at = stamp;
    if (!immediate) {
      schedule_locked(id, n, due, wake_timer);
    } else if (n.running) {
      n.pend = pend_waiting;
      ++waiting_;
    } else {
      push_queued_locked(id, n);
      note_queued_locked(wake_worker, short_claims_ > 0);
    }
  }

  // Queued work wakes a parked worker, unless
  // - one is spinning: it takes the work with no futex wake, and no second worker is woken only
  //   to find nothing, spin and park again (review r1 L9). The spinner re-checks the queue under
  //   the lock after every spin, so nothing is left behind, and after its claim it wakes another
  //   worker if it left work behind (worker_main);
  // - or `may_defer` (a submission: some worker holds a claim of short runs; work a claimer
  //   leaves behind: its own claim is one of short runs) and less than a claim's worth is queued:
  //   that claimer takes it within about claim_budget_ns, sooner than a woken worker would
  //   start, and no third thread competes for the cores the submitter and the running worker use
  //   (on two vCPUs the wake-up preempted the submitter in 41% of all context switches; not making
  //   it: +25-30% at two workers, no-op runs). Should that claimer be stuck in a run that turned
  //   out long, the monitor, armed here, wakes workers for the keys still queued a tick later and
  //   takes back the keys claimed behind that run (monitor_main).
  void note_queued_locked(bool& wake_worker, bool may_defer) noexcept {
    if (spinning_ > 0) {
      // relaxed: a hint for spinning workers, who re-check under the lock before acting on it.
      work_hint_.store(static_cast<std::uint32_t>(std::min<std::size_t>(queued_, UINT32_MAX)), std::memory_order_relaxed);
      return;
    }
    if (sleeping_ <= wakes_pending_) return;
    if (may_defer && queued_ < max_claim) {
      arm_monitor_locked();
      return;
    }
    ++wakes_pending_;
    wake_worker = true;
  }

  // Starts the monitor ticking if it is parked with no tick: once per busy period, on the first
  // skipped wake-up or claim of several keys. Notified under the lock, so that a preempted caller
  // cannot leave it unarmed while the skipped work waits (the system call is rare).
  void arm_monitor_locked() noexcept {
    if (!monitor_untimed_) return;
    monitor_untimed_ = false;
    monitor_ec_.notify_all();
  }

  struct waker {
    detail::event_count* ec;
    void operator()() const noexcept { ec->notify_all(); }
  };

  // Parks a submitter until something changes; returns ok to re-check, or timeout / cancelled.
  submit_status block_locked(std::unique_lock<detail::spin_mutex>& lk, const std::optional<time_point>& deadline,
                             const std::stop_token* stop, std::optional<std::stop_callback<waker>>& on_stop,
                             std::size_t& counter) {
    if (deadline && clock_.now() >= *deadline) return submit_status::timeout;
    if (stop != nullptr && stop->stop_possible() && !on_stop) {
      lk.unlock();
      on_stop.emplace(*stop, waker{&submit_ec_});
      lk.lock();
      return submit_status::ok;  // state may have changed while unlocked: re-check first
    }
    const auto key = submit_ec_.prepare_wait();
    if (stop != nullptr && stop->stop_requested()) {
      submit_ec_.cancel_wait();
      return submit_status::cancelled;
    }
    ++counter;
    lk.unlock();
    if (deadline) clock_.wait_until(submit_ec_, key, *deadline); else clock_.wait(submit_ec_, key);
    lk.lock();
    --counter;
    return submit_status::ok;
  }

  // On one of this pipeline's worker threads (inside one of its callbacks).
  bool on_own_worker() const noexcept { return tl_self_ == this && tl_worker_ != detail::no_node; }

  // Only workers make room in the intake. A worker blocked in a submit from its own callback makes
  // none; once all the others are blocked so too, its wait would never end (review r1 F10a: a
  // reconcile fanning out children through submit()). That submit returns `full` instead, with
  // the entity left with the caller: the reconcile can fail and be retried, and its worker goes
  // on to make room for the others.
  bool would_stall_locked() const noexcept {
    return on_own_worker() && workers_blocked_ + 1 >= opts_.max_parallel;
  }
  submit_status block_for_room_locked(std::unique_lock<detail::spin_mutex>& lk, const std::optional<time_point>& deadline,
                                      const std::stop_token* stop, std::optional<std::stop_callback<waker>>& on_stop) {
    const bool worker = on_own_worker();
    if (worker) ++workers_blocked_;
    const auto w = block_locked(lk, deadline, stop, on_stop, submit_waiters_);
    if (worker) --workers_blocked_;
    return w;
  }

  // Parks on `ec` (registered in `counter`) until notified or `deadline`. Caller loops.
  // `stop`: its stop_callback notifies `ec`; re-checked once registered, so a stop requested
  // between the caller's check and the registration is not slept through.
  void park_locked(std::unique_lock<detail::spin_mutex>& lk, detail::event_count& ec, std::size_t& counter,
                   const std::optional<time_point>& deadline, const std::stop_token* stop = nullptr) {
    const auto key = ec.prepare_wait();
    if (stop != nullptr && stop->stop_requested()) {
      ec.cancel_wait();
      return;
    }
    ++counter;
    lk.unlock();
    if (deadline) clock_.wait_until(ec, key, *deadline); else clock_.wait(ec, key);
    lk.lock();
    --counter;
  }

  bool wait_idle_impl(const std::optional<time_point>& deadline, const std::stop_token* stop) {
    if (tl_self_ == this) throw_self_wait("wait_idle()");
    return wait_for_state(deadline, stop, [this] { return (slab_.live() == idle_keys_ || finalized_) && delivering_ == 0; });
  }

  bool wait_stopped_impl(const std::optional<time_point>& deadline, const std::stop_token* stop) {
    if (tl_self_ == this) throw_self_wait("wait()");
    return wait_for_state(deadline, stop, [this] { return finalized_ && delivering_ == 0; });
  }

  // The waits of wait() and wait_idle(): until `done` (under the lock) or a fault (rethrown);
  // false at `deadline` or when `stop` is requested.
  template <class Done>
  bool wait_for_state(const std::optional<time_point>& deadline, const std::stop_token* stop, Done done) {
    std::optional<std::stop_callback<waker>> on_stop;
    if (stop != nullptr && stop->stop_possible()) on_stop.emplace(*stop, waker{&idle_ec_});
    std::unique_lock lk(mu_);
    for (;;) {
      if (fault_) std::rethrow_exception(fault_);
      if (done()) return true;
      if (stop != nullptr && stop->stop_requested()) return false;
      if (deadline && clock_.now() >= *deadline) return false;
      park_locked(lk, idle_ec_, idle_waiters_, deadline, stop);
    }
  }

  // From inside one of this pipeline's callbacks, wait() and wait_idle() would wait for the very
  // run (or stop) that is calling them: a deadlock, reported instead (review r1 L1).
  [[noreturn]] static void throw_self_wait(const char* what) {
    throw std::logic_error(std::string("sluice::reconcile_pipeline: ") + what +
                           " called from inside one of the pipeline's own callbacks would wait for itself");
  }

  // ---- workers -------------------------------------------------------------------------------

  // Moves due scheduled versions to their queues (or behind their running key), then picks the
  // next key to run by priority with the starvation bound. no_node if nothing is runnable.
  std::uint32_t next_locked(time_point now, std::int64_t stamp) {
    while (!heap_.empty() && heap_.top().deadline <= now) {
      const std::uint32_t id = heap_.top().id;
      node& n = slab_[id];
      heap_erase_locked(0, pos_fn());
      n.pend = pend_none;
      if (n.running) {
        if (opts_.on_conflict == conflict_strategy::requeue_after) {
          bool ignored = false;
          ++m_.conflict_requeues;
          schedule_locked(id, n, detail::add_ns(now, opts_.conflict_delay), ignored);
        } else {
          n.pend = pend_waiting;
          ++waiting_;
        }
      } else {
        n.ready_at = stamp;  // queue latency counts from when the requeue was found due
        push_queued_locked(id, n);
      }
    }
    if (queued_ == 0) return detail::no_node;
    int chosen = -1;
    const int levels = static_cast<int>(levels_.size());
    if (levels > 1) {
      for (int l = 0; l < levels; ++l) {
        if (levels_[l].size != 0 && levels_[l].skipped >= opts_.starvation_limit) {
          chosen = l;
          break;
        }
      }
      if (chosen < 0) {
        for (int l = levels - 1; l >= 0; --l) {
          if (levels_[l].size != 0) {
            chosen = l;
            break;
          }
        }
      }
      for (int l = 0; l < chosen; ++l) {
        if (levels_[l].size != 0) ++levels_[l].skipped;
      }
      levels_[chosen].skipped = 0;
    } else {
      chosen = 0;
    }
    const std::uint32_t id = levels_[chosen].head;
    unlink_queued_locked(id, slab_[id]);
    return id;
  }

  // The run's stop source, to request_stop() on after unlocking (never under the lock: that runs
  // user std::stop_callbacks inside the critical section). The worker replaces its source at its
  // next pick, so the copy targets exactly this run; a late request on a finished run is harmless.
  [[nodiscard]] static std::stop_source take_slot_stop_locked(run_slot& slot) noexcept {
    slot.stop_used = true;
    return slot.stop;
  }

  static void fire_stops(std::vector<std::stop_source>& v) noexcept {
    for (std::stop_source& s : v) {
      if (s.stop_possible()) s.request_stop();
      s = std::stop_source(std::nostopstate);
    }
  }

  // Claims the next batch (under the lock): up to claim_limit_locked() keys, picked one by one in
  // the usual order (priority, starvation bound, FIFO), each marked running from here on.
  void claim_locked(worker_state& ws, std::size_t w, time_point now, std::int64_t stamp, std::exception_ptr& machinery) {
    const std::size_t limit = claim_limit_locked(ws);
    while (ws.claimed < limit) {
      const std::uint32_t id = next_locked(now, stamp);
      if (id == detail::no_node) break;
      run_slot& slot = ws.slots[ws.claimed];
      node& n = slab_[id];
      if (slot.stop_used) {
        try {
          slot.stop = std::stop_source();
          slot.token = slot.stop.get_token();
          slot.stop_used = false;
        } catch (...) {  // could not allocate a fresh stop state: fault, and put the key back
          push_queued_locked(id, n);
          machinery = std::current_exception();
          return;
        }
      }
      n.pend = pend_none;
      n.running = true;
      ++claimed_keys_;
      n.cancel_run = false;
      n.worker = static_cast<std::uint32_t>(w);
      n.slot = static_cast<std::uint8_t>(ws.claimed);
      ++running_;
      slot.node = id;
      slot.key = &*n.key;  // a running node does not move (compaction skips it)
      slot.timed_out = false;
      slot.ending.store(run_going, std::memory_order_relaxed);  // relaxed: published by the lock
      slot.skipped = false;
      // relaxed: published by the lock, as `ending`.
      slot.turn.store(ws.claimed == 0 ? turn_started : turn_waiting, std::memory_order_relaxed);
      slot.reason = n.reason;
      slot.seq = n.seq;
      slot.attempt = n.failures + 1;
      slot.priority = static_cast<int>(n.priority);
      slot.ready_at = n.ready_at;
      slot.entity.emplace(std::move(*n.entity));
      n.entity.reset();
      ++ws.claimed;
    }
  }

  // How many keys a worker claims at once: one, unless its recent runs were short. A claim of k
  // keys takes the lock once instead of k times, so the submitter's critical sections stop
  // bouncing the lock's cache line (and the queue's) between cores with every reconcile; with
  // no-op reconciles that hand-off cost several times the run itself. The claimed keys count as
  // running (exclusivity, coalescing, cancel, stop), so the batch is kept to about claim_budget_ns
  // of work by the worker's recent peak run time: a key is never held back behind its batch for
  // long, and slow reconciles are claimed one at a time. With a reconcile_timeout the watchdog
  // times each run from its start, published under the lock: one at a time there too.
  std::size_t claim_limit_locked(const worker_state& ws) const noexcept {
    if (timed_ || queued_ <= 1) return 1;
    const double fit = claim_budget_ns / std::max(ws.peak_run_ns, 1.0);
    std::size_t k = fit >= static_cast<double>(max_claim) ? max_claim : static_cast<std::size_t>(fit);
    return std::clamp<std::size_t>(std::min(k, queued_), 1, max_claim);
  }

  void worker_main(std::size_t w) {
    tl_self_ = this;
    tl_worker_ = static_cast<std::uint32_t>(w);
    worker_state& ws = workers_[w];
    std::exception_ptr machinery;  // a Clock or allocation failure: faults the pipeline
    time_point now{};
    std::int64_t stamp = 0;
    // Takes a stamp every time; reads the Clock only when something needs it: scheduled entries
    // to promote, a reconcile_timeout, or (force) a requeue or retry deadline to compute. A stale
    // `now` is never later than the truth, so it can delay a promotion, never make one early.
    auto read_now = [&](bool force) noexcept {
      try {
        stamp = stamp_now();
        // relaxed: a hint (see heap_erase_locked); a stale zero only delays as explained above.
        if (force || timed_ || scheduled_hint_.load(std::memory_order_relaxed) != 0) now = clock_.now();
      } catch (...) {
        if (!machinery) machinery = std::current_exception();
      }
    };
    bool spun = false;
    std::unique_lock lk(mu_);
    read_now(true);
    for (;;) {
      if (machinery && !fault_) fault_locked(machinery);
      if (stopping_ || fault_) break;
      claim_locked(ws, w, now, stamp, machinery);
      if (ws.claimed == 0) {
        if (machinery) continue;
        if (!spun && spinning_ == 0) {
          // The next submission is often microseconds away: one idle worker spins for it (no
          // futex round trip); more spinners would only burn the cores the others need.
          spin_for_work(lk, ws);
          spun = true;
        } else {
          park_worker_locked(lk, ws);
          spun = false;
        }
        read_now(false);
        continue;
      }
      spun = false;
      ++m_.claims;
      ws.claim_seq = m_.claims;
      ws.started = now;
      // A claim of short runs lets submissions skip waking a parked worker (note_queued_locked).
      // A claim of several keys arms the monitor: it takes them back should the first run long.
      ws.short_claim = defers_wakes_ && claim_budget_ns / std::max(ws.peak_run_ns, 1.0) >= 2.0;
      if (ws.short_claim) ++short_claims_;
      if (ws.claimed > 1) arm_monitor_locked();
      bool wake_more = false;
      // Work left behind wakes another worker if it is at least another full claim. Less than
      // that, after a claim of short runs, this worker takes it next, within its claim budget:
      // sooner than a woken worker would arrive, and without a third thread competing for two
      // cores' worth of short runs (with eight workers on two cores, waking one per claim halved
      // the no-op benchmark's throughput); the monitor bounds the wait should a run turn out
      // long (note_queued_locked). A claimer of runs that are not short wakes one, as before.
      if (queued_ > 0) note_queued_locked(wake_more, ws.short_claim);
      if (!heap_.empty()) {  // this worker may have been the timer watcher: keep one watching
        watch_handoff_ = false;
        note_deadline_locked(heap_.top().deadline, wake_more);
      }
      // Submitters blocked on a full intake are woken in bunches: once a quarter has drained.
      const bool wake_space = submit_waiters_ > 0 && queued_ + waiting_ <= space_threshold_;
      const bool wake_watchdog = watchdog_untimed_;
      watchdog_untimed_ = false;
      const std::size_t batch = ws.claimed;
      lk.unlock();
      if (wake_more) work_ec_.notify_one();
      if (wake_space) submit_ec_.notify_all();
      if (wake_watchdog) watchdog_ec_.notify_all();

      for (std::size_t i = 0; i < batch; ++i) {
        run_slot& slot = ws.slots[i];
        // A claimed key whose stop was requested before its run began (stop(), cancel(key)) is
        // not run: finish_locked puts it back or drops it. (The first always runs, as a single
        // claim's key did: the watchdog times slot 0 from the claim.)
        // stopping_hint_: stop() sets it under the lock before it requests the runs' stops, so a
        // worker that sees its current run stopped also sees it (acquire: the order of the two).
        if (i > 0) {
          // acq_rel: pairs with the monitor's exchange; the loser leaves the slot alone.
          std::uint8_t waiting = turn_waiting;
          if (!slot.turn.compare_exchange_strong(waiting, turn_started, std::memory_order_acq_rel)) continue;
          if (stopping_hint_.load(std::memory_order_acquire) || slot.token.stop_requested()) {
            slot.skipped = true;
            continue;
          }
        }
        // relaxed: a progress count only the monitor reads, as a hint (a worker stuck in one run).
        ws.runs_started.store(ws.runs_started.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
        slot.start_stamp = stamp;  // the previous run's end stamp (or the claim's): no second read
        // relaxed: only metrics() reads it (longest_running), a diagnostic.
        ws.current_start.store(stamp, std::memory_order_relaxed);
        const context ctx{*slot.key, slot.attempt, slot.reason, slot.priority, slot.token};
        slot.result.emplace(invoke(*slot.entity, ctx));
        const auto k = slot.result->result_kind();
        const bool failed = k == reconcile_result::kind::failure || k == reconcile_result::kind::terminal;
        if (timed_) {
          // acq_rel: pairs with the watchdog's exchange; either it saw this end, or this sees its mark.
          slot.timed_out = slot.ending.exchange(run_finished, std::memory_order_acq_rel) == run_timed_out;
        }
        if (failed) {
          report_failure(ctx, slot.result->error());
        } else if (slot.timed_out) {
          report_failure(ctx, reconcile_error{"sluice::reconcile_pipeline: reconcile_timeout exceeded", nullptr});
        }
        read_now(k == reconcile_result::kind::failure ||
                 (k == reconcile_result::kind::requeue && slot.result->delay() > std::chrono::nanoseconds::zero()));
        slot.end = now;
        slot.end_stamp = stamp;
        const double ran = static_cast<double>(since(slot.start_stamp, stamp).count());
        ws.peak_run_ns = std::max(ran, ws.peak_run_ns - ws.peak_run_ns / 64.0);
        // A done() run's entity is not needed again (not retried, requeued or dead-lettered):
        // destroyed here, not under the lock in finish_locked (user code; review r1 L6).
        if (k == reconcile_result::kind::done && !slot.timed_out) slot.entity.reset();
      }
      ws.current_start.store(no_run, std::memory_order_relaxed);  // relaxed: as above

      lk.lock();
      bool wake_timer = false;  // a deadline earlier than every parked worker's: wake one to watch it
      std::size_t dead = 0;
      for (std::size_t i = 0; i < batch; ++i) {
        if (ws.slots[i].node == detail::no_node) continue;  // taken back by the monitor
        finish_locked(ws, ws.slots[i], wake_timer, machinery);
        if (ws.slots[i].dead) ++dead;
      }
      ws.claimed = 0;
      if (ws.short_claim) {
        ws.short_claim = false;
        --short_claims_;
      }
      const bool notify_submit = key_waiters_ > 0;
      const bool notify_idle = idle_waiters_ > 0 && ((queued_ == 0 && running_ == 0) || slab_.live() == idle_keys_ || stopping_);
      delivering_ += dead;  // stop(), drain(), wait() and wait_idle() wait for the callbacks too
      // on_dead_letter is user code of any length: work this worker would have claimed next (its
      // wake-up skipped during the claim) goes to another worker now.
      bool wake_other = false;
      if (dead > 0 && queued_ > 0) note_queued_locked(wake_other, false);
      if (dead > 0 || notify_submit || notify_idle || wake_timer) {
        lk.unlock();
        if (wake_timer) work_ec_.notify_one();
        if (wake_other) work_ec_.notify_one();
        if (notify_submit) submit_ec_.notify_all();
        if (notify_idle) idle_ec_.notify_all();
        for (std::size_t i = 0; i < batch && dead > 0; ++i) {
          if (ws.slots[i].dead) {
            deliver_dead_letter(std::move(*ws.slots[i].dead));
            ws.slots[i].dead.reset();
          }
        }
        lk.lock();
        if (dead > 0 && (delivering_ -= dead) == 0 && idle_waiters_ > 0) idle_ec_.notify_all();  // rare: under the lock
        // The callbacks took arbitrarily long: the next run's start (its timeout, its durations)
        // must come from a clock read after them (review r1 F3).
        if (dead > 0) read_now(false);
      }
    }
    // Leaving: the last worker out after a stop begun from inside a callback finishes it.
    if (stopping_ && running_ == 0 && !finalizing_) finalize_locked(lk);
    const bool notify_idle = idle_waiters_ > 0;
    lk.unlock();
    if (notify_idle) idle_ec_.notify_all();
  }

  reconcile_result invoke(const Entity& e, const context& ctx) noexcept {
    try {
      try {
        return fn_(e, ctx);
      } catch (...) {
        return reconcile_result::failure(std::current_exception());
      }
    } catch (...) {  // building the failure itself failed (out of memory): no message
      return reconcile_result::failure(std::string());
    }
  }

  void report_failure(const context& ctx, const reconcile_error& err) noexcept {
    if (!opts_.on_failure) return;
    try {
      opts_.on_failure(ctx.key, err, ctx.attempt);
    } catch (...) {
      std::lock_guard lk(mu_);
      ++m_.callback_errors;
    }
  }

  void deliver_dead_letter(dead_letter<key_type, Entity>&& d) noexcept {
    if (!opts_.on_dead_letter) return;
    try {
      opts_.on_dead_letter(std::move(d));
    } catch (...) {
      std::lock_guard lk(mu_);
      ++m_.callback_errors;
    }
  }

  // Ends one claimed key's turn: its run's outcome (slot.end: the Clock after the run, fresh when
  // a requeue or retry needs a deadline; slot.end_stamp: ditto as a stamp), or, for a claimed key
  // that was not run (stop() or cancel() came first), puts its version back or drops it.
  void finish_locked(worker_state& ws, run_slot& slot, bool& wake_timer, std::exception_ptr& machinery) noexcept {
    const std::uint32_t id = slot.node;
    node& n = slab_[id];
    n.running = false;
    --running_;
    slot.node = detail::no_node;
    if (slot.skipped) {
      slot.skipped = false;
      if (n.cancel_run) {
        ++m_.cancelled;  // cancel(key) took it before it ran
      } else if (n.pend != pend_none) {
        ++m_.coalesced;  // a newer version is pending: it supersedes the one that never ran
      } else {
        n.entity.emplace(std::move(*slot.entity));  // stop(): reported as queued, as before the claim
        n.reason = slot.reason;
        n.ready_at = slot.ready_at;
        push_queued_locked(id, n);
      }
      slot.entity.reset();
      settle_locked(id, n, false);
      return;
    }
    std::optional<Entity>& local = slot.entity;
    std::optional<dead_letter<key_type, Entity>>& dead = slot.dead;
    reconcile_result& res = *slot.result;
    const time_point end = slot.end;
    const std::int64_t stamp = slot.end_stamp;
    ws.queue_latency.record(since(slot.ready_at, slot.start_stamp));
    ws.reconcile_duration.record(since(slot.start_stamp, stamp));
    ++m_.reconciled;
    auto k = res.result_kind();
    if (slot.timed_out) {
      ++m_.timeouts;
      if (k != reconcile_result::kind::terminal) k = reconcile_result::kind::failure;
    }
    bool keep = false;
    std::chrono::nanoseconds delay{0};
    reconcile_reason next_reason = reconcile_reason::requeue_requested;
    auto make_dead = [&](dead_letter_reason why, std::uint32_t failures) {
      ++m_.dead_lettered;  // counted even if it cannot be built: the version ends here either way
      try {
        reconcile_error err = slot.timed_out && res.result_kind() != reconcile_result::kind::failure &&
                                      res.result_kind() != reconcile_result::kind::terminal
                                  ? reconcile_error{"sluice::reconcile_pipeline: reconcile_timeout exceeded", nullptr}
                                  : res.take_error();
        // Unless a newer version is pending, the node is freed below: its key is moved out (no
        // copy to fail). Otherwise it is copied, and a throwing copy (a std::string key and no
        // memory) faults the pipeline instead of escaping the worker (review r1 F4).
        if constexpr (std::is_nothrow_move_constructible_v<key_type>) {
          if (n.pend == pend_none) {
            dead.emplace(dead_letter<key_type, Entity>{std::move(*n.key), std::move(*local), std::move(err), failures, why});
            return;
          }
        }
        dead.emplace(dead_letter<key_type, Entity>{*n.key, std::move(*local), std::move(err), failures, why});
      } catch (...) {
        if (!machinery) machinery = std::current_exception();
      }
    };
    if (k == reconcile_result::kind::failure || k == reconcile_result::kind::terminal) ++m_.failed;
    if (n.cancel_run && k != reconcile_result::kind::done) {
      // The run counts by its result (reconciled == succeeded + failed + requeues, always); its
      // entity, which would have been retried or requeued, counts as cancelled.
      if (k == reconcile_result::kind::requeue) ++m_.requeues;
      ++m_.cancelled;
      n.failures = 0;
    } else {
      switch (k) {
        case reconcile_result::kind::done:
          ++m_.succeeded;
          n.failures = 0;
          break;
        case reconcile_result::kind::requeue:
          ++m_.requeues;
          n.failures = 0;
          keep = true;
          delay = res.delay();
          break;
        case reconcile_result::kind::failure: {
          const bool escalate = slot.reason == reconcile_reason::retry_after_failure || n.failures == 0;
          const std::uint32_t f = escalate ? (n.failures == UINT32_MAX ? n.failures : n.failures + 1) : n.failures;
          if (escalate && opts_.backoff.max_retries && f > *opts_.backoff.max_retries) {
            make_dead(dead_letter_reason::retries_exhausted, f);
            n.failures = 0;
          } else {
            n.failures = f;
            delay = std::max(backoff_delay_locked(f), slot.timed_out ? std::chrono::nanoseconds(0) : res.delay());
            next_reason = reconcile_reason::retry_after_failure;
            keep = true;
            ++m_.retries;
          }
          break;
        }
        case reconcile_result::kind::terminal:
          make_dead(dead_letter_reason::terminal, n.failures + 1);
          n.failures = 0;
          break;
      }
    }
    if (keep) {
      if (n.pend != pend_none) {
        ++m_.coalesced;  // a newer version is pending: its entity supersedes this one...
        // ...but this run's requeue / retry deadline still counts (dedup rule: the earliest
        // deadline wins; review r1 F15). A queued or waiting version runs next anyway; a scheduled
        // one moves up to this run's deadline, and then runs for this run's reason.
        if (n.pend == pend_scheduled) {
          if (delay <= std::chrono::nanoseconds::zero()) {
            heap_erase_locked(n.heap_pos, pos_fn());
            n.reason = next_reason;
            n.ready_at = stamp;
            push_queued_locked(id, n);
          } else if (const time_point mine = detail::add_ns(end, delay); mine < n.deadline) {
            n.deadline = mine;
            n.reason = next_reason;
            heap_.update(n.heap_pos, mine, pos_fn());
            note_deadline_locked(mine, wake_timer);
          }
        }
      } else {
        n.entity.emplace(std::move(*local));
        n.reason = next_reason;
        if (delay > std::chrono::nanoseconds::zero()) {
          schedule_locked(id, n, detail::add_ns(end, delay), wake_timer);
        } else {
          n.ready_at = stamp;
          push_queued_locked(id, n);
        }
      }
    }
    local.reset();
    slot.result.reset();
    // A run that succeeded (and was not cancelled) may keep its key's state for the next submission.
    settle_locked(id, n, k == reconcile_result::kind::done && !n.cancel_run);
  }

  // After a turn: a version that waited behind the run is queued; a node with nothing pending is
  // kept idle (may_keep: the run succeeded) or freed; compaction that waited for this run goes on.
  void settle_locked(std::uint32_t id, node& n, bool may_keep) noexcept {
    if (n.pend == pend_waiting) {
      --waiting_;
      push_queued_locked(id, n);
    }
    const bool was_blocker = compact_blocker_ == id;  // this run held up compaction: it may move now
    if (was_blocker) compact_blocker_ = detail::no_node;
    if (n.pend == pend_none && may_keep && keep_idle_locked(n)) {
      if (was_blocker) compact_locked();
    } else if (n.pend == pend_none) {
      free_node_locked(id, n);  // compacts
    } else if (was_blocker) {
      compact_locked();
    }
  }

  // Keeps the state of a key whose run succeeded with nothing pending, instead of freeing it:
  // its next submission finds it in the index and reuses it as it stands. Freeing and re-creating
  // it wrote the key's index bucket and the slab's free list from both sides (the worker frees,
  // the submitter allocates), three cache lines crossing cores per reconcile: +25% in the no-op
  // benchmark at workers:2 (A/B medians). An idle node is what a freed one would be (no entity, no backoff, no
  // cancel mark), except that it holds its key. Bounded by keep_idle_keys (default `capacity`,
  // the floor the tables keep anyway); cancel(key) and stop() free idle nodes; compaction moves
  // them like any other idle state. Not while stopping: finalize_locked has freed or will free
  // every node that is not running.
  bool keep_idle_locked(node& n) noexcept {
    if (idle_keys_ >= idle_limit_ || stopping_) return false;
    n.entity.reset();
    n.failures = 0;
    n.heap_pos = detail::no_node;
    n.idle = true;
    ++idle_keys_;
    return true;
  }

  // Spins (unlocked) for about ten microseconds until a submission sets the work hint — bounded by
  // elapsed time, not by a count of pauses (512 of them took 30-60 µs on this EPYC; review r1 F6)
  // — so an idle pipeline still parks right after. Ten: below the ~25 µs a futex park and wake
  // costs, and measured: a 2 µs spin parked so often that the no-op benchmark spent 25% more CPU
  // per reconcile on park/wake round trips than the old 30-60 µs spin; 10 µs was within 5% of it.
  void spin_for_work(std::unique_lock<detail::spin_mutex>& lk, const worker_state& ws) {
    ++spinning_;
    const bool batching = claim_budget_ns / std::max(ws.peak_run_ns, 1.0) >= 2.0;
    lk.unlock();
    // No yield here: on a loaded machine a yield can hand the core away for a whole time slice.
    detail::spin_budget<10000, 256> budget;
    do {
      // relaxed: only a hint (see note_queued_locked); the caller re-checks under the lock.
      if (const std::uint32_t queued = work_hint_.load(std::memory_order_relaxed); queued != 0) {
        if (!batching) break;
        // Short runs: let a claim's worth gather for up to a microsecond or two (a submitter
        // queues one every ~0.1 µs when it is busy), so the claim takes the lock once for many.
        detail::spin_budget<1500, 16> linger;
        while (work_hint_.load(std::memory_order_relaxed) < max_claim && !linger.expired()) detail::cpu_relax();
        break;
      }
      detail::cpu_relax();
    } while (!budget.expired());
    lk.lock();
    if (--spinning_ == 0) work_hint_.store(0, std::memory_order_relaxed);  // relaxed: as above
  }

  // The timer watcher: of the parked workers, one (at most, normally) parks with the earliest
  // deadline; the others park without one. So a due requeue wakes one worker, not all of them.
  // A new earlier deadline, or a watcher leaving to run work, hands the watch to one sleeper.
  void note_deadline_locked(time_point deadline, bool& wake_timer) noexcept {
    if (sleeping_ > 0 && !watch_handoff_ && (!watching_ || deadline < watch_deadline_)) {
      wake_timer = true;
      watch_handoff_ = true;  // until a worker parks (and takes the watch) or dispatches
    }
  }

  void park_worker_locked(std::unique_lock<detail::spin_mutex>& lk, worker_state& ws) {
    const bool notify_idle = idle_waiters_ > 0;
    const auto key = work_ec_.prepare_wait();
    ++sleeping_;
    watch_handoff_ = false;
    std::optional<time_point> deadline;
    if (!heap_.empty() && (!watching_ || heap_.top().deadline < watch_deadline_)) {
      deadline = heap_.top().deadline;
      watching_ = true;
      watch_deadline_ = *deadline;
      ws.parked_until = *deadline;
    }
    lk.unlock();
    if (notify_idle) idle_ec_.notify_all();
    if (deadline) clock_.wait_until(work_ec_, key, *deadline); else clock_.wait(work_ec_, key);
    lk.lock();
    --sleeping_;
    if (wakes_pending_ > 0) --wakes_pending_;
    if (deadline && watching_ && watch_deadline_ == ws.parked_until) watching_ = false;  // it was the watcher
    ws.parked_until = time_point::max();
  }

  void watchdog_main() {
    tl_self_ = this;
    const auto timeout = *opts_.reconcile_timeout;
    std::unique_lock lk(mu_);
    while (!stopping_ && !fault_) {
      time_point now{};
      try {
        now = clock_.now();
      } catch (...) {
        fault_locked(std::current_exception());
        break;
      }
      std::optional<time_point> next;
      bool fired = false;
      for (std::size_t w = 0; w < workers_.size(); ++w) {
        worker_state& ws = workers_[w];
        run_slot& slot = ws.slots[0];  // with a reconcile_timeout a worker claims one key at a time
        // relaxed: a hint; the exchange below decides.
        if (slot.node == detail::no_node || slot.ending.load(std::memory_order_relaxed) != run_going) continue;
        const time_point due = detail::add_ns(ws.started, timeout);
        if (due <= now) {
          // acq_rel: see the worker's exchange after its run. Fails if the run finished first.
          std::uint8_t going = run_going;
          if (!slot.ending.compare_exchange_strong(going, run_timed_out, std::memory_order_acq_rel)) continue;
          watchdog_scratch_[w] = take_slot_stop_locked(slot);
          fired = true;
        } else if (!next || due < *next) {
          next = due;
        }
      }
      if (fired) {  // request the stops outside the lock (r1 F11), then look again
        lk.unlock();
        fire_stops(watchdog_scratch_);
        lk.lock();
        continue;
      }
      watchdog_untimed_ = !next;
      park_locked(lk, watchdog_ec_, watchdog_waiters_, next);
      watchdog_untimed_ = false;
    }
  }

  // Takes back the keys a stuck worker claimed and has not started: each goes back to its place in
  // its priority's FIFO, as it was before the claim (the dispatch counts of the starvation bound
  // are not undone: a lower priority may come a little sooner).
  // Only keys with nothing else pending: one with a newer version waiting or scheduled behind its
  // claim, or a cancel, stays with the claim (rare; the documented price of claims). Returns
  // how many came back.
  std::size_t revoke_unstarted_locked(worker_state& ws) noexcept {
    std::size_t count = 0;
    bool unblocked = false;
    for (std::size_t i = 1; i < ws.claimed; ++i) {
      run_slot& slot = ws.slots[i];
      if (slot.node == detail::no_node) continue;
      node& n = slab_[slot.node];
      if (n.pend != pend_none || n.cancel_run) continue;
      // acq_rel: pairs with the worker's exchange before the run.
      std::uint8_t waiting = turn_waiting;
      if (!slot.turn.compare_exchange_strong(waiting, turn_revoked, std::memory_order_acq_rel)) continue;
      const std::uint32_t id = slot.node;
      slot.node = detail::no_node;
      n.running = false;
      --running_;
      // As it was when claimed (a submission since may have raised the priority and a cancel
      // withdrawn it again, resetting the failures: the claimed version keeps its own).
      n.entity.emplace(std::move(*slot.entity));  // noexcept: Entity is nothrow move constructible (static_assert)
      slot.entity.reset();
      n.reason = slot.reason;
      n.ready_at = slot.ready_at;
      n.priority = static_cast<std::uint8_t>(slot.priority);
      n.failures = slot.attempt - 1;
      n.seq = slot.seq;
      insert_queued_in_order_locked(id, n);
      if (compact_blocker_ == id) {  // compaction waited for this claimed key: it may move now
        compact_blocker_ = detail::no_node;
        unblocked = true;
      }
      ++m_.revoked;
      ++count;
    }
    if (unblocked) compact_locked();
    return count;
  }

  // The bound on skipped wake-ups (note_queued_locked) and on keys claimed behind a run that
  // turns out long. Armed (arm_monitor_locked), it looks every monitor_tick of real time, and at
  // each look compares with the previous one:
  // - a worker still in the same run of the same claim of several keys: the keys claimed behind
  //   that run go back to their places in the queue (revoke_unstarted_locked);
  // - fewer keys claimed since than were queued then (a key queued a tick ago is still queued,
  //   FIFO within its priority): as many parked workers are woken as such keys, or keys taken back.
  // So while a worker sleeps no key waits more than about two ticks for one to take it. The
  // monitor parks with no tick once no claim of short runs is held and no work waits for a sleeper.
  // Ticks are real time (steady_clock), not the Clock: this is liveness, not a schedule, and a
  // manual clock that is never advanced must not stall it (it is why this thread does not park
  // through the Clock, and manual_clock::waiters() does not count it).
  void monitor_main() {
    tl_self_ = this;
    struct progress {
      std::uint64_t claim = 0;
      std::uint32_t runs = 0;
    };
    std::vector<progress> seen(workers_.size());  // each worker's, at the previous look
    std::uint64_t claimed_seen = 0;
    std::size_t queued_seen = 0;
    bool have_look = false;  // the previous look's snapshot is a tick old or less
    auto look_at = std::chrono::steady_clock::time_point{};
    std::unique_lock lk(mu_);
    while (!stopping_ && !fault_) {
      const auto now = std::chrono::steady_clock::now();
      std::size_t wakes = 0;
      bool notify_submit = false;
      if (have_look && now - look_at >= monitor_tick) {
        std::size_t revoked = 0;
        for (std::size_t w = 0; w < workers_.size(); ++w) {
          worker_state& ws = workers_[w];
          // relaxed: a hint; the exchange in revoke_unstarted_locked decides.
          if (ws.claimed > 1 && ws.claim_seq == seen[w].claim && ws.runs_started.load(std::memory_order_relaxed) == seen[w].runs) {
            revoked += revoke_unstarted_locked(ws);
          }
        }
        // Submitters waiting for a taken-back key to stop running (conflict_strategy::wait).
        notify_submit = revoked > 0 && key_waiters_ > 0;
        const std::uint64_t taken = claimed_keys_ - claimed_seen;
        const std::size_t stale = queued_seen > taken ? queued_seen - static_cast<std::size_t>(taken) : 0;
        const std::size_t want = std::min(std::max(stale, revoked), queued_);
        if (want > 0 && sleeping_ > wakes_pending_) {
          wakes = std::min(want, sleeping_ - wakes_pending_);
          wakes_pending_ += wakes;
          m_.monitor_wakes += wakes;
        }
      }
      if (!have_look || now - look_at >= monitor_tick) {
        for (std::size_t w = 0; w < workers_.size(); ++w) {
          // relaxed: as above.
          seen[w] = progress{workers_[w].claim_seq, workers_[w].runs_started.load(std::memory_order_relaxed)};
        }
        claimed_seen = claimed_keys_;
        queued_seen = queued_;
        look_at = now;
        have_look = true;
      }
      const bool tick = short_claims_ > 0 || wakes > 0 || (queued_ > 0 && sleeping_ > wakes_pending_);
      monitor_untimed_ = !tick;
      if (!tick) have_look = false;  // armed again later: its first look only takes a snapshot
      const auto key = monitor_ec_.prepare_wait();
      lk.unlock();
      for (std::size_t i = 0; i < wakes; ++i) work_ec_.notify_one();
      if (notify_submit) submit_ec_.notify_all();
      if (tick) {
        (void)monitor_ec_.wait_until(key, look_at + monitor_tick);
      } else {
        monitor_ec_.wait(key);
      }
      lk.lock();
      monitor_untimed_ = false;
    }
  }

  // ---- shutdown internals --------------------------------------------------------------------

  // True for the one caller that began the shutdown: it then owns stop_scratch_ and must
  // fire_stops() it after unlocking.
  [[nodiscard]] bool begin_stop_locked() noexcept {
    closed_ = true;
    if (stopping_) return false;
    stopping_ = true;
    stopping_hint_.store(true, std::memory_order_release);  // release: see the worker's batch loop
    for (std::size_t w = 0; w < workers_.size(); ++w) {
      for (std::size_t i = 0; i < workers_[w].claimed; ++i) {
        run_slot& slot = workers_[w].slots[i];
        if (slot.node != detail::no_node) stop_scratch_[w * max_claim + i] = take_slot_stop_locked(slot);
      }
    }
    return true;
  }

  void fault_locked(std::exception_ptr e) noexcept {
    if (!fault_) fault_ = std::move(e);
    closed_ = true;
    // Wake everyone (under the lock is fine: notify only bumps an epoch and maybe makes a syscall).
    work_ec_.notify_all();
    submit_ec_.notify_all();
    idle_ec_.notify_all();
    watchdog_ec_.notify_all();
    monitor_ec_.notify_all();
  }

  void wake_everyone() noexcept {
    work_ec_.notify_all();
    submit_ec_.notify_all();
    idle_ec_.notify_all();
    watchdog_ec_.notify_all();
    monitor_ec_.notify_all();
  }

  // With no reconcile running: takes every pending version out and reports it, once.
  void finalize_locked(std::unique_lock<detail::spin_mutex>& lk) {
    if (finalizing_) return;
    finalizing_ = true;
    std::vector<unprocessed<key_type, Entity>> out;
    // Freeing the last live node must not release chunks this loop has yet to walk (review r1 F1):
    // the slab shrinks once, after the loop.
    slab_.hold_shrink();
    const std::size_t cap = slab_.capacity();
    for (std::uint32_t id = 0; id < cap; ++id) {
      node& n = slab_[id];
      if (!n.key) continue;
      if (n.pend != pend_none) {
        const pending_state st = n.pend == pend_queued ? pending_state::queued
                                 : n.pend == pend_scheduled ? pending_state::scheduled
                                                            : pending_state::waiting;
        try {
          if (opts_.on_unprocessed) out.push_back(unprocessed<key_type, Entity>{*n.key, std::move(*n.entity), st, n.failures});
        } catch (...) {
          ++m_.callback_errors;  // could not hold it for reporting: still counted as unprocessed
        }
        unlink_pending_locked(id, n);
        ++m_.unprocessed;
      }
      if (!n.running) free_node_locked(id, n);
    }
    slab_.end_hold();
    lk.unlock();
    std::uint64_t errors = 0;
    const reconcile_core* const outer = tl_self_;
    tl_self_ = this;  // stop()/drain() from inside on_unprocessed must not wait for this very thread
    for (auto& u : out) {
      try {
        opts_.on_unprocessed(std::move(u));
      } catch (...) {
        ++errors;
      }
    }
    tl_self_ = outer;
    out.clear();
    lk.lock();
    m_.callback_errors += errors;
    finalized_ = true;
    lk.unlock();
    wake_everyone();
    lk.lock();
  }

  // ---- members -------------------------------------------------------------------------------

  options opts_;
  Clock clock_;
  KeyFn key_fn_;
  Hash hash_;
  KeyEqual eq_;
  reconcile_fn fn_;
  double ns_per_tick_ = use_tsc ? detail::tsc_ns_per_tick() : 1.0;  // calibration spins 2 ms, once (r1 L10)
  // stopping_, readable by workers between runs. Among the read-only members: workers read it once
  // per run, and next to work_hint_ (which submitters write) it moved between cores every time.
  std::atomic<bool> stopping_hint_{false};

  // The lock on a line of its own, followed by cold state: a waiter spinning on the lock word must
  // not keep the holder's counters busy too (measured: packing the hot counters into the lock's
  // line cost a fifth of the no-op benchmark's throughput).
  alignas(64) mutable detail::spin_mutex mu_;
  std::mt19937_64 rng_;
  detail::node_slab<node> slab_;
  detail::slot_index index_;
  detail::deadline_heap<time_point> heap_;
  std::vector<level> levels_;
  std::vector<worker_state> workers_;
  std::vector<std::stop_source> stop_scratch_;      // written once, by the caller that begins the stop
  std::vector<std::stop_source> watchdog_scratch_;  // the watchdog thread's alone
  reconcile_metrics m_;
  std::size_t queued_ = 0;
  std::size_t waiting_ = 0;
  std::size_t running_ = 0;       // keys claimed by workers (running, or next in a claim)
  std::size_t delivering_ = 0;  // on_dead_letter calls in progress (outside the lock)
  std::size_t space_threshold_ = 0;  // capacity - max(1, capacity / 4)
  std::size_t idle_limit_ = 0;  // keep_idle_keys (default: capacity)
  std::size_t idle_keys_ = 0;   // nodes with n.idle: live in the slab and the index, no state
  std::uint32_t compact_blocker_ = detail::no_node;  // a running node compaction waits for
  std::uint64_t relocated_ = 0;                       // nodes moved by compact_locked (a test counter)

  bool closed_ = false;
  bool stopping_ = false;
  bool finalizing_ = false;
  bool finalized_ = false;
  std::exception_ptr fault_;

  // Parking bookkeeping (under mu_): who is parked where, so wakers make a system call only
  // when someone sleeps.
  std::size_t sleeping_ = 0;       // workers parked on work_ec_
  std::size_t spinning_ = 0;       // workers in spin_for_work()
  std::size_t short_claims_ = 0;   // workers holding a claim of short runs (note_queued_locked)
  // Skipped wake-ups need another worker to wake and a monitor to bound them; with a
  // reconcile_timeout each run is timed alone and every submission wakes a worker.
  const bool defers_wakes_ = opts_.max_parallel >= 2 && !opts_.reconcile_timeout.has_value();
  bool monitor_untimed_ = false;   // the monitor is parked with no tick (see monitor_main)
  std::uint64_t claimed_keys_ = 0;  // keys taken from the queue by claims, ever (the monitor's measure)
  std::uint32_t queue_seq_ = 0;     // numbers queued nodes in FIFO order (node::seq)
  std::atomic<std::size_t> scheduled_hint_{0};  // heap_.size(), readable without the lock
  const bool timed_ = opts_.reconcile_timeout.has_value();
  std::atomic<std::uint32_t> work_hint_{0};  // queued_, stored while someone spins
  std::size_t wakes_pending_ = 0;  // notify_one()s not yet absorbed by a waking worker
  bool watching_ = false;        // a parked worker waits for watch_deadline_
  time_point watch_deadline_{};
  bool watch_handoff_ = false;   // a worker was woken to take the watch and has not parked yet
  std::size_t submit_waiters_ = 0;  // submitters waiting for capacity
  std::size_t workers_blocked_ = 0;  // of them, workers inside their own callback (would_stall_locked)
  std::size_t key_waiters_ = 0;     // submitters waiting for a key to stop running (wait strategy)
  std::size_t idle_waiters_ = 0;    // stop / drain / wait / wait_idle
  std::size_t watchdog_waiters_ = 0;
  bool watchdog_untimed_ = false;   // the watchdog is parked with no deadline

  detail::event_count work_ec_;
  detail::event_count submit_ec_;
  detail::event_count idle_ec_;
  detail::event_count watchdog_ec_;
  detail::event_count monitor_ec_;

  std::vector<std::jthread> threads_;
  std::jthread watchdog_;
  std::jthread monitor_;

  static inline thread_local const reconcile_core* tl_self_ = nullptr;
  static inline thread_local std::uint32_t tl_worker_ = detail::no_node;  // on a worker thread: its index
};

}  // namespace sluice::detail
