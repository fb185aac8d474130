#include <app.hpp>

#include <cstdio>

int main() {
  sluice::channel<int> ch(8);
  const long sum = app::sum_through(ch, 1000);
  if (sum != 500500) {
    std::fprintf(stderr, "app_user: expected 500500, got %ld\n", sum);
    return 1;
  }
  std::puts("app_user: ok");
  return 0;
}
