// Direct tests of detail::indexed_heap (the keyed 4-ary heap behind requeue_queue) against a
// reference model: seeded random sequences of insert / update / erase / pop / find / drain, the
// model being a std::map from key to {deadline, sequence number}. After every operation the heap
// must agree with the model on size, the earliest deadline, and (periodically) every key's
// deadline; pops must come out in (deadline, then first-in first-out) order with their payload.
#include <sluice/detail/indexed_heap.hpp>

#include "test_support.hpp"

#include <algorithm>
#include <cstdint>
#include <map>
#include <set>
#include <tuple>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace {

// Hashes that stress the open-addressing index: every key in one probe run, or only a few runs.
struct constant_hash {
  std::size_t operator()(int) const noexcept { return 42; }
};
struct few_buckets_hash {
  std::size_t operator()(int k) const noexcept { return static_cast<std::size_t>(k % 3); }
};

struct model_entry {
  std::int64_t deadline;
  std::uint64_t seq;
};

template <class Hash>
class checked_heap {
 public:
  using heap_t = sluice::detail::indexed_heap<int, std::string, std::int64_t, Hash>;

  // Inserts `key` (absent) or, if present, updates it as requeue_queue's replace policy does.
  void schedule(int key, std::int64_t deadline) {
    const auto found = heap_.find(key);
    if (found == heap_t::npos) {
      auto where = heap_.locate(key);
      if (heap_.reserve_one()) where = heap_.locate(key);
      heap_.insert(where, key, item_for(key, deadline), deadline);
    } else {
      heap_.at(found).item = item_for(key, deadline);
      heap_.update(found, deadline);
    }
    if (const auto it = model_.find(key); it != model_.end()) order_.erase({it->second.deadline, it->second.seq, key});
    model_[key] = model_entry{deadline, next_seq_};
    order_.insert({deadline, next_seq_, key});
    ++next_seq_;
    items_[key] = item_for(key, deadline);
  }

  void erase(int key) {
    const auto found = heap_.find(key);
    const auto it = model_.find(key);
    REQUIRE((found == heap_t::npos) == (it == model_.end()));
    if (found == heap_t::npos) return;
    auto payload = heap_.erase(found);
    CHECK(payload.key == key);
    CHECK(payload.item == items_[key]);
    forget(key);
  }

  void pop() {
    if (model_.empty()) {
      REQUIRE(heap_.empty());
      return;
    }
    const int expected = earliest_key();
    auto [payload, deadline] = heap_.pop_top();
    REQUIRE(payload.key == expected);
    CHECK(deadline == model_[expected].deadline);
    CHECK(payload.item == items_[expected]);
    forget(expected);
  }

  void drain() {
    std::vector<std::pair<int, std::int64_t>> out;
    heap_.drain([&](typename heap_t::payload&& p, std::int64_t d) noexcept { out.emplace_back(p.key, d); });
    std::vector<std::pair<int, std::int64_t>> expected;
    while (!model_.empty()) {
      const int k = earliest_key();
      expected.emplace_back(k, model_[k].deadline);
      forget(k);
    }
    CHECK(out == expected);
    CHECK(heap_.empty());
    CHECK(heap_.memory_bytes() == 0);
  }

  // The cheap invariants, after every operation.
  void check_top() const {
    REQUIRE(heap_.size() == model_.size());
    if (model_.empty()) {
      REQUIRE(heap_.empty());
      REQUIRE(heap_.memory_bytes() == 0);  // all of it released at zero
      return;
    }
    REQUIRE(heap_.top_deadline() == model_.at(earliest_key()).deadline);
  }

  // Every key's presence and deadline (and a few absent keys).
  void check_all(int key_range) const {
    for (int k = 0; k < key_range; ++k) {
      const auto found = heap_.find(k);
      const auto it = model_.find(k);
      REQUIRE((found == heap_t::npos) == (it == model_.end()));
      if (found != heap_t::npos) REQUIRE(heap_.deadline(found) == it->second.deadline);
    }
  }

  [[nodiscard]] std::size_t size() const { return model_.size(); }
  [[nodiscard]] std::size_t memory_bytes() const { return heap_.memory_bytes(); }

 private:
  static std::string item_for(int key, std::int64_t deadline) {
    // Long enough to live on the heap (not in the small-string buffer): moves must keep it intact.
    return "item-for-key-" + std::to_string(key) + "-due-" + std::to_string(deadline);
  }

  // The model's order: by deadline, then by when the key was scheduled or last changed.
  int earliest_key() const { return std::get<2>(*order_.begin()); }

  void forget(int key) {
    const auto it = model_.find(key);
    order_.erase({it->second.deadline, it->second.seq, key});
    model_.erase(it);
    items_.erase(key);
  }

  heap_t heap_;
  std::map<int, model_entry> model_;
  std::set<std::tuple<std::int64_t, std::uint64_t, int>> order_;
  std::map<int, std::string> items_;
  std::uint64_t next_seq_ = 0;
};

template <class Hash>
void run_random_ops(std::uint64_t seed, int key_range, int deadline_range, int ops) {
  INFO("seed " << seed << ", keys " << key_range << ", deadlines " << deadline_range);
  std::mt19937_64 rng(seed);
  checked_heap<Hash> h;
  for (int i = 0; i < ops; ++i) {
    const int key = static_cast<int>(rng() % static_cast<std::uint64_t>(key_range));
    const auto deadline = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(deadline_range));
    const auto op = rng() % 100;
    if (op < 45) {
      h.schedule(key, deadline);
    } else if (op < 65) {
      h.erase(key);
    } else if (op < 99) {
      h.pop();
    } else {
      h.drain();
    }
    h.check_top();
    if (i % 97 == 0) h.check_all(key_range);
  }
  // Empty it: everything comes out in order and the memory goes back.
  while (h.size() > 0) {
    h.pop();
    h.check_top();
  }
  CHECK(h.memory_bytes() == 0);
}

}  // namespace

TEST_CASE("indexed_heap: random operations agree with a reference model") {
  const auto base = sluice_test::seed();
  const int ops = static_cast<int>(sluice_test::scaled(20'000, 4));
  for (std::uint64_t s = 0; s < 6; ++s) {
    const std::uint64_t seed = base + s;
    // Few keys and few deadlines: many updates of pending keys and many equal-deadline ties.
    run_random_ops<std::hash<int>>(seed, 16, 4, ops);
    // More keys than one array growth: growth, compaction and the free-slot stack.
    run_random_ops<std::hash<int>>(seed, 3000, 1'000'000, ops);
    // Hostile hashes: long probe runs and backward-shift deletion across them.
    run_random_ops<constant_hash>(seed, 64, 8, ops / 4);
    run_random_ops<few_buckets_hash>(seed, 500, 100, ops / 4);
  }
}

TEST_CASE("indexed_heap: grow to many entries, then shrink back to nothing") {
  const auto seed = sluice_test::seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  checked_heap<std::hash<int>> h;
  const int n = static_cast<int>(sluice_test::scaled(20'000, 4));
  for (int k = 0; k < n; ++k) h.schedule(k, static_cast<std::int64_t>(rng() % 1000));
  h.check_top();
  h.check_all(n);
  const auto peak = h.memory_bytes();
  // Remove 15 in 16 in random key order: compaction must return memory and keep every entry.
  std::vector<int> keys(static_cast<std::size_t>(n));
  for (int k = 0; k < n; ++k) keys[static_cast<std::size_t>(k)] = k;
  std::shuffle(keys.begin(), keys.end(), rng);
  for (std::size_t i = 0; i < keys.size(); ++i) {
    if (i % 16 != 0) h.erase(keys[i]);
  }
  h.check_top();
  h.check_all(n);
  CHECK(h.memory_bytes() < peak / 4);
  while (h.size() > 0) h.pop();
  CHECK(h.memory_bytes() == 0);
}

TEST_CASE("indexed_heap: equal deadlines pop first-in first-out, an update moves a key to the back") {
  checked_heap<std::hash<int>> h;
  for (int k = 0; k < 50; ++k) h.schedule(k, 7);
  h.schedule(0, 7);  // re-scheduled at the same deadline: now after 49
  h.schedule(10, 3);
  for (int i = 0; i < 51; ++i) {
    h.pop();  // checked against the model: 10, then 1..49, then 0
    h.check_top();
  }
}
