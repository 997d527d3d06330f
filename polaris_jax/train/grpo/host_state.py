"""The host side of a GRPO run's state, saved inside each orbax checkpoint beside the train state.

Everything else a step needs is a pure function of (config, step): sampler seeds, shuffling, the
Polaris substitution draw. What is left is where the prompt stream stands (with engine replicas, also
each process's next position) and the rollout-rescue buffer; `HostState` carries both through the
checkpoint's `data` item (grain's JSON handler, which accepts any object with get_state / set_state), so
a resumed run continues exactly.
"""

from __future__ import annotations

import json

import numpy as np

from polaris_jax.sampling import FINISH_EOS, FINISH_LENGTH
from polaris_jax.train.rl import RolloutRescueBuffer


class PersistentRescueBuffer(RolloutRescueBuffer):
    """A rollout-rescue buffer that can be written to and read from JSON."""

    def to_json(self) -> list:
        return [
            [prompt_id, {k: [v.dtype.str, v.tolist()] for k, v in row.items()}]
            for prompt_id, row in self._store.items()
        ]

    def load_json(self, entries: list) -> None:
        self._store.clear()
        for prompt_id, row in entries:
            stored = {k: np.asarray(values, dtype=np.dtype(dtype)) for k, (dtype, values) in row.items()}
            self._store[prompt_id] = _current_fields(stored)


def _current_fields(stored: dict) -> dict:
    """A row saved before the typed `Rollouts` batch ("rewards", "truncated_b") in today's fields."""
    if "rewards" in stored:
        stored["rewards_b"] = stored.pop("rewards")
    if "truncated_b" in stored:  # an untruncated row ended on an EOS id (stop sequences were not used then)
        stored["finish_b"] = np.where(stored.pop("truncated_b"), FINISH_LENGTH, FINISH_EOS).astype(np.int32)
    return stored


class HostState:
    """Prompt-stream position and rescue buffer; `snapshot()` freezes them for an async save."""

    def __init__(self, rescue: PersistentRescueBuffer | None = None):
        self.stage = 0
        self.position = 0
        self.positions: list[int] = []  # each process's next stream position (engine replicas, `replicas.py`)
        self.rescue = rescue
        self._frozen: bytes | None = None

    def to_bytes(self) -> bytes:
        payload = {
            "stage": self.stage,
            "position": self.position,
            "positions": self.positions,
            "rescue": None if self.rescue is None else self.rescue.to_json(),
        }
        return json.dumps(payload).encode()

    def start_stage(self, index: int) -> None:
        """A new stage reads its own stream from the start."""
        self.stage, self.position, self.positions = index, 0, []

    def snapshot(self) -> HostState:
        copy = HostState()
        copy._frozen = self.to_bytes()
        return copy

    # grain's checkpoint handler protocol --------------------------------------------------
    def get_state(self) -> bytes:
        return self._frozen if self._frozen is not None else self.to_bytes()

    def set_state(self, state: bytes) -> None:
        payload = json.loads(state.decode() if isinstance(state, bytes) else state)
        self.stage, self.position = int(payload["stage"]), int(payload["position"])
        self.positions = [int(p) for p in payload.get("positions", [])]
        if self.rescue is not None and payload.get("rescue") is not None:
            self.rescue.load_json(payload["rescue"])

    def start_prefetch(self) -> None:
        """Nothing to prefetch; grain calls this after a restore."""
