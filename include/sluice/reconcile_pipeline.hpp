// sluice/reconcile_pipeline.hpp — a keyed reconcile pipeline: submit entities, a bounded pool of
// workers reconciles them, one key never runs twice at once, bursts coalesce, failures retry with
// per-key backoff, and shutdown reports everything it did not run.
//
// What it is for: the in-process core of a Kubernetes-style operator or a background job worker
// (seeds 000 and 001; client-go's workqueue + controller-runtime, kube-rs's controller). It replaces
// the glue a user would otherwise write around channel + requeue_queue + key_lock_table + limiter +
// backoff: no pump thread, no "busy: requeue in 2 ms" polling, no hand-ordered shutdown.
//
//   sluice::reconcile_pipeline<Entity, KeyFn, Clock = steady_clock, Hash, KeyEqual>
//   KeyFn: `key_fn(const Entity&) -> Key` (e.g. sluice::key_member<&pod::uid>), Key hashable
//   (sluice::hashable_key). The reconcile callback is `(const Entity&, const reconcile_context<Key>&)
//   -> reconcile_result` or `(const Entity&, std::stop_token) -> reconcile_result`.
//
// Requirements: Entity nothrow move-constructible; Key copy-constructible. Callbacks may throw any
// type. The pipeline must not be destroyed from inside one of its own callbacks.
//
// Guarantees (each one tested):
// - Per-key exclusivity: one key is never reconciled by two workers at once. At most one pending
//   version per key besides the running one; memory is bounded by `capacity` (ready entities
//   submitters may add) + max_parallel x 16 (claimed, below) + the distinct keys with a scheduled
//   requeue — never by the submission rate — plus up to keep_idle_keys (default: capacity) idle
//   keys: a key whose run succeeded with nothing pending keeps its state (its key, not the entity)
//   for its next submission. cancel(key) and stop() free them; keep_idle_keys = 0 frees every key
//   at its last run's end.
// - Claims: a worker takes its next keys in one critical section, in dispatch order: one key, or,
//   while its recent runs are short (recent peak run x 16 <= 20 us), up to 16 (about 20 us of
//   work), so that short reconciles do not pay a lock hand-off between cores each. A claimed key
//   counts as running from then on (exclusivity, conflicts, cancel, metrics().in_flight). One
//   whose stop is requested before its turn (stop(), cancel) is not run: stop() reports it to
//   on_unprocessed, cancel() counts it cancelled. With a reconcile_timeout, one key at a time. The
//   price: a run that is unexpectedly long delays the keys claimed behind it until the monitor
//   takes them back (below), or, with max_parallel 1 or a newer version pending, by that run.
// - Wake-ups: while a worker holds a claim of short runs, fewer than 16 queued keys wake no other
//   worker (that one takes them within about 20 us). Should a run turn out long, a monitor thread
//   (max_parallel >= 2, no reconcile_timeout), looking every 500 us of real time, wakes parked
//   workers for keys still queued since its previous look and takes back the keys claimed behind
//   that run (each to its place in its priority's FIFO; not those with a newer version or a cancel
//   pending). Measured: keys behind a stuck run start within a few ms (metrics().monitor_wakes,
//   metrics().revoked).
// - Dedup rule, for every submission that meets a pending version of its key (queued, scheduled
//   or waiting behind a run): the NEWEST entity, the EARLIEST deadline, the HIGHEST priority win;
//   the replaced version is counted `coalesced`. A submission therefore pre-empts a scheduled
//   retry or requeue (it runs now), and that early run does not escalate the backoff. The same
//   holds when a run ends with a requeue or retry while a newer version is scheduled: the newer
//   entity runs at the earlier of the two deadlines.
// - Conflicts (a submission for a running key), options.on_conflict: coalesce (default: keep the
//   newest as the one pending version, run it when the current run ends: nothing lost, nothing
//   duplicated, no polling), discard (submit returns `discarded`; the entity stays with the
//   caller), requeue_after (scheduled conflict_delay later, re-deferred while still running),
//   wait (the submitting thread blocks until the run ends, holding no worker; try_submit returns
//   `busy`; a submission from inside a callback on a worker is coalesced instead: it could
//   otherwise wait for its own worker, or for one waiting back for it).
// - Results: done (success: the key's backoff is forgotten); requeue_after(d) (success and look
//   again after d; counted as a requested requeue, never as a retry); failure (returned, or any
//   exception thrown) is retried after the key's backoff delay; terminal (no retry). The failure +
//   requeue rule: a failure that also asks for a delay is a failure (it escalates the backoff and
//   spends the budget) and is retried after the LATER of the backoff delay and the asked delay.
//   Only attempts that waited out their retry delay (or a key's first failure) escalate the
//   backoff; after backoff.max_retries escalations the entity goes to on_dead_letter with the
//   last error. A reconcile that overruns reconcile_timeout has its stop token requested and
//   counts as a failure.
// - Priorities: FIFO within a priority (0 .. priority_levels-1, higher runs first). Starvation
//   bound: the head of a priority's queue is dispatched after at most starvation_limit dispatches
//   from higher priorities, plus one per lower priority that is itself at its bound.
// - Shutdown: stop() closes intake, requests stop on running reconciles, waits for them (and for
//   on_dead_letter calls in progress: when stop() returns, no callback is running) and hands
//   every pending version (queued, scheduled, waiting) to on_unprocessed. drain(deadline) closes
//   intake, runs everything accepted including requeues and retries that fall due before the
//   deadline, then stop()s. Both are idempotent, thread-safe, and callable from inside a callback
//   (there they only begin the shutdown and return; the last worker finishes it).
// - Conservation, whenever quiescent: submitted == succeeded + dead_lettered + discarded +
//   coalesced + cancelled + unprocessed + pending (metrics()).
// - A failure of the pipeline's own machinery (a Clock that throws, an allocation failure on a
//   worker) faults it: intake closes, wait() rethrows, metrics().faulted is set. A throwing user
//   callback never faults it, never kills a worker, never leaks a key.
// Never: polls, busy-waits when idle, runs a pump thread, holds a worker while waiting for a key.
// In the example below a pod is `struct pod { std::string uid; int version; };`.
//
// Example:
//   using pipeline = sluice::reconcile_pipeline<pod, sluice::key_member<&pod::uid>>;
//   pipeline p({.max_parallel = 4}, [](const pod& x, const pipeline::context& ctx) {
//     return apply(x, ctx.stop) ? sluice::reconcile_result::done()
//                               : sluice::reconcile_result::failure("apply failed");
//   });
//   (void)p.submit(pod{"a", 1});
//   p.drain_for(std::chrono::seconds(10));
#pragma once

#include <chrono>
#include <cstddef>
#include <functional>
#include <stop_token>

#include "clock.hpp"
#include "detail/reconcile_core.hpp"
#include "detail/reconcile_types.hpp"
#include "key.hpp"

namespace sluice {

// The types it uses (results, context, options, metrics, dead letters, submit_status, ...) are
// declared in detail/reconcile_types.hpp, the implementation is detail/reconcile_core.hpp.
template <class Entity, class KeyFn, clock_source Clock = steady_clock,
          class Hash = std::hash<detail::pipeline_key_t<KeyFn, Entity>>,
          class KeyEqual = std::equal_to<detail::pipeline_key_t<KeyFn, Entity>>>
  requires hashable_key<detail::pipeline_key_t<KeyFn, Entity>, Hash, KeyEqual>
class reconcile_pipeline : private detail::reconcile_core<Entity, KeyFn, Clock, Hash, KeyEqual> {
  using core = detail::reconcile_core<Entity, KeyFn, Clock, Hash, KeyEqual>;

 public:
  using typename core::key_type;      ///< KeyFn's result, decayed
  using typename core::entity_type;   ///< Entity
  using typename core::clock_type;    ///< Clock
  using typename core::time_point;    ///< Clock::time_point
  using typename core::options;       ///< reconcile_options<key_type, Entity> (all validated)
  using typename core::context;       ///< reconcile_context<key_type>: key, attempt, reason, priority, stop
  using typename core::reconcile_fn;  ///< std::function<reconcile_result(const Entity&, const context&)>
  using typename core::table_sizes;   ///< internal table sizes (tests of "returns to empty")

  /// reconcile_pipeline(options, reconcile, Clock = {}, KeyFn = {}, Hash = {}, KeyEqual = {}):
  /// starts max_parallel workers (and a watchdog thread when reconcile_timeout is set, else a
  /// monitor thread when max_parallel >= 2: see README, "Queued work never waits long"). Bad options
  /// throw std::invalid_argument naming the field and value. The callback is
  /// `(const Entity&, const context&) -> reconcile_result` or `(const Entity&, std::stop_token)`.
  /// Not copyable. The destructor stop()s, then joins the workers; it must not run on one of the
  /// pipeline's own threads.
  using core::core;

  // ---- intake: submit(e, opts), submit(e, stop_token, opts), try_submit(e, opts),
  // try_submit_for(e, d, opts), try_submit_until(e, tp, opts) -> submit_status.
  // Every form leaves `e` (an rvalue) untouched unless it returns ok. Thread-safe. May block (not
  // the try_ forms). May allocate (a new key's state). Exceptions from KeyFn, Hash or KeyEqual
  // propagate, with nothing changed. From inside a callback on one of the pipeline's workers a
  // blocking submit never waits for itself: conflict_strategy::wait coalesces behind the running
  // key instead, and a full intake blocks it only while some other worker is free to make room;
  // when every other worker is blocked the same way it returns `full` (the reconcile can fail and
  // be retried) instead of stalling the pipeline.
  using core::submit;
  using core::try_submit;
  using core::try_submit_for;
  using core::try_submit_until;

  /// cancel(key, stop_running = true) -> cancel_result: removes the key's pending version
  /// (queued, scheduled or waiting; counted cancelled) and forgets its backoff. If the key is
  /// running and `stop_running`, requests its stop token, and that run's outcome is not retried or
  /// requeued (a done() still counts as succeeded). Thread-safe.
  using core::cancel;

  // ---- shutdown
  /// stop(): closes intake, requests stop on running reconciles, waits for them (and for
  /// on_dead_letter calls in progress), then reports every pending version to on_unprocessed.
  /// Idempotent; thread-safe; from inside a callback it begins the shutdown and returns at once
  /// (the last running worker finishes it).
  using core::stop;
  /// drain_until(tp), drain_for(d) -> bool: closes intake (blocked submitters return closed at
  /// once), runs everything accepted (including requeues and retries falling due before the
  /// deadline), then stop()s. True if nothing was left to report. From inside a callback it only
  /// closes intake and returns false.
  using core::drain_until;
  using core::drain_for;
  /// drain(stop_token) -> bool: as drain_until without a deadline, until `stop` is requested.
  using core::drain;
  /// wait(), wait(stop_token), wait_for(d), wait_until(tp) -> bool: blocks until the pipeline has
  /// stopped (stop(), drain() or destructor) or faulted; rethrows the fault; false if the timed or
  /// stop_token form gave up first. Thread-safe. From inside one of the pipeline's callbacks it
  /// throws std::logic_error (it would wait for itself).
  using core::wait;
  using core::wait_for;
  using core::wait_until;
  /// wait_idle(), wait_idle(stop_token), wait_idle_for(d), wait_idle_until(tp) -> bool: until no
  /// key has any state (nothing queued, scheduled, waiting or running), or the pipeline stopped or
  /// faulted (rethrown). Thread-safe. From inside a callback: std::logic_error, as wait().
  using core::wait_idle;
  using core::wait_idle_for;
  using core::wait_idle_until;

  // ---- observation
  /// metrics() -> reconcile_metrics: one consistent snapshot (counters, gauges, histograms,
  /// faulted, stopped, balanced()). Thread-safe.
  using core::metrics;
  /// internal_sizes() -> table_sizes: keys, slab/index/heap sizes, queued, waiting, relocated.
  using core::internal_sizes;
  using core::max_parallel;  ///< options().max_parallel
  using core::capacity;      ///< options().capacity
  using core::is_closed;     ///< intake closed (stop, drain, fault)
};

}  // namespace sluice
