// Tests for sluice::ready_accumulator. Every timed behaviour runs on a manual_clock: no test sleeps
// to reach a deadline. The first group is the seed's scenarios (Dekaf PR #527), one case each.
#include <sluice/ready_accumulator.hpp>
#include <sluice/testing/manual_clock.hpp>

#include "test_support.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <future>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

using namespace std::chrono_literals;
using sluice::append_status;
using sluice::ready_status;
using sluice::testing::manual_clock;

namespace {

// Partition -> destination table the test can change (a leader move, metadata learned).
struct routes {
  std::mutex m;
  std::unordered_map<int, int> dest;
  void set(int p, int d) {
    std::lock_guard l(m);
    dest[p] = d;
  }
  void forget(int p) {
    std::lock_guard l(m);
    dest.erase(p);
  }
  std::optional<int> operator()(int p) {
    std::lock_guard l(m);
    auto it = dest.find(p);
    if (it == dest.end()) return std::nullopt;
    return it->second;
  }
};

using acc_t = sluice::ready_accumulator<int, int, int, manual_clock>;
using handle = acc_t::batch_handle;

sluice::ready_accumulator_options small(std::size_t batch_bytes = 100) {
  sluice::ready_accumulator_options o;
  o.batch_bytes = batch_bytes;
  o.max_request_bytes = 1000;
  o.buffer_bytes = 100000;
  o.linger = 10ms;
  return o;
}

struct fixture {
  explicit fixture(sluice::ready_accumulator_options o = small()) : acc(o, [this](int p) { return r(p); }, clock) {
    for (int p = 0; p < 100; ++p) r.set(p, p % 3);
  }
  manual_clock clock;
  routes r;
  acc_t acc;

  // Appends records of `bytes` until one batch of partition p seals (batch_bytes 100, 50 each: 2).
  void seal_one(int p, int first_value = 0) {
    REQUIRE(acc.append(p, first_value + 0, 50) == append_status::ok);
    REQUIRE(acc.append(p, first_value + 1, 50) == append_status::ok);
  }
  std::vector<int> dests() {
    auto r1 = acc.ready();
    std::sort(r1.destinations.begin(), r1.destinations.end());
    return r1.destinations;
  }
  std::vector<handle> drain(int d, std::size_t max = 1000) {
    std::vector<handle> out;
    acc.drain(d, max, out);
    return out;
  }
  void complete(std::vector<handle>& v) {
    for (auto& b : v) acc.complete(std::move(b));
    v.clear();
  }
};

}  // namespace

// ---- the seed's scenarios -----------------------------------------------------------------------

TEST_CASE("ready_accumulator: a sealed batch reports its destination") {
  fixture f;
  f.seal_one(4);  // partition 4 -> destination 1
  CHECK(f.dests() == std::vector<int>{1});
  auto b = f.drain(1);
  REQUIRE(b.size() == 1);
  CHECK(b[0].partition() == 4);
  CHECK(b[0].records().size() == 2);
  CHECK(b[0].bytes() == 100);
  f.complete(b);
  CHECK(f.acc.audit().clean());
}

TEST_CASE("ready_accumulator: no sealed batch reports nothing") {
  fixture f;
  REQUIRE(f.acc.append(4, 1, 10) == append_status::ok);  // open, not sealed, linger not reached
  auto r = f.acc.ready();
  CHECK(r.destinations.empty());
  CHECK(r.unknown.empty());
  CHECK(f.drain(1).empty());
  CHECK(f.acc.audit().clean());
}

TEST_CASE("ready_accumulator: a muted partition is skipped and its unmute re-notifies it") {
  fixture f;
  auto token = f.acc.mute(4);
  CHECK(token.owns());
  f.seal_one(4);
  CHECK(f.dests().empty());
  CHECK(f.dests().empty());  // and it is not churned every cycle
  CHECK(f.acc.stats().queued_notifications == 0);
  CHECK(f.acc.audit().clean());  // muted: not an orphan
  token.release();
  CHECK_FALSE(token.owns());
  CHECK(f.dests() == std::vector<int>{1});
  auto b = f.drain(1);
  CHECK(b.size() == 1);
  f.complete(b);
}

TEST_CASE("ready_accumulator: a partition muted while queued for drain is skipped, then re-notified") {
  fixture f;
  f.seal_one(4);
  CHECK(f.dests() == std::vector<int>{1});  // now in destination 1's list
  {
    auto token = f.acc.mute(4);
    CHECK(f.drain(1).empty());  // dropped from the list, not taken
    CHECK(f.acc.audit().clean());
  }
  CHECK(f.dests() == std::vector<int>{1});
  auto b = f.drain(1);
  CHECK(b.size() == 1);
  f.complete(b);
}

TEST_CASE("ready_accumulator: an unknown destination is flagged, and reported again after the lookup learns it") {
  fixture f;
  f.r.forget(4);
  f.seal_one(4);
  auto r1 = f.acc.ready();
  CHECK(r1.destinations.empty());
  CHECK(r1.unknown == std::vector<int>{4});
  auto r2 = f.acc.ready();  // reported once per ready(), not lost, not multiplied
  CHECK(r2.unknown == std::vector<int>{4});
  CHECK(f.acc.audit().clean());
  f.r.set(4, 2);
  auto r3 = f.acc.ready();
  CHECK(r3.unknown.empty());
  CHECK(r3.destinations == std::vector<int>{2});
  auto b = f.drain(2);
  CHECK(b.size() == 1);
  f.complete(b);
  CHECK(f.acc.ready().unknown.empty());
}

TEST_CASE("ready_accumulator: an unknown destination does not make wait_ready spin") {
  fixture f;
  f.r.forget(4);
  f.seal_one(4);
  CHECK(f.acc.wait_ready_for(0ms) == ready_status::ready);
  CHECK(f.acc.ready().unknown == std::vector<int>{4});
  CHECK(f.acc.wait_ready_for(0ms) == ready_status::timeout);  // no busy loop
  f.r.set(4, 0);
  f.acc.destinations_refreshed();
  CHECK(f.acc.wait_ready_for(0ms) == ready_status::ready);
  CHECK(f.dests() == std::vector<int>{0});
}

TEST_CASE("ready_accumulator: a second ready() after a drain reports nothing new") {
  fixture f;
  f.seal_one(4);
  CHECK(f.dests() == std::vector<int>{1});
  auto b = f.drain(1);
  CHECK(b.size() == 1);
  CHECK(f.dests().empty());
  CHECK(f.drain(1).empty());
  f.complete(b);
  CHECK(f.dests().empty());
}

TEST_CASE("ready_accumulator: with several partitions only the sealed ones are reported, exactly those") {
  fixture f;
  for (int p = 0; p < 30; ++p) REQUIRE(f.acc.append(p, int{p}, 10) == append_status::ok);  // all open
  f.seal_one(3);   // -> 0
  f.seal_one(7);   // -> 1
  f.seal_one(10);  // -> 1
  CHECK(f.dests() == std::vector<int>{0, 1});
  std::vector<int> parts;
  for (int d : {0, 1, 2}) {
    for (auto& b : f.drain(d)) {
      parts.push_back(b.partition());
      f.acc.complete(std::move(b));
    }
  }
  std::sort(parts.begin(), parts.end());
  CHECK(parts == std::vector<int>{3, 7, 10});
}

TEST_CASE("ready_accumulator: a batch in backoff is not reported before expiry, and exactly once after") {
  fixture f;
  f.seal_one(4);
  CHECK(f.dests() == std::vector<int>{1});
  auto b = f.drain(1);
  REQUIRE(b.size() == 1);
  f.acc.reenqueue(std::move(b[0]), 100ms);
  CHECK(f.acc.audit().clean());  // in backoff: not an orphan
  CHECK(f.dests().empty());
  f.clock.advance(99ms);
  CHECK(f.dests().empty());
  CHECK(f.acc.stats().queued_notifications == 0);  // no churn while it waits
  f.clock.advance(1ms);
  CHECK(f.dests() == std::vector<int>{1});
  auto again = f.drain(1);
  REQUIRE(again.size() == 1);
  CHECK(again[0].attempts() == 1);
  CHECK(f.dests().empty());  // exactly once
  f.clock.advance(1s);
  CHECK(f.dests().empty());
  f.complete(again);
}

TEST_CASE("ready_accumulator: linger seals and notifies") {
  fixture f;
  REQUIRE(f.acc.append(4, 1, 10) == append_status::ok);
  f.clock.advance(9ms);
  CHECK(f.dests().empty());
  f.clock.advance(1ms);
  CHECK(f.dests() == std::vector<int>{1});
  auto b = f.drain(1);
  REQUIRE(b.size() == 1);
  CHECK(b[0].records().size() == 1);
  f.complete(b);
}

TEST_CASE("ready_accumulator: the request-size limit re-queues the skipped partitions") {
  fixture f;
  for (int p : {1, 4, 7, 10}) f.seal_one(p);  // four partitions of destination 1, 100 bytes each
  CHECK(f.dests() == std::vector<int>{1});
  auto first = f.drain(1, 250);
  CHECK(first.size() == 2);
  CHECK(f.acc.audit().clean());
  CHECK(f.dests() == std::vector<int>{1});  // the skipped ones are still there
  auto second = f.drain(1, 250);
  CHECK(second.size() == 2);
  std::vector<int> parts;
  for (auto& b : first) parts.push_back(b.partition());
  for (auto& b : second) parts.push_back(b.partition());
  std::sort(parts.begin(), parts.end());
  CHECK(parts == std::vector<int>{1, 4, 7, 10});
  CHECK(f.dests().empty());
  f.complete(first);
  f.complete(second);
}

TEST_CASE("ready_accumulator: drain takes at least one batch, so an oversized batch cannot stall") {
  fixture f;
  f.seal_one(4);
  CHECK(f.dests() == std::vector<int>{1});
  auto b = f.drain(1, 10);  // limit below the batch size
  CHECK(b.size() == 1);
  f.complete(b);
}

TEST_CASE("ready_accumulator: several batches in one partition all drain over successive cycles") {
  fixture f;
  for (int i = 0; i < 3; ++i) f.seal_one(4, i * 10);
  std::vector<int> values;
  for (int cycle = 0; cycle < 3; ++cycle) {
    CHECK(f.dests() == std::vector<int>{1});
    auto b = f.drain(1);
    REQUIRE(b.size() == 1);  // one batch per partition per drain
    for (int v : b[0].records()) values.push_back(v);
    f.complete(b);
    CHECK(f.acc.audit().clean());
  }
  CHECK(f.dests().empty());
  CHECK(values == std::vector<int>{0, 1, 10, 11, 20, 21});
}

TEST_CASE("ready_accumulator: drain rotates the starting partition across calls") {
  fixture f;
  for (int p : {1, 4, 7}) {
    for (int i = 0; i < 3; ++i) f.seal_one(p, i * 10);
  }
  CHECK(f.dests() == std::vector<int>{1});
  std::vector<int> order;
  for (int call = 0; call < 9; ++call) {
    auto b = f.drain(1, 100);  // one batch per call
    REQUIRE(b.size() == 1);
    order.push_back(b[0].partition());
    f.complete(b);
  }
  CHECK(order == std::vector<int>{1, 4, 7, 1, 4, 7, 1, 4, 7});
}

// ---- append ------------------------------------------------------------------------------------

TEST_CASE("ready_accumulator: a record larger than a batch gets a batch of its own, without linger") {
  fixture f;
  REQUIRE(f.acc.append(4, 1, 10) == append_status::ok);
  REQUIRE(f.acc.append(4, 2, 500) == append_status::ok);  // > batch_bytes (100), <= max_request
  REQUIRE(f.acc.append(4, 3, 10) == append_status::ok);
  CHECK(f.dests() == std::vector<int>{1});
  auto b = f.drain(1);
  REQUIRE(b.size() == 1);
  CHECK(std::vector<int>(b[0].records().begin(), b[0].records().end()) == std::vector<int>{1});
  f.complete(b);
  CHECK(f.dests() == std::vector<int>{1});
  b = f.drain(1);
  REQUIRE(b.size() == 1);
  CHECK(std::vector<int>(b[0].records().begin(), b[0].records().end()) == std::vector<int>{2});
  f.complete(b);
  CHECK(f.dests().empty());  // record 3 waits for its linger
}

TEST_CASE("ready_accumulator: a record larger than max_request_bytes is refused and left with the caller") {
  sluice::ready_accumulator<int, std::string, int, manual_clock> acc(small(), [](int) { return std::optional(0); });
  std::string record(64, 'x');
  CHECK(acc.append(1, std::move(record), 1001) == append_status::too_large);
  CHECK(record.size() == 64);  // not moved from
  CHECK(acc.try_append(1, std::move(record), 1001) == append_status::too_large);
  CHECK(record.size() == 64);
  CHECK(acc.stats().appended == 0);
}

TEST_CASE("ready_accumulator: batch_records seals by count") {
  auto o = small(1000);
  o.batch_records = 3;
  fixture f(o);
  for (int i = 0; i < 3; ++i) REQUIRE(f.acc.append(4, int{i}, 1) == append_status::ok);
  CHECK(f.dests() == std::vector<int>{1});
  auto b = f.drain(1);
  REQUIRE(b.size() == 1);
  CHECK(b[0].records().size() == 3);
  f.complete(b);
}

TEST_CASE("ready_accumulator: options are validated, naming the field and value") {
  auto lookup = [](int) { return std::optional(0); };
  auto bad = [&](auto mutate, const std::string& text) {
    auto o = small();
    mutate(o);
    try {
      acc_t acc(o, lookup);
      FAIL("no exception");
    } catch (const std::invalid_argument& e) {
      CHECK(std::string(e.what()).find(text) != std::string::npos);
    }
  };
  bad([](auto& o) { o.batch_bytes = 0; }, "batch_bytes must be >= 1, got 0");
  bad([](auto& o) { o.batch_records = 0; }, "batch_records must be >= 1, got 0");
  bad([](auto& o) { o.max_request_bytes = 0; }, "max_request_bytes");
  bad([](auto& o) { o.buffer_bytes = 0; }, "buffer_bytes");
  bad([](auto& o) { o.linger = -1ms; }, "linger must be >= 0, got -1000000ns");
  bad([](auto& o) { o.delivery_timeout = 0ms; }, "delivery_timeout must be > 0");
  CHECK_THROWS_AS(acc_t(small(), {}), std::invalid_argument);
}

TEST_CASE("ready_accumulator: buffer_bytes caps memory; try_append reports full, timed forms time out") {
  auto o = small();
  o.buffer_bytes = 200;
  fixture f(o);
  f.seal_one(4);
  f.seal_one(5);  // 200 bytes: full
  int v = 42;
  CHECK(f.acc.try_append(6, std::move(v), 1) == append_status::full);
  CHECK(f.acc.try_append_until(6, std::move(v), 1, f.clock.now()) == append_status::timeout);
  std::atomic<bool> done{false};
  auto fut = std::async(std::launch::async, [&] {
    int w = 7;
    auto s = f.acc.try_append_for(6, std::move(w), 50, 1s);
    done = true;
    return s;
  });
  f.clock.wait_for_waiters(1);
  CHECK_FALSE(done.load());
  f.clock.advance(1s);
  CHECK(fut.get() == append_status::timeout);
  CHECK(f.acc.stats().buffer_used == 200);
  CHECK(f.acc.stats().waiting_appenders == 0);
  // Memory freed by a completion lets a blocked append in.
  auto fut2 = std::async(std::launch::async, [&] { return f.acc.append(6, 8, 50); });
  f.clock.wait_for_waiters(1);
  CHECK(f.dests() == std::vector<int>{1, 2});
  auto b = f.drain(1);
  f.complete(b);
  CHECK(fut2.get() == append_status::ok);
  CHECK(f.acc.stats().buffer_used == 150);
}

TEST_CASE("ready_accumulator: memory a lane reserved ahead is neither counted as used nor kept from others") {
  // Appends reserve buffer memory in slices per lane (1 MiB buffer: 8 KiB or less per slice), so
  // after one 100-byte append that lane holds unused credit. It must not show as used, and an
  // append elsewhere that needs all the rest must get it (try_append may not report full while
  // memory sits unused in a lane).
  auto o = small(1 << 20);
  o.buffer_bytes = 1 << 20;
  o.max_request_bytes = 1 << 20;
  fixture f(o);
  for (int p = 0; p < 64; ++p) REQUIRE(f.acc.append(p, int{p}, 100) == append_status::ok);  // every lane
  CHECK(f.acc.stats().buffer_used == 6400);
  int big = 1;
  CHECK(f.acc.try_append(99, std::move(big), (1 << 20) - 6400) == append_status::ok);  // exactly the rest
  CHECK(f.acc.stats().buffer_used == std::size_t{1} << 20);
  int one = 2;
  CHECK(f.acc.try_append(7, std::move(one), 1) == append_status::full);  // now it is full
  CHECK(f.acc.audit().clean());
  f.acc.flush();
  for (int d : f.dests()) {
    auto got = f.drain(d, 1 << 20);
    while (!got.empty()) {
      f.complete(got);
      got = f.drain(d, 1 << 20);
    }
  }
  CHECK(f.acc.stats().buffer_used == 0);
  CHECK(f.acc.stats().pending == 0);
  int again = 3;
  CHECK(f.acc.try_append(7, std::move(again), 1 << 20) == append_status::ok);  // all of it, again
}

TEST_CASE("ready_accumulator: blocked appenders are served first-in first-out") {
  auto o = small();
  o.buffer_bytes = 100;
  fixture f(o);
  f.seal_one(4);  // full
  // Both append to partition 20 (destination 2): the batch's record order is the service order.
  auto blocked = [&](int id, std::size_t bytes) {
    return std::async(std::launch::async, [&f, id, bytes] { return f.acc.append(20, int{id}, bytes); });
  };
  auto a = blocked(1, 80);
  while (f.acc.stats().waiting_appenders < 1) std::this_thread::yield();
  auto b = blocked(2, 10);  // small enough to fit first, but must not overtake
  while (f.acc.stats().waiting_appenders < 2) std::this_thread::yield();
  int v = 3;
  CHECK(f.acc.try_append(30, std::move(v), 1) == append_status::full);  // no barging either
  CHECK(f.dests() == std::vector<int>{1});
  auto d = f.drain(1);
  f.complete(d);
  CHECK(a.get() == append_status::ok);
  CHECK(b.get() == append_status::ok);
  f.acc.flush();
  CHECK(f.dests() == std::vector<int>{2});
  auto got = f.drain(2);
  REQUIRE(got.size() == 1);
  CHECK(std::vector<int>(got[0].records().begin(), got[0].records().end()) == std::vector<int>{1, 2});
  f.complete(got);
}

TEST_CASE("ready_accumulator: a blocked append is cancelled by its stop token and by close") {
  auto o = small();
  o.buffer_bytes = 100;
  fixture f(o);
  f.seal_one(4);
  std::stop_source stop;
  auto a = std::async(std::launch::async, [&] { return f.acc.append(5, 1, 10, stop.get_token()); });
  while (f.acc.stats().waiting_appenders < 1) std::this_thread::yield();
  stop.request_stop();
  CHECK(a.get() == append_status::cancelled);
  auto b = std::async(std::launch::async, [&] { return f.acc.append(5, 1, 10); });
  while (f.acc.stats().waiting_appenders < 1) std::this_thread::yield();
  f.acc.close();
  CHECK(b.get() == append_status::closed);
  CHECK(f.acc.append(5, 1, 10) == append_status::closed);
}

// ---- mute, retry, expiry, leader moves -----------------------------------------------------------

TEST_CASE("ready_accumulator: mutes are counted; the partition unmutes when the last owner goes") {
  fixture f;
  auto a = f.acc.mute(4);
  auto b = f.acc.mute(4);
  CHECK(f.acc.mutes(4) == 2);
  f.seal_one(4);
  CHECK(f.dests().empty());
  a.release();
  CHECK(f.acc.mutes(4) == 1);
  CHECK(f.dests().empty());  // still muted by b
  auto moved = std::move(b);
  CHECK_FALSE(b.owns());
  CHECK(moved.owns());
  CHECK(f.dests().empty());
  moved = acc_t::mute_token{};  // move-assign releases
  CHECK(f.acc.mutes(4) == 0);
  CHECK(f.dests() == std::vector<int>{1});
  auto d = f.drain(1);
  CHECK(d.size() == 1);
  f.complete(d);
}

TEST_CASE("ready_accumulator: drain with mute_drained keeps one batch per partition in flight") {
  fixture f;
  for (int i = 0; i < 2; ++i) f.seal_one(4, i * 10);
  CHECK(f.dests() == std::vector<int>{1});
  std::vector<handle> out;
  CHECK(f.acc.drain(1, 1000, out, true) == 1);
  CHECK(f.acc.mutes(4) == 1);
  CHECK(f.dests().empty());  // second batch waits for the first
  CHECK(f.acc.audit().clean());
  f.acc.complete(std::move(out[0]));
  out.clear();
  CHECK(f.acc.mutes(4) == 0);
  CHECK(f.dests() == std::vector<int>{1});
  CHECK(f.acc.drain(1, 1000, out, true) == 1);
  CHECK(out[0].records()[0] == 10);
  f.complete(out);
}

TEST_CASE("ready_accumulator: reenqueue puts failed batches at the front, in their original order") {
  fixture f;
  for (int i = 0; i < 4; ++i) f.seal_one(4, i * 10);  // batches 0, 10, 20, 30
  CHECK(f.dests() == std::vector<int>{1});
  std::vector<handle> first = f.drain(1);
  CHECK(f.dests() == std::vector<int>{1});
  std::vector<handle> second = f.drain(1);
  REQUIRE(first.size() == 1);
  REQUIRE(second.size() == 1);
  // Fail the later one first: order must still come back as 0, 10, 20, 30.
  f.acc.reenqueue(std::move(second[0]), 0ms);
  f.acc.reenqueue(std::move(first[0]), 0ms);
  std::vector<int> values;
  for (int cycle = 0; cycle < 4; ++cycle) {
    (void)f.dests();
    auto b = f.drain(1);
    REQUIRE(b.size() == 1);
    values.push_back(b[0].records()[0]);
    f.complete(b);
  }
  CHECK(values == std::vector<int>{0, 10, 20, 30});
  CHECK(f.acc.stats().batches_retried == 2);
}

TEST_CASE("ready_accumulator: a leader move re-routes once and cuts the backoff short") {
  fixture f;
  f.seal_one(4);
  (void)f.dests();
  auto b = f.drain(1);
  f.acc.reenqueue(std::move(b[0]), 10s);
  CHECK(f.dests().empty());
  f.r.set(4, 2);
  for (int i = 0; i < 100; ++i) f.acc.destination_changed(4);  // many metadata updates
  CHECK(f.acc.stats().queued_notifications == 1);              // one notification, not 100
  CHECK(f.dests() == std::vector<int>{2});
  auto moved = f.drain(2);
  REQUIRE(moved.size() == 1);
  f.complete(moved);
  CHECK(f.dests().empty());
}

TEST_CASE("ready_accumulator: a partition moved while queued for drain goes to its new destination") {
  fixture f;
  f.seal_one(4);
  CHECK(f.dests() == std::vector<int>{1});
  f.r.set(4, 2);  // moved without telling the accumulator
  CHECK(f.drain(1).empty());
  CHECK(f.dests() == std::vector<int>{2});
  auto b = f.drain(2);
  CHECK(b.size() == 1);
  f.complete(b);
  CHECK(f.acc.audit().clean());
}

TEST_CASE("ready_accumulator: delivery_timeout expires open, queued and backed-off batches, never in-flight ones") {
  auto o = small();
  o.delivery_timeout = 1s;
  o.linger = 2s;
  fixture f(o);
  REQUIRE(f.acc.append(1, 100, 10) == append_status::ok);  // stays open (linger 2 s)
  f.seal_one(4);                                         // sealed, queued
  f.seal_one(5);                                         // sealed, will be in backoff
  f.seal_one(6);                                         // sealed, will be in flight
  (void)f.dests();
  auto b5 = f.drain(2);
  REQUIRE(b5.size() == 1);
  f.acc.reenqueue(std::move(b5[0]), 10s);
  auto b6 = f.drain(0);
  REQUIRE(b6.size() == 1);
  f.clock.advance(999ms);
  CHECK_FALSE(f.acc.ready().expiry_due);
  std::vector<handle> expired;
  CHECK(f.acc.expire(expired) == 0);
  f.clock.advance(1ms);
  CHECK(f.acc.wait_ready_for(0ms) == ready_status::ready);
  CHECK(f.acc.ready().expiry_due);
  CHECK(f.acc.expire(expired) == 3);
  std::vector<int> parts;
  for (auto& e : expired) parts.push_back(e.partition());
  std::sort(parts.begin(), parts.end());
  CHECK(parts == std::vector<int>{1, 4, 5});
  CHECK(f.acc.stats().expired == 5);
  expired.clear();
  CHECK(f.acc.audit().clean());
  // The in-flight one expires when it comes back.
  f.acc.reenqueue(std::move(b6[0]), 0ms);
  CHECK(f.acc.ready().expiry_due);
  CHECK(f.acc.expire(expired) == 1);
  CHECK(expired[0].partition() == 6);
  auto s = f.acc.stats();
  CHECK(s.expired == 7);
  CHECK(s.pending == 0);
  CHECK(s.appended == s.delivered + s.failed + s.expired + s.taken + s.pending);
  CHECK(s.buffer_used == 0);
}

// ---- waiting ------------------------------------------------------------------------------------

TEST_CASE("ready_accumulator: wait_ready wakes on each kind of event, and not otherwise") {
  fixture f;
  std::atomic<int> returned{0};
  std::atomic<bool> quit{false};
  std::stop_source stop;
  std::thread sender([&] {
    while (!quit) {
      const auto s = f.acc.wait_ready(stop.get_token());
      ++returned;
      if (s != ready_status::ready) break;
      (void)f.acc.ready();  // consume, like a sender
    }
  });
  auto parked = [&] { return f.clock.wait_for_waiters_for(1, 10s); };
  auto expect_wake = [&](const char* what, auto&& event) {
    INFO(what);
    REQUIRE(parked());
    const int before = returned.load();
    event();
    for (int i = 0; i < 10000 && returned.load() == before; ++i) std::this_thread::sleep_for(100us);
    CHECK(returned.load() > before);
  };
  auto expect_no_wake = [&](const char* what, auto&& event) {
    INFO(what);
    REQUIRE(parked());
    const int before = returned.load();
    event();
    REQUIRE(parked());  // back asleep (or never woke)
    std::this_thread::sleep_for(5ms);
    CHECK(returned.load() == before);
  };
  // The first append to an idle accumulator wakes the sender only to arm the linger deadline; it
  // goes back to sleep without returning.
  expect_no_wake("first append (arms the linger deadline)", [&] { REQUIRE(f.acc.append(1, 1, 10) == append_status::ok); });
  expect_no_wake("an append to an open batch", [&] { REQUIRE(f.acc.append(1, 2, 10) == append_status::ok); });
  expect_no_wake("time short of the linger", [&] { f.clock.advance(5ms); });
  expect_wake("linger expiry", [&] { f.clock.advance(5ms); });
  {
    std::vector<handle> b;
    f.acc.drain(1, 1000, b);
    REQUIRE(b.size() == 1);
    f.complete(b);
  }
  expect_no_wake("idle time passing", [&] { f.clock.advance(1h); });
  expect_wake("a seal", [&] { f.seal_one(7); });
  {
    std::vector<handle> b;
    f.acc.drain(1, 1000, b);
    REQUIRE(b.size() == 1);
    f.complete(b);
  }
  auto token = f.acc.mute(4);
  expect_no_wake("a muted partition's seal", [&] { f.seal_one(4); });
  expect_wake("an unmute", [&] { token.release(); });
  {
    std::vector<handle> b;
    f.acc.drain(1, 1000, b);
    REQUIRE(b.size() == 1);
    expect_no_wake("a reenqueue with backoff (re-arms the deadline)", [&] { f.acc.reenqueue(std::move(b[0]), 100ms); });
    expect_no_wake("time short of the backoff", [&] { f.clock.advance(50ms); });
    expect_wake("backoff expiry", [&] { f.clock.advance(50ms); });
    b.clear();
    f.acc.drain(1, 1000, b);
    f.complete(b);
    b.clear();
    f.acc.drain(1, 1000, b);
    f.complete(b);
  }
  expect_wake("flush", [&] {
    f.acc.flush();
  });
  expect_wake("wake()", [&] { f.acc.wake(); });
  expect_wake("stop token", [&] { stop.request_stop(); });
  sender.join();
  quit = true;
}

TEST_CASE("ready_accumulator: wait_ready returns closed once closed and empty; close wakes it") {
  fixture f;
  auto fut = std::async(std::launch::async, [&] {
    while (f.acc.wait_ready() == ready_status::ready) (void)f.acc.ready();
    return true;
  });
  REQUIRE(f.clock.wait_for_waiters_for(1, 10s));
  f.acc.close();
  CHECK(fut.get());
  CHECK(f.acc.wait_ready() == ready_status::closed);
}

TEST_CASE("ready_accumulator: an idle waiting sender uses (almost) no CPU") {
  // Real clock: the point is that the sender parks with no timeout and no polling.
  sluice::ready_accumulator<int, int, int> acc(small(), [](int) { return std::optional(0); });
  std::chrono::microseconds cpu{};
  std::thread sender([&] {
    const auto start = sluice_test::thread_cpu_time();
    CHECK(acc.wait_ready_for(500ms) == ready_status::timeout);
    cpu = sluice_test::thread_cpu_time() - start;
  });
  sender.join();
  INFO("sender CPU over 500 ms: " << cpu.count() << " us");
  CHECK(cpu < 5ms);  // the acceptance bar is 10 ms per second
}

// ---- accounting ---------------------------------------------------------------------------------

TEST_CASE("ready_accumulator: has_pending_work, close and take_pending leave nothing behind") {
  fixture f;
  CHECK_FALSE(f.acc.has_pending_work());
  REQUIRE(f.acc.append(1, 1, 10) == append_status::ok);  // open
  CHECK(f.acc.has_pending_work());
  f.seal_one(4);
  f.seal_one(5);
  (void)f.dests();
  auto b5 = f.drain(2);
  f.acc.reenqueue(std::move(b5[0]), 1h);  // in backoff
  f.seal_one(6);
  auto in_flight = f.drain(1);  // partition 4 in flight
  REQUIRE(in_flight.size() == 1);
  f.acc.close();
  std::vector<handle> rest;
  CHECK(f.acc.take_pending(rest) == 3);  // open(1) sealed by close, backoff(5), sealed(6)
  CHECK_FALSE(f.acc.has_pending_work());
  auto s = f.acc.stats();
  CHECK(s.taken == 5);
  CHECK(s.in_flight == 2);
  CHECK(s.appended == s.delivered + s.failed + s.expired + s.taken + s.pending);
  f.acc.fail(std::move(in_flight[0]));
  s = f.acc.stats();
  CHECK(s.failed == 2);
  CHECK(s.pending == 0);
  CHECK(s.appended == s.delivered + s.failed + s.expired + s.taken);
  rest.clear();
  CHECK(f.acc.stats().buffer_used == 0);
  CHECK(f.acc.audit().clean());
  (void)f.acc.ready();  // consumes close()'s wake-up
  CHECK(f.acc.wait_ready() == ready_status::closed);
}

TEST_CASE("ready_accumulator: a batch handle destroyed unsettled counts as failed") {
  fixture f;
  f.seal_one(4);
  (void)f.dests();
  {
    auto b = f.drain(1);
    REQUIRE(b.size() == 1);
  }
  auto s = f.acc.stats();
  CHECK(s.failed == 2);
  CHECK(s.pending == 0);
  CHECK(s.buffer_used == 0);
}

// r3-review F2 (reproducer /work/review/r3/throw_lookup.cpp): a destination_of that threw inside
// ready() took the partition off the notification queue and lost it (an orphan; wait_ready slept).
TEST_CASE("ready_accumulator: a throwing destination_of reads as unknown and loses nothing") {
  manual_clock clock;
  std::atomic<int> calls{0};
  sluice::ready_accumulator_options o;
  o.linger = 0ms;
  o.batch_records = 1;
  acc_t acc(
      o,
      [&](int) -> std::optional<int> {
        if (calls++ == 0) throw std::runtime_error("metadata lookup failed");
        return 0;
      },
      clock);
  REQUIRE(acc.append(1, 7, 4) == append_status::ok);  // seals at once: partition 1 notified
  auto r = acc.ready();                                // the lookup throws: unknown, not an exception
  CHECK(r.destinations.empty());
  REQUIRE(r.unknown.size() == 1);
  CHECK(r.unknown[0] == 1);
  CHECK(acc.audit().clean());
  acc.destinations_refreshed();  // the lookup works now
  CHECK(acc.wait_ready_for(0ms) == ready_status::ready);
  r = acc.ready();
  REQUIRE(r.destinations.size() == 1);
  std::vector<handle> out;
  CHECK(acc.drain(0, 1024, out) == 1);
  for (auto& b : out) acc.complete(std::move(b));
  CHECK(acc.stats().delivered == 1);
  CHECK(acc.audit().clean());
}

TEST_CASE("ready_accumulator: drain reports whether the destination has more ready partitions") {
  fixture f;
  for (int p : {1, 4, 7, 10}) f.seal_one(p);  // four partitions of destination 1, 100 bytes each
  CHECK(f.dests() == std::vector<int>{1});
  std::vector<handle> out;
  bool more = false;
  CHECK(f.acc.drain(1, 250, out, true, more) == 2);  // the size limit stops it: two are left
  CHECK(more);
  CHECK(f.acc.drain(1, 250, out, true, more) == 2);
  CHECK_FALSE(more);  // nothing left: a sender need not call again
  CHECK(f.acc.drain(1, 250, out, true, more) == 0);
  CHECK_FALSE(more);
  CHECK(f.acc.drain(2, 250, out, true, more) == 0);  // a destination never seen
  CHECK_FALSE(more);
  f.complete(out);
  CHECK(f.acc.audit().clean());
}
