// Benchmarks for sluice::dispatch_pipeline, end to end, against scanning baselines in the same
// binary:
//   impl:push       sluice::dispatch_pipeline (one sender thread parked in wait_ready; 16 KiB
//                   batches, linger 5 ms, 1 MiB requests, Kafka's defaults) with the pipeline-wide
//                   delivery callback
//   impl:scan       the pre-push design (see scanning_pipeline): the same batching behind one lock,
//                   a sender that walks every partition each cycle and sleeps until the earliest
//                   linger deadline (or a seal), as Kafka's sender does
//   impl:scan_tick  the same walk on a 5 ms tick (the baseline before s2; linger up to 2x)
// send/impl/appenders:T/sink:S/partitions:P: T threads send 400k 100-byte records over P
//   partitions (1,000; 10,000 to show the scan's growth) and 5 destinations, then flush; items/s
//   is end-to-end (every record's delivery callback has run).
//   sink:0 completes every request at once on the sender thread; sink:1 (push only) completes
//   each request 1 ms later from a completer thread (up to 5 in flight per destination).
//   send_random/...: the same with each record sent to a random partition (keyed records: the
//   partition is a hash of the key), so neither design walks its partitions in memory order (the
//   round-robin order of send/ lets the scan's array of partitions be prefetched).
//   Counters: cpu_ns_per_record (process CPU time / records), appender_cpu_ns_per_record (the
//   appender threads' share), records_per_batch, records_per_request.
// lowrate/impl/partitions:P: 20,000 records/s for 1 s over P partitions; process CPU per second.
// idle: process CPU of a pipeline with no traffic over 1 s (its sender parked).
#include <sluice/detail/lock_table_mutex.hpp>
#include <sluice/dispatch_pipeline.hpp>

#include <benchmark/benchmark.h>

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <utility>
#include <optional>
#include <thread>
#include <vector>

#include <sys/resource.h>
#include <time.h>

namespace {

using namespace std::chrono_literals;
int partitions = 1000;  // set per benchmark from its argument (one benchmark runs at a time)
bool random_order = false;  // send_random/: each record to a random partition (as keyed records hash)
constexpr int destinations = 5;
constexpr std::size_t records_per_iteration = 400'000;

struct rec {
  std::array<char, 100> bytes{};
};

double thread_cpu_ns() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) * 1e9 + static_cast<double>(ts.tv_nsec);
}

double process_cpu_ns() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return (static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) * 1e6 +
          static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec)) *
         1e3;
}

using pipe_t = sluice::dispatch_pipeline<int, rec, int>;

// Completes requests 1 ms after they arrive, from its own thread.
class delayed_completer {
 public:
  delayed_completer() : thread_([this](std::stop_token st) { loop(st); }) {}
  ~delayed_completer() {
    thread_.request_stop();
    cv_.notify_one();
  }
  void push(pipe_t::request&& r) {
    {
      std::lock_guard l(m_);
      q_.push_back({std::chrono::steady_clock::now() + 1ms, std::move(r)});
    }
    cv_.notify_one();
  }

 private:
  struct item {
    std::chrono::steady_clock::time_point due;
    pipe_t::request r;
  };
  void loop(std::stop_token st) {
    std::unique_lock l(m_);
    while (!st.stop_requested() || !q_.empty()) {
      if (q_.empty()) {
        cv_.wait(l, [&] { return st.stop_requested() || !q_.empty(); });
        continue;
      }
      if (q_.front().due > std::chrono::steady_clock::now()) {
        cv_.wait_until(l, q_.front().due);
        continue;
      }
      item it = std::move(q_.front());
      q_.pop_front();
      l.unlock();
      it.r.complete(sluice::send_result::ok);
      l.lock();
    }
  }
  std::mutex m_;
  std::condition_variable cv_;
  std::deque<item> q_;
  std::jthread thread_;
};

// Runs the appenders; returns the CPU time they used (ns), so the rest (sender, completer) can be
// told apart from it.
template <class Send>
double run_appenders(int threads, Send&& send) {
  std::vector<std::thread> ts;
  std::vector<double> cpu(static_cast<std::size_t>(threads), 0.0);
  for (int t = 0; t < threads; ++t) {
    ts.emplace_back([&, t] {
      const double c0 = thread_cpu_ns();
      const rec proto{};
      int p = t * 13;
      std::uint64_t x = 0x9E3779B97F4A7C15ull * static_cast<std::uint64_t>(t + 1);  // xorshift64 state
      const std::size_t mine = records_per_iteration / static_cast<std::size_t>(threads);
      for (std::size_t i = 0; i < mine; ++i) {
        if (random_order) {
          x ^= x << 13;
          x ^= x >> 7;
          x ^= x << 17;
          p = static_cast<int>((x >> 32) % static_cast<std::uint64_t>(partitions));
        }
        send(p, rec(proto));
        if (!random_order && ++p == partitions) p = 0;
      }
      cpu[static_cast<std::size_t>(t)] = thread_cpu_ns() - c0;
    });
  }
  for (auto& t : ts) t.join();
  double sum = 0;
  for (double c : cpu) sum += c;
  return sum;
}

void send_push_impl(benchmark::State& state, bool random) {
  random_order = random;
  const int threads = static_cast<int>(state.range(0));
  const bool async = state.range(1) != 0;
  partitions = static_cast<int>(state.range(2));
  std::atomic<std::uint64_t> delivered{0};
  std::optional<delayed_completer> completer;
  if (async) completer.emplace();
  pipe_t pipe(
      {}, [](int p) { return std::optional<int>(p % destinations); },
      [&](pipe_t::request&& r) {
        if (async) completer->push(std::move(r)); else r.complete(sluice::send_result::ok);
      },
      [](const rec&) { return std::size_t{100}; },
      [&](const rec&, const sluice::delivery_report& d) {
        if (d) delivered.fetch_add(1, std::memory_order_relaxed);  // relaxed: a count read after flush()
      });
  const double cpu0 = process_cpu_ns();
  double appender_cpu = 0;
  const auto m0 = pipe.metrics();
  for (auto _ : state) {
    appender_cpu += run_appenders(threads, [&](int p, rec&& r) {
      if (pipe.send(p, std::move(r)) != pipe_t::send_status::ok) std::abort();
    });
    pipe.flush();
  }
  const double cpu = process_cpu_ns() - cpu0;
  const auto m1 = pipe.metrics();
  const auto n = static_cast<double>(state.iterations() * records_per_iteration);
  if (delivered.load() != state.iterations() * records_per_iteration) state.SkipWithError("lost records");
  state.SetItemsProcessed(static_cast<std::int64_t>(n));
  state.counters["cpu_ns_per_record"] = cpu / n;
  state.counters["appender_cpu_ns_per_record"] = appender_cpu / n;
  state.counters["records_per_batch"] = n / static_cast<double>(m1.batches - m0.batches);
  state.counters["records_per_request"] = n / static_cast<double>(m1.requests - m0.requests);
  // Upper bounds (log2 buckets) of the batch queue time (first append -> report).
  state.counters["queue_p50_us"] = static_cast<double>(m1.queue_time.percentile(0.50).count()) / 1e3;
  state.counters["queue_p99_us"] = static_cast<double>(m1.queue_time.percentile(0.99).count()) / 1e3;
}

// ---- scanning baseline ---------------------------------------------------------------------------
// The pre-push design (Kafka's RecordAccumulator.ready(): walk every partition each cycle), with
// the pipeline's per-record contract: a per-record callback slot (8 bytes, as the pipeline's),
// run if set, else the global one; a set-once report flag; records sized through a
// std::function; one batch per partition per request, delivered before the partition's next
// (order). It uses the same lock type as the accumulator (spin, then park).
//   exact linger (impl:scan): the sender sleeps until the earliest linger deadline it saw in its
//     last walk, or a seal, as Kafka's nextReadyCheckDelay does: a batch waits at most `linger`,
//     as in the pipeline.
//   tick (impl:scan_tick, the baseline before s2): the sender wakes every 5 ms (or on a seal), so
//     a lingering batch may wait up to twice the linger; fewer walks, bigger batches.
class scanning_pipeline {
 public:
  using callback = std::function<void(const rec&, bool)>;
  using size_function = std::function<std::size_t(const rec&)>;
  using steady = std::chrono::steady_clock;
  scanning_pipeline(callback cb, size_function size_of, bool exact_linger)
      : cb_(std::move(cb)), size_of_(std::move(size_of)), exact_(exact_linger),
        parts_(static_cast<std::size_t>(partitions)) {
    sender_ = std::jthread([this](std::stop_token st) { loop(st); });
  }
  ~scanning_pipeline() {
    sender_.request_stop();
    { std::lock_guard l(m_); }  // the sender is either before its predicate check or waiting
    cv_.notify_all();
  }
  void send(int p, rec&& r) { send_impl(p, r, nullptr); }
  void send(int p, rec&& r, callback on_delivery) {
    send_impl(p, r, on_delivery ? std::make_unique<callback>(std::move(on_delivery)) : nullptr);
  }
  std::uint64_t batches() {
    std::lock_guard l(m_);
    return batches_;
  }
  std::uint64_t requests() {
    std::lock_guard l(m_);
    return requests_;
  }
  void flush() {
    std::unique_lock l(m_);
    flushing_ = true;
    ++seals_;  // "look again": the sender's next walk seals everything
    cv_.notify_one();
    done_cv_.wait(l, [&] { return pending_ == 0; });
    flushing_ = false;
  }

 private:
  static constexpr std::size_t batch_bytes = 16 * 1024;
  static constexpr std::size_t request_bytes = 1024 * 1024;
  static constexpr std::size_t buffer_cap = 32 * 1024 * 1024;
  static constexpr auto linger = 5ms;
  struct entry {
    rec record;
    std::unique_ptr<callback> cb;
    bool done = false;
  };
  struct partition_state {
    std::vector<entry> open;
    steady::time_point opened{};
    std::deque<std::vector<entry>> sealed;
  };
  void send_impl(int p, rec& r, std::unique_ptr<callback> cb) {
    const std::size_t bytes = size_of_(r);
    std::unique_lock l(m_);
    space_cv_.wait(l, [&] { return buffer_ + bytes <= buffer_cap; });
    auto& ps = parts_[static_cast<std::size_t>(p)];
    bool wake = false;
    if (ps.open.empty()) {
      ps.opened = steady::now();
      ++opens_;
      // A sender asleep without a deadline must learn this one (Kafka wakes its sender for every
      // new batch; one that already sleeps until an earlier deadline needs nothing).
      wake = std::exchange(idle_wait_, false);
    }
    ps.open.push_back(entry{std::move(r), std::move(cb)});
    buffer_ += bytes;
    ++pending_;
    if (ps.open.size() * 100 >= batch_bytes) {
      ps.sealed.push_back(std::move(ps.open));
      ps.open.clear();
      wake = true;
    }
    if (wake) {
      ++seals_;
      l.unlock();
      cv_.notify_one();
    }
  }
  void loop(std::stop_token st) {
    std::vector<std::vector<entry>> request;
    std::unique_lock l(m_);
    constexpr auto none = steady::time_point::max();
    steady::time_point next = none;  // earliest linger deadline seen in the last walk (none: no open batch)
    std::uint64_t seen_seals = 0;
    std::uint64_t opens_at_walk = 0;
    while (!st.stop_requested()) {
      if (exact_) {
        auto woken = [&] { return st.stop_requested() || seals_ != seen_seals; };
        if (next == none && opens_ != opens_at_walk) next = steady::now();  // opened while it delivered
        if (next != none) {
          cv_.wait_until(l, next, woken);
        } else {
          idle_wait_ = true;
          cv_.wait(l, woken);
          idle_wait_ = false;
        }
        seen_seals = seals_;
      } else {
        cv_.wait_for(l, 5ms);  // woken by a seal, or after linger, to look for lingering batches
      }
      // The O(all partitions) walk: seal lingering batches, collect sealed ones per destination,
      // and (exact linger) find the next linger deadline.
      const auto now = steady::now();
      next = none;
      opens_at_walk = opens_;
      bool more = false;
      for (int d = 0; d < destinations; ++d) {
        std::size_t bytes = 0;
        for (std::size_t p = static_cast<std::size_t>(d); p < parts_.size(); p += destinations) {
          auto& ps = parts_[p];
          if (!ps.open.empty()) {
            if (flushing_ || now - ps.opened >= linger) {
              ps.sealed.push_back(std::move(ps.open));
              ps.open.clear();
            } else if (ps.opened + linger < next) {
              next = ps.opened + linger;
            }
          }
          if (ps.sealed.empty()) continue;
          if (bytes + ps.sealed.front().size() * 100 > request_bytes) {
            more = true;  // skipped at the request limit
            continue;
          }
          bytes += ps.sealed.front().size() * 100;
          request.push_back(std::move(ps.sealed.front()));
          ps.sealed.pop_front();
          if (!ps.sealed.empty()) more = true;  // one batch per partition per request
        }
        if (request.empty()) continue;
        batches_ += request.size();
        ++requests_;
        l.unlock();
        std::size_t n = 0;
        for (auto& b : request) {  // the immediate sink: every record delivered
          for (auto& e : b) {
            if (std::exchange(e.done, true)) continue;
            if (e.cb) (*e.cb)(e.record, true); else cb_(e.record, true);
          }
          n += b.size();
        }
        request.clear();
        l.lock();
        buffer_ -= n * 100;
        pending_ -= n;
        space_cv_.notify_all();
        if (pending_ == 0) done_cv_.notify_all();
      }
      // A partition skipped at the request limit (or with a second sealed batch) is sendable now:
      // walk again at once.
      if (more) next = now;
    }
  }
  callback cb_;
  size_function size_of_;
  const bool exact_;
  sluice::detail::lock_table_mutex m_;
  std::condition_variable_any cv_, space_cv_, done_cv_;
  std::vector<partition_state> parts_;
  std::size_t buffer_ = 0;
  std::uint64_t pending_ = 0;
  std::uint64_t batches_ = 0, requests_ = 0, seals_ = 0;  // seals_: also "sender, look again"
  bool flushing_ = false;
  bool idle_wait_ = false;  // exact linger: the sender sleeps with no deadline
  std::uint64_t opens_ = 0;  // batches opened (exact linger: did one open during the walk?)
  std::jthread sender_;
};

void send_scan(benchmark::State& state, bool exact_linger, bool random = false) {
  random_order = random;
  const int threads = static_cast<int>(state.range(0));
  partitions = static_cast<int>(state.range(2));
  std::atomic<std::uint64_t> delivered{0};
  scanning_pipeline pipe(
      [&](const rec&, bool ok) {
        if (ok) delivered.fetch_add(1, std::memory_order_relaxed);  // relaxed: read after flush()
      },
      [](const rec&) { return std::size_t{100}; }, exact_linger);
  const double cpu0 = process_cpu_ns();
  double appender_cpu = 0;
  const auto b0 = pipe.batches();
  const auto r0 = pipe.requests();
  for (auto _ : state) {
    appender_cpu += run_appenders(threads, [&](int p, rec&& r) { pipe.send(p, std::move(r)); });
    pipe.flush();
  }
  const double cpu = process_cpu_ns() - cpu0;
  const auto n = static_cast<double>(state.iterations() * records_per_iteration);
  if (delivered.load() != state.iterations() * records_per_iteration) state.SkipWithError("lost records");
  state.SetItemsProcessed(static_cast<std::int64_t>(n));
  state.counters["cpu_ns_per_record"] = cpu / n;
  state.counters["appender_cpu_ns_per_record"] = appender_cpu / n;
  state.counters["records_per_batch"] = n / static_cast<double>(pipe.batches() - b0);
  state.counters["records_per_request"] = n / static_cast<double>(pipe.requests() - r0);
}

void send_push(benchmark::State& state) { send_push_impl(state, false); }
void send_push_random(benchmark::State& state) { send_push_impl(state, true); }
BENCHMARK(send_push)
    ->Name("send/impl:push")
    ->ArgNames({"appenders", "sink", "partitions"})
    ->Args({1, 0, 1000})
    ->Args({2, 0, 1000})
    ->Args({1, 1, 1000})
    ->Args({2, 1, 1000})
    ->Args({2, 0, 10000})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
// send_random/: the same, each record to a random partition (what keyed records do: the partition
// is a hash of the key), so neither design walks its partitions in memory order.
BENCHMARK(send_push_random)
    ->Name("send_random/impl:push")
    ->ArgNames({"appenders", "sink", "partitions"})
    ->Args({1, 0, 1000})
    ->Args({2, 0, 1000})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
void send_scan_exact(benchmark::State& state) { send_scan(state, true); }
void send_scan_tick(benchmark::State& state) { send_scan(state, false); }
void send_scan_random(benchmark::State& state) { send_scan(state, true, true); }
BENCHMARK(send_scan_exact)
    ->Name("send/impl:scan")
    ->ArgNames({"appenders", "sink", "partitions"})
    ->Args({1, 0, 1000})
    ->Args({2, 0, 1000})
    ->Args({2, 0, 10000})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(send_scan_random)
    ->Name("send_random/impl:scan")
    ->ArgNames({"appenders", "sink", "partitions"})
    ->Args({1, 0, 1000})
    ->Args({2, 0, 1000})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(send_scan_tick)
    ->Name("send/impl:scan_tick")
    ->ArgNames({"appenders", "sink", "partitions"})
    ->Args({1, 0, 1000})
    ->Args({2, 0, 1000})
    ->Args({2, 0, 10000})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

// lowrate/impl:X/partitions:P: one appender sends 20,000 records/s (20 each millisecond, spread
// over all P partitions) for one second, then flushes. Counter process_cpu_ms_per_s: what the
// producer costs at a low rate over many partitions (librdkafka#2270: CPU grew with the partition
// count). Only the exact-linger scan is shown: the tick variant trades linger for fewer walks.
template <class Send, class Flush>
double run_paced(Send&& send, Flush&& flush) {
  const double c0 = process_cpu_ns();
  auto next = std::chrono::steady_clock::now();
  int p = 0;
  for (int ms = 0; ms < 1000; ++ms) {
    for (int k = 0; k < 20; ++k) {
      send(p, rec{});
      p = (p + 7919) % partitions;  // 7919 is prime: every partition in turn
    }
    next += 1ms;
    std::this_thread::sleep_until(next);
  }
  flush();
  return (process_cpu_ns() - c0) / 1e6;
}

void lowrate_push(benchmark::State& state) {
  partitions = static_cast<int>(state.range(0));
  pipe_t pipe(
      {}, [](int p) { return std::optional<int>(p % destinations); },
      [](pipe_t::request&& r) { r.complete(sluice::send_result::ok); }, [](const rec&) { return std::size_t{100}; },
      [](const rec&, const sluice::delivery_report&) {});
  double cpu_ms = 0;
  for (auto _ : state) {
    cpu_ms = run_paced([&](int p, rec&& r) {
      if (pipe.send(p, std::move(r)) != pipe_t::send_status::ok) std::abort();
    }, [&] { pipe.flush(); });
  }
  state.counters["process_cpu_ms_per_s"] = cpu_ms;
}
void lowrate_scan(benchmark::State& state) {
  partitions = static_cast<int>(state.range(0));
  scanning_pipeline pipe([](const rec&, bool) {}, [](const rec&) { return std::size_t{100}; }, true);
  double cpu_ms = 0;
  for (auto _ : state) {
    cpu_ms = run_paced([&](int p, rec&& r) { pipe.send(p, std::move(r)); }, [&] { pipe.flush(); });
  }
  state.counters["process_cpu_ms_per_s"] = cpu_ms;
}
BENCHMARK(lowrate_push)->Name("lowrate/impl:push")->ArgName("partitions")->Arg(1000)->Arg(10000)->Arg(100000)
    ->Iterations(1)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(lowrate_scan)->Name("lowrate/impl:scan")->ArgName("partitions")->Arg(1000)->Arg(10000)->Arg(100000)
    ->Iterations(1)->UseRealTime()->Unit(benchmark::kMillisecond);

void idle(benchmark::State& state) {
  double cpu_ms = 0;
  for (auto _ : state) {
    pipe_t pipe(
        {}, [](int p) { return std::optional<int>(p % destinations); },
        [](pipe_t::request&& r) { r.complete(sluice::send_result::ok); }, [](const rec&) { return std::size_t{100}; });
    std::this_thread::sleep_for(50ms);  // let the sender park
    const double c0 = process_cpu_ns();
    std::this_thread::sleep_for(1s);
    cpu_ms = (process_cpu_ns() - c0) / 1e6;
  }
  state.counters["process_cpu_ms_per_s"] = cpu_ms;
}
BENCHMARK(idle)->Iterations(1)->UseRealTime()->Unit(benchmark::kMillisecond);

}  // namespace
