"""Shared fixtures: small models with known answers and a quickly trained CNN.

Every test session uses its own model cache folder, so tests never depend on a user's cache.

Tests compile thousands of small programs (about 6,300 in a default run, 7,800 before the eager
loops were cut; tracing, lowering and compiling were 70-85% of the test processes' CPU time,
measured with JAX's monitoring events), and
many are the same program built from different Python closures (a quarter of the requests). The
test processes use a persistent XLA compilation cache per test session (a temporary folder,
removed at the end, one subfolder per xdist worker; a user's JAX_COMPILATION_CACHE_DIR is not
used), and the `python -m attrax.cli` subprocesses share its top folder. The tests that count
compiles still see a cache hit: JAX records its backend-compile event around compile-or-fetch
(`attrax.perf.count_compilations`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

REF_DIR = Path(__file__).parent / "data" / "reference"

# Tests compile hundreds of tiny programs and run each a few times: XLA:CPU's LLVM optimization
# (backend level 2, the default) is most of their CPU time, not the arithmetic. Level 0 keeps
# the same HLO (the same ops, fusions and float semantics; the library's users keep the default)
# and cuts the suite's CPU time by about a third. Read when JAX creates its CPU client (on first
# use, after this line); inherited by the CLI subprocesses and the xdist workers. A flag the user
# set wins. ATTRAX_TEST_XLA_OPT=2 restores the default.
_OPT = os.environ.get("ATTRAX_TEST_XLA_OPT", "0")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_backend_optimization_level={_OPT}").strip()
# XLA:CPU's MLIR fusion emitters cost ~45% of a small program's compile (cnn_a gradient, forward,
# sort, normalize: 101 -> 56 ms per compile at level 0); the older elemental emitters compute the
# same ops. Only with the level-0 test default: ATTRAX_TEST_XLA_OPT=2 keeps XLA's own settings.
if _OPT == "0" and "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"

_XLA_CACHE_ENV = "ATTRAX_TEST_XLA_CACHE"  # set by the controlling pytest process, inherited by xdist workers


# MLIR locations carry up to 100 Python frames per op by default (pytest's stack is deep): off in
# the tests, lowering ~7% faster (the conformance files: 36.6 -> 34.0 s of lowering)
jax.config.update("jax_include_full_tracebacks_in_locations", False)


def _own_cache(root: str) -> None:
    # each test process its own subfolder: JAX writes cache files in place, and a worker reading
    # an entry another process is still writing gets a truncated-stream warning (seen once)
    path = os.path.join(root, os.environ.get("PYTEST_XDIST_WORKER", "main"))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_configure(config):
    if os.environ.get(_XLA_CACHE_ENV):
        _own_cache(os.environ[_XLA_CACHE_ENV])  # an xdist worker: the controller made the folder
        return
    path = tempfile.mkdtemp(prefix="attrax-test-xla-")
    config._attrax_xla_cache = path
    os.environ[_XLA_CACHE_ENV] = path
    # read by the subprocesses' JAX at import (this process imported JAX already, see above)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    _own_cache(path)


#: fixtures trained once per process: every test using one runs in the same xdist worker
_SHARED_TRAINED = ("tiny_cnn",)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups (--dist loadgroup in pyproject)
def pytest_collection_modifyitems(config, items):
    """xdist groups: a test file's tests stay in one worker (its module fixtures are built once),
    except that the tests using a session-trained model share one worker, and so do the CLI tests
    marked `xdist_group("cli_cnn_a")` (they reuse the model the first one trains into the cache)."""
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue
        shared = [f for f in _SHARED_TRAINED if f in getattr(item, "fixturenames", ())]
        item.add_marker(pytest.mark.xdist_group(shared[0] if shared else item.nodeid.split("::")[0]))


def pytest_unconfigure(config):
    path = getattr(config, "_attrax_xla_cache", None)
    if path:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("ATTRAX_CACHE", str(tmp_path_factory.mktemp("attrax_cache")))
    yield
    mp.undo()


class LinearNet(nn.Module):
    """f(x) = W^T flatten(x) + b: every gradient-based identity has a closed form here."""

    num_classes: int = 3
    use_bias: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(self.num_classes, use_bias=self.use_bias, name="dense")(x.reshape((x.shape[0], -1)))


@pytest.fixture(scope="session")
def linear():
    """(model, params, x, target, W) for a linear model on 6x6x1 inputs with 3 classes."""
    import attrax

    module = LinearNet()
    x = jax.random.uniform(jax.random.key(1), (4, 6, 6, 1))
    params = module.init(jax.random.key(0), x)
    w = params["params"]["dense"]["kernel"]  # (36, 3)
    target = jnp.array([0, 1, 2, 1], jnp.int32)
    return attrax.as_model(module), params, x, target, w


@pytest.fixture(scope="session")
def mnist_test():
    import attrax

    return attrax.datasets.load("mnist_sample", split="test")


@pytest.fixture(scope="session")
def mnist_train():
    import attrax

    return attrax.datasets.load("mnist_sample", split="train")


@pytest.fixture(scope="session")
def tiny_cnn(mnist_train):
    """The reference-architecture CNN (cnn_a) trained for one quick epoch on 2,000 digits."""
    import attrax

    small = mnist_train.take(per_class=200)
    model, params, _ = attrax.train("cnn_a", small, seed=0, cfg=attrax.TrainConfig(epochs=1), progress=False)
    return model, params


@pytest.fixture(scope="session")
def batch(mnist_test):
    """Eight test digits with their labels (jax arrays)."""
    sub = mnist_test.take(per_class=1)
    return jnp.asarray(sub.x[:8]), jnp.asarray(sub.y[:8])


@pytest.fixture(scope="session")
def reference():
    """Weights, inputs and maps from established PyTorch libraries (see data/reference/README.md)."""
    import attrax

    w = np.load(REF_DIR / "cnn_a_weights.npz")
    maps = dict(np.load(REF_DIR / "cnn_a_maps.npz"))
    meta = json.loads((REF_DIR / "cnn_a_meta.json").read_text())
    params = {"params": {}}
    for k, v in w.items():
        layer, p = k.split("/")
        params["params"].setdefault(layer, {})[p] = jnp.asarray(v)
    model = attrax.models.create("cnn_a")
    return model, params, maps, meta
