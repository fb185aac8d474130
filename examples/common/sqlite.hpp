// examples/common/sqlite.hpp — the examples' SQLite access: one RAII connection (WAL journal,
// synchronous=NORMAL), statements that finalize themselves, and a batch written in one
// transaction that rolls back on the first failed row.
//
// For the examples only (not part of the library, which has no dependencies). Setup errors throw
// std::runtime_error naming the SQL; write_batch() returns false instead, so a write-behind sink
// can ask for a retry.
#pragma once

#include <sqlite3.h>

#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <utility>

namespace example {

/// A prepared statement, finalized when it goes away. Bind indices start at 1, columns at 0.
class sqlite_statement {
 public:
  sqlite_statement() = default;
  sqlite_statement(sqlite3* db, const std::string& sql) {
    if (sqlite3_prepare_v2(db, sql.c_str(), -1, &st_, nullptr) != SQLITE_OK) {
      throw std::runtime_error("sqlite prepare: " + sql + ": " + sqlite3_errmsg(db));
    }
  }
  ~sqlite_statement() { sqlite3_finalize(st_); }
  sqlite_statement(sqlite_statement&& o) noexcept : st_(std::exchange(o.st_, nullptr)) {}
  sqlite_statement& operator=(sqlite_statement&& o) noexcept {
    std::swap(st_, o.st_);
    return *this;
  }

  void bind(int index, std::int64_t v) { sqlite3_bind_int64(st_, index, static_cast<sqlite3_int64>(v)); }
  /// Binds text without copying it: `v` must outlive the next step().
  void bind(int index, const std::string& v) {
    sqlite3_bind_text(st_, index, v.data(), static_cast<int>(v.size()), SQLITE_STATIC);
  }
  /// Binds one character as a one-letter text value (copied).
  void bind_char(int index, char c) { sqlite3_bind_text(st_, index, &c, 1, SQLITE_TRANSIENT); }

  /// Runs one step: SQLITE_ROW, SQLITE_DONE or an error code.
  int step() { return sqlite3_step(st_); }
  /// Rewinds the statement for the next bindings (the bindings themselves are kept).
  void reset() { sqlite3_reset(st_); }

  std::int64_t column_int(int column) const { return sqlite3_column_int64(st_, column); }
  std::string column_text(int column) const {
    const auto* text = sqlite3_column_text(st_, column);
    return text != nullptr ? reinterpret_cast<const char*>(text) : "";
  }

 private:
  sqlite3_stmt* st_ = nullptr;
};

/// One SQLite connection in WAL mode, closed when it goes away.
class sqlite_db {
 public:
  explicit sqlite_db(const std::string& path) {
    if (sqlite3_open(path.c_str(), &db_) != SQLITE_OK) {
      sqlite3_close(db_);
      throw std::runtime_error("sqlite3_open " + path);
    }
    exec("PRAGMA journal_mode=WAL");
    exec("PRAGMA synchronous=NORMAL");
  }
  ~sqlite_db() { sqlite3_close(db_); }
  sqlite_db(const sqlite_db&) = delete;
  sqlite_db& operator=(const sqlite_db&) = delete;

  /// Runs SQL that returns no rows; throws with the statement and SQLite's message on failure.
  void exec(const std::string& sql) {
    char* err = nullptr;
    if (sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &err) != SQLITE_OK) {
      std::string e = err != nullptr ? err : "?";
      sqlite3_free(err);
      throw std::runtime_error(sql + ": " + e);
    }
  }

  sqlite_statement prepare(const std::string& sql) { return sqlite_statement(db_, sql); }

  /// The first column of the first row of a query such as "SELECT count(*) ..." (0 if no row).
  std::int64_t scalar(const std::string& sql) {
    sqlite_statement st = prepare(sql);
    return st.step() == SQLITE_ROW ? st.column_int(0) : 0;
  }

  /// Writes `rows` in one transaction: bind(statement, row) binds a row, then the statement runs
  /// once per row. On any failure the transaction is rolled back and the result is false (the
  /// caller retries: SQLITE_BUSY and friends); no exception.
  template <class Row, class Bind>
  bool write_batch(sqlite_statement& statement, std::span<const Row> rows, Bind&& bind) {
    if (sqlite3_exec(db_, "BEGIN", nullptr, nullptr, nullptr) != SQLITE_OK) return false;
    for (const Row& r : rows) {
      bind(statement, r);
      const int rc = statement.step();
      statement.reset();
      if (rc != SQLITE_DONE) {
        sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
        return false;
      }
    }
    return sqlite3_exec(db_, "COMMIT", nullptr, nullptr, nullptr) == SQLITE_OK;
  }

 private:
  sqlite3* db_ = nullptr;
};

}  // namespace example
