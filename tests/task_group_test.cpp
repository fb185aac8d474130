// Tests for sluice::task_group: the seed's unbounded task list made impossible (bounded alive
// tasks, flat memory over 1M spawns), every task error reported, failed spawns not consuming f.
#include <sluice/task_group.hpp>

#include "test_support.hpp"

#include <array>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <new>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using sluice::task_errors;
using sluice::task_group;

// Live heap allocations made through operator new in this test program, to check "memory flat".
// Not under sanitizers: their runtimes own operator new and would see mismatched pairs.
namespace {
std::atomic<long> g_live_allocations{0};
}

#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__) && !defined(SLUICE_TEST_NO_NEW_COUNT)
#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define SLUICE_TEST_NO_NEW_COUNT 1
#endif
#endif
#endif
#if !defined(SLUICE_TEST_NO_NEW_COUNT) && !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
#define SLUICE_TEST_COUNTS_NEW 1
void* operator new(std::size_t n) {
  void* p = std::malloc(n == 0 ? 1 : n);
  if (p == nullptr) throw std::bad_alloc();
  g_live_allocations.fetch_add(1, std::memory_order_relaxed);
  return p;
}
void operator delete(void* p) noexcept {
  if (p == nullptr) return;
  g_live_allocations.fetch_sub(1, std::memory_order_relaxed);
  std::free(p);
}
void operator delete(void* p, std::size_t) noexcept { operator delete(p); }
#endif

namespace {
void raise_high_water(std::atomic<int>& high, int now) {
  int h = high.load();
  while (now > h && !high.compare_exchange_weak(h, now)) {
  }
}

// A task that fails spawn()'s "did not consume f" check if it was moved from.
struct move_only_task {
  std::unique_ptr<int> payload = std::make_unique<int>(7);
  std::atomic<int>* ran;
  void operator()() const { ran->fetch_add(*payload); }
};
}  // namespace

TEST_CASE("task_group: max_parallel 0 is rejected with the parameter and value") {
  CHECK_THROWS_MATCHES(task_group(0), std::invalid_argument,
                       Catch::Message("sluice::task_group: max_parallel must be >= 1, got 0"));
}

TEST_CASE("task_group: seed leak scenario - 1M spawns, max_parallel 10, never more than 10 alive, memory flat") {
  const auto seed = sluice_test::seed();
  INFO("seed " << seed);
  constexpr int max_parallel = 10;
  const std::size_t spawns = sluice_test::scaled(1'000'000, 20);
  task_group group(max_parallel);
  std::atomic<int> alive{0};
  std::atomic<int> high{0};
  std::atomic<std::size_t> completed{0};
  std::size_t running_high = 0;
  std::mt19937_64 rng(seed);
  long baseline = 0;
  long max_growth = 0;
  for (std::size_t i = 0; i < spawns; ++i) {
    const unsigned work = static_cast<unsigned>(rng() % 64);  // random short duration
    group.spawn([&alive, &high, &completed, work] {
      raise_high_water(high, alive.fetch_add(1) + 1);
      volatile unsigned sink = 0;
      for (unsigned k = 0; k < work; ++k) sink = sink + k;
      if (work % 16 == 0) std::this_thread::yield();
      alive.fetch_sub(1);
      completed.fetch_add(1, std::memory_order_relaxed);
    });
    running_high = std::max(running_high, group.running());
    if (i == 1000) baseline = g_live_allocations.load();  // all workers started by now
    if (i > 1000 && (i & 1023) == 0) max_growth = std::max(max_growth, g_live_allocations.load() - baseline);
  }
  group.wait();
  CHECK(completed == spawns);
  CHECK(high.load() <= max_parallel);
  CHECK(high.load() >= 1);
  CHECK(running_high <= static_cast<std::size_t>(max_parallel));
  CHECK(alive == 0);
  CHECK(group.running() == 0);
  // No per-task bookkeeping: live allocations stay where they were after warm-up.
#if defined(SLUICE_TEST_COUNTS_NEW)
  CHECK(max_growth <= 0);
#else
  (void)max_growth;
#endif
}

TEST_CASE("task_group: every exception from every failing task is reported and the others run") {
  const auto seed = sluice_test::seed();
  INFO("seed " << seed);
  for (std::size_t max_parallel : sluice_test::thread_counts<std::size_t>) {
    INFO("max_parallel " << max_parallel);
    task_group group(max_parallel);
    const int tasks = static_cast<int>(sluice_test::scaled(3000));
    std::atomic<int> succeeded{0};
    std::set<int> expected_failures;
    std::mt19937_64 rng(seed + max_parallel);
    for (int i = 0; i < tasks; ++i) {
      const bool fail = rng() % 3 == 0;
      if (fail) expected_failures.insert(i);
      group.spawn([i, fail, &succeeded] {
        if (fail) throw std::runtime_error(std::to_string(i));
        succeeded.fetch_add(1);
      });
    }
    std::set<int> reported;
    try {
      group.wait();
      FAIL("wait() did not throw");
    } catch (const task_errors& e) {
      CHECK(e.failed() == expected_failures.size());
      CHECK(e.unrecorded() == 0);
      for (const auto& ep : e.errors()) {
        try {
          std::rethrow_exception(ep);
        } catch (const std::runtime_error& re) {
          reported.insert(std::stoi(re.what()));
        }
      }
    }
    CHECK(reported == expected_failures);
    CHECK(succeeded == tasks - static_cast<int>(expected_failures.size()));
    CHECK_NOTHROW(group.wait());  // errors were handed over once
    // The group still works after failures.
    group.spawn([&succeeded] { succeeded.fetch_add(1); });
    group.wait();
    CHECK(succeeded == tasks - static_cast<int>(expected_failures.size()) + 1);
  }
}

TEST_CASE("task_group: workers are reused, never a thread per task") {
  task_group group(3);
  std::mutex m;
  std::set<std::thread::id> ids;
  for (int i = 0; i < 2000; ++i) {
    group.spawn([&] {
      std::lock_guard lock(m);
      ids.insert(std::this_thread::get_id());
    });
  }
  group.wait();
  CHECK(ids.size() <= 3);
  CHECK(ids.count(std::this_thread::get_id()) == 0);
}

TEST_CASE("task_group: failed spawns do not consume the callable") {
  task_group group(1);
  std::atomic<bool> release{false};
  std::atomic<int> ran{0};
  group.spawn([&] {
    while (!release) std::this_thread::yield();
  });
  move_only_task task{std::make_unique<int>(7), &ran};
  CHECK_FALSE(group.try_spawn(std::move(task)));
  CHECK(task.payload);
  CHECK_FALSE(group.try_spawn_for(0s, std::move(task)));
  CHECK(task.payload);
  CHECK_FALSE(group.try_spawn_until(std::chrono::system_clock::now() - 1s, std::move(task)));
  CHECK(task.payload);
  std::stop_source source;
  source.request_stop();
  CHECK_FALSE(group.spawn(source.get_token(), std::move(task)));
  CHECK(task.payload);
  CHECK(group.running() == 1);
  release = true;
  group.wait();
  CHECK(group.try_spawn_for(std::chrono::hours(1), std::move(task)));
  group.wait();
  CHECK(ran == 7);
}

TEST_CASE("task_group: spawn with a stop token is cancelled while blocked on backpressure") {
  task_group group(1);
  std::atomic<bool> release{false};
  group.spawn([&] {
    while (!release) std::this_thread::yield();
  });
  std::stop_source source;
  std::atomic<int> result{-1};
  std::jthread spawner([&] { result = group.spawn(source.get_token(), [] {}) ? 1 : 0; });
  source.request_stop();
  spawner.join();
  CHECK(result == 0);
  release = true;
  group.wait();
}

TEST_CASE("task_group: callables larger than the inline buffer work") {
  task_group group(2);
  std::atomic<long> sum{0};
  for (int i = 0; i < 100; ++i) {
    std::array<long, 64> big{};
    big.fill(i);
    group.spawn([big, &sum] { sum.fetch_add(big[0] + big[63]); });
  }
  group.wait();
  CHECK(sum == 2 * (99 * 100 / 2));
}

TEST_CASE("task_group: wait_for reports unfinished work, then completion") {
  task_group group(2);
  std::atomic<bool> release{false};
  group.spawn([&] {
    while (!release) std::this_thread::yield();
  });
  CHECK_FALSE(group.wait_for(0s));
  CHECK_FALSE(group.wait_until(std::chrono::system_clock::now() - 1s));
  release = true;
  CHECK(group.wait_for(std::chrono::hours(1)));
}

TEST_CASE("task_group: the destructor waits for running tasks and swallows unobserved errors") {
  std::atomic<int> finished{0};
  {
    task_group group(4);
    for (int i = 0; i < 40; ++i) {
      group.spawn([&finished, i] {
        std::this_thread::yield();
        finished.fetch_add(1);
        if (i % 5 == 0) throw std::runtime_error("never observed");
      });
    }
  }  // must not throw or terminate
  CHECK(finished == 40);
}

TEST_CASE("task_group: an idle group uses no CPU") {
  task_group group(4);
  for (int i = 0; i < 100; ++i) group.spawn([] {});
  group.wait();
  const auto before = sluice_test::process_cpu_time();
  std::this_thread::sleep_for(200ms);  // measuring idle time, not waiting for a deadline
  const auto used = sluice_test::process_cpu_time() - before;
  CHECK(used < 50ms);
}

TEST_CASE("task_group: an on_error hook receives every failure as it happens and nothing is stored") {
  const int tasks = static_cast<int>(sluice_test::scaled(20000));
  std::atomic<int> reported{0};
  std::atomic<int> ran{0};
  {
    sluice::task_group group(4, [&](std::exception_ptr e) {
      try {
        std::rethrow_exception(e);
      } catch (const std::runtime_error&) {
        ++reported;
      }
    });
    for (int i = 0; i < tasks; ++i) {
      group.spawn([&ran, i] {
        ++ran;
        if (i % 3 == 0) throw std::runtime_error("task failed");
      });
    }
    CHECK_NOTHROW(group.wait());  // every failure went to the hook: nothing left to throw
    CHECK(group.failed() == static_cast<std::size_t>((tasks + 2) / 3));
  }
  CHECK(ran == tasks);
  CHECK(reported == (tasks + 2) / 3);
}

TEST_CASE("task_group: a throwing on_error hook falls back to storing the error for wait()") {
  sluice::task_group group(2, [](std::exception_ptr) { throw std::logic_error("hook failed"); });
  group.spawn([] { throw std::runtime_error("task failed"); });
  try {
    group.wait();
    FAIL("wait() should have thrown task_errors");
  } catch (const sluice::task_errors& e) {
    REQUIRE(e.failed() == 1);
    CHECK_THROWS_AS(std::rethrow_exception(e.errors().at(0)), std::logic_error);
  }
  CHECK(group.failed() == 1);
}
