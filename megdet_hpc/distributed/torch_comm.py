"""The ``torch`` backend: torch.distributed (gloo on CPU, gloo + nccl when training on CUDA).

Rendezvous comes from the launcher: torchrun's env, or Slurm/OpenMPI variables translated to
MASTER_ADDR/MASTER_PORT (port derived from the job id so it is stable across requeues).  The master
address is what the launcher's environment table says (``ClusterEnvironment.master_addr``): under srun
the first host of the step's node list (``scontrol show hostnames``, or the hostlist parser where
scontrol is missing), resolved on each node -- never 127.0.0.1, which on a second node is that node's
own loopback; on one host 127.0.0.1.

The backend follows the *training device*, not the machine: ``train.device=cpu`` on a node with GPUs
gets gloo (NCCL cannot carry CPU tensors), and a CUDA run gets ``cpu:gloo,cuda:nccl`` so the few CPU
tensors some callers reduce (calibration, objects) still have a transport.

``MEGDET_COMM_TIMEOUT_S`` (default 600): torch.distributed's own timeout for the rendezvous and for
each collective.  The stall watchdog (``train.stall_timeout_s``) covers every backend during training;
this one also bounds the start-up rendezvous, where no step has run yet.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from megdet_hpc.distributed.comm import Comm, Group
from megdet_hpc.launch.environment import ClusterEnvironment, job_port
from megdet_hpc.utils import env as settings


def torch_backend(device_type: str | None, override: str | None = None) -> str:
    """The process-group backend for training on ``device_type`` (``cpu``/``cuda``; None: CUDA when
    visible).  ``MEGDET_TORCH_BACKEND`` (or ``override``) wins, e.g. gloo for CUDA tensors of two
    ranks sharing one GPU."""
    override = override if override is not None else settings.torch_backend()
    if override:
        return override
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def init_default_group(backend: str, **kwargs: Any) -> None:
    """``dist.init_process_group``, with ``torch.distributed.nn.functional`` imported first.

    Why: that module's functions take ``group=group.WORLD`` as a default argument, evaluated when it
    is imported; imported after the default group exists (torchvision imports it through
    ``torch._dynamo``, and the model is built after the comm), it pins that group for the life of the
    process.  ``destroy_process_group`` then cannot free it, and its gloo threads outlive the
    interpreter (see ``comm.shutdown``).  Imported before, the defaults are None.
    """
    import torch.distributed.nn.functional  # noqa: F401

    dist.init_process_group(backend, **kwargs)


class TorchComm(Comm):
    name = "torch"

    def __init__(self, env: ClusterEnvironment, device_type: str | None = None) -> None:
        super().__init__(env)
        self._owns = False
        if not dist.is_initialized():
            environ = dict(os.environ)
            if "MASTER_ADDR" not in environ:
                os.environ["MASTER_ADDR"] = env.master_addr(environ)  # the launcher's table says how
            os.environ.setdefault("MASTER_PORT", str(job_port(environ)))
            backend = torch_backend(device_type)
            timeout = timedelta(seconds=settings.comm_timeout_s())
            init_default_group(
                backend, rank=env.rank, world_size=env.size, timeout=timeout, init_method="env://"
            )
            self._owns = True

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def device(self) -> torch.device:
        if "nccl" in str(dist.get_backend()):
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @property
    def size(self) -> int:
        return dist.get_world_size()

    def _allreduce_(self, tensor: torch.Tensor, group: Group | None, name: str | None = None) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group.handle if group else None)
        return tensor

    def _broadcast_(self, tensor: torch.Tensor, root: int) -> torch.Tensor:
        dist.broadcast(tensor, src=root)
        return tensor

    def _allgather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def _broadcast_object(self, obj: Any, root: int) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=root)
        return box[0]

    def _barrier(self) -> None:
        dist.barrier()

    def _new_group(self, ranks: tuple[int, ...]) -> Any:
        return dist.new_group(list(ranks))

    def shutdown(self) -> None:
        if self._owns and dist.is_initialized():
            dist.destroy_process_group()
            self._owns = False
