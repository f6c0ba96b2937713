"""Reports the MPI thread level the mpi4py comm got, and reduces from a second thread while the main
thread waits -- what autograd's CUDA device thread does with the CGBN backward's allreduce."""

from __future__ import annotations

import threading

import torch

from megdet_hpc import distributed
from megdet_hpc.launch.local import write_report


def main() -> None:
    comm = distributed.init()
    stats = distributed.stats_comm()
    t = torch.full((4,), float(comm.rank + 1))
    worker = threading.Thread(target=stats.allreduce_, args=(t,), kwargs={"name": "thread.sum"})
    worker.start()
    worker.join()
    write_report(
        comm.rank,
        {"comm": comm.name, "stats": stats.name, "level": stats.thread_level, "sum": t.tolist()},
    )
    distributed.shutdown()


if __name__ == "__main__":
    main()
