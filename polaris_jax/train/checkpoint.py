"""Train checkpoints on orbax: async save, keep-N, exact resume of state and data iterator; HF export.

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every=500, keep=3)
    state = ckpt.restore_latest(state, data_iterator) or state   # None when there is nothing to resume
    ...
    ckpt.maybe_save(step, state, data_iterator)
    ckpt.close()                                                 # waits for the last async save

A checkpoint step directory holds `state` (params, frozen, opt_state, step, rng as an orbax PyTree)
and `data` (the grain iterator state, one JSON file per process). With `lora_only=True` the frozen
base weights are left out: they are reloaded from the run's base checkpoint on resume, so a LoRA
checkpoint of an 8B model is megabytes. Orbax writes each step into a temporary directory and
renames it when complete, so a run killed mid-save resumes from the previous step.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp

from polaris_jax.models.hf_io import save_hf


def abstract_like(tree):
    """ShapeDtypeStructs carrying each leaf's sharding: what orbax restores into (None leaves kept)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
    """An orbax CheckpointManager for the train state and the data iterator."""

    def __init__(
        self, directory: str, *, every: int = 1000, keep: int = 3, async_save: bool = True, lora_only: bool = False
    ):
        if every < 1:
            raise ValueError(f"checkpoint every must be >= 1 step, got {every}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.every, self.lora_only = every, lora_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep > 0 else None, create=True, enable_async_checkpointing=async_save
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def _saved_part(self, state: dict) -> dict:
        return {k: v for k, v in state.items() if not (self.lora_only and k == "frozen")}

    def save(self, step: int, state: dict, data_iterator=None) -> bool:
        """Starts saving (returns once device buffers are copied, so `state` may then be donated)."""
        items = {"state": ocp.args.StandardSave(self._saved_part(state))}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def maybe_save(self, step: int, state: dict, data_iterator=None, *, last: bool = False) -> bool:
        if (step % self.every == 0 or last) and step not in self.all_steps():
            return self.save(step, state, data_iterator)
        return False

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, step: int, state_template: dict, data_iterator=None) -> dict:
        """The state saved at `step`, placed like `state_template`; also rewinds `data_iterator` in place."""
        if step not in self.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; available steps: {self.all_steps() or 'none'}"
            )
        items = {"state": ocp.args.StandardRestore(abstract_like(self._saved_part(state_template)))}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        state = dict(restored["state"])
        if self.lora_only:
            state["frozen"] = state_template["frozen"]
        return state

    def restore_latest(self, state_template: dict, data_iterator=None) -> dict | None:
        step = self.latest_step()
        return None if step is None else self.restore(step, state_template, data_iterator)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def open_existing(directory: str, **kwargs) -> Checkpointer:
    """A Checkpointer over a directory that must already hold checkpoints (resume_from, evaluation)."""
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    ckpt = Checkpointer(directory, **kwargs)
    if ckpt.latest_step() is None:
        raise FileNotFoundError(
            f"checkpoint directory {directory} holds no finished checkpoint "
            f"(expected numbered step directories written by orbax)"
        )
    return ckpt


def export_hf(model_config, params, path: str, *, tokenizer_dir: str | None = None) -> str:
    """Hugging Face layout via `save_hf` (LoRA adapters merged in). Every process calls it (sharded
    tensors are all-gathered); only process 0 writes."""
    return save_hf(model_config, params, path, tokenizer_dir=tokenizer_dir, overwrite=True)
