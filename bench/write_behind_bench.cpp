// Benchmarks for sluice::write_behind, side by side with a baseline written the way seed 003 does
// it: a bounded mutex + condition-variable queue, a flusher that takes one item at a time and
// polls with a per-batch timeout, retries pushed back into the intake with a non-blocking write.
//
//  BM_*_throughput   values/s into a null sink: producers 1/2/4, max_batch 64/512; sluice unkeyed,
//                    keyed with distinct keys, keyed with a hot set of 100 keys; the baseline.
//  BM_*_latency      enqueue-to-persist p50/p99 with linger 5 ms at 50% load: the sink sleeps
//                    200 us + 1 us per row (a fast database). Each run first measures what the
//                    queue and that sink absorb flat out (capacity), then offers half of it for
//                    two seconds from one producer (100 us steps, each value stamped just before
//                    its enqueue). Also at a trickle (20k/s), where linger decides. Split into the
//                    batcher's share (wait) and the sink call's (sink); see the latency section.
//  BM_*_idle_cpu     process CPU over one second of an idle batcher (after a flush).
//
// Real time and process CPU time are both reported (MeasureProcessCPUTime).
#include <sluice/write_behind.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include <sys/resource.h>

using namespace std::chrono_literals;

namespace {

// ---- the seed-style baseline ------------------------------------------------------------------
template <class T>
class seed_style_queue {
 public:
  using sink_fn = std::function<bool(std::span<const T>)>;  // false: the batch failed
  seed_style_queue(std::size_t capacity, std::size_t batch_size, std::chrono::microseconds flush_interval,
                   std::uint32_t max_retries, sink_fn sink)
      : capacity_(capacity), batch_size_(batch_size), interval_(flush_interval), max_retries_(max_retries),
        sink_(std::move(sink)), flusher_([this](std::stop_token st) { run(st); }) {}
  ~seed_style_queue() {
    flusher_.request_stop();
    not_empty_.notify_all();
  }

  void enqueue(T value) {  // WriteAsync on a bounded channel in FullMode.Wait
    std::unique_lock lock(m_);
    not_full_.wait(lock, [&] { return q_.size() < capacity_; });
    q_.push_back(entry{std::move(value), 0});
    ++enqueued_;
    not_empty_.notify_one();
  }
  void flush() {
    std::unique_lock lock(m_);
    done_.wait(lock, [&] { return persisted_ + failed_ == enqueued_; });
  }

 private:
  struct entry {
    T value;
    std::uint32_t retries;
  };
  void run(std::stop_token st) {
    std::vector<entry> batch;
    std::vector<T> values;
    while (!st.stop_requested()) {
      batch.clear();
      const auto deadline = std::chrono::steady_clock::now() + interval_;  // CancelAfter(flushInterval)
      while (batch.size() < batch_size_) {  // one ReadAsync per item
        std::unique_lock lock(m_);
        if (!not_empty_.wait_until(lock, deadline, [&] { return !q_.empty() || st.stop_requested(); })) break;
        if (q_.empty()) break;
        batch.push_back(std::move(q_.front()));
        q_.pop_front();
        not_full_.notify_one();
      }
      if (batch.empty()) continue;
      values.clear();
      for (auto& e : batch) values.push_back(e.value);
      const bool ok = sink_(values);
      std::lock_guard lock(m_);
      if (ok) {
        persisted_ += batch.size();
      } else {
        for (auto& e : batch) {  // TryWrite back into the intake; dropped when it is full
          if (e.retries < max_retries_ && q_.size() < capacity_) {
            q_.push_back(entry{std::move(e.value), e.retries + 1});
          } else {
            ++failed_;
          }
        }
      }
      done_.notify_all();
    }
  }

  const std::size_t capacity_, batch_size_;
  const std::chrono::microseconds interval_;
  const std::uint32_t max_retries_;
  sink_fn sink_;
  std::mutex m_;
  std::condition_variable not_empty_, not_full_, done_;
  std::deque<entry> q_;
  std::uint64_t enqueued_ = 0, persisted_ = 0, failed_ = 0;
  std::jthread flusher_;
};

struct keyed_value {
  std::uint64_t key;
  std::uint64_t payload;
};

constexpr std::uint64_t values_per_run = 1 << 20;

template <class Produce>
void produce(int producers, Produce&& one) {
  std::vector<std::jthread> threads;
  const std::uint64_t each = values_per_run / static_cast<std::uint64_t>(producers);
  for (int p = 0; p < producers; ++p) {
    threads.emplace_back([&, p] {
      for (std::uint64_t i = 0; i < each; ++i) one(p, i);
    });
  }
}

// ---- throughput --------------------------------------------------------------------------------
// Args: producers, max_batch, mode (0 unkeyed, 1 keyed distinct, 2 keyed hot-100).
void BM_write_behind_throughput(benchmark::State& state) {
  const int producers = static_cast<int>(state.range(0));
  const auto max_batch = static_cast<std::size_t>(state.range(1));
  const int mode = static_cast<int>(state.range(2));
  for (auto _ : state) {
    if (mode == 0) {
      sluice::write_behind<std::uint64_t> wb({.capacity = 8192, .max_batch = max_batch},
                                             [](std::span<const std::uint64_t> b) { benchmark::DoNotOptimize(b.data()); });
      produce(producers, [&](int, std::uint64_t i) { (void)wb.enqueue(std::uint64_t{i}); });
      wb.flush();
    } else {
      sluice::write_behind_options<keyed_value, std::uint64_t> o{.capacity = 8192, .max_batch = max_batch};
      o.key_of = [](const keyed_value& v) { return v.key; };
      sluice::write_behind<keyed_value, std::uint64_t> wb(
          o, [](std::span<const keyed_value> b) { benchmark::DoNotOptimize(b.data()); });
      produce(producers, [&](int p, std::uint64_t i) {
        const std::uint64_t key = mode == 1 ? i * 8 + static_cast<std::uint64_t>(p) : i % 100;
        (void)wb.enqueue(keyed_value{key, i});
      });
      wb.flush();
    }
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * values_per_run));
  state.SetLabel(mode == 0 ? "sluice unkeyed" : mode == 1 ? "sluice keyed distinct" : "sluice keyed hot-100");
}

void BM_seed_style_throughput(benchmark::State& state) {
  const int producers = static_cast<int>(state.range(0));
  const auto max_batch = static_cast<std::size_t>(state.range(1));
  for (auto _ : state) {
    seed_style_queue<std::uint64_t> q(8192, max_batch, 5000us, 3, [](std::span<const std::uint64_t> b) {
      benchmark::DoNotOptimize(b.data());
      return true;
    });
    produce(producers, [&](int, std::uint64_t i) { q.enqueue(i); });
    q.flush();
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * values_per_run));
  state.SetLabel("seed-style baseline");
}

void throughput_args(benchmark::internal::Benchmark* b, bool with_modes) {
  for (int mode : with_modes ? std::vector<int>{0, 1, 2} : std::vector<int>{0}) {
    for (int batch : {64, 512}) {
      for (int producers : {1, 2, 4}) b->Args({producers, batch, mode});
    }
  }
  b->ArgNames({"producers", "max_batch", "mode"})->UseRealTime()->MeasureProcessCPUTime()->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_write_behind_throughput)->Apply([](auto* b) { throughput_args(b, true); });
BENCHMARK(BM_seed_style_throughput)->Apply([](auto* b) { throughput_args(b, false); });

// ---- latency at 50% load ----------------------------------------------------------------------
// Enqueue-to-persist: from just before enqueue() (a clock read per value, by the producer, at the
// moment it calls enqueue) to the return of the sink call that persisted it. The sink stands for a
// fast database: it sleeps 200 us + 1 us per row, as a thread waiting for a server does. Besides the
// total, each run splits it: `wait` = enqueue to the sink call's start (the batcher's share: linger,
// waiting for a batch to fill, queueing behind a batch in the sink, the flusher's wake-up) and
// `sink` = the sink call itself (the simulated database, including the OS waking the sleeper).
// `late` is how far past its oldest value's linger deadline a batch that was not full started
// (a late flusher wake-up shows here). The 1-minute load average is reported with each run.
struct stamped {
  std::chrono::steady_clock::time_point at;
};

void simulate_write(std::size_t rows) { std::this_thread::sleep_for(200us + std::chrono::microseconds(rows)); }

double ms(std::chrono::steady_clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

// What the sink records: per value total and wait; per batch sink time and lateness. Preallocated
// so that recording never reallocates inside a sink call.
struct latency_log {
  explicit latency_log(std::size_t values) {
    total.reserve(values);
    wait.reserve(values);
    sink.reserve(values / 8);
    late.reserve(values / 8);
  }
  void record(std::span<const stamped> batch, std::chrono::steady_clock::time_point entered,
              std::chrono::steady_clock::time_point left, std::size_t max_batch, std::chrono::nanoseconds linger) {
    std::lock_guard lock(m);
    auto oldest = entered;
    for (const stamped& s : batch) {
      total.push_back(ms(left - s.at));
      wait.push_back(ms(entered - s.at));
      oldest = std::min(oldest, s.at);
    }
    sink.push_back(ms(left - entered));
    if (batch.size() < max_batch) late.push_back(ms(entered - (oldest + linger)));
  }
  void clear() {
    std::lock_guard lock(m);
    total.clear();
    wait.clear();
    sink.clear();
    late.clear();
  }
  std::mutex m;
  std::vector<double> total, wait, sink, late;
};

double percentile(std::vector<double>& v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<std::size_t>(static_cast<double>(v.size()) * p))];
}

double load_average() {
  double one = -1;
  if (std::FILE* f = std::fopen("/proc/loadavg", "r")) {
    if (std::fscanf(f, "%lf", &one) != 1) one = -1;
    std::fclose(f);
  }
  return one;
}

// Offers `rate` values/s for `duration` on one producer thread: it sleeps to the next 100 us step
// and enqueues what is owed by then, each value stamped just before its own enqueue() (a late
// wake-up makes a burst, never a stale stamp).
template <class Enqueue>
void offer(double rate, std::chrono::milliseconds duration, Enqueue&& enqueue) {
  const auto start = std::chrono::steady_clock::now();
  const auto end = start + duration;
  std::uint64_t sent = 0;
  for (auto next = start; next < end; next += 100us) {
    std::this_thread::sleep_until(next);
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const auto owed = static_cast<std::uint64_t>(rate * std::min(elapsed, std::chrono::duration<double>(duration).count()));
    for (; sent < owed; ++sent) enqueue(stamped{std::chrono::steady_clock::now()});
  }
}

void report(benchmark::State& state, latency_log& log, double rate) {
  std::lock_guard lock(log.m);
  const double batches = static_cast<double>(log.sink.size());
  state.counters["offered_per_s"] = rate;
  state.counters["avg_batch"] = batches > 0 ? static_cast<double>(log.total.size()) / batches : 0;
  state.counters["p50_ms"] = percentile(log.total, 0.50);
  state.counters["p99_ms"] = percentile(log.total, 0.99);
  state.counters["max_ms"] = log.total.empty() ? 0 : log.total.back();
  state.counters["wait_p99_ms"] = percentile(log.wait, 0.99);
  state.counters["sink_p99_ms"] = percentile(log.sink, 0.99);
  state.counters["late_p99_ms"] = percentile(log.late, 0.99);
  state.counters["loadavg"] = load_average();
}

// Values/s a queue and the simulated sink absorb flat out (one producer, 200k values).
template <class Make, class Enqueue, class Flush>
double capacity_of(Make&& make, Enqueue&& enqueue, Flush&& flush) {
  auto q = make();
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < 200000; ++i) enqueue(*q, stamped{start});
  flush(*q);
  return 200000 / std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

constexpr std::size_t latency_batch = 512;
constexpr auto latency_linger = 5ms;

// Args: rate (0 = half of the capacity measured first in the same run; otherwise values/s), flushers,
// flusher_slice in us (0: the threads keep the scheduler's default slice).
void BM_write_behind_latency(benchmark::State& state) {
  const auto flushers = static_cast<std::size_t>(state.range(1));
  const auto slice = std::chrono::microseconds(state.range(2));
  latency_log log(2'500'000);
  auto make = [&] {
    return std::make_unique<sluice::write_behind<stamped>>(
        sluice::write_behind_options<stamped>{
            .capacity = 8192,
            .max_batch = latency_batch,
            .linger = latency_linger,
            .flushers = flushers,
            .flusher_slice = slice},
        [&](std::span<const stamped> b) {
          const auto entered = std::chrono::steady_clock::now();
          simulate_write(b.size());
          log.record(b, entered, std::chrono::steady_clock::now(), latency_batch, latency_linger);
        });
  };
  auto enqueue = [](auto& wb, stamped s) { (void)wb.enqueue(std::move(s)); };
  auto flush = [](auto& wb) { wb.flush(); };
  double rate = static_cast<double>(state.range(0));
  for (auto _ : state) {
    if (rate == 0) rate = capacity_of(make, enqueue, flush) / 2;
    log.clear();
    auto wb = make();
    offer(rate, 2000ms, [&](stamped s) { enqueue(*wb, s); });
    wb->flush();
  }
  report(state, log, rate);
  state.SetLabel("sluice, linger 5ms, " + std::to_string(flushers) + " flusher(s), slice " +
                 (slice.count() == 0 ? std::string("default") : std::to_string(slice.count()) + "us"));
}

void BM_seed_style_latency(benchmark::State& state) {
  latency_log log(2'500'000);
  auto make = [&] {
    return std::make_unique<seed_style_queue<stamped>>(8192, latency_batch, 5000us, 3, [&](std::span<const stamped> b) {
      const auto entered = std::chrono::steady_clock::now();
      simulate_write(b.size());
      log.record(b, entered, std::chrono::steady_clock::now(), latency_batch, latency_linger);
      return true;
    });
  };
  auto enqueue = [](auto& q, stamped s) { q.enqueue(s); };
  auto flush = [](auto& q) { q.flush(); };
  double rate = static_cast<double>(state.range(0));
  for (auto _ : state) {
    if (rate == 0) rate = capacity_of(make, enqueue, flush) / 2;
    log.clear();
    auto q = make();
    offer(rate, 2000ms, [&](stamped s) { enqueue(*q, s); });
    q->flush();
  }
  report(state, log, rate);
  state.SetLabel("seed-style, flush interval 5ms");
}

BENCHMARK(BM_write_behind_latency)
    ->Args({0, 1, 0})
    ->Args({0, 1, 100})
    ->Args({0, 2, 0})
    ->Args({0, 2, 100})
    ->Args({20000, 1, 0})
    ->Args({20000, 1, 100})
    ->ArgNames({"rate", "flushers", "slice_us"})
    ->Iterations(1)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_seed_style_latency)->Arg(0)->Arg(20000)->ArgName("rate")->Iterations(1)->UseRealTime()->Unit(benchmark::kMillisecond);

// ---- idle CPU ----------------------------------------------------------------------------------
double process_cpu_ms() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return (static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) * 1e3) +
         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e3;
}

void BM_write_behind_idle_cpu(benchmark::State& state) {
  double cpu = 0;
  for (auto _ : state) {
    sluice::write_behind<std::uint64_t> wb({.capacity = 8192, .max_batch = 512, .flushers = 4},
                                           [](std::span<const std::uint64_t>) {});
    for (std::uint64_t i = 0; i < 1000; ++i) (void)wb.enqueue(std::uint64_t{i});
    wb.flush();
    const double before = process_cpu_ms();
    std::this_thread::sleep_for(1s);
    cpu = process_cpu_ms() - before;
  }
  state.counters["idle_cpu_ms_per_s"] = cpu;
  state.SetLabel("sluice, 4 flushers");
}

void BM_seed_style_idle_cpu(benchmark::State& state) {
  double cpu = 0;
  for (auto _ : state) {
    seed_style_queue<std::uint64_t> q(8192, 512, 5000us, 3, [](std::span<const std::uint64_t>) { return true; });
    for (std::uint64_t i = 0; i < 1000; ++i) q.enqueue(i);
    q.flush();
    const double before = process_cpu_ms();
    std::this_thread::sleep_for(1s);
    cpu = process_cpu_ms() - before;
  }
  state.counters["idle_cpu_ms_per_s"] = cpu;
  state.SetLabel("seed-style, polls every 5ms");
}

BENCHMARK(BM_write_behind_idle_cpu)->Iterations(1)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_seed_style_idle_cpu)->Iterations(1)->UseRealTime()->Unit(benchmark::kMillisecond);

}  // namespace
