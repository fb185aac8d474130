// limiter vs std::counting_semaphore vs a mutex + condition variable semaphore.
// No run can hang: std::counting_semaphore (libstdc++ 12 can lose a wake-up) appears only where it
// never waits (limiter_at_limit) or with every wait bounded at 1 ms (limiter_handoff,
// impl:std_semaphore_timed); see the peers below. Time is wall-clock per operation for the
// multi-threaded runs; CPU is the threads' CPU time per operation (a parked thread costs none).
//
//  limiter_at_limit/workers:1/max:1   acquire/release pairs where the count hits zero every time
//                                     and nobody waits (the acceptance pattern)
//  limiter_at_limit/workers:2/max:2   two threads, count hits zero whenever both hold, no waiter
//  limiter_handoff/workers:2/max:1    two threads on one permit: contended, every release may have
//                                     a waiter (sluice barges, bounded: see limiter.hpp)
//  limiter_handoff/workers:4/max:1    four threads on one permit (more threads than cores)
//  task_group_spawn/...               task_group spawn throughput vs a mutex+cv pool (10 workers)
//
// Run: bench/limiter_bench --benchmark_repetitions=3 --benchmark_out=limiter.json
#include <sluice/limiter.hpp>
#include <sluice/task_group.hpp>

#include <benchmark/benchmark.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <mutex>
#include <semaphore>
#include <string>
#include <thread>
#include <vector>

namespace {

// An honest mutex + condition variable counting semaphore: notifies only when someone waits.
class mutex_cv_semaphore {
 public:
  explicit mutex_cv_semaphore(std::ptrdiff_t count) : count_(count) {}
  void acquire() {
    std::unique_lock lock(mutex_);
    if (count_ == 0) {
      ++waiters_;
      cv_.wait(lock, [this] { return count_ > 0; });
      --waiters_;
    }
    --count_;
  }
  void release() {
    bool wake = false;
    {
      std::lock_guard lock(mutex_);
      ++count_;
      wake = waiters_ > 0;
    }
    if (wake) cv_.notify_one();
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  std::ptrdiff_t count_;
  std::ptrdiff_t waiters_ = 0;
};

struct sluice_impl {
  explicit sluice_impl(std::size_t max) : l(max) {}
  void cycle() {
    auto p = l.acquire();
    benchmark::DoNotOptimize(p);
  }
  sluice::limiter l;
};

// std::counting_semaphore, used only where no acquire can block: libstdc++ 12's semaphore can lose
// a wake-up (GCC bugs 98033, 104928) and leave a waiter asleep forever with the count > 0; a full
// benchmark run hung that way in limiter_handoff (issue 7). In the limiter_at_limit runs each
// thread holds at most one permit and there are as many permits as threads, so acquire() always
// finds the count > 0 and never waits.
struct std_semaphore_impl {
  explicit std_semaphore_impl(std::size_t max) : s(static_cast<std::ptrdiff_t>(max)) {}
  void cycle() {
    s.acquire();
    benchmark::ClobberMemory();
    s.release();
  }
  std::counting_semaphore<> s;
};

// std::counting_semaphore where acquires do block (the hand-off runs): every wait is bounded, so
// a lost wake-up costs at most 1 ms (the waiter re-checks the count on timeout) instead of hanging
// the run. A lost wake-up therefore shows up in this peer's numbers as a stall, not as a hang.
struct std_semaphore_timed_impl {
  explicit std_semaphore_timed_impl(std::size_t max) : s(static_cast<std::ptrdiff_t>(max)) {}
  void cycle() {
    while (!s.try_acquire_for(std::chrono::milliseconds(1))) {
    }
    benchmark::ClobberMemory();
    s.release();
  }
  std::counting_semaphore<> s;
};

struct mutex_cv_impl {
  explicit mutex_cv_impl(std::size_t max) : s(static_cast<std::ptrdiff_t>(max)) {}
  void cycle() {
    s.acquire();
    benchmark::ClobberMemory();
    s.release();
  }
  mutex_cv_semaphore s;
};

template <class Impl, std::size_t Max>
void bm_cycle(benchmark::State& state) {
  static Impl impl(Max);  // shared by the benchmark's threads; one per (impl, max)
  for (auto _ : state) impl.cycle();
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()));
}

// task_group spawn throughput: max_parallel 10, trivial tasks, one spawner.
template <class Group>
void bm_spawn(benchmark::State& state) {
  Group group(10);
  std::atomic<std::size_t> done{0};
  for (auto _ : state) group.spawn([&done] { done.fetch_add(1, std::memory_order_relaxed); });
  group.wait();
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()));
}

// Peer for task_group: a fixed pool of workers on a mutex + cv queue bounded at max_parallel.
class mutex_cv_pool {
 public:
  explicit mutex_cv_pool(std::size_t workers) : max_(workers) {
    for (std::size_t i = 0; i < workers; ++i) threads_.emplace_back([this] { run(); });
  }
  ~mutex_cv_pool() {
    {
      std::lock_guard lock(m_);
      stop_ = true;
    }
    work_cv_.notify_all();
    threads_.clear();
  }
  void spawn(std::function<void()> f) {
    std::unique_lock lock(m_);
    space_cv_.wait(lock, [this] { return queue_.size() + running_ < max_; });
    queue_.push_back(std::move(f));
    lock.unlock();
    work_cv_.notify_one();
  }
  void wait() {
    std::unique_lock lock(m_);
    idle_cv_.wait(lock, [this] { return queue_.empty() && running_ == 0; });
  }

 private:
  void run() {
    std::unique_lock lock(m_);
    for (;;) {
      work_cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;
      auto f = std::move(queue_.front());
      queue_.pop_front();
      ++running_;
      lock.unlock();
      f();
      lock.lock();
      --running_;
      space_cv_.notify_one();
      if (queue_.empty() && running_ == 0) idle_cv_.notify_all();
    }
  }
  std::size_t max_;
  std::mutex m_;
  std::condition_variable work_cv_, space_cv_, idle_cv_;
  std::deque<std::function<void()>> queue_;
  std::size_t running_ = 0;
  bool stop_ = false;
  std::vector<std::jthread> threads_;
};

template <class Impl, std::size_t Max>
void add_cycle(const std::string& group, int workers, const char* impl) {
  const std::string name = group + "/workers:" + std::to_string(workers) + "/max:" + std::to_string(Max) + "/impl:" + impl;
  auto* b = benchmark::RegisterBenchmark(name.c_str(), bm_cycle<Impl, Max>);
  b->Threads(workers);
  if (workers > 1) b->UseRealTime();
}

const bool registered = [] {
  add_cycle<sluice_impl, 1>("limiter_at_limit", 1, "sluice");
  add_cycle<std_semaphore_impl, 1>("limiter_at_limit", 1, "std_semaphore");
  add_cycle<mutex_cv_impl, 1>("limiter_at_limit", 1, "mutex_cv");
  add_cycle<sluice_impl, 2>("limiter_at_limit", 2, "sluice");
  add_cycle<std_semaphore_impl, 2>("limiter_at_limit", 2, "std_semaphore");
  add_cycle<mutex_cv_impl, 2>("limiter_at_limit", 2, "mutex_cv");
  // Distinct static instances from the 1-worker runs above would be nicer but the count is
  // back to max between benchmarks, so sharing is harmless.
  add_cycle<sluice_impl, 1>("limiter_handoff", 2, "sluice");
  add_cycle<std_semaphore_timed_impl, 1>("limiter_handoff", 2, "std_semaphore_timed");
  add_cycle<mutex_cv_impl, 1>("limiter_handoff", 2, "mutex_cv");
  add_cycle<sluice_impl, 1>("limiter_handoff", 4, "sluice");
  add_cycle<std_semaphore_timed_impl, 1>("limiter_handoff", 4, "std_semaphore_timed");
  add_cycle<mutex_cv_impl, 1>("limiter_handoff", 4, "mutex_cv");
  benchmark::RegisterBenchmark("task_group_spawn/max_parallel:10/impl:sluice", bm_spawn<sluice::task_group>)
      ->UseRealTime()
      ->MeasureProcessCPUTime();
  benchmark::RegisterBenchmark("task_group_spawn/max_parallel:10/impl:mutex_cv", bm_spawn<mutex_cv_pool>)
      ->UseRealTime()
      ->MeasureProcessCPUTime();
  return true;
}();

}  // namespace
