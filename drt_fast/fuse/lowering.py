"""Reading a traced member as a chain of affine layers and elementwise activations, and
computing each run of affine layers as one dense matrix (`drt_fast.fuse.dense_for_inference`).

A member lowers when each layer takes the previous layer's output (and constants) only, is
affine (convolutions, linear layers, normalization, eval BatchNorm, average pooling,
padding, reshapes, arithmetic with constants) or elementwise, and keeps the draws of a
batch apart (`layer_chain`). A run of affine layers between two activations becomes one
matrix where that is cheap: at most `DENSE_MAX_ENTRIES` entries and at most
`DENSE_MAX_WASTE` times the multiply-adds of the layers it replaces, since the zeros of a
convolution's matrix are computed too (`matrix_runs`; how these limits were chosen:
bench/RESULTS.md, "Member rewrites"). Its matrix is the run applied, in float64, to the
unit vectors, its bias the run applied to zero (`lower_runs`).
"""
from __future__ import annotations

import math
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..models.normalize import NormalizeLayer
from .common import NotLowered, node_shape

DENSE_MAX_ENTRIES = 2**18   # entries of one matrix (1 MiB in fp32: it stays in cache)
DENSE_MAX_WASTE = 8         # matrix entries per multiply-add of the layers it replaces

_AFFINE_MODULES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ZeroPad2d,
)
# Modules and calls that leave a row's flat (C-order) values as they are, in eval mode.
_FLAT_NOOP_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d,
                      nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_FLAT_NOOP_FUNCTIONS = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze)
_FLAT_NOOP_METHODS = ("view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze")
_AFFINE_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d, F.linear, F.avg_pool1d, F.avg_pool2d,
                     F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                     F.adaptive_avg_pool3d, F.pad, torch.permute, torch.transpose)
_AFFINE_METHODS = ("permute", "transpose")
# x + c, x - c, c - x, x * c, c * x, x / c, -x with c a constant (a number or an attribute)
_ARITHMETIC = {operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
               operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div",
               operator.neg: "neg", torch.neg: "neg"}
_ARITHMETIC_METHODS = {"add": "add", "sub": "sub", "mul": "mul", "div": "div", "neg": "neg"}

_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
                nn.Softplus, nn.Softsign)
_ACT_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu,
                  F.celu, F.gelu, F.silu, F.mish, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
                  F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus, F.softsign)
_ACT_METHODS = ("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_")
# call_function / call_method targets by kind: no-op, ReLU, other activation, affine, and
# arithmetic (affine with a constant operand, see `_arithmetic`).
_CALL_KINDS = {
    "call_function": (_FLAT_NOOP_FUNCTIONS, (F.relu, torch.relu, torch.relu_), _ACT_FUNCTIONS,
                      _AFFINE_FUNCTIONS, _ARITHMETIC),
    "call_method": (_FLAT_NOOP_METHODS, ("relu", "relu_"), _ACT_METHODS, _AFFINE_METHODS,
                    _ARITHMETIC_METHODS),
}


class LeafTracer(fx.Tracer):
    """torch.fx's tracer, with our input normalization kept as one (affine) module."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, NormalizeLayer) or super().is_leaf_module(m, qualname)


def graph_input(gm: fx.GraphModule) -> fx.Node:
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise NotLowered(f"it takes {len(inputs)} inputs, not one")
    return inputs[0]


def layer_chain(gm: fx.GraphModule) -> list:
    """The member's layers in order as ``(kind, node)`` (kinds of `_kind`); raises
    `NotLowered` unless each layer takes the previous layer's output (and constants) only,
    is affine or elementwise, and keeps the draws of a batch apart."""
    modules = dict(gm.named_modules())
    current = graph_input(gm)
    chain = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        if node.op == "output":
            if node.args[0] is not current:
                raise NotLowered("its output is not the last layer's tensor")
            break
        if node_shape(node) is None:          # x.size(0), x.shape, x.dtype: metadata, no data
            continue
        data = []                          # tensor arguments that are not constants
        fx.node.map_arg((node.args, node.kwargs), lambda a: data.append(a)
                        if a.op != "get_attr" and node_shape(a) is not None else None)
        users = [u for u in current.users if u.op == "output" or node_shape(u) is not None]
        if data != [current] or users != [node]:
            raise NotLowered(f"it is not a chain of layers (at {node.name}: a branch, "
                             f"skip connection or second input)")
        kind = _kind(node, modules)
        if kind is None:
            raise NotLowered(f"{_describe(node, modules)} is neither affine nor elementwise")
        if node_shape(node)[0] != node_shape(current)[0]:
            raise NotLowered(f"{_describe(node, modules)} mixes the draws of a batch")
        chain.append((kind, node))
        current = node
    return chain


def _describe(node: fx.Node, modules: dict) -> str:
    if node.op == "call_module":
        return f"layer {node.target} ({type(modules[node.target]).__name__})"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
    return f"{target}()" + ("" if node.name == target else f" at {node.name}")


def _kind(node: fx.Node, modules: dict) -> Optional[str]:
    """"noop" (flat values unchanged), "affine", "relu", "act" (elementwise) or None."""
    if node.op == "call_module":
        mod = modules[node.target]
        if isinstance(mod, _FLAT_NOOP_MODULES):
            return "noop"
        if isinstance(mod, nn.ReLU):
            return "relu"
        if isinstance(mod, _ACT_MODULES):
            return "act"
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            # without running statistics a BatchNorm normalizes by the batch's: not affine
            return "affine" if mod.running_mean is not None else None
        if isinstance(mod, (_AFFINE_MODULES, NormalizeLayer)):
            return "affine"
        return None
    table = _CALL_KINDS.get(node.op)
    if table is None:
        return None
    *kinds, arithmetic = table
    for kind, targets in zip(("noop", "relu", "act", "affine"), kinds):
        if node.target in targets:
            return kind
    if node.target in arithmetic:
        return _arithmetic(arithmetic[node.target], node)
    return None


def _arithmetic(op: str, node: fx.Node) -> Optional[str]:
    """"affine" for x + c, x - c, c - x, x * c, c * x, x / c and -x (c constant), else None."""
    if node.kwargs:                       # alpha=, rounding_mode=, out=: not taken
        return None
    if op == "neg":
        return "affine" if len(node.args) == 1 else None
    if len(node.args) != 2:
        return None
    a = node.args[0]          # `layer_chain` made sure exactly one argument is the data
    data_first = isinstance(a, fx.Node) and a.op != "get_attr" and node_shape(a) is not None
    return None if op == "div" and not data_first else "affine"


def _macs(node: fx.Node, modules: dict) -> int:
    """Multiply-adds per row of one affine layer (1 per output value but for conv/linear)."""
    out = math.prod(node_shape(node)[1:])
    mod = modules.get(node.target) if node.op == "call_module" else None
    if isinstance(mod, nn.modules.conv._ConvNd):
        return out * (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
    if isinstance(mod, nn.Linear):
        return out * mod.in_features
    if node.op == "call_function" and node.target in (F.conv1d, F.conv2d, F.conv3d, F.linear):
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        shape = node_shape(weight) if isinstance(weight, fx.Node) else None
        if shape is not None:
            return out * math.prod(shape[1:])
    return out


def matrix_runs(gm: fx.GraphModule, chain: list) -> list:
    """``chain`` as steps ``("matrix", (start, end, n_in, n_out))`` -- a run of affine layers
    from ``start``'s output to ``end``'s, each within the cost limits -- and ``("relu" |
    "act", node)``; a run of flat no-ops is no step. Raises `NotLowered` on a costly run."""
    modules = dict(gm.named_modules())
    steps, run, start = [], [], graph_input(gm)
    for kind, node in chain + [("end", None)]:
        if kind in ("affine", "noop"):
            run.append((kind, node))
            continue
        if any(k == "affine" for k, _ in run):
            end = run[-1][1]
            n_in, n_out = math.prod(node_shape(start)[1:]), math.prod(node_shape(end)[1:])
            entries = n_in * n_out
            names = ", ".join(n.name for _, n in run)
            if entries > DENSE_MAX_ENTRIES:
                raise NotLowered(f"the layers {names} would be a {n_in}x{n_out} matrix "
                                 f"(more than {DENSE_MAX_ENTRIES:,} entries)")
            macs = sum(_macs(n, modules) for k, n in run if k == "affine")
            if entries > DENSE_MAX_WASTE * macs:
                raise NotLowered(f"the layers {names} would be a {n_in}x{n_out} matrix, "
                                 f"{entries / macs:.0f}x their {macs:,} multiply-adds "
                                 f"(limit {DENSE_MAX_WASTE}x)")
            steps.append(("matrix", (start, end, n_in, n_out)))
        if node is not None:
            steps.append((kind, node))
            start = node
        run = []
    return steps


def lower_runs(gm: fx.GraphModule, runs: list, pair: torch.Tensor, dtype: torch.dtype) -> list:
    """The `DenseMember` plan of the steps of `matrix_runs`. Each matrix is its run applied, in
    float64 (``gm`` is our copy: it is converted), to the unit vectors and to zero (the bias)."""
    modules = dict(gm.named_modules())
    gm.double()
    plan = []
    for kind, value in runs:
        if kind == "relu":
            plan.append(("relu", None))
        elif kind == "act":
            plan.append(("act", _act(value, modules)))
        else:
            start, end, n_in, n_out = value
            f64 = dict(dtype=torch.float64, device=pair.device)
            basis = torch.cat([torch.zeros(1, n_in, **f64),
                               torch.eye(n_in, **f64)]).view(n_in + 1, *node_shape(start)[1:])
            with torch.no_grad():
                out = _Probe(gm, start, basis, end).run(pair.double())
            out = out.reshape(n_in + 1, n_out)
            plan.append(("matrix", ((out[1:] - out[0]).to(dtype), out[0].to(dtype))))
    return plan


class _Probe(fx.Interpreter):
    """Runs the graph up to ``stop`` with ``start``'s output replaced by ``basis``; returns
    ``stop``'s output. (Its own loop: ending `fx.Interpreter.run` early by raising costs a
    traceback summary, about a second the first time in a process.)"""

    def __init__(self, gm, start, basis, stop):
        super().__init__(gm)
        self._start, self._basis, self._stop = start, basis, stop

    def run(self, *args):
        self.args_iter = iter(args)
        self.env = {}
        for node in self.graph.nodes:
            out = self._basis if node is self._start else self.run_node(node)
            if node is self._stop:
                return out
            self.env[node] = out
        raise RuntimeError("the probe never reached the end of the run")


def _act(node: fx.Node, modules: dict):
    """The elementwise activation ``node`` applies, as a callable on a flat tensor."""
    if node.op == "call_module":
        return modules[node.target]
    args, kwargs = tuple(node.args[1:]), dict(node.kwargs)
    if any(isinstance(a, fx.Node) for a in list(args) + list(kwargs.values())):
        raise NotLowered(f"{node.name} takes a tensor argument besides its input")
    if node.op == "call_function":
        fn = node.target
        return lambda h: fn(h, *args, **kwargs)
    name = node.target
    return lambda h: getattr(h, name)(*args, **kwargs)
