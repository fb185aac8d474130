// Seeded stress for sluice::requeue_queue: several schedulers (random keys from a small key space,
// random policies, random cancels) against blocking consumers, while a ticker thread moves a
// manual clock. Conservation: every accepted entry is popped exactly once, cancelled, replaced, or
// returned by take_all — counts balance exactly, no item id is handed out twice, no entry is
// handed out early, and a single consumer sees deadlines in non-decreasing order.
#include <sluice/requeue_queue.hpp>
#include <sluice/testing/manual_clock.hpp>

#include "test_support.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <random>
#include <thread>
#include <unordered_set>
#include <vector>

using namespace std::chrono_literals;
using sluice::schedule_policy;
using sluice::schedule_status;
using sluice::testing::manual_clock;

namespace {

struct counters {
  std::atomic<std::int64_t> added{0};
  std::atomic<std::int64_t> changed{0};  // replaced an entry: the replaced item is gone, by design
  std::atomic<std::int64_t> cancelled{0};
};

void run(int schedulers, int consumers, std::uint64_t seed) {
  INFO("seed " << seed << " schedulers " << schedulers << " consumers " << consumers);
  manual_clock clock;
  sluice::requeue_queue<std::uint32_t, std::uint64_t, manual_clock> q(clock);
  counters c;
  const std::size_t ops = sluice_test::scaled(200'000) / static_cast<std::size_t>(schedulers);
  constexpr std::uint32_t key_space = 512;

  std::mutex seen_mutex;
  std::vector<std::uint64_t> popped_ids;
  std::atomic<std::int64_t> popped{0};
  std::atomic<bool> order_ok{true};
  std::atomic<bool> early{false};
  std::atomic<int> unexpected{0};  // full/closed results (Catch2 asserts only on this thread)

  std::vector<std::jthread> consumer_threads;
  for (int i = 0; i < consumers; ++i) {
    consumer_threads.emplace_back([&] {
      std::vector<std::uint64_t> mine;
      manual_clock::time_point last{};
      while (auto e = q.pop()) {
        if (e->deadline > clock.now()) early = true;
        if (consumers == 1 && e->deadline < last) order_ok = false;
        last = e->deadline;
        mine.push_back(e->item);
        ++popped;
      }
      std::lock_guard lock(seen_mutex);
      popped_ids.insert(popped_ids.end(), mine.begin(), mine.end());
    });
  }

  std::atomic<bool> producing{true};
  std::jthread ticker([&] {
    while (producing) {
      clock.advance(1ms);
      std::this_thread::yield();
    }
  });

  std::vector<std::jthread> producer_threads;
  for (int p = 0; p < schedulers; ++p) {
    producer_threads.emplace_back([&, p] {
      std::mt19937_64 rng(seed + static_cast<std::uint64_t>(p) * 7919);
      for (std::size_t i = 0; i < ops; ++i) {
        const auto key = static_cast<std::uint32_t>(rng() % key_space);
        const std::uint64_t id = (static_cast<std::uint64_t>(p) << 40) | i;
        const auto r = rng() % 100;
        if (r < 15) {
          if (q.cancel(key)) ++c.cancelled;
          continue;
        }
        const auto policy = r < 60 ? schedule_policy::keep_earliest
                            : r < 85 ? schedule_policy::replace
                                     : schedule_policy::keep_existing;
        const auto delay = std::chrono::microseconds(static_cast<std::int64_t>(rng() % 20'000)) - 2ms;
        switch (q.schedule(key, id, delay, policy)) {
          case schedule_status::added: ++c.added; break;
          case schedule_status::changed: ++c.changed; break;
          case schedule_status::unchanged: break;
          case schedule_status::full:
          case schedule_status::closed: ++unexpected; break;
        }
      }
    });
  }
  producer_threads.clear();
  producing = false;
  ticker.join();

  // Everything pending is at most 18 ms out: make it due, then wait until every consumer has taken
  // what is due and parked again (the manual clock's documented "caught up" signal).
  clock.advance(1s);
  REQUIRE(clock.wait_for_waiters_for(static_cast<std::size_t>(consumers), 60s));
  const auto pending = q.size();
  q.close();
  consumer_threads.clear();
  const auto rest = q.take_all();

  INFO("added " << c.added << " popped " << popped << " cancelled " << c.cancelled << " changed " << c.changed);
  CHECK(popped.load() > 0);
  CHECK(unexpected == 0);
  CHECK(pending == 0);
  CHECK_FALSE(early);
  CHECK(order_ok);
  // Conservation: each added entry left exactly once (a `changed` keeps the entry, new item).
  CHECK(c.added.load() == popped.load() + c.cancelled.load() + static_cast<std::int64_t>(rest.size()));
  std::sort(popped_ids.begin(), popped_ids.end());
  CHECK(std::adjacent_find(popped_ids.begin(), popped_ids.end()) == popped_ids.end());  // each id once
  CHECK(q.empty());
  CHECK(q.memory_bytes() == 0);
}

}  // namespace

TEST_CASE("requeue_queue stress: schedulers against one consumer conserve every entry") {
  const auto seed = sluice_test::seed();
  for (int schedulers : sluice_test::thread_counts<>) run(schedulers, 1, seed);
}

TEST_CASE("requeue_queue stress: schedulers against several consumers conserve every entry") {
  const auto seed = sluice_test::seed() + 1;
  for (int consumers : {2, 4}) {
    for (int schedulers : {1, 4}) run(schedulers, consumers, seed);
  }
}
