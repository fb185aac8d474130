// Benchmarks for sluice::write_behind, side by side with a baseline written the way seed 003 does
// it: a bounded mutex + condition-variable queue, a flusher that takes one item at a time and
// polls with a per-batch timeout, retries pushed back into the intake with a non-blocking write.
//
//  BM_*_throughput   values/s into a null sink: producers 1/2/4, max_batch 64/512; sluice unkeyed,
//                    keyed with distinct keys, keyed with a hot set of 100 keys; the baseline.
//  BM_*_latency      enqueue-to-persist p50/p99 with linger 5 ms at 50% load: the sink sleeps
//                    200 us + 1 us per row (a fast database). Each run first measures what the
//                    queue and that sink absorb flat out (capacity), then offers half of it for a
//                    second, paced in 100 us steps. Also at a trickle (20k/s), where linger decides.
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
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
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
struct stamped {
  std::chrono::steady_clock::time_point at;
};

// The sink's cost: 200 us per batch + 1 us per row, sleeping (as a thread waiting for a database).
void simulate_write(std::size_t rows) {
  std::this_thread::sleep_for(200us + std::chrono::microseconds(rows));
}

void record(std::mutex& m, std::vector<double>& out, std::span<const stamped> batch) {
  const auto now = std::chrono::steady_clock::now();
  std::lock_guard lock(m);
  for (const stamped& s : batch) out.push_back(std::chrono::duration<double, std::milli>(now - s.at).count());
}

// Offers `rate` values/s for `duration`, in 100 us steps.
template <class Enqueue>
void offer(double rate, std::chrono::milliseconds duration, Enqueue&& enqueue) {
  const auto start = std::chrono::steady_clock::now();
  const auto end = start + duration;
  double owed = 0;
  auto next = start;
  while (next < end) {
    std::this_thread::sleep_until(next);
    const auto now = std::chrono::steady_clock::now();
    owed += rate * std::chrono::duration<double>(100us).count();
    for (; owed >= 1; owed -= 1) enqueue(stamped{now});
    next += 100us;
  }
}

void report(benchmark::State& state, std::vector<double>& lat) {
  if (lat.empty()) return;
  std::sort(lat.begin(), lat.end());
  state.counters["p50_ms"] = lat[lat.size() / 2];
  state.counters["p99_ms"] = lat[lat.size() * 99 / 100];
  state.counters["max_ms"] = lat.back();
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

// Arg: 0 = half of the measured capacity; otherwise the offered rate in values/s.
void BM_write_behind_latency(benchmark::State& state) {
  std::mutex m;
  std::vector<double> lat;
  auto make = [&] {
    return std::make_unique<sluice::write_behind<stamped>>(
        sluice::write_behind_options<stamped>{.capacity = 8192, .max_batch = 512, .linger = 5ms},
        [&](std::span<const stamped> b) {
          simulate_write(b.size());
          record(m, lat, b);
        });
  };
  auto enqueue = [](auto& wb, stamped s) { (void)wb.enqueue(std::move(s)); };
  auto flush = [](auto& wb) { wb.flush(); };
  double rate = static_cast<double>(state.range(0));
  for (auto _ : state) {
    if (rate == 0) {
      rate = capacity_of(make, enqueue, flush) / 2;
      lat.clear();
    }
    auto wb = make();
    offer(rate, 1000ms, [&](stamped s) { enqueue(*wb, s); });
    wb->flush();
  }
  report(state, lat);
  state.counters["offered_per_s"] = rate;
  state.SetLabel("sluice, linger 5ms");
}

void BM_seed_style_latency(benchmark::State& state) {
  std::mutex m;
  std::vector<double> lat;
  auto make = [&] {
    return std::make_unique<seed_style_queue<stamped>>(8192, 512, 5000us, 3, [&](std::span<const stamped> b) {
      simulate_write(b.size());
      record(m, lat, b);
      return true;
    });
  };
  auto enqueue = [](auto& q, stamped s) { q.enqueue(s); };
  auto flush = [](auto& q) { q.flush(); };
  double rate = static_cast<double>(state.range(0));
  for (auto _ : state) {
    if (rate == 0) {
      rate = capacity_of(make, enqueue, flush) / 2;
      lat.clear();
    }
    auto q = make();
    offer(rate, 1000ms, [&](stamped s) { enqueue(*q, s); });
    q->flush();
  }
  report(state, lat);
  state.counters["offered_per_s"] = rate;
  state.SetLabel("seed-style, flush interval 5ms");
}

BENCHMARK(BM_write_behind_latency)->Arg(0)->Arg(20000)->ArgName("rate")->Iterations(1)->UseRealTime()->Unit(benchmark::kMillisecond);
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
