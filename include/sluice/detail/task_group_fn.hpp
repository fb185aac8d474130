// sluice/detail/task_group_fn.hpp — a move-free, type-erased `void()` slot with inline storage
// (not public API).
//
// task_group keeps exactly one of these per worker and constructs each task's callable directly in
// it, so a callable of up to `inline_capacity` bytes costs no heap allocation at all; a larger one
// is placed on the heap (one allocation per such task). The slot is never copied or moved.
#pragma once

#include <cstddef>
#include <new>
#include <type_traits>
#include <utility>

namespace sluice::detail {

class task_group_fn {
 public:
  static constexpr std::size_t inline_capacity = 96;

  task_group_fn() noexcept = default;
  task_group_fn(const task_group_fn&) = delete;
  task_group_fn& operator=(const task_group_fn&) = delete;
  ~task_group_fn() { reset(); }

  template <class F>
  static constexpr bool fits_inline = sizeof(F) <= inline_capacity && alignof(F) <= alignof(std::max_align_t);

  /// Constructs the callable from `f`. The slot must be empty. If construction throws, the slot
  /// stays empty and the exception propagates.
  template <class F>
  void emplace(F&& f) {
    using D = std::decay_t<F>;
    static_assert(std::is_nothrow_destructible_v<D>, "sluice::task_group: a task's destructor must not throw");
    if constexpr (fits_inline<D>) {
      ::new (static_cast<void*>(storage_)) D(std::forward<F>(f));
      target_ = storage_;
      invoke_ = [](void* p) { (*static_cast<D*>(p))(); };
      destroy_ = [](void* p) noexcept { static_cast<D*>(p)->~D(); };
    } else {
      target_ = new D(std::forward<F>(f));
      invoke_ = [](void* p) { (*static_cast<D*>(p))(); };
      destroy_ = [](void* p) noexcept { delete static_cast<D*>(p); };
    }
  }

  [[nodiscard]] bool empty() const noexcept { return target_ == nullptr; }

  /// Calls the stored callable (which may throw).
  void operator()() { invoke_(target_); }

  /// Destroys the stored callable, if any.
  void reset() noexcept {
    if (target_ != nullptr) {
      destroy_(target_);
      target_ = nullptr;
    }
  }

 private:
  alignas(std::max_align_t) unsigned char storage_[inline_capacity];
  void* target_ = nullptr;
  void (*invoke_)(void*) = nullptr;
  void (*destroy_)(void*) noexcept = nullptr;
};

}  // namespace sluice::detail
