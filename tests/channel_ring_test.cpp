// Direct tests of sluice::detail::channel_ring (issue 12 point 12): the lap/index position
// encoding for capacities that are and are not powers of two, wrap-around, chunked claims and the
// bulk hand-back of slots through head, claimed-but-unpublished slots, close/drained, eviction, and
// a long random run against a reference model. Single-threaded: the concurrent behaviour is
// covered through sluice::channel in channel_test.cpp and stress/channel_stress.cpp.
#include <sluice/detail/channel_ring.hpp>

#include "test_support.hpp"

#include <bit>
#include <cstdint>
#include <deque>
#include <new>
#include <random>
#include <vector>

using sluice::detail::channel_ring;
using sluice::detail::claim_result;

namespace {

using pos_type = channel_ring<int>::pos_type;

const std::vector<std::size_t> capacities = {1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 63, 64, 65, 100, 1000, 1024};

struct counted {
  static inline int live = 0;
  int value;
  explicit counted(int v) noexcept : value(v) { ++live; }
  counted(counted&& o) noexcept : value(o.value) { ++live; }
  ~counted() { --live; }
};

// Claims up to `want`, constructs value, value+1, ... in the claimed slots and publishes them.
template <class T>
std::size_t put(channel_ring<T>& ring, std::size_t want, int& value, pos_type* first_out = nullptr) {
  pos_type first{};
  std::size_t n = 0;
  if (ring.claim(want, first, n) != claim_result::ok) return 0;
  if (first_out != nullptr) *first_out = first;
  pos_type p = first;
  for (std::size_t i = 0; i < n; ++i, p = ring.next(p)) {
    ::new (static_cast<void*>(ring.slot_storage(p))) T(value++);
    ring.publish(p);
  }
  return n;
}

// The position reached from p after k steps of next().
template <class T>
pos_type walk(const channel_ring<T>& ring, pos_type p, std::size_t k) {
  for (std::size_t i = 0; i < k; ++i) p = ring.next(p);
  return p;
}

}  // namespace

TEST_CASE("channel_ring: positions are lap | index; next() wraps the index at capacity") {
  for (std::size_t cap : capacities) {
    INFO("capacity " << cap);
    channel_ring<int> ring(cap, false);
    const pos_type one_lap = std::bit_ceil(static_cast<pos_type>(cap) + 1);
    pos_type p = 0;
    for (std::size_t i = 0; i < cap; ++i) {
      CHECK(p == i);  // the first lap: positions 0 .. cap-1, no division anywhere
      p = ring.next(p);
    }
    CHECK(p == one_lap);  // index back to 0, lap 1
    CHECK(walk(ring, p, cap) == 2 * one_lap);
    CHECK(walk(ring, 5 * one_lap + (cap - 1), 1) == 6 * one_lap);
  }
}

TEST_CASE("channel_ring: one claim takes every free slot at most; then full until slots come back") {
  for (std::size_t cap : capacities) {
    INFO("capacity " << cap);
    channel_ring<int> ring(cap, false);
    int v = 0;
    pos_type first = 99;
    CHECK(put(ring, 2 * cap + 3, v, &first) == cap);  // asks for more than fits: gets exactly cap
    CHECK(first == 0);
    pos_type p{};
    std::size_t n = 0;
    CHECK(ring.claim(1, p, n) == claim_result::full);
    CHECK_FALSE(ring.has_space_or_closed(1));
    CHECK(ring.claimed_count() == cap);
    CHECK(ring.read_count() == 0);
    CHECK(ring.readable());
    CHECK(ring.pending_or_closed());
  }
}

TEST_CASE("channel_ring: slots come back in bulk, once per read, and claims continue across the wrap") {
  for (std::size_t cap : capacities) {
    INFO("capacity " << cap);
    channel_ring<int> ring(cap, false);
    int v = 0;
    REQUIRE(put(ring, cap, v) == cap);
    const std::size_t k = (cap + 1) / 2;  // hand back about half
    std::vector<int> got;
    CHECK(ring.read(k, [&](int&& x) noexcept { got.push_back(x); }) == k);
    for (std::size_t i = 0; i < k; ++i) CHECK(got[i] == static_cast<int>(i));
    CHECK(ring.read_count() == k);
    CHECK(ring.has_space_or_closed(k));
    CHECK_FALSE(ring.has_space_or_closed(k + 1));
    // The next claim starts where the first lap ended (index 0 of lap 1) and takes exactly the k
    // freed slots, even though the producers' cached head still said "full".
    pos_type first{};
    CHECK(put(ring, cap, v, &first) == k);
    CHECK(first == walk(ring, 0, cap));
    CHECK(ring.claimed_count() == cap + k);
    // Everything comes out in order across the wrap.
    got.clear();
    CHECK(ring.read(2 * cap, [&](int&& x) noexcept { got.push_back(x); }) == cap);
    for (std::size_t i = 0; i < cap; ++i) CHECK(got[i] == static_cast<int>(k + i));
    CHECK(ring.read_count() == cap + k);
    CHECK(ring.read(1, [](int&&) noexcept {}) == 0);
    CHECK_FALSE(ring.pending_or_closed());
  }
}

TEST_CASE("channel_ring: a claimed but unpublished slot stops the reader, and only it") {
  channel_ring<int> ring(4, false);
  pos_type first{};
  std::size_t n = 0;
  REQUIRE(ring.claim(2, first, n) == claim_result::ok);
  REQUIRE(n == 2);
  const pos_type second = ring.next(first);
  ::new (static_cast<void*>(ring.slot_storage(second))) int(2);
  ring.publish(second);
  CHECK_FALSE(ring.readable());        // the head slot is claimed, not yet published
  CHECK_FALSE(ring.readable_or_drained());
  CHECK(ring.pending_or_closed());     // ... but someone is about to publish it: do not park
  CHECK(ring.read(4, [](int&&) noexcept {}) == 0);
  ::new (static_cast<void*>(ring.slot_storage(first))) int(1);
  ring.publish(first);
  std::vector<int> got;
  CHECK(ring.read(4, [&](int&& x) noexcept { got.push_back(x); }) == 2);
  CHECK(got == std::vector<int>{1, 2});
}

TEST_CASE("channel_ring: close sets the flag once; drained means closed and every claim read") {
  channel_ring<int> ring(3, false);
  int v = 0;
  REQUIRE(put(ring, 2, v) == 2);
  pos_type pending{};
  std::size_t n = 0;
  REQUIRE(ring.claim(1, pending, n) == claim_result::ok);  // claimed before the close, published after
  CHECK(ring.close());
  CHECK_FALSE(ring.close());
  CHECK(ring.is_closed());
  CHECK(ring.has_space_or_closed(3));  // a blocked producer's predicate: wake up, it is closed
  pos_type p{};
  CHECK(ring.claim(1, p, n) == claim_result::closed);
  CHECK(ring.claimed_count() == 3);  // the closed bit is not part of the count
  CHECK_FALSE(ring.drained());
  CHECK(ring.read(8, [](int&&) noexcept {}) == 2);
  CHECK_FALSE(ring.drained());  // the pending item will still arrive
  CHECK_FALSE(ring.readable_or_drained());
  ::new (static_cast<void*>(ring.slot_storage(pending))) int(9);
  ring.publish(pending);
  CHECK(ring.readable_or_drained());
  CHECK(ring.read(8, [](int&&) noexcept {}) == 1);
  CHECK(ring.drained());
  CHECK(ring.readable_or_drained());
  CHECK(ring.pending_or_closed());
}

TEST_CASE("channel_ring: evict_oldest_and_claim frees the head slot and claims it one lap later") {
  for (std::size_t cap : {std::size_t{1}, std::size_t{3}, std::size_t{8}}) {
    INFO("capacity " << cap);
    channel_ring<counted> ring(cap, true);
    int v = 0;
    std::vector<int> victims;
    auto collect = [&](counted&& c) noexcept { victims.push_back(c.value); };
    pos_type claimed = 12345;
    if (cap > 1) {
      REQUIRE(put(ring, cap - 1, v) == cap - 1);
      CHECK(ring.evict_oldest_and_claim(claimed, collect) == claim_result::full);  // not full: no eviction
      CHECK(victims.empty());
      CHECK(claimed == 12345);
    }
    REQUIRE(put(ring, 1, v) == 1);
    REQUIRE(ring.claimed_count() == cap);
    CHECK(ring.evict_oldest_and_claim(claimed, collect) == claim_result::ok);
    CHECK(victims == std::vector<int>{0});
    CHECK(claimed == walk(ring, 0, cap));  // the slot item 0 used, in the next lap
    CHECK(ring.read_count() == 1);
    CHECK(ring.claimed_count() == cap + 1);
    ::new (static_cast<void*>(ring.slot_storage(claimed))) counted(v++);
    ring.publish(claimed);
    std::vector<int> got;
    CHECK(ring.read(2 * cap, [&](counted&& c) noexcept { got.push_back(c.value); }) == cap);
    for (std::size_t i = 0; i < cap; ++i) CHECK(got[i] == static_cast<int>(i + 1));
    CHECK(counted::live == 0);
  }
  // Closed: nothing is evicted.
  channel_ring<counted> ring(2, true);
  int v = 0;
  REQUIRE(put(ring, 2, v) == 2);
  ring.close();
  pos_type claimed{};
  bool called = false;
  CHECK(ring.evict_oldest_and_claim(claimed, [&](counted&&) noexcept { called = true; }) == claim_result::closed);
  CHECK_FALSE(called);
  CHECK(ring.read_count() == 0);
}

TEST_CASE("channel_ring: the destructor destroys exactly the items still queued") {
  {
    channel_ring<counted> ring(5, false);
    int v = 0;
    REQUIRE(put(ring, 5, v) == 5);
    REQUIRE(ring.read(2, [](counted&&) noexcept {}) == 2);
    REQUIRE(put(ring, 5, v) == 2);  // wraps into the freed slots
    CHECK(counted::live == 5);
  }
  CHECK(counted::live == 0);
}

TEST_CASE("channel_ring: a long random run matches a FIFO model, lap after lap") {
  const auto seed = sluice_test::seed();
  INFO("seed " << seed << " (SLUICE_TEST_SEED to repeat)");
  std::mt19937_64 rng(seed);
  for (std::size_t cap : capacities) {
    INFO("capacity " << cap);
    channel_ring<counted> ring(cap, false);
    std::deque<int> model;
    int next_value = 0;
    pos_type expect_pos = 0;  // where the next claim must start: positions advance through next()
    std::uint64_t claimed = 0, read = 0;
    const std::size_t steps = sluice_test::scaled(4000, 4);
    for (std::size_t step = 0; step < steps; ++step) {
      if (rng() % 2 == 0) {
        const std::size_t want = 1 + rng() % (cap + 2);
        const std::size_t room = cap - model.size();
        const int before = next_value;
        // One claim may take fewer than are free (it trusts the producers' cached head while that
        // shows any room); claiming again takes the rest, as send_batch does.
        std::size_t n = 0;
        for (std::size_t got = 0; n < want; n += got) {
          pos_type first{};
          got = put(ring, want - n, next_value, &first);
          if (got == 0) break;
          REQUIRE(first == expect_pos);
          expect_pos = walk(ring, expect_pos, got);
        }
        REQUIRE(n == std::min(want, room));
        for (int x = before; x < next_value; ++x) model.push_back(x);
        claimed += n;
      } else {
        const std::size_t max = 1 + rng() % (cap + 2);
        std::vector<int> got;
        const std::size_t n = ring.read(max, [&](counted&& c) noexcept { got.push_back(c.value); });
        REQUIRE(n == std::min(max, model.size()));
        for (int x : got) {
          REQUIRE(x == model.front());
          model.pop_front();
        }
        read += n;
      }
      REQUIRE(ring.claimed_count() == claimed);
      REQUIRE(ring.read_count() == read);
      const std::size_t free_slots = cap - model.size();
      if (free_slots > 0) REQUIRE(ring.has_space_or_closed(free_slots));
      if (free_slots < cap) REQUIRE_FALSE(ring.has_space_or_closed(free_slots + 1));
      REQUIRE(ring.pending_or_closed() == !model.empty());
      REQUIRE(counted::live == static_cast<int>(model.size()));
    }
    CHECK(claimed > 2 * cap);  // went round the ring several times
  }
  CHECK(counted::live == 0);
}
