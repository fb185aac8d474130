// The downstream library's public header: it exposes a sluice type, so its users need sluice too.
#pragma once
#include <sluice/channel.hpp>

namespace app {
// Sends 1..n through `ch` from another thread, returns the sum received.
long sum_through(sluice::channel<int>& ch, int n);
}  // namespace app
