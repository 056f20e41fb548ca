"""Batch sharding over several devices gives the single-device results (CPU devices forced): one
2-device interpreter runs every check (each start costs seconds)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

BODY = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, attrax
    from attrax.methods import per_example_keys
    model = attrax.models.create("cnn_a")
    x = jax.random.uniform(jax.random.key(0), (10, 28, 28, 1))
    params = attrax.models.init(model, jax.random.key(1), x)
    y = jnp.arange(10) % 10
    out = {"n_devices": jax.local_device_count()}
    out["gradient"] = attrax.explain("gradient", model, params, x, y, chunk_size=4)
    out["integrated_gradients"] = attrax.explain("integrated_gradients", model, params, x, y, steps=4)
    out["random"] = attrax.explain("random", model, params, x, y, key=3, chunk_size=3)
    out["logits"] = attrax.forward(model, params, x)
    out["sharded"] = attrax.harness.batch_sharding(4) is not None
    # the streamed path: each batch passes the per-example keys of its positions in the selection
    # (per-example key arrays travel through the batch sharding)
    parts = [attrax.explain("smoothgrad", model, params, x[a:b], y[a:b], key=per_example_keys(7, b - a, a),
                            n_samples=4, chunk_size=3) for a, b in ((0, 4), (4, 10))]
    out["streamed_smoothgrad"] = np.concatenate([np.asarray(p) for p in parts])
    """
)
SCRIPT = BODY + "import sys\nnp.savez(sys.argv[1], **{k: np.asarray(v) for k, v in out.items()})\n"


def _run(tmp_path, devices):
    import jax
    import numpy as np

    if devices == 1 and jax.default_backend() == "cpu" and jax.local_device_count() == 1:
        ns = {}  # this process already is the one-CPU-device run: no second interpreter start
        exec(BODY, ns)
        return {k: np.asarray(v) for k, v in ns["out"].items()}
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"  # keeps conftest's
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    path = tmp_path / f"out{devices}.npz"
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return dict(np.load(path))


def test_two_devices_equal_one(tmp_path):
    import numpy as np

    one, two = _run(tmp_path, 1), _run(tmp_path, 2)
    assert int(one["n_devices"]) == 1 and int(two["n_devices"]) == 2
    assert not bool(one["sharded"]) and bool(two["sharded"])
    for k in ("gradient", "integrated_gradients", "random", "logits", "streamed_smoothgrad"):
        np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=1e-6, err_msg=k)
