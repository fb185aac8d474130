// A background job service (seed 001, AsyncEndpoints) on sluice::reconcile_pipeline.
//
// Jobs live in SQLite (a file in a temporary folder, or --db PATH) and move Queued -> InProgress ->
// Completed, or -> Failed once their retries with backoff are spent. Every state change is written
// through sluice::write_behind (keyed by job id: the newest state wins, never an older one after a
// newer one); the sink fails a share of its batches on purpose (--write-fail-rate) and the batcher
// retries them, so a failed status write never strands a job.
//
// --crash-after N ends the process abruptly (std::_Exit: no shutdown, no flush) once N jobs have
// started. A second run on the same --db finds the jobs left InProgress, requeues them, completes
// the rest and verifies from the database that every job ended Completed or Failed exactly once
// across both runs, none left Queued or InProgress. A job interrupted by the crash runs again
// (at-least-once execution); the summary reports how many did.
#include <sluice/reconcile_pipeline.hpp>
#include <sluice/write_behind.hpp>

#include "common/cli.hpp"
#include "common/progress.hpp"
#include "common/report.hpp"
#include "common/sqlite.hpp"
#include "common/temp_folder.hpp"

#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

namespace {

struct settings {
  std::uint32_t jobs = 20'000;
  std::size_t workers = 8;
  std::uint32_t work_us = 300;
  double fail_rate = 0.1;
  double write_fail_rate = 0.05;
  std::uint32_t max_retries = 3;
  std::uint64_t crash_after = 0;
  std::uint64_t seed = 7;
  std::string db;
  bool quiet = false;
};

enum class job_state : int { queued = 0, in_progress = 1, completed = 2, failed = 3 };
struct job {
  std::uint32_t id = 0;
  std::uint32_t runs_before = 0;  // executions started by earlier runs (from the database)
};

// A state change to persist. Absolute values only, so that coalescing (newest wins) is safe.
struct job_update {
  std::uint32_t key = 0;  // the job id
  job_state state = job_state::queued;
  std::uint32_t runs = 0;      // executions started, all runs together
  std::uint32_t attempts = 0;  // attempts in the run that wrote this
};

// The jobs table (examples/common/sqlite.hpp for the connection and the batched transaction).
class database {
 public:
  explicit database(const std::string& path) : db_(path) {
    db_.exec("CREATE TABLE IF NOT EXISTS jobs(id INTEGER PRIMARY KEY, state INTEGER NOT NULL, runs INTEGER NOT NULL, "
             "attempts INTEGER NOT NULL, terminal_writes INTEGER NOT NULL)");
    update_ = db_.prepare("UPDATE jobs SET state = ?2, runs = ?3, attempts = ?4, "
                          "terminal_writes = terminal_writes + (?2 >= 2) WHERE id = ?1");
  }

  std::uint64_t count(const char* where) {
    return static_cast<std::uint64_t>(db_.scalar(std::string("SELECT count(*) FROM jobs WHERE ") + where));
  }
  void seed_jobs(std::uint32_t n) {
    db_.exec("BEGIN");
    example::sqlite_statement st = db_.prepare("INSERT INTO jobs(id, state, runs, attempts, terminal_writes) VALUES(?1, 0, 0, 0, 0)");
    for (std::uint32_t i = 0; i < n; ++i) {
      st.bind(1, std::int64_t{i});
      (void)st.step();
      st.reset();
    }
    db_.exec("COMMIT");
  }
  // Jobs an earlier run left InProgress (it crashed): back to Queued. Returns how many.
  std::uint64_t requeue_interrupted() {
    const std::uint64_t n = count("state = 1");
    db_.exec("UPDATE jobs SET state = 0 WHERE state = 1");
    return n;
  }
  std::vector<job> queued() {
    std::vector<job> out;
    example::sqlite_statement st = db_.prepare("SELECT id, runs FROM jobs WHERE state = 0 ORDER BY id");
    while (st.step() == SQLITE_ROW) {
      out.push_back(job{static_cast<std::uint32_t>(st.column_int(0)), static_cast<std::uint32_t>(st.column_int(1))});
    }
    return out;
  }
  bool write(std::span<const job_update> rows) {
    return db_.write_batch(update_, rows, [](example::sqlite_statement& st, const job_update& r) {
      st.bind(1, std::int64_t{r.key});
      st.bind(2, static_cast<std::int64_t>(r.state));
      st.bind(3, std::int64_t{r.runs});
      st.bind(4, std::int64_t{r.attempts});
    });
  }

 private:
  example::sqlite_db db_;
  example::sqlite_statement update_;
};

using pipeline = sluice::reconcile_pipeline<job, sluice::key_member<&job::id>>;
using batcher = sluice::write_behind<job_update, std::uint32_t>;

}  // namespace

int main(int argc, char** argv) {
  settings s;
  CLI::App app{"Background job worker (seed 001) on sluice::reconcile_pipeline with job states in SQLite through "
               "sluice::write_behind; --crash-after N then a second run on the same --db recovers and verifies."};
  using example::add_defaulted;
  using example::add_ranged;
  add_ranged(app, "--jobs", s.jobs, "jobs to create in a new database", 1u, 10'000'000u);
  add_ranged(app, "--workers", s.workers, "max_parallel", std::size_t{1}, std::size_t{1024});
  add_defaulted(app, "--work-us", s.work_us, "mean simulated work per attempt (microseconds)");
  add_ranged(app, "--fail-rate", s.fail_rate, "probability that an attempt fails", 0.0, 0.95);
  add_ranged(app, "--write-fail-rate", s.write_fail_rate, "probability that a status batch fails to write (retried)", 0.0, 0.9);
  add_defaulted(app, "--max-retries", s.max_retries, "retries before a job is Failed");
  add_defaulted(app, "--crash-after", s.crash_after, "exit abruptly (status 3) after this many jobs started (0: never)");
  example::add_seed_option(app, s.seed);
  example::add_db_option(app, s.db);
  example::add_quiet_flag(app, s.quiet);
  CLI11_PARSE(app, argc, argv);

  const example::database_file db_file(s.db, "sluice-jobs", "jobs.db");  // --db, or a temporary file
  if (!db_file.ok()) return 2;
  const auto start = steady::now();
  database db(s.db);
  bool fresh = false;
  if (db.count("1") == 0) {
    db.seed_jobs(s.jobs);
    fresh = true;
  }
  const std::uint64_t recovered = db.requeue_interrupted();
  const std::vector<job> todo = db.queued();
  const std::uint64_t total = db.count("1");
  std::printf("job worker: %s, %" PRIu64 " jobs in the database, %zu queued, %" PRIu64
              " found InProgress (interrupted by a crash) and requeued\n",
              fresh ? "new database" : "existing database", total, todo.size(), recovered);

  std::atomic<std::uint64_t> started{0}, completed{0}, failed{0}, write_errors{0}, lost_writes{0};
  std::mt19937_64 sink_rng(s.seed ^ 0xabcdef);
  batcher wb({.capacity = 8192, .max_batch = 512, .linger = 5ms,
              .retry = {.base = 2ms, .max = 50ms, .multiplier = 2.0, .jitter = sluice::jitter_mode::equal, .max_retries = std::nullopt},
              .on_failed = [&](job_update&&, const sluice::write_behind_failure&) { ++lost_writes; }},
             [&](std::span<const job_update> rows, sluice::write_behind_results& r) {
               if (std::uniform_real_distribution<double>(0, 1)(sink_rng) < s.write_fail_rate || !db.write(rows)) {
                 ++write_errors;
                 r.retry_all();  // e.g. SQLITE_BUSY: the whole batch again, after backoff
               }
             });

  pipeline::options o;
  o.max_parallel = s.workers;
  o.capacity = 2048;
  o.backoff.base = 2ms;
  o.backoff.max = 50ms;
  o.backoff.max_retries = s.max_retries;
  o.jitter_seed = s.seed;
  o.on_dead_letter = [&](sluice::dead_letter<std::uint32_t, job>&& d) {
    ++failed;
    (void)wb.enqueue(job_update{d.key, job_state::failed, d.entity.runs_before + 1, d.failures});
  };
  pipeline p(o, [&](const job& j, const pipeline::context& ctx) -> sluice::reconcile_result {
    thread_local std::mt19937_64 rng(std::random_device{}());
    if (ctx.attempt == 1) {
      const std::uint64_t n = ++started;
      (void)wb.enqueue(job_update{j.id, job_state::in_progress, j.runs_before + 1, 1});
      if (s.crash_after != 0 && n >= s.crash_after) {
        std::fprintf(stderr, "\njob worker: --crash-after %" PRIu64 " reached: exiting abruptly (no shutdown, no flush)\n", s.crash_after);
        std::fflush(stderr);
        std::_Exit(3);
      }
    }
    std::exponential_distribution<double> work(1.0 / std::max<double>(1.0, s.work_us));
    std::this_thread::sleep_for(std::chrono::microseconds(static_cast<std::int64_t>(work(rng))));
    if (std::uniform_real_distribution<double>(0, 1)(rng) < s.fail_rate) {
      return sluice::reconcile_result::failure("job " + std::to_string(j.id) + ": transient error");
    }
    ++completed;
    (void)wb.enqueue(job_update{j.id, job_state::completed, j.runs_before + 1, ctx.attempt});
    return sluice::reconcile_result::done();
  });

  example::progress_line progress(s.quiet, start, 100ms, [&](steady::time_point) {
    const auto m = p.metrics();
    return example::format("started %" PRIu64 "/%zu  completed %" PRIu64 "  failed %" PRIu64 "  retries %" PRIu64
                           "  in flight %zu  queue %zu",
                           started.load(), todo.size(), completed.load(), failed.load(), m.retries, m.in_flight, m.queued);
  });

  // The producer: every queued job is submitted once; submit() blocks while the intake is full
  // (backpressure), and nothing sleeps between claims (the seed slept a polling interval even after
  // a successful claim).
  for (const job& j : todo) (void)p.submit(job(j));
  const bool drained = p.drain_for(300s);
  wb.flush();
  wb.stop();
  progress.stop();
  const auto m = p.metrics();
  const auto wm = wb.metrics();
  const double elapsed = std::chrono::duration<double>(steady::now() - start).count();

  const std::uint64_t left = db.count("state < 2");
  const std::uint64_t done_c = db.count("state = 2");
  const std::uint64_t done_f = db.count("state = 3");
  const std::uint64_t not_once = db.count("terminal_writes != 1");
  const std::uint64_t rerun = db.count("runs > 1");
  using example::format;
  using example::summary_row;
  std::printf("\n");
  summary_row("elapsed", format("%.2f s", elapsed));
  summary_row("jobs run in this process", format("%zu (%" PRIu64 " started, %" PRIu64 " completed, %" PRIu64 " failed after %u retries)",
                                                 todo.size(), started.load(), completed.load(), failed.load(), s.max_retries));
  summary_row("retries after failure", format("%" PRIu64, m.retries));
  summary_row("status writes", format("%" PRIu64 " batches, %" PRIu64 " failed and retried", wm.batches, write_errors.load()));
  summary_row("recovered InProgress jobs", format("%" PRIu64 " (interrupted by a crash, requeued at start)", recovered));
  summary_row("jobs executed more than once", format("%" PRIu64 " (at-least-once: started in a crashed run and again here)", rerun));
  summary_row("database", format("%" PRIu64 " Completed, %" PRIu64 " Failed, %" PRIu64 " Queued/InProgress", done_c, done_f, left));
  example::verification v;
  v.check("every job Completed or Failed", left == 0 && done_c + done_f == total, std::to_string(left) + " left");
  v.check("each job reached a final state exactly once", not_once == 0, std::to_string(not_once) + " jobs written final != 1 time");
  v.check("pipeline drained, conservation holds", drained && m.balanced() && m.pending() == 0, "");
  v.check("no status write lost", lost_writes == 0 && wm.failed == 0, std::to_string(wm.persisted) + " persisted");
  const bool ok = v.finish();
  return ok ? 0 : 1;
}
