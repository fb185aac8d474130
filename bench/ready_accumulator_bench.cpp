// Benchmarks for sluice::ready_accumulator against the pre-push design, in the same binary:
//   impl:push  sluice::ready_accumulator (notification queue, per-destination ready lists)
//   impl:scan  scanning baseline: the same per-partition batches behind one mutex, but ready()
//              walks every partition (muted? in backoff? sealed batch?) and drain(node) walks
//              that node's partitions — Apache Kafka's RecordAccumulator.ready()/drain() shape.
//
// cycle/P/muted: P partitions (100 .. 100k) over 5 destinations, of which 10 get a sealed batch per
//   cycle (one 100-byte record that fills a 100-byte batch); one iteration = those 10 appends +
//   ready() + drain() of every reported destination + complete() of every batch. muted:1 adds 10%
//   of the partitions holding a sealed batch while muted (half) or in a 1-hour retry backoff (half).
// append/threads:T/sender_thread:S: T threads append 100-byte records (a 100-byte payload)
//   round-robin over 1,000 partitions (Kafka's defaults: 16 KiB batches, 32 MiB buffer). S=0: each
//   appender drains (ready + drain + complete) every 16,384 appends itself, so the number is the
//   accumulator's own cost per record; S=1: a separate sender thread parks in wait_ready() and
//   drains, contending for the lock and the two cores. items/s counts appended records per second
//   of wall-clock time; records_per_appender_cpu_s per second of each appender's own CPU time
//   (times the thread count), which a loaded shared machine does not distort.
// idle_sender: CPU time of a thread parked in wait_ready_for(1 s) on an idle accumulator.
#include <sluice/ready_accumulator.hpp>

#include <benchmark/benchmark.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>
#include <vector>

#include <sys/resource.h>

namespace {

using namespace std::chrono_literals;
constexpr int destinations = 5;
constexpr int ready_per_cycle = 10;

struct payload {
  std::array<char, 100> bytes{};
};

sluice::ready_accumulator_options cycle_options() {
  sluice::ready_accumulator_options o;
  o.batch_bytes = 100;
  o.linger = 1h;  // only size seals in the cycle benchmark
  o.buffer_bytes = std::size_t{1} << 30;
  return o;
}

// ---- scanning baseline ------------------------------------------------------------------------
class scanning_accumulator {
 public:
  struct batch {
    int partition;
    std::vector<std::uint64_t> records;
    std::size_t bytes = 0;
  };
  explicit scanning_accumulator(int partitions, std::size_t batch_bytes)
      : parts_(static_cast<std::size_t>(partitions)), batch_bytes_(batch_bytes) {
    for (int p = 0; p < partitions; ++p) parts_[static_cast<std::size_t>(p)].dest = p % destinations;
  }
  void append(int p, std::uint64_t rec, std::size_t bytes) {
    std::lock_guard l(m_);
    auto& ps = parts_[static_cast<std::size_t>(p)];
    if (!ps.open) ps.open = std::make_unique<batch>(batch{p, {}, 0});
    ps.open->records.push_back(rec);
    ps.open->bytes += bytes;
    if (ps.open->bytes >= batch_bytes_) ps.sealed.push_back(std::move(ps.open));
  }
  void set_muted(int p, bool m) {
    std::lock_guard l(m_);
    parts_[static_cast<std::size_t>(p)].muted = m;
  }
  void set_backoff(int p, std::chrono::steady_clock::time_point until) {
    std::lock_guard l(m_);
    parts_[static_cast<std::size_t>(p)].retry_at = until;
  }
  // Walks every partition: the O(all partitions) cycle the push design removes.
  std::array<bool, destinations> ready() {
    std::array<bool, destinations> out{};
    std::lock_guard l(m_);
    const auto now = std::chrono::steady_clock::now();
    for (const auto& ps : parts_) {
      if (ps.sealed.empty() || ps.muted || ps.retry_at > now) continue;
      out[static_cast<std::size_t>(ps.dest)] = true;
    }
    return out;
  }
  void drain(int dest, std::size_t max_bytes, std::vector<std::unique_ptr<batch>>& out) {
    std::lock_guard l(m_);
    const auto now = std::chrono::steady_clock::now();
    std::size_t total = 0;
    const std::size_t n = parts_.size();
    for (std::size_t k = 0; k < n; ++k) {
      auto& ps = parts_[(drain_index_ + k) % n];
      if (ps.dest != dest || ps.sealed.empty() || ps.muted || ps.retry_at > now) continue;
      if (!out.empty() && total + ps.sealed.front()->bytes > max_bytes) break;
      total += ps.sealed.front()->bytes;
      out.push_back(std::move(ps.sealed.front()));
      ps.sealed.pop_front();
    }
    drain_index_ = (drain_index_ + 1) % n;
  }

 private:
  struct partition_state {
    int dest = 0;
    bool muted = false;
    std::chrono::steady_clock::time_point retry_at{};
    std::unique_ptr<batch> open;
    std::deque<std::unique_ptr<batch>> sealed;
  };
  std::mutex m_;
  std::vector<partition_state> parts_;
  std::size_t batch_bytes_;
  std::size_t drain_index_ = 0;
};

std::int64_t thread_cpu_us() {
  rusage u{};
  getrusage(RUSAGE_THREAD, &u);
  return static_cast<std::int64_t>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) * 1'000'000 + u.ru_utime.tv_usec +
         u.ru_stime.tv_usec;
}

std::vector<int> ready_partitions(int partitions) {
  std::vector<int> v;
  for (int i = 0; i < ready_per_cycle; ++i) v.push_back(i * (partitions / ready_per_cycle));
  return v;
}

void cycle_push(benchmark::State& state) {
  const int partitions = static_cast<int>(state.range(0));
  const bool muted = state.range(1) != 0;
  using acc_t = sluice::ready_accumulator<int, std::uint64_t, int>;
  acc_t acc(cycle_options(), [](int p) { return std::optional<int>(p % destinations); });
  for (int p = 0; p < partitions; ++p) (void)acc.mute(p);  // every partition exists
  std::vector<acc_t::mute_token> tokens;
  std::vector<acc_t::batch_handle> out;
  if (muted) {
    for (int p = 1; p < partitions; p += 10) {
      (void)acc.append(p, 1, 100);  // sealed
      if ((p / 10) % 2 == 0) {
        tokens.push_back(acc.mute(p));
      }
    }
    for (int d : acc.ready().destinations) acc.drain(d, std::size_t{1} << 40, out);
    for (auto& b : out) {
      if (acc.mutes(b.partition()) == 0) acc.reenqueue(std::move(b), 1h); else acc.complete(std::move(b));
    }
    out.clear();  // muted partitions keep their sealed batch; the others sit in a 1-hour backoff
  }
  const auto hot = ready_partitions(partitions);
  typename acc_t::ready_result r;
  std::uint64_t n = 0;
  for (auto _ : state) {
    for (int p : hot) (void)acc.append(p, n++, 100);
    acc.ready(r);
    for (int d : r.destinations) acc.drain(d, 1 << 20, out);
    for (auto& b : out) acc.complete(std::move(b));
    out.clear();
  }
  if (!acc.audit().clean()) state.SkipWithError("audit not clean");
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()));
}

void cycle_scan(benchmark::State& state) {
  const int partitions = static_cast<int>(state.range(0));
  const bool muted = state.range(1) != 0;
  scanning_accumulator acc(partitions, 100);
  if (muted) {
    for (int p = 1; p < partitions; p += 10) {
      acc.append(p, 1, 100);
      if ((p / 10) % 2 == 0) acc.set_muted(p, true); else acc.set_backoff(p, std::chrono::steady_clock::now() + 1h);
    }
  }
  const auto hot = ready_partitions(partitions);
  std::vector<std::unique_ptr<scanning_accumulator::batch>> out;
  std::uint64_t n = 0;
  for (auto _ : state) {
    for (int p : hot) acc.append(p, n++, 100);
    const auto r = acc.ready();
    for (int d = 0; d < destinations; ++d) {
      if (r[static_cast<std::size_t>(d)]) acc.drain(d, 1 << 20, out);
    }
    out.clear();
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()));
}

void cycle_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"partitions", "muted"});
  for (int muted : {0, 1}) {
    for (int p : {100, 1000, 10000, 100000}) b->Args({p, muted});
  }
}

BENCHMARK(cycle_push)->Name("cycle/impl:push")->Apply(cycle_args);
BENCHMARK(cycle_scan)->Name("cycle/impl:scan")->Apply(cycle_args);

// ---- append throughput --------------------------------------------------------------------------
template <class Acc>
void drain_all(Acc& acc, typename Acc::ready_result& r, std::vector<typename Acc::batch_handle>& out) {
  acc.ready(r);
  for (int d : r.destinations) {
    while (acc.drain(d, 1 << 20, out) > 0) {
      for (auto& b : out) acc.complete(std::move(b));
      out.clear();
    }
  }
}

void append_throughput(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  const bool sender_thread = state.range(1) != 0;
  constexpr int partitions = 1000;
  constexpr std::size_t per_iteration = 400'000;
  using acc_t = sluice::ready_accumulator<int, payload, int>;
  sluice::ready_accumulator_options o;  // Kafka defaults: 16 KiB batches, 32 MiB buffer, linger 5 ms
  acc_t acc(o, [](int p) { return std::optional<int>(p % destinations); });
  std::jthread sender;
  if (sender_thread) {
    sender = std::jthread([&](std::stop_token stop) {
      std::vector<acc_t::batch_handle> out;
      typename acc_t::ready_result r;
      while (acc.wait_ready(stop) == sluice::ready_status::ready) drain_all(acc, r, out);
    });
  }
  std::atomic<std::int64_t> appender_cpu_us{0};
  for (auto _ : state) {
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t) {
      ts.emplace_back([&, t] {
        const auto cpu0 = thread_cpu_us();
        std::vector<acc_t::batch_handle> out;
        typename acc_t::ready_result r;
        int p = t * 7;
        const std::size_t mine = per_iteration / static_cast<std::size_t>(threads);
        const payload proto{};  // copied per record (value-initialising each one costs a `rep stos`)
        for (std::size_t i = 1; i <= mine; ++i) {
          if (acc.append(p, payload(proto), 100) != sluice::append_status::ok) std::abort();
          if (++p == partitions) p = 0;
          if (!sender_thread && i % 16384 == 0) drain_all(acc, r, out);  // the appender is its own sender
        }
        appender_cpu_us.fetch_add(thread_cpu_us() - cpu0);
      });
    }
    for (auto& t : ts) t.join();
  }
  if (sender_thread) sender.request_stop();
  const auto records = static_cast<double>(state.iterations() * per_iteration);
  state.SetItemsProcessed(static_cast<std::int64_t>(records));
  // Records per second of appender CPU time: what one appending thread sustains when it has a
  // core to itself (wall-clock items/s also counts time the shared machine gave to others).
  state.counters["records_per_appender_cpu_s"] =
      records / (static_cast<double>(appender_cpu_us.load()) / 1e6) * threads;
}
BENCHMARK(append_throughput)
    ->Name("append")
    ->ArgNames({"threads", "sender_thread"})
    ->Args({1, 0})
    ->Args({2, 0})
    ->Args({1, 1})
    ->Args({2, 1})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

// ---- idle sender -----------------------------------------------------------------------------
void idle_sender(benchmark::State& state) {
  sluice::ready_accumulator<int, int, int> acc({}, [](int) { return std::optional<int>(0); });
  double cpu_ms = 0;
  for (auto _ : state) {
    std::thread t([&] {
      rusage before{}, after{};
      getrusage(RUSAGE_THREAD, &before);
      if (acc.wait_ready_for(1s) != sluice::ready_status::timeout) std::abort();
      getrusage(RUSAGE_THREAD, &after);
      auto us = [](const rusage& u) {
        return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) * 1e6 +
               static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec);
      };
      cpu_ms = (us(after) - us(before)) / 1000.0;
    });
    t.join();
  }
  state.counters["sender_cpu_ms_per_s"] = cpu_ms;
}
BENCHMARK(idle_sender)->Iterations(1)->UseRealTime()->Unit(benchmark::kMillisecond);

}  // namespace
