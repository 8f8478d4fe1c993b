#!/usr/bin/env python3
"""How much of the time this core is taken away: spin reading the clock for SECONDS and
report every interval longer than 0.2 ms (time the loop did not run: the host, or another
task on the core). A server on the same core cannot answer faster than these gaps.

Usage: taskset -c 0 python3 perf/vm_gaps.py [SECONDS]
"""
import sys
import time


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    clock = time.perf_counter_ns
    end = clock() + int(seconds * 1e9)
    last = clock()
    gaps = []
    while True:
        now = clock()
        if now - last > 200_000:
            gaps.append((now - last) / 1e6)
        last = now
        if now > end:
            break
    gaps.sort()
    largest = [round(g, 2) for g in gaps[-8:]]
    print(f"gaps > 0.2 ms in {seconds:g} s: {len(gaps)}, {sum(gaps):.1f} ms in all; largest {largest}")


if __name__ == "__main__":
    main()
