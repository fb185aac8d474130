// Tests for sluice::channel: each operation's semantics and status, close and cancellation of
// blocked calls, the full modes and their accounting, move-only values surviving failed sends,
// batching, iteration, and idle CPU use. The seeded multi-threaded stress is in
// stress/channel_stress.cpp.
#include <sluice/channel.hpp>

#include "test_support.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <fstream>
#include <iterator>
#include <memory>
#include <mutex>
#include <numeric>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <sys/syscall.h>
#include <unistd.h>

using namespace std::chrono_literals;
using sluice::channel;
using sluice::channel_full_mode;
using sluice::channel_options;
using sluice::channel_status;

namespace {

using box = std::unique_ptr<int>;

box make_box(int v) { return std::make_unique<int>(v); }

// Thread ids, so a test can see (from /proc) that a thread is really parked in the kernel before it
// acts. Parking is not required for the assertions to hold; it makes the test exercise the wake-up.
pid_t current_tid() { return static_cast<pid_t>(::syscall(SYS_gettid)); }

bool is_sleeping(pid_t tid) {
  std::ifstream stat("/proc/self/task/" + std::to_string(tid) + "/stat");
  std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
  const auto paren = text.rfind(')');
  return paren != std::string::npos && paren + 2 < text.size() && text[paren + 2] == 'S';
}

// Waits (yielding, no deadline) until the thread whose id lands in `tid` is asleep in the kernel.
void await_parked(const std::atomic<pid_t>& tid) {
  while (tid.load() == 0) std::this_thread::yield();
  while (!is_sleeping(tid.load())) std::this_thread::yield();
}

// 200 bytes: too big to share a cache line with its stamp, so stored apart from it.
struct big {
  static inline std::atomic<int> live{0};
  std::array<std::uint64_t, 25> words{};
  explicit big(std::uint64_t v) { words.fill(v); ++live; }
  big(big&& other) noexcept : words(other.words) { ++live; }
  ~big() { --live; }
};

// Counts live instances, to check that nothing is leaked or destroyed twice.
struct tracked {
  static inline std::atomic<int> live{0};
  int value = 0;
  explicit tracked(int v) : value(v) { ++live; }
  tracked(tracked&& other) noexcept : value(other.value) { ++live; }
  tracked& operator=(tracked&&) noexcept = default;
  ~tracked() { --live; }
};

}  // namespace

static_assert(std::input_iterator<channel<int>::iterator>);

TEST_CASE("channel: capacity 0 is rejected with the parameter and value") {
  try {
    channel<int> ch(0);
    FAIL("no exception");
  } catch (const std::invalid_argument& e) {
    CHECK(std::string(e.what()) == "sluice::channel: capacity must be >= 1, got 0");
  }
  try {
    channel<int> ch(channel_options<int>{});  // capacity left at its default 0
    FAIL("no exception");
  } catch (const std::invalid_argument& e) {
    CHECK(std::string(e.what()) == "sluice::channel: capacity must be >= 1, got 0");
  }
  CHECK_THROWS_AS(channel<int>(4, static_cast<channel_full_mode>(42)),
                  std::invalid_argument);
  CHECK_NOTHROW(channel<int>(1));
}

TEST_CASE("channel: holds exactly capacity items, for any capacity, in FIFO order") {
  for (std::size_t cap : {1u, 2u, 3u, 5u, 7u, 64u, 1000u}) {
    INFO("capacity " << cap);
    channel<int> ch(cap);
    CHECK(ch.capacity() == cap);
    CHECK(ch.empty());
    for (int round = 0; round < 3; ++round) {  // several laps around the ring
      for (std::size_t i = 0; i < cap; ++i) REQUIRE(ch.try_send(static_cast<int>(i)) == channel_status::ok);
      CHECK(ch.size() == cap);
      CHECK(ch.try_send(-1) == channel_status::full);
      for (std::size_t i = 0; i < cap; ++i) {
        auto v = ch.try_receive();
        REQUIRE(v);
        CHECK(*v == static_cast<int>(i));
      }
      CHECK_FALSE(ch.try_receive());
      CHECK(ch.size() == 0);
    }
    CHECK(ch.accepted() == 3 * cap);
    CHECK(ch.received() == 3 * cap);
    CHECK(ch.dropped() == 0);
  }
}

TEST_CASE("channel: a send that fails leaves a move-only value untouched") {
  channel<box> ch(1);
  REQUIRE(ch.try_send(make_box(1)) == channel_status::ok);

  box value = make_box(7);
  CHECK(ch.try_send(std::move(value)) == channel_status::full);
  REQUIRE(value);
  CHECK(*value == 7);
  CHECK(ch.try_send_for(std::move(value), 0ms) == channel_status::timeout);
  REQUIRE(value);
  CHECK(ch.try_send_until(std::move(value), std::chrono::steady_clock::now() - 1s) == channel_status::timeout);
  CHECK(ch.try_send_until(std::move(value), std::chrono::system_clock::now() - 1h) == channel_status::timeout);
  REQUIRE(value);

  std::stop_source stop;
  stop.request_stop();
  CHECK(ch.send(std::move(value), stop.get_token()) == channel_status::cancelled);
  REQUIRE(value);

  ch.close();
  CHECK(ch.send(std::move(value)) == channel_status::closed);
  CHECK(ch.try_send(std::move(value)) == channel_status::closed);
  REQUIRE(value);
  CHECK(*value == 7);

  // The accepted item is still received after the close.
  auto got = ch.receive();
  REQUIRE(got);
  CHECK(**got == 1);
  CHECK_FALSE(ch.receive());
  CHECK(ch.accepted() == 1);
}

TEST_CASE("channel: a successful send moves the value; lvalues are copied, never moved") {
  channel<std::string> ch(4);
  std::string s = "hello";
  CHECK(ch.send(s) == channel_status::ok);  // copies
  CHECK(s == "hello");
  CHECK(ch.send(std::move(s)) == channel_status::ok);
  CHECK(ch.try_send(std::string("x")) == channel_status::ok);
  const std::string c = "const";
  CHECK(ch.try_send_for(c, 1ms) == channel_status::ok);
  CHECK(*ch.receive() == "hello");
  CHECK(*ch.receive() == "hello");
  CHECK(*ch.receive() == "x");
  CHECK(*ch.receive() == "const");
}

TEST_CASE("channel: receive forms on an empty channel") {
  channel<int> ch(2);
  CHECK_FALSE(ch.try_receive());
  CHECK_FALSE(ch.try_receive_for(0ms));
  CHECK_FALSE(ch.try_receive_for(-5s));
  CHECK_FALSE(ch.try_receive_until(std::chrono::steady_clock::now() - 1s));
  CHECK_FALSE(ch.try_receive_until(std::chrono::system_clock::now()));
  std::stop_source stop;
  stop.request_stop();
  CHECK_FALSE(ch.receive(stop.get_token()));
  CHECK_FALSE(ch.is_drained());

  // An item that is there is returned even with a passed deadline or a stopped token.
  REQUIRE(ch.try_send(5) == channel_status::ok);
  CHECK(ch.try_receive_for(-1s) == 5);
  REQUIRE(ch.try_send(6) == channel_status::ok);
  CHECK(ch.receive(stop.get_token()) == 6);
  // Huge timeouts saturate instead of overflowing.
  REQUIRE(ch.try_send(7) == channel_status::ok);
  CHECK(ch.try_receive_for(std::chrono::hours::max()) == 7);
  REQUIRE(ch.try_send(8) == channel_status::ok);
  CHECK(ch.try_receive_until(std::chrono::system_clock::time_point::max()) == 8);
}

TEST_CASE("channel: close is idempotent, keeps accepted items, and ends receive when drained") {
  channel<int> ch(4);
  REQUIRE(ch.send(1) == channel_status::ok);
  REQUIRE(ch.send(2) == channel_status::ok);
  CHECK_FALSE(ch.is_closed());
  CHECK(ch.close());
  CHECK_FALSE(ch.close());
  CHECK(ch.is_closed());
  CHECK_FALSE(ch.is_drained());
  CHECK(ch.send(3) == channel_status::closed);
  CHECK(ch.receive() == 1);
  CHECK(ch.try_receive() == 2);
  CHECK(ch.is_drained());
  CHECK_FALSE(ch.receive());
  CHECK_FALSE(ch.try_receive_for(1h));  // closed and drained: returns at once
  std::vector<int> out;
  CHECK(ch.receive_batch(out, 8) == 0);
  CHECK(ch.accepted() == 2);
  CHECK(ch.received() == 2);
}

TEST_CASE("channel: close wakes blocked producers (closed) and the blocked consumer") {
  for (int producers : {1, 2, 4, 8}) {
    INFO("producers " << producers);
    channel<box> ch(2);
    REQUIRE(ch.send(make_box(0)) == channel_status::ok);
    REQUIRE(ch.send(make_box(1)) == channel_status::ok);
    std::vector<std::atomic<pid_t>> tids(static_cast<std::size_t>(producers));
    std::vector<channel_status> results(static_cast<std::size_t>(producers), channel_status::ok);
    std::vector<int> kept(static_cast<std::size_t>(producers), 0);
    {
      std::vector<std::jthread> threads;
      for (int p = 0; p < producers; ++p) {
        threads.emplace_back([&, p] {
          const auto i = static_cast<std::size_t>(p);
          box value = make_box(100 + p);
          tids[i] = current_tid();
          results[i] = ch.send(std::move(value));
          kept[i] = value ? *value : -1;
        });
      }
      for (auto& tid : tids) await_parked(tid);
      CHECK(ch.close());
    }
    for (int p = 0; p < producers; ++p) {
      CHECK(results[static_cast<std::size_t>(p)] == channel_status::closed);
      CHECK(kept[static_cast<std::size_t>(p)] == 100 + p);  // value given back intact
    }
    CHECK(**ch.receive() == 0);
    CHECK(**ch.receive() == 1);
    CHECK_FALSE(ch.receive());
  }

  channel<int> ch(4);
  std::atomic<pid_t> tid{0};
  std::optional<int> got = 42;
  std::jthread consumer([&] {
    tid = current_tid();
    got = ch.receive();
  });
  await_parked(tid);
  ch.close();
  consumer.join();
  CHECK_FALSE(got);
}

TEST_CASE("channel: a stop token cancels a blocked send and a blocked receive") {
  channel<box> ch(1);
  REQUIRE(ch.send(make_box(1)) == channel_status::ok);
  std::stop_source stop;
  std::atomic<pid_t> tid{0};
  channel_status status = channel_status::ok;
  int kept = 0;
  std::jthread producer([&] {
    box value = make_box(9);
    tid = current_tid();
    status = ch.send(std::move(value), stop.get_token());
    kept = value ? *value : -1;
  });
  await_parked(tid);
  stop.request_stop();
  producer.join();
  CHECK(status == channel_status::cancelled);
  CHECK(kept == 9);
  CHECK(ch.size() == 1);

  CHECK(**ch.receive() == 1);
  std::stop_source stop2;
  std::atomic<pid_t> tid2{0};
  bool got = true;
  std::jthread consumer([&] {
    tid2 = current_tid();
    got = ch.receive(stop2.get_token()).has_value();
  });
  await_parked(tid2);
  stop2.request_stop();
  consumer.join();
  CHECK_FALSE(got);
  CHECK_FALSE(ch.is_closed());
  // The channel still works afterwards.
  CHECK(ch.try_send(make_box(3)) == channel_status::ok);
  CHECK(**ch.try_receive() == 3);
}

TEST_CASE("channel: a blocked send completes once the consumer makes room") {
  for (std::size_t cap : {1u, 4u, 8u}) {
    channel<int> ch(cap);
    for (std::size_t i = 0; i < cap; ++i) REQUIRE(ch.send(static_cast<int>(i)) == channel_status::ok);
    std::atomic<pid_t> tid{0};
    channel_status status = channel_status::closed;
    std::jthread producer([&] {
      tid = current_tid();
      status = ch.send(-1);
    });
    await_parked(tid);
    // Drain everything: the parked producer is woken at a quarter drained or when we run dry.
    std::vector<int> got;
    while (got.size() < cap + 1) got.push_back(*ch.receive());
    producer.join();
    CHECK(status == channel_status::ok);
    CHECK(got.back() == -1);
  }
}

TEST_CASE("channel: full_mode reject returns full and keeps the value") {
  channel<box> ch(2, channel_full_mode::reject);
  CHECK(ch.full_mode() == channel_full_mode::reject);
  REQUIRE(ch.send(make_box(1)) == channel_status::ok);
  REQUIRE(ch.send(make_box(2)) == channel_status::ok);
  box value = make_box(3);
  CHECK(ch.send(std::move(value)) == channel_status::full);  // never blocks in this mode
  CHECK(ch.try_send_for(std::move(value), 1h) == channel_status::full);
  REQUIRE(value);
  CHECK(ch.dropped() == 0);
  CHECK(ch.accepted() == 2);
}

TEST_CASE("channel: full_mode drop_write hands the item being sent to the drop callback") {
  std::vector<int> dropped;
  channel<box> ch({.capacity = 2,
                   .full_mode = channel_full_mode::drop_write,
                   .on_drop = [&](box&& b) { dropped.push_back(*b); }});
  REQUIRE(ch.send(make_box(1)) == channel_status::ok);
  REQUIRE(ch.send(make_box(2)) == channel_status::ok);
  box value = make_box(3);
  CHECK(ch.send(std::move(value)) == channel_status::dropped);
  CHECK_FALSE(value);  // consumed: it went to the callback
  CHECK(ch.try_send(make_box(4)) == channel_status::dropped);
  CHECK(dropped == std::vector<int>{3, 4});
  CHECK(ch.dropped() == 2);
  CHECK(ch.accepted() == 4);
  CHECK(**ch.receive() == 1);
  CHECK(**ch.receive() == 2);
  CHECK(ch.received() == 2);
  CHECK(ch.accepted() == ch.received() + ch.dropped() + ch.size());
}

TEST_CASE("channel: full_mode drop_oldest evicts the oldest item to the drop callback") {
  std::vector<int> dropped;
  channel<box> ch({.capacity = 3,
                   .full_mode = channel_full_mode::drop_oldest,
                   .on_drop = [&](box&& b) { dropped.push_back(*b); }});
  for (int i = 0; i < 10; ++i) REQUIRE(ch.send(make_box(i)) == channel_status::ok);
  CHECK(dropped == std::vector<int>{0, 1, 2, 3, 4, 5, 6});
  CHECK(ch.size() == 3);
  CHECK(**ch.receive() == 7);
  CHECK(**ch.receive() == 8);
  CHECK(ch.try_send(make_box(10)) == channel_status::ok);
  CHECK(ch.try_send(make_box(11)) == channel_status::ok);
  CHECK(ch.try_send(make_box(12)) == channel_status::ok);  // evicts 9
  std::vector<box> rest;
  CHECK(ch.try_receive_batch(rest, 10) == 3);
  CHECK(*rest[0] == 10);
  CHECK(*rest[2] == 12);
  CHECK(dropped.back() == 9);
  CHECK(ch.dropped() == 8);
  CHECK(ch.received() == 5);
  CHECK(ch.accepted() == 13);
  CHECK(ch.accepted() == ch.received() + ch.dropped() + ch.size());
}

TEST_CASE("channel: dropped items are counted even without a callback") {
  for (auto mode : {channel_full_mode::drop_oldest, channel_full_mode::drop_write}) {
    tracked::live = 0;
    {
      channel<tracked> ch(2, mode);
      for (int i = 0; i < 5; ++i) REQUIRE(ch.send(tracked(i)) != channel_status::full);
      CHECK(ch.dropped() == 3);
      CHECK(ch.size() == 2);
      CHECK(tracked::live == 2);  // dropped ones were destroyed, queued ones are alive
    }
    CHECK(tracked::live == 0);  // the destructor destroys what is still queued
  }
}

TEST_CASE("channel: a throwing drop callback is counted and never breaks the channel") {
  for (auto mode : {channel_full_mode::drop_oldest, channel_full_mode::drop_write}) {
    int calls = 0;
    channel<int> ch({.capacity = 1, .full_mode = mode, .on_drop = [&](int&&) {
                       ++calls;
                       throw std::runtime_error("sink down");
                     }});
    CHECK(ch.send(1) == channel_status::ok);
    CHECK_NOTHROW((void)ch.send(2));
    CHECK_NOTHROW((void)ch.send(3));
    CHECK(calls == 2);
    CHECK(ch.dropped() == 2);
    CHECK(ch.drop_callback_errors() == 2);
    CHECK(ch.size() == 1);
    CHECK(ch.receive() == (mode == channel_full_mode::drop_oldest ? 3 : 1));
    CHECK(ch.accepted() == ch.received() + ch.dropped() + ch.size());
  }
}

TEST_CASE("channel: receive_batch appends up to max and returns 0 only when closed and drained") {
  channel<int> ch(8);
  for (int i = 0; i < 5; ++i) REQUIRE(ch.send(int{i}) == channel_status::ok);
  std::vector<int> out{-1};
  CHECK(ch.receive_batch(out, 3) == 3);
  CHECK(out == std::vector<int>{-1, 0, 1, 2});
  CHECK(ch.receive_batch(out, 0) == 0);
  CHECK(ch.try_receive_batch(out, 100) == 2);
  CHECK(out == std::vector<int>{-1, 0, 1, 2, 3, 4});
  CHECK(ch.try_receive_batch(out, 100) == 0);
  CHECK(ch.try_receive_batch_for(out, 100, 0ms) == 0);
  CHECK(ch.try_receive_batch_until(out, 100, std::chrono::steady_clock::now()) == 0);
  std::stop_source stop;
  stop.request_stop();
  CHECK(ch.receive_batch(out, 100, stop.get_token()) == 0);
  REQUIRE(ch.send(9) == channel_status::ok);
  CHECK(ch.try_receive_batch_for(out, 100, -1s) == 1);
  ch.close();
  CHECK(ch.receive_batch(out, 100) == 0);
  CHECK(out.size() == 7);
}

TEST_CASE("channel: receive_batch wakes for the first item and takes what is there") {
  channel<int> ch(64);
  std::atomic<pid_t> tid{0};
  std::vector<int> out;
  std::size_t n = 0;
  std::jthread consumer([&] {
    tid = current_tid();
    n = ch.receive_batch(out, 64);
  });
  await_parked(tid);
  std::vector<int> items{1, 2, 3};
  CHECK(ch.send_batch(items) == 3);
  consumer.join();
  CHECK(n >= 1);
  CHECK(n == out.size());
  CHECK(ch.try_receive_batch(out, 64) == 3 - n);
  CHECK(out == std::vector<int>{1, 2, 3});
}

TEST_CASE("channel: send_batch moves out only what it sent") {
  channel<box> ch(3);
  std::vector<box> items;
  for (int i = 0; i < 5; ++i) items.push_back(make_box(i));
  CHECK(ch.try_send_batch(items) == 3);
  CHECK_FALSE(items[0]);
  CHECK_FALSE(items[2]);
  REQUIRE(items[3]);
  CHECK(*items[3] == 3);
  CHECK(*items[4] == 4);
  CHECK(ch.try_send_batch_for(std::span(items).subspan(3), 0ms) == 0);
  CHECK(ch.try_send_batch_until(std::span(items).subspan(3), std::chrono::steady_clock::now()) == 0);
  std::stop_source stop;
  stop.request_stop();
  CHECK(ch.send_batch(std::span(items).subspan(3), stop.get_token()) == 0);
  REQUIRE(items[3]);

  // A blocking send_batch completes as the consumer drains.
  std::vector<int> got;
  std::jthread consumer([&] {
    for (int i = 0; i < 5; ++i) got.push_back(**ch.receive());
  });
  CHECK(ch.send_batch(std::span(items).subspan(3)) == 2);
  consumer.join();
  CHECK(got == std::vector<int>{0, 1, 2, 3, 4});

  // Closed: nothing is taken.
  std::vector<box> more;
  more.push_back(make_box(5));
  ch.close();
  CHECK(ch.send_batch(more) == 0);
  CHECK(more[0]);
}

TEST_CASE("channel: send_batch in the drop and reject modes") {
  std::vector<int> dropped;
  auto on_drop = [&](int&& v) { dropped.push_back(v); };
  std::vector<int> items{0, 1, 2, 3, 4};
  {
    channel<int> ch(2, channel_full_mode::reject);
    CHECK(ch.send_batch(items) == 2);
  }
  {
    channel<int> ch({.capacity = 2, .full_mode = channel_full_mode::drop_write, .on_drop = on_drop});
    CHECK(ch.send_batch(items) == 5);
    CHECK(dropped == std::vector<int>{2, 3, 4});
    CHECK(ch.receive() == 0);
  }
  dropped.clear();
  {
    channel<int> ch({.capacity = 2, .full_mode = channel_full_mode::drop_oldest, .on_drop = on_drop});
    CHECK(ch.send_batch(items) == 5);
    CHECK(dropped == std::vector<int>{0, 1, 2});
    CHECK(ch.receive() == 3);
    CHECK(ch.receive() == 4);
  }
}

TEST_CASE("channel: range-for receives everything and ends when closed and drained") {
  for (int producers : {1, 2, 4, 8}) {
    INFO("producers " << producers);
    channel<int> ch(16);
    constexpr int per = 1000;
    std::vector<int> last(static_cast<std::size_t>(producers), -1);
    bool ordered = true;
    std::size_t count = 0;
    {
      std::vector<std::jthread> threads;
      for (int p = 0; p < producers; ++p) {
        threads.emplace_back([&ch, p] {
          for (int i = 0; i < per; ++i) (void)ch.send(p * per + i);
        });
      }
      std::jthread closer([&] {
        for (auto& t : threads) t.join();
        ch.close();
      });
      for (int& v : ch) {
        auto& l = last[static_cast<std::size_t>(v / per)];
        ordered = ordered && v % per > l;
        l = v % per;
        ++count;
      }
    }
    CHECK(ordered);
    CHECK(count == static_cast<std::size_t>(producers * per));
    CHECK(ch.is_drained());
  }
  // Works with iterator algorithms too (an input range: single pass).
  channel<int> ch(8);
  for (int i = 1; i <= 4; ++i) REQUIRE(ch.send(int{i}) == channel_status::ok);
  ch.close();
  int sum = 0;
  for (auto it = ch.begin(); it != ch.end(); ++it) sum += *it;
  CHECK(sum == 10);
}

TEST_CASE("channel: a million distinct items pass through and the channel returns to empty") {
  for (int producers : {1, 2, 4, 8}) {
    INFO("producers " << producers);
    const std::size_t per = sluice_test::scaled(1'000'000) / static_cast<std::size_t>(producers);
    channel<std::uint64_t> ch(64);
    std::uint64_t sum = 0;
    std::size_t count = 0;
    {
      std::vector<std::jthread> threads;
      for (int p = 0; p < producers; ++p) {
        threads.emplace_back([&ch, p, per] {
          for (std::size_t i = 0; i < per; ++i) (void)ch.send(static_cast<std::uint64_t>(p) * per + i);
        });
      }
      std::vector<std::uint64_t> batch;
      while (count < per * static_cast<std::size_t>(producers)) {
        batch.clear();
        count += ch.receive_batch(batch, 32);
        for (auto v : batch) sum += v;
      }
    }
    const std::uint64_t n = per * static_cast<std::size_t>(producers);
    CHECK(sum == n * (n - 1) / 2);  // each distinct value exactly once
    CHECK(ch.size() == 0);
    CHECK(ch.empty());
    CHECK(ch.accepted() == n);
    CHECK(ch.received() == n);
  }
}

TEST_CASE("channel: the destructor destroys queued items exactly once") {
  tracked::live = 0;
  {
    channel<tracked> ch(8);
    for (int round = 0; round < 3; ++round) {
      for (int i = 0; i < 4; ++i) REQUIRE(ch.send(tracked(i)) == channel_status::ok);
      CHECK(ch.receive()->value == (2 * round) % 4);  // FIFO across rounds: 0 1 | 2 3 | 0 1
      CHECK(ch.receive()->value == (2 * round + 1) % 4);
    }
    CHECK(tracked::live == 6);
  }
  CHECK(tracked::live == 0);
}

TEST_CASE("channel: large items (stored apart from their stamps) keep order and lifetime") {
  {
    channel<big> ch(5);
    std::uint64_t next_in = 0, next_out = 0;
    bool intact = true;
    for (int round = 0; round < 7; ++round) {  // several laps, partial fills
      while (ch.try_send(big(next_in)) == channel_status::ok) ++next_in;
      for (int i = 0; i < 3; ++i) {
        auto v = ch.try_receive();
        REQUIRE(v);
        intact = intact && v->words.front() == next_out && v->words.back() == next_out;
        ++next_out;
      }
    }
    CHECK(intact);
    CHECK(ch.size() == 2);
    CHECK(big::live == 2);
    std::vector<big> rest;
    CHECK(ch.try_receive_batch(rest, 10) == 2);
    CHECK(rest[1].words[7] == next_out + 1);
    REQUIRE(ch.try_send(big(99)) == channel_status::ok);
  }
  CHECK(big::live == 0);
}

TEST_CASE("channel: a consumer blocked in receive() for one second uses no CPU") {
  channel<int> ch(4);
  std::atomic<pid_t> tid{0};
  std::chrono::microseconds cpu{0};
  std::optional<int> got;
  std::jthread consumer([&] {
    tid = current_tid();
    const auto before = sluice_test::thread_cpu_time();
    got = ch.receive();
    cpu = sluice_test::thread_cpu_time() - before;
  });
  await_parked(tid);
  std::this_thread::sleep_for(1s);  // measuring idle CPU: real idle time has to pass
  REQUIRE(ch.send(5) == channel_status::ok);
  consumer.join();
  CHECK(got == 5);
  CHECK(cpu < 10ms);
}

TEST_CASE("channel: a producer blocked on a full channel uses no CPU") {
  channel<int> ch(1);
  REQUIRE(ch.send(1) == channel_status::ok);
  std::atomic<pid_t> tid{0};
  std::chrono::microseconds cpu{0};
  std::jthread producer([&] {
    tid = current_tid();
    const auto before = sluice_test::thread_cpu_time();
    (void)ch.send(2);
    cpu = sluice_test::thread_cpu_time() - before;
  });
  await_parked(tid);
  std::this_thread::sleep_for(200ms);  // measuring idle CPU
  CHECK(ch.receive() == 1);
  producer.join();
  CHECK(ch.receive() == 2);
  CHECK(cpu < 10ms);
}

TEST_CASE("channel: drop_oldest - a send that returns closed has evicted nothing") {
  // Found in review: a producer that saw the ring full, then evicted, then found the channel
  // closed returned closed *and* had thrown away an item accepted before the close. Eviction and
  // claim are now one step. Capacity 1, no consumer: after k successful sends, k - 1 were evicted
  // and the last one is still there to receive.
  const int rounds = static_cast<int>(sluice_test::scaled(2000));
  int bad_rounds = 0;
  for (int round = 0; round < rounds; ++round) {
    sluice::channel<int> ch(1, sluice::channel_full_mode::drop_oldest);
    std::atomic<bool> go{false};
    std::uint64_t ok_sends = 0;
    std::thread producer([&] {
      while (!go.load()) {
      }
      for (int i = 0;; ++i) {
        int v = i;
        if (ch.send(std::move(v)) != sluice::channel_status::ok) break;
        ++ok_sends;
      }
    });
    std::thread closer([&] {
      go = true;
      for (int spin = 0; spin < round % 64; ++spin) sluice::detail::cpu_relax();
      ch.close();
    });
    producer.join();
    closer.join();
    const bool consistent = ok_sends == 0 ? ch.dropped() == 0 && ch.size() == 0
                                          : ch.dropped() + 1 == ok_sends && ch.size() == 1;
    if (!consistent) ++bad_rounds;
  }
  CHECK(bad_rounds == 0);
}

TEST_CASE("channel: received() never wraps around while producers evict") {
  // Found in review: received() read head before the eviction count and could see an eviction in
  // the count but not in head, wrapping to ~1.8e19. No consumer here, so received() must stay 0.
  sluice::channel<int> ch(4, sluice::channel_full_mode::drop_oldest);
  std::atomic<bool> done{false};
  std::atomic<std::uint64_t> worst{0};
  std::thread reader([&] {
    while (!done.load()) {
      const auto r = ch.received();
      if (r > worst.load()) worst = r;
    }
  });
  const int sends = static_cast<int>(sluice_test::scaled(200000));
  for (int i = 0; i < sends; ++i) REQUIRE(ch.send(int{i}) == sluice::channel_status::ok);
  done = true;
  reader.join();
  CHECK(worst.load() == 0);
  CHECK(ch.accepted() == static_cast<std::uint64_t>(sends));
  CHECK(ch.dropped() + ch.size() == static_cast<std::uint64_t>(sends));
}

// Issue 12 point 8: the status forms of receive say why nothing came.
TEST_CASE("channel: receive status forms tell empty, timeout, cancelled and closed apart") {
  channel<box> ch(2);
  std::optional<box> out = make_box(-1);  // pre-filled: a failed receive leaves it untouched
  CHECK(ch.try_receive(out) == channel_status::empty);
  CHECK(ch.try_receive_for(out, 0ms) == channel_status::timeout);
  CHECK(ch.try_receive_for(out, 2ms) == channel_status::timeout);
  CHECK(ch.try_receive_until(out, std::chrono::steady_clock::now() - 1s) == channel_status::timeout);
  CHECK(ch.try_receive_until(out, std::chrono::system_clock::now()) == channel_status::timeout);
  std::stop_source stopped;
  stopped.request_stop();
  CHECK(ch.receive(out, stopped.get_token()) == channel_status::cancelled);
  REQUIRE(out);
  CHECK(**out == -1);

  // An item that is there is ok even with a passed deadline or a stopped token; it replaces `out`.
  REQUIRE(ch.try_send(make_box(1)) == channel_status::ok);
  CHECK(ch.try_receive_for(out, -1s) == channel_status::ok);
  CHECK(**out == 1);
  REQUIRE(ch.try_send(make_box(2)) == channel_status::ok);
  CHECK(ch.receive(out, stopped.get_token()) == channel_status::ok);
  CHECK(**out == 2);
  REQUIRE(ch.try_send(make_box(3)) == channel_status::ok);
  CHECK(ch.try_receive(out) == channel_status::ok);
  CHECK(**out == 3);
  REQUIRE(ch.try_send(make_box(4)) == channel_status::ok);
  CHECK(ch.receive(out) == channel_status::ok);
  CHECK(**out == 4);

  // Closed but not drained: items still come out with ok; then closed, from every form, at once.
  REQUIRE(ch.try_send(make_box(5)) == channel_status::ok);
  ch.close();
  CHECK(ch.try_receive_until(out, std::chrono::steady_clock::now() + 1h) == channel_status::ok);
  CHECK(**out == 5);
  CHECK(ch.try_receive(out) == channel_status::closed);
  CHECK(ch.try_receive_for(out, 1h) == channel_status::closed);
  CHECK(ch.try_receive_until(out, std::chrono::system_clock::time_point::max()) == channel_status::closed);
  CHECK(ch.receive(out) == channel_status::closed);
  std::stop_source live;
  CHECK(ch.receive(out, live.get_token()) == channel_status::closed);
  CHECK(ch.receive(out, stopped.get_token()) == channel_status::closed);  // closed wins: it is final
  CHECK(**out == 5);
}

TEST_CASE("channel: a blocked status receive reports cancelled, closed or ok as things happen") {
  channel<int> ch(4);
  std::stop_source stop;
  std::atomic<pid_t> tid{0};
  channel_status got = channel_status::ok;
  {
    std::jthread consumer([&] {
      std::optional<int> out;
      tid = current_tid();
      got = ch.receive(out, stop.get_token());
    });
    await_parked(tid);
    stop.request_stop();
  }
  CHECK(got == channel_status::cancelled);

  tid = 0;
  std::optional<int> value;
  {
    std::jthread consumer([&] {
      tid = current_tid();
      got = ch.try_receive_for(value, 1h);
    });
    await_parked(tid);
    REQUIRE(ch.send(7) == channel_status::ok);
  }
  CHECK(got == channel_status::ok);
  CHECK(value == 7);

  tid = 0;
  {
    std::jthread consumer([&] {
      tid = current_tid();
      got = ch.try_receive_for(value, 1h);
    });
    await_parked(tid);
    ch.close();
  }
  CHECK(got == channel_status::closed);
  CHECK(value == 7);
}

// Issue 12 point 7: drop_write is .NET's DropWrite (the item being written is dropped).
TEST_CASE("channel: drop_write keeps the queued items and drops the one being sent") {
  std::vector<int> dropped;
  channel<int> ch(2, channel_full_mode::drop_write, [&](int&& v) { dropped.push_back(v); });
  REQUIRE(ch.send(1) == channel_status::ok);
  REQUIRE(ch.send(2) == channel_status::ok);
  CHECK(ch.send(3) == channel_status::dropped);
  CHECK(ch.try_send(4) == channel_status::dropped);
  CHECK(ch.try_send_for(5, 1h) == channel_status::dropped);  // never waits
  CHECK(dropped == std::vector<int>{3, 4, 5});
  CHECK(ch.receive() == 1);
  CHECK(ch.receive() == 2);
  CHECK(ch.full_mode() == channel_full_mode::drop_write);
}

// One producer polls for space at a time and the others park; the consumer wakes a parked one when
// nobody takes the space, and in any case once per 16 laps of the ring, so a producer that keeps
// the channel full cannot starve a parked one. Here one producer sends without pause; the other
// must still get all its items through while the hog keeps sending.
TEST_CASE("channel: a producer that keeps the channel full does not starve another") {
  for (std::size_t cap : {1u, 8u, 64u}) {
    INFO("capacity " << cap);
    channel<int> ch(cap);
    std::atomic<bool> stop_hog{false};
    std::jthread hog([&] {
      while (!stop_hog.load() && ch.send(1) == channel_status::ok) {
      }
    });
    REQUIRE(sluice_test::eventually([&] { return ch.size() == ch.capacity(); }));
    constexpr int wanted = 100;
    std::jthread other([&] {
      for (int i = 0; i < wanted; ++i) {
        if (ch.send(2) != channel_status::ok) return;
      }
    });
    int got = 0;
    const auto give_up = std::chrono::steady_clock::now() + 20s;  // a watchdog, not a deadline
    while (got < wanted && std::chrono::steady_clock::now() < give_up) {
      if (auto v = ch.try_receive_for(10ms); v && *v == 2) ++got;
    }
    stop_hog = true;
    ch.close();  // whatever is still blocked returns closed
    hog.join();
    other.join();
    CHECK(got == wanted);
  }
}
