// Benchmarks for sluice::requeue_queue against two honest baselines, all behind one std::mutex:
//   impl:multimap  std::multimap<time_point, {key, item}> + std::unordered_map<key, iterator>
//   impl:pq_lazy   std::priority_queue with lazy deletion (stale heap records skipped on pop,
//                  heap rebuilt when stale records outnumber live ones) + unordered_map<key, state>
//
// Steady-state operations at N pending (N = 1k, 100k, 1M), each iteration one operation pair:
//   start_stop        schedule a fresh key at a random deadline, then cancel that same key (the
//                     pattern of Go's timer start/stop benchmarks)
//   schedule_cancel   schedule a fresh key at a random deadline, cancel a *random other* pending
//                     key (worst case: at 1M both touch cold memory; >= 3 dependent DRAM misses)
//   reschedule        move a random pending key to a new random deadline (replace)
//   pop_schedule      pop the earliest (due) entry, schedule a fresh key at a random deadline
// Deadlines are random points in the past hour, so every entry is due and pop never waits; the
// structures are built once per (impl, N) and reused by the three operations (each keeps N fixed).
// Counter bytes_per_entry: sluice's array capacity / N; baselines' bytes requested from the
// allocator / N (both exclude malloc's own overhead).
//
// lateness/pending:100000/producers:2: steady clock; 100k far-future entries stay pending while
// two producers reschedule them and add "probe" entries due within 0-2 ms at a throttled rate
// (~18k probes/s, ~160k reschedules/s in all); the benchmark thread pops probes with a blocking
// pop and records pop time - deadline. Counters: lateness_p50_us, lateness_p99_us.
#include <sluice/requeue_queue.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <queue>
#include <random>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

namespace {

using clk = std::chrono::steady_clock;
using time_point = clk::time_point;
using key_t = std::uint64_t;
using item_t = std::uint64_t;

// ---- allocation-counting allocator for the baselines' bytes per entry ----------------------
inline std::atomic<std::int64_t> g_bytes{0};
template <class T>
struct counting_allocator {
  using value_type = T;
  counting_allocator() = default;
  template <class U>
  counting_allocator(const counting_allocator<U>&) noexcept {}
  T* allocate(std::size_t n) {
    g_bytes.fetch_add(static_cast<std::int64_t>(n * sizeof(T)), std::memory_order_relaxed);
    return std::allocator<T>().allocate(n);
  }
  void deallocate(T* p, std::size_t n) noexcept {
    g_bytes.fetch_sub(static_cast<std::int64_t>(n * sizeof(T)), std::memory_order_relaxed);
    std::allocator<T>().deallocate(p, n);
  }
  template <class U>
  bool operator==(const counting_allocator<U>&) const noexcept { return true; }
};

// ---- the three implementations behind one interface -----------------------------------------
struct sluice_impl {
  sluice::requeue_queue<key_t, item_t> q;
  void schedule(key_t k, time_point d) { (void)q.schedule_at(k, item_t{k}, d, sluice::schedule_policy::replace); }
  bool cancel(key_t k) { return q.cancel(k); }
  std::optional<key_t> try_pop() {
    auto e = q.try_pop();
    if (!e) return std::nullopt;
    return e->key;
  }
  std::size_t bytes() const { return q.memory_bytes(); }
};

struct multimap_impl {
  struct value {
    key_t key;
    item_t item;
  };
  using mm = std::multimap<time_point, value, std::less<>, counting_allocator<std::pair<const time_point, value>>>;
  std::mutex m;
  mm timers;
  std::unordered_map<key_t, mm::iterator, std::hash<key_t>, std::equal_to<>,
                     counting_allocator<std::pair<const key_t, mm::iterator>>>
      index;
  void schedule(key_t k, time_point d) {  // replace policy
    std::lock_guard lock(m);
    auto [it, inserted] = index.try_emplace(k);
    if (!inserted) timers.erase(it->second);
    it->second = timers.emplace(d, value{k, item_t{k}});
  }
  bool cancel(key_t k) {
    std::lock_guard lock(m);
    auto it = index.find(k);
    if (it == index.end()) return false;
    timers.erase(it->second);
    index.erase(it);
    return true;
  }
  std::optional<key_t> try_pop() {
    std::lock_guard lock(m);
    if (timers.empty() || timers.begin()->first > clk::now()) return std::nullopt;
    auto node = timers.extract(timers.begin());
    index.erase(node.mapped().key);
    return node.mapped().key;
  }
  std::size_t bytes() const { return static_cast<std::size_t>(g_bytes.load()); }
};

struct pq_lazy_impl {
  struct record {
    time_point deadline;
    key_t key;
    std::uint64_t version;
    bool operator>(const record& o) const noexcept { return deadline > o.deadline; }
  };
  struct state {
    std::uint64_t version;
    item_t item;
  };
  std::mutex m;
  std::priority_queue<record, std::vector<record, counting_allocator<record>>, std::greater<>> heap;
  std::unordered_map<key_t, state, std::hash<key_t>, std::equal_to<>, counting_allocator<std::pair<const key_t, state>>> live;
  std::uint64_t next_version = 0;
  void schedule(key_t k, time_point d) {
    std::lock_guard lock(m);
    const auto v = ++next_version;
    live[k] = state{v, item_t{k}};
    heap.push(record{d, k, v});
    maybe_rebuild();
  }
  bool cancel(key_t k) {
    std::lock_guard lock(m);
    const bool erased = live.erase(k) != 0;
    maybe_rebuild();
    return erased;
  }
  std::optional<key_t> try_pop() {
    std::lock_guard lock(m);
    const auto now = clk::now();
    while (!heap.empty()) {
      const record top = heap.top();
      auto it = live.find(top.key);
      if (it == live.end() || it->second.version != top.version) {
        heap.pop();  // stale
        continue;
      }
      if (top.deadline > now) return std::nullopt;
      heap.pop();
      live.erase(it);
      return top.key;
    }
    return std::nullopt;
  }
  void maybe_rebuild() {
    if (heap.size() <= 2 * live.size() + 64) return;
    std::vector<record, counting_allocator<record>> keep;
    keep.reserve(live.size());
    while (!heap.empty()) {  // O(n log n), amortised over the >= n stale records that caused it
      const record r = heap.top();
      heap.pop();
      auto it = live.find(r.key);
      if (it != live.end() && it->second.version == r.version) keep.push_back(r);
    }
    heap = decltype(heap)(std::greater<>{}, std::move(keep));
  }
  std::size_t bytes() const { return static_cast<std::size_t>(g_bytes.load()); }
};

// ---- steady-state harness -------------------------------------------------------------------
constexpr unsigned index_bits = 20;  // key = generation << 20 | slot; N <= 2^20
constexpr key_t slot_mask = (key_t{1} << index_bits) - 1;

struct random_table {
  std::vector<std::uint64_t> values;
  random_table() : values(1 << 16) {
    std::mt19937_64 rng(42);
    for (auto& v : values) v = rng();
  }
  std::uint64_t operator()(std::size_t i) const noexcept { return values[i & (values.size() - 1)]; }
};
const random_table& randoms() {
  static const random_table t;
  return t;
}

template <class Impl>
struct fixture {
  std::unique_ptr<Impl> impl;
  std::vector<key_t> keys;  // the pending keys, by slot
  time_point base;
  std::size_t counter = 0;
  std::size_t bytes_per_entry = 0;

  explicit fixture(std::size_t n) : keys(n), base(clk::now()) {
    g_bytes = 0;
    impl = std::make_unique<Impl>();
    for (std::size_t j = 0; j < n; ++j) {
      keys[j] = j;
      impl->schedule(keys[j], deadline(counter++));
    }
    bytes_per_entry = impl->bytes() / n;
  }
  time_point deadline(std::size_t i) const noexcept {
    return base - std::chrono::microseconds(randoms()(i * 7 + 3) % 3'600'000'000ull);  // due: past hour
  }
  std::size_t pick(std::size_t i) const noexcept { return randoms()(i) % keys.size(); }
  static key_t next_generation(key_t k) noexcept { return (((k >> index_bits) + 1) << index_bits) | (k & slot_mask); }
};

// One cached fixture in the whole process: the three operations at one (impl, N) share it, and
// building the next one first frees the previous (1M entries of three structures at once would
// crowd a small VM and skew the allocation counter).
inline void (*g_release_current)() = nullptr;

template <class Impl>
std::unique_ptr<fixture<Impl>>& slot() {
  static std::unique_ptr<fixture<Impl>> f;
  return f;
}

template <class Impl>
fixture<Impl>& cached(std::size_t n) {
  auto& f = slot<Impl>();
  if (!f || f->keys.size() != n) {
    if (g_release_current != nullptr) g_release_current();
    g_release_current = [] { slot<Impl>().reset(); };
    f = std::make_unique<fixture<Impl>>(n);
  }
  return *f;
}

template <class Impl>
void bm_schedule_cancel(benchmark::State& state, std::size_t n) {
  auto& f = cached<Impl>(n);
  for (auto _ : state) {
    const std::size_t j = f.pick(f.counter);
    const key_t old = f.keys[j];
    const key_t fresh = fixture<Impl>::next_generation(old);
    f.impl->schedule(fresh, f.deadline(f.counter++));
    benchmark::DoNotOptimize(f.impl->cancel(old));
    f.keys[j] = fresh;
  }
  state.SetItemsProcessed(state.iterations());
  state.counters["bytes_per_entry"] = static_cast<double>(f.bytes_per_entry);
}

// Go's timer start/stop: schedule a fresh key, then cancel that same key, with N others pending.
template <class Impl>
void bm_start_stop(benchmark::State& state, std::size_t n) {
  auto& f = cached<Impl>(n);
  key_t fresh = key_t{1} << 62;  // outside the fixture's key space
  for (auto _ : state) {
    f.impl->schedule(fresh, f.deadline(f.counter++));
    benchmark::DoNotOptimize(f.impl->cancel(fresh));
    ++fresh;
  }
  state.SetItemsProcessed(state.iterations());
}

template <class Impl>
void bm_reschedule(benchmark::State& state, std::size_t n) {
  auto& f = cached<Impl>(n);
  for (auto _ : state) {
    const std::size_t j = f.pick(f.counter);
    f.impl->schedule(f.keys[j], f.deadline(f.counter++));
  }
  state.SetItemsProcessed(state.iterations());
}

template <class Impl>
void bm_pop_schedule(benchmark::State& state, std::size_t n) {
  auto& f = cached<Impl>(n);
  for (auto _ : state) {
    const auto k = f.impl->try_pop();
    if (!k) {
      state.SkipWithError("nothing due");
      break;
    }
    const key_t fresh = fixture<Impl>::next_generation(*k);
    f.impl->schedule(fresh, f.deadline(f.counter++));
    f.keys[*k & slot_mask] = fresh;
  }
  state.SetItemsProcessed(state.iterations());
}

// ---- lateness under load (steady clock, real waiting) ----------------------------------------
struct multimap_blocking {
  // A competent mutex + condition_variable timer queue: notify only when the new entry is the
  // new earliest; the consumer waits until the earliest deadline.
  std::mutex m;
  std::condition_variable cv;
  std::multimap<time_point, key_t> timers;
  std::unordered_map<key_t, std::multimap<time_point, key_t>::iterator> index;
  bool schedule(key_t k, time_point d) {
    bool earliest;
    {
      std::lock_guard lock(m);
      auto [it, inserted] = index.try_emplace(k);
      if (!inserted) timers.erase(it->second);
      it->second = timers.emplace(d, k);
      earliest = it->second == timers.begin();
    }
    if (earliest) cv.notify_one();
    return true;
  }
  std::optional<std::pair<key_t, time_point>> pop() {
    std::unique_lock lock(m);
    for (;;) {
      if (!timers.empty()) {
        const auto d = timers.begin()->first;
        if (d <= clk::now()) {
          const key_t k = timers.begin()->second;
          index.erase(k);
          timers.erase(timers.begin());
          return std::pair{k, d};
        }
        cv.wait_until(lock, d);
      } else {
        cv.wait(lock);
      }
    }
  }
};

struct sluice_blocking {
  sluice::requeue_queue<key_t, item_t> q;
  bool schedule(key_t k, time_point d) {
    return q.schedule_at(k, item_t{k}, d, sluice::schedule_policy::replace) != sluice::schedule_status::closed;
  }
  std::optional<std::pair<key_t, time_point>> pop() {
    auto e = q.pop();
    if (!e) return std::nullopt;
    return std::pair{e->key, e->deadline};
  }
};

template <class Impl>
void bm_lateness(benchmark::State& state) {
  constexpr key_t far_keys = 100'000;
  auto impl = std::make_unique<Impl>();
  std::mt19937_64 rng(7);
  const auto start = clk::now();
  for (key_t k = 0; k < far_keys; ++k) {
    impl->schedule(k, start + std::chrono::seconds(60) + std::chrono::milliseconds(rng() % 60'000));
  }
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> probe_id{1ull << 40};
  std::vector<std::jthread> producers;
  for (int p = 0; p < 2; ++p) {
    producers.emplace_back([&, p] {
      std::mt19937_64 prng(100 + static_cast<std::uint64_t>(p));
      while (!stop.load(std::memory_order_relaxed)) {
        for (int i = 0; i < 100; ++i) {
          const auto now = clk::now();
          if (i % 10 == 0) {
            impl->schedule(probe_id.fetch_add(1, std::memory_order_relaxed),
                           now + std::chrono::microseconds(prng() % 2000));
          } else {
            impl->schedule(prng() % far_keys, now + std::chrono::seconds(60) + std::chrono::milliseconds(prng() % 60'000));
          }
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    });
  }
  std::vector<double> lateness_us;
  lateness_us.reserve(static_cast<std::size_t>(state.max_iterations));
  for (auto _ : state) {
    auto e = impl->pop();
    const auto now = clk::now();
    if (!e) break;
    lateness_us.push_back(std::chrono::duration<double, std::micro>(now - e->second).count());
  }
  stop = true;
  producers.clear();
  std::sort(lateness_us.begin(), lateness_us.end());
  auto pct = [&](double p) {
    if (lateness_us.empty()) return 0.0;
    return lateness_us[std::min(lateness_us.size() - 1, static_cast<std::size_t>(p * static_cast<double>(lateness_us.size())))];
  };
  state.counters["lateness_p50_us"] = pct(0.50);
  state.counters["lateness_p99_us"] = pct(0.99);
  state.counters["lateness_max_us"] = lateness_us.empty() ? 0.0 : lateness_us.back();
  state.SetItemsProcessed(state.iterations());
}

template <class Impl>
void register_ops(const std::string& impl_name, std::size_t n) {
  const std::string suffix = "/pending:" + std::to_string(n) + "/impl:" + impl_name;
  benchmark::RegisterBenchmark(("requeue/start_stop" + suffix).c_str(), bm_start_stop<Impl>, n);
  benchmark::RegisterBenchmark(("requeue/schedule_cancel" + suffix).c_str(), bm_schedule_cancel<Impl>, n);
  benchmark::RegisterBenchmark(("requeue/reschedule" + suffix).c_str(), bm_reschedule<Impl>, n);
  benchmark::RegisterBenchmark(("requeue/pop_schedule" + suffix).c_str(), bm_pop_schedule<Impl>, n);
}

const bool registered = [] {
  for (std::size_t n : {1'000u, 100'000u, 1'000'000u}) {
    register_ops<sluice_impl>("sluice", n);
    register_ops<multimap_impl>("multimap", n);
    register_ops<pq_lazy_impl>("pq_lazy", n);
  }
  benchmark::RegisterBenchmark("requeue/lateness/pending:100000/producers:2/impl:sluice", bm_lateness<sluice_blocking>)
      ->Iterations(20'000)
      ->UseRealTime()
      ->MeasureProcessCPUTime();
  benchmark::RegisterBenchmark("requeue/lateness/pending:100000/producers:2/impl:multimap_cv", bm_lateness<multimap_blocking>)
      ->Iterations(20'000)
      ->UseRealTime()
      ->MeasureProcessCPUTime();
  return true;
}();

}  // namespace
