// Must not compile: a keyed write_behind whose key type has no std::hash. The only error must be
// write_behind's static_assert naming the requirement (tests/compile_fail/CMakeLists.txt checks it).
#include <sluice/write_behind.hpp>

struct no_hash_key {
  int id;
  bool operator==(const no_hash_key&) const = default;
};
struct row {
  no_hash_key key;
  int value;
};

int main() {
  sluice::write_behind<row, no_hash_key> writes({}, [](std::span<const row>) {});
  (void)writes.enqueue(row{{1}, 2});
  writes.flush();
  return static_cast<int>(writes.metrics().persisted);
}
