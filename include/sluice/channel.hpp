// sluice/channel.hpp — bounded multi-producer, single-consumer channel.
//
// What it is for: handing work from any number of producer threads to one consumer thread through a
// buffer whose size you choose, with backpressure (or a drop policy) when it is full, and a clean
// close-then-drain shutdown. It is the intake of sluice's pipelines.
//
// Requirements: T is an object type with a noexcept move constructor and destructor. Any number of
// threads may send; only one thread at a time may receive (receive*, try_receive*, receive_batch*,
// iteration). The drop callback, if any, must be safe to call from several producer threads at once.
//
// Guarantees:
//  - FIFO per producer: items sent by one thread are received in the order they were sent.
//  - Happens-before: everything a producer did before a successful send happens-before the consumer's
//    receive of that item returns.
//  - Nothing accepted is lost: an item is accepted when a send returns ok (it will be received, or,
//    in drop_oldest mode, handed to the drop callback) or dropped (drop_newest: handed to the drop
//    callback). Any other status leaves the caller's value untouched (not moved from).
//    When quiescent: accepted() == received() + dropped() + size().
//  - close() is idempotent and safe from any thread; it wakes every blocked producer (they return
//    closed) and the consumer. Items accepted before the close are still received; receive returns
//    std::nullopt only once the channel is closed and drained.
//  - Blocking calls spin briefly (the consumer adaptively, a few to ~50 us, yielding as it goes),
//    then park; a sender or receiver makes a system call only when the other side is parked, and
//    producers wake a parked consumer once per sleep, not once per item.
//  - A producer blocked on a full channel resumes in bunches, never slot by slot: once an eighth of
//    the capacity is free (while it spins), or when the consumer wakes it (one parked producer per
//    quarter of the capacity drained, all of them when the consumer runs out of items). Until then
//    the buffer stays at least 3/4 full, so the consumer never starves for it. A timed send whose
//    deadline passes still takes any free slot rather than report a timeout.
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
//   // or: std::vector<std::string> batch; while (ch.receive_batch(batch, 64) > 0) { ...; batch.clear(); }
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <iterator>
#include <new>
#include <optional>
#include <span>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/channel_ring.hpp"
#include "detail/event_count.hpp"
#include "detail/wait.hpp"

namespace sluice {

/// Outcome of a send. Only ok and dropped consume the caller's value.
enum class channel_status {
  ok,         ///< accepted; it will be received (or, in drop_oldest mode, possibly evicted later)
  full,       ///< not sent: full and the call may not wait (try_send, or full_mode::reject)
  closed,     ///< not sent: the channel is closed
  timeout,    ///< not sent: still full at the deadline
  cancelled,  ///< not sent: the stop token was triggered while waiting for space
  dropped,    ///< accepted and handed to the drop callback at once (full_mode::drop_newest)
};

/// What a send does when the channel is full.
enum class channel_full_mode {
  wait,         ///< block until there is space (the try_ forms return full)
  drop_oldest,  ///< evict the oldest queued item to the drop callback, then send; never blocks
  drop_newest,  ///< the item being sent is the newest: hand it to the drop callback (status dropped)
  reject,       ///< return full at once, value untouched
};

template <class T>
struct channel_options {
  std::size_t capacity = 0;  ///< >= 1; 0 throws std::invalid_argument
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
  static_assert(std::is_nothrow_move_constructible_v<T>,
                "sluice::channel<T>: T must be nothrow move-constructible (mark its move constructor "
                "noexcept): a throwing move could lose an item halfway through a send or receive");
  static_assert(std::is_nothrow_destructible_v<T>, "sluice::channel<T>: T's destructor must not throw");

  using ring_type = detail::channel_ring<T>;
  using pos_type = typename ring_type::pos_type;
  using deadline_type = std::optional<detail::steady_time>;

 public:
  using value_type = T;
  using options_type = channel_options<T>;
  class iterator;

  /// A channel holding at most `capacity` items, full_mode::wait. Throws std::invalid_argument if
  /// capacity is 0, std::bad_alloc if the ring cannot be allocated.
  explicit channel(std::size_t capacity) : channel(options_type{capacity, channel_full_mode::wait, {}}) {}

  /// Shorthand for channel(options_type{capacity, mode, on_drop}).
  channel(std::size_t capacity, channel_full_mode mode, std::function<void(T&&)> on_drop = {})
      : channel(options_type{capacity, mode, std::move(on_drop)}) {}

  /// A channel configured by `options`. Throws std::invalid_argument for capacity 0 or an unknown
  /// full_mode.
  explicit channel(options_type options)
      : mode_(validate(options)),
        on_drop_(std::move(options.on_drop)),
        wake_batch_(std::max<std::size_t>(1, options.capacity / 4)),
        space_chunk_(std::max<std::size_t>(1, options.capacity / 8)),
        ring_(options.capacity, options.full_mode == channel_full_mode::drop_oldest) {}

  channel(const channel&) = delete;
  channel& operator=(const channel&) = delete;

  // ---- send ------------------------------------------------------------------------------
  // Each form moves from `value` only when it returns ok or dropped. Thread-safe. Never allocates.

  /// Sends, waiting while full (full_mode::wait). May block.
  [[nodiscard]] channel_status send(T&& value) noexcept { return send_one(value, std::nullopt, nullptr, true); }
  /// As send(), but returns cancelled if `stop` is triggered while waiting. May block.
  [[nodiscard]] channel_status send(T&& value, std::stop_token stop) noexcept {
    return send_one(value, std::nullopt, &stop, true);
  }
  /// Sends only if that needs no waiting: full instead of blocking. Never blocks.
  [[nodiscard]] channel_status try_send(T&& value) noexcept { return send_one(value, std::nullopt, nullptr, false); }
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
  // (sent, or dropped under drop_newest / handed on under drop_oldest), items[n, size) are untouched.
  // Claims as many slots as are free with one atomic operation. Thread-safe. Never allocates.

  /// Sends every item, waiting for space as needed; stops early only if the channel closes. May block.
  std::size_t send_batch(std::span<T> items) noexcept { return send_many(items, std::nullopt, nullptr, true); }
  /// As send_batch(), also stopping early if `stop` is triggered while waiting. May block.
  std::size_t send_batch(std::span<T> items, std::stop_token stop) noexcept {
    return send_many(items, std::nullopt, &stop, true);
  }
  /// Sends as many as fit now. Never blocks.
  std::size_t try_send_batch(std::span<T> items) noexcept { return send_many(items, std::nullopt, nullptr, false); }
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
  // std::nullopt means: closed and drained (receive()), or additionally nothing arrived in time /
  // the stop token fired (other forms; tell them apart with is_drained()). Never allocates.

  /// Waits for the next item; std::nullopt once closed and drained. Consumer only. May block.
  [[nodiscard]] std::optional<T> receive() noexcept { return receive_one(std::nullopt, nullptr, true); }
  /// As receive(), also returning std::nullopt if `stop` is triggered while waiting. May block.
  [[nodiscard]] std::optional<T> receive(std::stop_token stop) noexcept { return receive_one(std::nullopt, &stop, true); }
  /// The next item if one is ready now. Consumer only. Never blocks.
  [[nodiscard]] std::optional<T> try_receive() noexcept { return receive_one(std::nullopt, nullptr, false); }
  /// Waits at most `timeout` for the next item. Consumer only. May block.
  template <class Rep, class Period>
  [[nodiscard]] std::optional<T> try_receive_for(const std::chrono::duration<Rep, Period>& timeout) noexcept {
    return receive_one(detail::deadline_after(timeout), nullptr, true);
  }
  /// Waits until `deadline` (any clock) for the next item. Consumer only. May block.
  template <class Clock, class Duration>
  [[nodiscard]] std::optional<T> try_receive_until(const std::chrono::time_point<Clock, Duration>& deadline) noexcept {
    return receive_one(detail::to_steady(deadline), nullptr, true);
  }

  // ---- batched receive (one consumer at a time) ------------------------------------------
  // Each form appends up to `max` items to `out` in order and returns how many. Cheaper per item
  // than receive(): one head update and at most one producer wake-up per batch. Allocates only if
  // `out` lacks room for min(max, capacity()) more items (reserve once to avoid it); throws only
  // std::bad_alloc / std::length_error from that, before taking anything. max == 0 returns 0 at once.

  /// Waits for at least one item; returns 0 only when closed and drained. May block.
  std::size_t receive_batch(std::vector<T>& out, std::size_t max) { return receive_many(out, max, std::nullopt, nullptr, true); }
  /// As receive_batch(), also returning 0 if `stop` is triggered while waiting. May block.
  std::size_t receive_batch(std::vector<T>& out, std::size_t max, std::stop_token stop) {
    return receive_many(out, max, std::nullopt, &stop, true);
  }
  /// Whatever is ready now (possibly 0). Never blocks.
  std::size_t try_receive_batch(std::vector<T>& out, std::size_t max) { return receive_many(out, max, std::nullopt, nullptr, false); }
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
  bool close() noexcept {
    const bool first = ring_.close();
    not_full_.notify_all();  // blocked producers re-check, see closed
    not_empty_.notify_all();  // the consumer re-checks, drains, then sees closed and empty
    return first;
  }

  // Observers: thread-safe, never block, never allocate.
  [[nodiscard]] bool is_closed() const noexcept { return ring_.is_closed(); }
  /// Closed, and every accepted item has been received or dropped: nothing more will come out.
  [[nodiscard]] bool is_drained() const noexcept { return ring_.drained(); }
  /// Items accepted and not yet received (or evicted). A snapshot: exact only when quiescent.
  [[nodiscard]] std::size_t size() const noexcept {
    const std::uint64_t read = ring_.read_count();  // read first: the result can only err high, then clamped
    const std::uint64_t claimed = ring_.claimed_count();
    return claimed > read ? static_cast<std::size_t>(std::min<std::uint64_t>(claimed - read, capacity())) : 0;
  }
  [[nodiscard]] bool empty() const noexcept { return size() == 0; }
  [[nodiscard]] std::size_t capacity() const noexcept { return ring_.capacity(); }
  [[nodiscard]] channel_full_mode full_mode() const noexcept { return mode_; }

  // Counters (monotonic; exact when quiescent): accepted() == received() + dropped() + size().
  /// Items the channel took responsibility for (sends that returned ok or dropped).
  [[nodiscard]] std::uint64_t accepted() const noexcept {
    return ring_.claimed_count() + dropped_newest_.load(std::memory_order_relaxed);  // relaxed: statistics
  }
  /// Items handed to the consumer.
  [[nodiscard]] std::uint64_t received() const noexcept {
    // Counted by the consumer itself, not derived from head_ minus evictions: that difference
    // could be read between an eviction's two updates and come out wrong (even wrap around).
    return received_.load(std::memory_order_relaxed);  // relaxed: statistics
  }
  /// Items dropped by the full mode (each one was passed to the drop callback, if any).
  [[nodiscard]] std::uint64_t dropped() const noexcept {
    // relaxed: statistics
    return dropped_oldest_.load(std::memory_order_relaxed) + dropped_newest_.load(std::memory_order_relaxed);
  }
  /// Drop-callback invocations that threw (the exception was swallowed; the item counts as dropped).
  [[nodiscard]] std::uint64_t drop_callback_errors() const noexcept {
    return drop_errors_.load(std::memory_order_relaxed);  // relaxed: statistics
  }

 private:
  static channel_full_mode validate(const options_type& options) {
    if (options.capacity == 0) {
      throw std::invalid_argument("sluice::channel: capacity must be >= 1, got 0");
    }
    if (options.capacity > (std::size_t{1} << 40)) {
      throw std::invalid_argument("sluice::channel: capacity must be <= 2^40, got " + std::to_string(options.capacity));
    }
    switch (options.full_mode) {
      case channel_full_mode::wait:
      case channel_full_mode::drop_oldest:
      case channel_full_mode::drop_newest:
      case channel_full_mode::reject:
        return options.full_mode;
    }
    throw std::invalid_argument("sluice::channel: full_mode must be wait, drop_oldest, drop_newest or reject, got " +
                                std::to_string(static_cast<int>(options.full_mode)));
  }

  // Hands a dropped item to the callback; counted by the caller before this runs.
  void deliver_drop(T&& victim) noexcept {
    if (!on_drop_) return;
    try {
      on_drop_(std::move(victim));
    } catch (...) {
      drop_errors_.fetch_add(1, std::memory_order_relaxed);  // relaxed: statistics
    }
  }

  // Claims up to `want` positions. In drop_oldest mode a full ring instead evicts the oldest item
  // and claims its slot in one step (channel_ring::evict_oldest_and_claim), retrying while it
  // loses races, so full is never returned there and a send that returns closed never evicted
  // anything. Other modes get claim()'s result as it is.
  detail::claim_result claim_for_send(std::size_t want, pos_type& pos, std::size_t& n) noexcept {
    for (int evict_tries = 0;;) {
      const auto claimed = ring_.claim(want, pos, n);
      if (claimed != detail::claim_result::full || mode_ != channel_full_mode::drop_oldest) return claimed;
      const auto evicted = ring_.evict_oldest_and_claim(pos, [this](T&& victim) noexcept {
        dropped_oldest_.fetch_add(1, std::memory_order_relaxed);  // relaxed: statistics
        deliver_drop(std::move(victim));
      });
      if (evicted != detail::claim_result::full) {
        n = evicted == detail::claim_result::ok ? 1 : 0;
        return evicted;
      }
      backoff(evict_tries);  // lost a race: nothing evicted, try again
    }
  }

  // Right after a successful claim: must this producer wake the consumer once its items are
  // published? Only if the consumer is registered to park, and only the first producer to see that
  // (consumer_woken_): one system call per consumer sleep, however many producers send meanwhile.
  // The claim was a seq_cst CAS on the condition the consumer parks on, so no fence is needed; why
  // the flag cannot lose a wake-up is explained at park_consumer().
  [[nodiscard]] bool must_wake_consumer() noexcept {
    return not_empty_.has_waiters_after_seq_cst_write() &&
           !consumer_woken_.exchange(true, std::memory_order_seq_cst);  // seq_cst: see park_consumer()
  }

  // Producer, full_mode::wait: waits until an eighth of the capacity is free (or the channel closed).
  // Waiting for a chunk rather than one slot is what keeps a full channel fast: otherwise every
  // slot the consumer frees is fought over at once, and the consumer's head_ line bounces between
  // cores on every item. The spin backs off exponentially for the same reason, then the producer
  // parks; the consumer wakes parked producers once a quarter is free or when it runs dry, so the
  // condition then holds. A send whose deadline passes still takes any single free slot (see
  // send_one), so only its timing, never its outcome, depends on the chunk.
  detail::wait_outcome wait_for_space(const deadline_type& deadline, const std::stop_token* stop) noexcept {
    auto ready = [this] { return ring_.has_space_or_closed(space_chunk_); };
    for (int pause = 1, total = 0; total < producer_spin_pauses; total += pause, pause = std::min(2 * pause, 32)) {
      for (int i = 0; i < pause; ++i) detail::cpu_relax();
      if (ready()) return detail::wait_outcome::ready;
    }
    // Then yield a few times: with more producers than cores, the consumer we wait for may be
    // queued behind us on this core, and a yield lets it run without the cost of a park/wake.
    for (int i = 0; i < producer_yields; ++i) {
      std::this_thread::yield();
      if (ready()) return detail::wait_outcome::ready;
    }
    return detail::block_until(not_full_, ready, deadline, stop, 0);
  }

  channel_status send_one(T& value, const deadline_type& deadline, const std::stop_token* stop, bool may_block) noexcept {
    bool timed_out = false;
    for (;;) {
      pos_type pos{};
      std::size_t n = 0;
      const auto claimed = claim_for_send(1, pos, n);
      if (claimed == detail::claim_result::ok) {
        const bool wake = must_wake_consumer();
        ::new (static_cast<void*>(ring_.slot_storage(pos))) T(std::move(value));
        ring_.publish(pos);
        if (wake) not_empty_.notify_one();
        return channel_status::ok;
      }
      if (claimed == detail::claim_result::closed) return channel_status::closed;
      switch (mode_) {
        case channel_full_mode::reject:
          return channel_status::full;
        case channel_full_mode::drop_newest: {
          T victim(std::move(value));
          dropped_newest_.fetch_add(1, std::memory_order_relaxed);  // relaxed: statistics
          deliver_drop(std::move(victim));
          return channel_status::dropped;
        }
        case channel_full_mode::drop_oldest:  // never full: claim_for_send() evicts instead
          break;
        case channel_full_mode::wait:
          if (!may_block) return timed_out ? channel_status::timeout : channel_status::full;
          switch (wait_for_space(deadline, stop)) {
            case detail::wait_outcome::ready: break;
            case detail::wait_outcome::timeout: timed_out = true; may_block = false; break;  // one last try
            case detail::wait_outcome::cancelled: return channel_status::cancelled;
          }
          break;
      }
    }
  }

  std::size_t send_many(std::span<T> items, const deadline_type& deadline, const std::stop_token* stop,
                        bool may_block) noexcept {
    std::size_t done = 0;
    while (done < items.size()) {
      pos_type first{};
      std::size_t n = 0;
      const auto claimed = claim_for_send(items.size() - done, first, n);
      if (claimed == detail::claim_result::ok) {
        const bool wake = must_wake_consumer();
        pos_type p = first;
        for (std::size_t i = 0; i < n; ++i, p = ring_.next(p)) {
          ::new (static_cast<void*>(ring_.slot_storage(p))) T(std::move(items[done + i]));
          ring_.publish(p);
        }
        done += n;
        if (wake) not_empty_.notify_one();
        continue;
      }
      if (claimed == detail::claim_result::closed) return done;
      switch (mode_) {
        case channel_full_mode::reject:
          return done;
        case channel_full_mode::drop_newest:
          for (; done < items.size(); ++done) {
            T victim(std::move(items[done]));
            dropped_newest_.fetch_add(1, std::memory_order_relaxed);  // relaxed: statistics
            deliver_drop(std::move(victim));
          }
          return done;
        case channel_full_mode::drop_oldest:  // never full: claim_for_send() evicts instead
          break;
        case channel_full_mode::wait:
          if (!may_block) return done;
          switch (wait_for_space(deadline, stop)) {
            case detail::wait_outcome::ready: break;
            case detail::wait_outcome::timeout: may_block = false; break;  // one last try
            case detail::wait_outcome::cancelled: return done;
          }
          break;
      }
    }
    return done;
  }

  // drop_oldest: nothing to evict means the consumer is moving the oldest item out right now.
  static void backoff(int& tries) noexcept {
    if (++tries < 64) {
      detail::cpu_relax();
    } else {
      std::this_thread::yield();
    }
  }

  // Consumer: after freeing slots, wake one parked producer once a quarter of the capacity is
  // free (it refills a quarter faster than the consumer drains it; waking them all would only
  // crowd the cores the consumer needs). All of them are woken when the consumer runs dry.
  void freed(std::size_t n) noexcept {
    // relaxed: a statistic with a single writer (this consumer); a plain load + store, no RMW.
    received_.store(received_.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
    freed_since_wake_ += n;
    if (freed_since_wake_ >= wake_batch_) {
      freed_since_wake_ = 0;
      not_full_.notify_one();
    }
  }

  // Consumer: about to wait or return empty-handed: wake producers for whatever was freed.
  void flush_wakes() noexcept {
    if (freed_since_wake_ != 0) {
      freed_since_wake_ = 0;
      not_full_.notify_all();
    }
  }

  // Consumer: waits until an item is readable or the channel is drained. Spins adaptively: longer
  // while spinning keeps paying off (hand-offs between busy threads), shorter while it does not.
  //
  // It parks only while no producer has claimed the head position (pending_or_closed() is false):
  // a producer that claims one after the consumer registered sees it and wakes it after publishing.
  // A producer that claimed before does not wake it, so an item claimed but not yet published is
  // awaited here by spinning, then yielding, then polling every 50 us: that lasts only while a
  // producer is descheduled between its claim and its publish (a few instructions otherwise).
  detail::wait_outcome wait_for_item(const deadline_type& deadline, const std::stop_token* stop) noexcept {
    for (;;) {
      const auto outcome = park_consumer(deadline, stop);
      if (outcome != detail::wait_outcome::ready) return outcome;
      for (int i = 0; !ring_.readable_or_drained(); ++i) {
        if (!ring_.pending_or_closed()) break;  // an evictor took the head item: park again
        if (i < 256) {
          detail::cpu_relax();
          continue;
        }
        if (stop != nullptr && stop->stop_requested()) return detail::wait_outcome::cancelled;
        if (deadline && std::chrono::steady_clock::now() >= *deadline) return detail::wait_outcome::timeout;
        if (i < 256 + 16) {
          std::this_thread::yield();
        } else {
          std::this_thread::sleep_for(std::chrono::microseconds(50));
        }
      }
      if (ring_.readable_or_drained()) return detail::wait_outcome::ready;
    }
  }

  // The consumer's spin-then-park, as detail::block_until() but with one addition: after
  // registering it clears consumer_woken_, so the next producer that sees it registered wakes it.
  // No lost wake-up: registration (seq_cst RMW), the clear (seq_cst store) and the re-check of
  // tail_ (seq_cst load) are in that order in the single total order S; a producer's claim (seq_cst
  // CAS), its waiter check (seq_cst load) and its exchange (seq_cst RMW) likewise. If the producer
  // misses the registration, the re-check sees its claim. If its exchange reads a stale `true`,
  // the exchange precedes the clear in S, so again the re-check sees the claim. Otherwise it wins
  // the exchange and notifies after publishing.
  detail::wait_outcome park_consumer(const deadline_type& deadline, const std::stop_token* stop) noexcept {
    // Spin on the head slot's stamp only: it is the line the next item's producer writes anyway,
    // whereas polling tail_ would steal the producers' hottest line on every iteration.
    // Every 16 pauses (~0.4 us) it yields: when the producer it waits for shares this core (a busy
    // machine), that hands it the core at once instead of burning the rest of the spin; when
    // nobody else wants the core, a yield returns immediately.
    //
    // But yields must not become the only way the two sides hand off: when the producer we wait
    // for shares this core, each side runs a few microseconds and yields to the other, both look
    // cache-hot, and the scheduler never moves either to an idle core (seen: ~280,000 context
    // switches/s, half the throughput). A yield that took long means another thread ran here;
    // after a few such yields in a row the consumer parks instead, and the producer's futex
    // wake-up is what lets the scheduler place it on an idle core.
    const int spins = consumer_spins_;
    bool shared_core = shared_core_yields_ >= max_shared_core_yields;
    for (int i = 0; i < spins && !shared_core; ++i) {
      if (ring_.readable()) {
        consumer_spins_ = std::min(spins * 2, max_consumer_spins);  // spinning paid: spin longer
        return detail::wait_outcome::ready;
      }
      if ((i & 15) == 15) {
        shared_core = timed_yield();
      } else {
        detail::cpu_relax();
      }
    }
    if (!shared_core) consumer_spins_ = std::max(spins / 2, min_consumer_spins);  // did not pay: spin less
    if (ring_.pending_or_closed()) return detail::wait_outcome::ready;
    flush_wakes();  // about to park: producers waiting for the slots we freed go first
    if (!shared_core) std::this_thread::yield();  // lets a preempted producer on this core finish first
    shared_core_yields_ = 0;

    auto park = [&]() noexcept -> detail::wait_outcome {
      for (;;) {
        const auto key = not_empty_.prepare_wait();
        consumer_woken_.store(false, std::memory_order_seq_cst);  // seq_cst: see above
        if (ring_.pending_or_closed()) {
          not_empty_.cancel_wait();
          return detail::wait_outcome::ready;
        }
        if (stop != nullptr && stop->stop_requested()) {
          not_empty_.cancel_wait();
          return detail::wait_outcome::cancelled;
        }
        if (deadline) {
          if (!not_empty_.wait_until(key, *deadline)) {
            return ring_.pending_or_closed() ? detail::wait_outcome::ready : detail::wait_outcome::timeout;
          }
        } else {
          not_empty_.wait(key);
        }
      }
    };
    if (stop != nullptr && stop->stop_possible()) {
      std::stop_callback on_stop(*stop, [this]() noexcept { not_empty_.notify_all(); });
      return park();
    }
    return park();
  }

  // Consumer: yields, and returns true once yields that let another thread run on this core (it took
  // over shared_core_yield) have come max_shared_core_yields times in a row.
  bool timed_yield() noexcept {
    const auto start = std::chrono::steady_clock::now();
    std::this_thread::yield();
    if (std::chrono::steady_clock::now() - start < shared_core_yield) {
      shared_core_yields_ = 0;
      return false;
    }
    return ++shared_core_yields_ >= max_shared_core_yields;
  }

  std::optional<T> receive_one(const deadline_type& deadline, const std::stop_token* stop, bool may_block) noexcept {
    std::optional<T> out;
    auto sink = [&out](T&& item) noexcept { out.emplace(std::move(item)); };
    for (;;) {
      if (ring_.read(1, sink) != 0) {
        freed(1);
        return out;
      }
      if (!may_block || drained_seen_) {
        flush_wakes();
        return out;
      }
      const auto outcome = wait_for_item(deadline, stop);
      if (ring_.read(1, sink) != 0) {  // also the last look after a timeout or a stop
        freed(1);
        return out;
      }
      if (outcome != detail::wait_outcome::ready || (drained_seen_ = ring_.drained())) {
        flush_wakes();
        return out;
      }
    }
  }

  std::size_t receive_many(std::vector<T>& out, std::size_t max, const deadline_type& deadline,
                           const std::stop_token* stop, bool may_block) {
    if (max == 0) return 0;
    max = std::min(max, capacity());
    if (out.capacity() - out.size() < max) out.reserve(std::max(out.size() + max, 2 * out.capacity()));
    auto sink = [&out](T&& item) noexcept { out.push_back(std::move(item)); };  // cannot reallocate: reserved
    for (;;) {
      if (const std::size_t n = ring_.read(max, sink); n != 0) {
        freed(n);
        return n;
      }
      if (!may_block || drained_seen_) {
        flush_wakes();
        return 0;
      }
      const auto outcome = wait_for_item(deadline, stop);
      if (const std::size_t n = ring_.read(max, sink); n != 0) {  // also the last look
        freed(n);
        return n;
      }
      if (outcome != detail::wait_outcome::ready || (drained_seen_ = ring_.drained())) {
        flush_wakes();
        return 0;
      }
    }
  }

  static constexpr int producer_spin_pauses = 64;  // ~1.5 us of pause, polling 7 times
  static constexpr int producer_yields = 16;       // then up to 16 yields before parking
  // The consumer's spin adapts between about a futex wake-up's cost (~6 us: below that, a partner
  // that just parked can never be caught, and both sides would settle into paying a park/wake
  // per hand-off) and twice it (~50 us at most, however well spinning pays).
  static constexpr int min_consumer_spins = 256;   // pauses; ~25 ns each on current x86
  static constexpr int max_consumer_spins = 2048;
  // A yield this long let another thread run on this core (an uncontended one returns in < 1 us).
  static constexpr std::chrono::microseconds shared_core_yield{2};
  static constexpr int max_shared_core_yields = 4;  // such yields in a row: park instead of yielding

  const channel_full_mode mode_;
  const std::function<void(T&&)> on_drop_;
  const std::size_t wake_batch_;   // freed slots per producer wake-up: capacity / 4
  const std::size_t space_chunk_;  // free slots a waiting producer waits for: capacity / 8
  ring_type ring_;
  // Consumer-private state (one consumer at a time): not atomic, never touched by producers.
  std::size_t freed_since_wake_ = 0;
  std::atomic<std::uint64_t> received_{0};  // written by the consumer only (in freed())
  bool drained_seen_ = false;  // closed and drained is final: later receives return at once
  int consumer_spins_ = 512;
  int shared_core_yields_ = 0;  // consecutive yields during which another thread ran on this core
  // Slow-path counters, on their own line: producers touch them only when dropping.
  alignas(detail::cache_line) std::atomic<std::uint64_t> dropped_oldest_{0};
  std::atomic<std::uint64_t> dropped_newest_{0};
  std::atomic<std::uint64_t> drop_errors_{0};
  // Each event_count on its own line: producers park on not_full_, the consumer on not_empty_.
  alignas(detail::cache_line) detail::event_count not_full_;
  alignas(detail::cache_line) detail::event_count not_empty_;
  std::atomic<bool> consumer_woken_{false};  // see park_consumer()
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
