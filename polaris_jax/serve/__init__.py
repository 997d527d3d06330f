"""An OpenAI-compatible HTTP service over the continuous-batching engine.

    python -m polaris_jax.serve --model=CHECKPOINT_DIR [--host=127.0.0.1] [--port=8000] [--api_key=KEY]

`__main__` loads the checkpoint and its tokenizer, `engine_thread` runs the engine in the one thread
that owns it, `openai_api` validates requests and shapes responses (the `openai` package's types), and
`app` holds the FastAPI routes. Needs the `serve` extra (fastapi, uvicorn, openai).
"""
