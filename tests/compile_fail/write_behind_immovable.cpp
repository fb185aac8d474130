// Must not compile: a value type that can be neither moved nor copied. The only error must be the
// one that says so (not the nothrow-move advice, which cannot apply to std::mutex).
#include <sluice/write_behind.hpp>

#include <mutex>

int main() {
  sluice::write_behind<std::mutex> writes({}, [](std::span<const std::mutex>) {});
  writes.flush();
  return static_cast<int>(writes.metrics().persisted);
}
