"""Runs a test module's function in a subprocess with 8 fake CPU devices (the suite itself runs on 1)."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_on_8_devices(module: str, call: str, timeout: int = 900):
    """json.loads of what `module.call` (e.g. "worker('slow')") returns, evaluated with 8 fake devices."""
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)
    )
    code = f"import json, {module} as t; print('RESULT', json.dumps(t.{call}))"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("RESULT ", 1)[1])
