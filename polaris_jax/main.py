"""`python -m polaris_jax.main --config=configs/NAME.py[:arg] --workdir=DIR [--config.key=value ...]`.

The config's `job` field picks the entry point; each returns a dict of final metrics, printed as one
JSON line at the end. When the config sets `plots`, process 0 then draws the run's training curves
(`tools.plots.plot_training_curves`: WORKDIR/curves.png) and adds `curves_png` to that line.
"""

from __future__ import annotations

import importlib
import json
import sys

from absl import app, flags
from ml_collections import config_flags

from polaris_jax import distributed  # defines --coordinator_address / --num_processes / --process_id
from polaris_jax.tools.plots import plot_training_curves

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")

# job name -> "module:function"; each function takes (config, workdir) and returns a metrics dict.
JOBS = {
    "sft": "polaris_jax.train.sft.loop:run",
    "grpo": "polaris_jax.train.grpo.loop:run",
    "eval": "polaris_jax.evals:run_eval",
    "demo": "polaris_jax.tools.demo:run",
    "merge": "polaris_jax.tools.merge:run",
    "difficulty_filter": "polaris_jax.tools.difficulty_filter:run",
}


def resolve_job(name: str):
    if name not in JOBS:
        raise ValueError(f"config.job={name!r} is not one of {sorted(JOBS)}")
    module, fn = JOBS[name].split(":")
    return getattr(importlib.import_module(module), fn)


def run_job(config, workdir: str) -> dict:
    """Runs `config.job` in `workdir` and returns its final metrics; with `config.plots` set, process 0 also
    writes WORKDIR/curves.png (`curves_png`: its path, None if the run logged no curves). A job that reports
    `curves_png` itself (its run lives in a subdirectory, as the demo's does) keeps its own."""
    result = resolve_job(config.job)(config, workdir)
    if config.get("plots") and "curves_png" not in result:
        import jax

        if jax.process_index() == 0:
            result["curves_png"] = plot_training_curves(workdir)
    return result


def main(argv):
    del argv
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    distributed.maybe_initialize_distributed(config)
    result = run_job(config, _WORKDIR.value)
    print(json.dumps(result, sort_keys=True, default=float))


def parse_flags(argv):
    """absl flag parsing, with a clear message for a `--config.key` that the config does not have."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        bad = [a.split("=")[0] for a in argv if a.startswith("--config.")]
        print(
            f"error: unknown config override among {bad} ({e}); the config is locked, so only existing "
            "keys can be overridden",
            file=sys.stderr,
        )
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
