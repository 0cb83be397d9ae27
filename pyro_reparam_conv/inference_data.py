"""SVI guide -> ArviZ InferenceData.

ArviZ 0.23's ``from_pyro`` converts MCMC runs only. :func:`to_inference_data` draws joint
posterior samples from a fitted guide instead: for each draw ``s``

    z_s ~ q(z | x)                       (run the guide, record its trace)
    p(x_i | z_s)                         (replay the model on z_s with the data observed)
    x_s^rep ~ p(x | z_s)                 (replay the model on z_s with the data unobserved)

and stores ``z_s`` (posterior), ``x_s^rep`` (posterior_predictive), the pointwise
``log p(x_i | z_s)`` (log_likelihood, what ``az.loo`` / ``az.waic`` read) and ``x``
(observed_data). Draws are independent, so ArviZ sees one chain of ``num_samples`` draws.

ArviZ and xarray are imported inside the function only, so importing this package stays
light and free of ArviZ 0.23's import-time FutureWarning.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_factor, site_is_subsample
from pyro.util import get_rng_state, set_rng_state

from .introspect import max_plate_nesting

if TYPE_CHECKING:  # pragma: no cover
    import arviz

#: Name of the extra group that holds the SVI loss per optimization step.
LOSS_GROUP = "svi"
_DRAW_PLATE = "_to_inference_data_draws"
_DRAW_GROUPS = ("posterior", "posterior_predictive", "log_likelihood")

Draws = Dict[str, Dict[str, np.ndarray]]  # group -> site -> array with a leading draw dim
Dims = Dict[str, Dict[str, List[str]]]  # group -> site -> dim names (without chain, draw)


def to_inference_data(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *args: Any,
    num_samples: int = 500,
    elbo_trace: Optional[Sequence[float]] = None,
    seed: Optional[int] = None,
    parallel: bool = False,
    **kwargs: Any,
) -> "arviz.InferenceData":
    """Draw ``num_samples`` joint samples from a fitted guide and return ArviZ InferenceData.

    ``model`` and ``guide`` are called as ``model(*args, **kwargs)``. Groups, each with dims
    ``("chain", "draw", ...)`` and one chain, except ``observed_data`` and ``svi``:

    - ``posterior``: every latent sample site of the model (its value under the guide's
      ``z_s ~ q``) and every ``pyro.deterministic`` site. Guide-only sites (``*_unconstrained``,
      ``_AutoDiagonalNormal_latent``, ...), auxiliary, factor and subsample sites are left out.
    - ``posterior_predictive``: each observed site re-sampled, ``x^rep_s ~ p(x | z_s)``.
    - ``log_likelihood``: ``log p(x | z_s)`` per observed site, summed over event dims only.
    - ``observed_data``: the observed values.
    - ``svi`` (only if ``elbo_trace`` is given): variable ``loss`` over dim ``svi_step``, the
      per-step losses (negative ELBO, as ``SVI.step`` returns them).

    A dim that belongs to a ``pyro.plate`` is named after the plate, with coords
    ``0..size-1``; any other dim of site ``name`` is ``{name}_dim_{k}``. A model without
    observed sites gets only ``posterior`` (and ``svi``).

    ``seed``: if given, draws use ``pyro.set_rng_seed(seed)`` and the global torch / numpy /
    random states are restored afterwards; if ``None`` the global RNG is used and advanced.
    ``parallel``: draw all samples in one pass inside a ``pyro.plate`` of size
    ``num_samples`` (fast; only for a model and guide that broadcast over a new leftmost
    batch dim). The default runs guide and model once per draw and works for any pair.

    The param store and parameter values are left unchanged (parameters a not yet fitted
    guide creates are removed again). Raises ``ValueError`` for ``num_samples < 1``, a
    model without latent sites, a latent site the guide does not sample (it would be drawn
    from the prior), a subsampling plate, or a malformed ``elbo_trace``.
    """
    _check_num_samples(num_samples)
    losses = None if elbo_trace is None else _as_loss_array(elbo_trace)
    with _rng(seed), _param_store_kept(), torch.no_grad(), poutine.block():
        reference = _joint_traces(model, guide, args, kwargs)
        sites = _check_sites(*reference)
        dims, coords = _dims_and_coords(reference, sites)
        observed = {name: _to_numpy(reference[1].nodes[name]["value"]) for name in sites[1]}
        if parallel:
            draws = _draw_parallel(model, guide, args, kwargs, num_samples, reference, sites)
        else:
            draws = _draw_sequential(model, guide, args, kwargs, num_samples, reference, sites)
    return _assemble(draws, observed, dims, coords, losses)


# ----------------------------------------------------------------------------- validation


def _check_num_samples(num_samples: int) -> None:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")


def _as_loss_array(elbo_trace: Sequence[float]) -> np.ndarray:
    try:
        losses = np.asarray([float(loss) for loss in elbo_trace], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError("elbo_trace must be a 1-D sequence of numbers (losses per step)") from err
    if losses.size == 0:
        raise ValueError("elbo_trace is empty; pass the losses SVI.step returned, or None")
    return losses


def _check_sites(guide_trace: Trace, model_trace: Trace, _: Trace) -> Tuple[List[str], List[str]]:
    """(posterior site names, observed site names) of the model, after checking the guide."""
    _check_no_subsampling(guide_trace)
    _check_no_subsampling(model_trace)
    posterior, observed = _classify_sites(model_trace)
    if not posterior:
        raise ValueError("the model has no latent sample sites, so there is no posterior")
    missing = [
        name
        for name in posterior
        if not model_trace.nodes[name]["infer"].get("_deterministic") and name not in guide_trace
    ]
    if missing:
        raise ValueError(
            f"latent sites {missing} are sampled by the model but not by the guide; their "
            "draws would come from the prior, not the posterior (for enumerated discrete "
            "sites use pyro.infer.infer_discrete and convert by hand)"
        )
    return posterior, observed


def _check_no_subsampling(trace: Trace) -> None:
    for name, site in trace.nodes.items():
        if site_is_subsample(site) and len(site["value"]) < site["fn"].size:
            raise ValueError(
                f"plate {name!r} subsamples {len(site['value'])} of {site['fn'].size}; "
                "convert with subsample_size=None so every datum has a draw"
            )


def _classify_sites(trace: Trace) -> Tuple[List[str], List[str]]:
    posterior: List[str] = []
    observed: List[str] = []
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site) or site_is_factor(site):
            continue
        if site["infer"].get("_deterministic"):
            posterior.append(name)
        elif site["is_observed"]:
            observed.append(name)
        elif not site["infer"].get("is_auxiliary"):
            posterior.append(name)
    return posterior, observed


# ----------------------------------------------------------------------------- state


@contextlib.contextmanager
def _rng(seed: Optional[int]) -> Iterator[None]:
    """Seed the draws if ``seed`` is given, restoring the global RNG states afterwards."""
    if seed is None:
        yield
        return
    saved = get_rng_state()
    try:
        pyro.set_rng_seed(seed)
        yield
    finally:
        set_rng_state(saved)


@contextlib.contextmanager
def _param_store_kept() -> Iterator[None]:
    """Remove params first created inside the block (by a guide that was never run)."""
    store = pyro.get_param_store()
    before = set(store.keys())
    try:
        yield
    finally:
        for name in set(store.keys()) - before:
            del store[name]


# ----------------------------------------------------------------------------- drawing


def _joint_traces(
    model: Callable[..., Any], guide: Callable[..., Any], args: tuple, kwargs: dict
) -> Tuple[Trace, Trace, Trace]:
    """Guide trace, model trace replayed on it (data observed), and the same unobserved."""
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    replayed = poutine.replay(model, trace=guide_trace)
    conditioned = poutine.trace(replayed).get_trace(*args, **kwargs)
    unconditioned = poutine.trace(poutine.uncondition(replayed)).get_trace(*args, **kwargs)
    return guide_trace, conditioned, unconditioned


def _pointwise_log_likelihood(site: Dict[str, Any]) -> torch.Tensor:
    """``log p(x | z)`` of an observed site, event dims summed, mask applied, unscaled."""
    return scale_and_mask(site["fn"].log_prob(site["value"]), mask=site["mask"])


def _extract(
    traces: Tuple[Trace, Trace, Trace], sites: Tuple[List[str], List[str]]
) -> Dict[str, Dict[str, torch.Tensor]]:
    _, conditioned, unconditioned = traces
    posterior, observed = sites
    return {
        "posterior": {name: conditioned.nodes[name]["value"] for name in posterior},
        "posterior_predictive": {name: unconditioned.nodes[name]["value"] for name in observed},
        "log_likelihood": {
            name: _pointwise_log_likelihood(conditioned.nodes[name]) for name in observed
        },
    }


def _draw_sequential(model, guide, args, kwargs, num_samples, reference, sites) -> Draws:
    """One guide run and two model runs per draw; the reference traces are draw 0."""
    records = [_extract(reference, sites)]
    for _ in range(num_samples - 1):
        records.append(_extract(_joint_traces(model, guide, args, kwargs), sites))
    return {
        group: {name: _stack(name, [r[group][name] for r in records]) for name in records[0][group]}
        for group in _DRAW_GROUPS
    }


def _stack(name: str, values: List[torch.Tensor]) -> np.ndarray:
    shapes = {tuple(v.shape) for v in values}
    if len(shapes) > 1:
        raise ValueError(f"site {name!r} changes shape between draws: {sorted(shapes)}")
    return np.stack([_to_numpy(v) for v in values])


def _draw_parallel(model, guide, args, kwargs, num_samples, reference, sites) -> Draws:
    """All draws at once inside a plate at the dim left of every plate of model and guide."""
    draw_plate = pyro.plate(_DRAW_PLATE, num_samples, dim=-max_plate_nesting(*reference) - 1)

    def in_plate(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*a: Any, **k: Any) -> Any:
            with draw_plate:
                return fn(*a, **k)

        return wrapped

    try:
        batched = _extract(_joint_traces(in_plate(model), in_plate(guide), args, kwargs), sites)
    except Exception as err:
        raise ValueError(
            "parallel=True failed: the model or guide does not broadcast over a leftmost "
            "draw dim; use parallel=False"
        ) from err
    shapes = _extract(reference, sites)
    return {
        group: {
            name: _to_numpy(_unbatch(name, value, num_samples, shapes[group][name].shape))
            for name, value in batched[group].items()
        }
        for group in _DRAW_GROUPS
    }


def _unbatch(name: str, value: torch.Tensor, num_samples: int, shape: torch.Size) -> torch.Tensor:
    """``(S, 1, ..., 1, *shape) -> (S, *shape)``, refusing anything else."""
    n = len(shape)
    pad = value.shape[1 : value.dim() - n]
    ok = (
        value.dim() > n
        and value.shape[0] == num_samples
        and tuple(value.shape[value.dim() - n :]) == tuple(shape)
        and all(size == 1 for size in pad)
    )
    if not ok:
        raise ValueError(
            f"parallel=True gave site {name!r} shape {tuple(value.shape)}, expected "
            f"({num_samples}, ..., {', '.join(map(str, shape))}); use parallel=False"
        )
    return value.reshape((num_samples,) + tuple(shape))


def _to_numpy(value: torch.Tensor) -> np.ndarray:
    value = torch.as_tensor(value).detach().cpu()
    if value.dtype in (torch.bfloat16, torch.float16):
        value = value.float()
    return value.numpy()


# ----------------------------------------------------------------------------- dims, assembly


def _site_dims(name: str, site: Dict[str, Any], shape: Sequence[int], event_dim: int) -> List[str]:
    """Name each dim of an array of ``shape`` at ``site``: plate name or ``{name}_dim_{k}``."""
    plates = {frame.dim: frame for frame in site["cond_indep_stack"] if frame.vectorized}
    batch_dim = len(shape) - event_dim
    dims = []
    for k, size in enumerate(shape):
        frame = plates.get(k - batch_dim)  # negative batch index; event dims get none
        dims.append(frame.name if frame is not None and frame.size == size else f"{name}_dim_{k}")
    return dims


def _dims_and_coords(
    reference: Tuple[Trace, Trace, Trace], sites: Tuple[List[str], List[str]]
) -> Tuple[Dims, Dict[str, np.ndarray]]:
    conditioned, unconditioned = reference[1].nodes, reference[2].nodes
    latent = {name: _value_dims(name, conditioned[name]) for name in sites[0]}
    observed = {name: _value_dims(name, conditioned[name]) for name in sites[1]}
    dims: Dims = {
        "posterior": latent,
        "observed_data": observed,
        "posterior_predictive": {n: _value_dims(n, unconditioned[n]) for n in sites[1]},
        "log_likelihood": {
            n: _site_dims(n, conditioned[n], _pointwise_log_likelihood(conditioned[n]).shape, 0)
            for n in sites[1]
        },
    }
    coords = {
        frame.name: np.arange(frame.size)
        for site in conditioned.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    }
    return dims, coords


def _value_dims(name: str, site: Dict[str, Any]) -> List[str]:
    """Dims of a site's value; a ``pyro.deterministic`` value counts as batch dims (its Delta
    takes every dim as an event dim by default, so plates would not name them)."""
    value, fn = site["value"], site["fn"]
    event_dim = min(fn.event_dim, max(0, value.dim() - len(fn.batch_shape)))
    return _site_dims(name, site, value.shape, event_dim)


@contextlib.contextmanager
def quiet_arviz() -> Iterator[Any]:
    """Import ArviZ and yield it with its noise about guide draws silenced.

    ArviZ 0.23 warns about its 1.0 refactor on import, logs "Shape validation failed" for one
    chain (the guide's draws are independent: one chain is all there is, not a short MCMC
    run), divides 0/0 in the Monte Carlo error of a draw that never varies and, plotting with
    matplotlib >= 3.11, calls a deprecated matplotlib API. None of it concerns the user.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        import arviz  # first: its import sets the "arviz" logger's level

        loggers = _arviz_loggers()
        previous = [logger.level for logger in loggers]
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield arviz
        finally:
            for logger, level in zip(loggers, previous):
                logger.setLevel(level)


def _arviz_loggers() -> List[logging.Logger]:
    """ArviZ's loggers: the registered "arviz" one and the module-level ``_log`` objects that
    some of its modules create directly (``Logger("arviz")``, unreachable by name)."""
    found = {id(logging.getLogger("arviz")): logging.getLogger("arviz")}
    for name, module in list(sys.modules.items()):
        logger = getattr(module, "_log", None) if name.startswith("arviz") else None
        if isinstance(logger, logging.Logger):
            found[id(logger)] = logger
    return list(found.values())


def _assemble(
    draws: Draws,
    observed: Dict[str, np.ndarray],
    dims: Dims,
    coords: Dict[str, np.ndarray],
    losses: Optional[np.ndarray],
) -> "arviz.InferenceData":
    with quiet_arviz() as az:

        def dataset(group: str, data: Dict[str, np.ndarray], default_dims=None):
            return az.dict_to_dataset(
                data, library=pyro, coords=coords, dims=dims[group], default_dims=default_dims
            )

        groups = {
            group: dataset(group, {name: value[None] for name, value in draws[group].items()})
            for group in _DRAW_GROUPS
            if draws[group]
        }
        if observed:
            groups["observed_data"] = dataset("observed_data", observed, default_dims=[])
        if losses is not None:
            groups[LOSS_GROUP] = az.dict_to_dataset(
                {"loss": losses},
                library=pyro,
                coords={"svi_step": np.arange(losses.size)},
                dims={"loss": ["svi_step"]},
                default_dims=[],
            )
        return az.InferenceData(**groups)
