// Seeded stress test for sluice::ready_accumulator: appenders on several threads, and a sender (the
// main thread, so every assertion is on the main thread) that drains, randomly fails, retries with
// backoff, holds batches in flight across cycles, mutes and unmutes, moves partitions between
// destinations and loses/learns destinations, for many cycles on a manual clock. After every cycle
// audit() must find no orphan and no duplicate queue entry; at the end every record is accounted for
// exactly once, per-partition order held, and the counters balance.
#include <sluice/ready_accumulator.hpp>
#include <sluice/testing/manual_clock.hpp>

#include "test_support.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <optional>
#include <random>
#include <thread>
#include <unordered_map>
#include <vector>

using namespace std::chrono_literals;
using sluice::testing::manual_clock;

namespace {

struct record {
  std::uint32_t thread;
  std::uint32_t seq;  // per (thread, partition), from 0
};

struct routes {
  std::mutex m;
  std::vector<int> dest;  // -1: unknown
  std::optional<int> operator()(int p) {
    std::lock_guard l(m);
    const int d = dest[static_cast<std::size_t>(p)];
    if (d < 0) return std::nullopt;
    return d;
  }
  void set(int p, int d) {
    std::lock_guard l(m);
    dest[static_cast<std::size_t>(p)] = d;
  }
};

using acc_t = sluice::ready_accumulator<int, record, int, manual_clock>;

void run(std::uint64_t seed, int appenders, bool with_timeout) {
  INFO("seed " << seed << ", appenders " << appenders << ", delivery_timeout " << with_timeout);
  constexpr int partitions = 48;
  constexpr int destinations = 4;
  const std::uint32_t per_thread = static_cast<std::uint32_t>(sluice_test::scaled(6000, 6));
  std::mt19937_64 rng(seed);
  manual_clock clock;
  routes r;
  r.dest.resize(partitions);
  for (int p = 0; p < partitions; ++p) r.set(p, p % destinations);
  sluice::ready_accumulator_options o;
  o.batch_bytes = 64;
  o.batch_records = 7;
  o.max_request_bytes = 400;
  o.buffer_bytes = 4000;  // small: appenders block
  o.linger = 5ms;
  if (with_timeout) o.delivery_timeout = 200ms;
  acc_t acc(o, [&r](int p) { return r(p); }, clock);

  std::vector<std::thread> threads;
  std::atomic<int> finished{0};
  for (int t = 0; t < appenders; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 local(seed * 31 + static_cast<std::uint64_t>(t));
      std::vector<std::uint32_t> next(partitions, 0);
      for (std::uint32_t i = 0; i < per_thread; ++i) {
        const int p = static_cast<int>(local() % partitions);
        const std::size_t bytes = 1 + local() % 40;
        record rec{static_cast<std::uint32_t>(t), next[static_cast<std::size_t>(p)]};
        if (local() % 4 == 0) {
          // try_append races the blocking appends for the last bytes (the exact slow path); a
          // `full` leaves the record with us, so it is offered again.
          sluice::append_status s;
          while ((s = acc.try_append(p, std::move(rec), bytes)) == sluice::append_status::full) std::this_thread::yield();
          if (s != sluice::append_status::ok) std::abort();
        } else if (acc.append(p, std::move(rec), bytes) != sluice::append_status::ok) {
          std::abort();
        }
        ++next[static_cast<std::size_t>(p)];
      }
      ++finished;
    });
  }

  // Outcome bookkeeping: last delivered seq per (thread, partition); every record settled once.
  std::vector<std::int64_t> last(static_cast<std::size_t>(appenders * partitions), -1);
  std::uint64_t delivered = 0, failed = 0, expired = 0;
  bool order_ok = true;
  std::vector<acc_t::batch_handle> held;  // in flight across cycles
  std::vector<std::pair<acc_t::mute_token, int>> mutes;  // token, cycles left
  std::vector<acc_t::batch_handle> out;
  auto deliver = [&](acc_t::batch_handle& b) {
    for (const record& rec : b.records()) {
      auto& l = last[static_cast<std::size_t>(rec.thread) * partitions + static_cast<std::size_t>(b.partition())];
      if (static_cast<std::int64_t>(rec.seq) <= l) order_ok = false;
      l = rec.seq;
    }
    delivered += b.records().size();
    acc.complete(std::move(b));
  };
  auto settle = [&](acc_t::batch_handle& b) {
    const auto roll = rng() % 100;
    if (roll < 70) {
      deliver(b);
    } else if (roll < 90) {
      acc.reenqueue(std::move(b), std::chrono::milliseconds(rng() % 50));
    } else if (roll < 95) {
      failed += b.records().size();
      acc.fail(std::move(b));
    } else {
      held.push_back(std::move(b));
    }
  };

  std::size_t cycles = 0;
  std::uint64_t blocked_seen = 0;
  std::size_t orphan_cycles = 0;
  const std::size_t max_cycles = 2'000'000;
  for (;; ++cycles) {
    if (cycles > max_cycles) break;  // watchdog: checked below
    clock.advance(std::chrono::milliseconds(rng() % 4));
    // Random churn: mutes, unmutes, moves, lost leaders.
    const auto roll = rng() % 100;
    if (roll < 5) {
      mutes.emplace_back(acc.mute(static_cast<int>(rng() % partitions)), static_cast<int>(rng() % 20));
    } else if (roll < 8) {
      const int p = static_cast<int>(rng() % partitions);
      r.set(p, static_cast<int>(rng() % destinations));
      if (rng() % 2) acc.destination_changed(p);  // sometimes the accumulator is not told
    } else if (roll < 9) {
      r.set(static_cast<int>(rng() % partitions), -1);
    } else if (roll < 11) {
      for (int p = 0; p < partitions; ++p) {
        if (r(p) == std::nullopt) r.set(p, p % destinations);
      }
      acc.destinations_refreshed();
    }
    for (auto& [token, left] : mutes) {
      if (--left <= 0) token.release();
    }
    std::erase_if(mutes, [](const auto& m) { return !m.first.owns(); });
    // Settle some held batches.
    {
      std::vector<acc_t::batch_handle> still;  // settle() may hold a batch again
      still.swap(held);
      for (auto& b : still) {
        if (rng() % 4 == 0) settle(b); else held.push_back(std::move(b));
      }
    }

    if (acc.stats().waiting_appenders > 0) ++blocked_seen;
    auto ready = acc.ready();
    for (int d : ready.destinations) {
      out.clear();
      acc.drain(d, 50 + rng() % 400, out, true);
      for (auto& b : out) settle(b);
    }
    if (ready.expiry_due) {
      out.clear();
      acc.expire(out);
      for (auto& b : out) expired += b.records().size();
      out.clear();
    }
    const auto report = acc.audit();
    if (!report.clean()) {
      ++orphan_cycles;
      INFO("cycle " << cycles << ": orphans " << report.orphans.size() << ", duplicates " << report.duplicate_entries
                    << ", counters " << report.counters_consistent);
      REQUIRE(report.clean());
    }
    if (finished.load() == appenders) {
      if (cycles % 64 == 0) acc.flush();
      const auto s = acc.stats();
      if (s.pending == 0 && held.empty()) break;
      if (cycles % 256 == 0) {  // let everything drain: no more failures or mutes
        for (auto& m : mutes) m.first.release();
        mutes.clear();
        for (int p = 0; p < partitions; ++p) {
          if (r(p) == std::nullopt) r.set(p, p % destinations);
        }
        acc.destinations_refreshed();
      }
    }
  }
  for (auto& t : threads) t.join();
  // Whatever is still in flight or held (only if the watchdog fired) is settled now.
  for (auto& b : held) deliver(b);
  held.clear();
  mutes.clear();
  CHECK(cycles <= max_cycles);
  WARN("cycles " << cycles << ", cycles with blocked appenders " << blocked_seen << ", delivered " << delivered
                 << ", failed " << failed << ", expired " << expired);
  CHECK(orphan_cycles == 0);
  CHECK(order_ok);
  const auto s = acc.stats();
  const std::uint64_t total = static_cast<std::uint64_t>(appenders) * per_thread;
  CHECK(s.appended == total);
  CHECK(s.delivered == delivered);
  CHECK(s.failed == failed);
  CHECK(s.expired == expired);
  CHECK(s.pending == 0);
  CHECK(s.taken == 0);
  CHECK(s.appended == s.delivered + s.failed + s.expired + s.taken + s.pending);
  CHECK(s.buffer_used == 0);
  CHECK(acc.audit().clean());
  CHECK_FALSE(acc.has_pending_work());
}

}  // namespace

TEST_CASE("ready_accumulator stress: audit clean every cycle, order kept, conservation exact") {
  const auto seed = sluice_test::seed(0xacc5eedULL);
  for (int appenders : {1, 2, 4}) {
    for (bool timeout : {false, true}) {
      run(seed + static_cast<std::uint64_t>(appenders) * 7 + (timeout ? 1 : 0), appenders, timeout);
    }
  }
}
