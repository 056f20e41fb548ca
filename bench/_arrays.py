"""Host-to-device transfers that do not compile.

In the installed JAX, `jnp.asarray(numpy_array)` (no dtype) lifts the array through an identity
primitive that is compiled once per new shape and dtype (~50 ms each on this CPU: lowering plus
an XLA compile), the same as any eager op. `jax.device_put` transfers the buffer without a
program. Both canonicalize the dtype the same way (float64 -> float32 without x64) and give an
uncommitted, non-weak array; `to_device` is the one used on host data in the library.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def to_device(a: Any, dtype: Any = None) -> jax.Array:
    """`jnp.asarray(a, dtype)` for host data, as a transfer instead of a compiled identity."""
    if isinstance(a, np.ndarray | np.generic) and a.dtype != object:
        return jax.device_put(np.asarray(a, dtype))
    return jnp.asarray(a, dtype)
