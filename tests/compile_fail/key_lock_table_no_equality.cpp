// Must not compile: a key type with a std::hash but no operator==. The only error must be
// key_lock_table's static_assert naming the requirement.
#include <sluice/key_lock_table.hpp>

#include <cstddef>
#include <functional>

struct no_equal_key {
  int id;
};
template <>
struct std::hash<no_equal_key> {
  std::size_t operator()(const no_equal_key& k) const noexcept { return static_cast<std::size_t>(k.id); }
};

int main() {
  sluice::key_lock_table<no_equal_key> locks;
  auto guard = locks.lock(no_equal_key{1});
  return guard.key().id;
}
