"""`attrax-bench --model` takes the non-zoo example families (issue 13) and reports, per family,
LRP / DeepLIFT / guided backprop relative to one gradient of the same batch, measured in the same run."""

from __future__ import annotations

import pytest


def test_families_section_reports_ratio_to_one_gradient(tmp_path):
    import attrax
    from attrax import perf

    out = tmp_path / "bench"
    code = perf.main(["--families-only", "--model", "nonzoo_cnn,jnp_mlp", "--batch", "4", "--repeats", "2",
                      "--train-epochs", "0", "--out", str(out), "--quiet"])
    assert code == 0
    df = attrax.results.load(out)
    ratios = df[df.metric == "gradient_ratio"].set_index(["model", "method"]).value
    for model in ("nonzoo_cnn", "jnp_mlp"):
        for method in ("gradient", "lrp_epsilon", "deeplift", "guided_backprop"):
            assert ratios.get((model, method), 0) > 0, f"{method} on {model}: no ratio to the gradient"
    md = (out / "performance.md").read_text()
    assert "## Model families" in md and "| jnp_mlp | deeplift |" in md


def test_unknown_model_gets_did_you_mean(capsys):
    from attrax import perf

    assert perf.main(["--families-only", "--model", "nonzoo_cnm", "--quiet"]) == 2
    assert "did you mean" in capsys.readouterr().err.lower()


@pytest.mark.parametrize("name", ["nonzoo_cnn", "nonzoo_resnet", "vit_tiny", "jnp_mlp", "nnx_cnn"])
def test_examples_build_on_mnist_shapes(name):
    """The benchmark builds every family for 28x28x1 digits with 10 classes."""
    import jax
    import jax.numpy as jnp

    import attrax
    from attrax import examples

    x = jnp.zeros((3, 28, 28, 1))
    raw, params = examples.build(name, 0, x, num_classes=10)
    logits = attrax.forward(attrax.as_model(raw), params, x)
    assert logits.shape == (3, 10) and bool(jax.numpy.isfinite(logits).all())


def test_tiny_model_batch_is_one_compiled_call():
    """The CPU chunk budget is scaled by the model's activation bytes: a batch of 100 through the
    4 KB-per-image jnp MLP is ONE chunk for DeepLIFT (cost 3), not 3 chunks of 34 each paying a
    dispatch; a model as large as the reference (cnn_a) keeps the measured 128-evaluation budget."""
    import jax
    import jax.numpy as jnp

    import attrax
    from attrax import examples, harness

    x = jnp.zeros((100, 28, 28, 1))
    raw, params = examples.build("jnp_mlp", 0, x)
    model = attrax.as_model(raw)
    attrax.explain("deeplift", model, params, x, jnp.zeros(100, jnp.int32))
    chunks = [k[5] for k in model._cache if isinstance(k, tuple) and k[:2] == ("explain", "deeplift")]
    assert chunks == [100]
    if jax.default_backend() == "cpu":
        assert harness.default_evals_per_chunk(harness.REFERENCE_ACTIVATION_BYTES) == 128
        assert harness.default_evals_per_chunk(harness.activation_bytes(model, params, x)) >= 300


def test_forward_only_methods_get_the_larger_cpu_chunk_budget():
    """Occlusion and RISE (registry `forward_only=True`) hold no backward residuals, so on CPU
    their default chunk is FORWARD_ONLY_SCALE x the gradient budget (cnn_a, batch 20: occlusion
    costs 50 evaluations per image -> 10 images per chunk, not 2); a gradient method keeps the base
    budget, and an explicit evals_per_chunk still wins. The maps do not depend on the chunking."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import attrax
    from attrax import harness, methods

    if jax.default_backend() != "cpu":
        return
    assert methods.get("occlusion").meta.get("forward_only") and methods.get("rise").meta.get("forward_only")
    assert not methods.get("integrated_gradients").meta.get("forward_only")
    ref = harness.REFERENCE_ACTIVATION_BYTES
    assert harness.default_evals_per_chunk(ref, forward_only=True) == 128 * harness.FORWARD_ONLY_SCALE
    model = attrax.models.create("cnn_a")
    x = jax.random.uniform(jax.random.key(0), (20, 28, 28, 1))
    params = attrax.models.init(model, jax.random.key(1), x[:1])
    t = jnp.arange(20) % 10
    big = attrax.explain("occlusion", model, params, x, t)
    small = attrax.explain("occlusion", model, params, x, t, evals_per_chunk=128)
    chunks = sorted(k[5] for k in model._cache if isinstance(k, tuple) and k[:2] == ("explain", "occlusion"))
    assert chunks == [2, 10]
    np.testing.assert_allclose(np.asarray(big), np.asarray(small), rtol=1e-5, atol=1e-5)
    attrax.explain("integrated_gradients", model, params, x, t, steps=8)
    ig = [k[5] for k in model._cache if isinstance(k, tuple) and k[:2] == ("explain", "integrated_gradients")]
    assert ig == [harness.chunk_size_for(9, 20, 128)]
