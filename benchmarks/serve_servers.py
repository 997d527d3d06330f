"""Server processes for benchmarks/serve.py: build the tiny model, start and stop ours and the peers, RSS."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
KEY = "tml-bench-key"  # Tinker keys start with tml-
WORDS = (
    "the quick brown fox jumps over a lazy dog while seven small birds sing about rivers mountains and old "
    "stone bridges under bright summer skies near quiet villages where people cook bread tell stories read "
    "books count stars plant trees build boats paint walls and learn new songs every morning"
).split()


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return dict(cpus=os.cpu_count(), cpu=cpu, python=platform.python_version())


def emit(section: str, body: dict) -> None:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(json.dumps(dict(section=section, date=now, machine=machine(), **body)), flush=True)


def log(message: str) -> None:
    print(f"[serve bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(directory: Path, sampling: bool = True) -> Path:
    """The tiny random Qwen3 with the real tokenizer, no EOS ids (every request runs to max_tokens), and with
    `sampling`, do_sample and no top-k: `transformers serve` takes do_sample from here (a request's
    temperature alone leaves it greedy; GenerationConfig's default top_k is 50). Without it, greedy
    requests take transformers' faster greedy-only path."""
    sys.path.insert(0, str(ROOT))
    from polaris_jax.data.tokenizer import qwen_tokenizer_offline
    from tests.serve.server_helpers import tiny_checkpoint

    tokenizer = qwen_tokenizer_offline("qwen3")
    tokenizer.save(directory)
    tiny_checkpoint(directory, tokenizer.vocab_size)
    extra = {"do_sample": True, "top_k": 0, "top_p": 1.0} if sampling else {}
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [], **extra}))
    config = json.loads((directory / "config.json").read_text())  # transformers 4.x (SkyRL tx) reads rope_theta
    config.setdefault("rope_theta", config.get("rope_parameters", {}).get("rope_theta", 10000.0))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def _family(pid: int) -> list[int]:
    """pid and its descendants."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    family, todo = [], [pid]
    while todo:
        family.append(todo.pop())
        todo += children.get(family[-1], [])
    return family


def rss_bytes(pid: int) -> int:
    """Resident bytes of pid and its descendants (0 if gone)."""
    total = 0
    for p in _family(pid):
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of pid and its descendants so far (to see that an idle peer stays idle)."""
    ticks = 0
    for p in _family(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / os.sysconf("SC_CLK_TCK")


class Server:
    """A server subprocess in its own session (its pid is its process group: SkyRL tx starts a child engine),
    logging to LOG; ready when `health` answers 200."""

    def __init__(self, name: str, cmd: list[str], health: str, port: int, log_path: Path, env: dict | None = None):
        self.name, self.cmd, self.port, self.log_path = name, cmd, port, log_path
        self.base = f"http://127.0.0.1:{port}"
        self.health = self.base + health
        self.env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
        self.proc: subprocess.Popen | None = None
        self.startup_s = 0.0

    def start(self, timeout_s: float) -> Server:
        log(f"starting {self.name}: {' '.join(self.cmd)}")
        start = time.perf_counter()
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True, cwd=ROOT
            )
        deadline = time.time() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited during start-up (rc {self.proc.returncode}): {self.tail()}")
            if time.time() > deadline:
                raise RuntimeError(f"{self.name} was not healthy within {timeout_s} s: {self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.health, timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        self.startup_s = round(time.perf_counter() - start, 1)
        log(f"{self.name} healthy after {self.startup_s} s")
        return self

    def tail(self, chars: int = 1500) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def rss(self) -> int:
        return rss_bytes(self.proc.pid) if self.proc else 0

    def cpu_s(self) -> float:
        return cpu_seconds(self.proc.pid) if self.proc else 0.0

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@contextlib.contextmanager
def running(server: Server, timeout_s: float):
    try:
        yield server.start(timeout_s)
    finally:
        server.stop()


def ours(model: Path, work: Path, args, max_slots: int, tag: str) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "polaris_jax.serve", "--model", str(model), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--api_key", KEY, "--workdir", str(work / f"polaris_{tag}")]
    cmd += ["--max_slots", str(max_slots), "--max_seq_len", str(args.max_seq_len), "--page_size", "16"]
    cmd += ["--prefill_chunk", "128"]
    return Server(f"polaris_jax.serve ({tag})", cmd, "/health", port, work / f"polaris_{tag}.log")


def peer_missing(python: str) -> str | None:
    if not python:
        return "skipped: no interpreter given"
    if not Path(python).is_file():
        return f"skipped: {python} not found (create the venv as in this script's docstring)"
    return None


def skyrl(model: Path, work: Path, args, python: str) -> Server:
    port = free_port()
    backend = dict(max_lora_adapters=4, max_lora_rank=max(args.rank, 1), sample_max_num_sequences=64)
    cmd = [python, "-m", "tx.tinker.api", "--base-model", str(model), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend-config", json.dumps(backend), "--checkpoints-base", str(work / "skyrl_ckpt")]
    cmd += ["--database-url", f"sqlite:///{work / 'skyrl.db'}"]
    # Its API server starts its engine as `uv run --extra tinker --extra jax -m tx.tinker.engine ARGS`, which
    # needs SkyRL's source checkout; a `uv` first on PATH runs `PYTHON -m tx.tinker.engine ARGS` instead.
    shim = work / "skyrl_bin"
    shim.mkdir(exist_ok=True)
    (shim / "uv").write_text(
        "#!/bin/sh\n"
        'while [ "$1" = run ] || [ "$1" = --extra ]; do [ "$1" = --extra ] && shift; shift; done\n'
        f'exec "{python}" "$@"\n'
    )
    (shim / "uv").chmod(0o755)
    env = dict(PATH=f"{shim}{os.pathsep}{os.environ.get('PATH', '')}")
    return Server("skyrl-tx", cmd, "/api/v1/healthz", port, work / "skyrl.log", env=env)


def tf_serve(model: Path, work: Path, python: str) -> Server:
    port = free_port()
    exe = Path(python).parent / "transformers"
    cmd = [str(exe), "serve", str(model), "--continuous-batching", "--attn-implementation", "sdpa", "--device", "cpu"]
    cmd += ["--dtype", "float32"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    return Server("transformers serve", cmd, "/health", port, work / "tfserve.log")


# ---------------------------------------------------------------------------------------------- training


def resolved(value):
    """A future's result (tinker 0.38 returns futures where older SDKs return the client itself)."""
    return value.result() if hasattr(value, "result") else value
