"""Multi-host start-up: `jax.distributed.initialize` from the config or the environment."""

from __future__ import annotations

import os

import jax


def maybe_initialize_distributed(config) -> bool:
    """Initialises jax.distributed when the config or env names a coordinator; returns whether it did.

    Config keys (all optional, under `config.distributed`): coordinator_address, num_processes,
    process_id. Env fallbacks: POLARIS_COORDINATOR, POLARIS_NUM_PROCESSES, POLARIS_PROCESS_ID.
    """
    dist = config.get("distributed", None) if hasattr(config, "get") else None
    address = (dist and dist.get("coordinator_address")) or os.environ.get("POLARIS_COORDINATOR")
    if not address:
        return False
    num = int((dist and dist.get("num_processes")) or os.environ["POLARIS_NUM_PROCESSES"])
    pid = int((dist and dist.get("process_id") if dist and dist.get("process_id") is not None else None)
              or os.environ.get("POLARIS_PROCESS_ID", 0))
    if jax.devices()[0].platform == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
    return True
