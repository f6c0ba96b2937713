"""Records the native threads that live on into interpreter finalisation.

Every Python process started with this folder on ``PYTHONPATH`` and ``MEGDET_TEST_EXIT_THREADS=DIR``
writes ``DIR/<pid>.json`` -- the names of its threads (``/proc/self/task/*/comm``) -- from its last
``atexit`` handler (registered first, so it runs after every library's own).  What is still running
then meets the finalising interpreter: a torch gloo group's runloops there abort the process
(``megdet_hpc.distributed.comm.shutdown``).  Not Linux: nothing is written.
"""

from __future__ import annotations

import atexit
import json
import os
from pathlib import Path


def _record(folder: Path) -> None:
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return
    names = []
    for task in sorted(tasks.iterdir()):
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # ended meanwhile
            continue
    (folder / f"{os.getpid()}.json").write_text(json.dumps(names))


if os.environ.get("MEGDET_TEST_EXIT_THREADS"):
    atexit.register(_record, Path(os.environ["MEGDET_TEST_EXIT_THREADS"]))
