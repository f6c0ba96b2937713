"""The Horovod that set-up installs is the project's patched build (scripts/build_horovod.sh).

Fix 3 of that build -- the GIL released in every enqueue of the torch binding -- is what lets the
stall watchdog run when a peer freezes under Horovod: stock 0.28.1 blocks the rank's main thread in
``allreduce_async_`` *with the GIL held* whenever the background thread is stuck in the dynamic process
sets' per-cycle allgather (it holds the process-set table's lock there).  Whether a freeze lands there
depends on where in its cycle the peer stopped, so the end-to-end check is probabilistic
(tests/reliability/test_faults.py, the frozen-rank case); this test pins the build itself.
"""

from __future__ import annotations

import horovod


def test_the_patched_build_is_installed() -> None:
    assert horovod.__version__ == "0.28.1+megdet.gil", (
        f"horovod {horovod.__version__} is not the patched build: run scripts/build_horovod.sh"
    )
