"""COCO bbox evaluation time with pycocotools on a synthetic-size val set.

faster-coco-eval was considered but not adopted (one more compiled dependency for the evaluation that
runs once per training); this measures what pycocotools costs at COCO val scale (5000 images, 100
detections each) so the choice can be revisited with numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import sys
import time

from common import summary, table, write_result


def main() -> int:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--dets", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    rng = random.Random(0)
    cats = [{"id": i + 1, "name": str(i)} for i in range(80)]
    images, anns, dets = [], [], []
    for i in range(1, a.images + 1):
        images.append({"id": i, "width": 640, "height": 480})
        for _ in range(7):
            x, y, w, h = rng.uniform(0, 500), rng.uniform(0, 350), rng.uniform(10, 140), rng.uniform(10, 130)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": rng.randint(1, 80),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        for _ in range(a.dets):
            x, y, w, h = rng.uniform(0, 500), rng.uniform(0, 350), rng.uniform(10, 140), rng.uniform(10, 130)
            dets.append(
                {
                    "image_id": i,
                    "category_id": rng.randint(1, 80),
                    "bbox": [x, y, w, h],
                    "score": rng.random(),
                }
            )
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = {"images": images, "annotations": anns, "categories": cats}
            gt.createIndex()
            ev = COCOeval(gt, gt.loadRes(dets), "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        times.append(time.perf_counter() - t0)
    s = summary(times)
    rows = [
        {
            "tool": "pycocotools",
            "images": a.images,
            "detections": len(dets),
            "median_s": s["median"],
            "p25_s": s["p25"],
            "p75_s": s["p75"],
        }
    ]
    print(table(rows, [(k, k) for k in rows[0]]))
    print(f"wrote {write_result('eval', {'rows': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
