// examples/common/cli.hpp — the examples' command-line options on CLI11: an option whose --help
// shows its default, the same with a range check, and the options every database example has
// (--db, --seed, --quiet) with one wording.
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <string>

namespace example {

/// --name with its default shown in --help.
template <class T>
CLI::Option* add_defaulted(CLI::App& app, const std::string& name, T& value, const std::string& help) {
  return app.add_option(name, value, help)->capture_default_str();
}

/// --name with its default shown, rejecting values outside [lo, hi] (CLI11 prints the range).
template <class T, class Bound>
CLI::Option* add_ranged(CLI::App& app, const std::string& name, T& value, const std::string& help, Bound lo, Bound hi) {
  return add_defaulted(app, name, value, help)->check(CLI::Range(lo, hi));
}

/// --db PATH: the SQLite file; empty (the default) means a file in a new temporary folder.
inline CLI::Option* add_db_option(CLI::App& app, std::string& db) {
  return app.add_option("--db", db, "SQLite database file (default: a file in a new temporary folder, removed at exit)");
}

/// --seed N: the run's random seed (default shown).
inline CLI::Option* add_seed_option(CLI::App& app, std::uint64_t& seed) {
  return add_defaulted(app, "--seed", seed, "random seed");
}

/// --quiet: no progress line.
inline CLI::Option* add_quiet_flag(CLI::App& app, bool& quiet) { return app.add_flag("--quiet", quiet, "no progress line"); }

}  // namespace example
