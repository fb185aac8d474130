// sluice::channel against its peers, in one binary and one run:
//   impl:sluice      sluice::channel<T> (bounded MPSC)
//   impl:moodycamel  moodycamel::BlockingConcurrentQueue<T> with producer/consumer tokens. It is
//                    UNBOUNDED: the capacity argument is only its initial size, and producers never
//                    wait for the consumer. Benchmarked as-is.
//   impl:tbb         tbb::concurrent_bounded_queue<T> with set_capacity(capacity)
//   impl:mutex_cv    a bounded queue: std::mutex + two condition variables + std::deque, notifying
//                    only when someone waits, after unlocking (the competent textbook version)
//
// Benchmarks (every one runs its own threads, so wall time and whole-process CPU time are reported):
//   channel_throughput/producers:P/capacity:C/bytes:B/impl:X  P producers -> 1 consumer (the
//       benchmark thread), single-item send and receive; items/s.
//   channel_batch/producers:P/capacity:1024/bytes:8/impl:X   batched on both sides: producers send
//       32 items per call (send_batch, enqueue_bulk, one lock per chunk) so that the consumer is the
//       bottleneck, and the consumer takes up to 256 per call (receive_batch, wait_dequeue_bulk, one
//       lock per batch). impl:sluice_single is sluice with the same batched producers but a consumer
//       calling receive() once per item: its ratio is the speed-up receive_batch buys. (tbb has no
//       bulk operations and is left out.)
//   channel_pingpong/bytes:8/impl:X   one item bounces between two threads over two queues; the
//       time per iteration is one round trip.
#include <benchmark/benchmark.h>

// GCC 12 reports a false -Wstringop-overflow deep inside moodycamel's enqueue_bulk once inlined here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wstringop-overflow"
#endif

#include <sluice/channel.hpp>

#include <concurrentqueue/blockingconcurrentqueue.h>
#include <tbb/concurrent_queue.h>

#include <algorithm>
#include <array>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <iterator>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

namespace {

template <std::size_t Bytes>
struct payload {
  std::array<std::uint64_t, Bytes / 8> words{};
  payload() = default;
  explicit payload(std::uint64_t v) noexcept { words[0] = v; }
  [[nodiscard]] std::uint64_t value() const noexcept { return words[0]; }
};

// ---- adapters: producer handle, pop, pop_bulk ---------------------------------------------

template <class T>
struct sluice_impl {
  sluice::channel<T> ch;
  explicit sluice_impl(std::size_t cap) : ch(cap) {}
  struct producer {
    explicit producer(sluice_impl& owner) : q(owner) {}
    void push(T&& v) { (void)q.ch.send(std::move(v)); }
    void push_bulk(std::span<T> items) { q.ch.send_batch(items); }
    sluice_impl& q;
  };
  struct consumer {
    explicit consumer(sluice_impl& owner) : q(owner) { buf.reserve(256); }
    T pop() { return *q.ch.receive(); }
    template <class F>
    std::size_t pop_bulk(std::size_t max, F&& f) {
      buf.clear();
      const std::size_t n = q.ch.receive_batch(buf, max);
      for (auto& v : buf) f(v);
      return n;
    }
    sluice_impl& q;
    std::vector<T> buf;
  };
};

template <class T>
struct moodycamel_impl {
  moodycamel::BlockingConcurrentQueue<T> q;
  explicit moodycamel_impl(std::size_t cap) : q(cap) {}
  struct producer {
    explicit producer(moodycamel_impl& owner) : m(owner), token(m.q) {}
    void push(T&& v) { m.q.enqueue(token, std::move(v)); }
    void push_bulk(std::span<T> items) { m.q.enqueue_bulk(token, std::make_move_iterator(items.begin()), items.size()); }
    moodycamel_impl& m;
    moodycamel::ProducerToken token;
  };
  struct consumer {
    explicit consumer(moodycamel_impl& owner) : m(owner), token(m.q) {}
    T pop() {
      T v;
      m.q.wait_dequeue(token, v);
      return v;
    }
    template <class F>
    std::size_t pop_bulk(std::size_t max, F&& f) {
      const std::size_t n = m.q.wait_dequeue_bulk(token, buf.data(), std::min(max, buf.size()));
      for (std::size_t i = 0; i < n; ++i) f(buf[i]);
      return n;
    }
    moodycamel_impl& m;
    moodycamel::ConsumerToken token;
    std::array<T, 256> buf{};
  };
};

template <class T>
struct tbb_impl {
  tbb::concurrent_bounded_queue<T> q;
  explicit tbb_impl(std::size_t cap) { q.set_capacity(static_cast<std::ptrdiff_t>(cap)); }
  struct producer {
    explicit producer(tbb_impl& owner) : t(owner) {}
    void push(T&& v) { t.q.push(std::move(v)); }
    tbb_impl& t;
  };
  struct consumer {
    explicit consumer(tbb_impl& owner) : t(owner) {}
    T pop() {
      T v;
      t.q.pop(v);
      return v;
    }
    tbb_impl& t;
  };
};

// Bounded queue, mutex + condition variables + deque, done competently: waiters are counted so a
// notify happens only when somebody waits, and it happens after the unlock.
template <class T>
class mutex_cv_queue {
 public:
  explicit mutex_cv_queue(std::size_t cap) : cap_(cap) {}
  void push(T&& v) {
    std::unique_lock lock(m_);
    while (q_.size() >= cap_) {
      ++waiting_producers_;
      not_full_.wait(lock);
      --waiting_producers_;
    }
    q_.push_back(std::move(v));
    const bool wake = waiting_consumers_ > 0;
    lock.unlock();
    if (wake) not_empty_.notify_one();
  }
  void push_bulk(std::span<T> items) {
    std::size_t done = 0;
    while (done < items.size()) {
      std::unique_lock lock(m_);
      while (q_.size() >= cap_) {
        ++waiting_producers_;
        not_full_.wait(lock);
        --waiting_producers_;
      }
      while (done < items.size() && q_.size() < cap_) q_.push_back(std::move(items[done++]));
      const bool wake = waiting_consumers_ > 0;
      lock.unlock();
      if (wake) not_empty_.notify_one();
    }
  }
  T pop() {
    std::unique_lock lock(m_);
    while (q_.empty()) {
      ++waiting_consumers_;
      not_empty_.wait(lock);
      --waiting_consumers_;
    }
    T v = std::move(q_.front());
    q_.pop_front();
    const bool wake = waiting_producers_ > 0;
    lock.unlock();
    if (wake) not_full_.notify_one();
    return v;
  }
  template <class F>
  std::size_t pop_bulk(std::size_t max, F&& f, std::vector<T>& buf) {
    std::unique_lock lock(m_);
    while (q_.empty()) {
      ++waiting_consumers_;
      not_empty_.wait(lock);
      --waiting_consumers_;
    }
    buf.clear();
    while (!q_.empty() && buf.size() < max) {
      buf.push_back(std::move(q_.front()));
      q_.pop_front();
    }
    const bool wake = waiting_producers_ > 0;
    lock.unlock();
    if (wake) not_full_.notify_all();
    for (auto& v : buf) f(v);
    return buf.size();
  }

 private:
  std::mutex m_;
  std::condition_variable not_empty_, not_full_;
  std::deque<T> q_;
  std::size_t cap_;
  int waiting_producers_ = 0, waiting_consumers_ = 0;
};

template <class T>
struct mutex_cv_impl {
  mutex_cv_queue<T> q;
  explicit mutex_cv_impl(std::size_t cap) : q(cap) {}
  struct producer {
    explicit producer(mutex_cv_impl& owner) : m(owner) {}
    void push(T&& v) { m.q.push(std::move(v)); }
    void push_bulk(std::span<T> items) { m.q.push_bulk(items); }
    mutex_cv_impl& m;
  };
  struct consumer {
    explicit consumer(mutex_cv_impl& owner) : m(owner) { buf.reserve(256); }
    T pop() { return m.q.pop(); }
    template <class F>
    std::size_t pop_bulk(std::size_t max, F&& f) { return m.q.pop_bulk(max, f, buf); }
    mutex_cv_impl& m;
    std::vector<T> buf;
  };
};

// ---- benchmark bodies -----------------------------------------------------------------------

constexpr std::size_t items_per_iteration = std::size_t{1} << 16;
constexpr std::size_t batch_max = 256;

constexpr std::size_t send_batch_size = 32;

// P producers -> one consumer (this thread). batch_send: producers send 32 items per call;
// batch_receive: the consumer takes up to 256 per call.
template <class Impl, class T>
void throughput(benchmark::State& state, int producers, std::size_t capacity, bool batch_receive, bool batch_send = false) {
  Impl q(capacity);
  typename Impl::consumer consumer(q);
  const std::size_t per_producer = items_per_iteration / static_cast<std::size_t>(producers);
  const std::size_t total = per_producer * static_cast<std::size_t>(producers);
  std::uint64_t checksum = 0;
  for (auto _ : state) {
    std::vector<std::jthread> threads;
    threads.reserve(static_cast<std::size_t>(producers));
    for (int p = 0; p < producers; ++p) {
      threads.emplace_back([&q, per_producer, batch_send] {
        typename Impl::producer producer(q);
        if constexpr (requires { producer.push_bulk(std::span<T>()); }) {
          if (batch_send) {
            std::vector<T> chunk(send_batch_size);
            for (std::size_t i = 0; i < per_producer; i += send_batch_size) {
              const std::size_t n = std::min(send_batch_size, per_producer - i);
              for (std::size_t j = 0; j < n; ++j) chunk[j] = T(i + j);
              producer.push_bulk(std::span<T>(chunk.data(), n));
            }
            return;
          }
        }
        for (std::size_t i = 0; i < per_producer; ++i) producer.push(T(i));
      });
    }
    std::size_t received = 0;
    if constexpr (requires { consumer.pop_bulk(batch_max, [](T&) {}); }) {
      if (batch_receive) {
        while (received < total) {
          received += consumer.pop_bulk(batch_max, [&](T& v) { checksum += v.value(); });
        }
      }
    }
    for (; received < total; ++received) checksum += consumer.pop().value();
    threads.clear();  // join
  }
  benchmark::DoNotOptimize(checksum);
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(total));
}

template <class Impl, class T>
void ping_pong(benchmark::State& state) {
  Impl there(1024), back(1024);
  constexpr std::uint64_t stop = ~std::uint64_t{0};
  std::jthread echo([&] {
    typename Impl::consumer in(there);
    typename Impl::producer out(back);
    for (;;) {
      T v = in.pop();
      if (v.value() == stop) break;
      out.push(std::move(v));
    }
  });
  typename Impl::producer out(there);
  typename Impl::consumer in(back);
  std::uint64_t i = 0;
  for (auto _ : state) {
    out.push(T(i++));
    benchmark::DoNotOptimize(in.pop());
  }
  out.push(T(stop));
}

template <class T>
const char* bytes_name() {
  return sizeof(T) == 8 ? "8" : "64";
}

template <template <class> class Impl, class T>
void register_throughput(const std::string& impl) {
  for (std::size_t capacity : {std::size_t{1024}, std::size_t{64}}) {
    for (int producers : {1, 2, 4, 8}) {
      const std::string name = "channel_throughput/producers:" + std::to_string(producers) +
                               "/capacity:" + std::to_string(capacity) + "/bytes:" + bytes_name<T>() +
                               "/impl:" + impl;
      benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& s) {
        throughput<Impl<T>, T>(s, producers, capacity, false);
      })->UseRealTime()->MeasureProcessCPUTime()->Unit(benchmark::kMillisecond);
    }
  }
}

template <template <class> class Impl>
void register_batch(const std::string& impl, bool batch) {
  using T = payload<8>;
  for (int producers : {1, 2, 4, 8}) {
    const std::string name = "channel_batch/producers:" + std::to_string(producers) +
                             "/capacity:1024/bytes:8/impl:" + impl;
    benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& s) {
      throughput<Impl<T>, T>(s, producers, 1024, batch, /*batch_send=*/true);
    })->UseRealTime()->MeasureProcessCPUTime()->Unit(benchmark::kMillisecond);
  }
}

template <template <class> class Impl>
void register_ping_pong(const std::string& impl) {
  using T = payload<8>;
  benchmark::RegisterBenchmark(("channel_pingpong/bytes:8/impl:" + impl).c_str(), ping_pong<Impl<T>, T>)
      ->UseRealTime()
      ->MeasureProcessCPUTime()
      ->Unit(benchmark::kMicrosecond);
}

const bool registered = [] {
  register_throughput<sluice_impl, payload<8>>("sluice");
  register_throughput<moodycamel_impl, payload<8>>("moodycamel");
  register_throughput<tbb_impl, payload<8>>("tbb");
  register_throughput<mutex_cv_impl, payload<8>>("mutex_cv");
  register_throughput<sluice_impl, payload<64>>("sluice");
  register_throughput<moodycamel_impl, payload<64>>("moodycamel");
  register_throughput<tbb_impl, payload<64>>("tbb");
  register_throughput<mutex_cv_impl, payload<64>>("mutex_cv");

  register_batch<sluice_impl>("sluice", true);
  register_batch<sluice_impl>("sluice_single", false);
  register_batch<moodycamel_impl>("moodycamel", true);
  register_batch<mutex_cv_impl>("mutex_cv", true);

  register_ping_pong<sluice_impl>("sluice");
  register_ping_pong<moodycamel_impl>("moodycamel");
  register_ping_pong<tbb_impl>("tbb");
  register_ping_pong<mutex_cv_impl>("mutex_cv");
  return true;
}();

}  // namespace
