"""SFT tokenisation (assistant-only loss), packing invariants, ordering, and exact resume."""

import json
import re

import numpy as np
import pytest

from polaris_jax.data import sft_tokenize
from polaris_jax.data.sft_pipeline import SFTDataConfig, iterator_stats, make_sft_iterator
from polaris_jax.data.sft_tokenize import TokenizeOptions, tokenize_example

NUM_ROWS = 40
NO_ASSISTANT_ROWS = (7, 23)


def make_row(i):
    if i in NO_ASSISTANT_ROWS:
        return {"prompt": f"row {i}: unanswered", "difficulty": i % 4}
    return {
        "prompt": f"row {i}: what is {i}*{i}?",
        "response": f"<think>\n{'hm ' * (i % 7)}multiply\n</think>\n\n{i * i}",
        "difficulty": i % 4,
    }


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "rows.jsonl"
    path.write_text("".join(json.dumps(make_row(i)) + "\n" for i in range(NUM_ROWS)))
    return str(path)


def config(path, **overrides):
    base = {"sources": path, "batch_size": 3, "seq_len": 96, "order": "sequential", "num_epochs": 1}
    base.update(overrides)
    return base


def run(cfg, tok):
    it = make_sft_iterator(cfg, tok)
    return list(it), iterator_stats(it)


def segments(batch, tok):
    """[(row id, tokens, target-aligned loss mask)] for every segment, in batch order."""
    out = []
    for tokens, seg, mask in zip(batch["tokens_bt"], batch["segment_ids_bt"], batch["loss_mask_bt"]):
        for k in range(1, seg.max() + 1):
            where = seg == k
            row_id = int(re.search(r"row (\d+)", tok.decode(tokens[where])).group(1))
            out.append((row_id, tokens[where], mask[where]))
    return out


# ------------------------------------------------------------------------------ tokenisation


def test_qwen3_loss_mask_is_the_assistant_turn(qwen3_tok):
    example = {
        "messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "<think>\nR\n</think>\n\nA"}]
    }
    out = tokenize_example(example, qwen3_tok, TokenizeOptions(max_length=64))
    tokens, mask = out["tokens"], out["loss_mask"].astype(bool)
    prompt = qwen3_tok.encode("<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n")
    assert tokens[: len(prompt)].tolist() == prompt and not mask[: len(prompt)].any()
    assert qwen3_tok.decode(tokens[mask]) == "<think>\nR\n</think>\n\nA<|im_end|>"
    assert qwen3_tok.decode(tokens) == (
        "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n<think>\nR\n</think>\n\nA<|im_end|>\n"
    )
    assert np.flatnonzero(mask).tolist() == list(range(len(prompt), len(tokens) - 1))  # trailing "\n" untrained


def test_reasoning_field_equals_inline_think(qwen3_tok):
    opts = TokenizeOptions(max_length=64)
    inline = tokenize_example(
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>\nR\n</think>\n\nA"}]},
        qwen3_tok,
        opts,
    )
    field = tokenize_example(
        {
            "messages": [
                {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A", "reasoning_content": "R"},
            ]
        },
        qwen3_tok,
        opts,
    )
    np.testing.assert_array_equal(inline["tokens"], field["tokens"])
    np.testing.assert_array_equal(inline["loss_mask"], field["loss_mask"])


def test_r1_distill_keeps_reasoning_the_template_drops(r1_tok):
    example = {
        "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>\nR\n</think>\n\nA"}]
    }
    out = tokenize_example(example, r1_tok, TokenizeOptions(max_length=64))
    mask = out["loss_mask"].astype(bool)
    prompt = r1_tok.encode("<｜begin▁of▁sentence｜><｜User｜>Q<｜Assistant｜><think>\n")
    assert out["tokens"][: len(prompt)].tolist() == prompt
    assert r1_tok.decode(out["tokens"][mask]) == "R\n</think>\n\nA<｜end▁of▁sentence｜>"
    strict = tokenize_example(example, r1_tok, TokenizeOptions(max_length=64, completion_mode="template"))
    assert strict["skip"] == sft_tokenize.SKIP_TEMPLATE_MISMATCH


def test_only_the_last_assistant_turn_is_trained(qwen3_tok):
    example = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "first"},
            {"role": "user", "content": "b"},
            {"role": "assistant", "content": "second"},
        ]
    }
    out = tokenize_example(example, qwen3_tok, TokenizeOptions(max_length=128))
    assert qwen3_tok.decode(out["tokens"][out["loss_mask"].astype(bool)]) == ("<think>\n\n</think>\n\nsecond<|im_end|>")


def test_skips_and_truncation(qwen3_tok):
    no_answer = tokenize_example(
        {"messages": [{"role": "user", "content": "q"}]}, qwen3_tok, TokenizeOptions(max_length=64)
    )
    assert no_answer["skip"] == sft_tokenize.SKIP_NO_ASSISTANT
    long_prompt = {"messages": [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "x"}]}
    assert tokenize_example(long_prompt, qwen3_tok, TokenizeOptions(max_length=32))["skip"] == (
        sft_tokenize.SKIP_PROMPT_TOO_LONG
    )
    long_answer = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 100}]}
    out = tokenize_example(long_answer, qwen3_tok, TokenizeOptions(max_length=32))
    assert out["truncated"] and len(out["tokens"]) == 32 and out["loss_mask"][-1] == 1


# ---------------------------------------------------------------------------------- packing


def check_row_invariants(tokens, positions, seg, targets, mask, pad_id):
    k = seg.max()
    used = np.flatnonzero(seg)
    assert (seg[: len(used)] > 0).all() and (seg[len(used) :] == 0).all(), "padding only at the end"
    assert (np.diff(seg[: len(used)]) >= 0).all() and set(seg[: len(used)]) == set(range(1, k + 1))
    for s in range(1, k + 1):
        where = np.flatnonzero(seg == s)
        np.testing.assert_array_equal(positions[where], np.arange(len(where)))  # restart at 0
        np.testing.assert_array_equal(targets[where[:-1]], tokens[where[1:]])  # next token, same segment
        assert targets[where[-1]] == pad_id and mask[where[-1]] == 0  # never predicts the next segment
    pad = seg == 0
    assert (tokens[pad] == pad_id).all() and (positions[pad] == 0).all() and (mask[pad] == 0).all()
    assert (targets[pad] == pad_id).all()


def test_packing_invariants_and_stream(qwen3_tok, data_path):
    batches, stats = run(config(data_path), qwen3_tok)
    opts = TokenizeOptions(max_length=96)
    expected = [i for i in range(NUM_ROWS) if i not in NO_ASSISTANT_ROWS]
    got = []
    for batch in batches:
        assert {k: v.shape for k, v in batch.items()} == {
            k: (3, 96) for k in ("tokens_bt", "positions_bt", "segment_ids_bt", "targets_bt", "loss_mask_bt")
        }
        for row in zip(
            *(batch[k] for k in ("tokens_bt", "positions_bt", "segment_ids_bt", "targets_bt", "loss_mask_bt"))
        ):
            check_row_invariants(*row, pad_id=qwen3_tok.pad_token_id)
        for row_id, tokens, mask in segments(batch, qwen3_tok):
            ref = tokenize_example(
                {
                    "messages": [
                        {"role": "user", "content": make_row(row_id)["prompt"]},
                        {"role": "assistant", "content": make_row(row_id)["response"]},
                    ]
                },
                qwen3_tok,
                opts,
            )
            np.testing.assert_array_equal(tokens, ref["tokens"])
            # Loss mask aligns with targets: mask[t] is the token mask of t + 1.
            np.testing.assert_array_equal(mask, np.append(ref["loss_mask"][1:], 0))
            got.append(row_id)
    assert got == expected
    assert stats["examples"] == len(expected)
    assert stats["skipped_no_assistant_turn"] == len(NO_ASSISTANT_ROWS)
    assert stats["truncated"] == 0
    assert stats["loss_tokens"] == sum(int(b["loss_mask_bt"].sum()) for b in batches)


def test_overlong_example_is_truncated_and_counted(qwen3_tok, tmp_path):
    path = tmp_path / "long.jsonl"
    rows = [make_row(1), {"prompt": "row 99 long", "response": "go " * 200}, make_row(2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    batches, stats = run(config(str(path), batch_size=1, seq_len=64), qwen3_tok)
    assert stats["truncated"] == 1 and stats["examples"] == 3
    long_row = [b for b in batches if 99 in [s[0] for s in segments(b, qwen3_tok)]]
    assert len(long_row) == 1 and (long_row[0]["segment_ids_bt"] == 1).all()


def test_length_bucketing(qwen3_tok, data_path):
    cfg = config(data_path, mode="bucket", buckets=(32, 48, 64), batch_size=4)
    batches, stats = run(cfg, qwen3_tok)
    lengths = {}
    for batch in batches:
        width = batch["tokens_bt"].shape[1]
        assert width in (32, 48, 64, 96)
        assert batch["segment_ids_bt"].max() <= 1  # one example per row
        for row_id, tokens, _ in segments(batch, qwen3_tok):
            smaller = [b for b in (32, 48, 64, 96) if b < width]
            assert len(tokens) <= width and (not smaller or len(tokens) > smaller[-1])  # smallest bucket
            lengths[row_id] = len(tokens)
    assert sorted(lengths) == [i for i in range(NUM_ROWS) if i not in NO_ASSISTANT_ROWS]
    assert stats["examples"] == len(lengths)


# ---------------------------------------------------------------------------------- ordering


def row_order(batches, tok):
    return [row_id for b in batches for row_id, _, _ in segments(b, tok)]


def test_curriculum_is_easy_to_hard_every_epoch(qwen3_tok, data_path):
    batches, _ = run(config(data_path, order="curriculum", num_epochs=2, seed=3), qwen3_tok)
    order = row_order(batches, qwen3_tok)
    kept = NUM_ROWS - len(NO_ASSISTANT_ROWS)
    assert len(order) == 2 * kept
    for epoch in (order[:kept], order[kept:]):
        assert sorted(epoch) == sorted(set(epoch)) and len(set(epoch)) == kept
        difficulties = [make_row(i)["difficulty"] for i in epoch]
        assert difficulties == sorted(difficulties)
    assert order[:kept] != order[kept:]  # ties are reshuffled each epoch


def test_shuffle_is_deterministic_per_seed(qwen3_tok, data_path):
    a = row_order(run(config(data_path, order="shuffle", seed=1, num_epochs=2), qwen3_tok)[0], qwen3_tok)
    b = row_order(run(config(data_path, order="shuffle", seed=1, num_epochs=2), qwen3_tok)[0], qwen3_tok)
    c = row_order(run(config(data_path, order="shuffle", seed=2, num_epochs=2), qwen3_tok)[0], qwen3_tok)
    kept = NUM_ROWS - len(NO_ASSISTANT_ROWS)
    assert a == b and a != c
    assert sorted(a[:kept]) == sorted(a[kept:]) == sorted(set(a))
    assert a[:kept] != a[kept:] and a[:kept] != sorted(a[:kept])


def test_shards_are_disjoint_and_complete(qwen3_tok, data_path):
    orders = [
        row_order(run(config(data_path, order="shuffle", shard_index=i, shard_count=2), qwen3_tok)[0], qwen3_tok)
        for i in range(2)
    ]
    assert not set(orders[0]) & set(orders[1])
    assert sorted(orders[0] + orders[1]) == [i for i in range(NUM_ROWS) if i not in NO_ASSISTANT_ROWS]


# ------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("mode", ["pack", "bucket"])
def test_resume_sees_the_same_batches(qwen3_tok, data_path, mode):
    cfg = config(
        data_path,
        mode=mode,
        order="shuffle",
        num_epochs=3,
        seed=5,
        batch_size=2,
        buckets=(32, 36) if mode == "bucket" else (),
    )
    straight = make_sft_iterator(cfg, qwen3_tok)
    expected = list(straight)
    assert len(expected) > 20
    # Cut at several points; for buckets include cuts while examples wait in a bucket buffer.
    walker, states = make_sft_iterator(cfg, qwen3_tok), []
    for _ in range(len(expected)):
        states.append(json.loads(json.dumps(walker.get_state())))
        next(walker)
    cuts = {0, 1, 7, 13, len(expected) - 1}
    if mode == "bucket":
        buffered = [k for k, st in enumerate(states) if st["buffers"]]
        assert buffered, "some cut should fall while examples wait in a bucket"
        cuts |= set(buffered[:: max(len(buffered) // 4, 1)])
    for cut in cuts:
        resumed = make_sft_iterator(cfg, qwen3_tok)
        resumed.set_state(states[cut])
        rest = list(resumed)
        assert len(rest) == len(expected) - cut
        for got, want in zip(rest, expected[cut:]):
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])
        assert iterator_stats(resumed) == iterator_stats(straight)


def test_grain_checkpoint_handler_round_trip(qwen3_tok, data_path, tmp_path):
    import grain
    from etils import epath

    cfg = config(data_path, order="shuffle", seed=9)
    it = make_sft_iterator(cfg, qwen3_tok)
    next(it), next(it)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), item=it)
    want = next(it)
    restored = handler.restore(epath.Path(tmp_path), item=make_sft_iterator(cfg, qwen3_tok))
    np.testing.assert_array_equal(next(restored)["tokens_bt"], want["tokens_bt"])


def test_resume_through_thread_prefetch(qwen3_tok, data_path):
    cfg = config(data_path, order="shuffle", seed=4, num_epochs=2, batch_size=2)
    expected = list(make_sft_iterator(cfg, qwen3_tok))
    it = make_sft_iterator(dict(cfg, prefetch=3), qwen3_tok)
    for _ in range(5):
        next(it)
    state = it.get_state()
    resumed = make_sft_iterator(dict(cfg, prefetch=3), qwen3_tok)
    resumed.set_state(state)
    rest = list(resumed)
    assert len(rest) == len(expected) - 5
    for got, want in zip(rest, expected[5:]):
        np.testing.assert_array_equal(got["tokens_bt"], want["tokens_bt"])
        np.testing.assert_array_equal(got["loss_mask_bt"], want["loss_mask_bt"])


def test_state_from_another_pipeline_is_refused(qwen3_tok, data_path):
    state = make_sft_iterator(config(data_path, order="shuffle", seed=0), qwen3_tok).get_state()
    other = make_sft_iterator(config(data_path, order="shuffle", seed=1), qwen3_tok)
    with pytest.raises(ValueError, match="different data pipeline"):
        other.set_state(state)


# --------------------------------------------------------------------------------- bad input


def test_malformed_rows_raise_or_are_counted(qwen3_tok, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(make_row(1)) + "\n{not json\n" + json.dumps(make_row(2)) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: row 1: line 2 is not valid JSON"):
        run(config(str(path)), qwen3_tok)
    _, stats = run(config(str(path), on_malformed="skip"), qwen3_tok)
    assert stats["skipped_malformed"] == 1 and stats["examples"] == 2


def test_config_errors(qwen3_tok, data_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['bach_size'\]"):
        SFTDataConfig.from_config({"sources": data_path, "bach_size": 2, "batch_size": 2, "seq_len": 8})
    with pytest.raises(ValueError, match="mode 'zip' is not one of"):
        SFTDataConfig.from_config(config(data_path, mode="zip"))
    with pytest.raises(ValueError, match="needs a 'difficulty' on every row"):
        path = data_path.replace("rows.jsonl", "nodiff.jsonl")
        with open(path, "w") as f:
            f.write(json.dumps({"prompt": "p", "response": "r"}) + "\n")
        make_sft_iterator(config(path, order="curriculum"), qwen3_tok)
