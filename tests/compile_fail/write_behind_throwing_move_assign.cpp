// Must not compile (r2-review F2): a refused enqueue moves the value back into the caller's
// variable from a noexcept path, so a throwing move assignment could only terminate. The only
// error must be the static_assert naming the move assignment.
#include <sluice/write_behind.hpp>

struct value {
  int v = 0;
  value() = default;
  value(value&& o) noexcept : v(o.v) {}
  value& operator=(value&& o) {  // not noexcept
    v = o.v;
    return *this;
  }
};

int main() {
  sluice::write_behind<value> writes({}, [](std::span<const value>) {});
  (void)writes.try_enqueue(value{});
  return static_cast<int>(writes.metrics().persisted);
}
