"""The ELBO's backward pass skips the gradient in values drawn as leaves for estimators
that differentiate their cost in them, and gives every other leaf the gradient of a plain
``.backward()``."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_reparam_conv import RoutedELBO
from pyro_reparam_conv.backward import backward, graph_leaves


def test_graph_leaves_finds_each_leaf_that_requires_grad_once():
    a, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    c = torch.randn(3)
    out = ((a * b).sum() + (a * c).sum()) * 2
    assert {id(t) for t in graph_leaves(out)} == {id(a), id(b)}
    assert len(graph_leaves(out)) == 2
    assert graph_leaves(a) == [a] and graph_leaves(c) == []


def test_backward_skips_the_leaves_named_and_matches_backward_on_the_others():
    a, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    (torch.sin(a) * b).sum().backward()
    ga, gb = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    backward((torch.sin(a) * b).sum(), [b])
    assert torch.equal(a.grad, ga) and b.grad is None
    backward((torch.sin(a) * b).sum(), [])  # nothing skipped: .backward()
    assert torch.equal(a.grad, 2 * ga) and torch.equal(b.grad, gb)


def model(x):
    w = pyro.param("w", torch.tensor([0.5, -1.0, 2.0]))
    with pyro.plate("N", len(x)):
        b = pyro.sample("b", dist.Bernoulli(torch.full((3,), 0.4)).to_event(1))
        pyro.sample("x", dist.Normal(torch.tanh(b @ w), 1.0), obs=x)


def guide(x, estimator, drawn=None):
    logits = pyro.param("logits", torch.tensor([0.3, -0.6, 1.1]))
    with pyro.plate("N", len(x)):
        b = pyro.sample("b", dist.Bernoulli(logits=logits).to_event(1),
                        infer={"estimator": estimator, "evaluations": 3})  # fmt: skip
    if drawn is not None:
        drawn.append(b)


@pytest.mark.parametrize("estimator", ["double_cv", "rodeo", "loo"])
def test_loss_and_grads_equals_the_differentiable_loss_backward(estimator):
    """Same draws: every param's gradient from loss_and_grads (pruned) equals that of
    differentiable_loss().backward() (not pruned); the drawn values get none."""
    x = torch.tensor([0.3, -1.2, 0.8, 2.0])
    drawn = []
    run = lambda x: guide(x, estimator, drawn)  # noqa: E731
    grads, values = [], []
    for pruned in (True, False):
        pyro.set_rng_seed(3)
        elbo = RoutedELBO()
        for p in pyro.get_param_store().values():
            p.unconstrained().grad = None
        if pruned:
            elbo.loss_and_grads(model, run, x)
        else:
            elbo.differentiable_loss(model, run, x).backward()
        values.append([b for b in drawn if b.dim() == 3][-1])  # side by side (checks replay one)
        store = pyro.get_param_store()
        grads.append({k: store.get_param(k).unconstrained().grad.clone() for k in store.keys()})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) >= 2
    assert values[0].shape[0] == 3  # the evaluations side by side
    if estimator != "loo":  # drawn as leaves that require grad: pruned, not otherwise
        assert values[0].grad is None and values[1].grad is not None
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def adversarial_model(x):
    w = pyro.param("w", torch.tensor([0.5, -1.0, 2.0]))
    with pyro.plate("N", len(x), subsample_size=3) as i:
        b = pyro.sample("b", dist.Bernoulli(torch.full((3,), 0.4)).to_event(1))
        buf = torch.zeros(b.shape)
        buf.copy_(b * w)  # an in-place write of the values
        loc = torch.where(b[..., 0] > 0.5, buf.sum(-1), -w[2] * b[..., 1])  # a gate
        pyro.sample("x", dist.Normal(loc, 1.0), obs=x[i])


def adversarial_guide(x, estimator, drawn):
    logits = pyro.param("logits", torch.tensor([0.3, -0.6, 1.1]))
    with pyro.plate("N", len(x), subsample_size=3):
        b = pyro.sample("b", dist.Bernoulli(logits=logits).to_event(1),
                        infer={"estimator": estimator, "evaluations": 3})  # fmt: skip
    drawn.append(b)


@pytest.mark.parametrize("estimator", ["double_cv", "rodeo"])
def test_pruned_gradients_equal_on_an_adversarial_model(estimator):
    """A subsampled plate, an in-place write and a gate on the values, 2 vectorized
    particles, data that change between the two calls: the pruned backward's gradients are
    the full backward's, call by call, on the same draws."""
    data = [torch.tensor([0.3, -1.2, 0.8, 2.0, 1.1]), torch.tensor([1.0, 0.4, -0.7, 0.2, 3.0])]
    for x in data:
        grads, values, drawn = [], [], []
        run = lambda x: adversarial_guide(x, estimator, drawn)  # noqa: E731
        for pruned in (True, False):
            pyro.set_rng_seed(4)
            elbo = RoutedELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1)
            for p in pyro.get_param_store().values():
                p.unconstrained().grad = None
            if pruned:
                elbo.loss_and_grads(adversarial_model, run, x)
            else:
                elbo.differentiable_loss(adversarial_model, run, x).backward()
            values.append([b for b in drawn if b.dim() == 4][-1])  # (evaluation, particle, N, 3)
            store = pyro.get_param_store()
            grads.append({k: store.get_param(k).unconstrained().grad.clone() for k in store})
        assert values[0].grad is None and values[1].grad is not None
        for name in grads[0]:
            assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name
