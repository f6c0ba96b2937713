"""Activation checkpointing with CGBN: each checkpoint call replays its own statistics, in process."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from megdet_hpc.distributed.single import SingleProcessComm
from megdet_hpc.layers import CrossGPUBatchNorm2d
from megdet_hpc.layers.recompute import checkpointed


def _layer() -> CrossGPUBatchNorm2d:
    torch.manual_seed(0)
    return CrossGPUBatchNorm2d(2, comm=SingleProcessComm(), force_sync=True)


def test_layer_in_two_checkpointed_segments_replays_each_segments_statistics() -> None:
    """Backward recomputes the second segment first; it must get its own statistics back."""
    a0, b0 = torch.randn(2, 2, 3, 3), torch.randn(2, 2, 3, 3) * 5 + 3
    grads = []
    for ckpt in (False, True):
        bn = _layer()
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        f = partial(checkpointed, bn) if ckpt else bn
        ((f(a) ** 2).sum() + (f(b) ** 3).sum()).backward()
        grads.append((a.grad, b.grad, bn.running_var.clone()))
    (ga, gb, rv), (ca, cb, crv) = grads
    assert torch.allclose(ga, ca, atol=1e-5) and torch.allclose(gb, cb, atol=1e-4)
    assert torch.equal(rv, crv)


def test_forward_never_backpropagated_leaves_nothing_for_the_next() -> None:
    x, junk = torch.randn(2, 2, 3, 3), torch.randn(2, 2, 3, 3) * 9 + 4
    bn = _layer()
    xr = x.clone().requires_grad_()
    (bn(xr) ** 2).sum().backward()
    checkpointed(bn, junk.clone().requires_grad_())  # a loss computed but not backpropagated
    xc = x.clone().requires_grad_()
    (checkpointed(bn, xc) ** 2).sum().backward()
    assert torch.allclose(xr.grad, xc.grad, atol=1e-5)


def test_second_backward_with_retained_graph_replays_again() -> None:
    bn = _layer()
    x = torch.randn(2, 2, 3, 3, requires_grad=True)
    y = checkpointed(bn, x)
    (y**2).sum().backward(retain_graph=True)
    first = x.grad.clone()
    (y**2).sum().backward()
    assert torch.allclose(x.grad, 2 * first, atol=1e-5)


def test_create_graph_first_order_works_and_second_order_says_why() -> None:
    bn = _layer()
    x = torch.randn(2, 2, 3, 3, requires_grad=True)
    (g,) = torch.autograd.grad(bn(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        g.sum().backward()


def test_input_without_grad_issues_no_backward_collective() -> None:
    comm = SingleProcessComm()
    bn = CrossGPUBatchNorm2d(2, comm=comm, force_sync=True)
    comm.counters.reset(keep_log=True)
    bn(torch.randn(2, 2, 3, 3)).sum().backward()  # a frozen stem: no input gradient
    assert [op for op, *_ in comm.counters.log] == ["allreduce"]  # the forward's only
    assert bn.weight.grad is not None
