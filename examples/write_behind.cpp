// examples/write_behind.cpp — a cache whose writes go through sluice::write_behind into a real
// database: SQLite (default, a file in a temporary folder) or PostgreSQL (--postgres CONNINFO).
//
//   write_behind [--keys N] [--updates M] [--producers P] [--fail-rate p] [--baseline]
//                [--db PATH | --postgres CONNINFO] [--flushers F] [--max-batch B] [--linger-ms L]
//
// Producers update N keys M times in total (a hot fifth of the keys gets most updates), handing
// each update to a keyed batcher: at most one pending value per key, the newest wins. The sink
// writes a batch as one transaction (SQLite: a prepared upsert per row inside BEGIN/COMMIT;
// PostgreSQL: one multi-row INSERT ... ON CONFLICT DO UPDATE). --fail-rate makes a wrapper fail
// random items (some with a retry-after hint) and random whole batches (it throws), to show
// retries. --baseline writes row by row in autocommit mode instead, on the same backend, for the
// ratio. At the end the table is read back: every key must hold its newest value and the
// batcher's counters must balance, else the exit status is 1.
#include <sluice/write_behind.hpp>

#include <CLI/CLI.hpp>
#include <libpq-fe.h>
#include <sqlite3.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <span>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

using namespace std::chrono_literals;

namespace {

struct update {
  std::int64_t key = 0;
  std::int64_t version = 0;  // increases per key in enqueue order: the newest is the largest
  std::string value;
};

std::string value_of(std::int64_t key, std::int64_t version) {
  return "k" + std::to_string(key) + "-v" + std::to_string(version);
}

// ---- backends ------------------------------------------------------------------------------

class backend {
 public:
  virtual ~backend() = default;
  virtual std::string name() const = 0;
  /// Writes the rows in one transaction (throws on failure: nothing was written).
  virtual void write_batch(std::span<const update* const> rows) = 0;
  /// Writes one row in autocommit mode (the baseline).
  virtual void write_one(const update& row) = 0;
  /// Reads the table back: key -> (version, value).
  virtual std::unordered_map<std::int64_t, std::pair<std::int64_t, std::string>> read_all() = 0;
};

constexpr const char* table = "sluice_write_behind_demo";

class sqlite_backend final : public backend {
 public:
  explicit sqlite_backend(const std::string& path) : path_(path) {
    if (sqlite3_open(path.c_str(), &db_) != SQLITE_OK) fail("open");
    sqlite3_busy_timeout(db_, 5000);
    exec(std::string("DROP TABLE IF EXISTS ") + table);
    exec(std::string("CREATE TABLE ") + table +
         " (key INTEGER PRIMARY KEY, version INTEGER NOT NULL, value TEXT NOT NULL)");
    const std::string sql = std::string("INSERT INTO ") + table +
                            " (key, version, value) VALUES (?1, ?2, ?3) ON CONFLICT(key) DO UPDATE SET "
                            "version = excluded.version, value = excluded.value";
    if (sqlite3_prepare_v2(db_, sql.c_str(), -1, &upsert_, nullptr) != SQLITE_OK) fail("prepare");
  }
  ~sqlite_backend() override {
    sqlite3_finalize(upsert_);
    sqlite3_close(db_);
  }
  std::string name() const override { return "SQLite " + path_; }

  void write_batch(std::span<const update* const> rows) override {
    exec("BEGIN");
    try {
      for (const update* r : rows) step(*r);
      exec("COMMIT");
    } catch (...) {
      sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
      throw;
    }
  }
  void write_one(const update& row) override { step(row); }

  std::unordered_map<std::int64_t, std::pair<std::int64_t, std::string>> read_all() override {
    std::unordered_map<std::int64_t, std::pair<std::int64_t, std::string>> out;
    sqlite3_stmt* q = nullptr;
    const std::string sql = std::string("SELECT key, version, value FROM ") + table;
    if (sqlite3_prepare_v2(db_, sql.c_str(), -1, &q, nullptr) != SQLITE_OK) fail("prepare select");
    while (sqlite3_step(q) == SQLITE_ROW) {
      out[sqlite3_column_int64(q, 0)] = {sqlite3_column_int64(q, 1),
                                         reinterpret_cast<const char*>(sqlite3_column_text(q, 2))};
    }
    sqlite3_finalize(q);
    return out;
  }

 private:
  void step(const update& r) {
    sqlite3_reset(upsert_);
    sqlite3_bind_int64(upsert_, 1, r.key);
    sqlite3_bind_int64(upsert_, 2, r.version);
    sqlite3_bind_text(upsert_, 3, r.value.data(), static_cast<int>(r.value.size()), SQLITE_STATIC);
    if (sqlite3_step(upsert_) != SQLITE_DONE) fail("upsert");
  }
  void exec(const std::string& sql) {
    char* err = nullptr;
    if (sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &err) != SQLITE_OK) {
      std::string msg = "sqlite: " + sql + ": " + (err ? err : "?");
      sqlite3_free(err);
      throw std::runtime_error(msg);
    }
  }
  [[noreturn]] void fail(const char* what) {
    throw std::runtime_error(std::string("sqlite ") + what + ": " + sqlite3_errmsg(db_));
  }

  std::string path_;
  sqlite3* db_ = nullptr;
  sqlite3_stmt* upsert_ = nullptr;
};

class postgres_backend final : public backend {
 public:
  postgres_backend(const std::string& conninfo, std::size_t connections) : conninfo_(conninfo) {
    for (std::size_t i = 0; i < connections; ++i) {
      PGconn* c = PQconnectdb(conninfo.c_str());
      if (PQstatus(c) != CONNECTION_OK) {
        std::string msg = std::string("postgres connect: ") + PQerrorMessage(c);
        PQfinish(c);
        throw std::runtime_error(msg);
      }
      PQsetNoticeProcessor(c, [](void*, const char*) {}, nullptr);  // no "table does not exist, skipping"
      free_.push_back(c);
      all_.push_back(c);
    }
    command(free_.front(), std::string("DROP TABLE IF EXISTS ") + table);
    command(free_.front(), std::string("CREATE TABLE ") + table +
                               " (key bigint PRIMARY KEY, version bigint NOT NULL, value text NOT NULL)");
  }
  ~postgres_backend() override {
    for (PGconn* c : all_) PQfinish(c);
  }
  std::string name() const override { return "PostgreSQL"; }

  void write_batch(std::span<const update* const> rows) override {
    // One statement, one implicit transaction: INSERT ... VALUES ($1,$2,$3),... ON CONFLICT.
    std::string sql = std::string("INSERT INTO ") + table + " (key, version, value) VALUES ";
    std::vector<std::string> params;
    params.reserve(rows.size() * 3);
    for (std::size_t i = 0; i < rows.size(); ++i) {
      if (i != 0) sql += ',';
      sql += "($" + std::to_string(3 * i + 1) + "::bigint,$" + std::to_string(3 * i + 2) + "::bigint,$" +
             std::to_string(3 * i + 3) + ")";
      params.push_back(std::to_string(rows[i]->key));
      params.push_back(std::to_string(rows[i]->version));
      params.push_back(rows[i]->value);
    }
    sql += " ON CONFLICT (key) DO UPDATE SET version = EXCLUDED.version, value = EXCLUDED.value";
    std::vector<const char*> values;
    values.reserve(params.size());
    for (const std::string& p : params) values.push_back(p.c_str());
    lease c(*this);
    PGresult* res = PQexecParams(c.conn, sql.c_str(), static_cast<int>(values.size()), nullptr, values.data(),
                                 nullptr, nullptr, 0);
    check(res, c.conn, "batch upsert");
  }

  void write_one(const update& row) override {
    const std::string sql = std::string("INSERT INTO ") + table +
                            " (key, version, value) VALUES ($1::bigint, $2::bigint, $3) ON CONFLICT (key) DO UPDATE "
                            "SET version = EXCLUDED.version, value = EXCLUDED.value";
    const std::string k = std::to_string(row.key), v = std::to_string(row.version);
    const char* values[] = {k.c_str(), v.c_str(), row.value.c_str()};
    lease c(*this);
    check(PQexecParams(c.conn, sql.c_str(), 3, nullptr, values, nullptr, nullptr, 0), c.conn, "upsert");
  }

  std::unordered_map<std::int64_t, std::pair<std::int64_t, std::string>> read_all() override {
    lease c(*this);
    PGresult* res = PQexec(c.conn, (std::string("SELECT key, version, value FROM ") + table).c_str());
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
      std::string msg = PQerrorMessage(c.conn);
      PQclear(res);
      throw std::runtime_error("postgres select: " + msg);
    }
    std::unordered_map<std::int64_t, std::pair<std::int64_t, std::string>> out;
    for (int i = 0; i < PQntuples(res); ++i) {
      out[std::strtoll(PQgetvalue(res, i, 0), nullptr, 10)] = {std::strtoll(PQgetvalue(res, i, 1), nullptr, 10),
                                                               PQgetvalue(res, i, 2)};
    }
    PQclear(res);
    return out;
  }

  std::string setting(const char* name) {
    lease c(*this);
    PGresult* res = PQexec(c.conn, (std::string("SHOW ") + name).c_str());
    std::string out = PQresultStatus(res) == PGRES_TUPLES_OK ? PQgetvalue(res, 0, 0) : "?";
    PQclear(res);
    return out;
  }

 private:
  // One connection per concurrent sink call (flushers > 1 use several).
  struct lease {
    explicit lease(postgres_backend& b) : owner(b) {
      std::lock_guard lock(owner.m_);
      conn = owner.free_.back();
      owner.free_.pop_back();
    }
    ~lease() {
      std::lock_guard lock(owner.m_);
      owner.free_.push_back(conn);
    }
    postgres_backend& owner;
    PGconn* conn;
  };
  static void check(PGresult* res, PGconn* c, const char* what) {
    const auto status = PQresultStatus(res);
    PQclear(res);
    if (status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK) {
      throw std::runtime_error(std::string("postgres ") + what + ": " + PQerrorMessage(c));
    }
  }
  static void command(PGconn* c, const std::string& sql) { check(PQexec(c, sql.c_str()), c, sql.c_str()); }

  std::string conninfo_;
  std::mutex m_;
  std::vector<PGconn*> free_;
  std::vector<PGconn*> all_;
};

// ---- the workload ----------------------------------------------------------------------------

// Producer p owns the keys k with k % producers == p, so "newest" per key is its enqueue order.
struct workload {
  std::int64_t keys;
  std::int64_t updates;
  int producers;
  std::uint64_t seed;

  // Calls f(update) for producer p's share, in order; hot keys (a fifth) get 80% of updates.
  template <class F>
  void generate(int p, F&& f) const {
    std::mt19937_64 rng(seed + static_cast<std::uint64_t>(p) * 7919);
    const std::int64_t mine = (keys - p + producers - 1) / producers;  // keys p, p+P, ...
    if (mine <= 0) return;
    const std::int64_t hot = std::max<std::int64_t>(1, mine / 5);
    const std::int64_t count = updates / producers + (p < updates % producers ? 1 : 0);
    std::vector<std::int64_t> next_version(static_cast<std::size_t>(mine), 0);
    for (std::int64_t i = 0; i < count; ++i) {
      // Every key gets its first update in the first pass, so every key ends up in the table.
      std::int64_t slot;
      if (i < mine) {
        slot = i;
      } else if (rng() % 10 < 8) {
        slot = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(hot));
      } else {
        slot = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(mine));
      }
      const std::int64_t key = slot * producers + p;
      const std::int64_t version = ++next_version[static_cast<std::size_t>(slot)];
      f(update{key, version, value_of(key, version)});
    }
  }
};

std::string rate(double per_second) {
  char buf[64];
  if (per_second >= 1e6) {
    std::snprintf(buf, sizeof buf, "%.2fM/s", per_second / 1e6);
  } else if (per_second >= 1e3) {
    std::snprintf(buf, sizeof buf, "%.1fk/s", per_second / 1e3);
  } else {
    std::snprintf(buf, sizeof buf, "%.0f/s", per_second);
  }
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"A cache writing through sluice::write_behind into SQLite or PostgreSQL, verified at the end"};
  std::int64_t keys = 10000;
  std::int64_t updates = 200000;
  int producers = 2;
  double fail_rate = 0.0;
  bool baseline = false;
  std::string db_path;
  std::string conninfo;
  std::size_t flushers = 1;
  std::size_t max_batch = 512;
  double linger_ms = 5.0;
  std::uint64_t seed = 42;
  app.add_option("--keys", keys, "distinct keys")->check(CLI::PositiveNumber);
  app.add_option("--updates", updates, "updates in total (hot keys repeat)")->check(CLI::PositiveNumber);
  app.add_option("--producers", producers, "producer threads")->check(CLI::Range(1, 64));
  app.add_option("--fail-rate", fail_rate, "fraction of items and of whole batches the sink fails")
      ->check(CLI::Range(0.0, 0.5));
  app.add_flag("--baseline", baseline, "row-at-a-time autocommit on the same backend, no batcher");
  app.add_option("--db", db_path, "SQLite file (default: a file in a new temporary folder)");
  app.add_option("--postgres", conninfo, "libpq connection string: use PostgreSQL instead of SQLite");
  app.add_option("--flushers", flushers, "batches in the sink at once (PostgreSQL: one connection each)")
      ->check(CLI::Range(1, 16));
  app.add_option("--max-batch", max_batch, "values per batch")->check(CLI::Range(1, 4096));
  app.add_option("--linger-ms", linger_ms, "max wait of a batch's oldest value")->check(CLI::Range(0.0, 1000.0));
  app.add_option("--seed", seed, "workload and fault-injection seed");
  CLI11_PARSE(app, argc, argv);
  if (keys > updates) keys = updates;
  if (producers > keys) producers = static_cast<int>(keys);

  std::optional<std::filesystem::path> temp_dir;
  std::unique_ptr<backend> db;
  std::string durability;
  try {
    if (!conninfo.empty()) {
      auto pg = std::make_unique<postgres_backend>(conninfo, flushers);
      durability = "fsync=" + pg->setting("fsync") + " synchronous_commit=" + pg->setting("synchronous_commit");
      db = std::move(pg);
    } else {
      if (db_path.empty()) {
        temp_dir = std::filesystem::temp_directory_path() /
                   ("sluice-write-behind-" + std::to_string(::getpid()));
        std::filesystem::create_directories(*temp_dir);
        db_path = (*temp_dir / "cache.db").string();
      }
      if (flushers != 1) {
        std::fprintf(stderr, "note: SQLite has one writer; using --flushers 1\n");
        flushers = 1;
      }
      db = std::make_unique<sqlite_backend>(db_path);
      durability = "journal_mode=delete synchronous=full (SQLite defaults)";
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "write_behind: %s\n", e.what());
    return 2;
  }

  const workload work{keys, updates, producers, seed};
  std::vector<std::unordered_map<std::int64_t, std::int64_t>> newest(static_cast<std::size_t>(producers));
  const bool tty = ::isatty(STDOUT_FILENO) != 0;
  std::printf("backend: %s (%s)\nmode: %s, %" PRId64 " keys, %" PRId64 " updates, %d producer(s), fail-rate %.3f\n",
              db->name().c_str(), durability.c_str(), baseline ? "baseline (row at a time, autocommit)" : "write_behind",
              keys, updates, producers, fail_rate);

  const auto start = std::chrono::steady_clock::now();
  sluice::write_behind_metrics m{};
  std::atomic<std::uint64_t> injected_batches{0}, injected_items{0};
  std::atomic<std::uint64_t> on_failed_calls{0};

  if (baseline) {
    std::uint64_t done = 0;
    for (int p = 0; p < producers; ++p) {
      work.generate(p, [&](update&& u) {
        newest[static_cast<std::size_t>(p)][u.key] = u.version;
        db->write_one(u);
        ++done;
        if (tty && done % 256 == 0) {
          const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
          std::printf("\r  %" PRIu64 " rows  %s   ", done, rate(static_cast<double>(done) / s).c_str());
          std::fflush(stdout);
        }
      });
    }
    m.enqueued = m.persisted = done;
    m.batches = done;
  } else {
    std::mutex fault_mutex;
    std::mt19937_64 faults(seed ^ 0x9e3779b97f4a7c15ULL);
    sluice::write_behind_options<update, std::int64_t> options{
        .capacity = std::max<std::size_t>(8192, max_batch),
        .max_batch = max_batch,
        .linger = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::duration<double, std::milli>(linger_ms)),
        .retry = {.base = 1ms, .max = 50ms, .multiplier = 2.0, .jitter = sluice::jitter_mode::equal, .max_retries = 30},
        .flushers = flushers,
        .drain_timeout = 60s,
    };
    options.on_failed = [&](update&& u, const sluice::write_behind_failure& f) {
      ++on_failed_calls;
      std::fprintf(stderr, "on_failed: key %" PRId64 " version %" PRId64 ": %s: %s\n", u.key, u.version,
                   std::string(sluice::to_string(f.reason)).c_str(), f.message.c_str());
    };
    // The sink: a fault-injecting wrapper around one transaction per batch.
    auto sink = [&](std::span<const update> batch, sluice::write_behind_results& results) {
      std::vector<const update*> rows;
      rows.reserve(batch.size());
      if (fail_rate > 0) {
        std::lock_guard lock(fault_mutex);
        std::uniform_real_distribution<double> u(0.0, 1.0);
        if (u(faults) < fail_rate) {
          ++injected_batches;
          throw std::runtime_error("injected: connection reset by peer");
        }
        for (std::size_t i = 0; i < batch.size(); ++i) {
          const double x = u(faults);
          if (x < fail_rate / 2) {
            results.retry(i);  // e.g. a serialization failure on this row
            ++injected_items;
          } else if (x < fail_rate) {
            results.retry(i, 5ms);  // e.g. a throttled row with a retry-after hint
            ++injected_items;
          } else {
            rows.push_back(&batch[i]);
          }
        }
      } else {
        for (const update& u : batch) rows.push_back(&u);
      }
      if (!rows.empty()) db->write_batch(rows);  // throws: the whole batch is retried
    };
    sluice::write_behind<update, std::int64_t> wb(options, sink);

    std::jthread progress;
    if (tty) {
      progress = std::jthread([&](std::stop_token st) {
        while (!st.stop_requested()) {
          std::this_thread::sleep_for(200ms);
          const auto pm = wb.metrics();
          const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
          std::printf("\r  enqueued %" PRIu64 "  persisted %" PRIu64 "  %s  in flight %zu  retrying %zu  retries %" PRIu64
                      "  coalesced %" PRIu64 "   ",
                      pm.enqueued, pm.persisted, rate(static_cast<double>(pm.enqueued) / s).c_str(), pm.in_flight,
                      pm.in_retry, pm.retries, pm.coalesced);
          std::fflush(stdout);
        }
      });
    }
    std::vector<std::jthread> threads;
    for (int p = 0; p < producers; ++p) {
      threads.emplace_back([&, p] {
        auto& mine = newest[static_cast<std::size_t>(p)];
        work.generate(p, [&](update&& u) {
          mine[u.key] = u.version;
          if (wb.enqueue(std::move(u)) != sluice::write_behind_status::ok) std::abort();  // never: not stopped
        });
      });
    }
    threads.clear();
    wb.flush();
    wb.stop();
    if (progress.joinable()) {
      progress.request_stop();
      progress.join();
    }
    m = wb.metrics();
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (tty) std::printf("\r%120s\r", "");

  // ---- summary ------------------------------------------------------------------------------
  const double avg_batch = m.batches ? static_cast<double>(m.persisted) / static_cast<double>(m.batches) : 0.0;
  std::printf("\n| metric | value |\n|---|---|\n");
  std::printf("| elapsed | %.3f s |\n", seconds);
  std::printf("| updates/s (enqueue to persisted) | %s |\n", rate(static_cast<double>(updates) / seconds).c_str());
  std::printf("| enqueued | %" PRIu64 " |\n| persisted | %" PRIu64 " |\n| coalesced | %" PRIu64 " |\n", m.enqueued,
              m.persisted, m.coalesced);
  std::printf("| failed | %" PRIu64 " |\n| retries | %" PRIu64 " |\n| batches | %" PRIu64 " (avg %.1f rows) |\n",
              m.failed, m.retries, m.batches, avg_batch);
  std::printf("| sink errors (batches thrown) | %" PRIu64 " |\n| injected item faults | %" PRIu64 " |\n",
              m.sink_errors, injected_items.load());

  // ---- verification --------------------------------------------------------------------------
  bool ok = true;
  auto complain = [&](const std::string& what) {
    if (ok) std::printf("\nVERIFICATION FAILED:\n");
    ok = false;
    std::printf("  %s\n", what.c_str());
  };
  if (m.enqueued != static_cast<std::uint64_t>(updates)) {
    complain("enqueued " + std::to_string(m.enqueued) + " != updates " + std::to_string(updates));
  }
  if (m.enqueued != m.persisted + m.failed + m.coalesced) complain("metrics do not balance");
  if (m.in_intake + m.pending + m.in_retry + m.in_flight != 0) complain("values still held after stop()");
  if (m.failed != 0 || on_failed_calls != 0) complain(std::to_string(m.failed) + " values reported failed");
  std::size_t checked = 0, wrong = 0;
  try {
    const auto rows = db->read_all();
    std::size_t expected_keys = 0;
    for (const auto& mine : newest) {
      expected_keys += mine.size();
      for (const auto& [key, version] : mine) {
        ++checked;
        auto it = rows.find(key);
        if (it == rows.end() || it->second.first != version || it->second.second != value_of(key, version)) {
          if (++wrong <= 5) {
            complain("key " + std::to_string(key) + ": expected version " + std::to_string(version) + ", found " +
                     (it == rows.end() ? std::string("nothing") : std::to_string(it->second.first)));
          }
        }
      }
    }
    if (rows.size() != expected_keys) {
      complain("table has " + std::to_string(rows.size()) + " rows, expected " + std::to_string(expected_keys));
    }
  } catch (const std::exception& e) {
    complain(std::string("read back: ") + e.what());
  }
  if (wrong > 5) complain("... " + std::to_string(wrong) + " keys wrong in total");
  if (ok) {
    std::printf("\nverified: %zu keys hold their newest value; enqueued == persisted + failed + coalesced "
                "(%" PRIu64 " == %" PRIu64 " + %" PRIu64 " + %" PRIu64 ")\n",
                checked, m.enqueued, m.persisted, m.failed, m.coalesced);
  }
  db.reset();
  if (temp_dir) {
    std::error_code ec;
    std::filesystem::remove_all(*temp_dir, ec);
  }
  return ok ? 0 : 1;
}
