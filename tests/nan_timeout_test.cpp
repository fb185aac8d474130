// NaN, infinite, negative and huge timeouts through every component's try_*_for / try_*_until
// (issue 7, bug 2). Every path turns a timeout into a deadline with sluice::saturating_add, the
// library's one saturating helper: NaN counts as zero ("already expired": the call polls once and
// returns), -inf as "long ago", +inf as "as late as representable". Before the fix a NaN duration
// reached std::chrono::ceil (undefined behaviour, reported by -fsanitize=float-cast-overflow in the
// asan-ubsan preset) and became a deadline ~292 years in the past.
//
// A call that would wait forever must not: each blocking check runs on a helper thread that the
// main thread unblocks (close / release / notify) if it has not returned within a generous bound.
#include <sluice/channel.hpp>
#include <sluice/deadline.hpp>
#include <sluice/key_lock_table.hpp>
#include <sluice/limiter.hpp>
#include <sluice/ready_accumulator.hpp>
#include <sluice/requeue_queue.hpp>
#include <sluice/task_group.hpp>
#include <sluice/testing/manual_clock.hpp>
#include <sluice/write_behind.hpp>

#include "test_support.hpp"

#include <atomic>
#include <chrono>
#include <latch>
#include <limits>
#include <semaphore>
#include <span>
#include <string>
#include <thread>

using namespace std::chrono_literals;

namespace {
using dsec = std::chrono::duration<double>;
const dsec nan_s{std::numeric_limits<double>::quiet_NaN()};
const dsec inf_s{std::numeric_limits<double>::infinity()};
const dsec neg_inf_s{-std::numeric_limits<double>::infinity()};
const std::chrono::duration<float, std::milli> nan_ms_f{std::numeric_limits<float>::quiet_NaN()};
const std::chrono::duration<long double, std::micro> nan_us_l{std::numeric_limits<long double>::quiet_NaN()};

// A time point of a foreign clock whose count is NaN (try_*_until of any clock).
using nan_tp_type = std::chrono::time_point<std::chrono::system_clock, dsec>;
const nan_tp_type nan_tp{nan_s};

// The watchdog for calls that might block forever (test_support.hpp).
using sluice_test::returns_within;
}  // namespace

TEST_CASE("nan timeouts: saturating_add treats NaN as zero and saturates infinities") {
  using tp = std::chrono::steady_clock::time_point;
  const tp t0{5s};
  CHECK(sluice::saturating_add(t0, nan_s) == t0);
  CHECK(sluice::saturating_add(t0, nan_ms_f) == t0);
  CHECK(sluice::saturating_add(t0, nan_us_l) == t0);
  CHECK(sluice::saturating_add(t0, -nan_s) == t0);
  CHECK(sluice::saturating_add(t0, inf_s) == tp::max());
  CHECK(sluice::saturating_add(t0, neg_inf_s) == tp::min());
  CHECK(sluice::saturating_add(tp::max(), nan_s) == tp::max());
  CHECK(sluice::saturating_add(tp::min(), nan_s) == tp::min());
  CHECK(sluice::saturating_ceil<std::chrono::nanoseconds>(nan_s) == 0ns);
  CHECK(sluice::saturating_ceil<std::chrono::nanoseconds>(inf_s) == std::chrono::nanoseconds::max());
  CHECK(sluice::saturating_ceil<std::chrono::nanoseconds>(neg_inf_s) == std::chrono::nanoseconds::min());
  constexpr tp t1{7s};
  STATIC_REQUIRE(sluice::saturating_add(t1, dsec(std::numeric_limits<double>::quiet_NaN())) == t1);  // constexpr
}

TEST_CASE("nan timeouts: channel try_send_for / try_receive_for / batch forms poll once") {
  sluice::channel<int> ch(1);
  // Empty: receiving with a NaN timeout returns nothing at once (never waits forever).
  CHECK_FALSE(ch.try_receive_for(nan_s).has_value());
  CHECK_FALSE(ch.try_receive_for(nan_ms_f).has_value());
  CHECK_FALSE(ch.try_receive_for(neg_inf_s).has_value());
  CHECK_FALSE(ch.try_receive_until(nan_tp).has_value());
  std::vector<int> out;
  CHECK(ch.try_receive_batch_for(out, 4, nan_s) == 0);
  // Space available: a NaN timeout still sends.
  CHECK(ch.try_send_for(1, nan_s) == sluice::channel_status::ok);
  // Full: a NaN timeout times out at once, and leaves the value unmoved.
  CHECK(ch.try_send_for(2, nan_s) == sluice::channel_status::timeout);
  CHECK(ch.try_send_for(2, nan_us_l) == sluice::channel_status::timeout);
  CHECK(ch.try_send_until(2, nan_tp) == sluice::channel_status::timeout);
  int items[2] = {3, 4};
  CHECK(ch.try_send_batch_for(std::span<int>(items), nan_s) == 0);
  // An item is there: a NaN timeout receives it.
  CHECK(ch.try_receive_for(nan_s) == 1);
  // +inf on a ready channel does not wait either.
  CHECK(ch.try_send_for(5, inf_s) == sluice::channel_status::ok);
  CHECK(ch.try_receive_for(inf_s) == 5);
  // +inf on an empty channel waits (as late as representable) until close(): a huge value is not
  // mistaken for "already expired".
  std::atomic<bool> got{true};
  CHECK_FALSE(returns_within(
      2s, [&] { got = ch.try_receive_for(inf_s).has_value(); }, [&] { ch.close(); }));
  CHECK_FALSE(got);
}

TEST_CASE("nan timeouts: limiter try_acquire_for / wait_idle_for poll once") {
  sluice::limiter lim(1);
  {
    auto p = lim.try_acquire_for(nan_s);  // a free permit is taken even with a NaN timeout
    REQUIRE(p.has_value());
    CHECK_FALSE(lim.try_acquire_for(nan_s).has_value());
    CHECK_FALSE(lim.try_acquire_for(nan_ms_f).has_value());
    CHECK_FALSE(lim.try_acquire_for(neg_inf_s).has_value());
    CHECK_FALSE(lim.try_acquire_until(nan_tp).has_value());
    CHECK_FALSE(lim.wait_idle_for(nan_s));
    CHECK_FALSE(lim.wait_idle_until(nan_tp));
    // +inf waits for real: it returns only once the permit is released.
    std::optional<sluice::limiter::permit> released;
    released.swap(p);
    std::atomic<bool> idle{false};
    CHECK_FALSE(returns_within(
        1s, [&] { idle = lim.wait_idle_for(inf_s); }, [&] { released.reset(); }));
    CHECK(idle);
  }
  CHECK(lim.wait_idle_for(nan_s));  // idle now: true at once
}

TEST_CASE("nan timeouts: key_lock_table try_lock_for polls once") {
  sluice::key_lock_table<std::string> locks;
  auto held = locks.try_lock_for("a", nan_s);  // a free key is locked even with a NaN timeout
  REQUIRE(held.has_value());
  CHECK_FALSE(locks.try_lock_for("a", nan_s).has_value());
  CHECK_FALSE(locks.try_lock_for("a", nan_ms_f).has_value());
  CHECK_FALSE(locks.try_lock_for("a", neg_inf_s).has_value());
  CHECK_FALSE(locks.try_lock_until("a", nan_tp).has_value());
  CHECK(locks.try_lock_for("b", nan_s).has_value());
  held.reset();
  CHECK(locks.size() == 0);  // nothing left behind by the timed-out attempts
}

TEST_CASE("nan timeouts: task_group try_spawn_for / wait_for poll once") {
  sluice::task_group group(1);
  std::binary_semaphore release{0};
  std::atomic<int> ran{0};
  REQUIRE(group.try_spawn_for(nan_s, [&] {
    release.acquire();
    ++ran;
  }));
  bool spawned_untouched = false;
  CHECK_FALSE(group.try_spawn_for(nan_s, [&] { spawned_untouched = true; }));
  CHECK_FALSE(group.try_spawn_for(neg_inf_s, [&] { spawned_untouched = true; }));
  CHECK_FALSE(group.try_spawn_until(nan_tp, [&] { spawned_untouched = true; }));
  CHECK_FALSE(group.wait_for(nan_s));
  CHECK_FALSE(group.wait_until(nan_tp));
  release.release();
  CHECK(group.wait_for(inf_s));  // +inf: waits for the task, not "expired"
  CHECK(ran == 1);
  CHECK_FALSE(spawned_untouched);
}

TEST_CASE("nan timeouts: requeue_queue schedule and try_pop_for") {
  sluice::testing::manual_clock clock;
  sluice::requeue_queue<int, std::string, sluice::testing::manual_clock> q(clock);
  // A NaN delay is "due now" (it used to be clamped to the 100-year horizon).
  CHECK(q.schedule(1, "nan", nan_s) == sluice::schedule_status::added);
  CHECK(q.deadline_of(1) == clock.now());
  CHECK(q.schedule(2, "neg-inf", neg_inf_s) == sluice::schedule_status::added);
  CHECK(q.deadline_of(2) == clock.now());
  CHECK(q.schedule(3, "inf", inf_s) == sluice::schedule_status::added);
  CHECK(q.deadline_of(3) == clock.now() + decltype(q)::horizon);
  CHECK(q.schedule(4, "nan-f", nan_ms_f) == sluice::schedule_status::added);
  CHECK(q.deadline_of(4) == clock.now());
  // try_pop_for(NaN) takes what is due and otherwise returns at once (no advance() needed).
  CHECK(q.try_pop_for(nan_s)->key == 1);
  CHECK(q.try_pop_for(nan_s)->key == 2);
  CHECK(q.try_pop_for(nan_us_l)->key == 4);
  CHECK_FALSE(q.try_pop_for(nan_s).has_value());
  CHECK_FALSE(q.try_pop_for(neg_inf_s).has_value());
  CHECK(q.size() == 1);

  // The same with the real clock.
  sluice::requeue_queue<int, int> real;
  CHECK(real.schedule(1, 1, nan_s) == sluice::schedule_status::added);
  CHECK(real.try_pop_for(nan_s)->item == 1);
  CHECK_FALSE(real.try_pop_for(nan_s).has_value());
}

// The components that landed after the five above go through the same helper; one check each, on a
// manual clock that is never advanced (so a NaN that meant "wait" could only end by unblocking).
TEST_CASE("nan timeouts: write_behind try_enqueue_for / flush_for poll once") {
  sluice::testing::manual_clock clock;
  std::latch open{1};
  std::atomic<bool> in_sink{false};
  sluice::write_behind<int, void, sluice::testing::manual_clock> wb(
      {.capacity = 1, .max_batch = 1, .linger = 0ns},
      [&](std::span<const int>, sluice::write_behind_results&) {
        in_sink = true;
        open.wait();
      },
      clock);
  CHECK(wb.flush_for(nan_s));  // nothing pending: done at once
  REQUIRE(wb.try_enqueue_for(1, nan_s) == sluice::write_behind_status::ok);  // room: accepted
  REQUIRE(sluice_test::eventually([&] { return in_sink.load(); }, 10s));
  int next = 2;
  while (next < 100 && wb.try_enqueue(next) == sluice::write_behind_status::ok) ++next;  // fill the intake
  REQUIRE(next < 100);
  sluice::write_behind_status status = sluice::write_behind_status::ok;
  bool flushed = true;
  CHECK(returns_within(
      10s,
      [&] {
        status = wb.try_enqueue_for(next, nan_s);
        flushed = wb.flush_for(nan_s);
      },
      [&] { open.count_down(); }));
  CHECK(status == sluice::write_behind_status::timeout);
  CHECK_FALSE(flushed);
  open.count_down();  // let the sink finish; stop() in the destructor drains the rest
}

TEST_CASE("nan timeouts: ready_accumulator wait_ready_for polls once") {
  sluice::testing::manual_clock clock;
  sluice::ready_accumulator_options options;
  options.batch_bytes = 100;
  options.max_request_bytes = 1000;
  options.buffer_bytes = 100000;
  options.linger = 10ms;
  sluice::ready_accumulator<int, int, int, sluice::testing::manual_clock> acc(
      options, [](int) { return std::optional(0); }, clock);
  sluice::ready_status status = sluice::ready_status::ready;
  CHECK(returns_within(
      10s, [&] { status = acc.wait_ready_for(nan_s); }, [&] { acc.close(); }));
  CHECK(status == sluice::ready_status::timeout);
  CHECK(returns_within(
      10s, [&] { status = acc.wait_ready_for(neg_inf_s); }, [&] { acc.close(); }));
  CHECK(status == sluice::ready_status::timeout);
}
