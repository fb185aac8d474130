// producer — a Kafka-style producer on sluice::dispatch_pipeline, against simulated brokers.
//
// Records go to 1,000 partitions led by 5 simulated brokers. Each broker is a thread that answers
// requests after a latency, refuses batches for partitions it no longer leads (NOT_LEADER,
// retriable), injects random retriable and permanent errors, and one broker stalls for a while
// (its answers arrive late, as timeouts). Leaders move every so often. Every record has a delivery
// callback; at the end the program checks that every record was reported exactly once, that
// delivered records kept their order per partition, and that the counters balance — and exits
// non-zero if not.
//
//   producer --help
//   producer --records 2000000 --producers 2 --stall-ms 2000
#include <sluice/dispatch_pipeline.hpp>

#include <CLI/CLI.hpp>

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

namespace {

using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

struct record {
  std::uint32_t id;         // global id: exactly-once check
  std::uint32_t partition;  // for the order check
  std::uint32_t seq;        // per (producer, partition)
  std::uint16_t producer;
  std::array<char, 82> payload{};  // 100 bytes in all
};

using pipeline = sluice::dispatch_pipeline<int, record, int>;

struct settings {
  std::uint64_t records = 1'000'000;
  int partitions = 1000;
  int brokers = 5;
  int producers = 2;
  double latency_ms = 2.0;
  double retriable_pct = 1.0;
  double permanent_pct = 0.05;
  int stall_broker = 2;
  int stall_ms = 1000;
  int move_every_ms = 200;
  int linger_ms = 5;
  std::size_t max_in_flight = 5;
  bool gapless = false;
  std::uint64_t seed = 1;
};

// One simulated broker: answers requests after `latency`, from its own thread.
class broker {
 public:
  broker(int id, const settings& s, std::vector<std::atomic<int>>& leaders, steady::time_point start)
      : id_(id), s_(s), leaders_(leaders), start_(start), rng_(s.seed * 7919 + static_cast<std::uint64_t>(id)) {
    thread_ = std::jthread([this](std::stop_token st) { loop(st); });
  }
  void submit(pipeline::request&& r) {
    {
      std::lock_guard l(m_);
      queue_.push_back({steady::now() + std::chrono::duration_cast<steady::duration>(
                                            std::chrono::duration<double, std::milli>(s_.latency_ms)),
                        std::move(r)});
    }
    cv_.notify_one();
  }
  void shutdown() {
    thread_.request_stop();
    cv_.notify_one();
    thread_.join();
  }

 private:
  struct pending {
    steady::time_point due;
    pipeline::request request;
  };
  bool stalled(steady::time_point now) const {
    const auto t = now - start_;
    return id_ == s_.stall_broker && t >= 100ms && t < 100ms + std::chrono::milliseconds(s_.stall_ms);
  }
  void loop(std::stop_token st) {
    std::unique_lock l(m_);
    while (true) {
      if (queue_.empty()) {
        if (st.stop_requested()) return;
        cv_.wait(l, [&] { return st.stop_requested() || !queue_.empty(); });
        continue;
      }
      const auto now = steady::now();
      if (queue_.front().due > now && !st.stop_requested()) {
        cv_.wait_until(l, queue_.front().due);
        continue;
      }
      if (stalled(now) && !st.stop_requested()) {
        cv_.wait_for(l, 10ms);  // a stalled broker answers nothing; its requests pile up
        continue;
      }
      pending p = std::move(queue_.front());
      queue_.pop_front();
      l.unlock();
      answer(p, now);
      l.lock();
    }
  }
  void answer(pending& p, steady::time_point now) {
    auto& r = p.request;
    // A request held through the stall timed out at the client: possibly persisted.
    if (now - p.due > 200ms) {
      r.complete(sluice::send_result::timed_out);
      return;
    }
    std::uniform_real_distribution<double> pct(0.0, 100.0);
    for (std::size_t i = 0; i < r.size(); ++i) {
      if (leaders_[static_cast<std::size_t>(r.partition(i))].load(std::memory_order_relaxed) != id_) {
        r.set_result(i, sluice::send_result::retriable);  // NOT_LEADER_OR_FOLLOWER
      } else if (const double x = pct(rng_); x < s_.permanent_pct) {
        r.set_result(i, sluice::send_result::permanent);
      } else if (x < s_.permanent_pct + s_.retriable_pct) {
        r.set_result(i, sluice::send_result::retriable);
      }
    }
    r.complete(sluice::send_result::ok);
  }

  const int id_;
  const settings& s_;
  std::vector<std::atomic<int>>& leaders_;
  const steady::time_point start_;
  std::mt19937_64 rng_;
  std::mutex m_;
  std::condition_variable cv_;
  std::deque<pending> queue_;
  std::jthread thread_;
};

std::string us(std::chrono::nanoseconds d) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.0f us", static_cast<double>(d.count()) / 1000.0);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  settings s;
  CLI::App app{"Kafka-style producer on sluice::dispatch_pipeline against simulated brokers; verifies itself."};
  app.add_option("--records", s.records, "records to send")->capture_default_str();
  app.add_option("--partitions", s.partitions, "partitions")->capture_default_str()->check(CLI::Range(1, 1 << 20));
  app.add_option("--brokers", s.brokers, "simulated brokers")->capture_default_str()->check(CLI::Range(1, 1000));
  app.add_option("--producers", s.producers, "appender threads")->capture_default_str()->check(CLI::Range(1, 64));
  app.add_option("--latency-ms", s.latency_ms, "broker answer latency")->capture_default_str();
  app.add_option("--retriable-pct", s.retriable_pct, "chance a batch gets a retriable error")->capture_default_str();
  app.add_option("--permanent-pct", s.permanent_pct, "chance a batch gets a permanent error")->capture_default_str();
  app.add_option("--stall-broker", s.stall_broker, "broker that stalls (-1: none)")->capture_default_str();
  app.add_option("--stall-ms", s.stall_ms, "how long it stalls, from 0.1 s in")->capture_default_str();
  app.add_option("--move-every-ms", s.move_every_ms, "a leader move every this often (0: never)")->capture_default_str();
  app.add_option("--linger-ms", s.linger_ms, "linger")->capture_default_str();
  app.add_option("--max-in-flight", s.max_in_flight, "max in-flight requests per broker")->capture_default_str();
  app.add_flag("--gapless", s.gapless, "fail the rest of a partition after a record fails for good");
  app.add_option("--seed", s.seed, "random seed")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  if (s.records > std::numeric_limits<std::uint32_t>::max()) {
    std::fprintf(stderr, "--records must fit in 32 bits\n");
    return 2;
  }

  const auto start = steady::now();
  std::vector<std::atomic<int>> leaders(static_cast<std::size_t>(s.partitions));
  for (int p = 0; p < s.partitions; ++p) leaders[static_cast<std::size_t>(p)] = p % s.brokers;
  std::vector<std::unique_ptr<broker>> brokers;
  for (int b = 0; b < s.brokers; ++b) brokers.push_back(std::make_unique<broker>(b, s, leaders, start));

  // Verification state, written by delivery callbacks (sender and broker threads).
  const auto total = static_cast<std::uint32_t>(s.records);
  std::vector<std::atomic<std::uint8_t>> reported(total);
  std::vector<std::atomic<std::int64_t>> last_seq(static_cast<std::size_t>(s.producers) *
                                                  static_cast<std::size_t>(s.partitions));
  for (auto& l : last_seq) l = -1;
  std::atomic<std::uint64_t> order_violations{0};

  sluice::dispatch_pipeline_options o;
  o.accumulator.linger = std::chrono::milliseconds(s.linger_ms);
  o.max_in_flight_per_destination = s.max_in_flight;
  o.retry_backoff = {10ms, 1s, 2.0, sluice::jitter_mode::equal, std::nullopt};
  o.gapless = s.gapless;
  // The delivery callback: one for the whole pipeline (the fast path; it runs once per record).
  // send(partition, record, callback) also takes a callback of its own per record.
  auto on_delivery = [&](const record& r, const sluice::delivery_report& d) {
    reported[r.id].fetch_add(1, std::memory_order_relaxed);
    if (!d) return;
    // Reports of one partition come from one completion at a time (the partition is muted while
    // in flight), so a plain load/store per (producer, partition) is enough.
    auto& l = last_seq[static_cast<std::size_t>(r.producer) * static_cast<std::size_t>(s.partitions) + r.partition];
    if (static_cast<std::int64_t>(r.seq) <= l.load(std::memory_order_relaxed)) order_violations.fetch_add(1);
    l.store(r.seq, std::memory_order_relaxed);
  };
  pipeline pipe(
      o, [&](int p) { return std::optional<int>(leaders[static_cast<std::size_t>(p)].load(std::memory_order_relaxed)); },
      [&](pipeline::request&& r) { brokers[static_cast<std::size_t>(r.destination())]->submit(std::move(r)); },
      [](const record&) { return std::size_t{100}; }, on_delivery);

  std::atomic<int> producers_done{0};
  std::vector<std::thread> producers;
  for (int t = 0; t < s.producers; ++t) {
    producers.emplace_back([&, t] {
      std::mt19937_64 rng(s.seed * 31 + static_cast<std::uint64_t>(t));
      std::vector<std::uint32_t> next(static_cast<std::size_t>(s.partitions), 0);
      const std::uint32_t first = total / static_cast<std::uint32_t>(s.producers) * static_cast<std::uint32_t>(t);
      const std::uint32_t last = t == s.producers - 1 ? total : first + total / static_cast<std::uint32_t>(s.producers);
      for (std::uint32_t id = first; id < last; ++id) {
        const auto p = static_cast<std::uint32_t>(rng() % static_cast<std::uint64_t>(s.partitions));
        record r{id, p, next[p]++, static_cast<std::uint16_t>(t), {}};
        if (pipe.send(static_cast<int>(p), std::move(r)) != pipeline::send_status::ok) std::abort();
      }
      producers_done.fetch_add(1);
    });
  }

  // Leader moves and the live progress line, until every producer is done.
  const bool tty = isatty(STDERR_FILENO) != 0;
  std::mt19937_64 rng(s.seed);
  auto last_print = steady::now();
  auto last_move = steady::now();
  std::uint64_t last_reported = 0;
  std::uint64_t moves = 0;
  auto progress = [&](bool final_line) {
    const auto m = pipe.metrics();
    const auto now = steady::now();
    const double dt = std::chrono::duration<double>(now - last_print).count();
    const std::uint64_t done = m.delivered + m.failed;
    std::fprintf(stderr, "%s%8.1f s  %10llu reported  %8.0f rec/s  in flight %3llu  retried %8llu  buffer %5.1f%%%s",
                 tty ? "\r" : "", std::chrono::duration<double>(now - start).count(),
                 static_cast<unsigned long long>(done), dt > 0 ? static_cast<double>(done - last_reported) / dt : 0.0,
                 static_cast<unsigned long long>(m.in_flight), static_cast<unsigned long long>(m.retried),
                 100.0 * static_cast<double>(m.buffer_used) / static_cast<double>(m.buffer_used + m.buffer_available),
                 tty && !final_line ? "" : "\n");
    last_reported = done;
    last_print = now;
  };
  while (producers_done.load() < s.producers) {
    std::this_thread::sleep_for(20ms);
    const auto now = steady::now();
    if (s.move_every_ms > 0 && now - last_move >= std::chrono::milliseconds(s.move_every_ms)) {
      for (int k = 0; k < 10; ++k) {  // ten partitions change leader at once
        const auto p = static_cast<int>(rng() % static_cast<std::uint64_t>(s.partitions));
        leaders[static_cast<std::size_t>(p)] = static_cast<int>(rng() % static_cast<std::uint64_t>(s.brokers));
        pipe.destination_changed(p);
        ++moves;
      }
      last_move = now;
    }
    if (now - last_print >= (tty ? 250ms : 1000ms)) progress(false);
  }
  for (auto& t : producers) t.join();
  const bool drained = pipe.drain_for(5min);  // everything accepted is reported, then the senders stop
  progress(true);
  for (auto& b : brokers) b->shutdown();
  const double seconds = std::chrono::duration<double>(steady::now() - start).count();

  // ---- summary and self-check --------------------------------------------------------------------
  const auto m = pipe.metrics();
  std::uint64_t missing = 0, doubled = 0;
  for (auto& r : reported) {
    const auto n = r.load();
    if (n == 0) ++missing;
    if (n > 1) ++doubled;
  }
  auto reason = [&](sluice::failure_reason r) {
    return static_cast<unsigned long long>(m.failed_by_reason[static_cast<std::size_t>(r)]);
  };
  std::printf("\n%-34s %14s\n", "metric", "value");
  std::printf("%-34s %14llu\n", "records accepted", static_cast<unsigned long long>(m.accepted));
  std::printf("%-34s %14llu\n", "delivered", static_cast<unsigned long long>(m.delivered));
  std::printf("%-34s %14llu\n", "failed: permanent error", reason(sluice::failure_reason::permanent_error));
  std::printf("%-34s %14llu\n", "failed: retries exhausted", reason(sluice::failure_reason::retries_exhausted));
  std::printf("%-34s %14llu\n", "failed: delivery timeout", reason(sluice::failure_reason::delivery_timeout));
  std::printf("%-34s %14llu\n", "failed: shutdown", reason(sluice::failure_reason::shutdown));
  std::printf("%-34s %14llu\n", "records retried", static_cast<unsigned long long>(m.retried));
  std::printf("%-34s %14llu\n", "requests", static_cast<unsigned long long>(m.requests));
  std::printf("%-34s %14llu\n", "  batches", static_cast<unsigned long long>(m.batches));
  std::printf("%-34s %14llu\n", "leader moves", static_cast<unsigned long long>(moves));
  std::printf("%-34s %14.0f\n", "throughput (records/s)", static_cast<double>(m.accepted) / seconds);
  std::printf("%-34s %14s\n", "queue time p50 (<=)", us(m.queue_time.percentile(0.50)).c_str());
  std::printf("%-34s %14s\n", "queue time p99 (<=)", us(m.queue_time.percentile(0.99)).c_str());
  std::printf("%-34s %14s\n", "queue time p99.9 (<=)", us(m.queue_time.percentile(0.999)).c_str());
  std::printf("%-34s %14s\n", "request latency p50 (<=)", us(m.request_latency.percentile(0.50)).c_str());
  std::printf("%-34s %14s\n", "request latency p99 (<=)", us(m.request_latency.percentile(0.99)).c_str());

  bool ok = true;
  auto check = [&](bool cond, const char* what) {
    std::printf("check: %-52s %s\n", what, cond ? "ok" : "FAILED");
    ok = ok && cond;
  };
  check(drained, "drained before the deadline");
  check(missing == 0, "every record reported");
  check(doubled == 0, "no record reported twice");
  check(order_violations.load() == 0, "delivered in order per partition");
  check(m.accepted == total, "accepted = records sent");
  check(m.accepted == m.delivered + m.failed && m.pending == 0, "accepted = delivered + failed (+0 pending)");
  check(reason(sluice::failure_reason::shutdown) == 0, "nothing failed by shutdown (drained)");
  check(m.in_flight == 0 && m.buffer_used == 0, "nothing left in flight or buffered");
  check(pipe.audit().clean(), "accumulator audit clean");
  return ok ? 0 : 1;
}
