#!/usr/bin/env python3
"""Compares the metrics of two rpt-flow sessions of the same pipeline (e.g. --device cpu and
--device cuda): every numeric leaf within a relative tolerance, every other leaf equal. Timing and
memory fields are skipped. A fraction of counted entries (a leaf named `*fraction`, e.g. the
residual stream's `zero_fraction`: corrections exactly 0, a rounding-level count of ~1e-6) is
compared within an absolute tolerance instead: one device's rounding flips a handful of entries.
Prints one line per stage; exits 1 when any stage differs.

    scripts/compare_sessions.py CPU.json CUDA.json [--rtol 1e-3] [--fraction-atol 1e-4] [--loose generate]
"""
import argparse
import json
import math
import sys

SKIP = {"seconds", "tokens_per_second", "peak_rss_mb", "protocol"}


def leaves(value, path=""):
    if isinstance(value, dict):
        for k, v in value.items():
            if k not in SKIP:
                yield from leaves(v, f"{path}.{k}" if path else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from leaves(v, f"{path}[{i}]")
    else:
        yield path, value


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rtol", type=float, default=1e-3)
    ap.add_argument("--fraction-atol", type=float, default=1e-4, help="absolute tolerance of *fraction leaves")
    ap.add_argument("--loose", action="append", default=[], help="stage kinds compared but not failed on")
    args = ap.parse_args()
    a, b = (json.load(open(p))["stages"] for p in (args.a, args.b))
    failed = False
    for name, sa in a.items():
        sb = b.get(name)
        if sb is None or sa.get("status") not in ("done", "cached") or sb.get("status") not in ("done", "cached"):
            print(f"{name}: missing or not run in both ({sa.get('status')} / {sb and sb.get('status')})")
            failed = True
            continue
        la, lb = dict(leaves(sa.get("metrics", {}))), dict(leaves(sb.get("metrics", {})))
        worst, where, unequal = 0.0, "", []
        for path in sorted(set(la) | set(lb)):
            x, y = la.get(path), lb.get(path)
            if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
                if math.isnan(x) and math.isnan(y):
                    continue
                rel = abs(x - y) / max(1e-12, abs(x), abs(y)) if x != y else 0.0
                if path.split(".")[-1].endswith("fraction") and abs(x - y) <= args.fraction_atol:
                    rel = 0.0
                if rel > worst:
                    worst, where = rel, path
            elif x != y:
                unequal.append(path)
        ok = worst <= args.rtol and not unequal
        loose = sa.get("kind") in args.loose
        status = "ok" if ok else ("differs (not failed: loose)" if loose else "DIFFERS")
        print(f"{name} ({sa.get('kind')}): {status}; max rel {worst:.2e} at {where or '-'}"
              + (f"; unequal: {', '.join(unequal[:5])}" if unequal else ""))
        failed |= not ok and not loose
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
