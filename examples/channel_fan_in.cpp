// channel_fan_in: several producers, one consumer, a clean close-then-drain shutdown.
//
// Four "sensor" threads each send 25,000 readings into one bounded sluice::channel. The consumer
// takes them in batches (receive_batch), and the channel's backpressure keeps at most 256 readings
// in flight however fast the sensors are. When the last sensor is done, close() stops intake; the
// consumer still gets every reading that was accepted, then receive_batch returns 0 and it stops.
// At the end the program checks what the channel promises: nothing lost, nothing duplicated, each
// sensor's readings in the order it sent them — and exits 0.
//
//   build/<preset>/examples/channel_fan_in
#include <sluice/channel.hpp>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <thread>
#include <vector>

struct reading {
  int sensor;          // which producer sent it
  std::uint64_t seq;   // that producer's sequence number
  double value;
};

int main() {
  constexpr int sensors = 4;
  constexpr std::uint64_t per_sensor = 25'000;

  sluice::channel<reading> readings(256);  // bounded: senders wait while it is full

  // Producers: send() blocks while the channel is full and returns a status, never throws.
  std::vector<std::jthread> producers;
  for (int s = 0; s < sensors; ++s) {
    producers.emplace_back([&readings, s] {
      for (std::uint64_t i = 0; i < per_sensor; ++i) {
        if (readings.send(reading{s, i, 0.5 * static_cast<double>(i)}) != sluice::channel_status::ok) return;
      }
    });
  }

  // Close once every producer has finished: receivers drain what was accepted, then stop.
  std::jthread closer([&] {
    for (auto& p : producers) p.join();
    readings.close();
  });

  // The one consumer: take up to 64 readings per call (cheaper per item than receive()).
  // receive_batch() returns 0 only when the channel is closed and drained.
  std::vector<reading> batch;
  batch.reserve(64);  // reserve once: receive_batch then never allocates
  std::vector<std::uint64_t> next_seq(sensors, 0);
  std::uint64_t total = 0, batches = 0, out_of_order = 0;
  double sum = 0;
  while (readings.receive_batch(batch, 64) > 0) {
    ++batches;
    for (const reading& r : batch) {
      if (r.seq != next_seq[static_cast<std::size_t>(r.sensor)]++) ++out_of_order;  // FIFO per producer
      sum += r.value;
      ++total;
    }
    batch.clear();
  }
  // (Equivalently, one at a time:  for (reading& r : readings) { ... }  ends at closed-and-drained.)

  // Closed and drained is final, and the status forms of receive say so at once (no waiting out
  // the timeout): closed, as opposed to timeout, cancelled or (try_receive) empty.
  std::optional<reading> none;
  const bool closed_reported = readings.try_receive_for(none, std::chrono::seconds(10)) == sluice::channel_status::closed;

  const bool ok = closed_reported && total == sensors * per_sensor && out_of_order == 0 &&
                  readings.accepted() == readings.received() + readings.dropped() && readings.size() == 0;
  std::printf("received %llu readings from %d sensors in %llu batches (avg %.1f per batch)\n",
              static_cast<unsigned long long>(total), sensors, static_cast<unsigned long long>(batches),
              batches ? static_cast<double>(total) / static_cast<double>(batches) : 0.0);
  std::printf("sum of values %.1f, out-of-order %llu, accepted %llu = received %llu + dropped %llu\n", sum,
              static_cast<unsigned long long>(out_of_order), static_cast<unsigned long long>(readings.accepted()),
              static_cast<unsigned long long>(readings.received()), static_cast<unsigned long long>(readings.dropped()));
  std::printf("%s\n", ok ? "ok: every accepted reading arrived once, in per-sensor order" : "FAILED");
  return ok ? 0 : 1;
}
