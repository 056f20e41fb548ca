"""ViT-Ti/16 at 224, batch 8: input gradient with the patch embedding as XLA's strided convolution
(zoo_large today) vs as reshape-to-patches + one matrix product (the same values)."""
import time, statistics, jax, jax.numpy as jnp, numpy as np, flax.linen as nn, attrax
from attrax import perf_scale as ps
from attrax.methods import input_gradient

m = attrax.models.create("vit", embed_dim=192, depth=12, num_heads=3)
x = jax.random.uniform(jax.random.key(0), (8, 224, 224, 3)); t = jnp.zeros((8,), jnp.int32)
p = ps.fast_random_init(m.module, x[:1])

def patchify(ctx_module, x):
    k = ctx_module.get_variable("params", "kernel"); b = ctx_module.get_variable("params", "bias")
    ph, pw, c, d = k.shape
    n, h, w, _ = x.shape
    xp = x.reshape(n, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, h // ph, w // pw, ph * pw * c)
    return xp @ k.reshape(ph * pw * c, d) + b

def interceptor(next_fun, args, kwargs, ctx):
    if isinstance(ctx.module, nn.Conv) and ctx.module.name == "patch_embed" and ctx.method_name == "__call__":
        return patchify(ctx.module, args[0])
    return next_fun(*args, **kwargs)

def model_mm(pp, z):
    with nn.intercept_methods(interceptor):
        return m.module.apply(pp, z)

g_conv = jax.jit(lambda pp, z, tt: input_gradient(lambda u: m(pp, u), z, tt)[1])
g_mm = jax.jit(lambda pp, z, tt: input_gradient(lambda u: model_mm(pp, u), z, tt)[1])
f_conv = jax.jit(lambda pp, z: m(pp, z)); f_mm = jax.jit(model_mm)
print("max |logit diff|", float(jnp.abs(f_conv(p, x) - f_mm(p, x)).max()),
      "max |grad diff|", float(jnp.abs(g_conv(p, x, t) - g_mm(p, x, t)).max()), "grad scale", float(jnp.abs(g_conv(p, x, t)).max()))
for rnd in range(3):  # interleaved rounds
    for name, f in (("conv", lambda: g_conv(p, x, t)), ("matmul", lambda: g_mm(p, x, t))):
        w, c = [], []
        for _ in range(3):
            t0, c0 = time.perf_counter(), time.process_time(); jax.block_until_ready(f())
            w.append(time.perf_counter() - t0); c.append(time.process_time() - c0)
        print(f"round {rnd} input gradient, patch embed as {name:6s}: wall {statistics.median(w):.3f} s, CPU {statistics.median(c):.3f} s", flush=True)
