"""Quick probe: ms per weight/arch step of the `original` net per mixed-op mode and precision (JAX only).
Usage: python scripts/probe_step.py [--batch 128] [--modes single,dense] [--steps 100]"""
import argparse, dataclasses, json, time
import jax, jax.numpy as jnp, numpy as np
from asose_jax import model, steps as steps_lib
from asose_jax.config import Config, ModelConfig, MixedOpConfig

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=128)
ap.add_argument("--modes", default="single,dense,topk,threshold")
ap.add_argument("--precisions", default="fp32,bf16")
ap.add_argument("--steps", type=int, default=100)
ap.add_argument("--tag", default="")
a = ap.parse_args()
rows = []
n = a.batch * 8
x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
y = jnp.asarray(np.random.default_rng(1).integers(0, 10, (n,), dtype=np.int32))
perm = jnp.arange(n, dtype=jnp.int32).reshape(8, a.batch)
for prec in a.precisions.split(","):
    for mode in a.modes.split(","):
        cfg = dataclasses.replace(Config(), precision=prec, model=ModelConfig(skeleton="original"),
                                  mixed_op=MixedOpConfig(mode=mode))
        spec = model.build_spec("original", 32, 4, cfg.model.ops)
        st = steps_lib.create_train_state(jax.random.PRNGKey(0), spec, cfg, 8)
        S = steps_lib.make_steps(spec, cfg, 8)
        res = {"mode": mode, "precision": prec}
        for name, fn in (("weight", S.weight_step), ("arch", S.arch_step)):
            t = time.perf_counter(); st = fn(st, x, y, perm, 0, S.sample(st)); jax.block_until_ready(st); comp = time.perf_counter() - t
            for i in range(10): st = fn(st, x, y, perm, i % 8, S.sample(st))
            jax.block_until_ready(st)
            t = time.perf_counter()
            for i in range(a.steps): st = fn(st, x, y, perm, i % 8, S.sample(st))
            jax.block_until_ready(st)
            res[f"{name}_ms"] = 1000 * (time.perf_counter() - t) / a.steps
            res[f"{name}_compile_s"] = comp
        rows.append(res)
        print(a.tag, json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}), flush=True)
