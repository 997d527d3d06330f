"""A tiny random Qwen3 checkpoint with the real Qwen3 tokenizer, and a server subprocess over it."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import httpx

EOS = [151645, 151643]  # <|im_end|>, <|endoftext|>: written to generation_config.json


def tiny_checkpoint(path, vocab_size: int):
    """Saves a tiny Qwen3 (hidden 32, 2 layers) with large random weights to `path`; returns the HF model."""
    import torch
    import transformers

    from tests.models.hf_factory import hf_config

    torch.manual_seed(0)
    config = hf_config(
        "qwen3",
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        head_dim=8,
        intermediate_size=48,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    model = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # large random weights: every component shows in the logits
        for name, p in model.named_parameters():
            noise = torch.randn_like(p)
            scale = 4.0 if name == "lm_head.weight" else 0.5  # peaked logits: greedy has clear winners
            p.copy_(1.0 + 0.2 * noise if "norm" in name else scale * noise / p.shape[-1] ** 0.5)
    model.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": EOS}))
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(args: list[str], port: int, timeout_s: float = 180):
    """Starts `python -m polaris_jax.serve ARGS --port PORT`, waits for /health, yields the base URL, and
    stops the process by its pid."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "polaris_jax.serve", *args, "--port", str(port)], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout_s
        while True:
            assert proc.poll() is None, "the server exited during start-up"
            assert time.time() < deadline, f"the server was not healthy within {timeout_s} s"
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
