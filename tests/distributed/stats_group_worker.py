"""One CGBN layer forward + backward through ``stats_comm()`` on a real multi-process job; every rank
reports its outputs, gradients and running statistics and which transport carried the statistics.

argv[1]: the BN group size (0 = all ranks).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from megdet_hpc import distributed
from megdet_hpc.distributed.comm import Comm
from megdet_hpc.launch.local import write_report
from megdet_hpc.layers import CrossGPUBatchNorm2d


def main(comm: Comm) -> None:
    group_size = int(sys.argv[1]) or None
    stats = distributed.stats_comm()
    gen = torch.Generator().manual_seed(100 + comm.rank)
    x = (torch.randn(2, 4, 3, 5, generator=gen, dtype=torch.float64) * 3 + 1).float().requires_grad_(True)
    dy = torch.randn(2, 4, 3, 5, generator=gen)
    layer = CrossGPUBatchNorm2d(4, group_size=group_size)  # the statistics' comm: stats_comm()
    y = layer(x)
    (y * dy).sum().backward()
    # The gradients stay on the training comm: one gradient-style allreduce through it.
    g = torch.cat([layer.weight.grad, layer.bias.grad]).clone()
    comm.allreduce_(g, name="test.grads")
    write_report(
        comm.rank,
        {
            "comm": comm.name,
            "stats": stats.name,
            "same_object": stats is comm,
            "torch_backend": str(dist.get_backend()) if dist.is_initialized() else None,
            "stats_calls": stats.counters.calls.get("allreduce", 0),
            "y": y.detach().flatten().tolist(),
            "gx": x.grad.flatten().tolist(),
            "gwb": g.tolist(),
            "running": layer.running_mean.tolist() + layer.running_var.tolist(),
        },
    )


if __name__ == "__main__":
    distributed.run_with_comm(main)
