"""Re-explanations with the map's key: random-logit, model randomization and sensitivity give the
answers a class-blind, weight-blind or deterministic method must get; noise ceilings beside them."""

from __future__ import annotations

import jax
import numpy as np

import attrax


def test_class_blind_stochastic_map_scores_one_on_random_logit(linear):
    model, params, x, target, w = linear
    k = jax.random.key(3)
    r = attrax.explain("random", model, params, x, target, key=k)
    s = attrax.evaluate("random_logit", model, params, x, target, r, key=1, method="random", method_key=k)
    assert s.choices["similarity"] == "ssim"
    np.testing.assert_allclose(s.values["similarity"], 1.0, atol=1e-6)
    assert np.all(np.asarray(s.values["noise_ceiling"]) < 0.9)  # two keys: two different random maps
    g = attrax.explain("gradient", model, params, x, target)
    s = attrax.evaluate("random_logit", model, params, x, target, g, key=1, method="gradient")
    np.testing.assert_array_equal(s.values["noise_ceiling"], 1.0)  # deterministic
    assert np.all(np.asarray(s.values["similarity"]) < 0.99)  # the gradient of a linear model is the class's row


def test_random_control_fails_model_randomization(linear):
    model, params, x, target, w = linear
    k = jax.random.key(4)
    r = attrax.explain("random", model, params, x, target, key=k)
    s = attrax.evaluate("sanity_model_randomization", model, params, x, target, r, key=2, method="random",
                        method_key=k, metrics=["spearman", "ssim"])
    for m in ("cascading_spearman", "cascading_ssim", "independent_ssim"):
        np.testing.assert_allclose(s.values[m], 1.0, atol=1e-6, err_msg=m)  # it ignores the weights


def test_similarity_with_nothing_randomized_equals_the_noise_ceiling(linear):
    model, params, x, target, w = linear
    r = attrax.explain("gradient", model, params, x, target, key=7)
    s = attrax.evaluate("sanity_model_randomization", model, params, x, target, r, key=2, method="gradient",
                        method_key=7, metrics=["spearman_abs", "ssim"])
    for m in ("spearman_abs", "ssim"):
        np.testing.assert_allclose(s.values[f"unrandomized_{m}"], 1.0, atol=1e-6)
        np.testing.assert_array_equal(s.values[f"noise_ceiling_{m}"], 1.0)
    # a stochastic method: re-explained with the map's key it reproduces the map; its ceiling is lower
    r = attrax.explain("random", model, params, x, target, key=7)
    s = attrax.evaluate("sanity_model_randomization", model, params, x, target, r, key=2, method="random",
                        method_key=7, metrics=["spearman_abs"], modes=["cascading"])
    np.testing.assert_allclose(s.values["unrandomized_spearman_abs"], 1.0, atol=1e-6)
    assert np.all(np.asarray(s.values["noise_ceiling_spearman_abs"]) < 0.9)


def test_max_sensitivity_at_radius_zero_is_zero(linear):
    model, params, x, target, w = linear
    for meth, hp in (("random", {}), ("smoothgrad", {"n_samples": 4, "sigma": 0.3})):
        k = jax.random.key(11)
        r = attrax.explain(meth, model, params, x, target, key=k, **hp)
        for name in ("max_sensitivity", "avg_sensitivity"):
            s = attrax.evaluate(name, model, params, x, target, r, key=0, method=meth, method_hparams=hp,
                                method_key=k, radius=0.0, n_samples=3)
            np.testing.assert_allclose(s.values[name], 0.0, atol=1e-5, err_msg=(meth, name))


def test_data_randomization_flags_a_model_that_did_not_fit(mnist_train, mnist_test):
    from attrax.protocols import sanity

    tr, te = mnist_train.take(per_class=3), mnist_test.take(per_class=1)
    model = attrax.models.create("mlp", hidden=(8,))
    df = sanity.sanity_data_randomization("gradient", model, tr, te, train_config={"epochs": 1}, round_epochs=1,
                                          max_epochs=1, fit_accuracy=0.99, n_explain=4, metrics=["spearman"])
    scal = df[df.example == -1].set_index("metric")["value"]
    assert scal["fit_reached"] == 0.0
    assert df["flag"].str.contains("did not reach fit_accuracy 0.99").all()
    assert set(df.metric) >= {"spearman", "noise_ceiling_spearman"}
    np.testing.assert_array_equal(df.loc[df.metric == "noise_ceiling_spearman", "value"], 1.0)
    assert (df.loc[df.metric == "spearman", "direction"] == "lower").all()
