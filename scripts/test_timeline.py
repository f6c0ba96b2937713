"""Where a parallel test run's time went, from ``MEGDET_TEST_TIMELINE=FILE make test``: per worker its
busy time and its idle tail, and the slowest modules (set-up and teardown included)."""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    with open(path) as f:
        records = [json.loads(line) for line in f]
    t0 = min(r["start"] for r in records)
    end = max(r["end"] for r in records)
    print(f"{len(records)} tests, {end - t0:.0f} s from the first start to the last end")
    by_worker: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_worker[r["worker"]].append(r)
    for worker, rows in sorted(by_worker.items()):
        busy = sum(r["end"] - r["start"] for r in rows)
        last = max(r["end"] for r in rows)
        print(
            f"  {worker}: {len(rows)} tests, busy {busy:.0f} s, done at {last - t0:.0f} s (idle tail {end - last:.0f} s)"
        )
    modules: dict[str, float] = defaultdict(float)
    where: dict[str, str] = {}
    for r in records:
        module = r["test"].split("::")[0]
        modules[module] += r["end"] - r["start"]
        where[module] = r["worker"]
    print("slowest modules:")
    for module, seconds in sorted(modules.items(), key=lambda kv: -kv[1])[:25]:
        print(f"  {seconds:7.0f} s  {where[module]}  {module}")


if __name__ == "__main__":
    main(sys.argv[1])
