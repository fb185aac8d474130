// A simulated Kubernetes operator on sluice::reconcile_pipeline — the flagship example.
//
// A watch source emits add, update and delete events for --entities objects (updates bunched on a
// few hot keys). Each event is submitted to the pipeline; a delete cancels the object's pending and
// running work and submits a tombstone, whose reconcile records the deletion. Reconcile does
// simulated work of random length, fails --fail-rate of the time (a few "poisoned" objects always
// fail and are dead-lettered), and some successes ask to be looked at again shortly. Every outcome
// is written as the object's status through sluice::write_behind into SQLite (a file in a temporary
// folder, or --db PATH). At the end the program verifies, from the database and the metrics, that
// no object was lost, none was reconciled twice at once, and every object's final version was
// reconciled (or dead-lettered and reported); it exits non-zero if not.
//
// --metrics-port PORT serves Prometheus metrics on 127.0.0.1:PORT under client-go's workqueue_* and
// controller-runtime's controller_runtime_* names, computed from one metrics() snapshot per scrape.
#include <sluice/reconcile_pipeline.hpp>
#include <sluice/write_behind.hpp>

#include <prometheus/collectable.h>
#include <prometheus/exposer.h>
#include <prometheus/metric_family.h>

#include "common/cli.hpp"
#include "common/progress.hpp"
#include "common/report.hpp"
#include "common/sqlite.hpp"
#include "common/temp_folder.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

namespace {

struct settings {
  std::uint32_t entities = 100'000;
  double updates_per_entity = 1.5;
  double hot_fraction = 0.01;  // share of objects that are hot
  double hot_share = 0.7;      // share of updates that go to hot objects
  double delete_fraction = 0.05;
  double fail_rate = 0.05;
  std::uint32_t poison_per_mille = 1;
  double requeue_rate = 0.1;
  std::uint32_t work_us = 200;  // mean simulated work
  std::size_t workers = 16;
  std::size_t capacity = 4096;
  std::uint64_t seed = 42;
  std::string db;
  int metrics_port = 0;
  std::uint32_t hold_ms = 0;
  bool quiet = false;
};

// The object as the watch delivers it. `id` indexes the example's own ledgers.
struct object {
  std::string uid;
  std::uint32_t id = 0;
  std::uint64_t version = 0;
  bool deleted = false;
};

// A status row: what the operator writes back (keyed by uid: the newest row per uid wins).
struct status_row {
  std::string key;
  std::uint64_t version = 0;
  char state = 'R';  // R ready, F failed (dead-lettered), D deleted
  std::uint32_t attempts = 0;
};

std::string uid_of(std::uint32_t id) { return "default/pod-" + std::to_string(id); }

// ---- SQLite (examples/common/sqlite.hpp) -------------------------------------------------------
class database {
 public:
  explicit database(const std::string& path) : db_(path) {
    db_.exec("CREATE TABLE IF NOT EXISTS status(uid TEXT PRIMARY KEY, version INTEGER NOT NULL, "
             "state TEXT NOT NULL, attempts INTEGER NOT NULL, writes INTEGER NOT NULL DEFAULT 1)");
    db_.exec("DELETE FROM status");
    upsert_ = db_.prepare("INSERT INTO status(uid, version, state, attempts) VALUES(?1, ?2, ?3, ?4) "
                          "ON CONFLICT(uid) DO UPDATE SET version = excluded.version, state = excluded.state, "
                          "attempts = excluded.attempts, writes = writes + 1");
  }

  // Writes a batch in one transaction; false (and rolled back) on any error.
  bool write(std::span<const status_row> rows) {
    return db_.write_batch(upsert_, rows, [](example::sqlite_statement& st, const status_row& r) {
      st.bind(1, r.key);
      st.bind(2, static_cast<std::int64_t>(r.version));
      st.bind_char(3, r.state);
      st.bind(4, std::int64_t{r.attempts});
    });
  }

  struct row {
    std::uint64_t version;
    char state;
  };
  std::unordered_map<std::string, row> read_all() {
    std::unordered_map<std::string, row> out;
    example::sqlite_statement st = db_.prepare("SELECT uid, version, state FROM status");
    while (st.step() == SQLITE_ROW) {
      const std::string state = st.column_text(2);
      out[st.column_text(0)] = row{static_cast<std::uint64_t>(st.column_int(1)), state.empty() ? '?' : state[0]};
    }
    return out;
  }

 private:
  example::sqlite_db db_;
  example::sqlite_statement upsert_;
};

using pipeline = sluice::reconcile_pipeline<object, sluice::key_member<&object::uid>>;
using batcher = sluice::write_behind<status_row, std::string>;

// ---- Prometheus: one metrics() snapshot per scrape, under the names dashboards use -------------
class scrape : public prometheus::Collectable {
 public:
  explicit scrape(const pipeline& p) : p_(p) {}
  std::vector<prometheus::MetricFamily> Collect() const override {
    const sluice::reconcile_metrics m = p_.metrics();
    std::vector<prometheus::MetricFamily> out;
    const std::vector<prometheus::ClientMetric::Label> wq{{"name", "operator"}};
    const std::vector<prometheus::ClientMetric::Label> ctl{{"controller", "operator"}};
    auto scalar = [&](const char* name, const char* help, prometheus::MetricType type, double v,
                      std::vector<prometheus::ClientMetric::Label> labels) {
      prometheus::MetricFamily f{name, help, type, {}};
      prometheus::ClientMetric c;
      c.label = std::move(labels);
      if (type == prometheus::MetricType::Counter) c.counter.value = v; else c.gauge.value = v;
      f.metric.push_back(std::move(c));
      out.push_back(std::move(f));
    };
    auto labelled = [&](const char* name, const char* help, prometheus::MetricType type, const char* label,
                        std::vector<std::pair<const char*, double>> values, const std::vector<prometheus::ClientMetric::Label>& base) {
      prometheus::MetricFamily f{name, help, type, {}};
      for (auto& [lv, v] : values) {
        prometheus::ClientMetric c;
        c.label = base;
        c.label.push_back({label, lv});
        if (type == prometheus::MetricType::Counter) c.counter.value = v; else c.gauge.value = v;
        f.metric.push_back(std::move(c));
      }
      out.push_back(std::move(f));
    };
    auto histogram = [&](const char* name, const char* help, const sluice::reconcile_histogram& h,
                         const std::vector<prometheus::ClientMetric::Label>& labels) {
      prometheus::MetricFamily f{name, help, prometheus::MetricType::Histogram, {}};
      prometheus::ClientMetric c;
      c.label = labels;
      c.histogram.sample_count = h.count();
      c.histogram.sample_sum = std::chrono::duration<double>(h.sum()).count();
      // client-go's buckets: 10 ns .. 1000 s, x10. An observation counts towards the first bound at or
      // above its sluice bucket's upper end (so counts are exact, bounds conservative by <= 25%).
      std::uint64_t cumulative = 0;
      std::size_t i = 0;
      for (double bound = 1e-8; bound < 2e3; bound *= 10) {
        for (; i < sluice::reconcile_histogram::bucket_count; ++i) {
          const double upper_s = i + 1 < sluice::reconcile_histogram::bucket_count
                                     ? static_cast<double>(sluice::reconcile_histogram::lower_bound(i + 1)) * 1e-9
                                     : 1e30;
          if (upper_s > bound * 1.0000001) break;
          cumulative += h.bucket(i);
        }
        c.histogram.bucket.push_back({cumulative, bound});
      }
      c.histogram.bucket.push_back({h.count(), std::numeric_limits<double>::infinity()});
      f.metric.push_back(std::move(c));
      out.push_back(std::move(f));
    };
    using T = prometheus::MetricType;
    const double longest = std::chrono::duration<double>(m.longest_running).count();
    scalar("workqueue_depth", "Current depth of the workqueue (queued, ready to run)", T::Gauge, static_cast<double>(m.queued), wq);
    scalar("workqueue_adds_total", "Total number of adds handled by the workqueue", T::Counter, static_cast<double>(m.submitted), wq);
    histogram("workqueue_queue_duration_seconds", "How long an item stays in the workqueue before being requested", m.queue_latency, wq);
    histogram("workqueue_work_duration_seconds", "How long processing an item from the workqueue takes", m.reconcile_duration, wq);
    scalar("workqueue_unfinished_work_seconds",
           "Seconds of work in progress (upper bound: in flight x longest running)", T::Gauge,
           longest * static_cast<double>(m.in_flight), wq);
    scalar("workqueue_longest_running_processor_seconds", "How long the longest running processor has been running", T::Gauge, longest, wq);
    scalar("workqueue_retries_total", "Retries after a failure (requested requeues are counted in sluice_requeues_total)", T::Counter,
           static_cast<double>(m.retries), wq);
    labelled("controller_runtime_reconcile_total", "Total number of reconciliations per controller", T::Counter, "result",
             {{"success", static_cast<double>(m.succeeded)}, {"error", static_cast<double>(m.failed)},
              {"requeue_after", static_cast<double>(m.requeues)}}, ctl);
    scalar("controller_runtime_reconcile_errors_total", "Total number of reconciliation errors per controller", T::Counter,
           static_cast<double>(m.failed), ctl);
    histogram("controller_runtime_reconcile_time_seconds", "Length of time per reconciliation per controller", m.reconcile_duration, ctl);
    scalar("controller_runtime_active_workers", "Number of currently used workers per controller", T::Gauge, static_cast<double>(m.in_flight), ctl);
    scalar("controller_runtime_max_concurrent_reconciles", "Maximum number of concurrent reconciles per controller", T::Gauge,
           static_cast<double>(m.max_parallel), ctl);
    scalar("sluice_requeues_total", "Requested requeues (requeue_after results), never mixed with retries", T::Counter,
           static_cast<double>(m.requeues), wq);
    labelled("sluice_outcomes_total", "Final outcome of every submitted version", T::Counter, "outcome",
             {{"succeeded", static_cast<double>(m.succeeded)}, {"dead_lettered", static_cast<double>(m.dead_lettered)},
              {"discarded", static_cast<double>(m.discarded)}, {"coalesced", static_cast<double>(m.coalesced)},
              {"cancelled", static_cast<double>(m.cancelled)}, {"unprocessed", static_cast<double>(m.unprocessed)}}, wq);
    labelled("sluice_pending", "Versions not yet finished, by state", T::Gauge, "state",
             {{"queued", static_cast<double>(m.queued)}, {"scheduled", static_cast<double>(m.scheduled)},
              {"waiting", static_cast<double>(m.waiting)}, {"running", static_cast<double>(m.in_flight)}}, wq);
    return out;
  }

 private:
  const pipeline& p_;
};

std::string fmt_us(std::chrono::nanoseconds d) {
  return example::format("%.1f", std::chrono::duration<double, std::micro>(d).count());
}

}  // namespace

int main(int argc, char** argv) {
  settings s;
  CLI::App app{"Simulated Kubernetes operator on sluice::reconcile_pipeline; status via write_behind into SQLite; "
               "verifies itself and exits non-zero on a failed check."};
  using example::add_ranged;
  add_ranged(app, "--entities", s.entities, "objects the watch source knows", 1u, 10'000'000u);
  add_ranged(app, "--updates-per-entity", s.updates_per_entity, "update events per object (average)", 0.0, 100.0);
  add_ranged(app, "--hot-fraction", s.hot_fraction, "share of objects that are hot", 0.0, 1.0);
  add_ranged(app, "--hot-share", s.hot_share, "share of updates going to hot objects", 0.0, 1.0);
  add_ranged(app, "--delete-fraction", s.delete_fraction, "share of objects deleted", 0.0, 1.0);
  add_ranged(app, "--fail-rate", s.fail_rate, "probability that an attempt fails", 0.0, 0.9);
  add_ranged(app, "--poison-per-mille", s.poison_per_mille, "objects (per 1000) whose reconcile always fails", 0u, 1000u);
  add_ranged(app, "--requeue-rate", s.requeue_rate, "probability that a success asks for a re-check", 0.0, 1.0);
  example::add_defaulted(app, "--work-us", s.work_us, "mean simulated work per reconcile (microseconds)");
  add_ranged(app, "--workers", s.workers, "max_parallel", std::size_t{1}, std::size_t{1024});
  add_ranged(app, "--capacity", s.capacity, "intake capacity", std::size_t{1}, std::size_t{1} << 24);
  example::add_seed_option(app, s.seed);
  example::add_db_option(app, s.db);
  add_ranged(app, "--metrics-port", s.metrics_port, "serve Prometheus metrics on 127.0.0.1:PORT (0: off)", 0, 65535);
  example::add_defaulted(app, "--hold-ms", s.hold_ms, "keep serving metrics this long after verification");
  example::add_quiet_flag(app, s.quiet);
  CLI11_PARSE(app, argc, argv);

  const example::database_file db_file(s.db, "sluice-operator", "status.db");  // --db, or a temporary file
  if (!db_file.ok()) return 2;
  const auto start = steady::now();
  database db(s.db);

  // ---- ledgers (the example's own bookkeeping, to verify against) ----
  const std::uint32_t n = s.entities;
  std::vector<std::uint64_t> final_version(n, 0);  // written by the watch thread only
  std::vector<char> deleted(n, 0);
  std::vector<std::atomic<int>> active(n);          // per-key exclusivity checker
  std::vector<std::uint64_t> written(n, 0);         // highest status version handed to the batcher
  std::array<std::mutex, 256> stripes;              // orders status writes per object
  std::atomic<std::uint64_t> overlaps{0}, attempts_total{0}, write_failures{0};
  std::mutex dead_m;
  std::unordered_map<std::uint32_t, std::uint64_t> dead;  // id -> dead-lettered version

  batcher wb({.capacity = 16384, .max_batch = 1024, .linger = 2ms,
              .on_failed = [&](status_row&&, const sluice::write_behind_failure&) { ++write_failures; }},
             [&](std::span<const status_row> rows, sluice::write_behind_results& r) {
               if (!db.write(rows)) r.retry_all();  // SQLITE_BUSY and friends: retried with backoff
             });

  // Status writes go through a per-object stripe so that a dead letter reported after a newer
  // version already ran can never overwrite the newer status (the row carries the object version).
  auto write_status = [&](std::uint32_t id, status_row row) {
    std::lock_guard lk(stripes[id % stripes.size()]);
    if (row.version < written[id]) return;
    written[id] = row.version;
    (void)wb.enqueue(std::move(row));
  };

  const std::uint64_t poison_seed = s.seed * 0x9E3779B97F4A7C15ULL;
  auto poisoned = [&](std::uint32_t id) { return (std::hash<std::uint64_t>{}(id ^ poison_seed) % 1000) < s.poison_per_mille; };

  pipeline::options o;
  o.max_parallel = s.workers;
  o.capacity = s.capacity;
  o.backoff.base = 5ms;
  o.backoff.max = 200ms;
  o.backoff.jitter = sluice::jitter_mode::equal;
  o.backoff.max_retries = 4;
  o.jitter_seed = s.seed;
  o.on_dead_letter = [&](sluice::dead_letter<std::string, object>&& d) {
    {
      std::lock_guard lk(dead_m);
      dead[d.entity.id] = d.entity.version;
    }
    write_status(d.entity.id, status_row{d.key, d.entity.version, 'F', d.failures});
  };
  pipeline p(o, [&](const object& obj, const pipeline::context& ctx) -> sluice::reconcile_result {
    thread_local std::mt19937_64 rng(std::random_device{}());
    if (active[obj.id].exchange(1) != 0) ++overlaps;
    ++attempts_total;
    std::exponential_distribution<double> work(1.0 / std::max<double>(1.0, s.work_us));
    std::this_thread::sleep_for(std::chrono::microseconds(static_cast<std::int64_t>(work(rng))));
    std::uniform_real_distribution<double> u(0.0, 1.0);
    sluice::reconcile_result res = sluice::reconcile_result::done();
    if (ctx.stop.stop_requested()) {
      res = sluice::reconcile_result::failure("interrupted: object deleted or operator stopping");
    } else if (obj.deleted) {
      if (u(rng) < s.fail_rate) {
        res = sluice::reconcile_result::failure("finalizer: API server conflict");
      } else {
        write_status(obj.id, status_row{obj.uid, obj.version, 'D', ctx.attempt});
      }
    } else if (poisoned(obj.id) || u(rng) < s.fail_rate) {
      res = sluice::reconcile_result::failure("simulated API error: 409 Conflict");
    } else {
      write_status(obj.id, status_row{obj.uid, obj.version, 'R', ctx.attempt});
      if (ctx.reason != sluice::reconcile_reason::requeue_requested && u(rng) < s.requeue_rate) {
        res = sluice::reconcile_result::requeue_after(std::chrono::milliseconds(5 + rng() % 20));
      }
    }
    active[obj.id].store(0);
    return res;
  });

  std::shared_ptr<scrape> collectable;
  std::unique_ptr<prometheus::Exposer> exposer;
  if (s.metrics_port != 0) {
    exposer = std::make_unique<prometheus::Exposer>("127.0.0.1:" + std::to_string(s.metrics_port));
    collectable = std::make_shared<scrape>(p);
    exposer->RegisterCollectable(collectable);
    std::fprintf(stderr, "metrics: http://127.0.0.1:%d/metrics\n", s.metrics_port);
  }

  // ---- the watch source ----
  std::atomic<bool> watching{true};
  std::atomic<std::uint64_t> events{0}, adds{0}, updates{0}, deletes{0};
  std::thread watch([&] {
    std::mt19937_64 rng(s.seed);
    std::uniform_real_distribution<double> u(0.0, 1.0);
    const auto hot = std::max<std::uint32_t>(1, static_cast<std::uint32_t>(s.hot_fraction * n));
    std::uint32_t added = 0;
    const auto total_updates = static_cast<std::uint64_t>(s.updates_per_entity * n);
    const auto total_deletes = static_cast<std::uint64_t>(s.delete_fraction * n);
    std::uint64_t done_updates = 0, done_deletes = 0;
    auto submit = [&](std::uint32_t id, bool del) {
      object obj{uid_of(id), id, ++final_version[id], del};
      if (del) {
        deleted[id] = 1;
        (void)p.cancel(obj.uid);  // drop pending work, stop a running reconcile
      }
      if (p.submit(std::move(obj), {.reason = final_version[id] == 1 ? sluice::reconcile_reason::created
                                                                     : sluice::reconcile_reason::updated}) !=
          sluice::submit_status::ok) {
        std::fprintf(stderr, "watch: submit refused\n");
      }
      ++events;
    };
    // Event kinds are drawn in proportion to what is left of each, so updates and deletes are
    // spread over the run (an object is only updated or deleted after it was added).
    for (;;) {
      const std::uint64_t rem_a = n - added, rem_u = total_updates - done_updates, rem_d = total_deletes - done_deletes;
      if (rem_a + rem_u + rem_d == 0) break;
      const double r = u(rng) * static_cast<double>(rem_a + (added > 0 ? rem_u + rem_d : 0));
      if (r < static_cast<double>(rem_a)) {
        submit(added++, false);
        ++adds;
      } else if (r < static_cast<double>(rem_a + rem_u)) {
        ++done_updates;
        // Updates bunch on hot objects.
        const auto id = u(rng) < s.hot_share ? static_cast<std::uint32_t>(rng() % std::min(hot, added))
                                             : static_cast<std::uint32_t>(rng() % added);
        if (deleted[id]) continue;  // an update for a deleted object: the watch never sends it
        submit(id, false);
        ++updates;
      } else {
        ++done_deletes;
        const auto id = static_cast<std::uint32_t>(rng() % added);
        if (deleted[id]) continue;
        submit(id, true);
        ++deletes;
      }
    }
    watching = false;
  });

  // ---- progress (examples/common/progress.hpp) ----
  const auto planned_events = static_cast<std::uint64_t>(n * (1.0 + s.updates_per_entity + s.delete_fraction));
  example::progress_line progress(
      s.quiet, start, 200ms, [&, last = steady::now(), last_runs = std::uint64_t{0}](steady::time_point now) mutable {
        const auto m = p.metrics();
        const double rate = static_cast<double>(m.reconciled - last_runs) / std::chrono::duration<double>(now - last).count();
        last = now;
        last_runs = m.reconciled;
        return example::format("events %" PRIu64 "/~%" PRIu64 "  reconciled %" PRIu64
                               " (%.0f/s)  in flight %zu  queue %zu  scheduled %zu  retries %" PRIu64,
                               events.load(), planned_events, m.reconciled, rate, m.in_flight, m.queued, m.scheduled,
                               m.retries);
      });

  watch.join();
  const bool drained = p.drain_for(120s);  // runs everything accepted, retries and requeues included
  wb.flush();
  const auto elapsed = std::chrono::duration<double>(steady::now() - start).count();
  progress.stop();
  const auto m = p.metrics();
  wb.stop();
  const auto wm = wb.metrics();

  // ---- verification from the database and the metrics ----
  const auto rows = db.read_all();
  std::uint64_t missing = 0, stale = 0, wrong_state = 0, ok_ready = 0, ok_deleted = 0, ok_failed = 0;
  for (std::uint32_t id = 0; id < n; ++id) {
    if (final_version[id] == 0) continue;  // never added
    auto it = rows.find(uid_of(id));
    if (it == rows.end()) {
      ++missing;
      continue;
    }
    if (it->second.version != final_version[id]) {
      ++stale;
      continue;
    }
    const auto d = dead.find(id);
    const bool dead_final = d != dead.end() && d->second == final_version[id];
    const char st = it->second.state;
    if (st == 'F' && dead_final) ++ok_failed;
    else if (st == 'D' && deleted[id]) ++ok_deleted;
    else if (st == 'R' && !deleted[id]) ++ok_ready;
    else ++wrong_state;
  }
  const std::uint64_t objects = std::count_if(final_version.begin(), final_version.end(), [](auto v) { return v != 0; });

  using example::summary_row;
  auto num = [](auto v) { return std::to_string(v); };
  std::printf("\nsluice operator: %u objects, %zu workers, %.2f s\n", n, s.workers, elapsed);
  summary_row("----------------------------------------", "--------------");
  summary_row("watch events (add / update / delete)", num(adds.load()) + " / " + num(updates.load()) + " / " + num(deletes.load()));
  summary_row("submitted to the pipeline", num(m.submitted));
  summary_row("reconciles run", num(m.reconciled) + "  (" + num(static_cast<std::uint64_t>(static_cast<double>(m.reconciled) / elapsed)) + "/s)");
  summary_row("  succeeded / failed / requeue_after", num(m.succeeded) + " / " + num(m.failed) + " / " + num(m.requeues));
  summary_row("retries after failure", num(m.retries));
  summary_row("coalesced (newer version replaced older)", num(m.coalesced));
  summary_row("cancelled (deletes)", num(m.cancelled));
  summary_row("dead-lettered (reported)", num(m.dead_lettered));
  summary_row("unprocessed at shutdown", num(m.unprocessed));
  summary_row("queue latency p50 / p99 (us)", fmt_us(m.queue_latency.percentile(0.5)) + " / " + fmt_us(m.queue_latency.percentile(0.99)));
  summary_row("reconcile time p50 / p99 (us)", fmt_us(m.reconcile_duration.percentile(0.5)) + " / " + fmt_us(m.reconcile_duration.percentile(0.99)));
  summary_row("status rows written (batches)", num(wm.persisted) + " (" + num(wm.batches) + ")  coalesced " + num(wm.coalesced));
  summary_row("database", s.db + (db_file.temporary() ? "  (temporary)" : ""));
  example::verification v(40);
  v.check("no object lost (row for every object)", missing == 0, num(rows.size()) + " rows, " + num(missing) + " missing");
  v.check("final version of every object recorded", stale == 0 && wrong_state == 0,
          num(ok_ready) + " ready, " + num(ok_deleted) + " deleted, " + num(ok_failed) + " dead-lettered; " + num(stale) +
              " stale, " + num(wrong_state) + " wrong state");
  v.check("never reconciled twice at once", overlaps == 0, num(overlaps.load()) + " overlaps");
  v.check("conservation identity", m.balanced(), "submitted = succeeded + dead + discarded + coalesced + cancelled + unprocessed + pending");
  v.check("drained: nothing left pending", drained && m.pending() == 0 && m.unprocessed == 0, num(m.pending()) + " pending");
  v.check("every status write persisted", write_failures == 0 && wm.failed == 0 && wm.enqueued == wm.persisted + wm.coalesced,
          num(wm.enqueued) + " enqueued = " + num(wm.persisted) + " persisted + " + num(wm.coalesced) + " coalesced");
  v.check("objects in the database", rows.size() == objects, num(objects) + " objects");
  const bool ok = v.finish();

  if (s.hold_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(s.hold_ms));
  exposer.reset();
  return ok ? 0 : 1;
}
