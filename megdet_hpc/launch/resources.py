"""What a Slurm job asks for, described once for ``launch sbatch`` and ``launch submitit``.

``SlurmResources`` holds the allocation (nodes, GPUs and tasks per node, CPUs per task, time limit,
the preemption signal and its lead, partition, account, job name, setup lines); ``validate`` is the one
list of rules, each a one-line ``ResourceError``.  ``add_arguments`` gives both commands the same flags
in the same units, and ``from_arguments`` turns them into validated resources:

* ``--nodes N`` or ``--gpus G`` (total GPUs = tasks; ``G / --gpus-per-node`` nodes, one task per GPU;
  fewer GPUs than a node's: one node with G of them);
* ``--gpus-per-node`` (0 = CPU-only tasks), ``--tasks-per-node`` (default: one per GPU, 1 without),
  ``--cpus-per-task``;
* ``--time`` in Slurm's syntax (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``),
  ``--signal`` and ``--signal-lead`` (seconds before the limit);
* ``--partition``, ``--account``, ``--job-name`` (default ``megdet-<tasks>gpu``), ``--setup`` (repeatable).

``--timeout`` (minutes) and ``--signal-delay`` are the old submitit spellings of ``--time`` and
``--signal-lead``, still accepted.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, replace

from megdet_hpc.utils.errors import UserError

CONTROL = re.compile(r"[\x00-\x1f\x7f]")
SIGNALS = ("USR1", "USR2", "TERM")
_TIME = re.compile(
    r"(?P<days>\d+)-(?P<dh>\d+)(?::(?P<dm>\d{2}))?(?::(?P<ds>\d{2}))?"  # D-HH[:MM[:SS]]
    r"|(?P<a>\d+)(?::(?P<b>\d{2}))?(?::(?P<c>\d{2}))?"  # MM, MM:SS, HH:MM:SS
)


class ResourceError(UserError, ValueError):
    """Invalid job resources or launcher parameters, with a one-line message."""


def slurm_time_minutes(text: str) -> int:
    """Minutes (rounded up) of a Slurm time limit; ``ResourceError`` when it is not one."""
    match = _TIME.fullmatch(text)
    if match is None:
        raise ResourceError(
            f"--time {text!r} is not a Slurm time (e.g. 24:00:00, 2-00:00:00 or 1440 minutes)"
        )
    g = {k: int(v) for k, v in match.groupdict().items() if v is not None}
    if "days" in g:
        seconds = ((g["days"] * 24 + g["dh"]) * 60 + g.get("dm", 0)) * 60 + g.get("ds", 0)
    elif "c" in g:  # HH:MM:SS
        seconds = (g["a"] * 60 + g["b"]) * 60 + g["c"]
    else:  # MM or MM:SS
        seconds = g["a"] * 60 + g.get("b", 0)
    return math.ceil(seconds / 60)


@dataclass(frozen=True)
class SlurmResources:
    nodes: int = 1
    gpus_per_node: int = 8  # 0 = CPU-only tasks
    tasks_per_node: int = 0  # 0 = one per GPU (1 without GPUs)
    cpus_per_task: int = 8
    time: str = "24:00:00"  # Slurm's syntax
    signal: str = "USR2"  # sent signal_lead_s before the time limit (USR2: NCCL may take USR1)
    signal_lead_s: int = 120
    partition: str = ""
    account: str = ""
    job_name: str = ""  # "" = megdet-<tasks>gpu
    setup: tuple[str, ...] = ()  # shell lines run before the job (module load ..., source venv)

    @classmethod
    def for_gpus(cls, gpus: int, gpus_per_node: int = 8, **kwargs: object) -> SlurmResources:
        """``gpus`` tasks, one per GPU, ``gpus_per_node`` to a node (0: CPU-only tasks on one node)."""
        if gpus < 1:
            raise ResourceError(f"--gpus must be >= 1, got {gpus}")
        if gpus_per_node <= 0 or gpus <= gpus_per_node:  # one node (a negative count fails validate)
            return cls(nodes=1, gpus_per_node=min(gpus_per_node, gpus), tasks_per_node=gpus, **kwargs)  # type: ignore[arg-type]
        if gpus % gpus_per_node:
            raise ResourceError(f"--gpus {gpus} is not a multiple of --gpus-per-node {gpus_per_node}")
        return cls(
            nodes=gpus // gpus_per_node,
            gpus_per_node=gpus_per_node,
            tasks_per_node=gpus_per_node,
            **kwargs,  # type: ignore[arg-type]
        )

    @property
    def tasks(self) -> int:
        """Tasks (ranks) of the whole job."""
        return self.nodes * self.resolved_tasks_per_node

    @property
    def resolved_tasks_per_node(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    @property
    def time_minutes(self) -> int:
        return slurm_time_minutes(self.time)

    def validate(self) -> SlurmResources:
        """The one list of rules; the resources with defaults filled in (``ResourceError`` otherwise)."""
        checks = [
            (self.nodes >= 1, f"--nodes must be >= 1, got {self.nodes}"),
            (self.gpus_per_node >= 0, f"--gpus-per-node must be >= 0, got {self.gpus_per_node}"),
            (self.tasks_per_node >= 0, f"--tasks-per-node must be >= 1, got {self.tasks_per_node}"),
            (self.cpus_per_task >= 1, f"--cpus-per-task must be >= 1, got {self.cpus_per_task}"),
            (self.signal_lead_s >= 0, f"--signal-lead must be >= 0 seconds, got {self.signal_lead_s}"),
            (
                self.signal.upper().removeprefix("SIG") in SIGNALS,
                f"--signal must be {', '.join(SIGNALS[:-1])} or {SIGNALS[-1]}, got {self.signal!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ResourceError(message)
        if self.time_minutes < 1:
            raise ResourceError(f"--time {self.time!r} is under a minute")
        for name in ("job_name", "partition", "account"):
            if CONTROL.search(getattr(self, name)):
                raise ResourceError(f"--{name.replace('_', '-')} contains a control character")
        return replace(
            self,
            tasks_per_node=self.resolved_tasks_per_node,
            signal=self.signal.upper().removeprefix("SIG"),
            job_name=self.job_name or f"megdet-{self.tasks}gpu",
        )


DEFAULTS = SlurmResources()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The resource flags of ``launch sbatch`` and ``launch submitit`` (see the module docstring)."""
    d = DEFAULTS
    p.add_argument("--nodes", type=int, help=f"nodes (default {d.nodes}; or give --gpus)")
    p.add_argument("--gpus", type=int, help="total GPUs (= tasks, one per GPU); instead of --nodes")
    p.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node, help="0 = CPU-only tasks")
    p.add_argument("--tasks-per-node", type=int, help="default: one per GPU (1 without GPUs)")
    p.add_argument("--cpus-per-task", type=int, default=d.cpus_per_task)
    p.add_argument("--time", default=d.time, help="time limit, Slurm's syntax (24:00:00, 2-00:00:00, 1440)")
    p.add_argument("--timeout", dest="time", type=str, help=argparse.SUPPRESS)  # old spelling: minutes
    p.add_argument(
        "--signal", default=d.signal, help="preemption/time-limit signal (USR2: NCCL may take USR1)"
    )
    p.add_argument("--signal-lead", type=int, default=d.signal_lead_s, help="seconds before the time limit")
    p.add_argument("--signal-delay", dest="signal_lead", type=int, help=argparse.SUPPRESS)  # old spelling
    p.add_argument("--partition", default=d.partition)
    p.add_argument("--account", default=d.account)
    p.add_argument("--job-name", default=d.job_name, help="default: megdet-<tasks>gpu")
    p.add_argument("--setup", action="append", default=[], help="shell line run before the job (repeatable)")


def from_arguments(a: argparse.Namespace) -> SlurmResources:
    """Validated resources from the flags of ``add_arguments``."""
    common = {
        "cpus_per_task": a.cpus_per_task,
        "time": a.time,
        "signal": a.signal,
        "signal_lead_s": a.signal_lead,
        "partition": a.partition,
        "account": a.account,
        "job_name": a.job_name,
        "setup": tuple(a.setup),
    }
    if a.gpus is None:
        res = SlurmResources(
            nodes=DEFAULTS.nodes if a.nodes is None else a.nodes,
            gpus_per_node=a.gpus_per_node,
            tasks_per_node=a.tasks_per_node or 0,  # 0: one per GPU
            **common,  # type: ignore[arg-type]
        )
        return res.validate()
    res = SlurmResources.for_gpus(a.gpus, a.gpus_per_node, **common).validate()
    if a.nodes is not None and a.nodes != res.nodes:
        raise ResourceError(
            f"--gpus {a.gpus} at --gpus-per-node {a.gpus_per_node} is {res.nodes} node(s), not --nodes {a.nodes}"
        )
    if a.tasks_per_node and a.tasks_per_node != res.tasks_per_node:
        raise ResourceError(
            f"--gpus {a.gpus} runs {res.tasks_per_node} task(s) per node, not --tasks-per-node {a.tasks_per_node}"
        )
    return res


def check_images_per_gpu(images_per_gpu: int | None) -> None:
    if images_per_gpu is not None and images_per_gpu < 1:
        raise ResourceError(f"--images-per-gpu must be >= 1, got {images_per_gpu}")
