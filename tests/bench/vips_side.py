"""The libvips side of tests/bench/prepare.rs.

Reads the plans written by the Rust side (for each case: the input file and
the steps our `prepare` took, from its transform record), performs the same
steps with pyvips in this process, single-threaded (VIPS_CONCURRENCY=1, set
by the caller) and with the operation cache off, and prints JSON: the median
milliseconds per case, the peak RSS of one job of each named 12 MP case,
each measured in a fresh process, and the libvips version.

Usage: vips_side.py PLANS.json RUNS        (what prepare.rs runs)
       vips_side.py rss PLAN.json          (one job; prints rss_kb N)
"""

import json
import statistics
import subprocess
import sys
import time

import pyvips

pyvips.cache_set_max(0)


def vm_hwm_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def run(data, steps):
    """One job: decode, the recorded steps, encode to a buffer."""
    random_access = any(s["op"] == "orient" for s in steps)
    img = pyvips.Image.new_from_buffer(
        data, "", access="random" if random_access else "sequential"
    )
    if img.interpretation not in ("srgb", "b-w"):
        img = img.colourspace("srgb")
    if img.format != "uchar":
        img = img.cast("uchar")
    out = None
    for s in steps:
        op = s["op"]
        if op == "orient":
            img = img.autorot()
        elif op == "resize":
            (fw, fh), (tw, th) = s["from"], s["to"]
            img = img.resize(tw / fw, vscale=th / fh, kernel="lanczos3")
        elif op == "pad":
            img = img.embed(
                s["left"],
                s["top"],
                s["width"],
                s["height"],
                extend="background",
                background=s["color"][:3],
            )
        elif op == "encode":
            if s["format"] == "jpg":
                out = img.jpegsave_buffer(
                    Q=s["quality"], subsample_mode="on", optimize_coding=False, strip=True
                )
            else:
                out = img.pngsave_buffer(compression=6, strip=True)
    return out


def time_case(case, runs):
    data = open(case["input"], "rb").read()
    run(data, case["steps"])  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        run(data, case["steps"])
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main():
    if sys.argv[1] == "rss":
        case = json.load(open(sys.argv[2]))
        data = open(case["input"], "rb").read()
        before = vm_hwm_kb()
        run(data, case["steps"])
        print(f"rss_kb {vm_hwm_kb() - before}")
        return
    plans = json.load(open(sys.argv[1]))
    runs = int(sys.argv[2])
    times = {c["name"]: time_case(c, runs) for c in plans["cases"]}
    rss_kb = {}
    for case in plans["cases"]:
        if case["name"] not in plans["rss_cases"]:
            continue
        one = sys.argv[1] + ".rss.json"
        json.dump(case, open(one, "w"))
        child = subprocess.run(
            [sys.executable, __file__, "rss", one], capture_output=True, text=True, check=True
        )
        rss_kb[case["name"]] = int(child.stdout.split()[1])
    version = "%d.%d.%d" % tuple(pyvips.version(i) for i in range(3))
    print(json.dumps({"times_ms": times, "rss_kb": rss_kb, "version": version}))


if __name__ == "__main__":
    main()
