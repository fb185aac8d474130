// Two-level locking for a reconcile loop, the way the seed service meant it:
//   - a key_lock_table serialises work per entity (never the same entity twice at once), and
//   - a limiter bounds how many reconciles run at once, across all entities.
// Order matters: take the entity's lock first, then the permit. The seed took the global slot
// first and then waited for the entity, so a busy entity pinned global slots while doing nothing.
// Some reconciles throw; no lock, permit or entry is leaked, and nothing grows.
#include <sluice/key_lock_table.hpp>
#include <sluice/limiter.hpp>

#include <atomic>
#include <cstdio>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

int main() {
  constexpr int events = 4000;
  constexpr int entities = 25;
  constexpr int threads = 8;

  sluice::key_lock_table<std::string> entity_locks;  // level 1: one reconcile per entity
  sluice::limiter parallel(3);                       // level 2: at most 3 reconciles at once

  std::atomic<int> next_event{0};
  std::atomic<int> reconciled{0}, failed{0}, requeued{0};
  std::atomic<int> running{0}, most_running{0};
  std::atomic<bool> overlap{false};
  std::vector<std::atomic<int>> in_entity(entities);

  auto reconcile = [&](int id, int event) {
    if (in_entity[id].fetch_add(1) != 0) overlap = true;  // would mean two reconciles at once
    const int now = running.fetch_add(1) + 1;
    for (int seen = most_running.load(); now > seen && !most_running.compare_exchange_weak(seen, now);) {
    }
    std::this_thread::yield();  // "talk to the API server"
    running.fetch_sub(1);
    in_entity[id].fetch_sub(1);
    if (event % 97 == 0) throw std::runtime_error("reconcile failed");
  };

  std::vector<std::jthread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&] {
      for (int event = next_event++; event < events; event = next_event++) {
        const int id = (event * 7) % entities;
        const std::string uid = "pod-" + std::to_string(id);
        // Conflict strategy: every tenth event is "discard if busy" (a real service requeues it);
        // the rest wait for the entity. Both unlock automatically, even when reconcile throws.
        std::optional<sluice::key_lock_table<std::string>::guard> entity;
        if (event % 10 == 0) {
          entity = entity_locks.try_lock(uid);
          if (!entity) {
            requeued.fetch_add(1);
            continue;
          }
        } else {
          entity = entity_locks.lock(uid);
        }
        sluice::limiter::permit slot = parallel.acquire();  // queued threads served in order
        try {
          reconcile(id, event);
          reconciled.fetch_add(1);
        } catch (const std::exception&) {
          failed.fetch_add(1);  // counted, routed to a retry policy in a real service
        }
      }  // permit, then entity lock, released here in reverse order
    });
  }
  pool.clear();  // join

  std::printf("events %d: reconciled %d, failed %d, requeued (busy) %d\n", events, reconciled.load(),
              failed.load(), requeued.load());
  std::printf("same entity twice at once: %s; most reconciles at once: %d (limit %zu)\n",
              overlap ? "YES (bug)" : "never", most_running.load(), parallel.max_parallel());
  std::printf("lock entries left: %zu, permits in use: %zu\n", entity_locks.size(), parallel.in_use());

  const bool ok = !overlap && most_running <= 3 && entity_locks.size() == 0 && parallel.in_use() == 0 &&
                  reconciled + failed + requeued == events;
  return ok ? 0 : 1;
}
