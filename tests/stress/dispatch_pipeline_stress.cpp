// Seeded stress test for sluice::dispatch_pipeline: several appender threads, an asynchronous
// sink whose completer thread injects faults (retriable, timed out, not sent, permanent, stalls),
// leader moves from the main thread, max_in_flight_per_destination 1 and 5, on a manual clock the
// main thread advances. After every step the accumulator's audit() must be clean; at the end every
// record has exactly one report, delivered records kept per-partition order, counters balance.
#include <sluice/dispatch_pipeline.hpp>
#include <sluice/testing/manual_clock.hpp>

#include "test_support.hpp"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <optional>
#include <random>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using sluice::send_result;
using sluice::testing::manual_clock;

namespace {

struct record {
  std::uint32_t id;      // global, for the exactly-once check
  std::uint32_t thread;  // appender
  std::uint32_t seq;     // per (thread, partition)
};

using pipe_t = sluice::dispatch_pipeline<int, record, int, manual_clock>;

struct async_sink {
  std::mutex m;
  std::condition_variable cv;
  std::deque<pipe_t::request> queue;
  bool quit = false;
  void push(pipe_t::request&& r) {
    {
      std::lock_guard l(m);
      queue.push_back(std::move(r));
    }
    cv.notify_one();
  }
};

void run(std::uint64_t seed, int appenders, std::size_t max_in_flight, std::size_t senders) {
  INFO("seed " << seed << ", appenders " << appenders << ", max_in_flight " << max_in_flight << ", senders "
               << senders);
  constexpr int partitions = 40;
  constexpr int destinations = 5;
  const std::uint32_t per_thread = static_cast<std::uint32_t>(sluice_test::scaled(12000, 6));
  const std::uint32_t total = per_thread * static_cast<std::uint32_t>(appenders);
  std::mt19937_64 rng(seed);
  manual_clock clock;

  std::vector<std::atomic<int>> route(partitions);
  for (int p = 0; p < partitions; ++p) route[static_cast<std::size_t>(p)] = p % destinations;
  std::vector<std::atomic<std::uint8_t>> reports(total);
  std::mutex order_m;
  std::vector<std::int64_t> last(static_cast<std::size_t>(appenders * partitions), -1);
  std::atomic<bool> order_ok{true};
  std::atomic<bool> wrong_partition{false};

  async_sink sink;
  sluice::dispatch_pipeline_options o;
  o.accumulator.batch_bytes = 200;
  o.accumulator.max_request_bytes = 1000;
  o.accumulator.buffer_bytes = 20000;
  o.accumulator.linger = 5ms;
  o.accumulator.delivery_timeout = 20s;
  o.request_timeout = 1s;
  o.max_in_flight_per_destination = max_in_flight;
  o.sender_threads = senders;
  o.retry_backoff = {10ms, 200ms, 2.0, sluice::jitter_mode::equal, std::uint32_t{20}};
  auto on_delivery = [&](const record& r, const sluice::delivery_report& d) {
    reports[r.id].fetch_add(1);
    if (!d) return;
    std::lock_guard l(order_m);
    // The partition is recovered from the id layout below: id = thread * per_thread + i.
    auto& l2 = last[r.thread * partitions + (r.seq >> 16)];
    const std::int64_t s = r.seq & 0xffff;
    if (s <= l2) order_ok = false;
    l2 = s;
  };
  pipe_t pipe(
      o, [&](int p) { return std::optional<int>(route[static_cast<std::size_t>(p)].load()); },
      [&](pipe_t::request&& r) { sink.push(std::move(r)); }, [](const record&) { return std::size_t{20}; },
      on_delivery, clock);

  std::thread completer([&, local = std::mt19937_64(seed ^ 0xc0ffee)]() mutable {
    std::unique_lock l(sink.m);
    std::deque<pipe_t::request> stalled;
    for (;;) {
      sink.cv.wait_for(l, 1ms, [&] { return sink.quit || !sink.queue.empty(); });
      if (sink.quit && sink.queue.empty() && stalled.empty()) return;
      std::deque<pipe_t::request> mine;
      mine.swap(sink.queue);
      l.unlock();
      // A stalled request is answered later (a broker that stalls for a while).
      if (!stalled.empty() && (local() % 8 == 0 || sink.quit)) {
        stalled.front().complete(send_result::timed_out);
        stalled.pop_front();
      }
      for (auto& r : mine) {
        const auto roll = local() % 100;
        if (roll < 72) {
          r.complete(send_result::ok);
        } else if (roll < 82) {
          r.complete(send_result::retriable);
        } else if (roll < 86) {
          r.complete(send_result::timed_out);
        } else if (roll < 90) {
          r.complete(send_result::not_sent);
        } else if (roll < 92) {
          r.complete(send_result::permanent);
        } else if (roll < 96) {
          // Mixed per-batch results.
          for (std::size_t i = 0; i < r.size(); ++i) r.set_result(i, local() % 2 ? send_result::ok : send_result::retriable);
          r.complete();
        } else {
          stalled.push_back(std::move(r));
        }
      }
      l.lock();
    }
  });

  std::atomic<int> finished{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < appenders; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 local(seed * 977 + static_cast<std::uint64_t>(t));
      std::vector<std::uint32_t> next(partitions, 0);
      for (std::uint32_t i = 0; i < per_thread; ++i) {
        const int p = static_cast<int>(local() % partitions);
        const std::uint32_t seq = (static_cast<std::uint32_t>(p) << 16) | next[static_cast<std::size_t>(p)]++;
        record r{static_cast<std::uint32_t>(t) * per_thread + i, static_cast<std::uint32_t>(t), seq};
        if (pipe.send(p, std::move(r)) != pipe_t::send_status::ok) wrong_partition = true;
      }
      ++finished;
    });
  }

  std::size_t steps = 0;
  std::size_t dirty_audits = 0;
  std::atomic<bool> drained{false};
  std::thread drainer;
  const std::size_t max_steps = 400000;
  for (; steps < max_steps; ++steps) {
    (void)clock.wait_for_waiters_for(senders, 20ms);  // senders caught up (bounded: they may be busy)
    if (!pipe.audit().clean()) ++dirty_audits;
    if (drained.load()) break;
    if (rng() % 50 == 0) {  // a leader move
      const int p = static_cast<int>(rng() % partitions);
      route[static_cast<std::size_t>(p)] = static_cast<int>(rng() % destinations);
      pipe.destination_changed(p);
    }
    if (finished.load() == appenders && !drainer.joinable()) {
      drainer = std::thread([&] { drained = pipe.drain(); });
    }
    clock.advance(1ms);
  }
  for (auto& t : threads) t.join();
  if (drainer.joinable()) {
    while (!drained.load()) {  // the watchdog fired: keep time moving so drain can finish
      clock.advance(100ms);
      std::this_thread::sleep_for(1ms);
    }
    drainer.join();
  }
  {
    std::lock_guard l(sink.m);
    sink.quit = true;
  }
  sink.cv.notify_one();
  completer.join();

  CHECK(steps < max_steps);
  CHECK(dirty_audits == 0);
  CHECK_FALSE(wrong_partition.load());
  CHECK(order_ok.load());
  std::size_t missing = 0, doubled = 0;
  for (auto& r : reports) {
    const auto n = r.load();
    if (n == 0) ++missing;
    if (n > 1) ++doubled;
  }
  CHECK(missing == 0);
  CHECK(doubled == 0);
  const auto m = pipe.metrics();
  CHECK(m.accepted == total);
  CHECK(m.delivered + m.failed == total);
  CHECK(m.pending == 0);
  CHECK(m.in_flight == 0);
  CHECK(m.buffer_used == 0);
  CHECK(m.failed_by_reason[static_cast<std::size_t>(sluice::failure_reason::shutdown)] == 0);  // drained, not stopped
  WARN("steps " << steps << ": delivered " << m.delivered << ", failed " << m.failed << " (permanent "
                << m.failed_by_reason[static_cast<std::size_t>(sluice::failure_reason::permanent_error)]
                << ", exhausted "
                << m.failed_by_reason[static_cast<std::size_t>(sluice::failure_reason::retries_exhausted)]
                << ", timeout " << m.expired << "), retried " << m.retried << ", requests " << m.requests);
}

}  // namespace

TEST_CASE("dispatch_pipeline stress: exactly-once reports, per-partition order, conservation, audit clean") {
  const auto seed = sluice_test::seed(0xd15ba7c4ULL);
  for (std::size_t max_in_flight : {std::size_t{1}, std::size_t{5}}) {
    for (int appenders : {1, 3}) {
      run(seed + max_in_flight * 13 + static_cast<std::uint64_t>(appenders), appenders, max_in_flight,
          appenders == 1 ? 1 : 2);
    }
  }
}
