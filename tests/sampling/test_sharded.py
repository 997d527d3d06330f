"""Params and batch sharded on a mesh of 8 fake CPU devices (in a subprocess: the suite runs on 1) give the
single-device outputs: greedy tokens, and sampled tokens and log-probabilities for the same seed."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from polaris_jax.sampling import generate

REPO = pathlib.Path(__file__).resolve().parents[2]
# Sampled, with a truncation: row r draws from fold_in(key(seed), r) whatever the mesh or batch around it.
SAMPLED = dict(max_new_tokens=16, temperature=1.0, top_p=0.95, n=2, seed=4)


def sharded_run() -> dict:
    """Runs inside the subprocess: greedy and sampled generation on a data x fsdp x tensor mesh."""
    import jax

    from polaris_jax.models import make_mesh, param_shardings
    from polaris_jax.models.sharding import shard_params
    from polaris_jax.sampling import decode_loop
    from tests.sampling.conftest import golden, spy_decode_batches

    model = golden("qwen3_tied")
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params = shard_params(model.params, param_shardings(model.config, mesh))
    seen = {}
    original = decode_loop.decode

    def spec(x):  # JSON-friendly PartitionSpec, padded with None to the array's rank
        axes = [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]
        return axes + [None] * (x.ndim - len(axes))

    def spy(*args, **kwargs):
        state = original(*args, **kwargs)
        seen["cache_k"] = spec(state.cache["k"][0].data)
        seen["tokens"] = spec(state.tokens_bs)
        return state

    decode_loop.decode = spy
    greedy = generate(model.config, params, model.prompts, max_new_tokens=64, temperature=0.0, mesh=mesh)
    sampled = generate(model.config, params, model.prompts, **SAMPLED, mesh=mesh)
    # Rows of prompts 0 and 1 end early (EOS), so the 12-row batch (bucket 16) is compacted to 4 rows.
    batches = spy_decode_batches(setattr)
    eos = (model.new_ids[0][4], model.new_ids[1][6])
    compacted = generate(
        model.config, params, model.prompts, max_new_tokens=64, temperature=0.0, n=4, eos_token_ids=eos, mesh=mesh
    )
    return dict(
        devices=jax.device_count(),
        greedy=greedy.tokens,
        sampled=sampled.tokens,
        sampled_logprobs=[[float(x) for x in row] for row in sampled.logprobs],
        expected=model.new_ids,
        compacted=compacted.tokens,
        compacted_batches=batches,
        **seen,
    )


@pytest.mark.slow  # ~18 s; the engine on the same mesh (test_engine_mesh.py) runs in make test
def test_generate_on_eight_device_mesh(tied):
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)
    )
    code = "import json, tests.sampling.test_sharded as t; print('RESULT', json.dumps(t.sharded_run()))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["devices"] == 8
    assert result["greedy"] == result["expected"]
    single = generate(tied.config, tied.params, tied.prompts, **SAMPLED)  # this process: one device, no mesh
    assert len(result["sampled"]) == 6 and all(len(t) == 16 for t in result["sampled"])
    assert result["sampled"] == single.tokens
    assert len(set(map(tuple, single.tokens))) == 6  # the samples differ: this is not greedy decoding again
    for mesh_row, single_row in zip(result["sampled_logprobs"], single.logprobs):
        np.testing.assert_allclose(mesh_row, single_row, rtol=1e-4, atol=1e-4)
    # Batch over (data, fsdp), kv heads over tensor; the decode batch was padded to a multiple of 4.
    assert result["cache_k"] == [["data", "fsdp"], "tensor", None, None]
    assert result["tokens"] == [["data", "fsdp"], None]
    assert result["compacted_batches"] == [16, 4]
    expected = result["expected"]
    ends = [expected[0].index(expected[0][4]) + 1, expected[1].index(expected[1][6]) + 1, 64]
    assert result["compacted"] == [row[:end] for row, end in zip(expected, ends) for _ in range(4)]
