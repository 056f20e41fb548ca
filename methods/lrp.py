"""Layer-wise relevance propagation (LRP) and deep Taylor decomposition.

Every method here is one forward pass plus one rule-modified backward pass of the unmodified
model, any JAX callable (see `attrax.methods._engine` and `_rules` for the mechanism): a rule is
attached to each linear layer of the trace (dense / conv) by a composite, BatchNorm is merged
into the preceding layer first, transformers get AttnLRP (default) or CP-LRP rules,
max pooling redistributes relevance to the winner ("winner", default) or in proportion to the
inputs ("proportional"; with overlapping windows each input sums its shares of every window).
Relevance starts at the target logit (`start="logit"`); the tutorial's softmax start is
`start="probability"`, Zennit's one-hot start `start="one"`.

References: Bach et al. 2015 "On pixel-wise explanations ... by layer-wise relevance
propagation"; Montavon et al. 2017 "Explaining nonlinear classification decisions with deep
Taylor decomposition"; Montavon et al. 2019 "Layer-wise relevance propagation: an overview";
Kohlbrenner et al. 2020 "Towards best practice in explaining neural network decisions with LRP".
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import jax

from attrax.errors import AttraxError
from attrax.methods import _rules
from attrax.methods._core import METHODS

Array = jax.Array

#: Composites (rule maps by position/type), as in Zennit / Kohlbrenner et al. 2020.
COMPOSITES: dict[str, dict[str, Any]] = {
    "epsilon_plus": {"conv": "zplus", "dense": "epsilon"},
    "epsilon_plus_flat": {"first": "flat", "conv": "zplus", "dense": "epsilon"},
    "epsilon_gamma_box": {"first": "zbox", "conv": "gamma", "dense": "epsilon"},
    "alpha2beta1": {"conv": "alpha2beta1", "dense": "epsilon"},
    "alpha1beta0": {"conv": "alpha1beta0", "dense": "epsilon"},
}


def relevance(
    model, params, x, target, rules: Mapping[str, Any], *, start: str = "logit", pooling: str = "winner",
    canonize: bool = True, eps: float = 1e-6, gamma: float = 0.25, alpha: float = 1.0, beta: float = 0.0,
    low: Any = 0.0, high: Any = 1.0, transformer: str = "attn_lrp", unknown: str = "error",
) -> Array:
    """LRP map for the rule map `rules` (see `_rules.composite` for its keys)."""
    if not isinstance(rules, Mapping):
        raise AttraxError(f"rules must be a mapping of layer selectors to rules, got {type(rules).__name__}")
    st = _rules.structure_of(model, params, x)
    _rules.check_composite_keys(rules, st)
    pick = _rules.composite(rules, eps=eps, gamma=gamma, alpha=alpha, beta=beta, low=low, high=high)
    for info in st.layers:  # fail early (at trace time) on misplaced rules
        if isinstance(pick(info), _rules.ZBox) and not info.first:
            raise AttraxError(f"the z^B (box) rule applies only to the first layer, not {info.name}")
    return _rules.propagate(
        model, params, x, lambda logits: _rules.start_cotangent(logits, target, start, eps), pick,
        pooling=pooling, canonize=canonize, transformer=transformer, eps=eps, unknown=unknown,
        # sums (residual adds, average pools, means) get the eps-stabilized z-rule, except under
        # pure LRP-0 (which then stays exactly input x gradient)
        sum_eps=0.0 if dict(rules) == {"default": "zero"} else eps,
    )


def _register(name: str, doc: str, rules: dict[str, Any], extra: tuple[str, ...] = ()):
    """Register one fixed-rule LRP method; `extra` names the rule hparams it exposes."""
    defaults = {"eps": 1e-6, "gamma": 0.25, "alpha": 1.0, "beta": 0.0, "low": 0.0, "high": 1.0}

    def method(model, params, x, target, *, key=None, start: str = "logit", pooling: str = "winner",
               canonize: bool = True, transformer: str = "attn_lrp", unknown: str = "error", **hp) -> Array:
        return relevance(model, params, x, target, rules, start=start, pooling=pooling,
                         canonize=canonize, transformer=transformer, unknown=unknown,
                         **{**{k: defaults[k] for k in extra}, **hp})

    method.__name__ = name
    method.__doc__ = doc
    # expose exactly the rule hparams this method uses, keyword-only with defaults
    sig = inspect.signature(method)
    params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=defaults[k]) for k in extra]
    method.__signature__ = sig.replace(parameters=params)
    METHODS.register(name, family="relevance", needs="apply", stochastic=False, cost=lambda hp: 2)(method)
    return method


lrp_0 = _register("lrp_0", "LRP-0 on every layer (Bach et al. 2015): equals input x gradient on ReLU nets.",
                  {"default": "zero"})
lrp_epsilon = _register("lrp_epsilon", "LRP-epsilon on every layer; eps default 1e-6.", {"default": "epsilon"},
                        ("eps",))
lrp_gamma = _register("lrp_gamma", "LRP-gamma on every layer (w + gamma w+); gamma 0.25, eps 1e-6.",
                      {"default": "gamma"}, ("gamma", "eps"))
lrp_alpha_beta = _register(
    "lrp_alpha_beta", "LRP-alpha-beta on every layer; alpha - beta must be 1 (default alpha 1, beta 0).",
    {"default": "alpha_beta"}, ("alpha", "beta"),
)
lrp_zplus = _register("lrp_zplus", "z+ rule on every layer (Montavon et al. 2017).", {"default": "zplus"})
lrp_epsilon_plus = _register(
    "lrp_epsilon_plus", "Composite EpsilonPlus: z+ on conv layers, epsilon (1e-6) on dense layers.",
    COMPOSITES["epsilon_plus"], ("eps",),
)
lrp_epsilon_plus_flat = _register(
    "lrp_epsilon_plus_flat",
    "Composite EpsilonPlusFlat: flat on the first layer, z+ on other conv layers, epsilon on dense.",
    COMPOSITES["epsilon_plus_flat"], ("eps",),
)
lrp_epsilon_gamma_box = _register(
    "lrp_epsilon_gamma_box",
    "Composite EpsilonGammaBox: z^B on the first layer (bounds low 0, high 1), gamma (0.25) on other "
    "conv layers, epsilon (1e-6) on dense layers.",
    COMPOSITES["epsilon_gamma_box"], ("eps", "gamma", "low", "high"),
)
lrp_alpha2beta1 = _register(
    "lrp_alpha2beta1", "Composite: alpha=2, beta=1 on conv layers, epsilon (1e-6) on dense layers.",
    COMPOSITES["alpha2beta1"], ("eps",),
)
lrp_alpha1beta0 = _register(
    "lrp_alpha1beta0", "Composite: alpha=1, beta=0 on conv layers, epsilon (1e-6) on dense layers.",
    COMPOSITES["alpha1beta0"], ("eps",),
)


@METHODS.register("lrp", family="relevance", needs="apply", stochastic=False, cost=lambda hp: 2)
def lrp(
    model, params, x, target, *, key=None, rules: Any = None, composite: str = "epsilon_plus",
    start: str = "logit", pooling: str = "winner", canonize: bool = True, eps: float = 1e-6,
    gamma: float = 0.25, alpha: float = 1.0, beta: float = 0.0, low: Any = 0.0, high: Any = 1.0,
    transformer: str = "attn_lrp", unknown: str = "error",
) -> Array:
    """LRP with a user-written rule map (from config) or a named composite.

    `rules`: mapping of layer selectors ("first", "last", "conv", "dense", "default" or a layer
    path such as "dense1", or a module prefix such as "block2" for every layer inside; layers of
    models without module names are "dense_0", "conv_1", ... by kind and position) to rule
    names ("zero", "epsilon", "gamma", "alpha_beta", "alpha1beta0", "alpha2beta1", "zplus",
    "zbox", "wsquare", "flat") or to mappings
    `{name: gamma, gamma: 0.5}`; None (default) uses `composite` (default "epsilon_plus"; one of
    epsilon_plus, epsilon_plus_flat, epsilon_gamma_box, alpha2beta1, alpha1beta0).
    `transformer`: rules for softmax, normalizations and products of activations: "attn_lrp"
    (default; Achtibat et al. 2024), "cp_lrp" (Ali et al. 2022) or "gradient". `unknown`:
    "error" (default) or "gradient" for primitives no rule covers.
    """
    if rules is None:
        if composite not in COMPOSITES:
            from attrax.errors import unknown_name

            raise unknown_name("LRP composite", composite, COMPOSITES)
        rules = COMPOSITES[composite]
    return relevance(model, params, x, target, rules, start=start, pooling=pooling, canonize=canonize,
                     eps=eps, gamma=gamma, alpha=alpha, beta=beta, low=low, high=high,
                     transformer=transformer, unknown=unknown)


@METHODS.register("deep_taylor", family="relevance", needs="apply", stochastic=False, cost=lambda hp: 2)
def deep_taylor(
    model, params, x, target, *, key=None, input_rule: str = "zbox", low: Any = 0.0, high: Any = 1.0,
    pooling: str = "winner", canonize: bool = True, unknown: str = "error",
) -> Array:
    """Deep Taylor decomposition (Montavon et al. 2017): z+ on every layer but the input layer,
    relevance starting at ReLU(f_c).

    `input_rule`: "zbox" (default; pixels bounded by `low` 0 and `high` 1) or "zplus" (inputs in
    R+, e.g. the max(x1, x2) toy network of Montavon, Samek, Mueller 2018, fig. 6).
    """
    if input_rule not in ("zbox", "zplus", "wsquare"):
        raise AttraxError(f"deep_taylor input_rule must be zbox, zplus or wsquare, got {input_rule!r}")
    return relevance(model, params, x, target, {"first": input_rule, "default": "zplus"},
                     start="relu_logit", pooling=pooling, canonize=canonize, low=low, high=high,
                     unknown=unknown)
