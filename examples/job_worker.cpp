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

#include <CLI/CLI.hpp>
#include <sqlite3.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
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

class database {
 public:
  explicit database(const std::string& path) {
    if (sqlite3_open(path.c_str(), &db_) != SQLITE_OK) throw std::runtime_error("sqlite3_open " + path);
    exec("PRAGMA journal_mode=WAL");
    exec("PRAGMA synchronous=NORMAL");
    exec("CREATE TABLE IF NOT EXISTS jobs(id INTEGER PRIMARY KEY, state INTEGER NOT NULL, runs INTEGER NOT NULL, "
         "attempts INTEGER NOT NULL, terminal_writes INTEGER NOT NULL)");
    prepare("UPDATE jobs SET state = ?2, runs = ?3, attempts = ?4, "
            "terminal_writes = terminal_writes + (?2 >= 2) WHERE id = ?1", &update_);
  }
  ~database() {
    sqlite3_finalize(update_);
    sqlite3_close(db_);
  }
  database(const database&) = delete;
  database& operator=(const database&) = delete;

  std::uint64_t count(const char* where) {
    sqlite3_stmt* st = nullptr;
    const std::string sql = std::string("SELECT count(*) FROM jobs WHERE ") + where;
    sqlite3_prepare_v2(db_, sql.c_str(), -1, &st, nullptr);
    std::uint64_t n = 0;
    if (sqlite3_step(st) == SQLITE_ROW) n = static_cast<std::uint64_t>(sqlite3_column_int64(st, 0));
    sqlite3_finalize(st);
    return n;
  }
  void seed_jobs(std::uint32_t n) {
    exec("BEGIN");
    sqlite3_stmt* st = nullptr;
    prepare("INSERT INTO jobs(id, state, runs, attempts, terminal_writes) VALUES(?1, 0, 0, 0, 0)", &st);
    for (std::uint32_t i = 0; i < n; ++i) {
      sqlite3_bind_int64(st, 1, i);
      sqlite3_step(st);
      sqlite3_reset(st);
    }
    sqlite3_finalize(st);
    exec("COMMIT");
  }
  // Jobs an earlier run left InProgress (it crashed): back to Queued. Returns how many.
  std::uint64_t requeue_interrupted() {
    const std::uint64_t n = count("state = 1");
    exec("UPDATE jobs SET state = 0 WHERE state = 1");
    return n;
  }
  std::vector<job> queued() {
    std::vector<job> out;
    sqlite3_stmt* st = nullptr;
    prepare("SELECT id, runs FROM jobs WHERE state = 0 ORDER BY id", &st);
    while (sqlite3_step(st) == SQLITE_ROW) {
      out.push_back(job{static_cast<std::uint32_t>(sqlite3_column_int64(st, 0)), static_cast<std::uint32_t>(sqlite3_column_int64(st, 1))});
    }
    sqlite3_finalize(st);
    return out;
  }
  bool write(std::span<const job_update> rows) {
    if (sqlite3_exec(db_, "BEGIN", nullptr, nullptr, nullptr) != SQLITE_OK) return false;
    for (const auto& r : rows) {
      sqlite3_bind_int64(update_, 1, r.key);
      sqlite3_bind_int(update_, 2, static_cast<int>(r.state));
      sqlite3_bind_int64(update_, 3, r.runs);
      sqlite3_bind_int64(update_, 4, r.attempts);
      const int rc = sqlite3_step(update_);
      sqlite3_reset(update_);
      if (rc != SQLITE_DONE) {
        sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
        return false;
      }
    }
    return sqlite3_exec(db_, "COMMIT", nullptr, nullptr, nullptr) == SQLITE_OK;
  }

 private:
  void exec(const char* sql) {
    char* err = nullptr;
    if (sqlite3_exec(db_, sql, nullptr, nullptr, &err) != SQLITE_OK) {
      std::string e = err ? err : "?";
      sqlite3_free(err);
      throw std::runtime_error(std::string(sql) + ": " + e);
    }
  }
  void prepare(const char* sql, sqlite3_stmt** st) {
    if (sqlite3_prepare_v2(db_, sql, -1, st, nullptr) != SQLITE_OK) throw std::runtime_error(sqlite3_errmsg(db_));
  }
  sqlite3* db_ = nullptr;
  sqlite3_stmt* update_ = nullptr;
};

using pipeline = sluice::reconcile_pipeline<job, sluice::key_member<&job::id>>;
using batcher = sluice::write_behind<job_update, std::uint32_t>;

}  // namespace

int main(int argc, char** argv) {
  settings s;
  CLI::App app{"Background job worker (seed 001) on sluice::reconcile_pipeline with job states in SQLite through "
               "sluice::write_behind; --crash-after N then a second run on the same --db recovers and verifies."};
  app.add_option("--jobs", s.jobs, "jobs to create in a new database")->capture_default_str()->check(CLI::Range(1u, 10'000'000u));
  app.add_option("--workers", s.workers, "max_parallel")->capture_default_str()->check(CLI::Range(std::size_t{1}, std::size_t{1024}));
  app.add_option("--work-us", s.work_us, "mean simulated work per attempt (microseconds)")->capture_default_str();
  app.add_option("--fail-rate", s.fail_rate, "probability that an attempt fails")->capture_default_str()->check(CLI::Range(0.0, 0.95));
  app.add_option("--write-fail-rate", s.write_fail_rate, "probability that a status batch fails to write (retried)")
      ->capture_default_str()->check(CLI::Range(0.0, 0.9));
  app.add_option("--max-retries", s.max_retries, "retries before a job is Failed")->capture_default_str();
  app.add_option("--crash-after", s.crash_after, "exit abruptly (status 3) after this many jobs started (0: never)")->capture_default_str();
  app.add_option("--seed", s.seed, "random seed")->capture_default_str();
  app.add_option("--db", s.db, "SQLite database file (default: a file in a new temporary folder, removed at exit)");
  app.add_flag("--quiet", s.quiet, "no progress line");
  CLI11_PARSE(app, argc, argv);

  std::filesystem::path temp_dir;
  if (s.db.empty()) {
    char tmpl[] = "/tmp/sluice-jobs-XXXXXX";
    if (mkdtemp(tmpl) == nullptr) {
      std::perror("mkdtemp");
      return 2;
    }
    temp_dir = tmpl;
    s.db = (temp_dir / "jobs.db").string();
  }
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

  const bool tty = isatty(STDERR_FILENO) != 0 && !s.quiet;
  std::atomic<bool> progressing{true};
  std::thread progress([&] {
    auto next_line = steady::now();
    while (progressing) {
      std::this_thread::sleep_for(100ms);
      const auto now = steady::now();
      if (s.quiet || (!tty && now < next_line)) continue;
      next_line = now + 2s;
      const auto m = p.metrics();
      std::fprintf(stderr, "%s[%5.1fs] started %" PRIu64 "/%zu  completed %" PRIu64 "  failed %" PRIu64 "  retries %" PRIu64
                   "  in flight %zu  queue %zu   %s",
                   tty ? "\r" : "", std::chrono::duration<double>(now - start).count(), started.load(), todo.size(),
                   completed.load(), failed.load(), m.retries, m.in_flight, m.queued, tty ? "" : "\n");
    }
    if (tty) std::fprintf(stderr, "\n");
  });

  // The producer: every queued job is submitted once; submit() blocks while the intake is full
  // (backpressure), and nothing sleeps between claims (the seed slept a polling interval even after
  // a successful claim).
  for (const job& j : todo) (void)p.submit(job(j));
  const bool drained = p.drain_for(300s);
  wb.flush();
  wb.stop();
  progressing = false;
  progress.join();
  const auto m = p.metrics();
  const auto wm = wb.metrics();
  const double elapsed = std::chrono::duration<double>(steady::now() - start).count();

  const std::uint64_t left = db.count("state < 2");
  const std::uint64_t done_c = db.count("state = 2");
  const std::uint64_t done_f = db.count("state = 3");
  const std::uint64_t not_once = db.count("terminal_writes != 1");
  const std::uint64_t rerun = db.count("runs > 1");
  std::printf("\n  %-44s %.2f s\n", "elapsed", elapsed);
  std::printf("  %-44s %zu (%" PRIu64 " started, %" PRIu64 " completed, %" PRIu64 " failed after %u retries)\n",
              "jobs run in this process", todo.size(), started.load(), completed.load(), failed.load(), s.max_retries);
  std::printf("  %-44s %" PRIu64 "\n", "retries after failure", m.retries);
  std::printf("  %-44s %" PRIu64 " batches, %" PRIu64 " failed and retried\n", "status writes", wm.batches, write_errors.load());
  std::printf("  %-44s %" PRIu64 " (interrupted by a crash, requeued at start)\n", "recovered InProgress jobs", recovered);
  std::printf("  %-44s %" PRIu64 " (at-least-once: started in a crashed run and again here)\n", "jobs executed more than once", rerun);
  std::printf("  %-44s %" PRIu64 " Completed, %" PRIu64 " Failed, %" PRIu64 " Queued/InProgress\n", "database", done_c, done_f, left);
  std::printf("verification\n");
  bool ok = true;
  auto check = [&](const char* what, bool pass, const std::string& detail) {
    std::printf("  [%s] %-44s %s\n", pass ? " ok " : "FAIL", what, detail.c_str());
    ok = ok && pass;
  };
  check("every job Completed or Failed", left == 0 && done_c + done_f == total, std::to_string(left) + " left");
  check("each job reached a final state exactly once", not_once == 0, std::to_string(not_once) + " jobs written final != 1 time");
  check("pipeline drained, conservation holds", drained && m.balanced() && m.pending() == 0, "");
  check("no status write lost", lost_writes == 0 && wm.failed == 0, std::to_string(wm.persisted) + " persisted");
  std::printf("%s\n", ok ? "verification passed" : "verification FAILED");
  if (!temp_dir.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(temp_dir, ec);
  }
  return ok ? 0 : 1;
}
