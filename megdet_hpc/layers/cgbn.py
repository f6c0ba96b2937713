"""Cross-GPU Batch Normalization (CGBN, MegDet section 3.2), on CPU and CUDA.

BatchNorm statistics are computed over the images of *every* rank of a BN group, forward and backward,
so a detector trained with 2 images per GPU normalises as if it saw the whole group's batch.

**Exact whatever the kernel accumulates in.**  CUDA's ``batch_norm_update_stats`` accumulates float32
input in float32 (Welford); the CPU kernel in float64.  Far from the origin (inputs offset by 1e4
standard deviations) float32 loses the variance.  So every shard is first *shifted* by one of its own
values per channel, ``d = x - K`` with ``K = x[0, :, 0, 0]``: ``d`` is centred to within the data's
spread, and the kernel's statistics of ``d`` are accurate in any accumulator (the shifted-data
algorithm).  The layer then works in that frame throughout: it normalises ``d`` with the group mean
expressed in it (``M - K``, formed in float64, small), and saves ``d`` (not ``x``, which is then freed)
for backward.  On CUDA every float32/float64 shard is shifted: no conditioning decision, no host round
trip.  The CPU kernel accumulates in float64 and reading its moments is free there, so the CPU shifts
only a shard far from the origin (where its fused ``x * a + b`` would cancel) and skips the extra pass
otherwise.  fp16/bf16 inputs are never shifted: their own rounding (1e-3) is far coarser than float32
statistics' error.

Forward: **one** allreduce per layer of ``[n m, n (v + m^2), n]`` (2C+1 float64, ``m = K + mean(d)``);
float64 because shards have different shifts, and ``E[x^2] - E[x]^2`` in float64 keeps ~1e-8 even at a
1e4 offset.  Counts weight uneven batches; an empty rank sends zeros but still joins.  torch's
SyncBatchNorm all-gathers N x (2C+1) values instead: O(N C) bytes per layer against our O(C).
Backward: **one** allreduce of ``[sum dy, sum dy x_hat]`` (2C, the statistics' dtype).  Weight and
bias gradients stay local: the optimizer's gradient allreduce averages them like every other parameter.

Few ops, nothing that stops a CUDA graph: the payload buffers are preallocated per layer and written
with ``out=``, the count is a device tensor, the running statistics are updated on the device with one
``_foreach_lerp_``; no ``.item()``, no events, no host branches on device values
(``bench/cgbn_ops.py`` counts the ops next to ``nn.BatchNorm2d``).
Kernels (``kernels=``): ``portable`` uses native ops present on CPU and CUDA (``batch_norm_update_stats``,
eval-mode ``native_batch_norm``, ``native_batch_norm_backward``); ``fused`` uses torch's CUDA SyncBN
elementwise kernels (``batch_norm_elemt``, ``batch_norm_backward_elemt``); ``auto`` = fused on CUDA;
``compiled`` runs each side of each collective as one ``torch.compile`` kernel (``cgbn_compiled.py``:
4 graph calls and one native kernel per layer instead of ~30 ops, at a one-off compilation).

Semantics are ``nn.BatchNorm2d``'s / ``nn.SyncBatchNorm``'s in every mode: training synchronises;
eval with running buffers uses them; eval without buffers (``track_running_stats=False``) uses *local*
batch statistics and communicates nothing (as SyncBatchNorm: pytorch#48988), so one rank can evaluate
alone; ``momentum=None`` is the cumulative average; float64 layers compute in float64; fp16/bf16 inputs
keep float32 statistics and return the input dtype, their gradients rounded once; channels_last inputs
stay channels_last.  ``group_size=1`` or a one-process group is ``nn.BatchNorm2d`` itself
(``force_sync=True`` runs the CGBN path anyway, for benchmarks).  ``two_pass=True`` is the paper's
variant (global mean first, then the variance about it: two collectives), kept for comparison.  Under
activation checkpointing the recomputation reuses the forward's statistics (``layers/recompute.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from megdet_hpc.distributed import Comm, Group, stats_comm
from megdet_hpc.layers import cgbn_compiled, recompute

KERNELS = ("auto", "portable", "fused", "compiled")
_HALF = (torch.float16, torch.bfloat16)


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 layers compute in float64; everything else in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _layout(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


@dataclass(frozen=True)
class GroupStats:
    """Statistics of one BN group on the input's device: mean and biased variance (float64, C) and the
    count (float64, shape [1]); never copied to the host."""

    mean: torch.Tensor
    var: torch.Tensor
    total: torch.Tensor


@dataclass(frozen=True)
class _Frame:
    """What normalisation and backward need, in the shifted frame of one call (statistics dtype):
    the group mean minus this shard's shift, the group variance and 1/sqrt(var + eps), the count."""

    mean: torch.Tensor
    var: torch.Tensor
    invstd: torch.Tensor
    total: torch.Tensor


class _Workspace:
    """Per-layer buffers reused every call (one device, one channel count): the local moments, the
    forward and backward payloads and the group moments, each written with ``out=``.  Nothing derived
    from them outlives a call, so reuse is safe; CUDA-graph capture sees fixed addresses."""

    def __init__(self, channels: int, device: torch.device, dtype: torch.dtype) -> None:
        c = channels
        f64 = {"dtype": torch.float64, "device": device}
        self.key = (c, device, dtype)
        self.local = torch.empty(2 * c + 1, **f64)  # [m, v + m^2, 1]
        self.local[2 * c :].fill_(1.0)
        self.local_mean, self.local_sq = self.local[:c], self.local[c : 2 * c]
        # One float64 block: the payload [n m, n (v + m^2), n] summed over the group, then the group
        # moments [unbiased V, M, V, M - K].  [M, V] is where the division writes; the whole block is
        # cast to the statistics dtype in one op (``_frame``).
        self.block = torch.empty(6 * c + 1, **f64)
        self.payload = self.block[: 2 * c + 1]
        self.sums, self.count = self.payload[: 2 * c].view(2, c), self.payload[2 * c :]
        self.moments = self.block[2 * c + 1 :].view(4, c)
        self.mean_var = self.moments[1:3]
        self.unbiased, self.mean, self.var, self.shifted = self.moments.unbind(0)
        self.split = [2 * c, 1, c, c, c, c]
        self.grad = torch.empty(2 * c, dtype=dtype, device=device)  # [sum dy, sum dy x_hat]
        self.grad_pairs = self.grad.view(2, c)
        self.grad_dy, self.grad_dy_xhat = self.grad[:c], self.grad[c:]
        self.zeros = torch.zeros(2, c, dtype=dtype, device=device)
        self.ones = torch.ones(c, dtype=dtype, device=device)  # weight of a non-affine layer (CUDA)


Moments = tuple[torch.Tensor, torch.Tensor]

# CPU only: a shard whose |mean| exceeds this many standard deviations is shifted (see ``_shard``).
_FAR_FROM_ORIGIN = 256.0


def _shard(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, Moments | None]:
    """This shard shifted by its first pixel per channel: ``(d, K, moments of d or None)``.

    On CUDA every float32/float64 shard is shifted (the kernel accumulates float32 in float32, and a
    branch on the data would be a host sync).  The CPU kernel accumulates in float64, so its moments of
    ``x`` are exact and reading them costs nothing: the CPU shifts only a shard far from the origin,
    where its ``x * a + b`` normalisation would cancel, and saves the pass otherwise.  Half inputs and
    empty shards are never shifted (K None).
    """
    if x.dtype in _HALF or x.numel() == 0:
        return x, None, None
    moments = None
    if not x.is_cuda:
        moments = torch.batch_norm_update_stats(x, None, None, 0.0)
        mean, var = moments
        if not bool((mean.abs() > _FAR_FROM_ORIGIN * torch.sqrt(var + 1e-5)).any()):
            return x, None, moments
        moments = None
    c, stride, offset = x.shape[1], x.stride(1), x.storage_offset()
    shift = x.as_strided((c,), (stride,), offset)
    return x - x.as_strided((c, 1, 1), (stride, 0, 0), offset), shift, moments


def _sync_statistics(
    d: torch.Tensor,
    shift: torch.Tensor | None,
    moments: Moments | None,
    ws: _Workspace,
    comm: Comm,
    group: Group | None,
    name: str | None,
) -> None:
    """One allreduce: afterwards ``ws.moments`` holds [M, V, V n/(n-1), M - K] of the whole group."""
    c = d.shape[1]
    n = d.numel() // c if c else 0
    if n:
        if moments is None:
            source = d if d.is_cuda or d.dtype not in _HALF else d.float()  # CPU kernels: no half input
            moments = torch.batch_norm_update_stats(source, None, None, 0.0)
        mean_d, var_d = moments
        ws.local_mean.copy_(mean_d)
        if shift is not None:
            ws.local_mean.add_(shift)  # in float64: K + mean(d) would round at 1e4 in float32
        torch.addcmul(var_d, ws.local_mean, ws.local_mean, out=ws.local_sq)
        torch.mul(ws.local, n, out=ws.payload)
    else:
        ws.payload.zero_()
    comm.allreduce_(ws.payload, group, name and f"{name}.fwd")
    # A rank with data knows the group's count is positive; an empty one guards the division.
    torch.div(ws.sums, ws.count if n else ws.count.clamp(min=1.0), out=ws.mean_var)  # [M, E x^2]
    torch.addcmul(ws.var, ws.mean, ws.mean, value=-1.0, out=ws.var).clamp_(min=0.0)
    torch.addcdiv(ws.var, ws.var, (ws.count - 1.0).clamp_(min=1.0), out=ws.unbiased)  # V n / (n - 1)
    if shift is None:
        ws.shifted.copy_(ws.mean)
    else:
        torch.sub(ws.mean, shift, out=ws.shifted)


def _two_pass_statistics(
    x: torch.Tensor, ws: _Workspace, comm: Comm, group: Group | None, name: str | None
) -> None:
    """The paper's variant: the group mean first, then the variance about it (two collectives)."""
    c = x.shape[1]
    n = x.numel() // c if c else 0
    first = ws.payload[: c + 1]
    xf = x.double()
    dims = [0, 2, 3]
    if n:
        torch.sum(xf, dims, out=first[:c])
    else:
        first[:c].zero_()
    first[c:].fill_(float(n))
    comm.allreduce_(first, group, name and f"{name}.sum")
    total = first[c:].clone()
    ws.mean.copy_(first[:c] / total.clamp(min=1.0))
    second = ws.payload[c + 1 : 2 * c + 1]
    if n:
        torch.sum((xf - ws.mean.view(1, c, 1, 1)) ** 2, dims, out=second)
    else:
        second.zero_()
    comm.allreduce_(second, group, name and f"{name}.sq")
    ws.var.copy_(second / total.clamp(min=1.0))
    ws.count.copy_(total)
    torch.mul(ws.var, total / (total - 1.0).clamp(min=1.0), out=ws.unbiased)
    ws.shifted.copy_(ws.mean)


@torch.no_grad()
def group_statistics(
    x: torch.Tensor, comm: Comm, group: Group | None, *, two_pass: bool = False, name: str | None = None
) -> GroupStats:
    """Mean, biased variance and count over every rank of ``group``: one collective (two with
    ``two_pass``); the building block of the layer, public for tools that need group moments."""
    ws = _Workspace(x.shape[1], x.device, _stats_dtype(x))
    if two_pass:
        _two_pass_statistics(x, ws, comm, group, name)
    else:
        d, shift, moments = _shard(x)
        _sync_statistics(d, shift, moments, ws, comm, group, name)
    return GroupStats(ws.mean.clone(), ws.var.clone(), ws.count.clone())


def _update_running_stats(
    layer: CrossGPUBatchNorm2d,
    mean: torch.Tensor,
    unbiased: torch.Tensor,
    count: torch.Tensor,
    has_data: bool,
) -> None:
    """nn.BatchNorm2d's rule (unbiased running_var) from group statistics, on the device: every rank
    of the group computes bit-identical buffers; a group without data leaves them."""
    rm, rv, tracked = layer.running_mean, layer.running_var, layer.num_batches_tracked
    assert rm is not None and rv is not None and tracked is not None
    if rm.dtype != mean.dtype:  # a .half() model keeps half buffers
        mean, unbiased = mean.to(rm.dtype), unbiased.to(rv.dtype)
    if has_data and layer.momentum is not None:
        tracked.add_(1)
        torch._foreach_lerp_([rm, rv], [mean, unbiased], layer.momentum)
        return
    # Rarer rules: the cumulative average (momentum None) and a rank without data (the group's count
    # decides, on the device).
    seen = (count > 0).to(tracked.dtype) if not has_data else torch.ones_like(tracked)
    tracked.add_(seen.reshape(tracked.shape))
    factor = (1.0 / tracked.clamp(min=1).to(rm.dtype)) if layer.momentum is None else layer.momentum
    weight = (seen.to(rm.dtype) * factor).reshape(1)
    rm.lerp_(mean, weight)
    rv.lerp_(unbiased, weight)


class _CrossGPUBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        layer: CrossGPUBatchNorm2d,
    ) -> torch.Tensor:
        comm, group, name, eps = layer._comm, layer._group, layer._name, layer.eps
        assert comm is not None
        replay = recompute.current_mode() == recompute.REPLAY
        ctx.layer, ctx.eps = layer, eps
        ctx.param_dtypes = (
            weight.dtype if weight is not None else None,
            bias.dtype if bias is not None else None,
        )
        ctx.compiled = _compiled(layer, x)
        if ctx.compiled:
            return _compiled_forward(ctx, x, weight, bias, layer, replay)
        ws = layer._workspace(x)
        # Deterministic in x: a recomputation under checkpointing shifts exactly as its forward did.
        d, shift, moments = (x, None, None) if layer.two_pass else _shard(x)
        if replay:  # recomputation under activation checkpointing: the forward's statistics, no collective
            frame = recompute.load(layer)
        else:
            if layer.two_pass:
                _two_pass_statistics(x, ws, comm, group, name)
            else:
                _sync_statistics(d, shift, moments, ws, comm, group, name)
            frame, mean, unbiased = _frame(ws, eps)
            if layer.training and layer.track_running_stats and layer.running_mean is not None:
                _update_running_stats(layer, mean, unbiased, ws.count, has_data=x.numel() > 0)
            if recompute.current_mode() == recompute.RECORD:
                recompute.save(layer, frame)
        w, b = _param(weight), _param(bias)
        out = _normalise(d, w, b, frame, eps, _fused(d, layer.kernels))
        ctx.save_for_backward(d, w, frame.mean, frame.var, frame.invstd, frame.total)
        return out

    @staticmethod
    @once_differentiable  # like SyncBatchNorm: create_graph works, a second-order backward says so
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        d, w, mean, var, invstd, total = ctx.saved_tensors
        layer: CrossGPUBatchNorm2d = ctx.layer
        dy = grad_out.contiguous(memory_format=_layout(d))
        grad_w = grad_b = grad_x = None
        if ctx.compiled:
            payload, grad_b, grad_w = cgbn_compiled.kernel("grad_sums")(dy, d, mean, invstd)
            if ctx.needs_input_grad[0]:
                layer._comm.allreduce_(payload, layer._group, layer._name and f"{layer._name}.bwd")
                grad_x = cgbn_compiled.kernel("grad_input")(dy, d, payload, total, mean, invstd, w)
            return (grad_x, *_param_grads(ctx, grad_w, grad_b, d))
        ws = layer._workspace(d)
        if d.numel():
            weight = w if w is not None else ws.ones
            _, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
                dy, d, weight, None, None, mean, invstd, True, ctx.eps, [False, True, True]
            )
        if ctx.needs_input_grad[0]:  # the group sums only feed the input gradient (same on every rank)
            if d.numel():
                torch.cat([grad_b, grad_w], out=ws.grad)
            else:
                ws.grad.zero_()
            layer._comm.allreduce_(ws.grad, layer._group, layer._name and f"{layer._name}.bwd")
            grad_x = _grad_input(dy, d, w, mean, var, invstd, total, ws, layer.kernels, ctx.eps)
        return (grad_x, *_param_grads(ctx, grad_w, grad_b, d))


def _param_grads(
    ctx: Any, grad_w: torch.Tensor | None, grad_b: torch.Tensor | None, d: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
    """Weight and bias gradients as autograd wants them: None where not needed, the parameters' dtype."""
    c = d.shape[1]
    w_dtype, b_dtype = ctx.param_dtypes
    if w_dtype is None or not ctx.needs_input_grad[1]:
        grad_w = None
    elif grad_w is None:
        grad_w = torch.zeros(c, dtype=w_dtype, device=d.device)
    if b_dtype is None or not ctx.needs_input_grad[2]:
        grad_b = None
    elif grad_b is None:
        grad_b = torch.zeros(c, dtype=b_dtype, device=d.device)
    if grad_w is not None and grad_w.dtype != w_dtype:  # a .half() model: half parameters
        grad_w = grad_w.to(w_dtype)
    if grad_b is not None and grad_b.dtype != b_dtype:
        grad_b = grad_b.to(b_dtype)
    return grad_w, grad_b, None


def _compiled(layer: CrossGPUBatchNorm2d, x: torch.Tensor) -> bool:
    """Whether this call takes the compiled kernels: every call of a layer with ``kernels="compiled"``,
    one-pass statistics and a momentum (or no running buffers); the rest stays eager.  Decided by the
    layer alone, never by the data: every rank of a group (an empty one too) takes the same path, so
    their running buffers stay bit-identical, and a recomputation takes the path its forward took."""
    tracking = layer.track_running_stats and layer.running_mean is not None
    return layer.kernels == "compiled" and not layer.two_pass and (layer.momentum is not None or not tracking)


def _compiled_forward(
    ctx: Any,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    layer: CrossGPUBatchNorm2d,
    replay: bool,
) -> torch.Tensor:
    """The forward in two compiled kernels around the collective and one native normalisation."""
    if replay:
        d, frame = cgbn_compiled.shift(x), recompute.load(layer)
    else:
        d, payload, k = cgbn_compiled.kernel("shard_sums")(x)
        assert layer._comm is not None
        layer._comm.allreduce_(payload, layer._group, layer._name and f"{layer._name}.fwd")
        track = layer.training and layer.track_running_stats and layer.running_mean is not None
        buffers = (layer.running_mean, layer.running_var, layer.num_batches_tracked) if track else (None,) * 3
        constants = layer._constants(x.device)
        frame = _Frame(
            *cgbn_compiled.kernel("frame")(payload, k, constants, *buffers, sdtype=_stats_dtype(x))
        )
        if recompute.current_mode() == recompute.RECORD:
            recompute.save(layer, frame)
    w, b = _param(weight), _param(bias)
    out = _normalise(d, w, b, frame, layer.eps, _fused(d, "fused"))
    # Detached: the backward kernel must see a plain tensor (see ``cgbn_compiled.kernel``).
    ctx.save_for_backward(
        d, w.detach() if w is not None else None, frame.mean, frame.var, frame.invstd, frame.total
    )
    return out


def _normalise(
    d: torch.Tensor,
    w: torch.Tensor | None,
    b: torch.Tensor | None,
    frame: _Frame,
    eps: float,
    fused: bool,
) -> torch.Tensor:
    """``(d - mean) invstd w + b`` with the frame's statistics: one native kernel (torch's CUDA SyncBN
    elementwise kernel if ``fused``, else eval-mode batch norm); an empty shard gives an empty output."""
    if d.numel() == 0:
        return torch.empty_like(d)
    if fused:
        return torch.batch_norm_elemt(d, w, b, frame.mean, frame.invstd, eps)
    return torch.native_batch_norm(d, w, b, frame.mean, frame.var, False, 0.0, eps)[0]


def _frame(ws: _Workspace, eps: float) -> tuple[_Frame, torch.Tensor, torch.Tensor]:
    """The call's frame quantities in the statistics dtype, as fresh tensors (saved for backward), and
    the group mean and unbiased variance for the running statistics."""
    _, count, unbiased, mean, var, shifted = ws.block.to(ws.grad.dtype, copy=True).split(ws.split)
    frame = _Frame(shifted, var, torch.rsqrt(var + eps), count)
    return frame, mean, unbiased


def _param(p: torch.Tensor | None) -> torch.Tensor | None:
    """Affine parameters as the mixed-precision BN kernels want them (float32 next to half inputs)."""
    return p.float() if p is not None and p.dtype in _HALF else p


def _fused(x: torch.Tensor, kernels: str) -> bool:
    return x.is_cuda and kernels in ("auto", "fused")


def _grad_input(
    dy: torch.Tensor,
    d: torch.Tensor,
    w: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    invstd: torch.Tensor,
    total: torch.Tensor,
    ws: _Workspace,
    kernels: str,
    eps: float,
) -> torch.Tensor:
    """``w invstd (dy - mean(dy) - x_hat mean(dy x_hat))`` with the group means from ``ws.grad``."""
    if d.numel() == 0:
        return torch.empty_like(d)
    if _fused(d, kernels):
        sum_dy_xmu = ws.grad_dy_xhat / invstd
        count = total.to(torch.int32)
        return torch.batch_norm_backward_elemt(dy, d, mean, invstd, w, ws.grad_dy, sum_dy_xmu, count)
    # scale (dy - k1 - x_hat k2) = scale dy + BN_eval(d; mean, var, weight=-scale k2, bias=-scale k1),
    # computed in the statistics dtype and rounded to the input's dtype once.
    scale = invstd * w if w is not None else invstd
    means = torch.div(ws.grad_pairs, total)  # [k1, k2]: the group means of dy and dy x_hat
    affine_b, affine_w = torch.addcmul(ws.zeros, means, scale, value=-1.0).unbind(0)
    df = d if d.dtype not in _HALF else d.float()
    affine = torch.native_batch_norm(df, affine_w, affine_b, mean, var, False, 0.0, eps)[0]
    grad = torch.addcmul(affine, dy, scale.view(-1, 1, 1))
    return grad if grad.dtype == d.dtype else grad.to(d.dtype)


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
        self._ws: _Workspace | None = None
        self._consts: torch.Tensor | None = None
        self._consts_key: tuple[float, float] | None = None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, two_pass={self.two_pass}"

    def __getstate__(self) -> dict[str, Any]:
        # Comms, process groups, buffers in flight and queued statistics are per-process: never pickled.
        state = self.__dict__.copy()
        state.update(_comm=None, _group=None, _group_ready=False, _name=None, _ws=None, _consts=None)
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

    def _constants(self, device: torch.device) -> torch.Tensor:
        """``[momentum, eps]`` as a float64 device tensor for the compiled kernels, made once."""
        momentum = self.momentum if self.momentum is not None else 0.0
        if self._consts is None or self._consts.device != device or self._consts_key != (momentum, self.eps):
            self._consts = torch.tensor([momentum, self.eps], dtype=torch.float64, device=device)
            self._consts_key = (momentum, self.eps)
        return self._consts

    def _workspace(self, x: torch.Tensor) -> _Workspace:
        key = (x.shape[1], x.device, _stats_dtype(x))
        if self._ws is None or self._ws.key != key:
            self._ws = _Workspace(*key)
        return self._ws

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"CrossGPUBatchNorm2d expects 4D input (N, C, H, W), got {input.dim()}D")
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"CrossGPUBatchNorm2d has {self.num_features} channels but the input has {input.shape[1]}"
            )

    def _synchronises(self) -> bool:
        """Like nn.SyncBatchNorm: only a training forward that uses batch statistics synchronises."""
        if not self.training or self.group_size == 1 and not self.force_sync:
            return False
        comm = self._resolve_comm()
        size = self._group.size if self._group is not None else comm.size
        return size > 1 or self.force_sync

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self._synchronises():
            return self._local_forward(input)
        return _CrossGPUBatchNormFunction.apply(input, self.weight, self.bias, self)

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
