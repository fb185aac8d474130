// sluice/detail/write_behind_engine.hpp — the machinery behind sluice::write_behind (not public API;
// include <sluice/write_behind.hpp>, whose doc block states what this guarantees).
//
// Layout:
//  - Intake: a sluice::channel of bare values (a ring slot holds T and its stamp, nothing else).
//    Producers claim lock-free (the fast path makes no clock read and no system call); flushers
//    drain it with try_receive_batch under their lock and stamp what they take. A producer that
//    finds it full parks at once (no spin) until a quarter of it is free: one wake-up per chunk,
//    not per batch (a futex round trip per 512 values cost more than the values on 2 cores).
//  - Parking: flushers park on work_ec_ through the Clock, so linger, backoff and the drain deadline
//    run on a manual_clock in tests. A parked flusher publishes how many intake values make waking
//    it worthwhile (wake_threshold_); only the first producer that sees it reached makes the
//    system call (wake_sent_). Blocked producers park on space_ec_, flush() on done_ec_.
//  - Held values: unkeyed, a FIFO of staged slots plus due retries; keyed, write_behind_keys (one
//    entry per key with state, a FIFO of ready keys). Retries wait in an indexed deadline heap
//    (keyed by Key, so a newer value removes the waiting retry in O(log n)).
//  - flush(): write_behind_generations.
// Everything except the atomics and the event counts is guarded by m_; the sink and on_failed run
// outside it.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <limits>
#include <mutex>
#include <optional>
#include <random>
#include <span>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "../backoff.hpp"
#include "../channel.hpp"
#include "../clock.hpp"
#include "../key.hpp"
#include "event_count.hpp"
#include "indexed_heap.hpp"
#include "write_behind_generations.hpp"
#include "write_behind_keys.hpp"
#include "write_behind_results.hpp"

namespace sluice {

template <class T, class Key>
struct write_behind_options;  // defined in <sluice/write_behind.hpp>

namespace detail {

template <class T, class Key>
concept has_key_member = requires(const T& v) {
  { v.key } -> std::convertible_to<Key>;
};
template <class F>
struct is_std_function : std::false_type {};
template <class R, class... A>
struct is_std_function<std::function<R(A...)>> : std::true_type {};

/// The sink as the engine calls it. Empty if `sink` is an empty std::function or a null pointer.
template <class T, class Sink>
std::function<void(std::span<const T>, write_behind_results&)> make_write_behind_sink(Sink sink) {
  using sink_type = std::function<void(std::span<const T>, write_behind_results&)>;
  if constexpr (std::is_pointer_v<Sink> || is_std_function<Sink>::value) {
    if (!sink) return sink_type{};
  }
  if constexpr (std::is_invocable_v<Sink&, std::span<const T>, write_behind_results&>) {
    return sink_type(std::move(sink));
  } else {
    return [s = std::move(sink)](std::span<const T> batch, write_behind_results&) mutable { s(batch); };
  }
}

/// Asks the scheduler to give the calling thread time slices of `slice` (Linux >= 6.12: EEVDF's
/// per-task slice, sched_attr.sched_runtime of a SCHED_OTHER / SCHED_BATCH thread; no privilege
/// needed). Keeps the thread's policy and nice value; does nothing where unsupported. Returns
/// whether the kernel accepted it.
inline bool request_time_slice(std::chrono::nanoseconds slice) noexcept {
#if defined(__linux__) && defined(SYS_sched_getattr) && defined(SYS_sched_setattr)
  struct {  // struct sched_attr (SCHED_ATTR_SIZE_VER1), which glibc does not declare
    std::uint32_t size;
    std::uint32_t policy;
    std::uint64_t flags;
    std::int32_t nice;
    std::uint32_t priority;
    std::uint64_t runtime;
    std::uint64_t deadline;
    std::uint64_t period;
    std::uint32_t util_min;
    std::uint32_t util_max;
  } attr{};
  attr.size = sizeof attr;
  if (::syscall(SYS_sched_getattr, 0, &attr, sizeof attr, 0) != 0) return false;
  if (attr.policy != 0 && attr.policy != 3) return false;  // SCHED_OTHER, SCHED_BATCH only
  attr.size = sizeof attr;
  attr.flags = 0;
  attr.runtime = static_cast<std::uint64_t>(slice.count());
  return ::syscall(SYS_sched_setattr, 0, &attr, 0) == 0;
#else
  (void)slice;
  return false;
#endif
}

/// The text of the exception being handled (call inside a catch block).
inline std::string current_exception_text() {
  try {
    throw;
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "unknown exception";
  }
}

template <class T, class Key, class Clock, class Hash, class KeyEqual>
class write_behind_engine {
  static constexpr bool keyed = !std::is_void_v<Key>;
  // Hash / KeyEqual, or stand-ins when write_behind's static_assert on Key fails (so that it is the
  // only error).
  template <class K, bool = std::is_void_v<K>>
  struct key_types {
    using hash = checked_hash<K, Hash, KeyEqual>;
    using equal = checked_key_equal<K, Hash, KeyEqual>;
  };
  template <class K>
  struct key_types<K, true> {
    using hash = std::hash<std::uint64_t>;
    using equal = std::equal_to<std::uint64_t>;
  };
  using hash_type = typename key_types<Key>::hash;
  using key_equal_type = typename key_types<Key>::equal;

 public:
  using time_point = typename Clock::time_point;
  using options_type = write_behind_options<T, Key>;
  using sink_type = std::function<void(std::span<const T>, write_behind_results&)>;

 private:
  // One value and what the batcher knows about it, once a flusher has taken it from the intake.
  struct slot {
    T value;
    time_point enqueued;
    std::uint64_t gen = 0;       // flush generation (assigned when taken from the intake)
    std::uint32_t attempts = 0;  // sink calls that included it so far
  };
  struct meta {
    time_point enqueued;
    std::uint64_t gen;
    std::uint32_t attempts;
  };
  struct failure_item {
    T value;
    write_behind_failure failure;
    std::uint64_t gen;
  };

  struct no_keys {};
  template <class K, bool = std::is_void_v<K>>
  struct keys_of {
    using type = write_behind_keys<K, slot, hash_type, key_equal_type>;
    using entry_ptr = typename type::entry*;
  };
  template <class K>
  struct keys_of<K, true> {
    using type = no_keys;
    using entry_ptr = no_keys;
  };
  using key_table = typename keys_of<Key>::type;
  using entry_ptr = typename keys_of<Key>::entry_ptr;  // keyed: the entry of a value in a batch

  // What one flusher carries through a sink call; reused from call to call.
  struct batch_buffer {
    std::vector<T> values;
    std::vector<meta> metas;
    std::vector<entry_ptr> owners;  // keyed: the key of each value
    write_behind_results results;
    std::vector<failure_item> failures;  // to report, outside the lock
    time_point oldest{};
    bool in_sink = false;
    std::size_t last_take = 0;  // values the last take from the intake got
    bool threw = false;  // the last sink call threw
    std::string thrown;  // ...with this text
  };

  using retry_key = std::conditional_t<keyed, Key, std::uint64_t>;
  // When T cannot move (write_behind's static_asserts fail), the intake and the heap hold a
  // stand-in so that the assertion is the only error, not a cascade from inside them.
  struct unusable_slot {};
  using stored_slot = std::conditional_t<std::is_nothrow_move_constructible_v<T>, slot, unusable_slot>;
  using stored_value = std::conditional_t<std::is_nothrow_move_constructible_v<T>, T, unusable_slot>;
  using retry_heap = indexed_heap<retry_key, stored_slot, time_point, hash_type, key_equal_type>;

 public:
  /// Validates the options, starts options.flushers flusher threads. Throws std::invalid_argument
  /// (bad options, empty sink, keyed without key_of and without a .key member), std::bad_alloc,
  /// std::system_error.
  write_behind_engine(options_type options, sink_type sink, Clock clock)
      : options_(validate(std::move(options))),
        sink_(std::move(sink)),
        clock_(std::move(clock)),
        intake_(options_.capacity),
        space_chunk_(std::max<std::size_t>(1, options_.capacity / 4)),
        keys_(make_keys()),
        heap_(make_retry_heap()),
        policy_(options_.retry),
        rng_(options_.seed != 0 ? options_.seed : std::random_device{}()),
        buffers_(options_.flushers) {
    if (!sink_) throw std::invalid_argument("sluice::write_behind: sink must be callable, got an empty function");
    if constexpr (keyed) {
      if (!options_.key_of) {
        if constexpr (has_key_member<T, Key>) {
          options_.key_of = [](const T& v) -> Key { return Key(v.key); };
        } else {
          throw std::invalid_argument(
              "sluice::write_behind: key_of must be set (T has no .key member convertible to Key), got an empty function");
        }
      }
    }
    threads_.reserve(options_.flushers);
    try {
      for (std::size_t i = 0; i < options_.flushers; ++i) {
        threads_.emplace_back([this, i] {
          if (options_.flusher_slice.count() != 0) request_time_slice(options_.flusher_slice);
          flusher_main(buffers_[i]);
        });
      }
    } catch (...) {
      stop();
      throw;
    }
  }

  write_behind_engine(const write_behind_engine&) = delete;
  write_behind_engine& operator=(const write_behind_engine&) = delete;
  ~write_behind_engine() { stop(); }

  [[nodiscard]] const Clock& clock() const noexcept { return clock_; }
  [[nodiscard]] const options_type& options() const noexcept { return options_; }
  [[nodiscard]] bool is_stopped() const noexcept { return intake_.is_closed(); }

  // ---- intake ----

  // ok and the value is taken, or another status and `value` is as it was. `deadline` nullopt:
  // no limit; `stop` may be null; may_block false: full instead of waiting.
  write_behind_status put(T& value, const std::optional<time_point>& deadline, const std::stop_token* stop,
                          bool may_block) noexcept {
    // The intake holds the bare value: no clock read here (on these VMs a steady_clock::now() costs
    // as much as the whole send) and nothing else to copy. The flusher stamps values as it takes
    // them (see take_from_intake_locked()). A send that fails leaves `value` as it was.
    channel_status st = intake_.try_send(std::move(value));
    if (st == channel_status::full && may_block) {
      // Park at once (no spinning: room comes in chunks, a batch at a time) until a chunk of the
      // intake is free, so that a producer wakes once per chunk rather than once per batch; after
      // a wake-up any free slot will do, so that a parked producer is not starved by running ones.
      int looks = 0;
      auto ready = [&] {
        if (++looks <= 2 && options_.capacity - std::min(options_.capacity, intake_.size()) < space_chunk_ &&
            !intake_.is_closed()) {
          return false;
        }
        st = intake_.try_send(std::move(value));
        return st != channel_status::full;
      };
      const auto outcome = block_on_clock(clock_, space_ec_, ready, deadline, stop, 0);
      if (st == channel_status::full) {
        return outcome == wait_outcome::cancelled ? write_behind_status::cancelled : write_behind_status::timeout;
      }
    }
    switch (st) {
      case channel_status::ok:
        wake_flusher();
        return write_behind_status::ok;
      case channel_status::closed:
        return write_behind_status::closed;
      default:
        return write_behind_status::full;
    }
  }

  // ---- flush and stop ----

  // True once everything enqueued before the call is resolved; false at `deadline`.
  bool flush(const std::optional<time_point>& deadline) {
    std::uint64_t gen;
    {
      std::lock_guard lock(m_);
      // Every value accepted before this point has an intake index below the boundary.
      gen = gens_.seal(intake_.accepted());
      retire_generations_locked();
    }
    work_ec_.notify_all();  // batches go out now, without lingering
    auto done = [&] { return gens_.completed() > gen; };
    const auto outcome = block_on_clock(clock_, done_ec_, done, deadline, nullptr);
    return outcome == wait_outcome::ready;
  }

  void stop() noexcept {
    std::lock_guard stop_lock(stop_mutex_);
    if (stopped_) return;
    {
      std::lock_guard lock(m_);
      stopping_ = true;
      drain_deadline_ = saturating_add(clock_.now(), options_.drain_timeout);
    }
    intake_.close();
    work_ec_.notify_all();
    space_ec_.notify_all();
    for (auto& t : threads_) {
      if (t.joinable()) t.join();
    }
    // Flushers that could not start (constructor failure) leave their work here.
    {
      std::unique_lock lock(m_);
      drain_deadline_ = time_point::min();
      batch_buffer& b = buffers_.front();
      expire_locked(b);
      report_failures(lock, b);
    }
    stopped_ = true;
    done_ec_.notify_all();
  }

  // ---- observers ----

  [[nodiscard]] write_behind_metrics metrics() const {
    std::lock_guard lock(m_);
    write_behind_metrics out;
    out.enqueued = intake_.accepted();
    out.in_intake = intake_.size();
    out.persisted = persisted_;
    out.failed = failed_;
    out.coalesced = coalesced_;
    out.retries = retries_;
    out.batches = batches_;
    out.sink_errors = sink_errors_;
    out.on_failed_errors = on_failed_errors_;
    // Due retries count as in_retry until a batch takes them, in both modes (keyed: they sit in
    // their key's pending slot, ready_retries_ of them).
    if constexpr (keyed) {
      out.pending = pending_values_ - ready_retries_;
      out.in_retry = heap_.size() + ready_retries_;
    } else {
      out.pending = pending_count_locked();
      out.in_retry = heap_.size() + retry_ready_.size();
    }
    out.in_flight = in_flight_;
    std::optional<time_point> oldest;
    auto consider = [&](time_point t) {
      if (!oldest || t < *oldest) oldest = t;
    };
    if constexpr (keyed) {
      if (keys_.ready_front() != nullptr) consider(keys_.ready_front()->pending->enqueued);
    } else {
      if (staged_head_ < staged_.size()) consider(staged_[staged_head_].enqueued);
      if (!retry_ready_.empty()) consider(retry_ready_.front().enqueued);
    }
    for (const auto& b : buffers_) {
      if (b.in_sink) consider(b.oldest);
    }
    if (oldest) {
      const auto age = clock_.now() - *oldest;
      out.oldest_pending_age = std::max(std::chrono::duration_cast<std::chrono::nanoseconds>(age),
                                        std::chrono::nanoseconds::zero());
    }
    return out;
  }

 private:
  // ---- construction helpers ----
  static options_type validate(options_type o) {
    using std::to_string;
    auto bad = [](const std::string& what) { throw std::invalid_argument("sluice::write_behind: " + what); };
    auto ns = [](std::chrono::nanoseconds d) { return to_string(d.count()) + "ns"; };
    if (o.capacity == 0) bad("capacity must be >= 1, got 0");
    if (o.capacity > (std::size_t{1} << 32)) bad("capacity must be <= 2^32, got " + to_string(o.capacity));
    if (o.max_batch == 0) bad("max_batch must be >= 1, got 0");
    if (o.max_batch > o.capacity) {
      bad("max_batch must be <= capacity (" + to_string(o.capacity) + "), got " + to_string(o.max_batch));
    }
    if (o.linger < o.linger.zero()) bad("linger must be >= 0, got " + ns(o.linger));
    if (o.flushers == 0 || o.flushers > 256) bad("flushers must be in [1, 256], got " + to_string(o.flushers));
    if (o.flusher_slice.count() != 0 &&
        (o.flusher_slice < std::chrono::microseconds(100) || o.flusher_slice > std::chrono::milliseconds(100))) {
      bad("flusher_slice must be 0 or in [100000ns, 100000000ns], got " + ns(o.flusher_slice));
    }
    if (o.drain_timeout < o.drain_timeout.zero()) bad("drain_timeout must be >= 0, got " + ns(o.drain_timeout));
    if (o.retry.base <= o.retry.base.zero()) bad("retry.base must be > 0, got " + ns(o.retry.base));
    if (o.retry.max < o.retry.base) {
      bad("retry.max must be >= retry.base (" + ns(o.retry.base) + "), got " + ns(o.retry.max));
    }
    if (!(o.retry.multiplier >= 1.0) || !(o.retry.multiplier < std::numeric_limits<double>::infinity())) {
      bad("retry.multiplier must be finite and >= 1, got " + to_string(o.retry.multiplier));
    }
    switch (o.retry.jitter) {
      case jitter_mode::none:
      case jitter_mode::full:
      case jitter_mode::equal:
        break;
      default:
        bad("retry.jitter must be none, full or equal, got " + to_string(static_cast<int>(o.retry.jitter)));
    }
    return o;
  }

  key_table make_keys() const {
    if constexpr (keyed) {
      return key_table(options_.max_batch);  // keep up to max_batch spare nodes
    } else {
      return key_table{};
    }
  }

  retry_heap make_retry_heap() {
    if constexpr (keyed) {
      return retry_heap(hash_type{}, key_equal_type{});
    } else {
      return retry_heap();
    }
  }

  // A producer that just sent: wake a parked flusher if the intake now holds what it waits for.
  void wake_flusher() noexcept {
    // No fence: the send's claim was a seq_cst RMW on the intake's tail (channel_ring.hpp: it is the
    // write behind event_count::has_waiters_after_seq_cst_write()), sequenced before this seq_cst
    // load. Either we see the flusher's registration, or it precedes its seq_cst fence in
    // park_locked() and the flusher's size() re-check, which reads that tail, sees our value
    // (store-buffering excluded). The fence this replaces was a quarter of all CPU in the 2-producer
    // benchmark (a `lock or` waiting for the slot's store to drain on every enqueue).
    if (!work_ec_.has_waiters_after_seq_cst_write()) return;
    // seq_cst: the threshold is stored before the flusher's seq_cst prepare_wait(), which our
    // seq_cst waiter-count read observed, so this load sees that threshold or a later one.
    if (intake_.size() < wake_threshold_.load(std::memory_order_seq_cst)) return;
    // Only the first producer to get here wakes: until the flusher runs again its registration
    // stays visible, and without the flag every send in that window would make a system call.
    // seq_cst: the flusher clears the flag between registering and re-checking (park_locked()).
    if (wake_sent_.load(std::memory_order_seq_cst) || wake_sent_.exchange(true, std::memory_order_seq_cst)) return;
    // The one clock read on the producer side, once per flusher sleep: what the flusher takes next
    // counts from now, not from when it gets a core (see take_from_intake_locked()).
    // relaxed: a hint; the flusher reads it after the wake-up, which the notify orders.
    woken_at_.store(std::chrono::duration_cast<std::chrono::nanoseconds>(clock_.now().time_since_epoch()).count(),
                    std::memory_order_relaxed);
    work_ec_.notify_one();
  }

  // ---- flusher ----
  void flusher_main(batch_buffer& b) noexcept {
    std::unique_lock lock(m_);
    for (;;) {
      time_point now = clock_.now();
      if (stopping_ && now >= drain_deadline_) expire_locked(b);
      promote_due_retries_locked(now);
      take_from_intake_locked(b, now);
      if (!b.failures.empty()) {
        report_failures(lock, b);
        continue;
      }
      if (batch_due_locked(now)) {
        take_batch_locked(b);
        if (options_.flushers > 1) {
          if (batch_due_locked(now) || intake_.size() >= options_.max_batch) {
            work_ec_.notify_one();  // more than one batch's worth: let another flusher take it
          }
          // This flusher is no longer the one producers woke: the next value that completes what
          // the parked ones wait for must wake one of them.
          wake_threshold_.store(threshold_locked(), std::memory_order_seq_cst);  // seq_cst: see wake_flusher()
          wake_sent_.store(false, std::memory_order_seq_cst);
        }
        lock.unlock();
        run_sink(b);
        lock.lock();
        complete_batch_locked(b, clock_.now());
        report_failures(lock, b);
        continue;
      }
      if (stopping_ && all_done_locked()) {
        work_ec_.notify_all();  // the other flushers see it too and exit
        return;
      }
      park_locked(lock, b.last_take);
    }
  }

  [[nodiscard]] bool force_locked() const noexcept { return stopping_ || gens_.forcing(taken_); }

  [[nodiscard]] std::size_t held_locked() const noexcept {
    if constexpr (keyed) {
      return keys_.size();
    } else {
      return (staged_.size() - staged_head_) + retry_ready_.size() + heap_.size();
    }
  }

  [[nodiscard]] std::size_t pending_count_locked() const noexcept {
    if constexpr (keyed) {
      return pending_values_;
    } else {
      return staged_.size() - staged_head_;
    }
  }

  [[nodiscard]] std::size_t ready_count_locked() const noexcept {
    if constexpr (keyed) {
      return keys_.ready_count();
    } else {
      return (staged_.size() - staged_head_) + retry_ready_.size();
    }
  }

  [[nodiscard]] bool all_done_locked() const noexcept {
    return intake_.is_drained() && held_locked() == 0 && in_flight_ == 0;
  }

  void retire_generations_locked() noexcept {
    if (gens_.retire(taken_)) done_ec_.notify_all();
  }

  // resolved() for every value of a batch (runs of one generation at a time).
  void resolve_all_locked(const std::vector<meta>& metas) noexcept {
    for_each_gen_run(metas, [&](std::uint64_t gen, std::size_t n) { gens_.resolved(gen, n); });
  }

  // Moves values from the intake into the flushers' hands, while they hold fewer than capacity.
  //
  // Values are stamped here, with one clock read per take: the time a value starts to count toward
  // linger and oldest_pending_age. A flusher that is idle or lingering is woken by the first value
  // (and by a full batch), so the stamp is the enqueue time plus a wake-up; while every flusher is
  // in the sink, values wait in the intake unstamped and a full batch goes as soon as one returns.
  void take_from_intake_locked(batch_buffer& b, time_point now) {
    // A producer that woke us stamped the time it enqueued: values taken now are no younger.
    // relaxed: a hint (see wake_flusher()).
    const time_point took_at = now;
    // (Looked at before the exchange: a take that nobody woke leaves the producers' line alone.)
    if (const auto w = woken_at_.load(std::memory_order_relaxed) == no_stamp
                           ? no_stamp
                           : woken_at_.exchange(no_stamp, std::memory_order_relaxed);
        w != no_stamp) {
      const time_point at(std::chrono::duration_cast<typename Clock::duration>(std::chrono::nanoseconds(w)));
      if (at < now) now = at;
    }
    // Values that arrived while no flusher was parked idle (all in the sink, or lingering) woke
    // nobody and carry no stamp; they all came after the last take that emptied the intake, so
    // they count from that take: at worst a little early, never a sink call late (the take time
    // would make a value that arrived as a sink call began wait linger + that call).
    if (empty_since_ && *empty_since_ < now) now = *empty_since_;
    const std::size_t held = held_locked();
    const bool unlimited = stopping_ && drain_expired_;
    b.last_take = 0;
    if (!unlimited && held >= options_.capacity) return;
    const std::size_t room = unlimited ? intake_.capacity() : options_.capacity - held;
    const std::size_t got = intake_.try_receive_batch(received_, room);
    b.last_take = got;
    // Generations in runs: the values of one take have consecutive intake indexes, and a run ends
    // only at a flush() boundary (usually there is none, and the take is one run).
    std::size_t i = 0;
    std::size_t cursor = 0;
    while (i < got) {
      const std::uint64_t gen = gens_.of_index(taken_, cursor);
      const std::size_t run = static_cast<std::size_t>(std::min<std::uint64_t>(got - i, gens_.run_left(taken_, cursor)));
      gens_.taken(gen, run);
      taken_ += run;
      if constexpr (keyed) {
        for (std::size_t end = i + run; i < end; ++i) absorb_locked(slot{std::move(received_[i]), now, gen, 0}, b);
      } else {
        gens_.ready_add(gen, run);
        for (std::size_t end = i + run; i < end; ++i) staged_.push_back(slot{std::move(received_[i]), now, gen, 0});
      }
    }
    received_.clear();
    if (got < room) empty_since_ = took_at;  // it gave us everything it had
    if (got != 0) {
      // Producers parked on a full intake wake once a chunk is free (they wait for that much), not
      // once per take: a futex round trip per batch cost more than the batch on 2 cores.
      if (intake_.capacity() - std::min(intake_.capacity(), intake_.size()) >= space_chunk_) space_ec_.notify_all();
      if (unlimited) expire_locked(b);
    }
    retire_generations_locked();
  }

  // Keyed: a value taken from the intake meets its key's state.
  void absorb_locked(slot&& s, batch_buffer& b) {
    if constexpr (keyed) {
      // A throwing user key function, Hash, KeyEqual or Key move reports the value permanent.
      auto report_permanent = [&](const char* what) {
        ++in_flight_;  // reported below, counted as in flight until then
        b.failures.push_back(failure_item{
            std::move(s.value), write_behind_failure{write_behind_reason::permanent, what + current_exception_text(), 0},
            s.gen});
      };
      std::optional<Key> k;
      try {
        k.emplace(options_.key_of(s.value));
      } catch (...) {
        report_permanent("key_of threw: ");
        return;
      }
      // The user's Hash / KeyEqual and Key's move may throw (and a new map node may not be
      // allocated): the value is then reported permanent, never allowed to kill the flusher. A key
      // that hashed once is hashed again later (retry heap, erase): Hash must be deterministic.
      typename key_table::entry* found = nullptr;
      try {
        found = &keys_.find_or_insert(std::move(*k));
        if (!found->pending && found->retry_waiting) {
          // A newer value supersedes the one waiting to be retried: the old one is never written.
          auto old = heap_.erase(heap_.find(*found->key));
          ++coalesced_;
          gens_.resolved(old.item.gen);
          found->retry_waiting = false;
        }
      } catch (...) {
        report_permanent("key lookup threw: ");
        return;
      }
      auto& e = *found;
      if (e.pending) {
        if (e.pending->attempts > 0) --ready_retries_;
        ++coalesced_;
        gens_.resolved(e.pending->gen);
        gens_.ready_sub(e.pending->gen);
        gens_.ready_add(s.gen);
        // The key has had a value waiting since the older stamp: linger (and oldest_pending_age)
        // count from it, or a key updated more often than linger at the FIFO head would defer the
        // batch again and again (each newer value restarting the wait).
        const time_point since = std::min(e.pending->enqueued, s.enqueued);
        *e.pending = std::move(s);  // keeps its place in the ready FIFO
        e.pending->enqueued = since;
        return;
      }
      gens_.ready_add(s.gen);
      e.pending.emplace(std::move(s));
      ++pending_values_;
      if (!e.in_flight) keys_.push_ready(e);
    } else {
      (void)s;
      (void)b;
    }
  }

  void promote_due_retries_locked(time_point now) {
    while (!heap_.empty() && heap_.top_deadline() <= now) {
      auto [payload, due] = heap_.pop_top();
      (void)due;
      gens_.ready_add(payload.item.gen);
      if constexpr (keyed) {
        auto& e = keys_.at(payload.key);
        e.retry_waiting = false;
        e.pending.emplace(std::move(payload.item));
        ++pending_values_;
        ++ready_retries_;
        keys_.push_ready(e);
      } else {
        retry_ready_.push_back(std::move(payload.item));
      }
    }
  }

  [[nodiscard]] std::optional<time_point> linger_start_locked() const noexcept {
    if constexpr (keyed) {
      if (keys_.ready_front() != nullptr) return keys_.ready_front()->pending->enqueued;
    } else {
      if (staged_head_ < staged_.size()) return staged_[staged_head_].enqueued;
    }
    return std::nullopt;
  }

  [[nodiscard]] bool batch_due_locked(time_point now) const noexcept {
    const std::size_t n = ready_count_locked();
    if (n == 0) return false;
    if (n >= options_.max_batch || force_locked()) return true;
    if constexpr (keyed) {
      if (ready_retries_ > 0) return true;
    } else {
      if (!retry_ready_.empty()) return true;
    }
    const auto start = linger_start_locked();
    return start && now >= saturating_add(*start, options_.linger);
  }

  // Moves one value into the batch; the caller accounts for it leaving the ready structures.
  static void add_to_batch(batch_buffer& b, slot&& s) {
    if (b.values.empty() || s.enqueued < b.oldest) b.oldest = s.enqueued;
    b.values.push_back(std::move(s.value));
    b.metas.push_back(meta{s.enqueued, s.gen, s.attempts});
  }

  // Calls f(gen, n) for each run of n consecutive values of one generation.
  template <class F>
  static void for_each_gen_run(const std::vector<meta>& metas, F&& f) {
    std::size_t i = 0;
    while (i < metas.size()) {
      const std::uint64_t gen = metas[i].gen;
      std::size_t j = i + 1;
      while (j < metas.size() && metas[j].gen == gen) ++j;
      f(gen, j - i);
      i = j;
    }
  }

  void take_batch_locked(batch_buffer& b) {
    b.values.clear();
    b.metas.clear();
    b.owners.clear();
    const std::size_t max = options_.max_batch;
    if constexpr (keyed) {
      while (b.values.size() < max && keys_.ready_front() != nullptr) {
        auto* e = keys_.pop_ready();
        slot& s = *e->pending;
        if (s.attempts > 0) --ready_retries_;
        gens_.ready_sub(s.gen);
        add_to_batch(b, std::move(s));
        e->pending.reset();
        --pending_values_;
        e->in_flight = true;
        b.owners.push_back(e);
      }
    } else {
      std::size_t r = 0;
      for (; r < retry_ready_.size() && b.values.size() < max; ++r) add_to_batch(b, std::move(retry_ready_[r]));
      retry_ready_.erase(retry_ready_.begin(), retry_ready_.begin() + static_cast<std::ptrdiff_t>(r));
      while (b.values.size() < max && staged_head_ < staged_.size()) add_to_batch(b, std::move(staged_[staged_head_++]));
      if (staged_head_ == staged_.size()) {
        staged_.clear();
        staged_head_ = 0;
      } else if (staged_head_ >= 4096 && staged_head_ * 2 >= staged_.size()) {
        staged_.erase(staged_.begin(), staged_.begin() + static_cast<std::ptrdiff_t>(staged_head_));
        staged_head_ = 0;
      }
      for_each_gen_run(b.metas, [&](std::uint64_t gen, std::size_t n) { gens_.ready_sub(gen, n); });
    }
    in_flight_ += b.values.size();
    b.in_sink = true;
  }

  // Outside the lock: one sink call; a throw makes the whole batch retryable.
  void run_sink(batch_buffer& b) noexcept {
    b.threw = false;
    try {
      b.results.reset(b.values.size());
      sink_(std::span<const T>(b.values.data(), b.values.size()), b.results);
    } catch (...) {
      b.threw = true;
      try {
        b.thrown = current_exception_text();
      } catch (...) {
        b.thrown.clear();
      }
    }
  }

  [[nodiscard]] std::chrono::nanoseconds retry_delay_locked(std::uint32_t failures, std::chrono::nanoseconds hint) {
    std::chrono::nanoseconds d = policy_.exponential(failures);
    const double v = static_cast<double>(d.count());
    const double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng_);
    switch (options_.retry.jitter) {
      case jitter_mode::none: break;
      case jitter_mode::full: d = std::chrono::nanoseconds(static_cast<std::int64_t>(v * u)); break;
      case jitter_mode::equal: d = std::chrono::nanoseconds(static_cast<std::int64_t>(v / 2 + v / 2 * u)); break;
    }
    return std::max(d, hint);
  }

  void fail_later(batch_buffer& b, T&& value, write_behind_reason reason, std::string message, std::uint32_t attempts,
                  std::uint64_t gen) {
    b.failures.push_back(failure_item{std::move(value), write_behind_failure{reason, std::move(message), attempts}, gen});
  }

  void complete_batch_locked(batch_buffer& b, time_point now) {
    const std::size_t n = b.values.size();
    b.in_sink = false;
    ++batches_;
    if (b.threw) ++sink_errors_;
    std::size_t resolved_here = 0;
    if constexpr (!keyed) {
      if (!b.threw && !b.results.any_marked()) {  // the common case: the whole batch persisted
        persisted_ += n;
        resolve_all_locked(b.metas);
        in_flight_ -= n;
        retire_generations_locked();
        return;
      }
    }
    for (std::size_t i = 0; i < n; ++i) {
      meta& m = b.metas[i];
      const std::uint32_t attempts = m.attempts + 1;
      const write_behind_outcome outcome = b.threw ? write_behind_outcome::retry : b.results.outcome(i);
      [[maybe_unused]] entry_ptr owner{};
      if constexpr (keyed) {
        owner = b.owners[i];
        owner->in_flight = false;
      }
      switch (outcome) {
        case write_behind_outcome::persisted:
          ++persisted_;
          gens_.resolved(m.gen);
          ++resolved_here;
          break;
        case write_behind_outcome::fail:
          fail_later(b, std::move(b.values[i]), write_behind_reason::permanent, b.results.take_reason(i), attempts, m.gen);
          break;
        case write_behind_outcome::retry: {
          bool superseded = false;
          if constexpr (keyed) superseded = owner->pending.has_value();
          if (superseded) {
            ++coalesced_;  // a newer value of the key is pending: this one must never be written
            gens_.resolved(m.gen);
            ++resolved_here;
          } else if (stopping_ && drain_expired_) {
            fail_later(b, std::move(b.values[i]), write_behind_reason::shutdown,
                       with_cause("stopped: drain_timeout passed while retrying", b), attempts, m.gen);
          } else if (options_.retry.max_retries && attempts > *options_.retry.max_retries) {
            fail_later(b, std::move(b.values[i]), write_behind_reason::retries_exhausted,
                       with_cause("retries exhausted after " + std::to_string(attempts) + " attempts", b), attempts,
                       m.gen);
          } else {
            const auto hint = b.threw ? std::chrono::nanoseconds::zero() : b.results.min_delay(i);
            const auto due = saturating_add(now, retry_delay_locked(attempts, hint));
            // Growing the heap may fail (bad_alloc), and so may copying the Key or the user's Hash:
            // the value is then reported permanent instead of killing the flusher.
            // insert() is strong: on a throw nothing changed and `s` was not moved from.
            slot s{std::move(b.values[i]), m.enqueued, m.gen, attempts};
            std::string trouble;
            try {
              heap_.reserve_one();
              if constexpr (keyed) {
                const auto where = heap_.locate(*owner->key);
                heap_.insert(where, *owner->key, std::move(s), due);
                owner->retry_waiting = true;
              } else {
                const std::uint64_t id = next_retry_id_++;
                heap_.insert(heap_.locate(id), id, std::move(s), due);
              }
            } catch (...) {
              trouble = "could not schedule the retry: " + current_exception_text();
            }
            if (trouble.empty()) {
              ++retries_;
              ++resolved_here;  // no longer in flight
            } else {
              heap_.release_if_empty();
              fail_later(b, std::move(s.value), write_behind_reason::permanent, with_cause(std::move(trouble), b),
                         attempts, m.gen);
            }
          }
          break;
        }
      }
      if constexpr (keyed) {
        if (owner->pending) {
          if (!owner->queued) keys_.push_ready_by_age(*owner);
        } else if (!owner->retry_waiting) {
          keys_.erase(*owner);
        }
      }
    }
    in_flight_ -= resolved_here;  // the rest is in flight until reported
    retire_generations_locked();
  }

  std::string with_cause(std::string text, const batch_buffer& b) const {
    if (b.threw) text += "; last error: " + b.thrown;
    return text;
  }

  // At the drain deadline: everything held and everything left in the intake is reported shutdown.
  void expire_locked(batch_buffer& b) {
    drain_expired_ = true;
    const std::string why = "stopped: drain_timeout passed before it was persisted";
    std::size_t cursor = 0;
    for (;;) {
      received_.clear();
      if (intake_.try_receive_batch(received_, intake_.capacity()) == 0) break;
      for (stored_value& v : received_) {
        const std::uint64_t gen = gens_.of_index(taken_++, cursor);
        gens_.taken(gen);
        ++in_flight_;
        fail_later(b, std::move(v), write_behind_reason::shutdown, why, 0, gen);
      }
    }
    received_.clear();
    heap_.drain([&](typename retry_heap::payload&& p, time_point) {
      ++in_flight_;
      fail_later(b, std::move(p.item.value), write_behind_reason::shutdown,
                 "stopped: drain_timeout passed while waiting to retry", p.item.attempts, p.item.gen);
      if constexpr (keyed) keys_.at(p.key).retry_waiting = false;
    });
    if constexpr (keyed) {
      while (keys_.ready_front() != nullptr) (void)keys_.pop_ready();
      ready_retries_ = 0;
      keys_.sweep(
          [&](auto& e) {
            if (e.pending) {
              ++in_flight_;
              fail_later(b, std::move(e.pending->value), write_behind_reason::shutdown, why, e.pending->attempts,
                         e.pending->gen);
              e.pending.reset();
              --pending_values_;
            }
          },
          [](const auto& e) { return e.in_flight || e.retry_waiting; });
    } else {
      for (slot& s : retry_ready_) {
        ++in_flight_;
        fail_later(b, std::move(s.value), write_behind_reason::shutdown, why, s.attempts, s.gen);
      }
      retry_ready_.clear();
      for (; staged_head_ < staged_.size(); ++staged_head_) {
        slot& s = staged_[staged_head_];
        ++in_flight_;
        fail_later(b, std::move(s.value), write_behind_reason::shutdown, why, s.attempts, s.gen);
      }
      staged_.clear();
      staged_head_ = 0;
    }
    gens_.clear_ready();  // nothing is left waiting for a batch
    space_ec_.notify_all();
    retire_generations_locked();
  }

  // Calls on_failed for b.failures outside the lock, then counts them failed.
  void report_failures(std::unique_lock<std::mutex>& lock, batch_buffer& b) noexcept {
    if (b.failures.empty()) return;
    lock.unlock();
    std::uint64_t errors = 0;
    for (failure_item& f : b.failures) {
      if (!options_.on_failed) continue;
      try {
        options_.on_failed(std::move(f.value), f.failure);
      } catch (...) {
        ++errors;
      }
    }
    lock.lock();
    on_failed_errors_ += errors;
    for (const failure_item& f : b.failures) gens_.resolved(f.gen);
    failed_ += b.failures.size();
    in_flight_ -= b.failures.size();
    b.failures.clear();
    retire_generations_locked();
  }

  // How many values in the intake make it worth waking a parked flusher.
  [[nodiscard]] std::size_t threshold_locked() const noexcept {
    const std::size_t ready = ready_count_locked();
    if (held_locked() >= options_.capacity && !(stopping_ && drain_expired_)) {
      return std::numeric_limits<std::size_t>::max();  // no room: intake values cannot help
    }
    if (ready == 0 || force_locked()) return 1;
    return ready >= options_.max_batch ? 1 : options_.max_batch - ready;  // what fills the batch
  }

  // Parks the flusher until there is something to do: intake values it waits for (producers wake
  // it), a deadline (linger, retry, drain), or a state change by another thread (flush, stop, another
  // flusher finishing a batch).
  void park_locked(std::unique_lock<std::mutex>& lock, std::size_t last_take) {
    std::optional<time_point> deadline;
    auto consider = [&](time_point t) {
      if (!deadline || t < *deadline) deadline = t;
    };
    const std::size_t ready = ready_count_locked();
    if (ready != 0) {
      if (const auto start = linger_start_locked()) consider(saturating_add(*start, options_.linger));
    }
    if (!heap_.empty()) consider(heap_.top_deadline());
    if (stopping_ && !drain_expired_) consider(drain_deadline_);
    const std::size_t threshold = threshold_locked();
    // Parked idle, the first value wakes us and its producer stamps the time: no bound needed.
    if (ready == 0 && threshold == 1) empty_since_.reset();
    // seq_cst: read by producers after they observe our registration (see wake_flusher()).
    wake_threshold_.store(threshold, std::memory_order_seq_cst);
    const auto key = work_ec_.prepare_wait();
    // seq_cst: the next producer that sees us registered and the threshold reached wakes us.
    wake_sent_.store(false, std::memory_order_seq_cst);
    // seq_cst fence: our registration and the flag's clear before the intake re-check; pairs with
    // wake_flusher()'s fence (either it sees us registered with the flag clear, or we see its value).
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (intake_.size() >= threshold) {
      work_ec_.cancel_wait();
      // More values came while we looked: take them. Only if the last take found none were they
      // claimed but not yet published: then let their producers finish (a yield, not a spin).
      if (last_take == 0) {
        lock.unlock();
        std::this_thread::yield();
        lock.lock();
      }
      return;
    }
    // Producers parked for a chunk of room must not wait for it while we sleep.
    if (intake_.size() < intake_.capacity()) space_ec_.notify_all();
    lock.unlock();
    if (deadline) {
      clock_.wait_until(work_ec_, key, *deadline);
    } else {
      clock_.wait(work_ec_, key);
    }
    lock.lock();
  }

  // ---- state ----
  options_type options_;
  const sink_type sink_;
  const Clock clock_;
  channel<stored_value> intake_;
  const std::size_t space_chunk_;  // free intake slots a parked producer waits for (a quarter)

  mutable std::mutex m_;           // everything below, except the atomics and the event counts
  std::vector<slot> staged_;       // unkeyed: taken from the intake, waiting for a batch
  std::size_t staged_head_ = 0;    // unkeyed: first live element of staged_
  std::vector<slot> retry_ready_;  // unkeyed: retries whose deadline has come
  std::vector<stored_value> received_;  // values just taken from the intake
  key_table keys_;                 // keyed: per-key state and the ready FIFO
  std::size_t ready_retries_ = 0;   // keyed: ready values that are retries (due at once)
  std::size_t pending_values_ = 0;  // keyed: entries with a pending value
  retry_heap heap_;
  std::uint64_t next_retry_id_ = 0;
  backoff<std::uint64_t> policy_;  // the delay formula (its per-key state is unused)
  std::mt19937_64 rng_;
  std::vector<batch_buffer> buffers_;  // one per flusher

  std::uint64_t taken_ = 0;  // values taken from the intake (the next one's intake index)
  write_behind_generations gens_;

  std::uint64_t persisted_ = 0, failed_ = 0, coalesced_ = 0, retries_ = 0, batches_ = 0, sink_errors_ = 0,
                on_failed_errors_ = 0;
  std::size_t in_flight_ = 0;
  bool stopping_ = false;
  bool drain_expired_ = false;
  time_point drain_deadline_ = time_point::max();
  std::optional<time_point> empty_since_;  // the last take that emptied the intake (see take_from_intake_locked())

  alignas(cache_line) std::atomic<std::size_t> wake_threshold_{1};
  std::atomic<bool> wake_sent_{false};  // a producer has woken a parked flusher (see wake_flusher())
  static constexpr std::int64_t no_stamp = std::numeric_limits<std::int64_t>::min();
  std::atomic<std::int64_t> woken_at_{no_stamp};  // when the waking producer enqueued (ns since epoch)
  alignas(cache_line) event_count work_ec_;   // flushers park here
  alignas(cache_line) event_count space_ec_;  // producers wait for room here
  alignas(cache_line) event_count done_ec_;   // flush() waits here

  std::mutex stop_mutex_;
  bool stopped_ = false;
  std::vector<std::jthread> threads_;
};

// Stands in for the engine when write_behind's static_asserts on T or Key fail, so that the
// assertion is the only error the user sees (no cascade from inside the engine). Never runs.
template <class T, class Key, class Clock>
class write_behind_unusable_engine {
 public:
  using time_point = typename Clock::time_point;
  using options_type = write_behind_options<T, Key>;
  using sink_type = std::function<void(std::span<const T>, write_behind_results&)>;
  write_behind_unusable_engine(options_type options, sink_type, Clock clock)
      : options_(std::move(options)), clock_(std::move(clock)) {}
  [[nodiscard]] const Clock& clock() const noexcept { return clock_; }
  [[nodiscard]] const options_type& options() const noexcept { return options_; }
  [[nodiscard]] bool is_stopped() const noexcept { return true; }
  write_behind_status put(T&, const std::optional<time_point>&, const std::stop_token*, bool) noexcept {
    return write_behind_status::closed;
  }
  bool flush(const std::optional<time_point>&) { return true; }
  void stop() noexcept {}
  [[nodiscard]] write_behind_metrics metrics() const { return {}; }

 private:
  options_type options_;
  Clock clock_;
};

}  // namespace detail
}  // namespace sluice
