"""No variance reduction may bias a gradient: adversarial models against exact gradients.

Each model is one a heuristic gets wrong (control flow on a latent's value, in-place writes,
pools with ``ceil_mode``, steps and gates, arguments that move pixels, vectorized
particles). The reference is an exact gradient (the support summed, or the closed form of a
linear-Gaussian decoder through its Jacobian) or a many-draw estimate that assumes nothing
(site-level costs), compared at their standard errors. A property test checks that the
footprint the analysis finds contains every dependency the Jacobian shows, at random
points and parameter values, for random decoders.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F

from pyro_reparam_conv import RoutedELBO

B, C, H, W = 2, 2, 6, 6
NOISE = 0.7


def mean_and_se(draws):
    draws = torch.stack(draws)
    return draws.mean(0), draws.std(0) / math.sqrt(len(draws))


# ------------------------------------------------------------- control flow on a value
def poisson_model(x):
    n = pyro.sample("n", dist.Poisson(torch.tensor(3.0)))
    loc = 5.0 if n.item() > 2 else 0.0
    pyro.sample("x", dist.Normal(loc, 1.0), obs=x)


def poisson_guide(x):
    log_rate = pyro.param("log_rate", torch.tensor(math.log(2.0)))
    pyro.sample("n", dist.Poisson(log_rate.exp()))


def exact_poisson_gradient(x):
    log_rate = torch.tensor(math.log(2.0), requires_grad=True)
    n = torch.arange(0, 80.0)
    q = dist.Poisson(log_rate.exp())
    loc = torch.where(n > 2, 5.0, 0.0)
    f = dist.Poisson(3.0).log_prob(n) + dist.Normal(loc, 1.0).log_prob(x) - q.log_prob(n)
    (grad,) = torch.autograd.grad(-(q.log_prob(n).exp() * f).sum(), log_rate)
    return float(grad)


def test_a_value_that_leaves_the_graph_keeps_every_later_term_in_its_cost():
    x = torch.tensor(4.0)
    exact = exact_poisson_gradient(x)
    pyro.set_rng_seed(0)
    elbo = RoutedELBO()
    draws = []
    for _ in range(1500):
        loss = elbo.differentiable_loss(poisson_model, poisson_guide, x)
        (g,) = torch.autograd.grad(loss, [pyro.param("log_rate").unconstrained()])
        draws.append(g)
    mean, se = mean_and_se(draws)
    assert abs(float(mean) - exact) < 4 * float(se), (float(mean), exact, float(se))
    assert "leaves the tensor graph (item)" in elbo.routes["n"].reason


# --------------------------------------------------------- linear decoders, exact
def linear_gaussian_model(decoder):
    def model(x, *extra):
        with pyro.plate("images", B):
            z = pyro.sample("z", dist.Normal(torch.zeros(B, C, H, W), 1.0).to_event(3))
            pyro.sample("x", dist.Normal(decoder(z, *extra), NOISE).to_event(3), obs=x)

    return model


def score_guide(x, *extra, rao_blackwell="element"):
    g = torch.Generator().manual_seed(1)
    m = pyro.param("m", lambda: 0.3 * torch.randn(B, C, H, W, generator=g))
    log_s = pyro.param("log_s", torch.full((B, C, H, W), -0.4))
    with pyro.plate("images", B):
        infer = {"estimator": "score", "rao_blackwell": rao_blackwell}
        pyro.sample("z", dist.Normal(m, log_s.exp()).to_event(3), infer=infer)


def exact_linear_gradients(decoder, x, *extra):
    """-ELBO's gradient in (m, log_s) for a decoder linear in z (its Jacobian, per image)."""
    score_guide(x, *extra)
    m, log_s = pyro.param("m"), pyro.param("log_s")
    var = (2 * log_s).exp()
    jac = torch.autograd.functional.jacobian(lambda z: decoder(z, *extra), torch.zeros(B, C, H, W))
    jac = jac.reshape(x.numel(), B * C * H * W)
    offset = decoder(torch.zeros(B, C, H, W), *extra).reshape(-1)
    mean_out = offset + jac @ m.reshape(-1)
    var_out = (jac**2) @ var.reshape(-1)
    lik = -0.5 * (((x.reshape(-1) - mean_out) ** 2 + var_out) / NOISE**2).sum()
    lik = lik - x.numel() * math.log(NOISE)
    prior = -0.5 * (m**2 + var).sum()
    entropy = log_s.sum()
    return torch.autograd.grad(-(lik + prior + entropy), [m, log_s])


def gradient_draws(model, guide, x, n, seed, *extra, **elbo_kwargs):
    pyro.set_rng_seed(seed)
    elbo = RoutedELBO(**elbo_kwargs)
    draws = [[], []]
    for _ in range(n):
        loss = elbo.differentiable_loss(model, guide, x, *extra)
        for store, g in zip(
            draws, torch.autograd.grad(loss, [pyro.param("m"), pyro.param("log_s")])
        ):
            store.append(g)
    return [mean_and_se(d) for d in draws], elbo


def assert_unbiased(found, exact, limit=4.5):
    for (mean, se), truth in zip(found, exact):
        z = ((mean - truth).abs() / se.clamp_min(1e-12)).max()
        assert z < limit, float(z)


def shift_into_buffer(z):
    buf = torch.zeros_like(z)
    buf[:, :, 3:] = z[..., :-3, :]
    return buf


def copy_into_buffer(z):
    buf = torch.empty(z.shape)
    buf.copy_(z.flip(-1))
    return buf


torch.manual_seed(0)
CONV = torch.nn.Conv2d(C, 1, 3, padding=1)
LINEAR_DECODERS = {
    "in-place shift": lambda z: CONV(shift_into_buffer(z)),
    "copy_": lambda z: CONV(copy_into_buffer(z)),
    "flip argument": lambda z, flip: CONV(z.flip(-1) if flip else z),
    "inpainting mask": lambda z: CONV(z) * torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0]),
}


@pytest.mark.parametrize("name", ["in-place shift", "copy_", "inpainting mask"])
def test_element_costs_are_unbiased_through_in_place_writes_and_masks(name):
    decoder = LINEAR_DECODERS[name]
    x = torch.randn(B, 1, H, W, generator=torch.Generator().manual_seed(2))
    exact = exact_linear_gradients(decoder, x)
    found, elbo = gradient_draws(linear_gaussian_model(decoder), score_guide, x, 1000, 3)
    assert_unbiased(found, exact)
    assert "costs" in elbo.routes["z"].reason


def test_a_footprint_is_derived_again_when_an_argument_moves_the_pixels():
    """A flip passed per batch (data augmentation): the footprint of the unflipped step
    must not be reused for a flipped one."""
    decoder = LINEAR_DECODERS["flip argument"]
    x = torch.randn(B, 1, H, W, generator=torch.Generator().manual_seed(2))
    model = linear_gaussian_model(decoder)
    pyro.set_rng_seed(4)
    elbo = RoutedELBO()
    draws = {False: [[], []], True: [[], []]}
    for step in range(1200):
        flip = step % 2 == 1
        loss = elbo.differentiable_loss(model, score_guide, x, flip)
        for store, g in zip(
            draws[flip], torch.autograd.grad(loss, [pyro.param("m"), pyro.param("log_s")])
        ):
            store.append(g)
    for flip in (False, True):
        exact = exact_linear_gradients(decoder, x, flip)
        assert_unbiased([mean_and_se(d) for d in draws[flip]], exact)
    assert "element-level costs" in elbo.routes["z"].reason


def test_leave_one_out_finds_the_particle_dim_from_the_particle_plate():
    def decoder(z):  # conv2d takes 4 dims: particles and images folded together
        return CONV(z.reshape(-1, C, H, W)).reshape(z.shape[:-3] + (1, H, W))

    x = torch.randn(B, 1, H, W, generator=torch.Generator().manual_seed(2))
    exact = exact_linear_gradients(decoder, x)
    found, elbo = gradient_draws(
        linear_gaussian_model(decoder), score_guide, x, 600, 5,
        num_particles=4, vectorize_particles=True, max_plate_nesting=1,
    )  # fmt: skip
    assert "element-level costs" in elbo.routes["z"].reason
    assert_unbiased(found, exact)


# ------------------------------------------- nonlinear decoders: site level as reference
NONLINEAR_DECODERS = {
    "max_pool ceil_mode": lambda z: F.interpolate(
        F.max_pool2d(CONV(z), 3, 2, ceil_mode=True), size=(H, W), mode="nearest"
    ),
    "step": lambda z: (CONV(z) > 0).float(),
    "gate": lambda z: CONV(z) * torch.clamp(-GATE, min=0),
}
GATE = torch.nn.Parameter(torch.full((1, 1, 1, 1), -1.0))


@pytest.mark.parametrize("name", list(NONLINEAR_DECODERS))
def test_element_costs_agree_with_site_level_costs_on_nonlinear_decoders(name):
    decoder = NONLINEAR_DECODERS[name]
    with torch.no_grad():
        x = torch.randn(
            decoder(torch.zeros(B, C, H, W)).shape, generator=torch.Generator().manual_seed(2)
        )
    model = linear_gaussian_model(decoder)
    element, elbo = gradient_draws(model, score_guide, x, 1000, 6)
    site_guide = lambda x: score_guide(x, rao_blackwell="site")  # noqa: E731
    site, _ = gradient_draws(model, site_guide, x, 3000, 7)
    for (mean_e, se_e), (mean_s, se_s) in zip(element, site):
        z = ((mean_e - mean_s).abs() / (se_e**2 + se_s**2).sqrt().clamp_min(1e-12)).max()
        assert z < 4.5, float(z)
    assert "costs" in elbo.routes["z"].reason


# ------------------------------------------------------------ model state, crashes
def test_the_analysis_touches_no_module_state():
    """One step moves BatchNorm's counter by one (the model's own forward), and float64
    running statistics stay exactly what that forward made them."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(C).double()
    conv = torch.nn.Conv2d(C, 1, 3, padding=1).double()

    def model(x):
        with pyro.plate("images", B):
            z = pyro.sample(
                "z", dist.Normal(torch.zeros(B, C, H, W, dtype=torch.float64), 1.0).to_event(3)
            )
            pyro.sample("x", dist.Normal(conv(bn(z)), 1.0).to_event(3), obs=x)

    def guide(x):
        m = pyro.param("m", torch.zeros(B, C, H, W, dtype=torch.float64))
        with pyro.plate("images", B):
            pyro.sample("z", dist.Normal(m, 1.0).to_event(3), infer={"estimator": "score"})

    x = torch.zeros(B, 1, H, W, dtype=torch.float64)
    elbo = RoutedELBO()
    for step in range(1, 4):
        elbo.loss_and_grads(model, guide, x)
        assert int(bn.num_batches_tracked) == step
    assert "site-level costs" in elbo.routes["z"].reason  # a pixel depends on other images


def test_a_new_image_size_and_a_prior_that_is_not_elementwise_do_not_crash():
    conv = torch.nn.Conv2d(C, 1, 3, padding=1)

    def model(x):
        size = x.shape[-1]
        with pyro.plate("images", B):
            z = pyro.sample("z", dist.Normal(torch.zeros(B, C, size, size), 1.0).to_event(3))
            pyro.sample("x", dist.Normal(conv(z), 1.0).to_event(3), obs=x)

    def guide(x):
        size = x.shape[-1]
        with pyro.plate("images", B):
            pyro.sample("z", dist.Normal(torch.zeros(B, C, size, size), 1.0).to_event(3),
                        infer={"estimator": "score"})  # fmt: skip

    elbo = RoutedELBO()
    for size in (6, 8, 8, 6, 6):  # a changed shape: site-level once, derived again next step
        elbo.loss(model, guide, torch.zeros(B, 1, size, size))
    assert "element-level costs" in elbo.routes["z"].reason

    def correlated_prior_model(x):  # the prior of z is not elementwise (over rows)
        with pyro.plate("images", B):
            prior = dist.MultivariateNormal(torch.zeros(B, C, H, W), torch.eye(W) + 0.5)
            z = pyro.sample("z", prior.to_event(2))
            pyro.sample("x", dist.Normal(conv(z), 1.0).to_event(3), obs=x)

    elbo = RoutedELBO()
    elbo.loss(correlated_prior_model, guide, torch.zeros(B, 1, H, W))
    assert "site-level costs: its prior has no per-element log-density" in elbo.routes["z"].reason


# ------------------------------------------------------------- values side by side
def test_subsampled_plates_are_replayed_at_the_indices_they_drew():
    data = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 1.0])

    def model(data):
        with pyro.plate("n", 6, subsample_size=3) as i:
            c = pyro.sample("c", dist.Bernoulli(0.3))
            pyro.sample("x", dist.Normal(c * 2.0, 1.0), obs=data[i])

    def guide(data):
        p = pyro.param("p", torch.full((6,), 0.4))
        with pyro.plate("n", 6, subsample_size=3) as i:
            pyro.sample("c", dist.Bernoulli(p[i]))

    elbo = RoutedELBO()
    for _ in range(3):
        elbo.loss(model, guide, data)
    assert elbo.routes["c"].estimator == "enumerate", elbo.routes["c"]
    forced = lambda data: pyro.poutine.infer_config(  # noqa: E731
        guide, lambda msg: {"estimator": "enumerate"} if msg["name"] == "c" else {}
    )(data)
    RoutedELBO().loss(model, forced, data)  # a requested enumeration blames nothing


def test_a_broadcast_that_swaps_evaluation_dims_is_caught():
    """Two enumerated sites whose model code swaps their evaluation dims: replaying the first
    and the last values alone (equal indices in both dims) cannot see it."""

    def model():
        with pyro.plate("n", 3):
            a = pyro.sample("a", dist.Bernoulli(0.5))
            b = pyro.sample("b", dist.Bernoulli(0.5))
            s = a + 2 * b
            if s.dim() >= 3:
                s = s.transpose(0, 1)
            pyro.sample("x", dist.Normal(s, 1.0), obs=torch.tensor([0.0, 1.0, 3.0]))

    def guide():
        with pyro.plate("n", 3):
            pyro.sample("a", dist.Bernoulli(0.3))
            pyro.sample("b", dist.Bernoulli(0.6))

    elbo = RoutedELBO()
    elbo.loss(model, guide)
    reasons = " ".join(r.reason for r in elbo.routes.values())
    assert "differs between the values side by side and one at a time" in reasons, reasons
    assert not all(r.estimator == "enumerate" for r in elbo.routes.values())


# ---------------------------------------------------------------- property test
def _random_decoder(seed: int):
    """2-4 random layers from allowed operators, operators the analysis does not know, and
    the hard cases: in-place writes, gates, pools with ceil_mode, interpolation, rolls."""
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (), generator=g))]

    def shifted_write(h):
        buf = torch.zeros_like(h)
        buf[..., 1:, :] = h[..., :-1, :]
        return buf

    def accumulate(h):
        out = h * 2
        out += h.roll(1, -2)
        return out

    layers, channels = [], C
    for _ in range(int(torch.randint(2, 5, (), generator=g))):
        kind = pick(["conv", "tconv", "maxpool", "avgpool", "adaptive", "relu", "pad", "roll",
                     "interp", "write", "accumulate", "gate", "cat", "permute", "matmul",
                     "slice", "cumsum", "unknown"])  # fmt: skip
        if kind == "conv":
            groups = pick([1, channels])
            out = 2 * groups if groups > 1 else 2
            mode = pick(["zeros", "reflect", "circular"])
            conv = torch.nn.Conv2d(channels, out, pick([1, 2, 3]), stride=pick([1, 2]),
                                   padding=pick([0, 1, 2, 3]), dilation=pick([1, 2]),
                                   groups=groups, padding_mode=mode)  # fmt: skip
            layers.append(conv)
            channels = layers[-1].out_channels
        elif kind == "tconv":
            kernel, stride = pick([2, 3, 4]), pick([1, 2, 3])
            tconv = torch.nn.ConvTranspose2d(channels, 2, kernel, stride=stride,
                                             padding=pick([0, 1]), dilation=pick([1, 2]))  # fmt: skip
            layers.append(tconv)
            channels = 2
        elif kind == "maxpool":
            ceil, k = pick([True, False]), pick([2, 3])
            layers.append(lambda h, c=ceil, k=k: F.max_pool2d(h, k, 2, padding=k // 2, ceil_mode=c))
        elif kind == "avgpool":
            layers.append(lambda h: F.avg_pool2d(h, 3, 2, padding=1, ceil_mode=True))
        elif kind == "adaptive":
            layers.append(lambda h: F.adaptive_avg_pool2d(h, (3, 4)))
        elif kind == "relu":
            layers.append(torch.nn.ReLU())
        elif kind == "pad":
            mode = pick(["constant", "reflect", "replicate"])
            layers.append(lambda h, m=mode: F.pad(h, (1, 0, 1, 1), mode=m))
        elif kind == "roll":
            layers.append(lambda h: h.roll((1, -2), (-1, -2)))
        elif kind == "interp":
            mode, scale = pick(["nearest", "bilinear", "bicubic"]), pick([0.5, 2, 1.5])
            layers.append(lambda h, m=mode, s=scale: F.interpolate(h, scale_factor=s, mode=m))
        elif kind == "write":
            layers.append(shifted_write)
        elif kind == "accumulate":
            layers.append(accumulate)
        elif kind == "gate":
            layers.append(lambda h: h * torch.sigmoid(h.mean(1, keepdim=True)))
        elif kind == "cat":
            layers.append(lambda h: torch.cat([h, h.flip(-2)], 1))
            channels *= 2
        elif kind == "permute":
            layers.append(lambda h: h.transpose(-1, -2).contiguous())
        elif kind == "matmul":
            layers.append(lambda h: h @ torch.ones(h.shape[-1], 3))
        elif kind == "slice":
            layers.append(lambda h: h[..., ::2, 1:])
        elif kind == "cumsum":
            layers.append(lambda h: h.cumsum(-1))
        else:
            layers.append(lambda h: torch.fft.fft2(h).real)  # not on the allowlist
    return layers


def test_boxes_contain_every_dependency_the_jacobian_shows():
    """For 60 random decoders, at three random points and parameter values each, every
    nonzero of the Jacobian (output element o, map element e) has e inside o's box, or the
    analysis says it does not know. Most decoders must be known (not a vacuous test)."""
    from pyro_reparam_conv.sparsity import Analysis

    known = 0
    for seed in range(60):
        layers = _random_decoder(seed)

        def decoder(z):
            h = z
            for layer in layers:
                h = layer(h)
            return h

        torch.manual_seed(seed)
        z = torch.randn(B, C, H, W)
        analysis = Analysis()
        try:
            with analysis:
                analysis.add_source("z", z)
                out = decoder(z)
        except RuntimeError:  # the random layers do not fit together
            continue
        if "z" in analysis.unknown:
            continue
        known += 1
        box = analysis.box(out, "z")
        n = box.shape[0] // 2
        lo, hi = -box[:n].reshape(n, -1), box[n:].reshape(n, -1)
        for point in range(3):
            torch.manual_seed(100 * seed + point)
            for layer in layers:
                if isinstance(layer, torch.nn.Module):
                    for p in layer.parameters():
                        torch.nn.init.normal_(p)
            jac = torch.autograd.functional.jacobian(decoder, torch.randn(B, C, H, W))
            rows, cols = (jac.reshape(out.numel(), -1) != 0).nonzero(as_tuple=True)
            index = torch.stack(torch.unravel_index(cols, (B, C, H, W)))
            inside = ((lo[:, rows] <= index) & (index <= hi[:, rows])).all(0)
            assert bool(inside.all()), f"seed {seed}: {layers}: a dependency outside its box"
    assert known >= 30, known


# ------------------------------------------------------- the bias check through convs
def test_measure_valued_and_the_bias_check_work_through_a_conv_step_decoder():
    """A step after a conv decoder biases the pathwise gradient (it is 0 through the step);
    the bias check's reference, measure-valued through the conv with site-level costs,
    sees it."""
    from pyro_reparam_conv import audit_gradients

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 1, 3, padding=1)
    x = torch.ones(1, 1, 3, 3)

    def model(x):
        with pyro.plate("images", 1):
            z = pyro.sample("z", dist.Normal(torch.zeros(1, 1, 3, 3), 1.0).to_event(3))
            pyro.sample("x", dist.Normal((conv(z) > 0).float(), 0.3).to_event(3), obs=x)

    def guide(x):
        m = pyro.param("m", torch.zeros(1, 1, 3, 3))
        with pyro.plate("images", 1):
            pyro.sample("z", dist.Normal(m, 1.0).to_event(3))

    audit = audit_gradients(model, guide, x, check_bias=True, num_draws=200)
    check = audit.bias_checks["z"]
    assert check.reference == "measure_valued", check.note
    assert "z" in audit.pathwise_bias, str(audit)


def test_a_value_written_through_data_keeps_every_later_term_in_its_cost():
    """``buf.data = n`` hands n's value to a tensor without provenance: an escape."""

    def model(x):
        n = pyro.sample("n", dist.Poisson(torch.tensor(3.0)))
        buf = torch.zeros(())
        buf.data = n
        pyro.sample("x", dist.Normal(0.5 * buf, 1.0), obs=x)

    x = torch.tensor(4.0)
    log_rate = torch.tensor(math.log(2.0), requires_grad=True)
    n = torch.arange(0, 80.0)
    q = dist.Poisson(log_rate.exp())
    f = dist.Poisson(3.0).log_prob(n) + dist.Normal(0.5 * n, 1.0).log_prob(x) - q.log_prob(n)
    (exact,) = torch.autograd.grad(-(q.log_prob(n).exp() * f).sum(), log_rate)
    pyro.set_rng_seed(1)
    elbo = RoutedELBO()
    draws = []
    for _ in range(1000):
        loss = elbo.differentiable_loss(model, poisson_guide, x)
        draws.append(torch.autograd.grad(loss, [pyro.param("log_rate").unconstrained()])[0])
    mean, se = mean_and_se(draws)
    assert abs(float(mean - exact)) < 4 * float(se), (float(mean), float(exact), float(se))
    assert "leaves the tensor graph (in-place set:data)" in elbo.routes["n"].reason
