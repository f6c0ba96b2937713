"""Cross-GPU Batch Normalization (CGBN, MegDet section 3.2), on CPU and CUDA.

BatchNorm statistics are computed over the images of *every* rank of a BN group, forward and backward,
so a detector trained with 2 images per GPU normalises as if it saw the whole group's batch.

Forward: **one** allreduce per layer of ``[sum x, sum x^2, n]`` (2C+1 float64).  Each rank computes
its shard's mean ``m`` and biased variance ``v`` with the native BN statistics kernel and sends
``[n m, n v + n m^2, n]``; the group's mean and variance follow from the sums.  float64 because the
payload is C-sized (free next to the latency) and ``E[x^2] - E[x]^2`` then stays exact to ~1e-8 even
for inputs offset by 1e4 standard deviations, where float32 loses the variance entirely.  Counts
weight uneven batches; an empty rank sends zeros but still joins.  torch's SyncBatchNorm all-gathers
N x (2C+1) values instead: O(N C) bytes per layer against our O(C).

Backward: **one** allreduce of ``[sum dy, sum dy * x_hat]`` (2C float32).  Weight and bias gradients
stay local: the optimizer's gradient allreduce averages them like every other parameter.

Ill-conditioned inputs (``|mean| > 256 std``): the group mean is split into float32 ``hi + lo`` and
normalisation computes ``(x - hi) * invstd * w + (b - lo * invstd * w)``; ``x - hi`` is exact near the
mean.  CUDA's BN kernels compute ``(x - mean)`` first, so that is always the path there.  CPU's kernels
fold the mean into a bias (``x * a + b``, which cancels catastrophically for such inputs), so the CPU
takes an explicit elementwise path for them.  A shard's mean itself gets a compensated pass
(``m + mean(x - m)``) when its inputs are ill-conditioned: decided exactly per call on the CPU (free),
and on CUDA from the layer's previous group statistics, read back through pinned memory without
waiting on the GPU (the first call always compensates).

No host synchronisation on CUDA: the count, the conditioning and the running-statistics update stay
on the device (``torch.cuda.set_sync_debug_mode("error")`` holds through forward and backward).
Kernels (``kernels=``): ``portable`` uses native ops that exist on CPU and CUDA (``batch_norm_update_stats``,
eval-mode ``native_batch_norm``, ``native_batch_norm_backward``); ``fused`` adds torch's CUDA-only
SyncBN elementwise kernels (``batch_norm_elemt``, ``batch_norm_backward_elemt``: one pass each instead
of three); ``auto`` = fused on CUDA, portable elsewhere.  ``bash bench/gpu.sh`` times both.

fp16/bf16 inputs keep float32 statistics and return the input dtype; channels_last inputs work; eval
mode uses running statistics and communicates nothing; ``group_size=1`` or a world of one process is a
fast path through ``nn.BatchNorm2d`` with no communication (``force_sync=True`` runs the CGBN path
anyway, for benchmarks).  ``two_pass=True`` is the paper's variant (global mean first, then the
variance about it: two collectives), kept for comparison.  Under activation checkpointing the
recomputation reuses the forward's statistics (``layers/recompute.py``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megdet_hpc.distributed import Comm, Group, stats_comm
from megdet_hpc.layers import recompute

# Inputs whose |mean| exceeds this many standard deviations are "ill-conditioned": float32 cannot hold
# their mean precisely enough for a fused ``x * a + b`` normalisation or a one-pass shard mean.
ILL_CONDITIONED = 256.0
KERNELS = ("auto", "portable", "fused")
_CONDITION_CHECK_EVERY = 16  # CUDA: calls between conditioning checks of a layer's statistics


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _view(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@dataclass(frozen=True)
class GroupStats:
    """Statistics of one BN group, on the input's device: mean and biased variance (float64, C) and the
    count (float64, shape [1]); never copied to the host."""

    mean: torch.Tensor
    var: torch.Tensor
    total: torch.Tensor


def _shard_moments(x: torch.Tensor, compensate: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
    """This shard's mean (float64) and biased variance (float32), from the native statistics kernel.

    ``compensate``: re-take the mean as ``m + mean(x - m)`` (terms of the size of the spread, exact
    enough in float32) and move the variance to it (``E[(x-a)^2] = var + (mean-a)^2``).  None: decide
    from this shard's own moments (CPU, where reading them back costs nothing).
    """
    xs = x if x.is_cuda else _as_float(x)  # CUDA kernels take fp16/bf16 with float32 statistics
    mean32, var32 = torch.batch_norm_update_stats(xs, None, None, 0.0)
    if compensate is None:
        compensate = bool((mean32.abs() > ILL_CONDITIONED * torch.sqrt(var32 + 1e-5)).any())
    if not compensate:
        return mean32.double(), var32
    delta = (_as_float(x) - _view(mean32, x)).mean(_reduce_dims(x), dtype=torch.float64)
    return mean32.double() + delta, (var32.double() - delta * delta).clamp_min_(0.0).float()


@torch.no_grad()
def group_statistics(
    x: torch.Tensor,
    comm: Comm,
    group: Group | None,
    *,
    two_pass: bool = False,
    compensate: bool | None = None,
    name: str | None = None,
) -> GroupStats:
    """Mean, variance and count over every rank of ``group``: one collective (two with ``two_pass``)."""
    channels = x.shape[1]
    n = x.numel() // channels if channels else 0
    opts: dict[str, Any] = {"dtype": torch.float64, "device": x.device}
    if two_pass:
        first = torch.full((channels + 1,), float(n), **opts)
        if n:
            torch.sum(_as_float(x), _reduce_dims(x), dtype=torch.float64, out=first[:channels])
        else:
            first[:channels].zero_()
        comm.allreduce_(first, group, name and f"{name}.sum")
        total = first[channels:]
        mean = first[:channels] / total.clamp(min=1.0)
        second = torch.zeros(channels, **opts)
        if n:
            xf = _as_float(x)
            torch.sum(
                (xf - _view(mean.to(xf.dtype), xf)) ** 2, _reduce_dims(x), dtype=torch.float64, out=second
            )
        comm.allreduce_(second, group, name and f"{name}.sq")
        return GroupStats(mean, second / total.clamp(min=1.0), total)

    payload = torch.full((2 * channels + 1,), float(n), **opts)
    if n:
        mean, var = _shard_moments(x, compensate)
        torch.mul(mean, n, out=payload[:channels])
        # n v + n m^2, written straight into the payload
        torch.addcmul(var * n, mean, payload[:channels], out=payload[channels : 2 * channels])
    else:
        payload[: 2 * channels].zero_()
    comm.allreduce_(payload, group, name and f"{name}.fwd")
    total = payload[2 * channels :]
    norm = total if n else total.clamp(min=1.0)  # a rank with data knows the total is positive
    mean = payload[:channels] / norm
    var = torch.addcmul(payload[channels : 2 * channels] / norm, mean, mean, value=-1.0).clamp_(min=0.0)
    return GroupStats(mean, var, total)


class _Kernels:
    """The elementwise halves of BN with group statistics, for one input (see module docstring)."""

    def __init__(self, x: torch.Tensor, choice: str, exact_cpu: bool) -> None:
        self.fused = x.is_cuda and choice in ("auto", "fused")
        self.explicit = not x.is_cuda and exact_cpu  # CPU, ill-conditioned: no fused x * a + b

    def normalize(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        shifted_bias: torch.Tensor,
        hi: torch.Tensor,
        invstd: torch.Tensor,
        var32: torch.Tensor,
        eps: float,
    ) -> torch.Tensor:
        if self.explicit:
            scale = invstd * weight
            xf = _as_float(x)
            return torch.addcmul(_view(shifted_bias, xf), xf - _view(hi, xf), _view(scale, xf)).to(x.dtype)
        if self.fused:
            return torch.batch_norm_elemt(x, weight, shifted_bias, hi, invstd, eps)
        return torch.native_batch_norm(x, weight, shifted_bias, hi, var32, False, 0.0, eps)[0]

    def grad_input(
        self,
        dy: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        hi: torch.Tensor,
        lo: torch.Tensor,
        invstd: torch.Tensor,
        var32: torch.Tensor,
        sums: torch.Tensor,
        total: torch.Tensor,
        eps: float,
    ) -> torch.Tensor:
        """``w invstd (dy - mean(dy) - x_hat mean(dy x_hat))`` with the group means from ``sums``
        = [sum dy, sum dy x_hat] and ``x_hat = (x - hi - lo) invstd``."""
        channels = x.shape[1]
        sum_dy, sum_dy_xhat = sums[:channels], sums[channels:]
        if self.fused:
            # torch.batch_norm_backward_elemt computes (dy - A/N - (x - hi) invstd^2 B/N) w invstd; with
            # B = sum dy (x - mean) and A = sum dy - lo invstd^2 B it is exact for x_hat about hi + lo.
            sum_dy_xmu = sum_dy_xhat / invstd
            shifted = torch.addcmul(sum_dy, lo * invstd, sum_dy_xhat, value=-1.0)
            count = total.to(torch.int32)
            return torch.batch_norm_backward_elemt(dy, x, hi, invstd, weight, shifted, sum_dy_xmu, count)
        norm = total.float()
        scale = invstd * weight
        k1, k2 = sum_dy / norm, sum_dy_xhat / norm
        dyf = _as_float(dy)
        if self.explicit:
            xf = _as_float(x)
            x_hat = (xf - _view(hi, xf) - _view(lo, xf)) * _view(invstd, xf)
            return ((dyf - _view(k1, dyf) - x_hat * _view(k2, dyf)) * _view(scale, dyf)).to(x.dtype)
        # scale (dy - k1 - x_hat k2) = scale dy + BN_eval(x; mean=hi, weight=-scale k2, bias=-scale k1 + scale k2 invstd lo)
        affine_w = -scale * k2
        affine_b = torch.addcmul(-scale * k1, affine_w, lo * invstd, value=-1.0)
        affine = _as_float(torch.native_batch_norm(x, affine_w, affine_b, hi, var32, False, 0.0, eps)[0])
        return torch.addcmul(affine, dyf, _view(scale, dyf)).to(x.dtype)


class _CrossGPUBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        mean: torch.Tensor,
        var: torch.Tensor,
        total: torch.Tensor,
        eps: float,
        exact_cpu: bool,
        kernels: str,
        comm: Comm,
        group: Group | None,
        name: str | None,
    ) -> torch.Tensor:
        channels = x.shape[1]
        hi = mean.float()
        lo = (mean - hi).float()
        var32 = var.float()
        invstd = torch.rsqrt(var + eps).float()
        w = weight.float() if weight is not None else torch.ones(channels, device=x.device)
        b = bias.float() if bias is not None else torch.zeros(channels, device=x.device)
        ops = _Kernels(x, kernels, exact_cpu)
        if x.numel():
            shifted_bias = torch.addcmul(b, lo, invstd * w, value=-1.0)
            out = ops.normalize(x, w, shifted_bias, hi, invstd, var32, eps)
        else:
            out = torch.empty_like(x)
        ctx.save_for_backward(x, w, hi, lo, invstd, var32, total)
        ctx.has_weight = weight is not None
        ctx.eps, ctx.exact_cpu, ctx.kernels, ctx.comm, ctx.group, ctx.name = (
            eps,
            exact_cpu,
            kernels,
            comm,
            group,
            name,
        )
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, w, hi, lo, invstd, var32, total = ctx.saved_tensors
        channels = x.shape[1]
        ops = _Kernels(x, ctx.kernels, ctx.exact_cpu)
        dy = (
            grad_out
            if grad_out.is_contiguous(memory_format=_layout(x))
            else grad_out.contiguous(memory_format=_layout(x))
        )
        if x.numel():
            if ops.explicit:
                xf, dyf = _as_float(x), _as_float(dy)
                x_hat = (xf - _view(hi, xf) - _view(lo, xf)) * _view(invstd, xf)
                dims = _reduce_dims(x)
                sums = torch.cat([dyf.sum(dims), (dyf * x_hat).sum(dims)])
            else:  # native fused reduction: sum dy (x - hi) invstd and sum dy; then the lo correction
                _, dy_xhi, sum_dy = torch.ops.aten.native_batch_norm_backward(
                    dy, x, w, None, None, hi, invstd, True, ctx.eps, [False, True, True]
                )
                sums = torch.cat([sum_dy, torch.addcmul(dy_xhi, lo * invstd, sum_dy, value=-1.0)])
        else:
            sums = torch.zeros(2 * channels, device=x.device)
        local = sums.clone() if ctx.has_weight and any(ctx.needs_input_grad[1:3]) else None
        ctx.comm.allreduce_(sums, ctx.group, ctx.name and f"{ctx.name}.bwd")
        grad_x = None
        if ctx.needs_input_grad[0]:
            if x.numel():
                grad_x = ops.grad_input(dy, x, w, hi, lo, invstd, var32, sums, total, ctx.eps)
            else:
                grad_x = torch.empty_like(x)
        grad_w = grad_b = None
        if local is not None:
            grad_w = local[channels:] if ctx.needs_input_grad[1] else None
            grad_b = local[:channels] if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, *([None] * 9)


def _layout(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class CrossGPUBatchNorm2d(nn.BatchNorm2d):
    """Drop-in ``nn.BatchNorm2d`` whose training statistics span the ranks of a BN group.

    Same constructor arguments and state_dict keys as ``nn.BatchNorm2d``, plus:
      group_size: ranks sharing statistics; 1 = local BN, None/0 = all ranks (default).  Groups are
        contiguous ranks (MegDet, apex) and must divide the world size.
      two_pass: the paper's two-collective variant (global mean, then variance) instead of one pass.
      comm: the ``Comm`` carrying the statistics (default: ``megdet_hpc.distributed.stats_comm()``).
      force_sync: run the CGBN path even in a one-process group (benchmarks compare it with BN).
      kernels: ``auto`` | ``portable`` | ``fused`` (see module docstring).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        group_size: int | None = None,
        two_pass: bool = False,
        comm: Comm | None = None,
        force_sync: bool = False,
        kernels: str = "auto",
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if group_size is not None and group_size < 0:
            raise ValueError(f"group_size must be >= 0 or None, got {group_size}")
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
        self.group_size = group_size
        self.two_pass = two_pass
        self.force_sync = force_sync
        self.kernels = kernels
        self._comm = comm
        self._group: Group | None = None
        self._group_ready = False
        self._name: str | None = None  # stable collective name, the same on every rank
        self._replay: deque[GroupStats] = deque(maxlen=64)  # statistics of checkpointed forwards
        self._calls = 0
        self._ill_host: torch.Tensor | None = None  # CUDA: pinned copy of the last conditioning check
        self._ill_event: Any = None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, two_pass={self.two_pass}"

    def __getstate__(self) -> dict[str, Any]:
        # Comms, process groups, CUDA events and queued statistics are per-process: never pickle them.
        state = self.__dict__.copy()
        state.update(
            _comm=None,
            _group=None,
            _group_ready=False,
            _name=None,
            _replay=deque(maxlen=64),
            _ill_host=None,
            _ill_event=None,
            _calls=0,
        )
        return state

    def _resolve_comm(self) -> Comm:
        if self._comm is None:
            self._comm = stats_comm()
        if not self._group_ready:
            self._group = self._comm.contiguous_group(self.group_size)
            # Layers resolve in forward order, which is the same on every rank: so are their names.
            self._name = self._comm.unique_name("cgbn")
            self._group_ready = True
        return self._comm

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"CrossGPUBatchNorm2d expects 4D input (N, C, H, W), got {input.dim()}D")
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"CrossGPUBatchNorm2d has {self.num_features} channels but the input has {input.shape[1]}"
            )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        use_batch_stats = self.training or not self.track_running_stats
        if not use_batch_stats or (self.group_size == 1 and not self.force_sync):
            return self._local_forward(input)
        comm = self._resolve_comm()
        if (self._group.size if self._group is not None else comm.size) == 1 and not self.force_sync:
            return self._local_forward(input)

        if recompute.current_mode() == recompute.REPLAY:
            stats = self._replay.popleft()
        else:
            stats = group_statistics(
                input,
                comm,
                self._group,
                two_pass=self.two_pass,
                compensate=self._needs_compensation(input),
                name=self._name,
            )
            if self.training and self.track_running_stats:
                self._update_running_stats(stats, has_data=input.numel() > 0)
            if recompute.current_mode() == recompute.RECORD:
                self._replay.append(stats)
            self._watch_conditioning(stats)
        exact_cpu = not input.is_cuda and bool(_ill_conditioned(stats, self.eps))
        return _CrossGPUBatchNormFunction.apply(
            input,
            self.weight,
            self.bias,
            stats.mean,
            stats.var,
            stats.total,
            self.eps,
            exact_cpu,
            self.kernels,
            comm,
            self._group,
            self._name,
        )

    def _local_forward(self, input: torch.Tensor) -> torch.Tensor:
        """``nn.BatchNorm2d``; recomputed under activation checkpointing it normalises with the batch
        statistics again but leaves the running ones alone (they were updated by the forward): the same
        call with momentum 0 -- ``(1 - 0) r + 0 b`` is ``r`` bit for bit -- and no count increment, so the
        recomputation saves the same tensors as the forward did."""
        if recompute.current_mode() == recompute.REPLAY and self.training and self.track_running_stats:
            return F.batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias, True, 0.0, self.eps
            )
        return super().forward(input)

    # -- conditioning ------------------------------------------------------------------------------
    def _needs_compensation(self, x: torch.Tensor) -> bool | None:
        """Whether this shard's mean needs the compensated pass (see module docstring); None on the
        CPU, where ``group_statistics`` decides from the shard's own moments."""
        if not x.is_cuda:
            return None
        if self._ill_host is None:
            return True  # first call: no history yet
        if self._ill_event is not None and self._ill_event.query():
            self._ill_event = None
        return bool(self._ill_host[0])

    def _watch_conditioning(self, stats: GroupStats) -> None:
        """CUDA: every few calls, copy "are these statistics ill-conditioned" to pinned host memory
        without waiting; the next calls read it (``_needs_compensation``)."""
        self._calls += 1
        if not stats.mean.is_cuda or (self._calls - 1) % _CONDITION_CHECK_EVERY:
            return
        if self._ill_event is not None and not self._ill_event.query():
            return  # the previous check is still in flight
        if self._ill_host is None:
            self._ill_host = torch.ones(1, dtype=torch.bool, pin_memory=True)
        self._ill_host.copy_(_ill_conditioned(stats, self.eps).reshape(1), non_blocking=True)
        self._ill_event = torch.cuda.Event()
        self._ill_event.record()

    @torch.no_grad()
    def _update_running_stats(self, stats: GroupStats, has_data: bool) -> None:
        """Same rule as nn.BatchNorm2d (unbiased running_var), from group statistics, on the device:
        every rank of the group computes bit-identical buffers; a group without data leaves them."""
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        total = stats.total
        if has_data:  # this rank has data, so the group's count is positive
            self.num_batches_tracked.add_(1)
            factor: torch.Tensor | float = (
                self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.double()
            )
        else:
            seen = total.reshape(()) > 0
            self.num_batches_tracked.add_(seen)
            momentum = (
                self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.clamp(min=1)
            )
            factor = seen * momentum
        unbiased = stats.var * (total / (total - 1.0).clamp(min=1.0))
        rm, rv = self.running_mean, self.running_var
        weight = factor.to(rm.dtype) if isinstance(factor, torch.Tensor) else factor
        rm.lerp_(stats.mean.to(rm.dtype), weight)
        rv.lerp_(unbiased.to(rv.dtype), weight)


def _ill_conditioned(stats: GroupStats, eps: float) -> torch.Tensor:
    """A 0-d bool tensor: is any channel's |mean| above ILL_CONDITIONED standard deviations?"""
    return (stats.mean.abs() > ILL_CONDITIONED * torch.sqrt(stats.var + eps)).any()
