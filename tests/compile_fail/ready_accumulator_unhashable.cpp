// Must not compile: a partition type with no std::hash. The only error must be ready_accumulator's
// static_assert naming the requirement (tests/compile_fail/CMakeLists.txt checks the output).
#include <sluice/ready_accumulator.hpp>

#include <optional>
#include <vector>

struct no_hash_partition {
  int id;
  bool operator==(const no_hash_partition&) const = default;
};

int main() {
  sluice::ready_accumulator<no_hash_partition, int, int> acc({}, [](const no_hash_partition& p) {
    return std::optional<int>(p.id);
  });
  (void)acc.append(no_hash_partition{1}, 7, 4);
  acc.flush();
  auto r = acc.ready();
  std::vector<decltype(acc)::batch_handle> out;
  for (int d : r.destinations) (void)acc.drain(d, 1024, out);
  for (auto& b : out) acc.complete(std::move(b));
  auto m = acc.mute(no_hash_partition{2});
  return static_cast<int>(acc.stats().appended) + (m ? 1 : 0);
}
