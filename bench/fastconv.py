"""2-D convolution with a faster backward pass on XLA:CPU (same forward, same gradients).

`conv_general_dilated` takes `jax.lax.conv_general_dilated`'s arguments and returns its values;
for the common case (NHWC input, HWIO kernel, NHWC output, no input dilation, one feature group,
float32) it is a `jax.custom_vjp` whose backward pass replaces two of XLA:CPU's slow
convolution transposes:

- kernel gradient: im2col + one matrix product per chunk of the batch. The patches are built in
  the transposed layout (taps x input channels, positions) from the channel-major input, so the
  product is a plain row-major (K, P) @ (P, Cout) dot; the batch goes through a `lax.scan` of
  chunks whose patch block stays within `CHUNK_BYTES` (one big patch matrix fell off a cliff:
  cnn_a's conv2 at batch 100, 550 us/image instead of 190);
- input gradient of layers with few input channels (<= `COL2IM_MAX_IN`, e.g. the first layer
  of an MNIST or RGB net, whose transpose is a convolution with 1-3 output channels): one dot
  of the cotangent with the flattened kernel, then col2im (the transpose of the patch slicing).
  Wider layers keep XLA's own input-gradient convolution, which was as fast as any rewrite.

Measured on the shared 2-core CPU (process CPU time, medians of 3 interleaved rounds, jaxlib
0.10.2), cnn_a shapes: conv2 (14x14x32 -> 64) kernel gradient 190 vs 300-480 us/image (batch
32-200); conv1 (28x28x1 -> 32) kernel gradient 3.5 vs 11 ms and input gradient 3.7 vs 8.6 ms at
batch 100. What did not win: the input gradient of conv2 as col2im (16.3 vs 11.2 ms) or as an
explicit convolution of the cotangent with the flipped, transposed kernel (11.2, the same as
XLA's, which already emits that canonical form); the forward as im2col + dot (53 vs 10.5 ms) or
as a sum of 9 tap dots (60 ms); the kernel gradient as 9 tap dots (31-39 ms, no gain) or as one
dot over the whole batch's patches (fast up to ~64 images, 1.7x slower than XLA at 100+).

End to end (cnn_a, same session, process CPU time; `ATTRAX_CONV_VJP=xla` vs the default, each
mode traced separately): one training step at batch 64 (train's `_make_step`, 4 interleaved
rounds) 57.7 -> 44.4 ms (1 part) and 62.5 -> 45.8 ms (2 parts); `train.fit`, 3 epochs x 4,000
images, steady call, 2 processes per mode alternating: 1,105-1,161 -> 1,528-1,571 images per CPU
second (1.35x; wall 1,156-1,245 -> 1,519-1,567 images/s, identical losses). The input gradient
(`gradient` / `guided_backprop` methods, jitted, 5 interleaved rounds) gains less, as only
conv1's input gradient changes: batch 100 51.4 -> 45.6 / 49.2 -> 46.8 ms, batch 400 300 -> 274 /
352 -> 273 ms, batch 25 within noise (11.9 -> 13.7 / 10.9 -> 13.6 ms, rounds spread 10-14 ms).

The forward pass is XLA's convolution itself, so values are bit-identical; gradients equal
`jax.grad` of `lax.conv_general_dilated` to float32 rounding. Forward-mode differentiation
(`jax.jvp`) of the fast form is not available (a `custom_vjp`); `conv_general_dilated(...,
fast=False)` or `jax.lax.conv_general_dilated` give it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from attrax.errors import AttraxError

Array = jax.Array

#: Largest patch block (bytes) one kernel-gradient dot reads; the batch is scanned in chunks.
CHUNK_BYTES = 2 << 20
#: Input channels up to which the input gradient is a dot + col2im instead of XLA's transpose.
COL2IM_MAX_IN = 4

_NHWC = (0, 3, 1, 2)
_HWIO = (3, 2, 0, 1)


def use_fast(choice: str | None = None) -> bool:
    """"auto": the fast form on the CPU backend (measured there; GPU/TPU keep XLA's own backward,
    which cuDNN / the TPU compiler already handle), "fast": always, "xla": never. None: the
    `ATTRAX_CONV_VJP` environment variable (default "auto"; "xla" gives the before/after figure)."""
    if choice is None:
        choice = os.environ.get("ATTRAX_CONV_VJP", "auto")
    if choice == "auto":
        return jax.default_backend() == "cpu"
    if choice in ("fast", "xla"):
        return choice == "fast"
    raise AttraxError(f"unknown conv_vjp {choice!r}: use auto, fast or xla")


def supported(lhs, rhs, lhs_dilation=None, dimension_numbers=None, feature_group_count=1,
              batch_group_count=1, preferred_element_type=None) -> bool:
    """Whether the fast backward pass applies (else `conv_general_dilated` is XLA's own)."""
    if lhs.ndim != 4 or rhs.ndim != 4 or feature_group_count != 1 or batch_group_count != 1:
        return False
    if preferred_element_type is not None or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
        return False
    if lhs_dilation is not None and any(d != 1 for d in lhs_dilation):
        return False
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    return tuple(dn.lhs_spec) == _NHWC and tuple(dn.rhs_spec) == _HWIO and tuple(dn.out_spec) == _NHWC


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None, *, fast: bool | None = None):
    """`jax.lax.conv_general_dilated` with the fast backward pass where `supported` (see the
    module docstring); same values. A drop-in for `flax.linen.Conv(conv_general_dilated=...)`.
    `fast`: None (default) = on the CPU backend only (`use_fast()`), True / False = always / never."""
    if fast is None:
        fast = use_fast()
    if not fast or not supported(lhs, rhs, lhs_dilation, dimension_numbers, feature_group_count,
                                 batch_group_count, preferred_element_type):
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, batch_group_count,
                                        precision, preferred_element_type)
    kh, kw = rhs.shape[:2]
    dil = tuple(rhs_dilation) if rhs_dilation is not None else (1, 1)
    strides = tuple(window_strides)
    if isinstance(padding, str):
        eff = ((kh - 1) * dil[0] + 1, (kw - 1) * dil[1] + 1)
        pads = tuple(lax.padtype_to_pads(lhs.shape[1:3], eff, strides, padding))
    else:
        pads = tuple(tuple(int(v) for v in p) for p in padding)
    prec = precision if precision is None or isinstance(precision, str) else _hashable(precision)
    return _fast(strides, tuple(tuple(p) for p in pads), dil, prec)(lhs, rhs)


def _hashable(precision):
    if isinstance(precision, Sequence):
        return tuple(precision)
    return precision


def _out_hw(h: int, k: int, s: int, d: int, pad: tuple[int, int]) -> int:
    return (h + pad[0] + pad[1] - ((k - 1) * d + 1)) // s + 1


def _taps(xp: Array, kh: int, kw: int, oh: int, ow: int, strides, dil, hax: int) -> list[Array]:
    """The kh*kw strided windows of the padded input `xp` whose spatial axes are hax, hax+1."""
    out = []
    for i in range(kh):
        for j in range(kw):
            start = [0] * xp.ndim
            limit = list(xp.shape)
            step = [1] * xp.ndim
            start[hax], start[hax + 1] = i * dil[0], j * dil[1]
            limit[hax] = i * dil[0] + (oh - 1) * strides[0] + 1
            limit[hax + 1] = j * dil[1] + (ow - 1) * strides[1] + 1
            step[hax], step[hax + 1] = strides
            out.append(lax.slice(xp, start, limit, step))
    return out


def _pad(x: Array, pads, hax: int) -> Array:
    cfg = [(0, 0, 0)] * x.ndim
    cfg[hax] = (pads[0][0], pads[0][1], 0)
    cfg[hax + 1] = (pads[1][0], pads[1][1], 0)
    return lax.pad(x, jnp.zeros((), x.dtype), cfg)


def kernel_grad(x: Array, g: Array, kshape, strides, pads, dil, precision=None) -> Array:
    """d/dw of sum(g * conv(x, w)) as im2col + dot, scanned over chunks of the batch."""
    kh, kw, cin, cout = kshape
    n, oh, ow = g.shape[:3]

    def one(xc, gc):
        xt = _pad(jnp.transpose(xc, (3, 0, 1, 2)), pads, 2)  # (C, n, Hp, Wp)
        p = jnp.stack(_taps(xt, kh, kw, oh, ow, strides, dil, 2))  # (taps, C, n, oh, ow)
        p = p.reshape(kh * kw * cin, -1)
        return jnp.dot(p, gc.reshape(-1, cout), precision=precision)

    chunk = _chunk(n, CHUNK_BYTES // max(1, kh * kw * cin * oh * ow * x.dtype.itemsize))
    m, rest = divmod(n, chunk)
    if m == 1 and rest == 0:
        acc = one(x, g)
    else:
        xs = x[: m * chunk].reshape((m, chunk) + x.shape[1:])
        gs = g[: m * chunk].reshape((m, chunk) + g.shape[1:])
        acc = lax.scan(lambda a, xg: (a + one(*xg), None), jnp.zeros((kh * kw * cin, cout), g.dtype),
                       (xs, gs))[0]
        if rest:
            acc = acc + one(x[m * chunk:], g[m * chunk:])
    return acc.reshape(kh, kw, cin, cout)


def _chunk(n: int, most: int) -> int:
    """Images per kernel-gradient chunk: at most `most` (>= 1), a divisor of n when one is at
    least half of that (no remainder chunk), else the even split of n into ceil(n / most)."""
    most = int(max(1, min(n, most)))
    for c in range(most, (most + 1) // 2 - 1, -1):
        if n % c == 0:
            return c
    return -(-n // -(-n // most))


def input_grad_col2im(g: Array, w: Array, xshape, strides, pads, dil, precision=None) -> Array:
    """d/dx of sum(g * conv(x, w)) as one dot with the flattened kernel, then col2im."""
    kh, kw, cin, cout = w.shape
    n, oh, ow = g.shape[:3]
    y = jnp.dot(g.reshape(-1, cout), w.reshape(kh * kw * cin, cout).T, precision=precision)
    y = y.reshape(n, oh, ow, kh * kw, cin)

    def patches(x):
        return jnp.stack(_taps(_pad(x, pads, 1), kh, kw, oh, ow, strides, dil, 1), axis=3)

    return jax.linear_transpose(patches, jax.ShapeDtypeStruct(xshape, g.dtype))(y)[0]


@functools.cache
def _fast(strides, pads, dil, precision):
    dn = ("NHWC", "HWIO", "NHWC")

    def plain(x, w):
        return lax.conv_general_dilated(x, w, strides, pads, rhs_dilation=dil, dimension_numbers=dn,
                                        precision=precision)

    @jax.custom_vjp
    def conv(x, w):
        return plain(x, w)

    def fwd(x, w):
        return plain(x, w), (x, w)

    def bwd(res, g):
        x, w = res
        if x.shape[-1] <= COL2IM_MAX_IN:
            dx = input_grad_col2im(g, w, x.shape, strides, pads, dil, precision)
        else:
            dx = jax.vjp(lambda a: plain(a, w), x)[1](g)[0]
        return dx, kernel_grad(x, g, w.shape, strides, pads, dil, precision)

    conv.defvjp(fwd, bwd)
    return conv


# -----------------------------------------------------------------------------------------------
# jaxpr-level substitution (any user model)


def _substitute_eqn(eqn, invals):
    p = eqn.params
    if eqn.primitive.name == "conv_general_dilated":
        out = bind_conv(p, *invals)
        return None if out is None else [out]
    if eqn.primitive.name in ("pjit", "jit", "closed_call") and any(
            _substitute_target(e) for e in _all_eqns(p["jaxpr"].jaxpr)):
        sub = p["jaxpr"]
        return eval_substituted(sub.jaxpr, sub.consts, *invals)
    return None


def eval_substituted(jaxpr, consts, *args):
    """Evaluate a jaxpr with every supported `conv_general_dilated` (also inside nested jit
    calls) replaced by the fast form; every other equation binds as it is."""
    from jax.extend import core as jcore

    env = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts, strict=True):
        env[v] = c
    for v, a in zip(jaxpr.invars, args, strict=True):
        env[v] = a
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        outs = _substitute_eqn(eqn, invals)
        if outs is None:
            outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for v, o in zip(eqn.outvars, outs, strict=True):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


def for_gradients(fn, x):
    """`fn` (x -> output) with the supported convolutions of its trace at `x` in the fast form
    when `use_fast()` (a zoo model's convolutions are already fast: they sit inside their own
    custom_vjp, which stays as it is); else `fn` itself. The model is traced once either way:
    what is returned evaluates that trace."""
    return substitute(fn, x) if use_fast() else fn


def _all_eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        if e.primitive.name in ("pjit", "jit", "closed_call") and "jaxpr" in e.params:
            yield from _all_eqns(e.params["jaxpr"].jaxpr)


def _substitute_target(eqn) -> bool:
    return eqn.primitive.name == "conv_general_dilated" and _fast_params(
        eqn.params, eqn.invars[0].aval, eqn.invars[1].aval)


def _fast_params(p: dict, lhs, rhs) -> bool:
    """`supported` for a `conv_general_dilated` equation's params (lhs / rhs: arrays or avals)."""
    return supported(lhs, rhs, p["lhs_dilation"], p["dimension_numbers"], p.get("feature_group_count", 1),
                     p.get("batch_group_count", 1), p.get("preferred_element_type"))


def bind_conv(params: dict, lhs: Array, rhs: Array) -> Array | None:
    """The `conv_general_dilated` equation with these params applied to (lhs, rhs) in the fast
    form, or None where it is not supported (the caller binds the primitive itself)."""
    if not _fast_params(params, lhs, rhs):
        return None
    pads = tuple(tuple(int(v) for v in q) for q in params["padding"])
    fn = _fast(tuple(params["window_strides"]), pads, tuple(params["rhs_dilation"]),
               _hashable(params.get("precision")))
    return fn(lhs, rhs)


def substitute(fn, *example_args):
    """`fn` with every supported convolution of its trace (at the shapes of `example_args`) in
    the fast form: same values, faster gradients on XLA:CPU. Single array output assumed
    flattened by the caller (returns the output pytree of `fn`)."""
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*example_args)
    treedef = jax.tree.structure(out_shape)

    def run(*args):
        flat = jax.tree.leaves(args)
        return jax.tree.unflatten(treedef, eval_substituted(closed.jaxpr, closed.consts, *flat))

    return run
