"""CGBN's per-layer arithmetic as four compiled kernels (``kernels="compiled"``).

Why: the eager layer issues ~37 top-level ops per forward + backward (``bench/cgbn_ops.py``), most of
them on C-sized vectors around the two collectives -- on CUDA each is a kernel launch, so a ResNet-50
step spends its host time launching tiny kernels.  Here each side of each collective is one function
compiled by ``torch.compile`` (Inductor: Triton kernels on CUDA, vectorised C++ on CPU, which needs a
C++ compiler), so a layer is

* forward: ``shard_sums`` (shift, moments, float64 payload: one fused reduction) -> allreduce ->
  ``frame`` (group mean / variance / Bessel / invstd and the running-statistics update in place) ->
  one native normalisation kernel;
* backward: ``grad_sums`` (sum dy, sum dy x_hat: one fused reduction) -> allreduce -> ``grad_input``
  (the per-channel coefficients and the elementwise input gradient in one kernel).

The arithmetic is the eager layer's (``layers/cgbn.py``): every float32/float64 shard is shifted by its
first pixel per channel (as on CUDA, no conditioning branch), the payload is ``[n m, n (v + m^2), n]``
in float64 and the backward payload ``[sum dy, sum dy x_hat]`` in the statistics dtype, so compiled
and eager ranks can share a group.  Compiling costs ~30 s per process the first time (Inductor caches
it on disk; a warm start ~8 s) -- worth it for a long GPU job, not for a short test, so the default
stays eager.  Each graph call also pays dynamo's wrapper (~50 us of host time on a slow CPU, against
~4 us for an eager op): the compiled layer launches fewer kernels but is not cheaper on the host
unless the step is replayed as a CUDA graph.  Shapes are dynamic: one compilation serves every layer width.  Layers the compiled path
does not cover (``momentum=None``, the two-pass variant) take the eager path; the choice depends on the
layer alone, never on the data, so every rank of a group takes the same one (an empty shard included).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

_HALF = (torch.float16, torch.bfloat16)


def _sdtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def shifts(x: torch.Tensor) -> bool:
    """Whether this input is shifted (every float32/float64 shard; half inputs never are)."""
    return x.dtype not in _HALF


def shift(x: torch.Tensor) -> torch.Tensor:
    """``x - x[0, :, 0, 0]`` per channel (the shifted-data algorithm; see ``layers/cgbn.py``)."""
    return x - x[:1, :, :1, :1] if shifts(x) and x.numel() else x


def _shard_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d, payload, K)``: the shifted shard, ``[n m, n (v + m^2), n]`` (float64, 2C+1) with
    ``m = K + mean(d)``, and the shift K (float64, C; zeros for half inputs and empty shards).  An empty
    shard sends zeros but still joins (its size is known when the graph is traced)."""
    c = x.shape[1]
    n = x.numel() // c if c else 0
    if n == 0:
        return x, x.new_zeros(2 * c + 1, dtype=torch.float64), x.new_zeros(c, dtype=torch.float64)
    k = x[:1, :, :1, :1]
    d = x - k if shifts(x) else x
    df = d.to(_sdtype(x))
    var_d, mean_d = torch.var_mean(df, dim=(0, 2, 3), correction=0)
    kf = k.reshape(c).double() if shifts(x) else torch.zeros_like(mean_d, dtype=torch.float64)
    m = mean_d.double() + kf
    payload = torch.cat([m * n, (var_d.double() + m * m) * n, m.new_full((1,), n)])
    return d, payload, kf


def _lerp_(buffer: torch.Tensor, end: torch.Tensor, weight: torch.Tensor) -> None:
    """``buffer += weight (end - buffer)`` computed in float32 at least (half buffers as eager's lerp
    does: the momentum is never rounded to half), ``end`` rounded to the buffer's dtype first."""
    opmath = torch.float32 if buffer.dtype in _HALF else buffer.dtype
    current = buffer.to(opmath)
    target = end.to(buffer.dtype).to(opmath)
    buffer.copy_((current + weight.to(opmath) * (target - current)).to(buffer.dtype))


def _frame(
    sums: torch.Tensor,
    k: torch.Tensor,
    constants: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    tracked: torch.Tensor | None,
    *,
    sdtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group statistics from the summed payload, in this shard's frame and the statistics dtype:
    ``(M - K, V, 1/sqrt(V + eps), count)``; the running buffers are updated in place (unbiased V).
    ``constants`` is ``[momentum, eps]`` on the device (float64), made once per layer.  Every rank of a
    group runs this same kernel on the same summed payload, so the buffers are bit-identical; a group
    without any data (count 0, decided on the device) leaves them as they are."""
    c = k.shape[0]
    count = sums[2 * c :]
    seen = count > 0
    safe = count.clamp(min=1.0)
    mean = sums[:c] / safe
    var = (sums[c : 2 * c] / safe - mean * mean).clamp(min=0.0)
    if running_mean is not None and running_var is not None and tracked is not None:
        unbiased = var * count / (count - 1.0).clamp(min=1.0)
        tracked.add_(seen.to(tracked.dtype).reshape(tracked.shape))
        weight = constants[0] * seen.to(constants.dtype)
        _lerp_(running_mean, mean, weight)
        _lerp_(running_var, unbiased, weight)
    var_s = var.to(sdtype)
    return (mean - k).to(sdtype), var_s, torch.rsqrt(var_s + constants[1].to(sdtype)), count.to(sdtype)


def _grad_sums(
    dy: torch.Tensor, d: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(payload, sum dy, sum dy x_hat)``: the backward payload ``[sum dy, sum dy x_hat]`` (to be
    summed over the group) and this shard's own sums (the bias and weight gradients)."""
    c = d.shape[1]
    dyf = dy.to(mean.dtype)
    xhat = (d.to(mean.dtype) - mean.view(1, c, 1, 1)) * invstd.view(1, c, 1, 1)
    sum_dy = dyf.sum(dim=(0, 2, 3))
    sum_dy_xhat = (dyf * xhat).sum(dim=(0, 2, 3))
    return torch.cat([sum_dy, sum_dy_xhat]), sum_dy, sum_dy_xhat


def _grad_input(
    dy: torch.Tensor,
    d: torch.Tensor,
    sums: torch.Tensor,
    count: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
) -> torch.Tensor:
    """``w invstd (dy - mean(dy) - x_hat mean(dy x_hat))`` with the group means, rounded once."""
    c = d.shape[1]
    k1, k2 = (sums[:c] / count).view(1, c, 1, 1), (sums[c:] / count).view(1, c, 1, 1)
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    xhat = (d.to(mean.dtype) - mean.view(1, c, 1, 1)) * invstd.view(1, c, 1, 1)
    grad = scale.view(1, c, 1, 1) * (dy.to(mean.dtype) - k1 - xhat * k2)
    return grad.to(d.dtype)


_FUNCTIONS = {"shard_sums": _shard_sums, "frame": _frame, "grad_sums": _grad_sums, "grad_input": _grad_input}


@functools.cache
def kernel(name: str) -> Callable[..., Any]:
    """The compiled function ``name``, compiled once per process on first use.  Floats are never its
    arguments: under dynamic shapes a Python float becomes a tensor input, i.e. a host-to-device copy
    every call (momentum and eps live in a device tensor instead; a dtype argument is a constant).
    Parameters are passed detached: dynamo gives an ``nn.Parameter`` static shapes, which would compile
    once per layer width and, past its cache limit of 8, fall back to eager."""
    return torch.compile(_FUNCTIONS[name], dynamic=True, fullgraph=True)
