// Direct tests of key_lock_table's internals (issue 12 point 12): detail::lock_table_shard (the
// per-shard chained map of live entries with its bounded node pool, growing and shrinking bucket
// array, strong exception guarantee on insert) against a reference model, and
// detail::lock_table_mutex (mutual exclusion, the parked path through event_count).
#include <sluice/detail/lock_table_mutex.hpp>
#include <sluice/detail/lock_table_shard.hpp>

#include "test_support.hpp"

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using sluice::detail::lock_table_mix;
using sluice::detail::lock_table_mutex;
using sluice::detail::lock_table_shard;

namespace {
struct eq {
  template <class A, class B>
  bool operator()(const A& a, const B& b) const {
    return a == b;
  }
};

// A key whose copy throws on demand (counted down), to check insert's strong guarantee.
struct fragile {
  static inline int copies_until_throw = -1;
  int v = 0;
  explicit fragile(int x) : v(x) {}
  fragile(const fragile& o) : v(o.v) {
    if (copies_until_throw > 0 && --copies_until_throw == 0) throw std::runtime_error("copy failed");
  }
  fragile& operator=(const fragile&) = default;
  bool operator==(const fragile& o) const { return v == o.v; }
};
}  // namespace

TEST_CASE("lock_table_shard: insert, find, erase; counts and a fresh entry's state") {
  lock_table_shard<std::string> s;
  s.set_pool_limit(4);
  std::lock_guard lock(s.mutex);
  CHECK(s.live() == 0);
  const auto h = lock_table_mix(std::hash<std::string>{}("alpha"));
  CHECK(s.find(h, std::string("alpha"), eq{}) == nullptr);
  auto* e = s.insert(h, std::string("alpha"));
  REQUIRE(e != nullptr);
  CHECK(*e->key == "alpha");
  CHECK(e->hash == h);
  CHECK(e->held);
  CHECK_FALSE(e->woken);
  CHECK(e->bypasses == 0);
  CHECK(e->waiters.empty());
  CHECK(s.live() == 1);
  CHECK(s.find(h, std::string("alpha"), eq{}) == e);
  CHECK(s.find(h, std::string("beta"), eq{}) == nullptr);  // same hash, different key
  s.erase(e);
  CHECK(s.live() == 0);
  CHECK(s.find(h, std::string("alpha"), eq{}) == nullptr);
  CHECK(s.pooled() == 1);  // the node is kept for reuse
}

TEST_CASE("lock_table_shard: the node pool is bounded and reused") {
  lock_table_shard<int> s;
  s.set_pool_limit(3);
  std::vector<lock_table_shard<int>::entry*> live;
  for (int k = 0; k < 10; ++k) live.push_back(s.insert(lock_table_mix(static_cast<std::uint64_t>(k)), k));
  CHECK(s.live() == 10);
  CHECK(s.pooled() == 0);
  for (auto* e : live) s.erase(e);
  CHECK(s.live() == 0);
  CHECK(s.pooled() == 3);  // the rest were deleted
  auto* again = s.insert(lock_table_mix(99), 99);
  CHECK(s.pooled() == 2);  // taken from the pool
  CHECK(again->held);      // a recycled node starts clean
  CHECK(again->bypasses == 0);
  s.erase(again);
  lock_table_shard<int> none;
  none.set_pool_limit(0);
  none.erase(none.insert(1, 1));
  CHECK(none.pooled() == 0);
}

TEST_CASE("lock_table_shard: buckets grow with live entries and shrink back after a burst") {
  lock_table_shard<std::uint64_t> s;
  s.set_pool_limit(0);
  CHECK(s.bucket_count() == lock_table_shard<std::uint64_t>::inline_buckets);
  std::vector<lock_table_shard<std::uint64_t>::entry*> live;
  for (std::uint64_t k = 0; k < 1000; ++k) live.push_back(s.insert(lock_table_mix(k), k));
  CHECK(s.bucket_count() >= 1000);
  for (std::uint64_t k = 0; k < 1000; ++k) CHECK(s.find(lock_table_mix(k), k, eq{}) == live[k]);
  for (auto* e : live) s.erase(e);
  CHECK(s.live() == 0);
  CHECK(s.bucket_count() == lock_table_shard<std::uint64_t>::inline_buckets);
}

TEST_CASE("lock_table_shard: colliding hashes are told apart by the key") {
  lock_table_shard<int> s;
  s.set_pool_limit(8);
  std::vector<lock_table_shard<int>::entry*> live;
  for (int k = 0; k < 20; ++k) live.push_back(s.insert(7, k));  // one hash for all
  for (int k = 0; k < 20; ++k) CHECK(s.find(7, k, eq{}) == live[static_cast<std::size_t>(k)]);
  for (int k = 0; k < 20; k += 2) s.erase(live[static_cast<std::size_t>(k)]);  // unlink from mid-chain
  for (int k = 0; k < 20; ++k) CHECK((s.find(7, k, eq{}) != nullptr) == (k % 2 == 1));
  for (int k = 1; k < 20; k += 2) s.erase(live[static_cast<std::size_t>(k)]);
  CHECK(s.live() == 0);
}

TEST_CASE("lock_table_shard: a throwing key copy leaves the shard unchanged") {
  lock_table_shard<fragile> s;
  s.set_pool_limit(2);
  auto* a = s.insert(1, fragile(1));
  auto* spare = s.insert(2, fragile(2));
  s.erase(spare);  // one node in the pool
  const std::size_t pooled = s.pooled();
  fragile::copies_until_throw = 1;
  CHECK_THROWS_AS(s.insert(3, fragile(3)), std::runtime_error);
  fragile::copies_until_throw = -1;
  CHECK(s.live() == 1);
  CHECK(s.pooled() == pooled);  // the node went back to the pool
  CHECK(s.find(3, fragile(3), eq{}) == nullptr);
  CHECK(s.find(1, fragile(1), eq{}) == a);
  s.erase(a);
}

TEST_CASE("lock_table_shard: seeded random operations agree with a reference map") {
  const auto seed = sluice_test::seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  lock_table_shard<std::uint64_t> s;
  s.set_pool_limit(5);
  std::map<std::uint64_t, lock_table_shard<std::uint64_t>::entry*> model;
  const std::size_t ops = sluice_test::scaled(200'000);
  for (std::size_t i = 0; i < ops; ++i) {
    const std::uint64_t k = rng() % 300;
    // A weak hash (k % 37) so chains and rehashes are exercised.
    const std::uint64_t h = k % 37;
    auto it = model.find(k);
    if (it == model.end()) {
      REQUIRE(s.find(h, k, eq{}) == nullptr);
      model.emplace(k, s.insert(h, k));
    } else {
      REQUIRE(s.find(h, k, eq{}) == it->second);
      if (rng() % 2 == 0) {
        s.erase(it->second);
        model.erase(it);
      }
    }
    REQUIRE(s.live() == model.size());
    REQUIRE(s.pooled() <= 5);
    const std::size_t buckets = s.bucket_count();
    REQUIRE((buckets & (buckets - 1)) == 0);  // always a power of two
  }
  for (auto& [k, e] : model) s.erase(e);
  CHECK(s.live() == 0);
}

TEST_CASE("lock_table_mutex: mutual exclusion with contended (parked) waiters") {
  for (int threads : {2, 4, 8}) {
    INFO("threads " << threads);
    lock_table_mutex m;
    std::uint64_t counter = 0;  // plain: protected by m (TSan checks it)
    std::atomic<int> inside{0};
    std::atomic<bool> overlap{false};
    const std::size_t rounds = sluice_test::scaled(20'000);
    std::vector<std::jthread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        for (std::size_t r = 0; r < rounds; ++r) {
          m.lock();
          if (inside.fetch_add(1) != 0) overlap = true;
          ++counter;
          // Sometimes hold the lock across a yield, so others exhaust their spin and park.
          if ((r + static_cast<std::size_t>(t)) % 64 == 0) std::this_thread::yield();
          inside.fetch_sub(1);
          m.unlock();
        }
      });
    }
    pool.clear();
    CHECK_FALSE(overlap);
    CHECK(counter == rounds * static_cast<std::uint64_t>(threads));
    CHECK(m.try_lock());  // left unlocked
    CHECK_FALSE(m.try_lock());
    m.unlock();
  }
}
