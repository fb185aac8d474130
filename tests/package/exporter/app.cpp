#include "app.hpp"

#include <thread>

namespace app {
long sum_through(sluice::channel<int>& ch, int n) {
  std::jthread producer([&ch, n] {
    for (int i = 1; i <= n; ++i) {
      if (ch.send(i) != sluice::channel_status::ok) return;
    }
    ch.close();
  });
  long sum = 0;
  for (int v : ch) sum += v;
  return sum;
}
}  // namespace app
