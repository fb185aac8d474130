// A reconcile loop that retries failures with per-key exponential backoff, on a manual clock.
//
// Three entities are reconciled. "pod/flaky" fails twice before succeeding, "pod/broken" never
// succeeds and is given up after its retry budget, "pod/ok" succeeds at once and asks to be looked
// at again in 30 s. Time is a sluice::testing::manual_clock, so the program runs instantly and
// prints the same schedule every time; swap in sluice::steady_clock (the default) for real use.
#include <sluice/backoff.hpp>
#include <sluice/requeue_queue.hpp>
#include <sluice/testing/manual_clock.hpp>

#include <chrono>
#include <cstdio>
#include <iterator>
#include <map>
#include <string>
#include <vector>

using namespace std::chrono_literals;
using clock_type = sluice::testing::manual_clock;

int main() {
  clock_type clock;
  sluice::requeue_queue<std::string, int, clock_type> queue(clock);  // item: the attempt number
  sluice::backoff<std::string> retry({.base = 100ms, .max = 10s, .multiplier = 2.0, .max_retries = 3});

  std::map<std::string, int> failures_left{{"pod/flaky", 2}, {"pod/broken", 1000}, {"pod/ok", 0}};
  for (const auto& [key, _] : failures_left) (void)queue.schedule(key, 1, 0s);

  auto ms = [](auto d) { return static_cast<long long>(std::chrono::duration_cast<std::chrono::milliseconds>(d).count()); };
  int given_up = 0;
  int rechecks = 0;
  while (auto next = queue.next_deadline()) {
    clock.set(*next);  // jump straight to the next due entry: no sleeping, no scanning
    std::vector<decltype(queue)::entry> due;
    queue.pop_due(std::back_inserter(due));
    for (auto& e : due) {
      const long long now = ms(clock.now().time_since_epoch());
      if (failures_left[e.key]-- > 0) {
        const auto decision = retry.failure(e.key);
        if (!decision) {
          std::printf("t=%6lld ms  %-10s attempt %d failed: giving up after %u failures\n", now, e.key.c_str(),
                      e.item, decision.failures);
          ++given_up;
          continue;
        }
        std::printf("t=%6lld ms  %-10s attempt %d failed: retry in %lld ms\n", now, e.key.c_str(), e.item,
                    ms(decision.delay));
        (void)queue.schedule(e.key, e.item + 1, decision.delay);
      } else {
        retry.forget(e.key);  // success: the key holds no backoff state any more
        std::printf("t=%6lld ms  %-10s attempt %d succeeded\n", now, e.key.c_str(), e.item);
        if (e.key == "pod/ok" && rechecks++ == 0) (void)queue.schedule(e.key, 1, 30s);  // periodic re-check, once
      }
    }
  }
  std::printf("done: queue %zu pending, backoff tracking %zu keys, %d given up\n", queue.size(), retry.size(),
              given_up);
  return queue.empty() && retry.size() == 0 && given_up == 1 ? 0 : 1;
}
