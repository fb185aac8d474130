// sluice/channel.hpp — bounded multi-producer, single-consumer channel.
//
// What it is for: handing work from any number of producer threads to one consumer thread through a
// buffer whose size you choose, with backpressure (or a drop policy) when it is full, and a clean
// close-then-drain shutdown. It is the intake of sluice's pipelines.
//
// ONE CONSUMER: any number of threads may send, but only one thread at a time may receive
// (receive*, try_receive*, receive_batch*, iteration). Debug and sanitizer builds (SLUICE_CHECKS)
// abort with a message naming sluice::channel if two threads receive at once.
//
// Requirements: T is a non-const object type with a noexcept move constructor and destructor. The
// drop callback, if any, must be safe to call from several producer threads at once.
//
// Guarantees:
//  - FIFO per producer: items sent by one thread are received in the order they were sent.
//  - Happens-before: everything a producer did before a successful send happens-before the consumer's
//    receive of that item returns.
//  - Nothing accepted is lost: an item is accepted when a send returns ok (it will be received, or,
//    in drop_oldest mode, handed to the drop callback) or dropped (drop_write: handed to the drop
//    callback). Any other status leaves the caller's value untouched (not moved from).
//    When quiescent: accepted() == received() + dropped() + size().
//  - close() is idempotent and safe from any thread; it wakes every blocked producer (they return
//    closed) and the consumer. Items accepted before the close are still received; a receive
//    reports closed only once the channel is closed and drained, and from then on always.
//  - Blocking calls spin briefly, then park; a sender or receiver makes a system call only when the
//    other side is parked, producers wake a parked consumer once per sleep (not once per item), and
//    producers blocked on a full channel are resumed in bunches, never slot by slot.
//  - A timed send whose deadline passes still takes any free slot rather than report a timeout.
//
// What it never does: allocate after construction (the ring is allocated once; receive_batch grows
// only your vector, and only if it lacks room), grow beyond its capacity, busy-wait, throw from a
// send/receive, lose or duplicate an item, or let a throwing drop callback escape (it is caught and
// counted in drop_callback_errors(); the item still counts as dropped).
//
// Example:
//   sluice::channel<std::string> ch(1024);
//   std::jthread producer([&] { (void)ch.send("hello"); ch.close(); });
//   for (std::string& s : ch) std::cout << s << '\n';   // ends when closed and drained
//   std::optional<std::string> next;
//   if (ch.try_receive_for(next, 10ms) == sluice::channel_status::closed) { /* drained: done */ }
#pragma once

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <iterator>
#include <optional>
#include <span>
#include <stop_token>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/channel_core.hpp"
#include "detail/wait.hpp"

namespace sluice {

/// Outcome of a send, or of a receive's status form. A send consumes the caller's value only on ok
/// and dropped; a receive fills its output only on ok.
enum class channel_status {
  ok,         ///< sent (it will be received or, in drop_oldest mode, possibly evicted later) / received
  full,       ///< not sent: full and the call may not wait (try_send, or full_mode::reject)
  closed,     ///< send: the channel is closed; receive: closed and drained (final)
  timeout,    ///< send: still full at the deadline; receive: nothing arrived by the deadline
  cancelled,  ///< the stop token was triggered while waiting
  dropped,    ///< accepted and handed to the drop callback at once (full_mode::drop_write)
  empty,      ///< not received: nothing ready and the call may not wait (try_receive)
};

/// What a send does when the channel is full (names as in .NET's BoundedChannelFullMode).
enum class channel_full_mode {
  wait,         ///< block until there is space (the try_ forms return full)
  drop_oldest,  ///< evict the oldest queued item to the drop callback, then send; never blocks
  drop_write,   ///< drop the item being sent: hand it to the drop callback (status dropped)
  reject,       ///< return full at once, value untouched
};

template <class T>
struct channel_options {
  std::size_t capacity = 0;  ///< 1..2^40; anything else throws std::invalid_argument
  channel_full_mode full_mode = channel_full_mode::wait;
  /// Receives every dropped item (may be empty: dropped items are then just destroyed; they are
  /// counted either way). Called on the sending thread, possibly concurrently. May throw: the
  /// exception is caught and counted in drop_callback_errors().
  std::function<void(T&&)> on_drop;
};

template <class T>
class channel {
  static_assert(std::is_object_v<T> && !std::is_array_v<T> && !std::is_const_v<T>,
                "sluice::channel<T>: T must be a non-const, non-array object type");
  static_assert(!std::is_object_v<T> || std::is_move_constructible_v<T>,
                "sluice::channel<T>: T can be neither moved nor copied (std::mutex, for example), and items "
                "are moved into and out of the channel: send a std::unique_ptr<T> instead");
  static_assert(!std::is_move_constructible_v<T> || std::is_nothrow_move_constructible_v<T>,
                "sluice::channel<T>: T's move constructor (or, if it has none, its copy constructor) may "
                "throw, which could lose an item halfway through a send or receive: mark the move "
                "constructor noexcept, or send a std::unique_ptr<T> instead");
  static_assert(std::is_nothrow_destructible_v<T>,
                "sluice::channel<T>: T's destructor must be accessible and must not throw");

  using deadline_type = std::optional<detail::steady_time>;
  // "No deadline" as a constant rather than a std::nullopt temporary: GCC 12 at -O3 otherwise
  // reports the empty optional's payload as maybe-uninitialized deep inside the inlined wait.
  static constexpr deadline_type no_deadline{};

 public:
  using value_type = T;
  using options_type = channel_options<T>;
  class iterator;

  /// A channel holding at most `capacity` items, full_mode::wait. Throws std::invalid_argument if
  /// capacity is 0 or above 2^40, std::bad_alloc if the ring cannot be allocated.
  explicit channel(std::size_t capacity) : channel(options_type{capacity, channel_full_mode::wait, {}}) {}

  /// Shorthand for channel(options_type{capacity, mode, on_drop}).
  channel(std::size_t capacity, channel_full_mode mode, std::function<void(T&&)> on_drop = {})
      : channel(options_type{capacity, mode, std::move(on_drop)}) {}

  /// A channel configured by `options`. Throws std::invalid_argument for a bad capacity or an
  /// unknown full_mode.
  explicit channel(options_type options)
      : core_(options.capacity, options.full_mode, std::move(options.on_drop)) {}

  channel(const channel&) = delete;
  channel& operator=(const channel&) = delete;

  // ---- send ------------------------------------------------------------------------------
  // Each form moves from `value` only when it returns ok or dropped. Thread-safe. Never allocates.

  /// Sends, waiting while full (full_mode::wait). May block.
  [[nodiscard]] channel_status send(T&& value) noexcept { return send_one(value, no_deadline, nullptr, true); }
  /// As send(), but returns cancelled if `stop` is triggered while waiting. May block.
  [[nodiscard]] channel_status send(T&& value, std::stop_token stop) noexcept {
    return send_one(value, no_deadline, &stop, true);
  }
  /// Sends only if that needs no waiting: full instead of blocking. Never blocks.
  [[nodiscard]] channel_status try_send(T&& value) noexcept { return send_one(value, no_deadline, nullptr, false); }
  /// Sends, waiting at most `timeout` for space. May block.
  template <class Rep, class Period>
  [[nodiscard]] channel_status try_send_for(T&& value, const std::chrono::duration<Rep, Period>& timeout) noexcept {
    return send_one(value, detail::deadline_after(timeout), nullptr, true);
  }
  /// Sends, waiting until `deadline` (any clock) for space. May block.
  template <class Clock, class Duration>
  [[nodiscard]] channel_status try_send_until(T&& value, const std::chrono::time_point<Clock, Duration>& deadline) noexcept {
    return send_one(value, detail::to_steady(deadline), nullptr, true);
  }

  // Copying forms, for lvalues of copyable T: the copy is made first, so the caller's value is never
  // touched. May throw whatever T's copy constructor throws (before anything is sent).
  [[nodiscard]] channel_status send(const T& value) requires std::is_copy_constructible_v<T> { return send(T(value)); }
  [[nodiscard]] channel_status send(const T& value, std::stop_token stop) requires std::is_copy_constructible_v<T> {
    return send(T(value), std::move(stop));
  }
  [[nodiscard]] channel_status try_send(const T& value) requires std::is_copy_constructible_v<T> { return try_send(T(value)); }
  template <class Rep, class Period>
  [[nodiscard]] channel_status try_send_for(const T& value, const std::chrono::duration<Rep, Period>& timeout)
    requires std::is_copy_constructible_v<T> { return try_send_for(T(value), timeout); }
  template <class Clock, class Duration>
  [[nodiscard]] channel_status try_send_until(const T& value, const std::chrono::time_point<Clock, Duration>& deadline)
    requires std::is_copy_constructible_v<T> { return try_send_until(T(value), deadline); }

  // ---- batched send ----------------------------------------------------------------------
  // Each form consumes a prefix of `items` and returns its length: items[0, n) were moved from
  // (sent, or dropped under drop_write / handed on under drop_oldest), items[n, size) are untouched.
  // Claims as many slots as are free with one atomic operation. Thread-safe. Never allocates.

  /// Sends every item, waiting for space as needed; stops early only if the channel closes. May block.
  std::size_t send_batch(std::span<T> items) noexcept { return send_many(items, no_deadline, nullptr, true); }
  /// As send_batch(), also stopping early if `stop` is triggered while waiting. May block.
  std::size_t send_batch(std::span<T> items, std::stop_token stop) noexcept {
    return send_many(items, no_deadline, &stop, true);
  }
  /// Sends as many as fit now. Never blocks.
  std::size_t try_send_batch(std::span<T> items) noexcept { return send_many(items, no_deadline, nullptr, false); }
  /// As send_batch(), but gives up waiting for space after `timeout`. May block.
  template <class Rep, class Period>
  std::size_t try_send_batch_for(std::span<T> items, const std::chrono::duration<Rep, Period>& timeout) noexcept {
    return send_many(items, detail::deadline_after(timeout), nullptr, true);
  }
  /// As send_batch(), but gives up waiting for space at `deadline` (any clock). May block.
  template <class Clock, class Duration>
  std::size_t try_send_batch_until(std::span<T> items, const std::chrono::time_point<Clock, Duration>& deadline) noexcept {
    return send_many(items, detail::to_steady(deadline), nullptr, true);
  }

  // ---- receive (one consumer at a time) --------------------------------------------------
  // Status forms: on ok the item is in `out` (replacing what it held); otherwise `out` is untouched
  // and the status says why: closed (closed and drained: final), empty (try_receive: nothing ready),
  // timeout (the _for/_until forms), cancelled (the stop_token forms). Never allocate.
  // Optional forms: the same calls returning the item, or std::nullopt for any of those reasons.

  /// Waits for the next item: ok, or closed. Consumer only. May block.
  [[nodiscard]] channel_status receive(std::optional<T>& out) noexcept { return receive_into(out, no_deadline, nullptr, true); }
  /// As receive(out), also returning cancelled if `stop` is triggered while waiting. May block.
  [[nodiscard]] channel_status receive(std::optional<T>& out, std::stop_token stop) noexcept {
    return receive_into(out, no_deadline, &stop, true);
  }
  /// The next item if one is ready now: ok, empty or closed. Consumer only. Never blocks.
  [[nodiscard]] channel_status try_receive(std::optional<T>& out) noexcept { return receive_into(out, no_deadline, nullptr, false); }
  /// Waits at most `timeout`: ok, timeout or closed. Consumer only. May block.
  template <class Rep, class Period>
  [[nodiscard]] channel_status try_receive_for(std::optional<T>& out, const std::chrono::duration<Rep, Period>& timeout) noexcept {
    return receive_into(out, detail::deadline_after(timeout), nullptr, true);
  }
  /// Waits until `deadline` (any clock): ok, timeout or closed. Consumer only. May block.
  template <class Clock, class Duration>
  [[nodiscard]] channel_status try_receive_until(std::optional<T>& out,
                                                 const std::chrono::time_point<Clock, Duration>& deadline) noexcept {
    return receive_into(out, detail::to_steady(deadline), nullptr, true);
  }

  /// The next item; std::nullopt once closed and drained. Consumer only. May block.
  [[nodiscard]] std::optional<T> receive() noexcept { return receive_value(no_deadline, nullptr, true); }
  /// As receive(), also std::nullopt if `stop` is triggered while waiting. May block.
  [[nodiscard]] std::optional<T> receive(std::stop_token stop) noexcept { return receive_value(no_deadline, &stop, true); }
  /// The next item if one is ready now. Never blocks.
  [[nodiscard]] std::optional<T> try_receive() noexcept { return receive_value(no_deadline, nullptr, false); }
  /// The next item, waiting at most `timeout`. May block.
  template <class Rep, class Period>
  [[nodiscard]] std::optional<T> try_receive_for(const std::chrono::duration<Rep, Period>& timeout) noexcept {
    return receive_value(detail::deadline_after(timeout), nullptr, true);
  }
  /// The next item, waiting until `deadline` (any clock). May block.
  template <class Clock, class Duration>
  [[nodiscard]] std::optional<T> try_receive_until(const std::chrono::time_point<Clock, Duration>& deadline) noexcept {
    return receive_value(detail::to_steady(deadline), nullptr, true);
  }

  // ---- batched receive (one consumer at a time) ------------------------------------------
  // Each form appends up to `max` items to `out` in order and returns how many: 0 for the reasons
  // the status forms name (is_drained() then tells closed apart). Cheaper per item than receive():
  // one head update and at most one producer wake-up per batch. Allocates only if `out` lacks room
  // for min(max, capacity()) more items (reserve once to avoid it); throws only std::bad_alloc /
  // std::length_error from that, before taking anything. max == 0 returns 0 at once.

  /// Waits for at least one item; returns 0 only when closed and drained. May block.
  std::size_t receive_batch(std::vector<T>& out, std::size_t max) { return receive_many(out, max, no_deadline, nullptr, true); }
  /// As receive_batch(), also returning 0 if `stop` is triggered while waiting. May block.
  std::size_t receive_batch(std::vector<T>& out, std::size_t max, std::stop_token stop) {
    return receive_many(out, max, no_deadline, &stop, true);
  }
  /// Whatever is ready now (possibly 0). Never blocks.
  std::size_t try_receive_batch(std::vector<T>& out, std::size_t max) { return receive_many(out, max, no_deadline, nullptr, false); }
  /// Waits at most `timeout` for the first item (0 if none came). May block.
  template <class Rep, class Period>
  std::size_t try_receive_batch_for(std::vector<T>& out, std::size_t max, const std::chrono::duration<Rep, Period>& timeout) {
    return receive_many(out, max, detail::deadline_after(timeout), nullptr, true);
  }
  /// Waits until `deadline` (any clock) for the first item (0 if none came). May block.
  template <class Clock, class Duration>
  std::size_t try_receive_batch_until(std::vector<T>& out, std::size_t max,
                                      const std::chrono::time_point<Clock, Duration>& deadline) {
    return receive_many(out, max, detail::to_steady(deadline), nullptr, true);
  }

  /// Consumer-side range: `for (T& item : ch)` receives until closed and drained. Consumer only.
  [[nodiscard]] iterator begin() noexcept { return iterator(this); }
  [[nodiscard]] std::default_sentinel_t end() const noexcept { return {}; }

  // ---- lifecycle and observers -----------------------------------------------------------

  /// Stops accepting items and wakes every blocked producer and the consumer. Idempotent.
  /// Returns true for the call that closed the channel. Thread-safe. Never blocks.
  bool close() noexcept { return core_.close(); }

  // Observers: thread-safe, never block, never allocate.
  [[nodiscard]] bool is_closed() const noexcept { return core_.ring().is_closed(); }
  /// Closed, and every accepted item has been received or dropped: nothing more will come out.
  [[nodiscard]] bool is_drained() const noexcept { return core_.ring().drained(); }
  /// Items accepted and not yet received (or evicted). A snapshot: exact only when quiescent.
  [[nodiscard]] std::size_t size() const noexcept {
    const std::uint64_t read = core_.ring().read_count();  // read first: can only err high, then clamped
    const std::uint64_t claimed = core_.ring().claimed_count();
    return claimed > read ? static_cast<std::size_t>(std::min<std::uint64_t>(claimed - read, capacity())) : 0;
  }
  [[nodiscard]] bool empty() const noexcept { return size() == 0; }
  [[nodiscard]] std::size_t capacity() const noexcept { return core_.ring().capacity(); }
  [[nodiscard]] channel_full_mode full_mode() const noexcept { return core_.full_mode(); }

  // Counters (monotonic; exact when quiescent): accepted() == received() + dropped() + size().
  /// Items the channel took responsibility for (sends that returned ok or dropped).
  [[nodiscard]] std::uint64_t accepted() const noexcept { return core_.accepted(); }
  /// Items handed to the consumer.
  [[nodiscard]] std::uint64_t received() const noexcept { return core_.received(); }
  /// Items dropped by the full mode (each one was passed to the drop callback, if any).
  [[nodiscard]] std::uint64_t dropped() const noexcept { return core_.dropped(); }
  /// Drop-callback invocations that threw (the exception was swallowed; the item counts as dropped).
  [[nodiscard]] std::uint64_t drop_callback_errors() const noexcept { return core_.drop_callback_errors(); }

 private:
  std::optional<T> receive_value(const deadline_type& deadline, const std::stop_token* stop, bool may_block) noexcept {
    std::optional<T> out;
    (void)receive_into(out, deadline, stop, may_block);
    return out;
  }
  channel_status receive_into(std::optional<T>& out, const deadline_type& deadline, const std::stop_token* stop,
                              bool may_block) noexcept {
    std::size_t n = 0;
    return core_.receive_some(1, [&out](T&& item) noexcept { out.emplace(std::move(item)); }, n, deadline, stop,
                              may_block);
  }
  std::size_t receive_many(std::vector<T>& out, std::size_t max, const deadline_type& deadline,
                           const std::stop_token* stop, bool may_block) {
    if (max == 0) return 0;
    max = std::min(max, capacity());
    if (out.capacity() - out.size() < max) out.reserve(std::max(out.size() + max, 2 * out.capacity()));
    std::size_t n = 0;
    // push_back cannot reallocate (reserved above), so the sink cannot throw.
    (void)core_.receive_some(max, [&out](T&& item) noexcept { out.push_back(std::move(item)); }, n, deadline, stop,
                             may_block);
    return n;
  }
  channel_status send_one(T& value, const deadline_type& deadline, const std::stop_token* stop, bool may_block) noexcept {
    channel_status status{};
    (void)core_.send_some(&value, 1, deadline, stop, may_block, status);
    return status;
  }
  std::size_t send_many(std::span<T> items, const deadline_type& deadline, const std::stop_token* stop,
                        bool may_block) noexcept {
    channel_status status{};
    return core_.send_some(items.data(), items.size(), deadline, stop, may_block, status);
  }

  detail::channel_core<T, channel_status, channel_full_mode> core_;
};

/// Input iterator over a channel's items; reaching end() means closed and drained.
template <class T>
class channel<T>::iterator {
 public:
  using iterator_concept = std::input_iterator_tag;
  using iterator_category = std::input_iterator_tag;
  using value_type = T;
  using difference_type = std::ptrdiff_t;
  using reference = T&;

  iterator() = default;
  iterator(iterator&&) noexcept = default;
  iterator& operator=(iterator&&) noexcept = default;

  reference operator*() const noexcept { return *current_; }
  T* operator->() const noexcept { return &*current_; }
  iterator& operator++() noexcept {
    current_ = channel_->receive();
    return *this;
  }
  void operator++(int) noexcept { ++*this; }
  friend bool operator==(const iterator& it, std::default_sentinel_t) noexcept { return !it.current_.has_value(); }

 private:
  friend class channel<T>;
  explicit iterator(channel* ch) noexcept : channel_(ch), current_(ch->receive()) {}

  channel* channel_ = nullptr;
  mutable std::optional<T> current_;
};

}  // namespace sluice
