// Must not compile: a key type with no std::hash. The only error must be backoff's static_assert
// naming the requirement (tests/compile_fail/CMakeLists.txt checks the output).
#include <sluice/backoff.hpp>

struct no_hash_key {
  int id;
  bool operator==(const no_hash_key&) const = default;
};

int main() {
  sluice::backoff<no_hash_key> retry;
  const auto decision = retry.failure(no_hash_key{1});
  (void)retry.forget(no_hash_key{1});
  return static_cast<int>(decision.failures + retry.failures(no_hash_key{2}));
}
