"""`python -m polaris_jax.serve --model=DIR_OR_PRESET`: the Tinker REST surface and OpenAI's API over one model.

--model is a Hugging Face checkpoint directory (loaded in its own dtype: an fp32 checkpoint is served and
trained in fp32) or a preset name (`polaris_jax.models.PRESETS`: random weights, the real Qwen tokenizer,
for trying the service out). Generation stops at every id of `generation_config.json`'s eos_token_id.
State (sessions, runs, checkpoint paths, future results) lives in --db, SQLite under --workdir by default;
checkpoints are orbax directories under --workdir. /health answers 200 once the engine is warm.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from polaris_jax.models.config import PAGED_ATTENTION_IMPLS
from polaris_jax.sampling.engine import EngineSettings

GIL_SWITCH_INTERVAL_S = 0.0005
DEFAULT_WORKDIR = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "polaris_jax", "serve")


def parse_args(argv=None) -> argparse.Namespace:
    defaults = EngineSettings()
    p = argparse.ArgumentParser(prog="python -m polaris_jax.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a Hugging Face checkpoint directory, or a preset name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api_key", default=os.environ.get("POLARIS_API_KEY"), help="required of clients when set")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help="checkpoints, the SQLite database, serve.log")
    p.add_argument("--db", default=None, help="SQLAlchemy URL (default: sqlite:///WORKDIR/serve.db)")
    p.add_argument("--max_loras", type=int, default=4, help="adapter slots of the multi-LoRA sampling engine")
    p.add_argument("--max_slots", type=int, default=defaults.max_slots, help="samples decoding at once")
    p.add_argument("--num_pages", type=int, default=0, help="KV pages (0: enough for max_slots full sequences)")
    p.add_argument("--page_size", type=int, default=defaults.page_size)
    p.add_argument("--max_seq_len", type=int, default=0, help="prompt + new tokens (0: min(4096, the model's))")
    p.add_argument("--prefill_chunk", type=int, default=defaults.prefill_chunk)
    p.add_argument("--decode_block", type=int, default=defaults.decode_block)
    p.add_argument("--max_queue", type=int, default=defaults.max_queue)
    p.add_argument(
        "--attention_kernel",
        default=defaults.attention_kernel,
        choices=PAGED_ATTENTION_IMPLS,
        help="decode attention: auto (the platform's kernel) | xla | gpu | tpu | cpu",
    )
    p.add_argument("--max_batch_tokens", type=int, default=16384, help="padded tokens per forward_backward pass")
    p.add_argument("--config", default=None, help="a settings file, e.g. configs/serve.py:h100 (flags given win)")
    args = p.parse_args(argv)
    if args.config:
        p.set_defaults(**config_defaults(args.config, vars(args)))
        args = p.parse_args(argv)
    if args.max_loras < 1:
        p.error(f"--max_loras={args.max_loras} must be >= 1")
    return args


def config_defaults(spec: str, flags: dict) -> dict:
    """`get_config(arg)` of the file `PATH[:arg]`, as flag defaults; SystemExit naming a bad key or file."""
    import importlib.util

    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise SystemExit(f"--config: {path!r} is not a file")
    module_spec = importlib.util.spec_from_file_location("serve_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    values = dict(module.get_config(arg))
    unknown = sorted(set(values) - set(flags) - {"config"})
    if unknown:
        raise SystemExit(f"--config: {unknown} are not flags of python -m polaris_jax.serve")
    return values


def load_model(spec: str, workdir: str):
    """(config, params, tokenizer, absolute directory holding the tokenizer files) of a checkpoint or preset."""
    from polaris_jax.data.tokenizer import Tokenizer, qwen_tokenizer_offline
    from polaris_jax.models import PRESETS, init_params, load_hf, preset

    path = Path(spec)
    if path.is_dir():
        config, params = load_hf(path, dtype=None)
        return config, params, Tokenizer.from_dir(path), str(path.resolve())
    if spec not in PRESETS:
        raise SystemExit(f"--model: {spec!r} is neither a checkpoint directory nor a preset ({sorted(PRESETS)})")
    import jax

    config = preset(spec)
    tokenizer = qwen_tokenizer_offline("r1_distill_qwen" if spec.startswith("r1_distill") else "qwen3")
    directory = Path(workdir, "tokenizers", spec).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(directory)
    return config, init_params(config, jax.random.key(0)), tokenizer, str(directory)


def main(argv=None) -> None:
    args = parse_args(argv)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        filename=Path(args.workdir) / "serve.log",
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    import uvicorn  # the serve extra; imported late so --help works without it

    from polaris_jax.sampling.engine import Engine
    from polaris_jax.serve.app import Served, create_app
    from polaris_jax.serve.base_model import BaseModel, eos_ids
    from polaris_jax.serve.engine_thread import EngineThread
    from polaris_jax.serve.futures import Futures
    from polaris_jax.serve.store import Store
    from polaris_jax.serve.tinker_api import Tinker
    from polaris_jax.serve.tinker_sampling import Sampling
    from polaris_jax.serve.tinker_training import Training

    config, params, tokenizer, directory = load_model(args.model, args.workdir)
    max_seq_len = args.max_seq_len or min(4096, config.max_position_embeddings)
    pages = args.num_pages or args.max_slots * -(-max_seq_len // args.page_size) + 2
    settings = EngineSettings(
        max_slots=args.max_slots,
        num_pages=pages,
        page_size=args.page_size,
        max_seq_len=max_seq_len,
        prefill_chunk=args.prefill_chunk,
        decode_block=args.decode_block,
        max_queue=args.max_queue,
        attention_kernel=args.attention_kernel,
    )
    thread = EngineThread(Engine(config, params, settings))
    thread.start()
    # The engine thread needs the GIL for a moment between device calls; under load the HTTP thread would
    # otherwise keep it for the default 5 ms switch interval each time, idling the engine.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    names = tuple(dict.fromkeys([args.model, Path(args.model).name]))
    eos = eos_ids(Path(directory), tokenizer)
    base = BaseModel(names, directory, config, params, eos, max_seq_len)
    served = Served(thread, tokenizer, base, args.api_key)
    store = Store(args.db or f"sqlite:///{Path(args.workdir, 'serve.db').resolve()}")
    futures = Futures(store)
    tinker = Tinker(
        base,
        store,
        futures,
        Training(base, store, futures, args.workdir, args.max_batch_tokens),
        Sampling(base, store, futures, thread, args.max_loras),
        tokenizer,
    )
    try:
        uvicorn.run(create_app(served, tinker), host=args.host, port=args.port, log_level="info")
    finally:
        tinker.close()
        thread.close()


if __name__ == "__main__":
    main()
