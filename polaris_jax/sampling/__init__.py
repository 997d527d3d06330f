"""Sampling: the static `generate` (below) and the continuous-batching `Engine` (`sampling/engine.py`).

Two engines, one semantics (strategies, logprob convention, finish reasons, per-sample keys):
- `generate`: one static batch to completion, with a contiguous KV cache in buckets and row compaction;
  the fast path for a fixed batch of prompts.
- `Engine`: requests arriving over time over a paged KV cache (`pages.PagePool`,
  `models.paged_attention`): chunked prefill interleaved with decode, n samples forking one prefill,
  abort, partial rollouts, streaming, live weights. Rollouts and evaluation pick one by config
  (`rollout.backend` / `backend`: "static" or "engine"); the server runs on the engine.

    from polaris_jax.sampling import generate
    out = generate(config, params, [[1, 2, 3], [4, 5]], max_new_tokens=256, temperature=0.6, top_p=0.95,
                   n=8, eos_token_ids=(151645,), seed=step)
    out.tokens_br[i * 8 + j, :out.lengths_b[i * 8 + j]], out.logprobs_br[...], out.finish_b[...]  # padded arrays
    out.tokens[i * 8 + j], out.logprobs[i * 8 + j], out.finish_reasons[i * 8 + j]        # the same as lists

Design
------
Buckets. Prompts are left-padded to a prompt-length bucket P; the distinct prompts are padded with
dummy rows to a batch bucket, and the decode rows (prompts x n) to another; the KV cache length runs
through cache-length buckets (powers of two by default, `Buckets`). Every compiled program is keyed
only by these bucketed shapes plus the static config and sampling mode, so after a warm-up over the
buckets no call compiles anything; temperature, top_p, min_p, max_new_tokens, seeds, EOS ids and stop
sequences are traced values (stop lists are padded to power-of-two shapes).

Shared prefill. `decode_loop.start` runs the forward pass once per distinct prompt, gathers each
prompt's cache into its n decode rows (row i*n+j reads prompt i) and samples every row's first token
from the broadcast last-position logits. A prompt bucket longer than `prefill_chunk` (2048) prefills
in passes of that many tokens under one `lax.scan`, each attending to the cache written so far
(blockwise, see `models.flash_attention`), so prefill activations stay those of one chunk.

Decoding. `decode_loop.decode` is one `lax.while_loop` that feeds one token per row per iteration and
exits when every row is done or the cache bucket is full; the host then copies the state into the next
cache bucket (`grow`) and calls decode again. Attention therefore reads the current bucket, never the
maximum length: at most `growth` (2) times the filled part. At each growth the finished rows are
dropped (`compact_rows`): their outputs are fetched, and the live ones move into the smallest batch
bucket that holds them, so a long tail of a few rows no longer reads and computes for the whole
batch (each row keeps its PRNG key and token count, so its samples do not change). This adds one
small program per (batch bucket, smaller batch bucket, cache bucket) met, which a warm-up must cover
for the no-recompile guarantee (`compact_rows=False` keeps the set to the buckets alone). Rows finish
individually on an EOS id
("eos"), on the last token of a stop sequence ("stop") or at max_new_tokens ("length"); finished rows
stop writing outputs and dummy rows start finished.

Cache and weight layout. The cache is per layer and head-major (`models.attention.HeadMajorKV`): keys
[B, kv_heads, head_dim, S], values [B, kv_heads, S, head_dim], so both attention products are plain
batched matmuls and the new token is written in place. On CPU the stacked layer weights are first
copied once per call into one buffer per layer (`unstack_params`): XLA CPU would otherwise copy each
layer's weights out of the stack at every decode step, which costs more than the step itself. For a
float32 model without a mesh that copy also packs the projection weights into column panels for
`models.cpu_gemm`, an XLA FFI kernel (`pack_weights`): XLA CPU's GEMM reads weights at 20-28 GB/s
at decode batch sizes, the kernel at close to the machine's read bandwidth. Also
on CPU, a bf16 model keeps a float32 KV cache: XLA CPU copies a 16-bit cache at every write, which
costs more than the doubled cache reads (about 10% of a bf16 decode step at the 0.6B shape).

Sampling. Strategies live in `strategies.py`: greedy (temperature 0) or a categorical draw from the
temperature-scaled logits after the registered truncations (top-k, top-p, min-p, applied in that
order). Row r's randomness is `fold_in(fold_in(key(seed), r), t)` for its t-th token, so a row's
sample depends on the seed and its index only, not on the batch or bucket it ran in.

Log-probabilities. `logprobs[r][t]` is the log-probability of the sampled token under the
temperature-scaled distribution before top-k/top-p/min-p truncation, which is what verl reports and
what GRPO's recomputation compares against; for greedy it is under the unscaled distribution.

Weights and sharding. Params are an argument of every call (no copy kept, no recompile when values
change). With `mesh=`, params must already live on the mesh (`models.sharding.param_shardings`); the
decode batch is split over the mesh's batch axes and the cache's kv heads over `tensor`, following
the same logical-axis rules as training. YaRN and every other rope setting come from the model config.
"""

from polaris_jax.sampling.buckets import Buckets
from polaris_jax.sampling.decode_loop import EOS as FINISH_EOS
from polaris_jax.sampling.decode_loop import FINISH_REASONS
from polaris_jax.sampling.decode_loop import LENGTH as FINISH_LENGTH
from polaris_jax.sampling.decode_loop import STOP as FINISH_STOP
from polaris_jax.sampling.engine import Engine
from polaris_jax.sampling.engine_settings import EngineSettings
from polaris_jax.sampling.requests import Completion, Delta, QueueFull, Request, RequestError
from polaris_jax.sampling.sampler import SampleOutput, generate
from polaris_jax.sampling.strategies import TRUNCATIONS, SamplingSettings, register_truncation, sample

__all__ = [
    "Buckets",
    "Completion",
    "Delta",
    "Engine",
    "EngineSettings",
    "QueueFull",
    "Request",
    "RequestError",
    "FINISH_EOS",
    "FINISH_LENGTH",
    "FINISH_REASONS",
    "FINISH_STOP",
    "SampleOutput",
    "SamplingSettings",
    "TRUNCATIONS",
    "generate",
    "register_truncation",
    "sample",
]
