"""Probe: does computing op choices inside the step cost host syncs? Times the `original` net's
single-path weight step (a) with sampling fused into the step, (b) with choices from a separate jitted
sampler passed in as an argument, (c) a one-op chain with no conditional; traces (b)."""
import dataclasses, json, os, sys, time
import jax, jax.numpy as jnp, numpy as np
from asose_jax import model, steps as steps_lib
from asose_jax.config import Config, ModelConfig, MixedOpConfig

prec = sys.argv[1] if len(sys.argv) > 1 else "fp32"
B = int(os.environ.get("PROBE_B", 128)); N = B * 8
x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (N, 32, 32, 3), dtype=np.uint8))
y = jnp.asarray(np.random.default_rng(1).integers(0, 10, (N,), dtype=np.int32))
perm = jnp.arange(N, dtype=jnp.int32).reshape(8, B)

def build(ops):
    cfg = dataclasses.replace(Config(), precision=prec, model=ModelConfig(skeleton="original", ops=ops),
                              mixed_op=MixedOpConfig(mode="single"))
    spec = model.build_spec("original", 32, 4, ops)
    return jax.jit(steps_lib.create_train_state, static_argnums=(1, 2, 3))(jax.random.PRNGKey(0), spec, cfg, 8), steps_lib.make_steps(spec, cfg, 8)

def timeit(name, st, call, n=int(os.environ.get("PROBE_N", 50))):
    t = time.perf_counter(); st = call(st, 0); jax.block_until_ready(st); comp = time.perf_counter() - t
    for i in range(5): st = call(st, i % 8)
    jax.block_until_ready(st)
    t = time.perf_counter()
    for i in range(n): st = call(st, i % 8)
    jax.block_until_ready(st)
    ms = 1000 * (time.perf_counter() - t) / n
    print(json.dumps({"variant": name, "precision": prec, "ms": round(ms, 3), "compile_s": round(comp, 1)}), flush=True)
    return st

st, S = build(model.PRIMITIVES if hasattr(model, "PRIMITIVES") else __import__("asose_jax.ops").ops.PRIMITIVES)
st = timeit("separate_sampler", st, lambda s, i: S.weight_step(s, x, y, perm, i, S.sample(s)))
out = os.environ.get("OUT")
if out:
    jax.profiler.start_trace(out + "/trace", create_perfetto_trace=True)
    for i in range(10): st = S.weight_step(st, x, y, perm, i % 8, S.sample(st))
    jax.block_until_ready(st)
    jax.profiler.stop_trace()
fused = jax.jit(lambda s, i: S.weight_step(s, x, y, perm, i, S.sample(s)), donate_argnums=0)
st = timeit("fused_sampler", st, fused)
st1, S1 = build(("sep_conv_3x3",))
timeit("static_sep3_chain", st1, lambda s, i: S1.weight_step(s, x, y, perm, i, S1.sample(s)))
