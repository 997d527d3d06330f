"""`python -m polaris_jax.serve --model=CHECKPOINT_DIR`: serves a Hugging Face checkpoint over OpenAI's API.

The model is loaded in its checkpoint's dtype; its tokenizer is read from the same directory, and
generation stops at every id of `generation_config.json`'s eos_token_id (else the tokenizer's eos ids).
The served model ids are the --model string and, when different, its basename. /health answers 200
once the engine is warm (every program compiled).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from polaris_jax.sampling.engine import EngineSettings


def parse_args(argv=None) -> argparse.Namespace:
    defaults = EngineSettings()
    p = argparse.ArgumentParser(prog="python -m polaris_jax.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a Hugging Face checkpoint directory (config, weights, tokenizer)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api_key", default=os.environ.get("POLARIS_API_KEY"), help="required of clients when set")
    p.add_argument("--workdir", default=None, help="where the server writes its log (serve.log); none by default")
    p.add_argument("--max_slots", type=int, default=defaults.max_slots, help="samples decoding at once")
    p.add_argument("--num_pages", type=int, default=0, help="KV pages (0: enough for max_slots full sequences)")
    p.add_argument("--page_size", type=int, default=defaults.page_size)
    p.add_argument("--max_seq_len", type=int, default=0, help="prompt + new tokens (0: min(4096, the model's))")
    p.add_argument("--prefill_chunk", type=int, default=defaults.prefill_chunk)
    p.add_argument("--decode_block", type=int, default=defaults.decode_block)
    p.add_argument("--max_queue", type=int, default=defaults.max_queue)
    return p.parse_args(argv)


def eos_ids(path: Path, tokenizer) -> tuple[int, ...]:
    """generation_config.json's eos_token_id (an id or a list) if present, else the tokenizer's eos ids."""
    gen = path / "generation_config.json"
    eos = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id") if gen.is_file() else None
    if eos is None:
        return tuple(tokenizer.eos_token_ids)
    return (int(eos),) if isinstance(eos, int) else tuple(int(i) for i in eos)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        logging.basicConfig(filename=Path(args.workdir) / "serve.log", level=logging.INFO)
    else:
        logging.basicConfig(level=logging.INFO)
    import uvicorn  # the serve extra; imported late so --help works without it

    from polaris_jax.data.tokenizer import Tokenizer
    from polaris_jax.models import load_hf
    from polaris_jax.sampling.engine import Engine
    from polaris_jax.serve.app import Served, create_app
    from polaris_jax.serve.engine_thread import EngineThread

    path = Path(args.model)
    config, params = load_hf(path, dtype=None)
    tokenizer = Tokenizer.from_dir(path)
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
    )
    thread = EngineThread(Engine(config, params, settings))
    thread.start()
    ids = tuple(dict.fromkeys([args.model, path.name]))
    eos = eos_ids(path, tokenizer)
    served = Served(thread, tokenizer, ids, eos, config.vocab_size, max_seq_len, args.max_slots, args.api_key)
    try:
        uvicorn.run(create_app(served), host=args.host, port=args.port, log_level="info")
    finally:
        thread.close()


if __name__ == "__main__":
    main()
