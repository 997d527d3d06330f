"""The forward pass on a (fsdp=4, tensor=2) mesh of 8 fake CPU devices equals the 1-device result
(dense attention, MoE on an expert axis, and blockwise attention)."""

import os
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from polaris_jax.models import load_hf, logits, make_mesh, param_shardings
    from tests.conftest import GOLDEN_DIR
    assert len(jax.devices()) == 8
    flash = dict(attention_impl="flash", attention_block_q=3, attention_block_kv=5)
    for name, mesh_shape, overrides in [("qwen3_untied", {"fsdp": 4, "tensor": 2}, {}),
                                        ("qwen2", {"fsdp": 4, "tensor": 2}, {}),
                                        ("qwen3_moe", {"fsdp": 2, "tensor": 2, "expert": 2}, {}),
                                        ("qwen3_untied", {"fsdp": 4, "tensor": 2}, flash)]:
        golden = np.load(GOLDEN_DIR / name / "golden.npz")
        config, params = load_hf(GOLDEN_DIR / name, dtype="float32", config_overrides=overrides)
        reference = np.asarray(logits(config, params, golden["input_ids"], golden["attention_mask"]))
        mesh = make_mesh(mesh_shape)
        shardings = param_shardings(config, mesh)
        _, sharded = load_hf(GOLDEN_DIR / name, dtype="float32", shardings=shardings, config_overrides=overrides)
        leaves = jax.tree.leaves(sharded)
        assert any(len(l.sharding.device_set) == 8 and not l.sharding.is_fully_replicated for l in leaves)
        out = np.asarray(logits(config, sharded, golden["input_ids"], golden["attention_mask"]))
        err = np.abs(out - reference).max()
        assert err <= 1e-5, (name, err)
        print(name, "ok", err)
""")


def test_sharded_forward_equals_single_device():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" ok ") == 4
