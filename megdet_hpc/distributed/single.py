"""The ``none`` backend: one process, every collective is the identity."""

from __future__ import annotations

from typing import Any

import torch

from megdet_hpc.distributed.comm import Comm, Group
from megdet_hpc.launch.environment import LOCAL, ClusterEnvironment


class SingleProcessComm(Comm):
    name = "none"

    def __init__(self, env: ClusterEnvironment = LOCAL) -> None:
        super().__init__(env)

    @property
    def rank(self) -> int:
        return 0

    @property
    def size(self) -> int:
        return 1

    def _allreduce_(self, tensor: torch.Tensor, group: Group | None, name: str | None = None) -> torch.Tensor:
        return tensor

    def _broadcast_(self, tensor: torch.Tensor, root: int) -> torch.Tensor:
        return tensor

    def _allgather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def _broadcast_object(self, obj: Any, root: int) -> Any:
        return obj

    def _barrier(self) -> None:
        return None

    def _new_group(self, ranks: tuple[int, ...]) -> Any:
        return None
