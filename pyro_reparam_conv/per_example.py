"""Whether each example of a layer's output reaches the model's terms through terms of its
own: the condition under which a weight drawn per example (flipout, local
reparameterization; :mod:`.estimators.flipout`) leaves the ELBO and its gradient unbiased.

Why this condition. The ELBO is a sum of terms, ``sum_t E[f_t]``, each term ``t`` an
element of a model site's (scaled, masked) log-density. Flipout gives example ``n`` of a
layer the weight ``W_n = mu + (w - mu) * s_out[n] s_in[n]^T``, whose law is the guide's ``q``
(Wen et al. 2018); local reparameterization of a linear layer draws each output row with the
law of ``x_n w^T`` (Kingma, Salimans & Welling 2015). A term that depends on one example
``n`` of every such layer (and on other, independent draws) therefore has the expectation it
has under one shared weight draw ``w``, and so has its gradient (linearity: the sum over
terms needs nothing more). A term that depends on two examples ``n != m`` of one layer sees
``(W_n, W_m)``, which are not ``(w, w)``: a mean over the batch, batch statistics, a
cumulative sum, a sort, attention or a softmax across examples after the layer change the
objective.

How it is shown, on the step that checks a weight site (a plain draw,
:mod:`.weight_layers`): the layer's output becomes a source of a
:class:`~.sparsity.Analysis` whose boxes cover only its *example dims* (every dim left of its
channel dim: the batch dim, and any particle or plate dims of a batched layer, along which
flipout's signs vary), so the allowlisted operator rules of :mod:`.sparsity` follow the example
index of every element forward through the model (over-approximated, never reading values).
Then every model site's log-density is computed again, scaled and masked, under the same
analysis (:meth:`ExampleBoxes.mixing`): each of its elements must depend on at most one example
(an index box of width one in every example dim). An operator off the allowlist, a value
that leaves the tensor graph (``.item()``, control flow, an index computed from the output), a
log-density the rules cannot follow, or an element that depends on two examples leaves the
claim unproven, and the site keeps its plain weight draw with the reason in its route.
"""

from __future__ import annotations

from typing import Optional

import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine import Trace

from .sparsity import Analysis

__all__ = ["ExampleBoxes", "example_dims"]


def example_dims(output: torch.Tensor, spatial: int) -> int:
    """The number of example dims of a layer's ``output`` (``(*examples, channels,
    *spatial)``; ``F.linear``: ``(*examples, features)``)."""
    return max(output.dim() - spatial - 1, 0)


class ExampleBoxes:
    """The example indices of layer outputs, followed through one run of the model (enter it
    around the run; :meth:`add_layer` at each layer call to check), then checked against the
    model trace's log-densities (:meth:`mixing`)."""

    def __init__(self) -> None:
        self.analysis = Analysis()
        self.layers: dict[str, str] = {}  # site -> the layer whose output is followed

    def __enter__(self):
        self.analysis.__enter__()
        return self

    def __exit__(self, *exc):
        return self.analysis.__exit__(*exc)

    def add_layer(self, site: str, name: str, output: torch.Tensor, spatial: int) -> None:
        """Follow the example indices of ``output``, the output of layer ``name`` whose weight
        is ``site``'s value (one example only: nothing to follow)."""
        dims = example_dims(output, spatial)
        if dims:
            self.layers[site] = name
            self.analysis.add_source(site, output, dims)

    def mixing(self, model_trace: Trace) -> dict[str, str]:
        """Per followed site, why its layer's examples are not shown to reach the model's
        terms separately (sites shown to are absent)."""
        analysis, why = self.analysis, {}
        if not self.layers:
            return why
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            log_p = self._log_density(site)
            for source, layer in self.layers.items():
                if source in why or source in analysis.unknown:
                    continue
                if log_p is None:
                    why[source] = f"the log-density of {name!r} cannot be followed"
                    continue
                spread = _spread(analysis.box(log_p, source), analysis.ndim[source])
                if spread is not None:
                    why[source] = (f"an element of the log-density of {name!r} depends on "
                                   f"{spread} examples of the {layer} output")  # fmt: skip
        for source in self.layers:
            if source in analysis.unknown:
                why.setdefault(source, analysis.unknown[source])
        return why

    def _log_density(self, site: dict) -> Optional[torch.Tensor]:
        """The site's scaled and masked log-density, computed under the analysis (``None``
        where that fails)."""
        try:
            with self.analysis:
                log_p = site["fn"].log_prob(site["value"])
                return scale_and_mask(log_p, site["scale"], site["mask"])
        except Exception:  # noqa: BLE001 - a density the analysis cannot run: unproven
            return None


def _spread(box: Optional[torch.Tensor], dims: int) -> Optional[int]:
    """The largest number of examples (along one example dim) that an element's ``box``
    spans, where more than one; ``None`` where every element depends on at most one."""
    if box is None or box.numel() == 0:
        return None
    width = (box[dims:] + box[:dims]).amax()  # hi - lo per dim; -inf where on none
    return None if float(width) <= 0 else int(width) + 1
