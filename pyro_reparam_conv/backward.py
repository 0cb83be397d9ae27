"""The ELBO's backward pass, without the gradients nobody reads.

An estimator that differentiates the cost in the site's value (``cost_graph``: ``double_cv``,
``rodeo``) has its layout draw the values as leaves that require grad, and takes
``d cost / d value`` itself, in its surrogate, before the backward pass. A plain
``surrogate_loss.backward()`` would then compute the loss's gradient in those leaves once
more (through the whole model: the first layer's input gradient of every network the value
enters) only to drop it. :func:`backward` asks autograd for the gradients of the graph's
other leaves only (``torch.autograd.backward(..., inputs=...)``), so that part of the graph
is pruned; every other leaf (params, and any tensor of the user's that requires grad) gets
exactly the gradient that ``.backward()`` gives it.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from pyro.infer.util import torch_backward

__all__ = ["backward", "graph_leaves"]


def graph_leaves(output: torch.Tensor) -> list[torch.Tensor]:
    """The leaves that require grad in ``output``'s graph, each once, in the order found."""
    if output.grad_fn is None:
        return [output] if output.requires_grad else []
    found, seen, stack = [], set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)  # an AccumulateGrad node
        if leaf is not None:
            found.append(leaf)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return found


def backward(loss: Any, skip: Iterable[torch.Tensor], retain_graph: bool = False) -> None:
    """``loss.backward()`` (Pyro's ``torch_backward``), less the gradients in the leaves
    ``skip``, which are neither computed nor accumulated."""
    skipped = {id(t) for t in skip}
    if not skipped or not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        torch_backward(loss, retain_graph=retain_graph)
        return
    inputs = [t for t in graph_leaves(loss) if id(t) not in skipped]
    if inputs:
        torch.autograd.backward(loss, inputs=inputs, retain_graph=retain_graph)
