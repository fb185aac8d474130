// Seeded stress for sluice::reconcile_pipeline, for every conflict strategy, sweeping submitter
// threads and max_parallel. Submitters own disjoint keys and number each key's versions; the
// reconcile randomly succeeds, fails (retried with backoff, some dead-lettered) or requeues, while
// a ticker thread moves a manual clock. Checked: no key is ever reconciled by two workers at once,
// a key's versions are reconciled in non-decreasing order, the last version accepted for every key
// ends succeeded or dead-lettered (never lost, never duplicated into two final outcomes), and the
// conservation identity holds exactly.
#include <sluice/reconcile_pipeline.hpp>
#include <sluice/testing/manual_clock.hpp>

#include "test_support.hpp"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using sluice::conflict_strategy;
using sluice::reconcile_result;
using sluice::submit_status;
using sluice::testing::manual_clock;

namespace {

struct item {
  std::uint32_t key;
  std::uint32_t version;
};
using pipe_t = sluice::reconcile_pipeline<item, sluice::key_member<&item::key>, manual_clock>;

std::uint64_t mix(std::uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  return x ^ (x >> 33);
}

// `wide`: 700 keys per submitter, capacity 16 and half the submissions delayed by up to 40 ms, so
// scheduled keys pile up far beyond the slab's retained chunk and drain again: the slab compacts
// (moves idle nodes down, releases chunks) while workers run (review r1 F12).
// long_runs: runs are short (no yields), except about one in 1,024 that takes 700 µs of real time,
// longer than the monitor's tick: claims of several keys form, and the monitor takes back the keys
// claimed behind such a run.
// Returns how many claimed keys the monitor took back.
std::uint64_t run(conflict_strategy strategy, int submitters, std::size_t max_parallel, std::uint64_t seed, bool wide = false,
                  bool long_runs = false) {
  INFO("seed " << seed << " strategy " << static_cast<int>(strategy) << " submitters " << submitters
               << " max_parallel " << max_parallel << " wide " << wide << " long_runs " << long_runs);
  const std::uint32_t keys_per_submitter = wide ? 700 : 64;
  const std::uint32_t key_count = keys_per_submitter * static_cast<std::uint32_t>(submitters);
  const std::size_t ops = sluice_test::scaled(60'000, 15) / static_cast<std::size_t>(submitters);

  std::vector<std::atomic<int>> busy(key_count);
  std::vector<std::atomic<std::uint32_t>> last_run_version(key_count);
  std::vector<std::atomic<std::uint32_t>> final_version(key_count);  // done or dead-lettered
  std::vector<std::uint32_t> last_ok(key_count, 0);  // written by the owning submitter only
  std::atomic<std::uint64_t> overlaps{0}, reorders{0}, run_seq{0}, dead{0}, duplicate_finals{0};

  manual_clock clock;
  pipe_t::options o;
  o.max_parallel = max_parallel;
  o.capacity = wide ? 16 : 128;
  o.on_conflict = strategy;
  o.conflict_delay = 2ms;
  o.priority_levels = 3;
  o.backoff.base = 1ms;
  o.backoff.max = 8ms;
  o.backoff.max_retries = 2;
  o.jitter_seed = seed | 1;
  auto set_final = [&](std::uint32_t key, std::uint32_t version) {
    // A version reaches a final outcome at most once.
    if (final_version[key].exchange(version) == version) ++duplicate_finals;
  };
  o.on_dead_letter = [&](sluice::dead_letter<std::uint32_t, item>&& d) {
    ++dead;
    set_final(d.key, d.entity.version);
  };
  pipe_t p(o, [&](const item& e, const pipe_t::context& ctx) -> reconcile_result {
    if (busy[e.key].exchange(1) != 0) ++overlaps;
    if (e.version < last_run_version[e.key].load()) ++reorders;
    last_run_version[e.key].store(e.version);
    const std::uint64_t r = mix(seed ^ (run_seq.fetch_add(1) * 0x9E3779B97F4A7C15ULL)) % 100;
    reconcile_result res = reconcile_result::done();
    if (r < 15) {
      res = reconcile_result::failure("random failure");
    } else if (r < 20) {
      if (r == 15) {
        busy[e.key].store(0);
        throw std::runtime_error("random throw");
      }
      res = reconcile_result::requeue_after(std::chrono::milliseconds(r - 15));
    }
    if (!long_runs && r % 7 == 0) std::this_thread::yield();
    if (long_runs && mix(seed + e.key * 131 + e.version) % 1024 == 0) std::this_thread::sleep_for(700us);
    if (res.result_kind() == reconcile_result::kind::done) set_final(e.key, e.version);
    (void)ctx;
    busy[e.key].store(0);
    return res;
  }, clock);

  std::atomic<bool> ticking{true};
  std::thread ticker([&] {
    while (ticking.load()) {
      clock.advance(1ms);
      std::this_thread::yield();
    }
  });
  std::vector<std::thread> threads;
  std::atomic<std::uint64_t> discarded_seen{0};
  for (int t = 0; t < submitters; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(seed + static_cast<std::uint64_t>(t) * 7919);
      std::vector<std::uint32_t> next_version(keys_per_submitter, 1);
      for (std::size_t i = 0; i < ops; ++i) {
        // Hot keys: half the submissions go to 4 of the submitter's keys (not with long_runs: a
        // key with a newer version pending is not taken back, so spread them).
        const std::uint32_t local = (!long_runs && (rng() & 1)) ? static_cast<std::uint32_t>(rng() % 4)
                                                                : static_cast<std::uint32_t>(rng() % keys_per_submitter);
        const std::uint32_t key = static_cast<std::uint32_t>(t) * keys_per_submitter + local;
        const std::uint32_t v = next_version[local]++;
        sluice::submit_options so;
        so.priority = static_cast<int>(rng() % 3);
        if (wide ? rng() % 2 == 0 : rng() % 16 == 0) so.delay = std::chrono::milliseconds(rng() % (wide ? 40 : 4));
        const auto st = p.submit(item{key, v}, so);
        if (st == submit_status::ok) last_ok[key] = v;
        if (st == submit_status::discarded) ++discarded_seen;
      }
    });
  }
  for (auto& th : threads) th.join();
  const bool drained = p.drain_until(manual_clock::time_point::max());
  ticking = false;
  ticker.join();

  const auto m = p.metrics();
  INFO("key states relocated by compaction: " << p.internal_sizes().relocated);
  INFO("claimed keys taken back by the monitor: " << m.revoked << ", its wake-ups: " << m.monitor_wakes);
  CHECK(drained);
  CHECK(overlaps == 0);
  CHECK(reorders == 0);
  CHECK(duplicate_finals == 0);
  CHECK(m.balanced());
  CHECK(m.keys == 0);
  CHECK(m.unprocessed == 0);
  CHECK(m.dead_lettered == dead.load());
  CHECK(m.discarded == discarded_seen.load());
  CHECK(m.submitted == static_cast<std::uint64_t>(ops) * static_cast<std::uint64_t>(submitters));
  CHECK(m.reconciled == m.succeeded + m.failed + m.requeues);
  std::uint32_t lost = 0;
  for (std::uint32_t k = 0; k < key_count; ++k) {
    if (last_ok[k] != 0 && final_version[k].load() != last_ok[k]) ++lost;
  }
  CHECK(lost == 0);
  return m.revoked;
}

}  // namespace

TEST_CASE("reconcile_pipeline stress: every conflict strategy, swept over threads") {
  const auto seed = sluice_test::seed();
  for (auto strategy : {conflict_strategy::coalesce, conflict_strategy::discard, conflict_strategy::requeue_after,
                        conflict_strategy::wait}) {
    for (int submitters : {1, 3}) {
      for (std::size_t max_parallel : {std::size_t{1}, std::size_t{2}, std::size_t{8}}) {
        run(strategy, submitters, max_parallel, seed + static_cast<std::uint64_t>(submitters) * 31 + max_parallel);
      }
    }
  }
}

TEST_CASE("reconcile_pipeline stress: a key space far beyond the retained slab (compaction under load)") {
  const auto seed = sluice_test::seed();
  for (auto strategy : {conflict_strategy::coalesce, conflict_strategy::requeue_after}) {
    for (std::size_t max_parallel : {std::size_t{2}, std::size_t{8}}) {
      run(strategy, 3, max_parallel, seed + 977 + max_parallel, true);
    }
  }
}

TEST_CASE("reconcile_pipeline stress: runs that turn out long behind claims (the monitor takes keys back)") {
  const auto seed = sluice_test::seed() + 1717;
  std::uint64_t revoked = 0;
  // Whether a claim of several keys forms behind a long run is up to the scheduler: one sweep
  // took none back in one CI run in about four (clang preset). Up to five sweeps, each with other
  // seeds, every one checked for conservation; the unit tests take keys back deterministically.
  int sweeps = 0;
  for (; sweeps < 5 && revoked == 0; ++sweeps) {
    for (auto strategy : {conflict_strategy::coalesce, conflict_strategy::wait}) {
      for (int submitters : {1, 3}) {
        for (std::size_t max_parallel : {std::size_t{2}, std::size_t{4}}) {
          revoked += run(strategy, submitters, max_parallel,
                         seed + static_cast<std::uint64_t>(sweeps) * 7919 + static_cast<std::uint64_t>(submitters) * 13 +
                             max_parallel,
                         false, true);
        }
      }
    }
  }
  INFO("claimed keys taken back, in all: " << revoked << ", in " << sweeps << " sweep(s)");
  // The path this case is for was taken. Not asserted under the sanitizers: runs there are slow
  // enough that the ticking manual clock makes most measure a millisecond, so few claims of
  // several keys form (the unit tests take keys back deterministically under every preset).
  if (!sluice_test::under_sanitizer) CHECK(revoked > 0);
}

// Workers claim up to 16 short runs at a time (reconcile_pipeline.hpp, "Claims"); cancel() and a
// mid-flight stop() race those claims. Every run succeeds, so each accepted version ends exactly
// once: run, coalesced, cancelled or reported unprocessed. Checked: exclusivity, a key's versions
// run in increasing order and at most once each, no run starts after stop() returned, every
// version reported unprocessed is newer than the key's last run, and the books balance.
TEST_CASE("reconcile_pipeline stress: cancel and stop race workers' claims") {
  const auto seed = sluice_test::seed() + 4242;
  for (std::size_t max_parallel : {std::size_t{1}, std::size_t{2}, std::size_t{4}}) {
    for (int submitters : {1, 2}) {
      INFO("seed " << seed << " max_parallel " << max_parallel << " submitters " << submitters);
      constexpr std::uint32_t keys = 256;
      std::vector<std::atomic<int>> busy(keys);
      std::vector<std::atomic<std::uint32_t>> last_run(keys);
      std::atomic<std::uint64_t> overlaps{0}, reorders{0}, runs{0}, runs_after_stop{0};
      std::atomic<bool> stopped{false};
      std::mutex mu;
      std::vector<item> reported;
      pipe_t::options o;
      o.max_parallel = max_parallel;
      o.capacity = 512;
      o.on_unprocessed = [&](sluice::unprocessed<std::uint32_t, item>&& u) {
        std::lock_guard lk(mu);
        reported.push_back(u.entity);
      };
      manual_clock clock;
      pipe_t p(o, [&](const item& e, std::stop_token) {
        if (stopped.load()) ++runs_after_stop;
        if (busy[e.key].exchange(1) != 0) ++overlaps;
        if (e.version <= last_run[e.key].load()) ++reorders;  // a version runs at most once, in order
        last_run[e.key].store(e.version);
        ++runs;
        busy[e.key].store(0);
        return reconcile_result::done();
      }, clock);
      std::atomic<bool> go{true};
      std::vector<std::thread> threads;
      std::vector<std::uint32_t> next_version(keys, 1);  // each submitter owns keys t, t+submitters, ...
      for (int t = 0; t < submitters; ++t) {
        threads.emplace_back([&, t] {
          std::mt19937_64 rng(seed + static_cast<std::uint64_t>(t));
          while (go.load()) {
            const auto key = static_cast<std::uint32_t>((rng() % (keys / static_cast<std::uint32_t>(submitters))) *
                                                            static_cast<std::uint32_t>(submitters) +
                                                        static_cast<std::uint32_t>(t));
            if (p.submit(item{key, next_version[key]}) == submit_status::closed) return;
            ++next_version[key];
          }
        });
      }
      threads.emplace_back([&] {
        std::mt19937_64 rng(seed ^ 0xcafe);
        while (go.load()) (void)p.cancel(static_cast<std::uint32_t>(rng() % keys), rng() % 2 == 0);
      });
      REQUIRE(sluice_test::eventually([&] { return runs.load() > 20'000; }));
      p.stop();
      stopped = true;
      go = false;
      for (auto& th : threads) th.join();
      const auto m = p.metrics();
      CHECK(overlaps == 0);
      CHECK(reorders == 0);
      CHECK(runs_after_stop == 0);
      CHECK(m.keys == 0);
      CHECK(m.balanced());
      CHECK(m.reconciled == runs.load());
      CHECK(m.unprocessed == reported.size());
      CHECK(m.claims < m.reconciled);  // short runs were claimed several at a time
      std::uint64_t stale = 0;
      for (const item& e : reported) {
        if (e.version <= last_run[e.key].load()) ++stale;
      }
      CHECK(stale == 0);
    }
  }
}
