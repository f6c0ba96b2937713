"""CUDA code paths on a machine without a GPU: FakeTensorMode holds ``device="cuda"`` tensors.

Fake tensors carry shape, dtype and device but no data, so running a layer under ``fake_cuda()`` checks
what a GPU run would hit first: a CPU tensor meeting a CUDA one raises ``FakeTensorDeviceMismatchError``,
and a data-dependent op (``.item()``, ``bool()``, ``nonzero``: a host synchronisation on a GPU) raises
``DataDependentOutputException``.  Three SyncBN ops have no fake kernel in torch; ``register()`` adds
shape-only ones.  The autograd engine wants a real CUDA context for CUDA graphs, so ``backward()`` runs
the graph's nodes by hand in topological order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

_LIBRARY: torch.library.Library | None = None


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def register() -> None:
    """Meta kernels (shape, dtype) for the CUDA SyncBN ops CGBN uses that lack one; once per process."""
    global _LIBRARY
    if _LIBRARY is not None:
        return
    lib = torch.library.Library("aten", "IMPL")

    def update_stats(x, running_mean, running_var, momentum):  # type: ignore[no-untyped-def]
        c = x.shape[1]
        return x.new_empty(c, dtype=_stats_dtype(x)), x.new_empty(c, dtype=_stats_dtype(x))

    def elemt(x, weight, bias, mean, invstd, eps):  # type: ignore[no-untyped-def]
        return torch.empty_like(x)

    def backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):  # type: ignore[no-untyped-def]
        return torch.empty_like(x)

    lib.impl("batch_norm_update_stats", update_stats, "Meta")
    lib.impl("batch_norm_elemt", elemt, "Meta")
    lib.impl("batch_norm_backward_elemt", backward_elemt, "Meta")
    _LIBRARY = lib


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeTensorMode]:
    """Fake mode; build modules under ``torch.device("cuda")`` inside it (``.to("cuda")`` cannot swap
    fake parameters) and create inputs with ``device="cuda"``.  The default device is left alone while
    running: torchvision draws its resize choice with ``torch.empty(1).uniform_().item()``, which is a
    host read only when the default device is a GPU."""
    register()
    with FakeTensorMode() as mode:
        yield mode


def _validated(grad: torch.Tensor, meta: object) -> torch.Tensor:
    """What the engine's ``validate_outputs`` does: reduce a broadcast gradient to its input's shape,
    cast it to the input's dtype, and refuse one on another device."""
    if grad.device != meta.device:  # type: ignore[attr-defined]
        raise RuntimeError(f"gradient on {grad.device} for an input on {meta.device}")  # type: ignore[attr-defined]
    if tuple(grad.shape) != tuple(meta.shape):  # type: ignore[attr-defined]
        grad = grad.sum_to_size(meta.shape)  # type: ignore[attr-defined]
    return grad if grad.dtype == meta.dtype else grad.to(meta.dtype)  # type: ignore[attr-defined]


def backward(outputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    """``torch.autograd.backward`` without the engine: every node once, in topological order, grads
    accumulated into leaves' ``.grad``."""
    order: list[object] = []
    seen: set[object] = set()
    stack = [(out.grad_fn, False) for out in outputs if out.grad_fn is not None]
    while stack:  # iterative post-order DFS (deep networks overflow recursion)
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        stack.extend((nxt, False) for nxt, _ in node.next_functions if nxt is not None and nxt not in seen)
    pending: dict[object, list[torch.Tensor | None]] = {}
    for out, grad in zip(outputs, grads):
        pending.setdefault(out.grad_fn, [None])[0] = grad
    for node in reversed(order):
        inputs = pending.pop(node, None)
        if inputs is None:
            continue
        variable = getattr(node, "variable", None)
        if variable is not None:  # AccumulateGrad
            g = inputs[0]
            variable.grad = g if variable.grad is None else variable.grad + g
            continue
        with torch.no_grad():
            results = node(*inputs) if callable(node) else node.apply(*inputs)  # type: ignore[attr-defined]
        if not isinstance(results, tuple):
            results = (results,)
        for (nxt, index), g in zip(node.next_functions, results):
            if nxt is None or g is None:
                continue
            g = _validated(g, nxt._input_metadata[index])  # type: ignore[attr-defined]
            slot = pending.setdefault(nxt, [None] * len(nxt._input_metadata))  # type: ignore[attr-defined]
            slot[index] = g if slot[index] is None else slot[index] + g
