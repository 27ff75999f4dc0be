"""Where the batch-64 prefill's time goes (Mamba-1 130m, 1.4b; fp16): kernel time by name over traced calls."""
import collections, json, os, sys, tempfile
import jax, jax.numpy as jnp, numpy as np
from benchmarks.generation import random_model, prompts
from benchmarks.timing import gpu_kernels, time_ms, busy_fraction
from mamba_jax import Generator, MambaConfig

out = {}
for preset in sys.argv[1].split(","):
    config = MambaConfig.preset(preset)
    model = random_model(config, jnp.float16)
    ids = prompts(config, 64, 128)
    gen = Generator(model)
    first = int(np.asarray(gen(ids, max_new_tokens=1, state_dtype="float16"))[0, 0])
    run = lambda: gen(ids, max_new_tokens=128, eos_token_id=first, state_dtype="float16")
    res = {"prefill_ms": time_ms(run, reps=10)["median_ms"]}
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(3):
                jax.block_until_ready(run())
        ks = gpu_kernels(d)
    per = collections.Counter()
    count = collections.Counter()
    for name, _, dur in ks:
        per[name] += dur / 3
        count[name] += 1 / 3
    res["gpu_ms"] = sum(per.values()) / 1e3
    res["kernels"] = len(ks) / 3
    res["top"] = [(n, round(v, 1), round(count[n], 1)) for n, v in per.most_common(25)]
    out[preset] = res
    print(preset, json.dumps(res, indent=0), flush=True)
    json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "prefill_b64.json"), "w"))
