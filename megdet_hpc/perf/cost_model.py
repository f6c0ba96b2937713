"""A time-to-train model for MegDet jobs from 1 to N GPUs.

Per iteration = compute (images per GPU x seconds per image) + CGBN (2 collectives per BN layer,
forward and backward, each latency-bound and sequential: the layers depend on each other) + the part of
the gradient allreduce that backward does not hide + the trainer's one small per-step vote.  Allreduces follow the ring model
``2(N-1) * alpha + 2(N-1)/N * bytes / bandwidth``; beyond one node it is hierarchical (ring inside a
node on the intra-node link, then a ring across nodes on the inter-node link carrying 1/g of the
bytes).  Gradients travel in Horovod fusion buffers (``fusion_bytes`` each, one latency term per buffer)
and ``cycle_s`` is Horovod's cycle time (paid once per buffer and per CGBN collective when CGBN rides
Horovod).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Link:
    alpha_s: float  # per-message latency
    bandwidth_Bps: float  # bytes per second per direction

    def ring_allreduce_s(self, n: int, nbytes: float) -> float:
        if n <= 1:
            return 0.0
        return 2 * (n - 1) * self.alpha_s + 2 * (n - 1) / n * nbytes / self.bandwidth_Bps


@dataclass(frozen=True)
class Machine:
    name: str
    compute_s_per_image: float  # forward+backward+step per image on one device
    gpus_per_node: int
    intra: Link
    inter: Link
    backward_fraction: float = 0.6  # share of compute that is backward (gradient comm can hide in it)
    overlap: float = 0.8  # how much of that backward the gradient allreduce can overlap with
    cycle_s: float = 0.0  # Horovod cycle time added per fused buffer / CGBN collective
    fusion_bytes: float = 64 * 2**20
    data_s_per_iter: float = 0.0  # input pipeline stalls not hidden by workers

    def allreduce_s(self, n: int, nbytes: float) -> float:
        g = min(n, self.gpus_per_node)
        nodes = math.ceil(n / g)
        return self.intra.ring_allreduce_s(g, nbytes) + self.inter.ring_allreduce_s(nodes, nbytes / g)


PRESETS = {
    # The paper's setting (2018): Titan Xp-class GPUs, 8 per node, PCIe inside a node and 56 Gb/s
    # InfiniBand between nodes; compute per image calibrated so that 8 GPUs x 2 images x 90k
    # iterations take the paper's 33 h.
    "megdet2018": Machine(
        "megdet2018",
        compute_s_per_image=0.58,
        gpus_per_node=8,
        intra=Link(10e-6, 10e9),
        inter=Link(20e-6, 7e9),
        cycle_s=1e-3,
        data_s_per_iter=0.05,
    ),
    # A current node: H100 with NVLink inside the node, 100 Gb/s InfiniBand between nodes.
    "h100-ib100": Machine(
        "h100-ib100",
        compute_s_per_image=0.03,
        gpus_per_node=8,
        intra=Link(5e-6, 150e9),
        inter=Link(5e-6, 12.5e9),
        cycle_s=0.0,
    ),
}


@dataclass(frozen=True)
class Workload:
    images_per_gpu: int
    params: int  # trainable parameters (gradient elements)
    bn_channels: tuple[int, ...]  # channels of every CGBN layer
    total_images: int  # the schedule in images
    grad_bytes_per_param: int = 4  # 2 with fp16 compression
    bn_group_size: int = 0  # 0 = all ranks


@dataclass(frozen=True)
class Prediction:
    gpus: int
    compute_s: float
    cgbn_s: float
    grad_s: float
    grad_exposed_s: float
    iter_s: float
    images_per_s: float
    efficiency: float
    iterations: int
    time_to_train_h: float


def predict(m: Machine, w: Workload, gpus: int) -> Prediction:
    compute = w.images_per_gpu * m.compute_s_per_image + m.data_s_per_iter
    group = gpus if not w.bn_group_size else min(w.bn_group_size, gpus)
    cgbn = 0.0
    if group > 1:
        for c in w.bn_channels:  # forward [2C+1] float64, backward [2C] float32
            cgbn += m.allreduce_s(group, (2 * c + 1) * 8) + m.allreduce_s(group, 2 * c * 4) + 2 * m.cycle_s
    grad_bytes = w.params * w.grad_bytes_per_param
    buffers = max(1, math.ceil(grad_bytes / m.fusion_bytes))
    grad = 0.0
    if gpus > 1:
        grad = sum(
            m.allreduce_s(gpus, min(m.fusion_bytes, grad_bytes - i * m.fusion_bytes)) + m.cycle_s
            for i in range(buffers)
        )
    hidden = m.overlap * m.backward_fraction * w.images_per_gpu * m.compute_s_per_image
    exposed = max(0.0, grad - hidden)
    vote = m.allreduce_s(gpus, 64) + m.cycle_s if gpus > 1 else 0.0  # the trainer's per-step vote
    iter_s = compute + cgbn + exposed + vote
    batch = gpus * w.images_per_gpu
    ideal = compute
    return Prediction(
        gpus=gpus,
        compute_s=compute,
        cgbn_s=cgbn,
        grad_s=grad,
        grad_exposed_s=exposed,
        iter_s=iter_s,
        images_per_s=batch / iter_s,
        efficiency=ideal / iter_s,
        iterations=math.ceil(w.total_images / batch),
        time_to_train_h=math.ceil(w.total_images / batch) * iter_s / 3600,
    )


def as_dict(p: Prediction) -> dict:
    return asdict(p)
