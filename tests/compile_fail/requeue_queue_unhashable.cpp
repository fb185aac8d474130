// Must not compile: a key type with no std::hash. The only error must be requeue_queue's
// static_assert naming the requirement (tests/compile_fail/CMakeLists.txt checks the output).
#include <sluice/requeue_queue.hpp>

#include <chrono>
#include <string>

struct no_hash_key {
  int id;
  bool operator==(const no_hash_key&) const = default;
};

int main() {
  sluice::requeue_queue<no_hash_key, std::string> queue;
  (void)queue.schedule(no_hash_key{1}, "item", std::chrono::seconds(1));
  (void)queue.cancel(no_hash_key{1});
  auto entry = queue.try_pop();
  return entry ? entry->key.id : 0;
}
