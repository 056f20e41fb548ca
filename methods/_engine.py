"""The rule engine: attribution rules as a transformation of the traced computation.

Every structure method (LRP, deep Taylor, guided backprop, deconvnet, DeepLIFT, PatternNet /
PatternAttribution) works on ANY JAX callable `apply_fn(params, x)`: a Flax linen or nnx model,
a plain `jax.numpy` function, a zoo model. Nothing is asked of the model; the engine reads the
computation itself.

1. `graph_of` traces `apply_fn(params, x)` once per (model, input shape, parameter shapes) with
   `jax.make_jaxpr` and caches the result on the model (`model.cached`). Nested calls (`jit`,
   `closed_call`, `custom_vjp_call`, `remat`, and `custom_jvp_call` except ReLU and the zoo's
   window max) are inlined into one flat list of equations.
2. Every variable is tagged parameter-derived (a constant of the explanation: params, literals,
   closed-over arrays, anything behind `stop_gradient`) or activation-derived (depends on x).
   Equations are grouped into *nodes*:
   - `linear`: `dot_general` / `conv_general_dilated` with one parameter-derived operand, with
     the bias `add` that follows and, foldable into it, an affine chain with per-output-channel
     constants (BatchNorm in inference mode: the canonizer);
   - `relu`: `jax.nn.relu` (its custom_jvp) or `max(x, 0)`;
   - `maxpool`: the zoo's reshape + window max, or `reduce_window_max` with window = stride
     (substituted by the reshape form, which is exact and faster on CPU), or any other
     `reduce_window_max` (overlapping windows such as 3x3 stride 2: kept as it is);
   - `softmax`: exp(u) / sum(exp(u)) (how `jax.nn.softmax` traces);
   - `bilinear`: `dot_general` or `mul` of two activations (attention q k^T, attention x v,
     gating);
   - `activation`: a region of elementwise equations with one activation input and one output
     that is not affine (gelu, tanh, sigmoid, silu, softplus, leaky ReLU...);
   - `norm`: such a region containing `sqrt`/`rsqrt` (the scaling of LayerNorm / RMSNorm);
   - `sum`: residual adds of two activations, `reduce_sum` (means), `reduce_window_sum` (average
     pooling): linear, but LRP gives them the epsilon-stabilized z-rule.
   Everything else (reshape, transpose, broadcast, slicing, concatenation, padding, sums, means,
   average pooling, additions, residual adds, affine maps) is linear and keeps its gradient,
   which is exactly LRP-0 / the z-rule there (residual adds split relevance in proportion to
   the summands) and the exact DeepLIFT multiplier.
3. `evaluate` re-runs the equations in Python (the forward is the model's own); a method gives
   a handler per node kind that returns the node's output, usually through a `jax.custom_vjp`
   whose backward pass is the rule. `jax.vjp` of the evaluated function IS the method: jit,
   vmap and chunking keep working and XLA fuses everything.

A primitive that acts on activations and is neither linear nor covered by a node (e.g. `sort`,
`while`, `cumprod`) raises a one-line AttraxError naming it and where it occurs, unless the
method is given `unknown="gradient"` (its gradient is used; recorded in the hparams).

Names: a linear layer is named by the Flax module path from the trace's name stack
("conv1", "block2/conv1", "Block_0/MlpBlock_0/Dense_0"); where there is none (plain functions
without `jax.named_scope`, nnx) by kind and position ("dense_0", "conv_1"). Repeated calls of
the same module get "@1", "@2" suffixes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from attrax.errors import AttraxError

Array = jax.Array

# --------------------------------------------------------------------------------------------
# primitive sets

#: Linear in the activations (gradient == LRP-0 == exact DeepLIFT multiplier).
STRUCTURAL = {
    "reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims", "concatenate", "slice",
    "dynamic_slice", "dynamic_update_slice", "gather", "pad", "rev", "convert_element_type", "copy",
    "copy_p", "reduce_sum", "reduce_window_sum", "add", "sub", "neg", "add_any", "cumsum",
    "reduce_precision", "split", "select_n", "scatter-add", "scatter_add", "real", "imag",
}
#: Elementwise primitives a nonlinear region may contain.
ELEMENTWISE = {
    "add", "sub", "mul", "div", "neg", "max", "min", "exp", "exp2", "log", "log1p", "expm1", "tanh",
    "logistic", "erf", "erfc", "erf_inv", "sin", "cos", "tan", "abs", "sign", "pow", "integer_pow",
    "square", "sqrt", "rsqrt", "cbrt", "select_n", "clamp", "convert_element_type", "atan", "asinh",
    "sinh", "cosh", "floor", "ceil", "round", "nextafter", "copy",
}
AFFINE = {"add", "sub", "neg", "mul", "div", "convert_element_type", "copy"}
NO_GRAD = {  # outputs carry no gradient (integers, booleans) or are constant
    "gt", "lt", "ge", "le", "eq", "ne", "and", "or", "not", "xor", "argmax", "argmin", "iota",
    "is_finite", "stop_gradient", "floor", "ceil", "round", "sign", "shift_left", "shift_right_logical",
    "population_count", "random_bits", "random_seed", "random_wrap", "random_unwrap", "threefry2x32",
}
REDUCTIONS = {"reduce_max", "reduce_min"}
INLINE = {"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
          "custom_vjp_call_jaxpr", "checkpoint", "remat", "remat2", "custom_lin"}
UNKNOWN = ("error", "gradient")


# --------------------------------------------------------------------------------------------
# A flat IR over var ids


@dataclasses.dataclass(frozen=True)
class Lit:
    val: Any


@dataclasses.dataclass
class Op:
    prim: Any
    params: dict
    ins: list  # var ids (int) or Lit
    outs: list  # var ids
    name: str  # name stack, outermost first

    @property
    def pname(self) -> str:
        return self.prim.name


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One linear layer of a model as the trace shows it.

    `kind` "dense" or "conv"; `index` its position among linear layers (execution order);
    `first` / `last` mark the first and last; `bn` names a BatchNorm-like affine chain folded
    into it (the canonizer); `nonnegative_input` says its input is >= 0 by construction (it
    comes out of a ReLU / max pooling of one), so rules skip negative-input terms.
    """

    path: tuple[str, ...]
    kind: str
    index: int
    first: bool
    last: bool
    bn: tuple[str, ...] | None = None
    nonnegative_input: bool = False
    at_input: bool = False  # its input is the model input up to reshapes: it returns relevance
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or "/".join(self.path)


@dataclasses.dataclass
class Node:
    kind: str
    ins: list  # activation var ids the handler receives
    out: int
    ops: list  # member ops, in order
    pos: int  # index of the op after which the node runs
    info: LayerInfo | None = None
    extra: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Graph:
    invars: list  # flat param leaves, then x
    outvars: list
    consts: dict  # var id -> value (closed-over arrays)
    steps: list  # Op or Node
    avals: dict
    layers: tuple[LayerInfo, ...]
    unknown: list  # (primitive, where) acting on activations with no rule
    n_params: int
    nodes: list
    names: dict = dataclasses.field(default_factory=dict)  # var id -> module path of its equation
    users: dict = dataclasses.field(default_factory=dict)  # var id -> module paths of its consumers
    labels: dict = dataclasses.field(default_factory=dict)  # "relu_0", "dense_1", ... -> var id


def _sub_jaxpr(eqn):
    for k in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        j = eqn.params.get(k)
        if j is None:
            continue
        if isinstance(j, jcore.ClosedJaxpr):
            return j.jaxpr, list(j.consts)
        if isinstance(j, jcore.Jaxpr):
            return j, []
    return None


def _custom_jvp_kind(eqn) -> str | None:
    """'relu' or 'window_max' when a custom_jvp_call is one of those (kept whole)."""
    j = eqn.params.get("call_jaxpr")
    if j is None:
        return None
    inner = j.jaxpr
    if len(inner.eqns) != 1 or len(inner.invars) != 1:
        return None
    e = inner.eqns[0]
    if e.primitive.name == "max" and any(isinstance(v, jcore.Literal) and np.all(np.asarray(v.val) == 0)
                                          for v in e.invars):
        return "relu"
    if e.primitive.name == "reduce_max" and tuple(e.params["axes"]) == (2, 4) and len(e.invars[0].aval.shape) == 6:
        return "window_max"
    return None


class _Builder:
    def __init__(self):
        self.avals: dict[int, Any] = {}
        self.consts: dict[int, Any] = {}
        self.ops: list[Op] = []
        self.n = 0

    def new(self, aval) -> int:
        self.n += 1
        self.avals[self.n] = aval
        return self.n

    def flatten(self, jaxpr, consts, ins, prefix: str):
        env: dict = {}

        def read(v):
            if isinstance(v, jcore.Literal):
                return Lit(v.val)
            return env[v]

        for v, c in zip(jaxpr.constvars, consts, strict=True):
            i = self.new(v.aval)
            self.consts[i] = c
            env[v] = i
        for v, i in zip(jaxpr.invars, ins, strict=True):
            if isinstance(i, Lit):
                j = self.new(v.aval)
                self.consts[j] = i.val
                i = j
            env[v] = i
        for eqn in jaxpr.eqns:
            stack = str(eqn.source_info.name_stack)
            name = "/".join(s for s in (prefix, stack) if s)
            args = [read(v) for v in eqn.invars]
            sub = _sub_jaxpr(eqn) if eqn.primitive.name in INLINE else None
            kind = _custom_jvp_kind(eqn) if eqn.primitive.name == "custom_jvp_call" else None
            if sub is not None and kind is None:
                outs = self.flatten(sub[0], sub[1], args, name)
                for v, o in zip(eqn.outvars, outs, strict=True):
                    if not isinstance(v, jcore.DropVar):
                        if isinstance(o, Lit):
                            j = self.new(v.aval)
                            self.consts[j] = o.val
                            o = j
                        env[v] = o
                continue
            outs = [self.new(v.aval) for v in eqn.outvars]
            for v, o in zip(eqn.outvars, outs, strict=True):
                env[v] = o
            op = Op(eqn.primitive, dict(eqn.params), args, outs, name)
            if kind is not None:
                op.params["_kind"] = kind
            self.ops.append(op)
        return [read(v) for v in jaxpr.outvars]


# --------------------------------------------------------------------------------------------
# Evaluation


def _bind(op: Op, vals: list) -> list:
    kind = op.params.get("_kind")
    if kind == "relu":
        return [jax.nn.relu(vals[0])]
    if kind == "window_max":
        from attrax.models import _window_max

        return [_window_max(vals[0])]
    out = op.prim.bind(*vals, **op.prim.get_bind_params(op.params))
    return list(out) if op.prim.multiple_results else [out]


def bind_fn(op: Op) -> Callable:
    """The op as a function of its inputs (single output)."""
    params = op.prim.get_bind_params(op.params)
    return lambda *args: op.prim.bind(*args, **params)


def run_ops(ops: list, env: dict) -> None:
    for op in ops:
        vals = [i.val if isinstance(i, Lit) else env[i] for i in op.ins]
        for o, v in zip(op.outs, _bind(op, vals), strict=True):
            env[o] = v


def finish_linear(node: Node, env: dict, rest: list, z: Array) -> Array:
    """The node's output when its linear op's output is replaced by `z`: the remaining ops of
    the node (`rest`, from `linear_parts`, e.g. an unfolded affine chain) run on a copy of `env`."""
    if not rest:
        return z
    local = dict(env)
    local[node.ops[len(node.ops) - len(rest) - 1].outs[0]] = z
    run_ops(rest, local)
    return local[node.out]


def evaluate(graph: Graph, params: Any, x: Array, handle: Callable | None = None,
             override: dict | None = None, capture: int | None = None) -> Array:
    """The model's output computed equation by equation; `handle(node, env)` returns a node's
    output (None: the node's own equations, i.e. the ordinary computation). `override` maps
    var ids to values that replace them once computed (the network downstream of a layer);
    with `capture` the result is (output, value of that var)."""
    leaves = jax.tree.leaves(params)
    env = dict(graph.consts)
    for v, val in zip(graph.invars, [*leaves, x], strict=True):
        env[v] = val
    captured = []
    for step in graph.steps:
        if override or capture is not None:
            outs = step.outs if isinstance(step, Op) else [step.out]
            if isinstance(step, Op):
                run_ops([step], env)
            else:
                out = handle(step, env) if handle is not None else None
                if out is None:
                    run_ops(step.ops, env)
                else:
                    env[step.out] = out
            for o in outs:
                if o == capture:
                    captured.append(env[o])
                if override and o in override:
                    env[o] = override[o]
            continue
        if isinstance(step, Op):
            run_ops([step], env)
            continue
        out = handle(step, env) if handle is not None else None
        if out is None and step.kind == "maxpool" and step.extra["form"] == "window":
            out = window_max(to6(step, env[step.ins[0]]))  # exact, and faster than select-and-scatter
        if out is None:
            run_ops(step.ops, env)
        else:
            env[step.out] = out
    outs = [o.val if isinstance(o, Lit) else env[o] for o in graph.outvars]
    res = outs[0] if len(outs) == 1 else outs
    if capture is not None:
        if capture in graph.invars:
            return res, env[capture]
        return res, captured[0]
    return res


def read(env: dict, i) -> Any:
    return i.val if isinstance(i, Lit) else env[i]


# --------------------------------------------------------------------------------------------
# Tracing and classification


def _module_path(name: str, strip_root: bool) -> tuple[str, ...]:
    parts = [p for p in name.split("/") if p]
    if strip_root and parts:
        parts = parts[1:]
    # flax adds "Class.method" scopes for non-__call__ methods; jax adds transform names
    return tuple(p for p in parts if "." not in p and "(" not in p)


def _is_zero(env_consts, i) -> bool:
    if isinstance(i, Lit):
        return bool(np.all(np.asarray(i.val) == 0))
    return False


def _linear_axes(op: Op, act_pos: int, avals) -> tuple[int | None, int | None, bool]:
    """(output-feature axis of z, of the kernel, stackable) for a Flax-style layer, else Nones."""
    a_shape = avals[op.ins[act_pos]].shape
    k_shape = avals[op.ins[1 - act_pos]].shape
    z_nd = len(avals[op.outs[0]].shape)
    if op.pname == "conv_general_dilated":
        dn = op.params["dimension_numbers"]
        if act_pos != 0:
            return None, None, False
        lhs, rhs, out = dn.lhs_spec, dn.rhs_spec, dn.out_spec
        stack = (op.params["feature_group_count"] == 1 and op.params["batch_group_count"] == 1
                 and lhs[1] == len(a_shape) - 1 and rhs[1] == len(k_shape) - 2)
        return out[1], rhs[0], stack
    (lc, rc), (lb, rb) = op.params["dimension_numbers"]
    if lb or rb:
        return None, None, False
    kc = rc if act_pos == 0 else lc
    free = [d for d in range(len(k_shape)) if d not in kc]
    if len(free) != 1:
        return None, None, False
    if act_pos == 0:
        zax = z_nd - 1
        ac = lc
        stack = tuple(ac) == (len(a_shape) - 1,) and len(k_shape) == 2 and tuple(kc) == (0,)
    else:
        zax = 0
        stack = False
    return zax, free[0], stack


def trace(model, params: Any, x: Array) -> Graph:
    """Trace `model(params, x)` and classify its equations (see the module docstring)."""
    leaves, tree = jax.tree.flatten(params)
    specs = [jax.ShapeDtypeStruct(jnp.shape(v), jnp.result_type(v)) for v in leaves]
    xspec = jax.ShapeDtypeStruct(x.shape, x.dtype)

    def fn(flat, xx):
        return model(jax.tree.unflatten(tree, flat), xx)

    closed = jax.make_jaxpr(fn)(specs, xspec)
    b = _Builder()
    invars = [b.new(v.aval) for v in closed.jaxpr.invars]
    outvars = b.flatten(closed.jaxpr, list(closed.consts), invars, "")
    return _classify(b, invars, outvars, len(leaves), strip_root=getattr(model, "module", None) is not None)


def _classify(b: _Builder, invars, outvars, n_params, strip_root: bool) -> Graph:
    ops, avals = b.ops, b.avals
    x_id = invars[-1]
    act: set[int] = {x_id}
    producer: dict[int, int] = {}
    users: dict[int, list[int]] = {}
    for k, op in enumerate(ops):
        for o in op.outs:
            producer[o] = k
        for i in op.ins:
            if not isinstance(i, Lit):
                users.setdefault(i, []).append(k)
        if op.pname in NO_GRAD:
            continue
        if any((not isinstance(i, Lit)) and i in act for i in op.ins):
            for o in op.outs:
                if jnp.issubdtype(avals[o].dtype, jnp.inexact):
                    act.add(o)
    out_set = {o for o in outvars if not isinstance(o, Lit)}

    def is_act(i):
        return (not isinstance(i, Lit)) and i in act

    def single_use(v):
        return len(users.get(v, [])) == 1 and v not in out_set

    used: set[int] = set()
    nodes: list[Node] = []
    unknown: list[tuple[str, str]] = []

    # --- softmax: div(e, broadcast(reduce_sum(e))) with e = exp(u)
    for k, op in enumerate(ops):
        if op.pname != "div" or not all(is_act(i) for i in op.ins):
            continue
        e, d = op.ins
        pe, pd = producer.get(e), producer.get(d)
        if pe is None or pd is None or ops[pe].pname != "exp":
            continue
        chain = [pd]
        while ops[chain[-1]].pname in ("broadcast_in_dim", "reshape", "expand_dims"):
            nxt = producer.get(ops[chain[-1]].ins[0])
            if nxt is None:
                break
            chain.append(nxt)
        rs = chain[-1]
        if ops[rs].pname != "reduce_sum" or ops[rs].ins[0] != e:
            continue
        members = sorted({pe, k, *chain})
        if any(m in used for m in members):
            continue
        used.update(members)
        extra = {"axes": tuple(ops[rs].params["axes"])}
        pu = producer.get(ops[pe].ins[0])
        if pu is not None and ops[pu].pname == "sub" and is_act(ops[pu].ins[0]) and not is_act(ops[pu].ins[1]):
            extra["pre"], extra["shift"] = ops[pu].ins  # u = c - stop_gradient(max c)
        nodes.append(Node("softmax", [ops[pe].ins[0]], op.outs[0], [ops[m] for m in members], k, extra=extra))

    # --- relu
    for k, op in enumerate(ops):
        if k in used:
            continue
        if op.params.get("_kind") == "relu" or (
            op.pname == "max" and sum(is_act(i) for i in op.ins) == 1 and any(_is_zero(b.consts, i) for i in op.ins)
        ):
            if not is_act([i for i in op.ins if not isinstance(i, Lit)][0]):
                continue
            z = next(i for i in op.ins if is_act(i))
            if _feeds_sqrt(op.outs[0], ops, users):
                continue  # max(var, 0) inside a normalization, not an activation
            used.add(k)
            nodes.append(Node("relu", [z], op.outs[0], [op], k))

    # --- max pooling
    for k, op in enumerate(ops):
        if k in used or not any(is_act(i) for i in op.ins):
            continue
        if op.params.get("_kind") == "window_max":
            used.add(k)
            nodes.append(Node("maxpool", [op.ins[0]], op.outs[0], [op], k, extra={"form": "6d"}))
        elif op.pname == "reduce_window_max":
            p = op.params
            wd, ws = tuple(p["window_dimensions"]), tuple(p["window_strides"])
            shape = avals[op.ins[0]].shape
            ok = (len(wd) == 4 and wd == ws and wd[0] == 1 and wd[3] == 1 and wd[1] == wd[2]
                  and all(d == 1 for d in p["base_dilation"]) and all(d == 1 for d in p["window_dilation"])
                  and tuple(p["padding"][0]) == (0, 0) and tuple(p["padding"][3]) == (0, 0))
            if ok:
                kk = wd[1]
                pads = [tuple(p["padding"][1]), tuple(p["padding"][2])]
                ok = all((shape[ax] + lo + hi) % kk == 0 and lo >= 0 and hi >= 0
                         for ax, (lo, hi) in zip((1, 2), pads, strict=True))
            used.add(k)
            nodes.append(Node("maxpool", [op.ins[0]], op.outs[0], [op], k,
                              extra={"form": "window" if ok else "generic",
                                     "k": wd[1] if ok else None, "pads": p["padding"]}))

    # --- linear layers (+ bias + foldable affine chain)
    lin_nodes = []
    for k, op in enumerate(ops):
        if k in used or op.pname not in ("dot_general", "conv_general_dilated"):
            continue
        flags = [is_act(i) for i in op.ins]
        if flags.count(True) == 2:
            used.add(k)
            nodes.append(Node("bilinear", list(op.ins), op.outs[0], [op], k))
            continue
        if flags.count(True) != 1:
            continue
        act_pos = flags.index(True)
        zax, kax, stack = _linear_axes(op, act_pos, avals)
        members, cur = [k], op.outs[0]
        n_bias = 0
        chain: list[int] = []
        # bias: add/sub of a constant
        while single_use(cur):
            nk = users[cur][0]
            nop = ops[nk]
            if nk in used or nop.pname not in ("add", "sub", "mul", "div") or len(nop.ins) != 2:
                break
            other = [i for i in nop.ins if i != cur]
            if len(other) != 1 or is_act(other[0]) or nop.ins.count(cur) != 1:
                break
            if nop.pname == "div" and nop.ins[0] != cur:
                break
            if avals[nop.outs[0]].shape != avals[cur].shape:
                break
            if nop.pname in ("mul", "div"):
                s_shape = jnp.shape(other[0].val) if isinstance(other[0], Lit) else avals[other[0]].shape
                zshape = avals[cur].shape
                if zax is None:
                    break
                off = len(zshape) - len(s_shape)
                if not all(d == 1 or (off + j == zax) for j, d in enumerate(s_shape)):
                    break
            if nop.pname in ("add", "sub") and not chain and n_bias == 0 and nop.name == op.name:
                n_bias = 1
            else:
                chain.append(nk)
            members.append(nk)
            cur = nop.outs[0]
        used.update(members)
        kind = "conv" if op.pname == "conv_general_dilated" else "dense"
        node = Node("linear", [op.ins[act_pos]], cur, [ops[m] for m in members], members[-1],
                    extra={"act_pos": act_pos, "kernel": op.ins[1 - act_pos], "n_bias": n_bias,
                           "zax": zax, "kax": kax, "stackable": stack, "kind": kind})
        nodes.append(node)
        lin_nodes.append(node)

    # --- elementwise regions (activations, norms) and products of two activations
    root: dict[int, int] = {}
    for k, op in enumerate(ops):
        if k in used:
            continue
        acts_in = [i for i in op.ins if is_act(i)]
        if not acts_in or not op.outs or not is_act(op.outs[0]):
            continue
        out_shape = avals[op.outs[0]].shape
        same = all(avals[i].shape == out_shape for i in acts_in)
        roots = {root.get(i, i) for i in acts_in}
        if op.pname in ELEMENTWISE and len(op.outs) == 1 and same and len(roots) == 1:
            root[op.outs[0]] = roots.pop()
            continue
        if op.pname == "mul" and len(acts_in) == 2:
            used.add(k)
            nodes.append(Node("bilinear", list(op.ins), op.outs[0], [op], k))
    regions: dict[int, list[int]] = {}
    for k, op in enumerate(ops):
        if k not in used and op.outs and op.outs[0] in root:
            regions.setdefault(root[op.outs[0]], []).append(k)
    for r, members in regions.items():
        mset = set(members)
        produced = {ops[m].outs[0] for m in members}
        outside = [v for v in produced if v in out_set or any(u not in mset for u in users.get(v, []))]
        if all(ops[m].pname in AFFINE for m in members):
            continue
        if len(outside) != 1:  # several outputs: each nonlinear equation is its own node
            for m in members:
                op = ops[m]
                acts_in = [i for i in op.ins if is_act(i)]
                if op.pname in AFFINE and not (op.pname in ("mul", "div") and len(acts_in) == 2):
                    continue
                if len(set(acts_in)) == 1:
                    kind = "norm" if op.pname in ("rsqrt", "sqrt") else "activation"
                    used.add(m)
                    nodes.append(Node(kind, [acts_in[0]], op.outs[0], [op], m))
                elif op.pname == "mul":
                    used.add(m)
                    nodes.append(Node("bilinear", list(op.ins), op.outs[0], [op], m))
            continue
        if any(ops[m].pname in ("mul", "div") and all(is_act(i) for i in ops[m].ins) for m in members) or \
                any(ops[m].pname not in AFFINE for m in members):
            kind = "norm" if any(ops[m].pname in ("rsqrt", "sqrt") for m in members) else "activation"
            used.update(members)
            nodes.append(Node(kind, [r], outside[0], [ops[m] for m in members], max(members)))

    # --- sums of activations (residual adds, pooling sums, means): z-rule nodes
    for k, op in enumerate(ops):
        if k in used or not op.outs:
            continue
        acts_in = [i for i in op.ins if is_act(i)]
        if (op.pname in ("add", "add_any") and len(acts_in) == 2 and all(avals[i].shape == avals[op.outs[0]].shape
                                                                       for i in acts_in)) or (
                op.pname in ("reduce_sum", "reduce_window_sum") and len(acts_in) == 1):
            members = [op]
            o = op.outs[0]
            if op.pname != "add" and single_use(o):  # a mean / average pool: stabilize the mean
                nk = users[o][0]
                nop = ops[nk]
                if nk not in used and nop.pname == "div" and nop.ins[0] == o and not is_act(nop.ins[1]):
                    members.append(nop)
                    used.add(nk)
            used.add(k)
            pos = k if len(members) == 1 else users[o][0]
            nodes.append(Node("sum", list(op.ins), members[-1].outs[0], members, pos))

    # --- unknown primitives acting on activations
    for k, op in enumerate(ops):
        if k in used or op.pname in STRUCTURAL or op.pname in NO_GRAD or op.pname in REDUCTIONS:
            continue
        acts_in = [i for i in op.ins if is_act(i)]
        if not acts_in:
            continue
        if op.pname in ("mul", "div") and len(acts_in) == 1 and (op.pname == "mul" or is_act(op.ins[0])):
            continue  # scaling by a constant
        if op.pname == "div":  # a / b with b an activation (not a softmax): b treated as a ratio
            continue
        if op.pname in ELEMENTWISE and op.pname in AFFINE:
            continue
        unknown.append((op.pname, op.name or f"equation {k}"))

    # --- order: each node runs at its last member op
    at: dict[int, Node] = {n.pos: n for n in nodes}
    steps: list = []
    for k, op in enumerate(ops):
        if k in used:
            if k in at:
                steps.append(at[k])
            continue
        steps.append(op)

    # --- products with a softmax / normalization factor (detached by the transformer rules)
    derived = _derived(steps, act, ("softmax", "norm"))
    for node in nodes:
        if node.kind == "bilinear":
            node.extra["factors"] = [derived.get(i) if not isinstance(i, Lit) else None for i in node.ins]

    # --- layer infos: names, positions, nonnegative inputs, at_input
    nonneg = _nonnegative(steps, act, avals)
    at_input_vars = _structural_from(x_id, ops, used)
    lin_nodes.sort(key=lambda n: n.pos)
    n = len(lin_nodes)
    counts: dict[str, int] = {}
    seen: dict[str, int] = {}
    infos = []
    for i, node in enumerate(lin_nodes):
        path = _module_path(node.ops[0].name, strip_root)
        kind = node.extra["kind"]
        label = "/".join(path)
        if not label:
            label = f"{kind}_{counts.get(kind, 0)}"
        counts[kind] = counts.get(kind, 0) + 1
        if label in seen:
            seen[label] += 1
            label = f"{label}@{seen[label]}"
        else:
            seen[label] = 0
        bn = None
        chain_ops = node.ops[1 + node.extra["n_bias"]:]
        if chain_ops:
            bn = _module_path(chain_ops[0].name, strip_root) or ("affine",)
        info = LayerInfo(path or (label,), kind, i, i == 0, i == n - 1, bn, node.ins[0] in nonneg,
                         node.ins[0] in at_input_vars, label)
        node.info = info
        infos.append(info)
    names = {o: _module_path(op.name, strip_root) for op in ops for o in op.outs}
    user_names: dict[int, list] = {}
    for op in ops:
        for i in op.ins:
            if not isinstance(i, Lit) and i in act:
                user_names.setdefault(i, []).append(_module_path(op.name, strip_root))
    for o in out_set:
        user_names.setdefault(o, []).append(("<output>",))
    labels: dict[str, int] = {}
    kind_counts: dict[str, int] = {}
    for st in steps:
        if isinstance(st, Node):
            if st.kind == "linear":
                labels[st.info.name] = st.out
                continue
            c = kind_counts.get(st.kind, 0)
            kind_counts[st.kind] = c + 1
            labels[f"{st.kind}_{c}"] = st.out
    return Graph(invars, list(outvars), dict(b.consts), steps, avals, tuple(infos), unknown, n_params, nodes,
                 names, user_names, labels)


def _feeds_sqrt(v, ops, users, depth: int = 3) -> bool:
    for u in users.get(v, []):
        op = ops[u]
        if op.pname in ("sqrt", "rsqrt"):
            return True
        passes = op.pname in AFFINE | {"reshape", "broadcast_in_dim"}
        if depth > 1 and passes and _feeds_sqrt(op.outs[0], ops, users, depth - 1):
            return True
    return False


def _derived(steps, act, kinds) -> dict[int, str]:
    """Vars that are a softmax / norm node output up to structural and constant-affine ops."""
    out: dict[int, str] = {}
    for s in steps:
        if isinstance(s, Node):
            if s.kind in kinds:
                out[s.out] = s.kind
            continue
        acts = [i for i in s.ins if not isinstance(i, Lit) and i in act]
        if len(acts) == 1 and acts[0] in out and s.outs and (s.pname in STRUCTURAL or s.pname in AFFINE):
            out[s.outs[0]] = out[acts[0]]
    return out


def _nonnegative(steps, act, avals) -> set[int]:
    """Vars >= 0 by construction: ReLU / max-pool outputs and their reshapes, pools, sums."""
    nn_: set[int] = set()
    keep = {"reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims", "slice", "rev",
            "reduce_sum", "reduce_window_sum", "reduce_max", "reduce_window_max", "convert_element_type",
            "copy", "pad", "gather", "dynamic_slice"}
    for s in steps:
        if isinstance(s, Node):
            if s.kind == "relu" or (s.kind == "maxpool" and s.ins[0] in nn_):
                nn_.add(s.out)
            continue
        acts = [i for i in s.ins if not isinstance(i, Lit) and i in act]
        if not acts or not s.outs:
            continue
        if s.pname in keep and acts[0] in nn_ and (s.pname != "pad" or s.ins[0] in nn_):
            nn_.add(s.outs[0])
        elif s.pname in ("add", "concatenate", "max") and all(i in nn_ for i in acts) and \
                all(isinstance(i, Lit) and np.all(np.asarray(i.val) >= 0) for i in s.ins if i not in acts):
            nn_.add(s.outs[0])
        elif s.pname in ("div", "mul") and len(acts) == 1 and acts[0] in nn_ and all(
                isinstance(i, Lit) and np.all(np.asarray(i.val) > 0) for i in s.ins if i not in acts):
            nn_.add(s.outs[0])
    return nn_


def _structural_from(x_id, ops, used) -> set[int]:
    """Vars that are the input x up to reshapes/transposes (first layers return relevance)."""
    out = {x_id}
    for k, op in enumerate(ops):
        if k in used:
            continue
        if op.pname in ("reshape", "transpose", "squeeze", "expand_dims", "convert_element_type", "copy") and \
                op.ins and op.ins[0] in out:
            out.add(op.outs[0])
    return out


def graph_of(model, params: Any, x: Array) -> Graph:
    """`trace`, memoized on the model per (input shape, dtype, parameter shapes)."""
    leaves, tree = jax.tree.flatten(params)
    key = ("engine_graph", tuple(x.shape), str(x.dtype), str(tree),
           tuple((tuple(jnp.shape(v)), str(jnp.result_type(v))) for v in leaves))
    return model.cached(key, lambda: trace(model, params, x))


def check_unknown(graph: Graph, unknown: str) -> None:
    if unknown not in UNKNOWN:
        raise AttraxError(f"unknown={unknown!r}: use one of {', '.join(UNKNOWN)}")
    if graph.unknown and unknown == "error":
        prim, where = graph.unknown[0]
        more = f" (and {len(graph.unknown) - 1} more)" if len(graph.unknown) > 1 else ""
        raise AttraxError(
            f"no attribution rule for primitive `{prim}` at {where!r}{more}; "
            "pass unknown='gradient' to use its gradient"
        )


# --------------------------------------------------------------------------------------------
# Helpers for handlers


@dataclasses.dataclass(frozen=True)
class Linear:
    """z = op(a, kernel) + bias for one linear layer (any dot_general / conv), with transposes."""

    op: Callable[[Array, Array], Array]  # bias-free layer function
    a_spec: jax.ShapeDtypeStruct
    kernel: Array
    bias: Array
    stackable: bool = False  # Flax layout: features last in `a`, kernel input axis -2
    nonnegative_input: bool = False

    def __call__(self, a: Array, kernel: Array | None = None, bias: Array | None = None) -> Array:
        z = self.op(a, self.kernel if kernel is None else kernel)
        return z + (self.bias if bias is None else bias)

    def transpose(self, s: Array, kernel: Array | None = None) -> Array:
        k = self.kernel if kernel is None else kernel
        (t,) = jax.linear_transpose(lambda a: self.op(a, k), self.a_spec)(s)
        return t

    def op_stacked(self, aa: Array, *kernels: Array) -> Array:
        """sum_i op(a_i, k_i) for inputs stacked along the last axis."""
        if not self.stackable:
            parts = jnp.split(aa, len(kernels), -1)
            return sum(self.op(p, k) for p, k in zip(parts, kernels, strict=True))
        return self.op(aa, jnp.concatenate(kernels, -2))

    def op_pair(self, a1: Array, a2: Array, k1: Array, k2: Array) -> Array:
        """op(a1, k1) + op(a2, k2), one call when the layout allows."""
        if self.stackable:
            return self.op(jnp.concatenate([a1, a2], -1), jnp.concatenate([k1, k2], -2))
        return self.op(a1, k1) + self.op(a2, k2)

    def transpose_stacked(self, s: Array, *kernels: Array) -> list[Array]:
        if not self.stackable:
            return [self.transpose(s, k) for k in kernels]
        n = len(kernels)
        spec = jax.ShapeDtypeStruct(self.a_spec.shape[:-1] + (self.a_spec.shape[-1] * n,), self.a_spec.dtype)
        kk = jnp.concatenate(kernels, -2)
        (t,) = jax.linear_transpose(lambda u: self.op(u, kk), spec)(s)
        return jnp.split(t, n, -1)

    def kernel_transpose(self, a: Array, s: Array) -> Array:
        spec = jax.ShapeDtypeStruct(self.kernel.shape, self.kernel.dtype)
        (t,) = jax.linear_transpose(lambda k: self.op(a, k), spec)(s)
        return t


def linear_op(node: Node) -> Callable[[Array, Array], Array]:
    op, act_pos = node.ops[0], node.extra["act_pos"]
    fn = bind_fn(op)

    def f(a, k):
        return fn(a, k) if act_pos == 0 else fn(k, a)

    return f


def linear_parts(node: Node, env: dict, canonize: bool) -> tuple[Array, Array, list]:
    """(effective kernel, effective bias, remaining chain ops) of a linear node."""
    k = env[node.extra["kernel"]]
    s, t = None, None
    nb = node.extra["n_bias"]
    upto = len(node.ops) if canonize else 1 + nb
    cur = node.ops[0].outs[0]
    for op in node.ops[1:upto]:
        c = next(read(env, i) for i in op.ins if i != cur)
        first = op.ins[0] == cur
        p = op.pname
        if p == "add":
            t = c if t is None else t + c
        elif p == "sub":
            if first:
                t = -c if t is None else t - c
            else:
                s = -1.0 if s is None else -s
                t = c if t is None else c - t
        elif p == "mul":
            s = c if s is None else s * c
            t = None if t is None else t * c
        elif p == "div":
            s = 1.0 / c if s is None else s / c
            t = None if t is None else t / c
        cur = op.outs[0]
    if s is not None:
        kax = node.extra["kax"]
        c_out = k.shape[kax]
        vec = jnp.broadcast_to(jnp.reshape(jnp.asarray(s, k.dtype), (-1,)), (c_out,))
        shape = [1] * k.ndim
        shape[kax] = c_out
        k = k * vec.reshape(shape)
    if t is None:
        t = jnp.zeros((), k.dtype)
    return k, t, node.ops[upto:]


def make_linear(node: Node, a: Array, k: Array, b: Array) -> Linear:
    return Linear(linear_op(node), jax.ShapeDtypeStruct(a.shape, a.dtype), k, b, node.extra["stackable"],
                  node.info.nonnegative_input)


def windows6(x6: Array) -> Array:
    """(n, oh, k, ow, k, c) -> (n, oh, ow, c, k*k) window view."""
    n, oh, k, ow, k2, c = x6.shape
    return x6.transpose(0, 1, 3, 5, 2, 4).reshape(n, oh, ow, c, k * k2)


def unwindows6(v: Array, shape6) -> Array:
    n, oh, k, ow, k2, c = shape6
    return v.reshape(n, oh, ow, c, k, k2).transpose(0, 1, 4, 2, 5, 3)


def to6(node: Node, t: Array) -> Array:
    """The maxpool node's input as (n, oh, k, ow, k, c) windows (pads with -inf)."""
    if node.extra["form"] == "6d":
        return t
    k = node.extra["k"]
    pads = node.extra["pads"]
    if any(lo or hi for lo, hi in pads):
        t = jnp.pad(t, [tuple(p) for p in pads], constant_values=-jnp.inf)
    n, h, w, c = t.shape
    return t.reshape(n, h // k, k, w // k, k, c)


def window_max(x6: Array) -> Array:
    from attrax.models import _window_max

    return _window_max(x6)


def region_fn(node: Node, env: dict) -> Callable[[Array], Array]:
    """The node's equations as a function of its single activation input."""

    def f(v):
        local = dict(env)
        local[node.ins[0]] = v
        run_ops(node.ops, local)
        return local[node.out]

    return f


def sum_fn(node: Node, env: dict) -> Callable:
    """A sum node's equations as a function of its activation inputs."""
    acts = [i for i in node.ins if not isinstance(i, Lit)]

    def f(*vals):
        local = dict(env)
        for i, v in zip(acts, vals, strict=True):
            local[i] = v
        run_ops(node.ops, local)
        return local[node.out]

    return f


def node_inputs(node: Node, env: dict) -> list:
    return [read(env, i) for i in node.ins]


def canonized_forward(model, params: Any, x: Array) -> Array:
    """The logits with every foldable affine chain (BatchNorm in inference mode) merged into
    its linear layer: equal to `model(params, x)` up to float rounding."""
    graph = graph_of(model, params, x)

    def handle(node, env):
        if node.kind != "linear":
            return None
        a = env[node.ins[0]]
        k, b, rest = linear_parts(node, env, True)
        return make_linear(node, a, k, b)(a)

    return evaluate(graph, params, x, handle)


def find_layer(graph: Graph, layer: str) -> int:
    """The var a layer name denotes: a linear layer's label ("conv2", "dense_0"), a node label
    ("relu_1", "maxpool_0", "softmax_0", "sum_2"), "input", or a module path ("block2",
    "blocks_0/attn"): the last activation computed inside that module and used outside it."""
    if layer == "input":
        return graph.invars[-1]
    if layer in graph.labels:
        return graph.labels[layer]
    path = tuple(p for p in layer.split("/") if p)
    n = len(path)
    best = None
    for st in graph.steps:
        outs = st.outs if isinstance(st, Op) else [st.out]
        for o in outs:
            if graph.names.get(o, ())[:n] != path or o not in graph.users:
                continue
            if any(u[:n] != path for u in graph.users[o]):
                best = o
    if best is None:
        modules = sorted({"/".join(p[:k]) for p in graph.names.values() for k in range(1, len(p) + 1)})
        raise AttraxError(
            f"no layer {layer!r} in the traced model; names: {', '.join(list(graph.labels) + modules) or 'none'}"
        )
    return best


def layer_value(model, params: Any, x: Array, layer: str, replace: Array | None = None) -> tuple[Array, Array]:
    """(value of `layer`, logits), the logits with that value replaced by `replace` when given
    (gradients flow into it; the upstream computation is dead code that XLA removes)."""
    graph = graph_of(model, params, x)
    var = find_layer(graph, layer)
    if replace is None:
        logits, a = evaluate(graph, params, x, capture=var)
        return a, logits
    logits, a = evaluate(graph, params, x, override={var: replace}, capture=var)
    return a, logits


def last_spatial_layer(model, params: Any, x: Array) -> str:
    """The label of the last 4-D (n, h, w, c) output of a ReLU / activation / max or average
    pooling / conv layer (the default layer of the CAM family on a model without `features`)."""
    graph = graph_of(model, params, x)
    best = None
    kinds = {n.out: (n.kind, n.info.kind if n.info else n.ops[0].pname) for n in graph.nodes}
    for label, var in graph.labels.items():
        kind, sub = kinds.get(var, (None, None))
        if kind not in ("relu", "activation", "maxpool") and sub not in ("conv", "reduce_window_sum"):
            continue
        shape = graph.avals[var].shape
        if len(shape) == 4 and shape[0] == x.shape[0] and shape[1] > 1 and shape[2] > 1:
            pos = next(k for k, st in enumerate(graph.steps) if (st.out if isinstance(st, Node) else None) == var)
            if best is None or pos > best[0]:
                best = (pos, label)
    if best is None:
        raise AttraxError(
            "class activation maps need spatial maps (n, h, w, K): the model has no `features`/`head` "
            "stages and no spatial activation in its trace"
        )
    return best[1]
