// Seeded fault-injection stress for sluice::write_behind: several producers, flushers 1 and 4,
// unkeyed and keyed. The sink throws on some batches (std::exception and other types), marks
// random items retry (some with a retry-after hint) or fail on others. Checked afterwards:
//  - conservation: every value ends persisted exactly once, or reported failed exactly once
//    (keyed: or coalesced), never two of those; the metrics balance exactly;
//  - keyed: a key is never in two sink calls at once, the versions the sink sees for a key never
//    go down (no stale overwrite: a retry never lands after a newer value), and the last persisted
//    version of every key is its newest, unless that newest one was reported failed.
// The seed is printed (INFO) and can be set with SLUICE_TEST_SEED.
#include <sluice/write_behind.hpp>

#include "test_support.hpp"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

using namespace std::chrono_literals;
using sluice::write_behind_results;
using sluice::write_behind_status;

namespace {

struct item {
  std::uint32_t key = 0;      // keyed mode: the key; unkeyed: unused
  std::uint32_t version = 0;  // per key (keyed) in enqueue order; unkeyed: unique id
};

struct faults {
  std::mutex m;
  std::mt19937_64 rng;
  explicit faults(std::uint64_t seed) : rng(seed) {}
  double next() {
    std::lock_guard lock(m);
    return std::uniform_real_distribution<double>(0.0, 1.0)(rng);
  }
};

struct run_result {
  std::uint64_t enqueued = 0, persisted = 0, failed = 0, coalesced = 0;
  bool ok = true;
  std::string problem;
};

sluice::write_behind_options<item, std::uint32_t> stress_options(std::size_t flushers) {
  sluice::write_behind_options<item, std::uint32_t> o;
  o.capacity = 64;  // small: the intake is full most of the time while retries are pending
  o.max_batch = 16;
  o.linger = 200us;
  o.retry = {.base = 20us, .max = 500us, .multiplier = 2.0, .jitter = sluice::jitter_mode::full, .max_retries = 4};
  o.flushers = flushers;
  o.drain_timeout = 60s;
  o.key_of = [](const item& v) { return v.key; };
  return o;
}

run_result run_unkeyed(std::uint64_t seed, int producers, std::size_t flushers, std::uint32_t per_producer) {
  faults f(seed);
  const std::uint32_t total = per_producer * static_cast<std::uint32_t>(producers);
  std::vector<std::atomic<std::uint8_t>> persisted(total), failed(total);
  std::atomic<bool> duplicate{false};
  auto options = stress_options(flushers);
  sluice::write_behind_options<item> o{.capacity = options.capacity, .max_batch = options.max_batch,
                                       .linger = options.linger, .retry = options.retry, .flushers = flushers,
                                       .drain_timeout = options.drain_timeout};
  o.on_failed = [&](item&& v, const sluice::write_behind_failure&) {
    if (failed[v.version]++ != 0) duplicate = true;
  };
  run_result r;
  {
    sluice::write_behind<item> wb(o, [&](std::span<const item> b, write_behind_results& res) {
      const double x = f.next();
      if (x < 0.05) throw std::runtime_error("injected");
      if (x < 0.08) throw 42;
      for (std::size_t i = 0; i < b.size(); ++i) {
        const double y = f.next();
        if (y < 0.15) {
          res.retry(i, y < 0.05 ? 300us : 0us);
        } else if (y < 0.17) {
          res.fail(i, "injected permanent");
        } else if (persisted[b[i].version]++ != 0) {
          duplicate = true;
        }
      }
    });
    std::vector<std::jthread> threads;
    for (int p = 0; p < producers; ++p) {
      threads.emplace_back([&, p] {
        for (std::uint32_t i = 0; i < per_producer; ++i) {
          const std::uint32_t id = static_cast<std::uint32_t>(p) * per_producer + i;
          if (wb.enqueue(item{0, id}) != write_behind_status::ok) duplicate = true;
        }
      });
    }
    threads.clear();
    wb.flush();
    wb.stop();
    const auto m = wb.metrics();
    r.enqueued = m.enqueued;
    r.persisted = m.persisted;
    r.failed = m.failed;
    r.coalesced = m.coalesced;
    if (m.enqueued != m.persisted + m.failed + m.coalesced || m.in_flight + m.in_retry + m.pending + m.in_intake != 0) {
      r.ok = false;
      r.problem = "metrics do not balance";
    }
  }
  if (duplicate) {
    r.ok = false;
    r.problem = "a value was persisted or failed twice, or an enqueue was refused";
  }
  std::uint64_t p_count = 0, f_count = 0;
  for (std::uint32_t id = 0; id < total; ++id) {
    const int p = persisted[id], fl = failed[id];
    p_count += static_cast<std::uint64_t>(p);
    f_count += static_cast<std::uint64_t>(fl);
    if (p + fl != 1) {
      r.ok = false;
      r.problem = "value " + std::to_string(id) + " persisted " + std::to_string(p) + " times, failed " +
                  std::to_string(fl) + " times";
      break;
    }
  }
  if (r.ok && (p_count != r.persisted || f_count != r.failed)) {
    r.ok = false;
    r.problem = "per-value counts differ from the metrics";
  }
  return r;
}

run_result run_keyed(std::uint64_t seed, int producers, std::size_t flushers, std::uint32_t per_producer,
                     std::uint32_t keys_per_producer) {
  faults f(seed);
  std::mutex m;
  std::unordered_map<std::uint32_t, std::uint32_t> last_seen;       // highest version the sink saw per key
  std::unordered_map<std::uint32_t, std::uint32_t> last_persisted;  // version persisted last per key
  std::unordered_map<std::uint32_t, int> in_sink;
  std::map<std::pair<std::uint32_t, std::uint32_t>, int> outcomes;   // (key, version) -> persisted + failed count
  std::unordered_map<std::uint32_t, std::uint32_t> failed_newest;    // key -> a failed version
  std::string problem;
  auto options = stress_options(flushers);
  options.on_failed = [&](item&& v, const sluice::write_behind_failure&) {
    std::lock_guard lock(m);
    if (++outcomes[{v.key, v.version}] != 1) problem = "a value reported twice";
    auto& fv = failed_newest[v.key];
    fv = std::max(fv, v.version);
  };
  std::vector<std::uint32_t> newest(static_cast<std::size_t>(producers) * keys_per_producer, 0);
  run_result r;
  {
    sluice::write_behind<item, std::uint32_t> wb(options, [&](std::span<const item> b, write_behind_results& res) {
      {
        std::lock_guard lock(m);
        for (const item& v : b) {
          if (in_sink[v.key]++ != 0) problem = "key " + std::to_string(v.key) + " in two sink calls at once";
          auto& seen = last_seen[v.key];
          if (v.version < seen) problem = "key " + std::to_string(v.key) + ": stale version reached the sink";
          seen = std::max(seen, v.version);
        }
      }
      std::this_thread::yield();  // widen the window in which a key is in flight
      const double x = f.next();
      bool threw = x < 0.08;
      std::vector<int> decision(b.size(), 0);  // 0 persisted, 1 retry, 2 fail
      if (!threw) {
        for (std::size_t i = 0; i < b.size(); ++i) {
          const double y = f.next();
          decision[i] = y < 0.15 ? 1 : y < 0.17 ? 2 : 0;
        }
      }
      {
        std::lock_guard lock(m);
        for (std::size_t i = 0; i < b.size(); ++i) {
          --in_sink[b[i].key];
          if (!threw && decision[i] == 0) {
            if (++outcomes[{b[i].key, b[i].version}] != 1) problem = "a value persisted twice";
            auto& lp = last_persisted[b[i].key];
            if (b[i].version < lp) problem = "stale overwrite of key " + std::to_string(b[i].key);
            lp = b[i].version;
          }
        }
      }
      if (threw) {
        if (x < 0.04) throw std::runtime_error("injected");
        throw 7;
      }
      for (std::size_t i = 0; i < b.size(); ++i) {
        if (decision[i] == 1) res.retry(i, f.next() < 0.3 ? 300us : 0us);
        if (decision[i] == 2) res.fail(i, "injected permanent");
      }
    });
    std::vector<std::jthread> threads;
    for (int p = 0; p < producers; ++p) {
      threads.emplace_back([&, p] {
        std::mt19937_64 rng(seed + static_cast<std::uint64_t>(p) + 1);
        for (std::uint32_t i = 0; i < per_producer; ++i) {
          const std::uint32_t slot = static_cast<std::uint32_t>(rng() % keys_per_producer);
          const std::uint32_t key = static_cast<std::uint32_t>(p) * keys_per_producer + slot;
          const std::uint32_t version = ++newest[key];  // this producer owns the key
          if (wb.enqueue(item{key, version}) != write_behind_status::ok) {
            std::lock_guard lock(m);
            problem = "an enqueue was refused";
          }
        }
      });
    }
    threads.clear();
    wb.flush();
    wb.stop();
    const auto mt = wb.metrics();
    r.enqueued = mt.enqueued;
    r.persisted = mt.persisted;
    r.failed = mt.failed;
    r.coalesced = mt.coalesced;
    if (mt.enqueued != mt.persisted + mt.failed + mt.coalesced ||
        mt.in_flight + mt.in_retry + mt.pending + mt.in_intake != 0) {
      problem = "metrics do not balance";
    }
  }
  std::uint64_t ended = 0;
  for (auto& [kv, n] : outcomes) ended += static_cast<std::uint64_t>(n);
  if (problem.empty() && ended != r.persisted + r.failed) problem = "outcome counts differ from the metrics";
  for (std::uint32_t key = 0; key < newest.size() && problem.empty(); ++key) {
    if (newest[key] == 0) continue;
    auto fit = failed_newest.find(key);
    if (fit != failed_newest.end() && fit->second == newest[key]) continue;  // the newest one failed
    auto pit = last_persisted.find(key);
    if (pit == last_persisted.end() || pit->second != newest[key]) {
      problem = "key " + std::to_string(key) + ": newest version " + std::to_string(newest[key]) +
                " is not what was persisted last (" +
                (pit == last_persisted.end() ? std::string("nothing") : std::to_string(pit->second)) + ")";
    }
  }
  r.ok = problem.empty();
  r.problem = problem;
  return r;
}

}  // namespace

TEST_CASE("write_behind stress: unkeyed, every value persisted or failed exactly once under injected faults") {
  const auto seed = sluice_test::seed();
  const std::uint32_t per_producer = static_cast<std::uint32_t>(sluice_test::scaled(6000, 6));
  for (std::size_t flushers : {1u, 4u}) {
    for (int producers : {1, 3}) {
      INFO("seed " << seed << ", flushers " << flushers << ", producers " << producers);
      const auto r = run_unkeyed(seed + flushers * 10 + static_cast<std::uint64_t>(producers), producers, flushers,
                                 per_producer);
      INFO(r.problem);
      CHECK(r.ok);
      CHECK(r.enqueued == per_producer * static_cast<std::uint64_t>(producers));
      CHECK(r.failed > 0);  // the faults did happen
    }
  }
}

TEST_CASE("write_behind stress: keyed, no stale overwrite and the newest value wins under injected faults") {
  const auto seed = sluice_test::seed();
  const std::uint32_t per_producer = static_cast<std::uint32_t>(sluice_test::scaled(8000, 6));
  for (std::size_t flushers : {1u, 4u}) {
    for (int producers : {1, 3}) {
      for (std::uint32_t keys : {8u, 500u}) {
        INFO("seed " << seed << ", flushers " << flushers << ", producers " << producers << ", keys/producer " << keys);
        const auto r = run_keyed(seed + flushers * 100 + static_cast<std::uint64_t>(producers) * 10 + keys, producers,
                                 flushers, per_producer, keys);
        INFO(r.problem);
        CHECK(r.ok);
        CHECK(r.enqueued == per_producer * static_cast<std::uint64_t>(producers));
      }
    }
  }
}
