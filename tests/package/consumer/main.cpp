// Downstream smoke test: include the umbrella header, move a few items through a channel.
#include <sluice/sluice.hpp>

#include <cstdio>
#include <thread>

int main() {
  sluice::channel<int> ch(4);
  std::jthread producer([&] {
    for (int i = 1; i <= 100; ++i) {
      if (ch.send(i) != sluice::channel_status::ok) return;
    }
    ch.close();
  });
  long sum = 0;
  for (int v : ch) sum += v;
  if (sum != 5050) {
    std::fprintf(stderr, "consumer: expected 5050, got %ld\n", sum);
    return 1;
  }
  std::puts("consumer: ok");
  return 0;
}
