// Tests for sluice::dispatch_pipeline. Time is a manual_clock: backoff, linger and delivery
// timeouts are reached with advance(), never by sleeping.
#include <sluice/dispatch_pipeline.hpp>
#include <sluice/testing/manual_clock.hpp>

#include "test_support.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using sluice::delivery_report;
using sluice::failure_reason;
using sluice::persistence;
using sluice::send_result;
using sluice::testing::manual_clock;

namespace {

using pipe_t = sluice::dispatch_pipeline<int, int, int, manual_clock>;
using request = pipe_t::request;

struct reports {
  std::mutex m;
  std::map<int, std::vector<delivery_report>> by_record;  // record value -> its reports
  std::vector<int> delivered_order;
  void add(int v, const delivery_report& r) {
    std::lock_guard l(m);
    by_record[v].push_back(r);
    if (r) delivered_order.push_back(v);
  }
  std::size_t count() {
    std::lock_guard l(m);
    return by_record.size();
  }
  std::optional<delivery_report> of(int v) {
    std::lock_guard l(m);
    auto it = by_record.find(v);
    if (it == by_record.end() || it->second.empty()) return std::nullopt;
    return it->second.front();
  }
  bool exactly_once(int n) {
    std::lock_guard l(m);
    if (by_record.size() != static_cast<std::size_t>(n)) return false;
    for (auto& [v, rs] : by_record) {
      if (rs.size() != 1) return false;
    }
    return true;
  }
};

sluice::dispatch_pipeline_options opts() {
  sluice::dispatch_pipeline_options o;
  o.accumulator.batch_bytes = 40;  // 4-byte records: 10 per batch
  o.accumulator.linger = 5ms;
  o.accumulator.delivery_timeout = 10s;
  o.request_timeout = 1s;
  o.retry_backoff = {100ms, 1s, 2.0, sluice::jitter_mode::none, std::nullopt};
  return o;
}

// A sink that records requests and lets the test decide each one (or completes at once).
struct test_sink {
  std::mutex m;
  std::deque<request> held;
  std::function<std::optional<send_result>(request&)> decide;  // nullopt: hold
  std::atomic<int> calls{0};
  void operator()(request&& r) {
    ++calls;
    std::optional<send_result> d = decide ? decide(r) : std::optional<send_result>(send_result::ok);
    if (d) {
      r.complete(*d);
    } else {
      std::lock_guard l(m);
      held.push_back(std::move(r));
    }
  }
  std::size_t held_count() {
    std::lock_guard l(m);
    return held.size();
  }
  void complete_all(send_result s) {
    std::deque<request> mine;
    {
      std::lock_guard l(m);
      mine.swap(held);
    }
    for (auto& r : mine) r.complete(s);
  }
};

struct fixture {
  explicit fixture(sluice::dispatch_pipeline_options o = opts())
      : pipe(o, [](int p) { return std::optional<int>(p % 3); }, [this](request&& r) { sink(std::move(r)); },
             [](const int&) { return std::size_t{4}; }, [this](const int& v, const delivery_report& r) { rep.add(v, r); },
             clock) {}
  manual_clock clock;
  reports rep;
  test_sink sink;
  pipe_t pipe;

  // Advances time in steps until `done` holds. After each step it waits (in real time, bounded)
  // for the sender thread to park on the clock again, i.e. to have handled everything due.
  template <class Pred>
  bool run_until(Pred done, std::chrono::milliseconds step = 1ms, int max_steps = 20000) {
    for (int i = 0; i < max_steps; ++i) {
      (void)clock.wait_for_waiters_for(1, 200ms);
      if (done()) return true;
      clock.advance(step);
    }
    return done();
  }
};

}  // namespace

TEST_CASE("dispatch_pipeline: every record is delivered once, in order per partition") {
  fixture f;
  constexpr int n = 1000;
  for (int i = 0; i < n; ++i) REQUIRE(f.pipe.send(i % 7, int{i}) == pipe_t::send_status::ok);
  REQUIRE(f.run_until([&] { return f.rep.count() == n; }));
  CHECK(f.rep.exactly_once(n));
  std::map<int, int> last;
  bool ordered = true;
  for (int v : f.rep.delivered_order) {
    auto it = last.find(v % 7);
    if (it != last.end() && it->second > v) ordered = false;
    last[v % 7] = v;
  }
  CHECK(ordered);
  auto m = f.pipe.metrics();
  CHECK(m.accepted == n);
  CHECK(m.delivered == n);
  CHECK(m.pending == 0);
  CHECK(m.requests > 0);
  CHECK(m.queue_time.total() == n);
  CHECK(f.pipe.audit().clean());
}

TEST_CASE("dispatch_pipeline: retriable failures back off and then succeed") {
  fixture f;
  std::atomic<int> attempts{0};
  f.sink.decide = [&](request&) { return ++attempts <= 2 ? send_result::retriable : send_result::ok; };
  for (int i = 0; i < 10; ++i) REQUIRE(f.pipe.send(1, int{i}) == pipe_t::send_status::ok);  // one full batch
  REQUIRE(f.run_until([&] { return attempts.load() >= 1; }));
  // 100 ms then 200 ms of backoff: not before.
  f.clock.advance(99ms);
  std::this_thread::sleep_for(2ms);
  CHECK(attempts.load() == 1);
  REQUIRE(f.run_until([&] { return f.rep.count() == 10; }));
  CHECK(attempts.load() == 3);
  auto r = f.rep.of(0);
  REQUIRE(r);
  CHECK(bool(*r));
  CHECK(r->retries == 2);
  CHECK(r->persisted == persistence::persisted);
  CHECK(f.pipe.metrics().retried == 20);
}

TEST_CASE("dispatch_pipeline: a permanent error fails the batch, not persisted; others go on") {
  fixture f;
  f.sink.decide = [&](request& r) {
    return r.partition(0) == 1 ? send_result::permanent : send_result::ok;
  };
  for (int i = 0; i < 10; ++i) REQUIRE(f.pipe.send(1, int{i}) == pipe_t::send_status::ok);
  for (int i = 10; i < 20; ++i) REQUIRE(f.pipe.send(2, int{i}) == pipe_t::send_status::ok);
  REQUIRE(f.run_until([&] { return f.rep.count() == 20; }));
  CHECK(f.rep.exactly_once(20));
  CHECK(f.rep.of(0)->reason == failure_reason::permanent_error);
  CHECK(f.rep.of(0)->persisted == persistence::not_persisted);
  CHECK(bool(*f.rep.of(15)));
  auto m = f.pipe.metrics();
  CHECK(m.failed_by_reason[static_cast<std::size_t>(failure_reason::permanent_error)] == 10);
  CHECK(m.delivered == 10);
}

TEST_CASE("dispatch_pipeline: retries are bounded by max_retries") {
  auto o = opts();
  o.retry_backoff.max_retries = 2;
  fixture f(o);
  std::atomic<int> attempts{0};
  f.sink.decide = [&](request&) {
    ++attempts;
    return send_result::retriable;
  };
  for (int i = 0; i < 10; ++i) REQUIRE(f.pipe.send(1, int{i}) == pipe_t::send_status::ok);
  REQUIRE(f.run_until([&] { return attempts.load() >= 1; }));
  auto m0 = f.pipe.metrics();
  INFO("requests " << m0.requests << " retried " << m0.retried << " failed " << m0.failed << " in flight " << m0.in_flight);
  REQUIRE(f.run_until([&] { return f.rep.count() == 10; }, 10ms));
  CHECK(attempts.load() == 3);
  CHECK(f.rep.of(3)->reason == failure_reason::retries_exhausted);
  CHECK(f.rep.of(3)->retries == 3);
}

TEST_CASE("dispatch_pipeline: a request that never left does not consume a retry") {
  auto o = opts();
  o.retry_backoff.max_retries = 0;
  fixture f(o);
  std::atomic<int> attempts{0};
  f.sink.decide = [&](request&) { return ++attempts <= 3 ? send_result::not_sent : send_result::ok; };
  for (int i = 0; i < 10; ++i) REQUIRE(f.pipe.send(1, int{i}) == pipe_t::send_status::ok);
  REQUIRE(f.run_until([&] { return f.rep.count() == 10; }));
  CHECK(bool(*f.rep.of(0)));
  CHECK(f.rep.of(0)->retries == 0);
  CHECK(attempts.load() == 4);
}

TEST_CASE("dispatch_pipeline: gapless fails the rest of a partition after a failure for good") {
  auto o = opts();
  o.gapless = true;
  o.max_in_flight_per_destination = 1;
  fixture f(o);
  std::atomic<bool> first{true};
  f.sink.decide = [&](request& r) -> std::optional<send_result> {
    if (r.partition(0) == 1 && first.exchange(false)) return std::nullopt;  // hold the first batch
    return send_result::ok;
  };
  for (int i = 0; i < 30; ++i) REQUIRE(f.pipe.send(1, int{i}) == pipe_t::send_status::ok);  // 3 batches
  REQUIRE(f.run_until([&] { return f.sink.held_count() == 1; }));
  f.sink.complete_all(send_result::permanent);
  REQUIRE(f.run_until([&] { return f.rep.count() == 30; }));
  CHECK(f.rep.exactly_once(30));
  for (int i = 0; i < 30; ++i) CHECK(f.rep.of(i)->reason == failure_reason::permanent_error);
}

TEST_CASE("dispatch_pipeline: delivery timeout expires queued and backed-off batches, never in-flight ones") {
  auto o = opts();
  o.accumulator.linger = 1s;
  o.accumulator.delivery_timeout = 3s;
  o.request_timeout = 2s;
  o.max_in_flight_per_destination = 1;
  o.retry_backoff = {10s, 10s, 1.0, sluice::jitter_mode::none, std::nullopt};
  fixture f(o);
  f.sink.decide = [&](request& r) -> std::optional<send_result> {
    if (r.partition(0) == 1) return send_result::retriable;  // then sits in a 10 s backoff
    if (r.partition(0) == 2) return std::nullopt;            // in flight, answer never comes
    return send_result::ok;
  };
  for (int i = 0; i < 10; ++i) REQUIRE(f.pipe.send(1, int{i}) == pipe_t::send_status::ok);
  for (int i = 10; i < 20; ++i) REQUIRE(f.pipe.send(2, int{i}) == pipe_t::send_status::ok);
  REQUIRE(f.run_until([&] { return f.sink.held_count() == 1 && f.pipe.metrics().retried == 10; }));
  // Destination 2 is at its in-flight limit: partition 5's batch waits, queued in its ready list.
  for (int i = 30; i < 40; ++i) REQUIRE(f.pipe.send(5, int{i}) == pipe_t::send_status::ok);
  // (An unsealed batch cannot expire here: delivery_timeout >= linger + request_timeout is enforced.
  // The accumulator's own test covers open batches.) Record 100 lingers 1 s and is delivered.
  REQUIRE(f.pipe.send(3, 100) == pipe_t::send_status::ok);
  REQUIRE(f.run_until([&] { return f.rep.count() == 1; }, 100ms));  // record 100, after its 1 s linger
  REQUIRE(f.rep.of(100).has_value());
  CHECK(bool(*f.rep.of(100)));
  f.clock.advance(3s);
  REQUIRE(f.run_until([&] { return f.rep.count() == 31; }));
  CHECK(f.rep.of(0)->reason == failure_reason::delivery_timeout);   // was in backoff
  CHECK(f.rep.of(0)->persisted == persistence::not_persisted);
  CHECK(f.rep.of(35)->reason == failure_reason::delivery_timeout);  // was queued
  CHECK(f.rep.of(35)->retries == 0);
  // The in-flight one is not expired by delivery_timeout but abandoned at its request_timeout
  // (the answer never came): possibly persisted. The sink's late answer is a no-op.
  CHECK(f.rep.of(10)->reason == failure_reason::delivery_timeout);
  CHECK(f.rep.of(10)->persisted == persistence::possibly_persisted);
  f.sink.complete_all(send_result::timed_out);
  CHECK(f.rep.exactly_once(31));
  CHECK(f.pipe.metrics().expired == 30);
  CHECK(f.pipe.audit().clean());
}

TEST_CASE("dispatch_pipeline: a record larger than a batch goes out without waiting the linger") {
  auto o = opts();
  o.accumulator.linger = 1h;
  o.accumulator.delivery_timeout = 2h;
  fixture f(o);
  sluice::dispatch_pipeline<int, std::string, int, manual_clock> big(
      o, [](int) { return std::optional<int>(0); }, [](auto&& r) { r.complete(send_result::ok); },
      [](const std::string& s) { return s.size(); }, {}, f.clock);
  std::atomic<int> got{0};
  REQUIRE(big.send(1, std::string(500, 'x'), [&](const std::string&, const delivery_report& r) { got += bool(r); }) ==
          pipe_t::send_status::ok);
  for (int i = 0; i < 100000 && got.load() == 0; ++i) std::this_thread::sleep_for(100us);  // no clock advance
  CHECK(got.load() == 1);
  std::string huge(2 << 20, 'y');
  CHECK(big.send(1, std::move(huge)) == pipe_t::send_status::too_large);
  CHECK(huge.size() == (2u << 20));  // left with the caller
}

TEST_CASE("dispatch_pipeline: a leader move retries without waiting out the backoff") {
  fixture f;
  std::atomic<int> attempts{0};
  std::atomic<int> dest_override{-1};
  sluice::dispatch_pipeline<int, int, int, manual_clock> p(
      opts(),
      [&](int part) {
        const int d = dest_override.load();
        return std::optional<int>(d >= 0 ? d : part % 3);
      },
      [&](request&& r) {
        if (++attempts == 1) {
          dest_override = 2;  // the leader moved while the request failed
          r.complete(send_result::retriable);
        } else {
          r.complete(send_result::ok);
        }
      },
      [](const int&) { return std::size_t{4}; }, [&](const int& v, const delivery_report& r) { f.rep.add(v, r); },
      f.clock);
  for (int i = 0; i < 10; ++i) REQUIRE(p.send(1, int{i}) == pipe_t::send_status::ok);
  for (int i = 0; i < 10000 && f.rep.count() < 10; ++i) std::this_thread::sleep_for(100us);  // no clock advance
  CHECK(f.rep.count() == 10);
  CHECK(attempts.load() == 2);
}

TEST_CASE("dispatch_pipeline: stop with requests in flight reports the rest as shutdown, once") {
  fixture f;
  f.sink.decide = [](request&) { return std::nullopt; };  // hold everything
  for (int i = 0; i < 50; ++i) REQUIRE(f.pipe.send(i % 5, int{i}) == pipe_t::send_status::ok);
  f.clock.advance(10ms);  // linger: everything sealed and sent
  REQUIRE(f.run_until([&] { return f.sink.held_count() >= 3; }));
  std::thread stopper([&] { f.pipe.stop(); });
  std::this_thread::sleep_for(5ms);
  f.sink.complete_all(send_result::retriable);  // answers arrive during stop: not retried
  stopper.join();
  f.pipe.stop();  // idempotent
  CHECK(f.rep.exactly_once(50));
  auto m = f.pipe.metrics();
  CHECK(m.pending == 0);
  CHECK(m.failed_by_reason[static_cast<std::size_t>(failure_reason::shutdown)] == 50);
  CHECK(f.pipe.send(1, 1) == pipe_t::send_status::closed);
}

TEST_CASE("dispatch_pipeline: drain delivers everything accepted, then stops") {
  fixture f;
  for (int i = 0; i < 55; ++i) REQUIRE(f.pipe.send(i % 4, int{i}) == pipe_t::send_status::ok);
  std::atomic<bool> drained{false};
  std::thread t([&] { drained = f.pipe.drain(); });
  REQUIRE(f.run_until([&] { return drained.load(); }));
  t.join();
  CHECK(f.rep.exactly_once(55));
  CHECK(f.pipe.metrics().delivered == 55);
}

TEST_CASE("dispatch_pipeline: flush overrides linger and returns once everything is reported") {
  auto o = opts();
  o.accumulator.linger = 1h;
  o.accumulator.delivery_timeout = 2h;
  fixture f(o);
  for (int i = 0; i < 5; ++i) REQUIRE(f.pipe.send(i, int{i}) == pipe_t::send_status::ok);  // all open
  f.pipe.flush();  // no clock advance needed
  CHECK(f.rep.exactly_once(5));
  CHECK(f.pipe.flush_for(0ms));
}

TEST_CASE("dispatch_pipeline: options are validated") {
  auto bad = [](auto mutate, const std::string& text) {
    auto o = opts();
    mutate(o);
    try {
      pipe_t p(o, [](int) { return std::optional<int>(0); }, [](request&&) {}, [](const int&) { return std::size_t{4}; });
      FAIL("no exception");
    } catch (const std::invalid_argument& e) {
      CHECK(std::string(e.what()).find(text) != std::string::npos);
    }
  };
  bad([](auto& o) { o.max_in_flight_per_destination = 0; }, "max_in_flight_per_destination must be >= 1, got 0");
  bad([](auto& o) { o.sender_threads = 0; }, "sender_threads must be >= 1");
  bad([](auto& o) { o.accumulator.delivery_timeout = 500ms; }, "delivery_timeout must be >= linger + request_timeout");
  bad([](auto& o) { o.accumulator.batch_bytes = 0; }, "batch_bytes");
  bad([](auto& o) { o.retry_backoff.base = 0ms; }, "base must be > 0");
}

TEST_CASE("dispatch_pipeline: throwing callbacks and sinks are counted, never fatal") {
  fixture f;
  std::atomic<int> calls{0};
  f.sink.decide = [&](request&) -> std::optional<send_result> {
    if (++calls == 1) throw std::runtime_error("sink");
    return send_result::ok;
  };
  std::atomic<int> seen{0};
  for (int i = 0; i < 10; ++i) {
    REQUIRE(f.pipe.send(1, int{i}, [&](const int&, const delivery_report&) {
      ++seen;
      throw 42;
    }) == pipe_t::send_status::ok);
  }
  REQUIRE(f.run_until([&] { return f.pipe.metrics().callback_errors == 10; }));
  auto m = f.pipe.metrics();
  CHECK(m.sink_errors == 1);
  CHECK(m.callback_errors == 10);
  CHECK(m.delivered == 10);
}

TEST_CASE("dispatch_pipeline: a destination that keeps failing does not slow the others") {
  auto o = opts();
  o.max_in_flight_per_destination = 1;
  fixture f(o);
  std::atomic<int> failures{0};
  f.sink.decide = [&](request& r) -> std::optional<send_result> {
    if (r.destination() == 0) {
      ++failures;
      return send_result::retriable;  // destination 0 refuses everything
    }
    return send_result::ok;
  };
  for (int round = 0; round < 20; ++round) {
    for (int p = 0; p < 9; ++p) {
      for (int i = 0; i < 10; ++i) REQUIRE(f.pipe.send(p, round * 1000 + p * 10 + i) == pipe_t::send_status::ok);
    }
  }
  // Destinations 1 and 2 (partitions 1, 2, 4, 5, 7, 8) are delivered without any time passing.
  for (int i = 0; i < 20000 && f.pipe.metrics().delivered < 1200; ++i) std::this_thread::sleep_for(100us);
  const auto m = f.pipe.metrics();
  CHECK(m.delivered == 1200);
  CHECK(failures.load() >= 1);
  CHECK(m.pending == 600);  // destination 0's records wait in backoff, not in a sender thread
  f.pipe.stop();
  CHECK(f.rep.exactly_once(1800));
  CHECK(f.pipe.metrics().failed_by_reason[static_cast<std::size_t>(failure_reason::shutdown)] == 600);
}

// r3-review F1 (reproducer /work/review/r3/drain_hang.cpp): a request the sink keeps and never
// completes hung drain_for(), stop() and the destructor; request_timeout was only validated.
TEST_CASE("dispatch_pipeline: a request never answered is abandoned at request_timeout, reported once") {
  fixture f;  // request_timeout 1 s
  std::atomic<bool> hold{true};
  f.sink.decide = [&](request&) -> std::optional<send_result> {
    if (hold.load()) return std::nullopt;
    return send_result::ok;
  };
  for (int i = 0; i < 10; ++i) REQUIRE(f.pipe.send(1, int{i}) == pipe_t::send_status::ok);  // one sealed batch
  REQUIRE(f.run_until([&] { return f.sink.held_count() == 1; }));
  f.clock.advance(900ms);
  (void)f.clock.wait_for_waiters_for(1, 200ms);
  CHECK(f.rep.count() == 0);  // not before its request_timeout
  hold = false;
  REQUIRE(f.run_until([&] { return f.rep.count() == 10; }));
  CHECK(f.rep.of(0)->reason == failure_reason::delivery_timeout);
  CHECK(f.rep.of(0)->persisted == persistence::possibly_persisted);
  // The partition is free again: later records go out although the sink still holds the request.
  for (int i = 10; i < 20; ++i) REQUIRE(f.pipe.send(1, int{i}) == pipe_t::send_status::ok);
  REQUIRE(f.run_until([&] { return f.rep.count() == 20; }));
  CHECK(bool(*f.rep.of(15)));
  // The held request is still readable, and its late answer is a no-op.
  {
    std::lock_guard l(f.sink.m);
    REQUIRE(f.sink.held.size() == 1);
    CHECK(f.sink.held.front().record(0, 0) == 0);
  }
  f.sink.complete_all(send_result::ok);
  CHECK(f.rep.exactly_once(20));
  auto m = f.pipe.metrics();
  CHECK(m.pending == 0);
  CHECK(m.in_flight == 0);
  CHECK(m.delivered == 10);
  CHECK(f.pipe.audit().clean());
}

TEST_CASE("dispatch_pipeline: drain_for returns at its deadline with a request never answered; the request outlives the pipeline") {
  fixture f;  // request_timeout 1 s: the drain deadline (200 ms) comes first
  f.sink.decide = [](request&) { return std::nullopt; };  // a broker that never answers
  for (int i = 0; i < 10; ++i) REQUIRE(f.pipe.send(1, int{i}) == pipe_t::send_status::ok);
  REQUIRE(f.run_until([&] { return f.sink.held_count() == 1; }));
  std::atomic<int> drained{-1};
  std::thread drainer([&] { drained = f.pipe.drain_for(200ms) ? 1 : 0; });
  REQUIRE(f.clock.wait_for_waiters_for(2, 10s));  // the sender and the drainer: its deadline is set
  // To just past the drain deadline, and no further: far short of request_timeout (1 s), which
  // would otherwise answer the request (as delivery_timeout) before a slow drainer woke (seen
  // once under ASan: the loop ran on to 1 s while the drainer waited to be scheduled).
  for (int i = 0; i < 25; ++i) {
    (void)f.clock.wait_for_waiters_for(1, 1ms);
    f.clock.advance(10ms);
  }
  drainer.join();  // returns at its deadline with the clock stopped (it abandons what is in flight)
  CHECK(drained.load() == 0);
  CHECK(f.rep.exactly_once(10));
  CHECK(f.rep.of(3)->reason == failure_reason::shutdown);
  CHECK(f.rep.of(3)->persisted == persistence::possibly_persisted);
  CHECK(f.pipe.metrics().pending == 0);
  // f.sink (declared before the pipeline) destroys the held request after the pipeline: its batch
  // handles point into the accumulator, which the abandoned request keeps alive (ASan checks).
}

TEST_CASE("dispatch_pipeline: the destructor returns with a request never answered") {
  manual_clock clock;
  std::optional<request> held;
  std::atomic<bool> got{false};  // held is written by the sender thread before this is set
  std::atomic<int> reported{0};
  std::atomic<bool> done{false};
  {
    auto p = std::make_unique<pipe_t>(
        opts(), [](int) { return std::optional<int>(0); },
        [&](request&& r) {
          if (!got.load()) {
            held.emplace(std::move(r));
            got = true;
          }
        },
        [](const int&) { return std::size_t{4}; }, [&](const int&, const delivery_report&) { ++reported; }, clock);
    for (int i = 0; i < 10; ++i) REQUIRE(p->send(1, int{i}) == pipe_t::send_status::ok);
    for (int i = 0; i < 20000 && !got.load(); ++i) {
      (void)clock.wait_for_waiters_for(1, 1ms);
      clock.advance(1ms);
    }
    REQUIRE(got.load());
    std::thread destroyer([&] {
      p.reset();
      done = true;
    });
    for (int i = 0; i < 20000 && !done.load(); ++i) {
      (void)clock.wait_for_waiters_for(1, 1ms);
      clock.advance(10ms);
    }
    destroyer.join();
  }
  CHECK(reported.load() == 10);
  held->complete(send_result::ok);  // after the pipeline is gone: a no-op
  CHECK(reported.load() == 10);
}

// r3-review F3 (reproducer /work/review/r3/gapless_race.cpp): with two senders, a later batch of a
// partition was sent between the failed batch's release and the take of the rest.
TEST_CASE("dispatch_pipeline: gapless with two senders never delivers after a failure for good") {
  constexpr int parts = 64, per = 6;
  for (int iter = 0; iter < (sluice_test::under_sanitizer ? 6 : 20); ++iter) {
    manual_clock clock;
    sluice::dispatch_pipeline_options o = opts();
    o.accumulator.linger = 0ms;
    o.accumulator.batch_records = 1;
    o.sender_threads = 2;
    o.max_in_flight_per_destination = 1000;
    o.gapless = true;
    std::mutex m;
    std::vector<std::vector<int>> outcome(parts);  // per partition: seq delivered (+) / failed (-1-seq)
    std::atomic<bool> all_sent{false};
    pipe_t p(
        o, [](int part) { return std::optional<int>(part % 4); },
        [&](request&& r) {
          while (!all_sent.load()) std::this_thread::yield();
          for (std::size_t i = 0; i < r.size(); ++i) {
            if (r.record(i, 0) % per == 0) r.set_result(i, send_result::permanent);
          }
          r.complete(send_result::ok);
        },
        [](const int&) { return std::size_t{4}; }, {}, clock);
    for (int s = 0; s < per; ++s) {
      for (int part = 0; part < parts; ++part) {
        REQUIRE(p.send(part, part * per + s, [&, part, s](const int&, const delivery_report& d) {
          std::lock_guard l(m);
          outcome[part].push_back(d ? s : -1 - s);
        }) == pipe_t::send_status::ok);
      }
    }
    all_sent = true;
    p.flush();
    p.stop();
    int violations = 0;
    for (int part = 0; part < parts; ++part) {
      CHECK(outcome[part].size() == static_cast<std::size_t>(per));
      for (int x : outcome[part]) violations += x > 0;
    }
    CHECK(violations == 0);
  }
}

// r3-review F4 (reproducer /work/review/r3/notsent_spin.cpp): a sink that never takes a request
// (not_sent) made the sender retry at once, forever: a busy loop.
TEST_CASE("dispatch_pipeline: a sink that keeps declining (not_sent) backs off, no busy loop") {
  fixture f;  // retry_backoff base 100 ms
  std::atomic<bool> decline{true};
  f.sink.decide = [&](request&) { return decline.load() ? send_result::not_sent : send_result::ok; };
  for (int i = 0; i < 10; ++i) REQUIRE(f.pipe.send(1, int{i}) == pipe_t::send_status::ok);
  for (int i = 0; i < 10000 && f.sink.calls.load() == 0; ++i) std::this_thread::sleep_for(100us);
  std::this_thread::sleep_for(50ms);  // real time, the manual clock stands still
  CHECK(f.sink.calls.load() == 1);  // retried only after the base backoff
  decline = false;  // now it accepts
  REQUIRE(f.run_until([&] { return f.rep.count() == 10; }));
  CHECK(f.sink.calls.load() == 2);
  CHECK(f.rep.of(0)->retries == 0);  // not_sent consumed no retry
}

// r3-review F5 (reproducer /work/review/r3/stop_uaf.cpp): finish() touched the pipeline after the
// in-flight decrement, so a completion racing the destructor used freed memory (ASan).
TEST_CASE("dispatch_pipeline: completions racing the destructor touch nothing freed") {
  constexpr int dests = 8;
  for (int iter = 0; iter < (sluice_test::under_sanitizer ? 50 : 200); ++iter) {
    manual_clock clock;
    std::mutex m;
    std::vector<request> held;
    held.reserve(dests);
    auto o = opts();
    o.accumulator.linger = 0ms;
    o.accumulator.batch_records = 1;
    o.max_in_flight_per_destination = 1;  // the completion frees a full destination: wake()
    auto p = std::make_unique<pipe_t>(
        o, [](int part) { return std::optional<int>(part % dests); },
        [&](request&& r) {
          std::lock_guard l(m);
          held.push_back(std::move(r));
        },
        [](const int&) { return std::size_t{4}; }, pipe_t::delivery_callback{},
        clock);
    for (int part = 0; part < dests; ++part) REQUIRE(p->send(part, int{part}) == pipe_t::send_status::ok);
    bool all = false;
    for (int i = 0; i < 100000 && !all; ++i) {
      {
        std::lock_guard l(m);
        all = held.size() == dests;
      }
      if (!all) std::this_thread::yield();
    }
    REQUIRE(all);
    std::atomic<bool> go{false};
    std::vector<std::thread> completers;
    for (int i = 0; i < dests; ++i) {
      completers.emplace_back([&, i] {
        while (!go.load()) std::this_thread::yield();
        held[static_cast<std::size_t>(i)].complete(send_result::ok);
      });
    }
    std::thread stopper([&] {
      while (!go.load()) std::this_thread::yield();
      p.reset();
    });
    go = true;
    for (auto& t : completers) t.join();
    stopper.join();
  }
}

// r3-review F7: linger + request_timeout overflowed (UB) in validation.
TEST_CASE("dispatch_pipeline: huge request_timeout and linger are validated without overflow") {
  auto o = opts();
  o.request_timeout = std::chrono::nanoseconds::max();
  o.accumulator.linger = 1h;
  o.accumulator.delivery_timeout = 2h;
  CHECK_THROWS_AS(pipe_t(o, [](int) { return std::optional<int>(0); }, [](request&&) {}, [](const int&) { return std::size_t{4}; }),
                  std::invalid_argument);
}

TEST_CASE("dispatch_pipeline: every send form without a callback reports to on_delivery; with one, to it") {
  fixture f;
  std::stop_source stop;
  std::atomic<int> own{0};
  auto mine = [&](const int&, const delivery_report& r) { own += bool(r); };
  REQUIRE(f.pipe.send(1, 0) == pipe_t::send_status::ok);
  REQUIRE(f.pipe.send(1, 1, stop.get_token()) == pipe_t::send_status::ok);
  REQUIRE(f.pipe.try_send(1, 2) == pipe_t::send_status::ok);
  REQUIRE(f.pipe.try_send_for(1, 3, 1s) == pipe_t::send_status::ok);
  REQUIRE(f.pipe.try_send_until(1, 4, f.clock.now() + 1s) == pipe_t::send_status::ok);
  REQUIRE(f.pipe.send(2, 100, mine) == pipe_t::send_status::ok);
  REQUIRE(f.pipe.send(2, 101, mine, stop.get_token()) == pipe_t::send_status::ok);
  REQUIRE(f.pipe.try_send(2, 102, mine) == pipe_t::send_status::ok);
  REQUIRE(f.pipe.try_send_for(2, 103, mine, 1s) == pipe_t::send_status::ok);
  REQUIRE(f.pipe.try_send_until(2, 104, mine, f.clock.now() + 1s) == pipe_t::send_status::ok);
  REQUIRE(f.pipe.send(2, 105, sluice::dispatch_pipeline<int, int, int, manual_clock>::delivery_callback{}) ==
          pipe_t::send_status::ok);  // an empty callback: the pipeline-wide one
  REQUIRE(f.run_until([&] { return f.rep.count() == 6 && own.load() == 5; }));
  CHECK(f.rep.exactly_once(6));
  for (int v : {0, 1, 2, 3, 4, 105}) CHECK(f.rep.of(v).has_value());
  CHECK(own.load() == 5);
  CHECK(f.pipe.metrics().delivered == 11);
}

TEST_CASE("dispatch_pipeline: a send refused for buffer memory never runs its callback") {
  auto o = opts();
  o.accumulator.buffer_bytes = 8;  // two 4-byte records, in one open batch until the linger
  fixture f(o);
  f.sink.decide = [](request&) -> std::optional<send_result> { return std::nullopt; };  // hold: memory stays used
  REQUIRE(f.pipe.send(1, 0) == pipe_t::send_status::ok);
  REQUIRE(f.pipe.send(1, 1) == pipe_t::send_status::ok);
  std::atomic<int> calls{0};
  auto cb = [&calls](const int&, const delivery_report&) { ++calls; };
  CHECK(f.pipe.try_send(1, 2, cb) == pipe_t::send_status::full);
  CHECK(f.pipe.try_send(1, 2) == pipe_t::send_status::full);
  CHECK(f.pipe.try_send_for(1, 2, cb, 0ms) == pipe_t::send_status::timeout);
  CHECK(f.pipe.try_send_until(1, 2, f.clock.now()) == pipe_t::send_status::timeout);
  REQUIRE(f.run_until([&] {
    f.sink.complete_all(send_result::ok);
    return f.rep.count() == 2;
  }));
  CHECK(f.rep.exactly_once(2));
  CHECK(calls.load() == 0);
  CHECK(f.pipe.metrics().accepted == 2);
}
