"""Cross-GPU Batch Normalization (CGBN, MegDet section 3.2).

BatchNorm statistics are computed over the images of *every* rank of a BN group, forward and backward,
so a detector trained with 2 images per GPU normalises as if it saw the whole group's batch.

Forward: **one** allreduce per layer of ``[n*(m_r - s), M2_r + n*(m_r - s)^2, n]`` (2C+1 float64
values), where ``m_r``/``M2_r`` are this rank's per-channel mean and sum of squared deviations (a stable
local reduction) and ``s`` is a shift identical on every rank (the running mean).  The sums equal
``sum(x - s)`` and ``sum((x - s)^2)`` over the group, so ``mean = s + S1/N`` and
``var = S2/N - (S1/N)^2``.  At the first step ``s`` is 0, so ``S2/N`` and ``(S1/N)^2`` can be ~1e8 for
inputs offset by 1e4: the payload is float64 (C-sized, free next to the latency) and cancellation then
costs ~1e-8, where float32 ``E[x^2]-E[x]^2`` loses the variance entirely.  Counts weight uneven batches
and an empty rank contributes zeros but still joins the collective.

Normalisation subtracts the mean split in two float32 parts (``hi + lo``): ``x - hi`` is exact for
inputs near the mean, so outputs stay accurate to float32 rounding even for large offsets.

Backward: **one** allreduce of ``[sum(dy), sum(dy * x_hat)]`` (2C float32).  Weight and bias gradients
stay local: the optimizer's gradient allreduce averages them like every other parameter.

fp16/bf16 inputs keep float32 statistics and return the input dtype; channels_last inputs work; eval
mode uses running statistics and communicates nothing; ``group_size=1`` or a world of one process is a
fast path through ``nn.BatchNorm2d`` with no communication.  ``two_pass=True`` is the paper's variant
(global mean first, then the variance about it: two collectives), kept for comparison.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megdet_hpc.distributed import Comm, Group, stats_comm

# Inputs whose |mean| exceeds this many standard deviations are "ill-conditioned": float32 cannot
# hold their mean precisely enough, so the statistics and the normalisation take the compensated
# (float64 mean, split-mean subtraction) path.  Everything else uses torch's native kernels.
ILL_CONDITIONED = 256.0
ILL_FLAG = float(2**40)


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _view(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def _local_moments(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Per-channel mean (float64) and biased variance (float64) of this rank's shard.

    ``torch.batch_norm_update_stats`` is the native BN statistics kernel (one fused pass).  When the
    data is ill-conditioned its float32 mean is re-taken with a float64 accumulator and the variance
    corrected about it (``E[(x-a)^2] = var + (mean-a)^2``).
    """
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    mean32, var32 = torch.batch_norm_update_stats(xf, None, None, 0.0)
    mean, var = mean32.double(), var32.double()
    ill = bool((mean.abs() > ILL_CONDITIONED * torch.sqrt(var + eps)).any())
    if ill:
        precise = xf.sum(_reduce_dims(x), dtype=torch.float64) / (x.numel() // x.shape[1])
        var = (var - (precise - mean) ** 2).clamp_min_(0.0)
        mean = precise
    return mean, var, ill


@torch.no_grad()
def group_statistics(
    x: torch.Tensor, shift: torch.Tensor, comm: Comm, group: Group | None, two_pass: bool = False,
    eps: float = 1e-5, name: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float, bool]:  # fmt: skip
    """Mean and biased variance (float64, per channel) over every rank of ``group``, the count, and
    whether any rank's shard was ill-conditioned (agreed through the same collective)."""
    channels = x.shape[1]
    dims = _reduce_dims(x)
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    n = x.numel() // channels if channels else 0
    if two_pass:
        first = torch.zeros(channels + 1, dtype=torch.float64, device=x.device)
        if n:
            first[:channels] = xf.sum(dims, dtype=torch.float64)
        first[channels] = n
        comm.allreduce_(first, group, name and f"{name}.sum")
        total = float(first[channels])
        mean = first[:channels] / max(total, 1.0)
        second = torch.zeros(channels, dtype=torch.float64, device=x.device)
        if n:
            second.copy_(((xf - _view(mean.to(xf.dtype), xf)) ** 2).sum(dims, dtype=torch.float64))
        comm.allreduce_(second, group, name and f"{name}.sq")
        var = second / max(total, 1.0)
        ill = bool((mean.abs() > ILL_CONDITIONED * torch.sqrt(var + eps)).any())
        return mean, var, total, ill

    payload = torch.zeros(2 * channels + 1, dtype=torch.float64, device=x.device)
    ill_local = False
    if n:
        mean_local, var_local, ill_local = _local_moments(x, eps)
        delta = mean_local - shift.double()
        payload[:channels] = n * delta
        payload[channels : 2 * channels] = n * var_local + n * delta * delta
    # The count slot also carries the conditioning vote: 2^40 per ill-conditioned rank (float64 keeps
    # integers exact to 2^53, so counts < 2^40 and up to 8192 voting ranks stay separable).
    payload[2 * channels] = n + (ILL_FLAG if ill_local else 0.0)
    comm.allreduce_(payload, group, name and f"{name}.fwd")
    raw = float(payload[2 * channels])
    total = raw % ILL_FLAG
    ill = raw >= ILL_FLAG
    norm = max(total, 1.0)
    dmean = payload[:channels] / norm
    var = (payload[channels : 2 * channels] / norm - dmean * dmean).clamp_min_(0.0)
    return shift.double() + dmean, var, total, ill


def _split_mean(mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hi = mean.float()
    return hi, (mean - hi.double()).float()


class _CrossGPUBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        mean: torch.Tensor,
        var: torch.Tensor,
        total: float,
        eps: float,
        ill: bool,
        comm: Comm,
        group: Group | None,
        name: str | None,
    ) -> torch.Tensor:
        hi, lo = _split_mean(mean)
        var32 = var.float()
        invstd = torch.rsqrt(var32 + eps)
        if ill:  # compensated: x - hi is exact near the mean, lo is folded into the offset
            scale = invstd if weight is None else invstd * weight.float()
            offset = -lo * scale if bias is None else bias.float() - lo * scale
            xf = x if x.dtype == torch.float32 else x.float()
            out = torch.addcmul(_view(offset, xf), xf - _view(hi, xf), _view(scale, xf)).to(x.dtype)
        else:  # native single-pass normalisation with the group statistics
            out = F.batch_norm(x, hi, var32, weight, bias, False, 0.0, eps)
        ctx.save_for_backward(x, weight, hi, lo, var32, invstd)
        ctx.total, ctx.eps, ctx.ill, ctx.comm, ctx.group, ctx.name = total, eps, ill, comm, group, name
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, weight, hi, lo, var32, invstd = ctx.saved_tensors
        channels = x.shape[1]
        dims = _reduce_dims(x)
        payload = torch.zeros(2 * channels, dtype=torch.float32, device=x.device)
        x_hat = None
        if x.numel():
            if ctx.ill:
                xf = x if x.dtype == torch.float32 else x.float()
                dy = grad_out if grad_out.dtype == torch.float32 else grad_out.float()
                x_hat = (xf - _view(hi, xf) - _view(lo, xf)) * _view(invstd, xf)
                payload[:channels] = dy.sum(dims)
                payload[channels:] = (dy * x_hat).sum(dims)
            else:  # native fused reduction: grad_bias = sum(dy), grad_weight = sum(dy * x_hat)
                _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
                    grad_out, x, None, hi, var32, None, None, False, ctx.eps, [False, True, True]
                )
                payload[:channels] = sum_dy
                payload[channels:] = sum_dy_xhat
        local = payload.clone() if weight is not None else None
        ctx.comm.allreduce_(payload, ctx.group, ctx.name and f"{ctx.name}.bwd")
        grad_x = None
        if ctx.needs_input_grad[0]:
            norm = max(ctx.total, 1.0)
            scale = invstd if weight is None else invstd * weight.float()
            k1, k2 = payload[:channels] / norm, payload[channels:] / norm
            if x_hat is not None:
                dy = grad_out if grad_out.dtype == torch.float32 else grad_out.float()
                grad_x = ((dy - _view(k1, dy) - x_hat * _view(k2, dy)) * _view(scale, dy)).to(x.dtype)
            else:
                # scale * (dy - k1 - x_hat * k2) = scale * dy + BN_eval(x; weight=-scale*k2, bias=-scale*k1)
                affine = F.batch_norm(x, hi, var32, -scale * k2, -scale * k1, False, 0.0, ctx.eps)
                if affine.dtype != torch.float32:
                    affine = affine.float()
                dy = grad_out if grad_out.dtype == torch.float32 else grad_out.float()
                grad_x = torch.addcmul(affine, dy, _view(scale, dy)).to(x.dtype)
        grad_w = grad_b = None
        if weight is not None and local is not None:
            grad_w = local[channels:].to(weight.dtype) if ctx.needs_input_grad[1] else None
            grad_b = local[:channels].to(weight.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None


class CrossGPUBatchNorm2d(nn.BatchNorm2d):
    """Drop-in ``nn.BatchNorm2d`` whose training statistics span the ranks of a BN group.

    Same constructor arguments and state_dict keys as ``nn.BatchNorm2d``, plus:
      group_size: ranks sharing statistics; 1 = local BN, None/0 = all ranks (default).  Groups are
        contiguous ranks (MegDet, apex) and must divide the world size.
      two_pass: the paper's two-collective variant (global mean, then variance) instead of one pass.
      comm: the ``Comm`` carrying the statistics (default: ``megdet_hpc.distributed.stats_comm()``).
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
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if group_size is not None and group_size < 0:
            raise ValueError(f"group_size must be >= 0 or None, got {group_size}")
        self.group_size = group_size
        self.two_pass = two_pass
        self._comm = comm
        self._group: Group | None = None
        self._group_ready = False
        self._name: str | None = None  # stable collective name, the same on every rank
        self._force_sync = False  # benchmarks: run the CGBN path even in a one-process group

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, two_pass={self.two_pass}"

    def __getstate__(self) -> dict[str, Any]:
        # Comms and process groups are per-process handles: never pickle/deepcopy them.
        state = self.__dict__.copy()
        state.update(_comm=None, _group=None, _group_ready=False, _name=None)
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
        if not use_batch_stats or (self.group_size == 1 and not self._force_sync):
            return super().forward(input)
        comm = self._resolve_comm()
        if (self._group.size if self._group is not None else comm.size) == 1 and not self._force_sync:
            return super().forward(input)

        shift = self.running_mean if self.running_mean is not None else input.new_zeros(self.num_features)
        mean, var, total, ill = group_statistics(input, shift, comm, self._group, self.two_pass, self.eps,
                                                 self._name)  # fmt: skip
        if total == 0:
            return input.clone()
        if self.training and self.track_running_stats:
            self._update_running_stats(mean, var, total)
        return _CrossGPUBatchNormFunction.apply(
            input, self.weight, self.bias, mean, var, total, self.eps, ill, comm, self._group, self._name
        )

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, total: float) -> None:
        """Same rule as nn.BatchNorm2d (unbiased running_var), from group statistics: every rank of
        the group computes bit-identical buffers."""
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * (total / (total - 1)) if total > 1 else var
        rm, rv = self.running_mean, self.running_var
        rm.copy_((rm.double() * (1 - factor) + mean * factor).to(rm.dtype))
        rv.copy_((rv.double() * (1 - factor) + unbiased * factor).to(rv.dtype))
