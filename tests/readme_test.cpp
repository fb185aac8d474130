// The README's code snippets, kept compiling: if an API in the README changes, this breaks.
#include <sluice/sluice.hpp>
#include <sluice/testing/manual_clock.hpp>
#include <string>
#include <thread>
#include <catch2/catch.hpp>
using namespace std::chrono_literals;
struct job { int id = 0; };
struct reading { int v = 0; };
void run(job) {}
void dead_letter(reading&&) {}
void dead_letter(const std::string&) {}
void handle(std::vector<reading>&) {}
void do_work() {}
struct entity_t { std::string uid; } entity{"a"};
void reconcile(const entity_t&) {}
TEST_CASE("readme: every code snippet in README.md compiles and runs") {
  {
    sluice::channel<job> jobs(1024);
    std::jthread worker([&] { for (job j : jobs) run(j); });
    if (jobs.send(job{42}) != sluice::channel_status::ok) { }
    jobs.close();
  }
  {
    sluice::channel<reading> ch(256);
    sluice::channel<reading> lossy(256, sluice::channel_full_mode::drop_oldest,
                                   [](reading&& r) { dead_letter(std::move(r)); });
    reading r{1};
    switch (ch.try_send_for(std::move(r), 10ms)) {
      case sluice::channel_status::ok: break;
      case sluice::channel_status::timeout: break;
      default: break;
    }
    ch.close();
    std::vector<reading> batch;
    while (ch.receive_batch(batch, 64) > 0) { handle(batch); batch.clear(); }
  }
  {
    sluice::limiter slots(8);
    { sluice::limiter::permit p = slots.acquire(); do_work(); }
    if (auto p = slots.try_acquire_for(50ms)) { }
  }
  {
    sluice::task_group group(10);
    std::vector<entity_t> batch(3);
    for (auto& e : batch) group.spawn([&e] { reconcile(e); });
    try { group.wait(); } catch (const sluice::task_errors& e) { for (const auto& ep : e.errors()) (void)ep; }
  }
  {
    sluice::key_lock_table<std::string> locks;
    { auto guard = locks.lock(entity.uid); reconcile(entity); }
    if (auto g = locks.try_lock(entity.uid)) { }
  }
  {
    sluice::testing::manual_clock clock;
    sluice::requeue_queue<std::string, job, sluice::testing::manual_clock> q(clock);
    (void)q.schedule("a", job{}, 30s);
    clock.advance(30s);
    auto due = q.try_pop();
    REQUIRE(due);
    CHECK(due->key == "a");
    sluice::backoff<std::string> retry({.base = 5ms, .max = 5min, .multiplier = 2,
                                        .jitter = sluice::jitter_mode::full, .max_retries = 10});
    std::string uid = "a";
    if (auto d = retry.failure(uid)) (void)q.schedule(uid, job{}, d.delay);
    else dead_letter(uid);
    retry.forget(uid);
  }
  CHECK(true);
}
