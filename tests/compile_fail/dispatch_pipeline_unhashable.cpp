// Must not compile: a partition type with no std::hash. The only error must be dispatch_pipeline's
// static_assert naming the requirement (tests/compile_fail/CMakeLists.txt checks the output).
#include <sluice/dispatch_pipeline.hpp>

#include <cstddef>
#include <optional>

struct no_hash_partition {
  int id;
  bool operator==(const no_hash_partition&) const = default;
};

int main() {
  using pipeline = sluice::dispatch_pipeline<no_hash_partition, int, int>;
  pipeline p({}, [](const no_hash_partition& k) { return std::optional<int>(k.id); },
             [](auto&& r) { r.complete(); }, [](const int&) { return std::size_t{4}; });
  (void)p.send(no_hash_partition{1}, 7, [](const int&, const sluice::delivery_report&) {});
  p.destination_changed(no_hash_partition{1});
  p.flush();
  return static_cast<int>(p.metrics().accepted);
}
