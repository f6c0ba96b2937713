"""``distributed.shutdown`` leaves no torch process group running into interpreter finalisation.

Why it matters: a gloo group's runloops still alive when the interpreter finalises can drop a tensor
with a Python owner there and abort the process (SIGABRT, "terminate called without an active
exception") -- seen twice in CI as a torchrun rank killed at the end of a finished training.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from launchers import exit_probe_env, gloo_threads_at_exit, run, threads_at_exit

CASES = {
    "torchrun": ("torchrun", {}),
    "mpirun-torch-gloo-stats": ("mpirun", {"MEGDET_CGBN_COMM": "torch-gloo"}),
}


@pytest.mark.parametrize("ending", ["returns", "raises"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_no_gloo_thread_outlives_shutdown(tmp_path: Path, case: str, ending: str) -> None:
    launcher, env = CASES[case]
    probe = tmp_path / "threads"
    run(launcher, 2, ["tests/distributed/shutdown_worker.py", ending], env={**env, **exit_probe_env(probe)})
    assert len(threads_at_exit(probe)) >= 2  # both ranks recorded (torchrun's agent too)
    assert gloo_threads_at_exit(probe) == {}
