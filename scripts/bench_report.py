#!/usr/bin/env python3
"""Summarise Google Benchmark JSON output as sluice-vs-peer ratios.

Benchmarks follow one naming convention: a name is '/'-separated segments, one of which is
'impl:NAME' (sluice, moodycamel, tbb, mutex_cv, ...). Benchmarks whose names are equal apart from
the impl segment form a group; within a group every implementation is compared with 'sluice'.
Repetitions are reduced to their median (run with --benchmark_repetitions=N).

Throughput benchmarks (those reporting items_per_second) compare items/s: ratio = sluice / peer,
higher is better for sluice. Others compare wall time per iteration: ratio = peer / sluice, so in
both cases a ratio above 1 means sluice is faster.

usage: bench_report.py RESULT.json [RESULT.json ...]
"""
import json
import re
import statistics
import sys
from collections import defaultdict

SUFFIX = re.compile(r"^(real_time|process_time|manual_time|threads:\d+|iterations:\d+|repeats:\d+|min_time:.*)$")


def split(name):
    segments = [s for s in name.split("/") if not SUFFIX.match(s)]
    impl = next((s[5:] for s in segments if s.startswith("impl:")), None)
    key = "/".join(s for s in segments if not s.startswith("impl:"))
    return key, impl


def main(paths):
    runs = defaultdict(lambda: defaultdict(list))  # key -> impl -> [(wall_ns, cpu_ns, items/s)]
    context = None
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        context = context or data.get("context", {})
        for b in data["benchmarks"]:
            if b.get("run_type") == "aggregate" or b.get("error_occurred"):
                continue
            key, impl = split(b.get("run_name", b["name"]))
            if impl is None:
                continue
            scale = {"ns": 1, "us": 1e3, "ms": 1e6, "s": 1e9}[b.get("time_unit", "ns")]
            runs[key][impl].append((b["real_time"] * scale, b["cpu_time"] * scale, b.get("items_per_second")))

    if context:
        print(f"# host: {context.get('host_name')}, {context.get('num_cpus')} cpus @ {context.get('mhz_per_cpu')} MHz,"
              f" library build: {context.get('library_build_type')}, date: {context.get('date')}")
    print("| benchmark | impl | reps | wall/iter | cpu/iter | items/s (median) | sluice ratio |")
    print("|---|---|---|---|---|---|---|")
    for key in sorted(runs):
        impls = runs[key]
        med = {}
        for impl, samples in impls.items():
            wall = statistics.median(s[0] for s in samples)
            cpu = statistics.median(s[1] for s in samples)
            ips = [s[2] for s in samples if s[2] is not None]
            med[impl] = (wall, cpu, statistics.median(ips) if ips else None, len(samples))
        base = med.get("sluice")
        for impl in sorted(med, key=lambda i: (i != "sluice", i)):
            wall, cpu, ips, reps = med[impl]
            ratio = ""
            if base and impl != "sluice":
                if base[2] and ips:
                    ratio = f"{base[2] / ips:.2f}x"
                elif base[0] > 0:
                    ratio = f"{wall / base[0]:.2f}x"
            ips_text = f"{ips / 1e6:.2f} M/s" if ips else "-"
            print(f"| {key} | {impl} | {reps} | {fmt_ns(wall)} | {fmt_ns(cpu)} | {ips_text} | {ratio} |")


def fmt_ns(ns):
    for unit, div in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if ns >= div:
            return f"{ns / div:.2f} {unit}"
    return f"{ns:.1f} ns"


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
