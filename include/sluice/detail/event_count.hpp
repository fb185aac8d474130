// sluice/detail/event_count.hpp — spin helpers, and the parking handle under its old name (not
// public API).
//
// The parking handle itself is public now: sluice::event_count in <sluice/event_count.hpp>.
// detail::event_count stays an alias of it, so internal code may use either name.
#pragma once

#include <cstddef>

#include "../event_count.hpp"

namespace sluice::detail {

using event_count = sluice::event_count;

/// One cache line: keeps independently written atomics from sharing a line (false sharing).
/// 64 bytes on every x86-64 and most AArch64 parts; std::hardware_destructive_interference_size
/// is avoided because GCC warns that its value may differ between translation units.
inline constexpr std::size_t cache_line = 64;

/// Tell the CPU we are in a spin loop (frees pipeline resources for the sibling hyper-thread).
inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

}  // namespace sluice::detail
