"""The libvips side of tests/bench/prepare.rs.

Reads the plans written by the Rust side (for each case: the input file and
the steps our `prepare` took, from its transform record) and performs the
same steps with pyvips in this process, single-threaded (VIPS_CONCURRENCY=1,
set by the caller) and with the operation cache off.

Usage:
  vips_side.py serve PLANS.json   one timed job per case name read on stdin,
                                  answering its milliseconds on stdout, so
                                  that the Rust side can interleave its own
                                  runs with ours and both meet the same noise
  vips_side.py rss PLANS.json     JSON: the peak RSS of one job of each of
                                  the plans' rss_cases, each in a fresh
                                  process, and the libvips version
  vips_side.py rss-one PLAN.json  one job; prints rss_kb N
"""

import json
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


def serve(plans):
    cases = {
        c["name"]: (open(c["input"], "rb").read(), c["steps"]) for c in plans["cases"]
    }
    print("ready", flush=True)
    for line in sys.stdin:
        data, steps = cases[line.strip()]
        t = time.perf_counter()
        run(data, steps)
        print((time.perf_counter() - t) * 1e3, flush=True)


def rss(plans, plans_file):
    rss_kb = {}
    for case in plans["cases"]:
        if case["name"] not in plans["rss_cases"]:
            continue
        one = plans_file + ".rss.json"
        json.dump(case, open(one, "w"))
        child = subprocess.run(
            [sys.executable, __file__, "rss-one", one], capture_output=True, text=True, check=True
        )
        rss_kb[case["name"]] = int(child.stdout.split()[1])
    version = "%d.%d.%d" % tuple(pyvips.version(i) for i in range(3))
    print(json.dumps({"rss_kb": rss_kb, "version": version}))


def main():
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "rss-one":
        case = json.load(open(path))
        data = open(case["input"], "rb").read()
        before = vm_hwm_kb()
        run(data, case["steps"])
        print(f"rss_kb {vm_hwm_kb() - before}")
    elif mode == "serve":
        serve(json.load(open(path)))
    elif mode == "rss":
        rss(json.load(open(path)), path)
    else:
        sys.exit(f"unknown mode {mode!r}; see the docstring")


if __name__ == "__main__":
    main()
