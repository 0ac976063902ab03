"""BPDA (Athalye et al. 2018), automatically: zero-gradient operations become the identity on the backward
pass only.

Rounding and its relatives (``round``, ``floor``, ``ceil``, ``trunc``, ``sign``) have a zero or undefined
derivative everywhere, so a model that quantises its input hides its gradients from every gradient attack.
:func:`straight_through` captures the model's graph with ``torch.export`` (an exported ``.pt2`` program is
used as it is), and replaces each such operation by one that computes exactly the same forward value and
passes the incoming gradient through unchanged (straight-through). Forward outputs are bit-identical;
every adversarial point is still verified on the original model by the runner.

:func:`zero_gradient_ops` lists the operations found, for the alarm's message.

TorchScript archives cannot be captured by ``torch.export``; for them the same operations get a
straight-through *autograd kernel* in the dispatcher while the copy runs
(:class:`DispatcherStraightThrough`, with TorchScript's graph optimisation off, so the interpreter calls
the dispatcher's autograd kernels instead of its own symbolic derivatives). Step functions made
of a comparison — converted to numbers, or selecting in a ``where`` — get the identity derivative with
respect to the compared input, and so do values picked by an ``argmax``/``argmin`` index (nearest-level
quantisation) with respect to the index's same-shaped float input (``torch.export`` graphs and modules
only).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from robusteval.errors import UserError

_ATEN = torch.ops.aten
#: Operations whose derivative is zero almost everywhere.
ZERO_GRADIENT = {
    _ATEN.round.default: "round", _ATEN.floor.default: "floor", _ATEN.ceil.default: "ceil",
    _ATEN.trunc.default: "trunc", _ATEN.sign.default: "sign",
}  # fmt: skip


class _StraightThrough(torch.autograd.Function):
    """``op(x)`` forward, identity backward."""

    @staticmethod
    def forward(ctx, x, op):
        return op(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _replacement(op):
    def straight_through(x):
        return _StraightThrough.apply(x, op)

    straight_through.__name__ = f"straight_through_{ZERO_GRADIENT[op]}"
    return straight_through


#: Comparisons: a step function made of one (``(x > t).float()`` or ``where(x > t, a, b)``) is given the
#: identity derivative with respect to the compared input.
COMPARISONS = {getattr(_ATEN, op).Scalar for op in ("gt", "lt", "ge", "le")} | \
    {getattr(_ATEN, op).Tensor for op in ("gt", "lt", "ge", "le")}
_CONVERSIONS = {_ATEN.to.dtype, _ATEN._to_copy.default}
_WHERE = {_ATEN.where.self, _ATEN.where.ScalarSelf, _ATEN.where.ScalarOther, _ATEN.where.Scalar}


def _through(value: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``value`` forward (adding an exact zero), gradient passed to ``source`` unchanged."""
    return value + (source - source.detach())


_ARG_INDEX = {_ATEN.argmax.default, _ATEN.argmin.default}


def _shape(node) -> str | None:
    val = getattr(node, "meta", {}).get("val")
    return str(tuple(val.shape)) if isinstance(val, torch.Tensor) else None


def _is_float(node) -> bool:
    val = getattr(node, "meta", {}).get("val")
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def _nodes_in(args):
    for a in args:
        if isinstance(a, torch.fx.Node):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from _nodes_in(a)


def _float_ancestor(node, shape: str, depth: int = 6):
    """The nearest floating-point ancestor of ``node`` (itself included) with the given shape."""
    frontier = [node]
    for _ in range(depth):
        for n in frontier:
            if _is_float(n) and _shape(n) == shape:
                return n
        frontier = [a for n in frontier for a in _nodes_in(n.args)]
    return None


def _argmax_quantisers(gm: torch.fx.GraphModule) -> int:
    """Give every value picked by an ``argmax``/``argmin`` index (nearest-level quantisation) the identity
    derivative with respect to the nearest same-shaped float input of the index; returns how many."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not _is_float(node):
            continue
        index = next((a for a in _nodes_in(node.args) if a.target in _ARG_INDEX), None)
        source = _float_ancestor(index.args[0], _shape(node)) if index is not None else None
        if source is not None:
            count += _insert_through(gm, node, source)
    return count


def _insert_through(gm: torch.fx.GraphModule, node, source) -> int:
    """Route every use of ``node`` through :func:`_through` with ``source``; returns 1."""
    with gm.graph.inserting_after(node):
        new = gm.graph.call_function(_through, (node, source))
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    return 1


def _step_functions(gm: torch.fx.GraphModule) -> int:
    """Give every step function in the graph (a comparison converted to numbers, or selecting in a
    ``where``) the identity derivative with respect to the compared input; returns how many."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        cond = node.args[0]
        if node.target not in _CONVERSIONS | _WHERE or cond.target not in COMPARISONS:
            continue
        source = cond.args[0]
        shape = lambda n: tuple(n.meta["val"].shape) if "val" in getattr(n, "meta", {}) else None
        if isinstance(source, torch.fx.Node) and shape(source) is not None and shape(source) == shape(node):
            count += _insert_through(gm, node, source)
    return count


_NOTHING_TO_REPLACE = ("`bpda` found no zero-gradient operation (round, floor, ceil, trunc, sign) in the "
                       "model's graph; its gradients are hidden some other way")
_TORCHSCRIPT_NAMES = {f"aten::{name}": name for name in ZERO_GRADIENT.values()}


@contextlib.contextmanager
def _straight_through_kernels(ops: list[str]):
    """While active: ``aten.<op>`` for each name in ``ops`` has an identity derivative (all callers)."""
    lib = torch.library.Library("aten", "IMPL")
    by_name = {name: op for op, name in ZERO_GRADIENT.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a registered kernel": on purpose, undone below
        for name in ops:
            lib.impl(name, lambda x, op=by_name[name]: _BelowAutograd.apply(x, op), "Autograd")
    legacy = torch._C._jit_set_profiling_executor(False)
    optimize = torch._C._get_graph_executor_optimize()
    torch._C._set_graph_executor_optimize(False)  # no symbolic-derivative subgraphs: dispatcher kernels only
    try:
        yield
    finally:
        torch._C._set_graph_executor_optimize(optimize)
        torch._C._jit_set_profiling_executor(legacy)
        lib._destroy()


class _BelowAutograd(torch.autograd.Function):
    """``op(x)`` computed below the autograd key (the original kernel), identity backward."""

    @staticmethod
    def forward(ctx, x, op):
        with torch._C._AutoDispatchBelowAutograd():
            return op(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class DispatcherStraightThrough(nn.Module):
    """A TorchScript model run with straight-through autograd kernels for ``replaced``."""

    def __init__(self, model, replaced: list[str]):
        super().__init__()
        self.model, self.replaced = model, replaced
        self.training = False

    def train(self, mode: bool = True) -> DispatcherStraightThrough:
        self.training = mode
        return self

    def forward(self, x):
        with _straight_through_kernels(self.replaced):
            return self.model(x)


def _torchscript_ops(model) -> list[str]:
    graph = model.inlined_graph if hasattr(model, "inlined_graph") else model.graph
    return sorted({_TORCHSCRIPT_NAMES[n.kind()] for n in graph.nodes() if n.kind() in _TORCHSCRIPT_NAMES})


def _graph_module(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    from robusteval.models.checkpoints import ExportedModel

    if isinstance(model, ExportedModel):
        return model.program
    batch = torch.export.Dim("batch", min=1)
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except Exception as exc:  # noqa: BLE001 — export fails in many ways; the user gets one line
        raise UserError(f"`bpda` needs a model torch.export can capture ({str(exc).splitlines()[0][:120]})") \
            from None
    return program.module()


def zero_gradient_ops(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the zero-gradient operations in the model's graph (empty when it cannot be captured)."""
    if isinstance(model, torch.jit.ScriptModule):
        return _torchscript_ops(model)
    try:
        gm = _graph_module(model, example)
    except UserError:
        return []
    names = {ZERO_GRADIENT[n.target] for n in gm.graph.nodes
             if n.op == "call_function" and n.target in ZERO_GRADIENT}
    steps = any(n.op == "call_function" and n.target in _CONVERSIONS | _WHERE and n.args
                and getattr(n.args[0], "target", None) in COMPARISONS for n in gm.graph.nodes)
    picks = any(n.op == "call_function" and _is_float(n)
                and any(a.target in _ARG_INDEX for a in _nodes_in(n.args)) for n in gm.graph.nodes)
    kinds = {"comparison"} if steps else set()
    return sorted(names | kinds | ({"argmax-quantisation"} if picks else set()))


class StraightThroughModel(nn.Module):
    """The rewritten graph; ``replaced`` names the operations that pass gradients straight through."""

    def __init__(self, gm: torch.fx.GraphModule, replaced: list[str]):
        super().__init__()
        self.graph_module, self.replaced = gm, replaced
        for m in gm.modules():
            object.__setattr__(m, "training", False)
        self.training = False

    def train(self, mode: bool = True) -> StraightThroughModel:
        self.training = mode  # the captured graph's behaviour was fixed when it was captured (eval mode)
        return self

    def forward(self, x):
        return self.graph_module(x)


def straight_through(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """The model with every zero-gradient operation straight-through on the backward pass.

    ``example`` is a batch of inputs used to capture the graph (in eval mode). Raises a
    :class:`UserError` when the graph cannot be captured or contains no such operation.
    """
    import copy

    from robusteval.runtime import eval_mode

    if isinstance(model, torch.jit.ScriptModule):
        ops = _torchscript_ops(model)
        if not ops:
            raise UserError(_NOTHING_TO_REPLACE)
        return DispatcherStraightThrough(model, ops)
    with eval_mode(model):
        gm = copy.deepcopy(_graph_module(model, example))
    replaced = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in ZERO_GRADIENT:
            replaced.append(ZERO_GRADIENT[node.target])
            node.target = _replacement(node.target)
    if _step_functions(gm):
        replaced.append("comparison")
    if _argmax_quantisers(gm):
        replaced.append("argmax-quantisation")
    if not replaced:
        raise UserError(_NOTHING_TO_REPLACE)
    gm.recompile()
    return StraightThroughModel(gm, sorted(set(replaced)))
