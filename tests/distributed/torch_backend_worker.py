"""A torchrun rank on a "GPU node" (CUDA reported visible) that trains on the CPU: the comm must pick
gloo and reduce CPU tensors.  ``torch.cuda.is_available`` is the one thing faked -- there is no GPU
here, and what is under test is the choice the comm makes when one is visible."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from megdet_hpc import distributed
from megdet_hpc.launch.local import write_report


def main() -> None:
    torch.cuda.is_available = lambda: True  # a GPU node, as the comm sees it
    comm = distributed.init(device=sys.argv[1])
    t = torch.full((3,), float(comm.rank + 1))
    comm.allreduce_(t)
    write_report(
        comm.rank, {"backend": str(dist.get_backend()), "sum": t.tolist(), "device": str(comm.device)}
    )
    distributed.shutdown()


if __name__ == "__main__":
    main()
