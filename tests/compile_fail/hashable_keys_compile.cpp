// The control for the compile-failure tests: the same calls with keys that meet
// sluice::hashable_key compile cleanly (so a failure above is the key's, not the harness's).
#include <sluice/backoff.hpp>
#include <sluice/key_lock_table.hpp>
#include <sluice/requeue_queue.hpp>

#include <chrono>
#include <cstddef>
#include <functional>
#include <string>

struct uid {
  int id;
  bool operator==(const uid&) const = default;
};
template <>
struct std::hash<uid> {
  std::size_t operator()(const uid& u) const noexcept { return std::hash<int>{}(u.id); }
};

struct by_id_hash {
  std::size_t operator()(const uid& u) const noexcept { return static_cast<std::size_t>(u.id); }
};

static_assert(sluice::hashable_key<uid>);
static_assert(sluice::hashable_key<std::string>);
static_assert(sluice::hashable_key<uid, by_id_hash>);

int main() {
  sluice::requeue_queue<uid, std::string> queue;
  (void)queue.schedule(uid{1}, "item", std::chrono::seconds(1));
  sluice::key_lock_table<uid, by_id_hash> locks;
  auto guard = locks.lock(uid{1});
  sluice::backoff<std::string> retry;
  const auto decision = retry.failure("key");
  return static_cast<int>(decision.failures) + guard.key().id - 2;
}
