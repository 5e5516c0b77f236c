"""Run LLMasOS's fuzz targets (llmasos/testing/fuzz.py) for N minutes and print the count of each outcome per
target as JSON: "ok" or the documented error type. An undocumented exception or wrong numbers stop the run
with the failing example (exit 1).

    python bench/fuzz.py --minutes 10 [--targets ir_text,manifest] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

from hypothesis import HealthCheck, given, seed, settings

from llmasos.testing import fuzz


def _runner(target: str, env, counts, end: float, rnd_seed: int, examples: int):
    strategy, check = fuzz.TARGETS[target]

    @seed(rnd_seed)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(example):
        if time.monotonic() >= end:
            return
        try:
            counts.add(target, fuzz.outcome(check, example, env))
        except Exception:
            counts.add(target, "UNDOCUMENTED")
            raise
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--targets", default=",".join(fuzz.TARGETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=25, help="examples per target per round")
    args = ap.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(fuzz.TARGETS)
    if unknown:
        ap.error(f"unknown targets {sorted(unknown)}; known: {', '.join(fuzz.TARGETS)}")
    env = fuzz.FuzzEnv.build()
    counts = fuzz.Counts()
    end = time.monotonic() + 60 * args.minutes
    weight = {"compile": 0.08, "generate": 0.5}   # the slow targets get fewer examples a round
    rnd, failure = 0, None
    try:
        while time.monotonic() < end and failure is None:
            for target in targets:
                if time.monotonic() >= end:
                    break
                run = _runner(target, env, counts, end, args.seed * 100003 + rnd,
                              max(1, int(args.batch * weight.get(target, 1.0))))
                try:
                    run()
                except Exception:  # noqa: BLE001 -- the finding: report it with Hypothesis' minimal example
                    failure = (target, traceback.format_exc())
                    break
            rnd += 1
    finally:
        env.close()
    total = sum(sum(c.values()) for c in counts.by_target.values())
    print(json.dumps({"minutes": args.minutes, "rounds": rnd, "examples": total, "counts": counts.to_json(),
                      "undocumented": None if failure is None else {"target": failure[0],
                                                                    "traceback": failure[1][-4000:]}}, indent=1))
    return 1 if failure else 0


if __name__ == "__main__":
    sys.exit(main())
