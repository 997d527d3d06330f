"""Multi-host start-up: `jax.distributed.initialize` from flags, the config or the environment.

One process per host (or per GPU) runs the same command; they find each other through a
coordinator (process 0's host:port). Settings are looked up in this order, first hit wins:

  1. absl flags   --coordinator_address=HOST:PORT --num_processes=N --process_id=I
                  (or --distributed=auto on Cloud TPU / SLURM / Kubernetes, where JAX detects the cluster)
  2. the config   config.distributed.{coordinator_address, num_processes, process_id, auto}
  3. environment  POLARIS_COORDINATOR_ADDRESS, POLARIS_NUM_PROCESSES, POLARIS_PROCESS_ID,
                  POLARIS_DISTRIBUTED=auto  (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
                  JAX_PROCESS_ID are honoured too)

With none of these set, nothing happens and the run is single-process. CPU processes exchange
collectives over gloo, so the multi-host code path can be exercised on one machine.

The flags are defined when this module is imported; an entry point that wants them must import it
before `app.run` parses the command line.
"""

from __future__ import annotations

import dataclasses
import os

from absl import flags

_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "", ["", "auto", "off"], "'auto': let JAX detect the cluster; 'off': never initialise."
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0's coordinator service.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")

_ENV_NAMES = {  # setting -> environment variables, first set one wins
    "coordinator_address": ("POLARIS_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("POLARIS_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("POLARIS_PROCESS_ID", "JAX_PROCESS_ID"),
    "mode": ("POLARIS_DISTRIBUTED",),
}


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """Where the coordinator is and who this process is; `mode` is '', 'auto' or 'off'."""

    coordinator_address: str = ""
    num_processes: int | None = None
    process_id: int | None = None
    mode: str = ""

    @property
    def enabled(self) -> bool:
        return self.mode == "auto" or (self.mode != "off" and bool(self.coordinator_address))

    def validate(self) -> DistributedSettings:
        if self.mode not in ("", "auto", "off"):
            raise ValueError(f"distributed mode {self.mode!r} is not '', 'auto' or 'off'")
        if self.mode == "auto" or not self.enabled:
            return self
        if ":" not in self.coordinator_address:
            raise ValueError(f"coordinator_address {self.coordinator_address!r} must be host:port")
        if self.num_processes is None or self.process_id is None:
            raise ValueError(
                f"coordinator_address={self.coordinator_address!r} is set, so num_processes and "
                f"process_id are needed too (got {self.num_processes}, {self.process_id})"
            )
        if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"process_id={self.process_id} must be in [0, num_processes={self.num_processes})")
        return self


def _from_flags() -> dict:
    if not flags.FLAGS.is_parsed():
        return {}
    values = {
        "coordinator_address": _COORDINATOR.value,
        "num_processes": _NUM_PROCESSES.value,
        "process_id": _PROCESS_ID.value,
        "mode": _DISTRIBUTED.value,
    }
    return {k: v for k, v in values.items() if v not in (None, "")}


def _from_config(config) -> dict:
    section = config.get("distributed", None) if config is not None and hasattr(config, "get") else None
    if section is None:
        return {}
    values = {
        "coordinator_address": section.get("coordinator_address", ""),
        "num_processes": section.get("num_processes", None),
        "process_id": section.get("process_id", None),
        "mode": "auto" if section.get("auto", False) else "",
    }
    return {k: v for k, v in values.items() if v not in (None, "")}


def _from_env(environ) -> dict:
    out = {}
    for key, names in _ENV_NAMES.items():
        value = next((environ[n] for n in names if environ.get(n, "") != ""), None)
        if value is None:
            continue
        if key in ("num_processes", "process_id"):
            try:
                value = int(value)
            except ValueError:
                raise ValueError(f"environment variable for {key} holds {value!r}, not an integer") from None
        out[key] = value
    return out


def resolve_settings(config=None, environ=None) -> DistributedSettings:
    """Merges flags > config > environment, field by field, and validates the result."""
    merged = {**_from_env(os.environ if environ is None else environ), **_from_config(config), **_from_flags()}
    return DistributedSettings(**merged).validate()


def use_gloo_for_cpu_collectives() -> None:
    """Cross-process collectives on CPU devices go over gloo; must run before the first JAX computation."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def maybe_initialize_distributed(config=None, environ=None) -> bool:
    """Initialises jax.distributed when flags, config or env ask for it; returns whether it did.

    Must be called before anything touches a JAX backend (`jax.devices()`, array creation).
    """
    settings = resolve_settings(config, environ)
    if not settings.enabled:
        return False
    import jax

    use_gloo_for_cpu_collectives()
    if settings.mode == "auto":
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(
            coordinator_address=settings.coordinator_address,
            num_processes=settings.num_processes,
            process_id=settings.process_id,
        )
    return True


def wait_for_process_zero(name: str) -> None:
    """A barrier after files that process 0 alone writes into the (shared) workdir, before others read them."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
