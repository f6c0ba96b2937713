"""TrainJob as submitit's Checkpointable: what submitit's own preemption handler would requeue."""

from __future__ import annotations

import pickle

import submitit

from megdet_hpc.launch.submitit_launcher import TrainJob


def test_checkpoint_resubmits_the_same_training() -> None:
    job = TrainJob(
        "configs/demo_cpu.yaml", ["solver.max_iter=10"], total_batch=8, env={"MEGDET_COMM": "torch"}
    )
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    again = delayed.function
    assert isinstance(again, TrainJob) and again == job and again is not job
    assert delayed.args == () and delayed.kwargs == {}
    # submitit pickles the resubmission; the requeued run resumes from the output dir (argv unchanged).
    restored = pickle.loads(pickle.dumps(delayed)).function
    assert restored.argv() == [
        "--config",
        "configs/demo_cpu.yaml",
        "--total-batch",
        "8",
        "solver.max_iter=10",
    ]
