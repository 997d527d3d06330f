"""Multi-LoRA decoding: requests on different adapters share the engine's batches, and each one gets what an
engine over its adapter merged into the base weights (`merge_lora`) gives it alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from polaris_jax.models.lora import merge_lora, stack_adapters
from polaris_jax.sampling.engine import Engine
from polaris_jax.sampling.engine_settings import EngineSettings
from polaris_jax.sampling.requests import Request, RequestError
from polaris_jax.train import adapters
from tests.models.test_multi_lora import random_adapter
from tests.sampling.test_engine import SMALL, finish

SPECS = (  # slot 0 is the base model
    adapters.AdapterSpec(rank=2, seed=1, train_mlp=False),
    adapters.AdapterSpec(rank=4, seed=2, train_unembed=True, alpha=8.0),
)
STACKED = dataclasses.replace(SMALL, adapter_slots=len(SPECS) + 1)


def _requests(rng, vocab):
    out = []
    for i in range(9):
        slot, greedy = i % 3, i % 2 == 0
        out.append(
            Request(
                prompt=rng.randint(0, vocab, rng.randint(3, 20)).tolist(),
                max_new_tokens=int(rng.randint(5, 24)),
                temperature=0.0 if greedy else 1.0,
                n=1 if greedy else 2,
                seed=i,
                id=f"r{i}",
                adapter=slot,
            )
        )
    return out


def test_each_request_decodes_as_its_merged_adapter_alone(tied):
    config, base = tied.config, tied.params
    trained = [random_adapter(config, spec) for spec in SPECS]
    slots = [None] + [(spec.alpha / spec.rank, a) for spec, a in zip(SPECS, trained)]
    targets = adapters.AdapterSpec(train_unembed=True).targets
    stack = stack_adapters(config, slots, rank=4, targets=targets)
    engine = Engine(config, adapters.with_adapter(base, stack), STACKED)
    requests = _requests(np.random.RandomState(0), config.vocab_size)
    for request in requests:
        engine.submit(request)
    finish(engine)
    got = {r.id: engine.pop_finished(r.id) for r in requests}
    assert engine.totals["decode_tokens"] > 0
    for slot in range(len(slots)):
        params = base
        if slot:
            spec = SPECS[slot - 1]
            _, params = merge_lora(spec.model_config(config), adapters.with_adapter(base, trained[slot - 1]))
        alone = Engine(config, params, SMALL)
        mine = [dataclasses.replace(r, adapter=0) for r in requests if r.adapter == slot]
        for request, completions in zip(mine, alone.run(mine)):
            for c, expected in zip(got[request.id], completions):
                assert c.tokens == expected.tokens, (request.id, slot)
                np.testing.assert_allclose(c.logprobs, expected.logprobs, atol=2e-4)
    # The adapters matter: slot 2's greedy request differs from the base model's answer to it.
    base_answer = Engine(config, base, SMALL).run([dataclasses.replace(requests[2], adapter=0)])[0][0]
    assert base_answer.tokens != got["r2"][0].tokens


def test_adapter_slot_out_of_range_is_refused(tied):
    engine = Engine(tied.config, tied.params, SMALL)  # no stack: only slot 0
    with pytest.raises(RequestError, match=r"request 'x': adapter=1 is not one of the engine's 0 adapter slots"):
        engine.submit(Request(prompt=[1, 2], max_new_tokens=2, id="x", adapter=1))
    with pytest.raises(RequestError, match=r"adapter=-1 must be an integer >= 0"):
        engine.submit(Request(prompt=[1, 2], max_new_tokens=2, id="y", adapter=-1))
    with pytest.raises(ValueError, match="adapter_slots=-2"):
        EngineSettings(adapter_slots=-2).check(tied.config, 1)
