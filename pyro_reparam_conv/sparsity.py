"""Sound dependency analysis of one run of a model: boxes, escapes and in-place writes.

Two questions decide which terms a score-function site's cost needs
(:mod:`.dependencies`, :mod:`.locality`), and a wrong "no" biases the gradient:

1. *Does a value leave the tensor graph?* Provenance (Wingate et al. 2011) follows a latent
   through tensor operations only. Where its value becomes a Python number or shape
   (``.item()``, ``bool``, ``int``, ``float``, ``tolist``, ``numpy``, an index, a
   data-dependent shape such as ``nonzero``), or is written in place into a tensor that
   carries no provenance (``buf[...] = z``, ``buf.copy_(z)``), everything computed after it
   may depend on it. :class:`Analysis` records each such *escape* with its provenance and
   its position in sampling order; :mod:`.dependencies` then applies the sampling-order
   rule (Pyro's ``TraceGraph_ELBO`` rule for non-reparameterized sites) from that point on.
   Escapes inside distribution validation (``if not valid.all(): raise``) change nothing
   when they pass and are not counted.
2. *Which elements of a latent map ``z`` can an element of a later tensor depend on?*
   Abstract interpretation (Cousot & Cousot 1977) over the operators the model calls, seen
   through a :class:`~torch.overrides.TorchFunctionMode` during the real step (no replay, no
   other parameter values, no module state touched). Each tensor computed from ``z`` carries
   a *box* per element: the smallest index box of ``z`` (all of ``z``'s dims) that contains
   every element it can depend on, stored as one tensor of shape ``(2n,) + shape`` holding
   ``-lo`` and ``hi`` per dim of ``z`` (``-inf`` where an element depends on no element), so
   that the union of boxes is an elementwise maximum. Every operator on such a tensor must be
   on an allowlist with an exact rule that over-approximates the dependency
   (:data:`RULES`): pointwise ops and broadcasting; reshapes, views, slicing, indexing
   with indices that do not depend on ``z``, ``cat``/``stack``/``pad``/``roll``/``flip``;
   reductions and normalizations over the dims they reduce; convolutions (strided,
   dilated, grouped, transposed) and pooling through their own window, stride, padding,
   dilation and ``ceil_mode``; interpolation; matrix products. Anything else touching ``z``
   (an unknown operator, an index computed from ``z``, an in-place write that grows the
   dependencies of a tensor that has other views) makes the analysis *unknown* with the
   reason, and the caller falls back to site-level costs. Rules never read values of
   ``z``; a rule that reads values of other tensors (an index, a mask) makes the result
   valid for this run only (``reusable=False``).
"""

from __future__ import annotations

import math
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from pyro.ops.provenance import get_provenance
from torch.distributions import Distribution
from torch.distributions.transforms import Transform
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = [
    "Analysis",
    "Escape",
    "NO_VALUES",
    "RULES",
    "Unknown",
    "checks_only",
    "distribution_tensors",
    "source_box",
    "union",
]

NEG = float("-inf")


class Unknown(Exception):
    """An operator the analysis cannot follow: the footprint is the whole map."""


@dataclass(frozen=True)
class Escape:
    """A value that left the tensor graph: ``provenance`` (latent site names) escaped in
    ``role``'s program after its first ``position`` sample sites, through ``how``."""

    role: str
    position: int
    provenance: frozenset
    how: str


# ----------------------------------------------------------------------- names of ops
_BOOLEAN_DISPATCH = {
    F.max_pool1d: "max_pool1d", F.max_pool2d: "max_pool2d", F.max_pool3d: "max_pool3d",
    F.adaptive_max_pool1d: "adaptive_max_pool1d", F.adaptive_max_pool2d: "adaptive_max_pool2d",
    F.adaptive_max_pool3d: "adaptive_max_pool3d",
}  # fmt: skip
_DUNDER = {
    "add", "radd", "iadd", "sub", "rsub", "isub", "mul", "rmul", "imul", "truediv", "rtruediv",
    "itruediv", "div", "rdiv", "idiv", "floordiv", "rfloordiv", "ifloordiv", "mod", "rmod",
    "imod", "pow", "rpow", "ipow", "neg", "pos", "abs", "invert", "and", "rand", "iand", "or",
    "ror", "ior", "xor", "rxor", "ixor", "lt", "le", "gt", "ge", "eq", "ne", "lshift",
    "rshift", "matmul", "rmatmul", "imatmul",
}  # fmt: skip


def op_name(func) -> tuple[str, bool]:
    """``(name, in_place)`` of a torch function: ``__iadd__`` is ``("add", True)``,
    ``Tensor.shape``'s getter ``("get:shape", False)``."""
    special = _BOOLEAN_DISPATCH.get(func)
    if special:
        return special, False
    name = getattr(func, "__name__", "")
    if name in ("__getitem__", "__setitem__"):
        return name[2:-2], False
    if name == "__set__":  # a property's setter, e.g. ``t.data = other``: a write into t
        return "set:" + getattr(getattr(func, "__self__", None), "__name__", "?"), True
    if name == "__get__":
        return "get:" + getattr(getattr(func, "__self__", None), "__name__", "?"), False
    if name.startswith("__") and name.endswith("__") and name[2:-2] in _DUNDER:
        core = name[2:-2]
        if core.startswith("i") and core[1:] in _DUNDER:
            return core[1:], True
        if core.startswith("r") and core[1:] in _DUNDER and core != "rshift":
            ordered = ("matmul", "sub", "div", "truediv", "floordiv", "mod", "pow")
            return (core if core[1:] in ordered else core[1:]), False
        return core, False
    if name.endswith("_") and not name.endswith("__") and not name.startswith("_"):
        return name[:-1], True
    return name, False


# ------------------------------------------------------------------------ box helpers
def source_box(shape: torch.Size, device) -> torch.Tensor:
    """The box of ``z`` itself: every element depends on itself only."""
    n = len(shape)
    box = torch.empty((2 * n, *shape), dtype=torch.float32, device=device)
    for d, size in enumerate(shape):
        index = torch.arange(size, dtype=torch.float32, device=device)
        index = index.reshape((size,) + (1,) * (n - d - 1)).expand(shape)
        box[d], box[n + d] = -index, index
    return box


def _empty(k: int, shape, device) -> torch.Tensor:
    return torch.full((k, *shape), NEG, dtype=torch.float32, device=device)


def broadcast_box(box: torch.Tensor, shape) -> torch.Tensor:
    """``box`` (k, *s) broadcast to (k, *shape) as torch broadcasts s to shape."""
    k, s = box.shape[0], box.shape[1:]
    if len(s) > len(shape):  # the extra leading dims must be singletons
        box = box.reshape((k,) + tuple(s[len(s) - len(shape) :]))
        s = box.shape[1:]
    return box.reshape((k,) + (1,) * (len(shape) - len(s)) + tuple(s)).expand((k, *shape))


def union(boxes, shape, k: int, device) -> torch.Tensor:
    """The union of ``boxes`` broadcast to ``shape``."""
    out = None
    for box in boxes:
        b = broadcast_box(box, shape)
        out = b if out is None else torch.maximum(out, b)
    return out if out is not None else _empty(k, shape, device)


def distribution_tensors(fn) -> list[torch.Tensor]:
    """Every tensor a distribution holds (wrapped distributions and transforms included)."""
    found, stack, seen = [], [fn], set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        for value in vars(obj).values():
            if isinstance(value, torch.Tensor):
                found.append(value)
            elif isinstance(value, (Distribution, Transform)):
                stack.append(value)
            elif isinstance(value, (list, tuple)):
                stack.extend(v for v in value if isinstance(v, (Distribution, Transform)))
    return found


# ---------------------------------------------------------------------------- state
def _tensors(obj) -> list:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


class Analysis(TorchFunctionMode):
    """The mode active during a tracked step's guide and model runs.

    ``role`` (``"guide"``/``"model"``) and ``positions`` (sample sites seen per role) are
    kept by the :class:`~.dependencies.TagLatents` messengers; ``escapes`` lists the values
    that left the tensor graph; ``boxes`` maps each tensor computed from a source map
    (:meth:`add_source`) to ``{site: box}``; ``unknown`` says, per source, why its boxes
    cannot be trusted (the first reason); ``reusable`` is ``False`` once a rule read the
    values of a tensor (an index), or some value (of any tensor) decided control flow.
    """

    def __init__(self) -> None:
        super().__init__()
        self.role = "guide"
        self.positions: dict[str, int] = {"guide": 0, "model": 0}
        self.order: dict[str, list] = {"guide": [], "model": []}
        self.escapes: list[Escape] = []
        self.boxes: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
        self.unknown: dict[str, str] = {}
        self.value_dependent: list[str] = []
        self.ndim: dict[str, int] = {}
        self._storages: dict[int, list] = {}

    @property
    def reusable(self) -> bool:
        return not self.value_dependent

    def add_source(self, name: str, value: torch.Tensor, dims: Optional[int] = None) -> None:
        """Start following the elements of latent map ``name`` (its value as the code sees
        it); with ``dims``, only the indices of its leading ``dims`` dims (the boxes then
        have ``2 * dims`` rows, every element of an index sharing its box)."""
        dims = value.dim() if dims is None else dims
        self.ndim[name] = dims
        with torch._C.DisableTorchFunction():  # the box is no part of the model's run
            box = source_box(value.shape[:dims], value.device)
            box = box.reshape(box.shape + (1,) * (value.dim() - dims))
            self._set(value, name, box.expand((2 * dims, *value.shape)))
        self._register(value)

    def box(self, t: Any, name: str) -> Optional[torch.Tensor]:
        found = self.boxes.get(t) if isinstance(t, torch.Tensor) else None
        return None if found is None else found.get(name)

    # ---------------------------------------------------------------- the mode
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name, in_place = op_name(func)
        inputs = _tensors((args, kwargs))
        tainted = [t for t in inputs if t in self.boxes]
        if name in ESCAPES or (name == "getitem" and _bool_index(args)):
            self._escape(name, inputs, tainted)
            if name in ESCAPES:  # the result is no tensor, or one of unknown shape
                result = func(*args, **kwargs)
                for t in _tensors(result):
                    self._register(t)
                return result
        if "out" in kwargs and kwargs["out"] is not None:
            in_place = True
        if kwargs.get("inplace") is True:
            in_place = True
        if name in _NO_VALUES:
            in_place = False  # requires_grad_ and the like change no value
        target = _target(args, kwargs) if in_place or name == "setitem" else None
        if target is not None:
            self._provenance_write(name, target, inputs)
        result = func(*args, **kwargs)
        if tainted:
            self._follow(func, name, target, args, kwargs, result, tainted)
        for t in _tensors(result):
            self._register(t)
        return result

    # ------------------------------------------------------------- escapes
    def _escape(self, how: str, inputs, tainted) -> None:
        if _in_validation():
            return
        provenance = (
            frozenset().union(*(get_provenance(t) for t in inputs)) if inputs else frozenset()
        )
        if provenance or not _in_distribution():
            # a sampler's own loop on values that carry no latent (a rejection sampler's
            # uniforms) decides that site's value only, not which tensors feed which
            self.value_dependent.append(how)
        if provenance:
            position = self.positions[self.role]
            self.escapes.append(Escape(self.role, position, provenance, how))
        for t in tainted:
            for name in self.boxes[t]:
                self.unknown.setdefault(name, f"its value leaves the tensor graph ({how})")

    def _provenance_write(self, name: str, target: torch.Tensor, inputs) -> None:
        """An in-place write of values with provenance into a tensor without it loses the
        provenance: an escape, from this point of sampling order on."""
        written = frozenset().union(*(get_provenance(t) for t in inputs if t is not target),
                                    frozenset())  # fmt: skip
        if written and not written <= get_provenance(target) and not _in_validation():
            position = self.positions[self.role]
            self.escapes.append(Escape(self.role, position, written, f"in-place {name}"))

    # ------------------------------------------------------------- boxes
    def _register(self, t: torch.Tensor) -> None:
        try:
            key = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return
        refs = [r for r in self._storages.get(key, []) if r() is not None]
        refs.append(weakref.ref(t))
        self._storages[key] = refs

    def _aliased(self, t: torch.Tensor) -> bool:
        """Whether another live tensor seen in this run shares ``t``'s storage (a view)."""
        try:
            key = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return True
        others = [r() for r in self._storages.get(key, [])]
        return any(o is not None and o is not t for o in others) or t._base is not None

    def _follow(self, func, name, target, args, kwargs, result, tainted) -> None:
        """Boxes of the op's results (or of its in-place ``target``) for every source map
        that a tainted input carries."""
        names = {n for t in tainted for n in self.boxes[t]}
        for source in names:
            if source in self.unknown:
                continue
            try:
                self._apply(func, name, target, args, kwargs, result, source)
            except Unknown as why:
                self.unknown[source] = str(why)
            except Exception as error:  # noqa: BLE001 - a rule that fails is unknown
                self.unknown[source] = f"{name}: {type(error).__name__}: {error}"

    def _apply(self, func, name, target, args, kwargs, result, source) -> None:
        k = 2 * self.ndim[source]
        box_of_arg = lambda t: self.box(t, source)  # noqa: E731
        if target is not None:
            if isinstance(kwargs.get("out"), (tuple, list)):
                raise Unknown(f"{name} writes several outputs in place")
            old = box_of_arg(target)
            new = _in_place_box(name, args, kwargs, box_of_arg, k, target)
            grown = old is None or bool((new > old).any())
            if grown and (old is None and not self._created_here(target) or self._aliased(target)):
                raise Unknown(
                    f"an in-place {name} writes values computed from {source!r} into a tensor "
                    "that has other views or was not made in this run"
                )
            self._set(target, source, new)
            for t in _tensors(result):
                if t is not target:
                    self._set(
                        t,
                        source,
                        new if t.shape == target.shape else union([new], t.shape, k, t.device),
                    )
            return
        rule = RULES.get(name)
        if rule is None:
            raise Unknown(f"operator {name!r} is not on the allowlist of the footprint analysis")
        outs = _tensors(result)
        boxes = rule(Call(func, name, args, kwargs, result, box_of_arg, k, self))
        if isinstance(boxes, torch.Tensor):
            boxes = [boxes] * len(outs)
        for t, b in zip(outs, boxes):
            if b is None:
                continue
            if tuple(b.shape) != (k, *t.shape):
                raise Unknown(f"{name}: box of shape {tuple(b.shape)} for a tensor of shape "
                              f"{tuple(t.shape)}")  # fmt: skip
            self._set(t, source, b)

    def _created_here(self, t: torch.Tensor) -> bool:
        try:
            key = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return False
        return any(r() is t for r in self._storages.get(key, []))

    def _set(self, t: torch.Tensor, source: str, box: torch.Tensor) -> None:
        entry = self.boxes.get(t)
        if entry is None:
            entry = {}
            self.boxes[t] = entry
        entry[source] = box


def _target(args, kwargs) -> Optional[torch.Tensor]:
    """The tensor an in-place op writes: its ``out=``, else its first argument."""
    out = kwargs.get("out")
    if isinstance(out, torch.Tensor):
        return out
    if out is not None:  # several outputs (the rules then say unknown): the first
        outs = _tensors(out)
        return outs[0] if outs else None
    return args[0] if args and isinstance(args[0], torch.Tensor) else None


_CHECKS: set = set()


def checks_only(fn: Callable) -> Callable:
    """Mark ``fn`` as a check: it reads values only to raise when they are invalid, so a
    value it turns into a Python bool is no escape (it changes nothing when it passes).
    Distributions' own validation is recognised without it."""
    _CHECKS.add(fn.__code__)
    return fn


def _in_validation() -> bool:
    """Whether the caller is a distribution's argument or sample validation, or a function
    marked with :func:`checks_only`."""
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code in _CHECKS or code.co_name in ("_validate_sample", "_validate_args"):
            return True
        if code.co_name == "check" and code.co_filename.endswith("constraints.py"):
            return True
        if code.co_name == "__init__" and code.co_filename.endswith(
            ("distributions/distribution.py", "distributions/independent.py")
        ):
            return True
        frame = frame.f_back
    return False


def _in_distribution() -> bool:
    """Whether the caller is code of a torch or Pyro distribution (its sampler, its density)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename.replace("\\", "/")
        if "/torch/distributions/" in name or "/pyro/distributions/" in name:
            return True
        frame = frame.f_back
    return False


def _bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


#: operators whose result is a Python value (or a shape) computed from a tensor's values
ESCAPES = frozenset({
    "item", "__bool__", "__int__", "__float__", "__index__", "__complex__", "tolist", "numpy",
    "__array__", "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive",
    "bincount", "equal", "allclose", "is_nonzero", "__contains__", "histc", "histogram",
    "nonzero_static",
})  # fmt: skip

#: operators that read no value (metadata, printing, gradient bookkeeping)
_NO_VALUES = frozenset({
    "get:shape", "get:dtype", "get:device", "get:requires_grad", "get:is_leaf", "get:grad_fn",
    "get:ndim", "get:layout", "get:is_cuda", "get:names", "get:_base", "get:is_sparse",
    "get:is_quantized", "get:is_meta", "get:output_nr", "get:_version", "size", "dim", "numel",
    "stride", "is_contiguous", "element_size", "is_floating_point", "is_complex", "nelement",
    "ndimension", "get_device", "data_ptr", "storage_offset", "untyped_storage", "__len__",
    "__hash__", "__repr__", "__str__", "__format__", "retain_grad", "register_hook",
    "requires_grad", "_is_view", "is_shared", "is_pinned", "has_names", "dim_order",
    "is_inference", "is_signed", "__dlpack_device__",
})  # fmt: skip
#: operators that read no value of a tensor (its shape, dtype, ...; hooks, printing)
NO_VALUES = _NO_VALUES


# --------------------------------------------------------------------------- rules
@dataclass
class Call:
    """One call as a rule sees it: the boxes of its tensor arguments for one source."""

    func: Callable
    name: str
    args: tuple
    kwargs: dict
    result: Any
    box: Callable
    k: int
    analysis: Analysis

    @property
    def out(self) -> torch.Tensor:
        outs = _tensors(self.result)
        return outs[0]

    def arg(self, index: int, key: str, default=None):
        if len(self.args) > index:
            return self.args[index]
        return self.kwargs.get(key, default)

    def box_or_empty(self, t) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise Unknown(f"{self.name}: expected a tensor")
        b = self.box(t)
        return b if b is not None else _empty(self.k, t.shape, t.device)

    def value_dependent(self) -> None:
        self.analysis.value_dependent.append(self.name)


def _pointwise(call: Call):
    outs = _tensors(call.result)
    inputs = [call.box(t) for t in _tensors((call.args, call.kwargs))]
    inputs = [b for b in inputs if b is not None]
    return [union(inputs, t.shape, call.k, t.device) for t in outs]


def _broadcast_tensors(call: Call):
    """Each output is its own input expanded: its box only, broadcast."""
    inputs = _tensors((call.args, call.kwargs))
    return [None if call.box(x) is None else broadcast_box(call.box(x), t.shape)
            for x, t in zip(inputs, _tensors(call.result))]  # fmt: skip


def _fresh(call: Call):
    return [None for _ in _tensors(call.result)]


def _norm_dims(dims, nd: int) -> list[int]:
    if dims is None:
        return list(range(nd))
    if isinstance(dims, int):
        dims = [dims]
    return [d % nd for d in dims] if nd else []


def _reduce_rule(position: int, default=None):
    """Union over the dims the op reduces (argument ``position`` or ``dim``; all if absent),
    fitted to every output (dims kept, or removed)."""

    def rule(call: Call):
        x = call.args[0]
        dims = call.arg(position, "dim", default)
        if isinstance(dims, torch.Tensor):  # torch.max(a, b): elementwise
            return _pointwise(call)
        if not isinstance(dims, (int, tuple, list, type(None))):
            raise Unknown(f"{call.name}: dim {dims!r}")
        box = call.box_or_empty(x)
        dims = _norm_dims(dims, x.dim())
        reduced = box.amax([d + 1 for d in dims], keepdim=True) if dims else box
        return [_fit(reduced, dims, x.dim(), t.shape) for t in _tensors(call.result)]

    return rule


def _fit(reduced: torch.Tensor, dims, nd: int, shape) -> torch.Tensor:
    """A keepdim reduction's box made to fit an output: the same rank (dims kept, as
    ``keepdim`` or ``softmax``), the rank without ``dims``, or else the union of all."""
    k = reduced.shape[0]
    if len(shape) == nd:
        return reduced.expand((k, *shape))
    if len(shape) == nd - len(dims):
        return reduced.squeeze([d + 1 for d in dims]).reshape((k, *shape)) if dims else reduced
    total = reduced.reshape(k, -1).amax(1)
    return total.reshape((k,) + (1,) * len(shape)).expand((k, *shape))


def _all_rule(call: Call):
    return _reduce_rule(99, None)(call)


def _reshape(call: Call):
    return [
        call.box_or_empty(call.args[0]).reshape((call.k, *t.shape)) for t in _tensors(call.result)
    ]


def _shift(d: int, nd: int) -> int:
    return d % nd + 1


def _permute(call: Call):
    x = call.args[0]
    nd = x.dim()
    if call.name in ("permute",):
        dims = (
            call.args[1:] if len(call.args) > 2 or isinstance(call.args[1], int) else call.args[1]
        )
        order = [0] + [_shift(d, nd) for d in dims]
        return call.box_or_empty(x).permute(order)
    if call.name in ("transpose", "swapaxes", "swapdims"):
        a, b = call.arg(1, "dim0"), call.arg(2, "dim1")
        return call.box_or_empty(x).transpose(_shift(a, nd), _shift(b, nd))
    if call.name in ("t", "get:T"):
        return call.box_or_empty(x).permute([0, *range(nd, 0, -1)])
    if call.name == "get:mT":
        return call.box_or_empty(x).transpose(-1, -2)
    if call.name == "movedim":
        src, dst = call.arg(1, "source"), call.arg(2, "destination")
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        return call.box_or_empty(x).movedim(
            [_shift(s, nd) for s in src], [_shift(d, nd) for d in dst]
        )
    raise Unknown(call.name)


def _index_tuple(index) -> tuple:
    return index if isinstance(index, tuple) else (index,)


def _getitem(call: Call):
    x, index = call.args[0], call.args[1]
    items = _index_tuple(index)
    for item in items:
        if isinstance(item, torch.Tensor):
            if call.box(item) is not None:
                raise Unknown("an index computed from the map")
            call.value_dependent()
        elif isinstance(item, (list,)):
            call.value_dependent()
    return call.box_or_empty(x)[(slice(None), *items)]


def _dim_op(method: str, dim_position: int, dim_key: str = "dim", default=0):
    def rule(call: Call):
        x = call.args[0]
        dim = call.arg(dim_position, dim_key, default)
        rest = [a for i, a in enumerate(call.args[1:], 1) if i != dim_position]
        kwargs = {k: v for k, v in call.kwargs.items() if k != dim_key}
        shifted = _shift(dim, x.dim())
        if method in ("narrow", "select", "index_select"):
            return getattr(call.box_or_empty(x), method)(shifted, *rest, **kwargs)
        return getattr(call.box_or_empty(x), method)(*rest, **kwargs, dim=shifted)

    return rule


def _index_select(call: Call):
    x, dim, index = call.args[0], call.arg(1, "dim"), call.arg(2, "index")
    if call.box(index) is not None:
        raise Unknown("an index computed from the map")
    call.value_dependent()
    return call.box_or_empty(x).index_select(_shift(dim, x.dim()), index)


def _gather(call: Call):
    x, dim, index = call.args[0], call.arg(1, "dim"), call.arg(2, "index")
    if call.box(index) is not None:
        raise Unknown("an index computed from the map")
    call.value_dependent()
    index = index.unsqueeze(0).expand((call.k, *index.shape))
    return call.box_or_empty(x).gather(_shift(dim, x.dim()), index)


def _cat(call: Call):
    tensors = call.arg(0, "tensors")
    dim = call.arg(1, "dim", 0)
    boxes = [call.box_or_empty(t) for t in tensors]
    if call.name == "stack":
        return torch.stack(boxes, dim % (tensors[0].dim() + 1) + 1)
    nonempty = [(t, b) for t, b in zip(tensors, boxes) if not (t.dim() == 1 and t.numel() == 0)]
    return torch.cat([b for _, b in nonempty], _shift(dim, nonempty[0][0].dim()))


def _split(call: Call):
    x = call.args[0]
    dim = call.arg(2, "dim", 0)
    return list(getattr(call.box_or_empty(x), call.name)(call.args[1], dim=_shift(dim, x.dim())))


def _unbind(call: Call):
    x = call.args[0]
    return list(call.box_or_empty(x).unbind(_shift(call.arg(1, "dim", 0), x.dim())))


def _flip(call: Call):
    x = call.args[0]
    dims = call.arg(1, "dims")
    dims = [dims] if isinstance(dims, int) else list(dims)
    return call.box_or_empty(x).flip([_shift(d, x.dim()) for d in dims])


def _roll(call: Call):
    x = call.args[0]
    shifts, dims = call.arg(1, "shifts"), call.arg(2, "dims", None)
    box = call.box_or_empty(x)
    if dims is None:
        return box.reshape(call.k, -1).roll(shifts, 1).reshape(box.shape)
    dims = [dims] if isinstance(dims, int) else list(dims)
    return box.roll(shifts, [_shift(d, x.dim()) for d in dims])


def _repeat(call: Call):
    x = call.args[0]
    reps = call.args[1:] if len(call.args) > 2 or isinstance(call.args[1], int) else call.args[1]
    reps = list(reps)
    if call.name == "tile" and len(reps) < x.dim():
        reps = [1] * (x.dim() - len(reps)) + reps
    box = call.box_or_empty(x)
    box = box.reshape((call.k,) + (1,) * (len(reps) - x.dim()) + tuple(x.shape))
    return box.repeat(1, *reps)


def _pad(call: Call):
    x, pad = call.args[0], call.arg(1, "pad")
    mode = call.arg(2, "mode", "constant")
    box = call.box_or_empty(x)
    if mode == "constant":
        return F.pad(box, list(pad), value=NEG)
    spatial = len(pad) // 2
    lead = box.shape[: box.dim() - spatial - 1]
    flat = box.reshape((-1,) + tuple(box.shape[box.dim() - spatial - 1 :]))
    got = F.pad(flat, list(pad), mode=mode)
    return got.reshape(tuple(lead) + tuple(got.shape[1:]))


def _window_max(box: torch.Tensor, kernel, stride, padding, dilation, out_size) -> torch.Tensor:
    """Union over each output's window ``[o*s - p, o*s - p + (k-1)*d]`` (stepping by ``d``)
    in the last ``len(kernel)`` dims: max-pooling the box padded with -inf, to the output
    size the real op produced (so ``ceil_mode`` and any padding are exact)."""
    nd = len(kernel)
    lead = box.shape[: box.dim() - nd]
    spatial = tuple(box.shape[box.dim() - nd :])
    pads = []
    for i in reversed(range(nd)):
        right = (
            (out_size[i] - 1) * stride[i]
            + (kernel[i] - 1) * dilation[i]
            - padding[i]
            - (spatial[i] - 1)
        )
        pads += [padding[i], right]
    padded = F.pad(box.reshape((-1, 1) + spatial), pads, value=NEG)
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
    got = pool(padded, tuple(kernel), tuple(stride), 0, tuple(dilation))
    index = tuple(slice(0, o) for o in out_size)
    got = got[(slice(None), slice(None)) + index]
    return got.reshape(tuple(lead) + tuple(out_size))


def _tuple(value, nd: int) -> tuple:
    if isinstance(value, int):
        return (value,) * nd
    value = tuple(value)
    return value * nd if len(value) == 1 else value


def _conv(call: Call):
    nd = int(call.name[-2]) if call.name[-1] == "d" else 2
    x, weight = call.args[0], call.arg(1, "weight")
    bias = call.arg(2, "bias")
    transposed = "transpose" in call.name
    if transposed:
        stride, padding = _tuple(call.arg(3, "stride", 1), nd), call.arg(4, "padding", 0)
        groups, dilation = call.arg(6, "groups", 1), _tuple(call.arg(7, "dilation", 1), nd)
    else:
        stride, padding = _tuple(call.arg(3, "stride", 1), nd), call.arg(4, "padding", 0)
        dilation, groups = _tuple(call.arg(5, "dilation", 1), nd), call.arg(6, "groups", 1)
    out = call.out
    batched = x.dim() == nd + 2
    box = call.box_or_empty(x)
    if not batched:
        box = box.unsqueeze(1)
    k, n, c = box.shape[0], box.shape[1], box.shape[2]
    kernel = tuple(weight.shape[2:])
    out_size = tuple(out.shape[-nd:])
    per_group = box.reshape((k, n, groups, c // groups) + tuple(box.shape[3:])).amax(3)
    if transposed:
        spatial = _transposed_window(
            per_group, kernel, stride, _tuple(padding, nd), dilation, out_size
        )
        out_per_group = weight.shape[1]
    else:
        if isinstance(padding, str):
            padding = (0,) * nd if padding == "valid" else tuple(
                (d * (kk - 1)) // 2 for d, kk in zip(dilation, kernel))  # fmt: skip
        spatial = _window_max(per_group, kernel, stride, _tuple(padding, nd), dilation, out_size)
        out_per_group = weight.shape[0] // groups
    spatial = spatial.unsqueeze(3).expand((k, n, groups, out_per_group) + out_size)
    result = spatial.reshape((k, n, groups * out_per_group) + out_size)
    for param, channel_dim in ((weight, 1 if transposed else 0), (bias, 0)):
        pbox = call.box(param) if isinstance(param, torch.Tensor) else None
        if pbox is not None:
            per_channel = (
                pbox.amax([d + 1 for d in range(param.dim()) if d != channel_dim])
                if param.dim() > 1
                else pbox
            )
            per_channel = per_channel.reshape(k, -1)
            if per_channel.shape[1] != result.shape[2]:
                per_channel = per_channel.amax(1, keepdim=True)
            result = torch.maximum(result, per_channel.reshape((k, 1, -1) + (1,) * nd))
    return result if batched else result[:, 0]


def _transposed_window(box, kernel, stride, padding, dilation, out_size) -> torch.Tensor:
    """Output ``o`` of a transposed conv gets input ``i`` iff ``o = i*s - p + j*d`` for a
    kernel tap ``j``: stuff ``s - 1`` empties between inputs, then a stride-1 window of
    ``k`` taps dilated by ``d`` that ends at ``o + p``."""
    nd = len(kernel)
    lead = box.shape[: box.dim() - nd]
    spatial = tuple(box.shape[box.dim() - nd :])
    stuffed_shape = tuple((n - 1) * s + 1 for n, s in zip(spatial, stride))
    stuffed = torch.full(tuple(lead) + stuffed_shape, NEG, dtype=box.dtype, device=box.device)
    stuffed[(Ellipsis,) + tuple(slice(None, None, s) for s in stride)] = box
    # a window over stuffed positions [o + p - (k-1)d, o + p]: padding (k-1)d - p on the left
    left = tuple((kk - 1) * d - p for kk, d, p in zip(kernel, dilation, padding))
    pads = []
    for i in reversed(range(nd)):
        pads += [left[i], 0]
    shifted = F.pad(stuffed.reshape((-1,) + stuffed_shape), pads, value=NEG)
    return _window_max(shifted.reshape(tuple(lead) + tuple(shifted.shape[1:])), kernel,
                       (1,) * nd, (0,) * nd, dilation, out_size)  # fmt: skip


def _pool(call: Call):
    name = call.name
    nd = int(name[-2])
    x = call.args[0]
    if name.startswith("lp_pool"):
        kernel = _tuple(call.arg(2, "kernel_size"), nd)
        stride = call.arg(3, "stride", None)
        padding, dilation = (0,) * nd, (1,) * nd
    else:
        kernel = _tuple(call.arg(1, "kernel_size"), nd)
        stride = call.arg(2, "stride", None)
        padding = _tuple(call.arg(3, "padding", 0), nd)
        dilation = _tuple(call.arg(4, "dilation", 1), nd) if name.startswith("max") else (1,) * nd
    stride = kernel if stride is None or stride == [] or stride == () else _tuple(stride, nd)
    out = call.out
    box = _window_max(
        call.box_or_empty(x), kernel, stride, padding, dilation, tuple(out.shape[-nd:])
    )
    return box


def _adaptive(call: Call):
    nd = int(call.name[-2])
    x = call.args[0]
    box = call.box_or_empty(x)
    out_size = tuple(call.out.shape[-nd:])
    for i, o in enumerate(out_size):
        dim = box.dim() - nd + i
        size = box.shape[dim]
        parts = [box.narrow(dim, (j * size) // o, -((-(j + 1) * size) // o) - (j * size) // o)
                 .amax(dim, keepdim=True) for j in range(o)]  # fmt: skip
        box = torch.cat(parts, dim)
    return box


def _interpolate(call: Call):
    x = call.args[0]
    mode = call.arg(3, "mode", "nearest")
    nd = x.dim() - 2
    out_size = tuple(call.out.shape[-nd:])
    box = call.box_or_empty(x)
    flat = box.reshape((-1,) + tuple(x.shape[1:]))
    if call.arg(6, "antialias", False):
        raise Unknown("interpolate with antialias")
    if mode in ("nearest", "nearest-exact"):
        kwargs = {key: v for key, v in call.kwargs.items() if key != "input"}
        got = F.interpolate(flat, *call.args[1:], **kwargs)
        return got.reshape((call.k,) + tuple(call.out.shape))
    if mode == "area":
        return _adaptive(
            Call(
                call.func,
                f"adaptive_avg_pool{nd}d",
                (x,),
                {},
                call.result,
                call.box,
                call.k,
                call.analysis,
            )
        )
    taps = 2 if mode == "bicubic" else 1
    radius = [taps + math.ceil(i / o) + 1 for i, o in zip(x.shape[2:], out_size)]
    kernel = tuple(2 * r + 1 for r in radius)
    grown = _window_max(flat, kernel, (1,) * nd, tuple(radius), (1,) * nd, tuple(x.shape[2:]))
    got = F.interpolate(grown, size=out_size, mode="nearest")
    return got.reshape((call.k,) + tuple(call.out.shape))


def _matmul(call: Call):
    a, b = call.args[0], call.arg(1, "other", call.kwargs.get("mat2"))
    if call.name == "rmatmul":
        a, b = b, a
    if a.dim() < 2 or b.dim() < 2:
        raise Unknown("matmul of a vector")
    out = call.out
    boxes = []
    if call.box(a) is not None:
        boxes.append(call.box(a).amax(-1, keepdim=True))
    if call.box(b) is not None:
        boxes.append(call.box(b).amax(-2, keepdim=True))
    return union(boxes, out.shape, call.k, out.device)


def _linear(call: Call):
    x, weight, bias = call.args[0], call.arg(1, "weight"), call.arg(2, "bias")
    out = call.out
    boxes = []
    if call.box(x) is not None:
        boxes.append(call.box(x).amax(-1, keepdim=True))
    if call.box(weight) is not None:
        boxes.append(
            call.box(weight).amax(-1)
            if weight.dim() == 2
            else call.box(weight).amax(-1, keepdim=True)
        )
    if isinstance(bias, torch.Tensor) and call.box(bias) is not None:
        boxes.append(call.box(bias))
    return union(boxes, out.shape, call.k, out.device)


def _norm_layer(call: Call):
    name, x = call.name, call.args[0]
    box = call.box_or_empty(x)
    params = _tensors((call.args[1:], call.kwargs))
    if any(call.box(p) is not None for p in params):
        raise Unknown(f"{name} with parameters computed from the map")
    if name == "batch_norm":
        training = call.arg(5, "training", False)
        stats = call.arg(1, "running_mean") is None or training
        dims = [d for d in range(x.dim()) if d != 1] if stats else []
    elif name == "instance_norm":
        dims = list(range(2, x.dim())) if call.arg(5, "use_input_stats", True) else []
    elif name == "layer_norm":
        shape = call.arg(1, "normalized_shape")
        shape = [shape] if isinstance(shape, int) else list(shape)
        dims = list(range(x.dim() - len(shape), x.dim()))
    elif name == "group_norm":
        groups = call.arg(1, "num_groups")
        k, n = box.shape[0], x.shape[0]
        grouped = box.reshape(k, n, groups, -1).amax(-1, keepdim=True)
        return grouped.expand(k, n, groups, x[0].numel() // groups).reshape(box.shape)
    elif name == "normalize":
        dims = [call.arg(2, "dim", 1)]
    else:
        raise Unknown(name)
    if not dims:
        return box
    return box.amax([d % x.dim() + 1 for d in dims], keepdim=True).expand(box.shape)


def _in_place_box(name, args, kwargs, box_of_arg, k, target) -> torch.Tensor:
    """The box of ``target`` after an in-place op: the union of its old box and what is
    written (pointwise ops, ``copy_``, ``fill_``, ``__setitem__``); others are unknown."""
    old = box_of_arg(target)
    old = old if old is not None else _empty(k, target.shape, target.device)
    if name == "setitem":
        index, value = args[1], args[2]
        for item in _index_tuple(index):
            if isinstance(item, torch.Tensor) and box_of_arg(item) is not None:
                raise Unknown("an index computed from the map")
        written = old.clone()
        if isinstance(value, torch.Tensor) and box_of_arg(value) is not None:
            region = written[(slice(None), *_index_tuple(index))]
            written[(slice(None), *_index_tuple(index))] = broadcast_box(
                box_of_arg(value), region.shape[1:]
            )
        return torch.maximum(old, written)
    if name in POINTWISE or name in ("copy", "fill", "zero", "requires_grad", "detach"):
        others = [box_of_arg(t) for t in _tensors((args, kwargs)) if t is not target]
        return union([old] + [b for b in others if b is not None], target.shape, k, target.device)
    raise Unknown(f"in-place {name} on a tensor computed from the map")


POINTWISE = frozenset({
    # arithmetic and comparisons (dunders included after op_name)
    "add", "sub", "rsub", "mul", "div", "truediv", "rtruediv", "rdiv", "floordiv", "rfloordiv",
    "mod", "rmod", "pow", "rpow", "neg", "pos", "abs", "invert", "and", "or", "xor", "lshift",
    "rshift", "lt", "le", "gt", "ge", "eq", "ne", "negative", "positive", "subtract",
    "multiply", "divide", "true_divide", "floor_divide", "remainder", "fmod", "float_power",
    "absolute", "reciprocal", "square", "sqrt", "rsqrt", "exp", "exp2", "expm1", "log",
    "log2", "log10", "log1p", "sin", "cos", "tan", "asin", "acos", "atan", "atan2", "arctan2",
    "sinh", "cosh", "tanh", "asinh", "acosh", "atanh", "sigmoid", "logit", "erf", "erfc",
    "erfinv", "lgamma", "digamma", "polygamma", "mvlgamma", "i0", "sign", "sgn", "signbit",
    "floor", "ceil", "round", "trunc", "frac", "clamp", "clip", "clamp_min", "clamp_max",
    "minimum", "maximum", "fmin", "fmax", "where", "masked_fill", "lerp", "addcmul", "addcdiv",
    "hypot", "logaddexp", "logaddexp2", "xlogy", "copysign", "nextafter", "heaviside",
    "isfinite", "isinf", "isnan", "isposinf", "isneginf", "isreal", "logical_and",
    "logical_or", "logical_xor", "logical_not", "bitwise_and", "bitwise_or", "bitwise_xor",
    "bitwise_not", "greater", "greater_equal", "less", "less_equal", "equal_", "not_equal",
    "nan_to_num", "tril", "triu", "square_", "conj", "real", "imag", "angle", "deg2rad",
    "rad2deg", "sinc", "special_expit", "expit", "softplus", "relu", "relu6", "leaky_relu",
    "elu", "selu", "celu", "gelu", "silu", "mish", "hardtanh", "hardswish", "hardsigmoid",
    "softsign", "tanhshrink", "threshold", "rrelu", "prelu", "logsigmoid", "softshrink",
    "hardshrink", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
    "feature_alpha_dropout", "bernoulli", "normal", "poisson", "to", "type", "type_as", "float",
    "double", "half", "bfloat16", "int", "long", "bool", "byte", "short", "char", "cpu",
    "cuda", "contiguous", "clone", "detach", "get:data", "get:real", "expand", "expand_as",
    "broadcast_to", "requires_grad", "as_subclass", "new_tensor_",
    "atleast_1d", "atleast_2d", "atleast_3d", "sigmoid_", "copy", "fill", "masked_scatter_",
    "exp_", "log_", "true_divide_", "positive_", "sqrt_", "absolute_", "nan_to_num_",
})  # fmt: skip

RULES: dict[str, Callable[[Call], Any]] = {name: _pointwise for name in POINTWISE}
RULES["broadcast_tensors"] = _broadcast_tensors
RULES.update({n: _fresh for n in ("zeros_like", "ones_like", "empty_like", "full_like",
                                  "rand_like", "randn_like", "randint_like", "new_zeros",
                                  "new_ones", "new_empty", "new_full")})  # fmt: skip
RULES.update({n: _reshape for n in ("view", "reshape", "view_as", "reshape_as", "flatten",
                                    "unflatten", "squeeze", "unsqueeze", "ravel")})  # fmt: skip
RULES.update({n: _permute for n in ("permute", "transpose", "swapaxes", "swapdims", "t",
                                    "get:T", "get:mT", "movedim")})  # fmt: skip
RULES.update({
    "getitem": _getitem, "__getitem__": _getitem, "narrow": _dim_op("narrow", 1),
    "select": _dim_op("select", 1), "index_select": _index_select, "gather": _gather,
    "take_along_dim": _gather, "cat": _cat, "concat": _cat, "concatenate": _cat, "stack": _cat,
    "split": _split, "chunk": _split, "tensor_split": _split, "unbind": _unbind, "flip": _flip,
    "roll": _roll, "repeat": _repeat, "tile": _repeat, "pad": _pad,
    "sum": _reduce_rule(1), "mean": _reduce_rule(1), "nansum": _reduce_rule(1),
    "nanmean": _reduce_rule(1), "prod": _reduce_rule(1), "amax": _reduce_rule(1),
    "amin": _reduce_rule(1), "max": _reduce_rule(1), "min": _reduce_rule(1),
    "logsumexp": _reduce_rule(1), "var": _reduce_rule(1), "std": _reduce_rule(1),
    "var_mean": _reduce_rule(1), "std_mean": _reduce_rule(1), "all": _reduce_rule(1),
    "any": _reduce_rule(1), "argmax": _reduce_rule(1), "argmin": _reduce_rule(1),
    "aminmax": _all_rule, "_is_all_true": _all_rule, "_is_any_true": _all_rule,
    "median": _reduce_rule(1), "nanmedian": _reduce_rule(1),
    "count_nonzero": _reduce_rule(1), "norm": _reduce_rule(2), "softmax": _reduce_rule(1, -1),
    "log_softmax": _reduce_rule(1, -1), "softmin": _reduce_rule(1, -1),
    "cumsum": _reduce_rule(1), "cumprod": _reduce_rule(1), "logcumsumexp": _reduce_rule(1),
    "cummax": _reduce_rule(1), "cummin": _reduce_rule(1), "sort": _reduce_rule(1, -1),
    "argsort": _reduce_rule(1, -1), "topk": _reduce_rule(2, -1), "kthvalue": _reduce_rule(2, -1),
    "mode": _reduce_rule(1, -1), "msort": _reduce_rule(99, 0),
    "conv1d": _conv, "conv2d": _conv, "conv3d": _conv, "conv_transpose1d": _conv,
    "conv_transpose2d": _conv, "conv_transpose3d": _conv,
    "max_pool1d": _pool, "max_pool2d": _pool, "max_pool3d": _pool, "avg_pool1d": _pool,
    "avg_pool2d": _pool, "avg_pool3d": _pool, "lp_pool1d": _pool, "lp_pool2d": _pool,
    "lp_pool3d": _pool, "max_pool1d_with_indices": _pool, "max_pool2d_with_indices": _pool,
    "max_pool3d_with_indices": _pool, "adaptive_avg_pool1d": _adaptive,
    "adaptive_avg_pool2d": _adaptive, "adaptive_avg_pool3d": _adaptive,
    "adaptive_max_pool1d": _adaptive, "adaptive_max_pool2d": _adaptive,
    "adaptive_max_pool3d": _adaptive, "interpolate": _interpolate, "upsample": _interpolate,
    "matmul": _matmul, "rmatmul": _matmul, "mm": _matmul, "bmm": _matmul, "linear": _linear,
    "batch_norm": _norm_layer, "instance_norm": _norm_layer, "layer_norm": _norm_layer,
    "group_norm": _norm_layer, "normalize": _norm_layer,
})  # fmt: skip
for _name in _NO_VALUES:
    RULES[_name] = _fresh


