"""The engine compiles nothing after `warmup()` whatever it serves, and on a mesh of 8 fake CPU devices (in a
subprocess: the suite runs on 1) it gives the single-device outputs, with the pages' kv heads over `tensor`."""

import jax
import numpy as np

from polaris_jax.sampling.engine import Engine
from polaris_jax.sampling.requests import Request
from tests.fake_devices import run_on_8_devices
from tests.sampling.conftest import compilations
from tests.sampling.test_engine import SMALL, finish


def test_serving_a_mix_compiles_nothing_after_warmup(tied):
    engine = Engine(tied.config, tied.params, SMALL)
    engine.warmup()
    new_params = jax.tree.map(lambda p: p * 1.01, tied.params)  # new values, same shapes: built before counting
    rng = np.random.RandomState(3)
    requests = [
        Request(
            rng.randint(1, 200, size=length).tolist(),
            max_new_tokens=int(max_new),
            n=n,
            id=i,
            seed=i,
            **sampling,
        )
        for i, (length, max_new, n, sampling) in enumerate(
            [
                (1, 9, 1, dict(temperature=0.0)),
                (37, 40, 3, dict(temperature=0.8, top_p=0.9)),
                (12, 25, 2, dict(temperature=1.0, top_k=7, eos_token_ids=(3, 4, 5, 6, 7))),
                (60, 50, 1, dict(temperature=0.6, min_p=0.05, stop_sequences=([5, 6], [7, 8, 9]))),
                (5, 70, 4, dict(temperature=1.2, top_k=3, top_p=0.5)),
            ]
        )
    ]
    with compilations() as compiled:
        for request in requests[:3]:
            engine.submit(request)
        for _ in range(4):
            engine.step()
        engine.update_params(new_params)
        for request in requests[3:]:
            engine.submit(request)
        finish(engine)
    assert compiled == [], f"compiled after warmup: {compiled}"
    assert all(engine.finished(r.id) for r in requests)
    assert {engine.last_metrics["decode_rows"]} <= {1, 2, 4, 8}


def sharded_run() -> dict:
    """Runs inside the subprocess: greedy and sampled requests on a data x fsdp x tensor mesh."""
    from polaris_jax.models import make_mesh, param_shardings
    from polaris_jax.models.sharding import shard_params
    from tests.sampling.conftest import golden

    model = golden("qwen3_tied")
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params = shard_params(model.params, param_shardings(model.config, mesh))
    engine = Engine(model.config, params, SMALL, mesh=mesh)
    completions = engine.run(_requests(model))
    spec = [list(a) if isinstance(a, tuple) else a for a in engine._pages["k"][0].sharding.spec]
    engine.pool.check_full()
    return dict(
        devices=jax.device_count(),
        tokens=[c.tokens for per_request in completions for c in per_request],
        logprobs=[c.logprobs for per_request in completions for c in per_request],
        expected=model.new_ids,
        page_spec=spec,
    )


def _requests(model) -> list[Request]:
    greedy = [Request(p, max_new_tokens=64, temperature=0.0, id=i) for i, p in enumerate(model.prompts)]
    sampled = Request(model.prompts[0], max_new_tokens=20, temperature=1.0, top_p=0.95, n=3, seed=4, id="s")
    return greedy + [sampled]


def test_engine_on_eight_device_mesh(tied):
    result = run_on_8_devices("tests.sampling.test_engine_mesh", "sharded_run()", timeout=600)
    assert result["devices"] == 8
    assert result["tokens"][: len(tied.prompts)] == result["expected"]
    single = [c for per_request in Engine(tied.config, tied.params, SMALL).run(_requests(tied)) for c in per_request]
    assert result["tokens"] == [c.tokens for c in single]
    assert len({tuple(t) for t in result["tokens"][-3:]}) == 3  # sampled: three different rows
    for mesh_row, c in zip(result["logprobs"], single):
        np.testing.assert_allclose(mesh_row, c.logprobs, rtol=1e-4, atol=1e-4)
    assert result["page_spec"][0] == "tensor"  # kv heads over tensor
