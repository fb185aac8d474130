// Must not compile: a key type with no std::hash. The only error must be key_lock_table's
// static_assert naming the requirement (tests/compile_fail/CMakeLists.txt checks the output).
#include <sluice/key_lock_table.hpp>

struct no_hash_key {
  int id;
  bool operator==(const no_hash_key&) const = default;
};

int main() {
  sluice::key_lock_table<no_hash_key> locks;
  auto guard = locks.lock(no_hash_key{1});
  auto other = locks.try_lock(no_hash_key{2});
  return guard.key().id + (other ? 1 : 0);
}
