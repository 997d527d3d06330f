"""Builds the golden reference files that polaris_jax's models are tested against.

Every file under tests/golden/<name>/ comes from Hugging Face transformers (torch, CPU, float32)
running a tiny random-init Qwen-family model. Deterministic: fixed seeds, eager attention,
eager experts. See README.md beside this file for what each array means.

    /work/main/.venv/bin/python tests/golden/make_golden.py            # all models
    /work/main/.venv/bin/python tests/golden/make_golden.py qwen3_moe  # one model
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import sys
import tempfile

import numpy as np
import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
import transformers
from transformers import GenerationConfig

GOLDEN_DIR = os.path.dirname(os.path.abspath(__file__))
PAD_ID = 0  # token written into padded slots; real tokens are drawn from [1, vocab)
NEW_TOKENS = 64
MIN_LOGIT_MARGIN = 2e-3  # greedy top1 - top2 gap; far above fp32 noise so JAX can match token for token
MIN_ROUTER_GAP = 1e-4  # k-th minus (k+1)-th router probability; keeps expert choice unambiguous
MIN_DISTINCT_NEW = 12  # distinct tokens per generated row
MAX_SEED_TRIES = 60

from golden_models import MODELS  # noqa: E402 - the tiny models' configs, beside this script


def _load(path: str, arch: str, dtype=torch.float32):
    cls = getattr(transformers, arch)
    kwargs = dict(dtype=dtype, attn_implementation="eager")
    if "Moe" in arch:
        kwargs["experts_implementation"] = "eager"
    return cls.from_pretrained(path, **kwargs).eval()


def _perturb_params(model: torch.nn.Module, seed: int) -> None:
    """Large random weights so that any wrong component shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):  # RMSNorm gains (incl. q_norm/k_norm), ones by default
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                param.copy_(0.2 * noise)
            elif name.endswith("embed_tokens.weight"):
                param.copy_(0.5 * noise)
            elif name.endswith("mlp.gate.weight"):  # router: sharp but not saturated preferences
                param.copy_(0.3 * noise)
            else:  # [out, in] projections and [E, out, in] expert stacks: ~1/sqrt(fan_in)
                param.copy_(noise / param.shape[-1] ** 0.5 * 1.5)


def _left_padded(rng: np.random.RandomState, lengths: list[int], vocab: int):
    width = max(lengths)
    ids_bt = np.full((len(lengths), width), PAD_ID, np.int32)
    mask_bt = np.zeros((len(lengths), width), np.int32)
    for row, length in enumerate(lengths):
        ids_bt[row, width - length :] = rng.randint(1, vocab, size=length)
        mask_bt[row, width - length :] = 1
    return ids_bt, mask_bt


def hf_positions(mask_bt: np.ndarray) -> np.ndarray:
    """positions = clip(cumsum(mask) - 1, 0): what generate() builds (pads get 0)."""
    return np.clip(np.cumsum(mask_bt, axis=-1) - 1, 0, None).astype(np.int32)


def _forward(model, ids_bt, mask_bt, pos_bt, **kwargs):
    as_t = lambda a: torch.as_tensor(np.asarray(a, np.int64))
    return model(input_ids=as_t(ids_bt), attention_mask=as_t(mask_bt), position_ids=as_t(pos_bt), **kwargs)


def _router_min_gap(router_logits, mask_bt: np.ndarray, top_k: int) -> float:
    """Smallest gap between the k-th and (k+1)-th router probability over real tokens."""
    valid = torch.as_tensor(mask_bt.reshape(-1) == 1)
    gaps = []
    for layer_logits in router_logits:
        probs = torch.softmax(layer_logits.float(), dim=-1)[valid]
        top = torch.topk(probs, top_k + 1, dim=-1).values
        gaps.append((top[:, top_k - 1] - top[:, top_k]).min().item())
    return min(gaps)


def _greedy_by_full_forward(model, ids_bt, mask_bt, steps: int):
    """Greedy decode by re-running the full forward each step (no cache), as an independent check
    on generate(); returns new tokens [B, steps] and the top1-top2 logit margin per row."""
    ids, mask = ids_bt.copy(), mask_bt.copy()
    margins = np.full(ids.shape[0], np.inf)
    new_tokens = []
    with torch.no_grad():
        for _ in range(steps):
            last_vocab = _forward(model, ids, mask, hf_positions(mask)).logits[:, -1].double()
            top2 = torch.topk(last_vocab, 2, dim=-1).values
            margins = np.minimum(margins, (top2[:, 0] - top2[:, 1]).numpy())
            token = last_vocab.argmax(-1).numpy().astype(np.int32)
            new_tokens.append(token)
            ids = np.concatenate([ids, token[:, None]], axis=1)
            mask = np.concatenate([mask, np.ones_like(token[:, None])], axis=1)
    return np.stack(new_tokens, axis=1), margins


def _forward_golden(model, model64, vocab: int, rng) -> dict:
    ids_bt, mask_bt = _left_padded(rng, [12, 9, 5], vocab)  # row 0 unpadded, rows 1-2 pad 3 and 7
    pos_bt = hf_positions(mask_bt)
    with torch.no_grad():
        logits_btv = _forward(model, ids_bt, mask_bt, pos_bt).logits
    # Each row alone, unpadded, in float64: checks padding invariance and measures fp32 noise. (Batched
    # float64 is unusable: eager attention gives fully masked pad rows NaN, which 0 * NaN spreads.)
    noise = 0.0
    for row in range(ids_bt.shape[0]):
        valid = mask_bt[row] == 1
        ids_1t = ids_bt[row, valid][None]
        with torch.no_grad():
            alone_tv = _forward(model64, ids_1t, np.ones_like(ids_1t), hf_positions(np.ones_like(ids_1t))).logits[0]
        noise = max(noise, (logits_btv[row, torch.as_tensor(valid)].double() - alone_tv).abs().max().item())
    if noise > 1e-4:
        raise RuntimeError(f"left-padded logits differ from unpadded float64 logits by {noise}")
    return dict(
        input_ids=ids_bt,
        attention_mask=mask_bt,
        position_ids=pos_bt,
        logits=logits_btv.numpy().astype(np.float32),
        logits_fp32_vs_fp64_max_abs=np.float64(noise),
    )


def _generate_golden(model, vocab: int, rng) -> dict:
    ids_bt, mask_bt = _left_padded(rng, [10, 6, 3], vocab)
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=NEW_TOKENS,
        eos_token_id=None,
        pad_token_id=PAD_ID,
        bos_token_id=None,
    )
    with torch.no_grad():
        out_bt = (
            model.generate(
                input_ids=torch.as_tensor(ids_bt, dtype=torch.long),
                attention_mask=torch.as_tensor(mask_bt, dtype=torch.long),
                generation_config=config,
            )
            .numpy()
            .astype(np.int32)
        )
    new_bt = out_bt[:, ids_bt.shape[1] :]
    if new_bt.shape != (3, NEW_TOKENS):
        raise RuntimeError(f"generate() returned {new_bt.shape[1]} new tokens, expected {NEW_TOKENS}")
    check_bt, margins = _greedy_by_full_forward(model, ids_bt, mask_bt, NEW_TOKENS)
    if not np.array_equal(check_bt, new_bt):
        raise RuntimeError("generate() disagrees with the full-forward greedy loop")
    return dict(
        gen_prompt_ids=ids_bt,
        gen_attention_mask=mask_bt,
        gen_output_ids=out_bt,
        gen_new_ids=new_bt,
        gen_min_logit_margin=margins.astype(np.float32),
        gen_pad_token_id=np.int32(PAD_ID),
    )


def _sft_batch(rng, vocab: int):
    """[2,16]: row 0 full (prompt 5), row 1 prompt 4 + response 8 + 4 right-padding slots."""
    ids_bt = rng.randint(1, vocab, size=(2, 16)).astype(np.int32)
    mask_bt = np.ones((2, 16), np.int32)
    ids_bt[1, 12:], mask_bt[1, 12:] = PAD_ID, 0
    labels_bt = ids_bt.copy()
    labels_bt[0, :5] = -100
    labels_bt[1, :4] = -100
    labels_bt[1, 12:] = -100
    return ids_bt, mask_bt, labels_bt


_EXPERT_RE = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def _as_file_tensor(by_param_name: dict, file_name: str, tied: bool):
    """The in-memory tensor (param or grad) behind one checkpoint tensor, or None. transformers 5
    fuses experts in memory: gate_up_proj [E, 2I, H] = [gate; up] per expert, down_proj [E, H, I];
    the file keeps the Hub layout experts.{e}.{gate,up,down}_proj.weight."""
    match = _EXPERT_RE.fullmatch(file_name)
    if match is None:
        if file_name == "lm_head.weight" and tied:  # only present in files written by older versions
            return by_param_name.get("model.embed_tokens.weight")
        return by_param_name.get(file_name)
    prefix, expert, kind = match.group(1), int(match.group(2)), match.group(3)
    if kind == "down_proj":
        stack = by_param_name.get(f"{prefix}.down_proj")
        return None if stack is None else stack[expert]
    stack = by_param_name.get(f"{prefix}.gate_up_proj")
    if stack is None:
        return None
    half = stack.shape[1] // 2
    return stack[expert, :half] if kind == "gate_proj" else stack[expert, half:]


def _grads_by_file_name(model, file_names: list[str], allow_missing: bool = False) -> dict:
    """Gradients keyed by checkpoint (safetensors) names; allow_missing skips tensors off the graph."""
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    out = {}
    for file_name in file_names:
        grad = _as_file_tensor(grads, file_name, model.config.tie_word_embeddings)
        if grad is None and allow_missing:
            continue
        if grad is None:
            raise RuntimeError(f"no gradient for checkpoint tensor {file_name}")
        out[file_name] = grad.detach().numpy().astype(np.float32).copy()
    return out


def _sft_golden(model, file_names, vocab: int, rng, is_moe: bool):
    ids_bt, mask_bt, labels_bt = _sft_batch(rng, vocab)
    pos_bt = np.broadcast_to(np.arange(16, dtype=np.int32), (2, 16)).copy()
    model.zero_grad(set_to_none=True)
    out = _forward(model, ids_bt, mask_bt, pos_bt, **({"output_router_logits": True} if is_moe else {}))
    targets = torch.as_tensor(labels_bt[:, 1:], dtype=torch.long)
    token_loss_bt = F.cross_entropy(
        out.logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none"
    )
    num_tokens = int((targets != -100).sum())
    loss = token_loss_bt.sum() / num_tokens
    hf_loss = _forward(model, ids_bt, mask_bt, pos_bt, labels=torch.as_tensor(labels_bt, dtype=torch.long)).loss
    if abs(hf_loss.item() - loss.item()) > 1e-6:
        raise RuntimeError(f"token-mean loss {loss.item()} != transformers loss {hf_loss.item()}")
    result = dict(
        sft_input_ids=ids_bt,
        sft_attention_mask=mask_bt,
        sft_labels=labels_bt,
        sft_position_ids=pos_bt,
        sft_token_loss=token_loss_bt.detach().numpy().astype(np.float32),
        sft_loss=np.float32(loss.item()),
        sft_num_tokens=np.int32(num_tokens),
    )
    loss.backward(retain_graph=is_moe)
    grads = {f"grad/{k}": v for k, v in _grads_by_file_name(model, file_names).items()}
    if is_moe:
        coef = model.config.router_aux_loss_coef
        aux = out.aux_loss
        hf_total = _forward(
            model,
            ids_bt,
            mask_bt,
            pos_bt,
            labels=torch.as_tensor(labels_bt, dtype=torch.long),
            output_router_logits=True,
        ).loss
        total = loss + coef * aux
        if abs(hf_total.item() - total.item()) > 1e-6:
            raise RuntimeError(f"loss + coef*aux {total.item()} != transformers loss {hf_total.item()}")
        unmasked = transformers.models.qwen3_moe.modeling_qwen3_moe.load_balancing_loss_func(
            out.router_logits, model.config.num_experts, model.config.num_experts_per_tok, None
        )
        result.update(
            router_aux_loss=np.float32(aux.item()),
            router_aux_loss_coef=np.float32(coef),
            router_aux_loss_unmasked=np.float32(unmasked.item()),
            sft_loss_with_aux=np.float32(total.item()),
            sft_router_min_topk_gap=np.float64(
                _router_min_gap(out.router_logits, mask_bt, model.config.num_experts_per_tok)
            ),
        )
        model.zero_grad(set_to_none=True)
        aux.backward()  # unscaled; only tensors upstream of a router get a gradient
        grads.update(
            {f"grad_router_aux/{k}": v for k, v in _grads_by_file_name(model, file_names, allow_missing=True).items()}
        )
    return result, grads


def _build_once(name: str, seed: int, workdir: str):
    """Makes, saves and reloads one model; returns the golden arrays (and None if seed is unfit)."""
    arch, config_kwargs, _, with_sft = MODELS[name]
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    config = config_cls(**config_kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config)
    _perturb_params(model, seed)
    path = os.path.join(workdir, name)
    model.save_pretrained(path)
    for extra in set(os.listdir(path)) - {"config.json", "model.safetensors"}:
        os.remove(os.path.join(path, extra))  # generation_config.json: not part of the golden
    model, model64 = _load(path, arch), _load(path, arch, dtype=torch.float64)
    _check_file_matches_model(model, path)
    rng = np.random.RandomState(seed)
    vocab = config.vocab_size
    arrays = dict(seed=np.int64(seed))
    arrays.update(_forward_golden(model, model64, vocab, rng))
    arrays.update(_generate_golden(model, vocab, rng))
    if arrays["gen_min_logit_margin"].min() < MIN_LOGIT_MARGIN:
        return None
    if min(len(set(row)) for row in arrays["gen_new_ids"].tolist()) < MIN_DISTINCT_NEW:
        return None  # a row stuck repeating one token would hide cache/position bugs
    is_moe = "Moe" in arch
    if is_moe:
        k = config.num_experts_per_tok
        gen_mask = np.concatenate([arrays["gen_attention_mask"], np.ones((3, NEW_TOKENS), np.int32)], 1)
        with torch.no_grad():
            fwd = _forward(
                model, arrays["input_ids"], arrays["attention_mask"], arrays["position_ids"], output_router_logits=True
            )
            gen = _forward(model, arrays["gen_output_ids"], gen_mask, hf_positions(gen_mask), output_router_logits=True)
        arrays["router_min_topk_gap"] = np.float64(
            min(
                _router_min_gap(fwd.router_logits, arrays["attention_mask"], k),
                _router_min_gap(gen.router_logits, gen_mask, k),
            )
        )
        if arrays["router_min_topk_gap"] < MIN_ROUTER_GAP:
            return None
    grads = None
    if with_sft:
        with safetensors.safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
            file_names = sorted(f.keys())
        sft, grads = _sft_golden(model, file_names, vocab, rng, is_moe)
        if is_moe and sft["sft_router_min_topk_gap"] < MIN_ROUTER_GAP:
            return None
        arrays.update(sft)
    return path, arrays, grads


def _check_file_matches_model(model, path: str) -> None:
    """Confirms the name mapping in _as_file_tensor against the saved values themselves."""
    tensors = safetensors.torch.load_file(os.path.join(path, "model.safetensors"))
    params = {n: p.detach() for n, p in model.named_parameters()}
    for file_name, value in tensors.items():
        param = _as_file_tensor(params, file_name, model.config.tie_word_embeddings)
        if param is None or not torch.equal(param, value):
            raise RuntimeError(f"checkpoint tensor {file_name} does not match the loaded model")


def build(name: str) -> None:
    first_seed = MODELS[name][2]
    with tempfile.TemporaryDirectory() as workdir:
        for seed in range(first_seed, first_seed + MAX_SEED_TRIES):
            built = _build_once(name, seed, workdir)
            if built is not None:
                break
            print(f"{name}: seed {seed} has a near-tie or a degenerate greedy row, trying the next", flush=True)
        else:
            raise RuntimeError(f"{name}: no seed without near-ties in {MAX_SEED_TRIES} tries")
        path, arrays, grads = built
        target = os.path.join(GOLDEN_DIR, name)
        staging = target + ".tmp"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(path, staging)
        np.savez(os.path.join(staging, "golden.npz"), **arrays)
        if grads is not None:
            np.savez(os.path.join(staging, "sft_grads.npz"), **grads)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    print(
        f"{name}: seed {arrays['seed']}, min greedy margin {arrays['gen_min_logit_margin'].min():.4f}, "
        f"fp32 vs fp64 logits {arrays['logits_fp32_vs_fp64_max_abs']:.2e}",
        flush=True,
    )


def write_versions() -> None:
    lines = [
        f"python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"transformers {transformers.__version__}",
        f"numpy {np.__version__}",
        f"safetensors {safetensors.__version__}",
    ]
    tmp = os.path.join(GOLDEN_DIR, "VERSIONS.txt.tmp")
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, os.path.join(GOLDEN_DIR, "VERSIONS.txt"))


def main(names: list[str]) -> None:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # reduction order independent of the machine's core count
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown golden model(s) {unknown}; known: {sorted(MODELS)}")
    for name in names or list(MODELS):
        build(name)
    write_versions()


if __name__ == "__main__":
    main(sys.argv[1:])
