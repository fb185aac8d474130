// key_lock_table vs the seed's design (one global mutex over an unordered_map of refcounted
// per-key mutexes) and vs a fixed array of striped mutexes (no entries at all, but keys that share
// a stripe block each other and waiters are not FIFO).
//
//  klt_distinct/workers:N      lock/unlock of keys never used before (every op creates and
//                              removes an entry), 1 and 2 threads. Keys spread over the shards by
//                              hash, so each op writes a shard line the other thread last wrote
//                              half of the time: striped_mutex (one line per op, nothing else)
//                              shows what that costs any shared lock table
//  klt_distinct_private/workers:N  the control: the same work, each thread on a table of its own
//                              (nothing shared at all): the scaling this machine gives for it
//  klt_same_key/workers:2      two threads locking one key: every unlock may have a waiter. sluice
//                              lets a running thread re-take the key (bounded: a waiter is
//                              overtaken at most max_bypasses times, then served FIFO); std::mutex
//                              lets the unlocker re-take it without a bound
//  klt_resident/keys:1M        1M distinct keys locked and unlocked, then counters:
//                              resident_entries (entries left) and spare_nodes (pooled)
//
// Time is wall-clock per operation (all runs); CPU is the threads' CPU time per op.
// Run: bench/key_lock_table_bench --benchmark_repetitions=3 --benchmark_out=klt.json
#include <sluice/key_lock_table.hpp>

#include <benchmark/benchmark.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

namespace {

using key_t = std::uint64_t;

// The seed's design, written competently: a global mutex guards the map and the refcounts; the
// per-key mutex is taken outside the global mutex; the last user erases the entry.
class global_map_locks {
  struct entry {
    std::mutex m;
    std::size_t refs = 0;
  };

 public:
  struct handle {
    global_map_locks* owner;
    key_t key;
    entry* e;
    ~handle() {
      e->m.unlock();
      std::lock_guard lock(owner->global_);
      if (--e->refs == 0) owner->map_.erase(key);
    }
  };
  handle lock(key_t key) {
    entry* e = nullptr;
    {
      std::lock_guard lock(global_);
      e = &map_[key];  // node-based: the address is stable until erased
      ++e->refs;
    }
    e->m.lock();
    return handle{this, key, e};
  }
  std::size_t resident() {
    std::lock_guard lock(global_);
    return map_.size();
  }

 private:
  std::mutex global_;
  std::unordered_map<key_t, entry> map_;
};

// A fixed array of mutexes; a key locks the stripe its hash selects.
class striped_locks {
  struct alignas(64) stripe {
    std::mutex m;
  };

 public:
  struct handle {
    std::mutex* m;
    ~handle() { m->unlock(); }
  };
  handle lock(key_t key) {
    std::mutex& m = stripes_[sluice::detail::lock_table_mix(key) % stripes_.size()].m;
    m.lock();
    return handle{&m};
  }
  std::size_t resident() { return stripes_.size(); }

 private:
  std::array<stripe, 64> stripes_;
};

struct sluice_locks {
  sluice::key_lock_table<key_t> table;
  auto lock(key_t key) { return table.lock(key); }
  std::size_t resident() { return table.size(); }
};

template <class Impl>
Impl& shared_instance() {
  static Impl impl;
  return impl;
}

template <class Impl>
void bm_distinct(benchmark::State& state) {
  Impl& impl = shared_instance<Impl>();
  // Every thread walks its own key range: no key is ever used twice.
  static std::atomic<key_t> next_range{0};
  key_t key = next_range.fetch_add(1) << 40;
  for (auto _ : state) {
    auto h = impl.lock(key++);
    benchmark::DoNotOptimize(h);
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()));
}

// Control for klt_distinct: the same work, but each thread has a table of its own, so the two
// threads share no line at all. Its 2-thread/1-thread ratio is what this machine gives when nothing
// is shared; klt_distinct's ratio below it is the cost of the lines the threads do share.
template <class Impl>
void bm_distinct_private(benchmark::State& state) {
  auto impl = std::make_unique<Impl>();  // one per thread
  key_t key = 0;
  for (auto _ : state) {
    auto h = impl->lock(key++);
    benchmark::DoNotOptimize(h);
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()));
}

template <class Impl>
void bm_same_key(benchmark::State& state) {
  Impl& impl = shared_instance<Impl>();
  for (auto _ : state) {
    auto h = impl.lock(42);
    benchmark::DoNotOptimize(h);
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()));
}

template <class Impl>
void bm_resident(benchmark::State& state) {
  constexpr key_t keys = 1'000'000;
  std::size_t resident = 0;
  for (auto _ : state) {
    Impl impl;
    for (key_t k = 0; k < keys; ++k) {
      auto h = impl.lock(k * 0x9E3779B97F4A7C15ULL);
      benchmark::DoNotOptimize(h);
    }
    resident = impl.resident();
  }
  state.counters["resident_entries"] = static_cast<double>(resident);
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * keys));
}

template <class Impl>
void add_all(const char* impl) {
  // Wall time for 1 and 2 threads alike, so that the two rates compare like with like (CPU time for
  // one thread and wall time for two would flatter the single thread whenever the machine is busy).
  for (int workers : {1, 2}) {
    const std::string name = std::string("klt_distinct/workers:") + std::to_string(workers) + "/impl:" + impl;
    benchmark::RegisterBenchmark(name.c_str(), bm_distinct<Impl>)->Threads(workers)->UseRealTime();
    const std::string priv =
        std::string("klt_distinct_private/workers:") + std::to_string(workers) + "/impl:" + impl;
    benchmark::RegisterBenchmark(priv.c_str(), bm_distinct_private<Impl>)->Threads(workers)->UseRealTime();
  }
  benchmark::RegisterBenchmark((std::string("klt_same_key/workers:2/impl:") + impl).c_str(), bm_same_key<Impl>)
      ->Threads(2)
      ->UseRealTime();
  benchmark::RegisterBenchmark((std::string("klt_resident/keys:1M/impl:") + impl).c_str(), bm_resident<Impl>)
      ->Unit(benchmark::kMillisecond)
      ->Iterations(3);
}

const bool registered = [] {
  add_all<sluice_locks>("sluice");
  add_all<global_map_locks>("global_map");
  add_all<striped_locks>("striped_mutex");
  return true;
}();

}  // namespace
