"""attrax: benchmark attribution (saliency) methods in JAX.

Python API::

    import attrax
    attrax.methods.names()
    ds = attrax.datasets.load("mnist_sample", split="test")
    model, params, info = attrax.models.train("cnn", attrax.datasets.load("mnist_sample", "train"))
    R = attrax.explain("integrated_gradients", model, params, ds.x[:8], ds.y[:8], key=0, steps=50)
    scores = attrax.evaluate("pixel_flipping", model, params, ds.x[:8], ds.y[:8], R, key=0)
    df = attrax.results.load("results/...")
"""

from __future__ import annotations

__version__ = "0.1.0"

from attrax import conf_resolvers, datasets, harness, methods, models, protocols, results  # noqa: E402
from attrax.errors import AttraxError  # noqa: E402
from attrax.harness import evaluate, explain, forward, resolve_target  # noqa: E402
from attrax.models import Model, as_model  # noqa: E402
from attrax.train import TrainConfig, train, train_module_accuracy  # noqa: E402

models.train = train  # `attrax.models.train(...)` as the architecture's API shows
from attrax import weights, zoo_large  # noqa: E402,F401  (ImageNet-scale zoo + weight import)

models.import_weights, models.save_weights, models.external = (  # `attrax.models.import_weights(...)`
    weights.import_weights, weights.save_weights, weights.external)

__all__ = [
    "AttraxError", "Model", "TrainConfig", "as_model", "conf_resolvers", "datasets", "evaluate", "explain",
    "forward", "harness", "methods", "models", "protocols", "resolve_target", "results", "train",
    "train_module_accuracy",
]
