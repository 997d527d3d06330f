"""Tinker's protobuf messages (`tinker.proto.tinker_public_pb2`, shipped with the tinker SDK) to and from numpy.

forward_backward requests arrive as protobuf (optionally zstd-compressed); forward_backward and sample
results leave as protobuf. Every malformed field raises `BadInput` naming it as the SDK spells it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from tinker.proto import tinker_public_pb2 as pb


class BadInput(ValueError):
    """A request the client got wrong; the message names the field. Answered with a 4xx."""


_DTYPES = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}


@dataclasses.dataclass
class FwdBwdRequest:
    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: dict
    forward_only: bool
    datums: list[dict]  # {"tokens": int[T], "target_tokens": int[T], other loss inputs: float[T]}


def _tensor(msg, where: str) -> np.ndarray:
    dtype = _DTYPES.get(msg.dtype)
    if dtype is None:
        raise BadInput(f"{where}: dtype {msg.dtype} is not float32, int64 or int32")
    shape = tuple(msg.shape)
    if msg.HasField("sparse_csr"):
        if len(shape) != 2:
            raise BadInput(f"{where}: a sparse tensor must be 2-D, got shape {list(shape)}")
        csr = msg.sparse_csr
        values = np.frombuffer(csr.values, dtype)
        crow, col = np.frombuffer(csr.crow_indices, np.int64), np.frombuffer(csr.col_indices, np.int64)
        if len(crow) != shape[0] + 1 or len(col) != len(values) or (len(col) and col.max() >= shape[1]):
            raise BadInput(f"{where}: inconsistent sparse CSR indices for shape {list(shape)}")
        dense = np.zeros(shape, dtype)
        for r in range(shape[0]):
            dense[r, col[crow[r] : crow[r + 1]]] = values[crow[r] : crow[r + 1]]
        return dense
    data = np.frombuffer(msg.dense, dtype)
    if shape and int(np.prod(shape)) != data.size:
        raise BadInput(f"{where}: {data.size} values do not fill shape {list(shape)}")
    return data.reshape(shape) if shape else data


def _datum(msg, i: int, vocab_size: int) -> dict:
    where = f"data[{i}]"
    tokens = []
    for j, chunk in enumerate(msg.model_input):
        if chunk.WhichOneof("chunk") != "encoded_text":
            raise BadInput(f"{where}.model_input.chunks[{j}]: only encoded_text chunks are served")
        tokens.append(np.frombuffer(chunk.encoded_text.tokens, np.int32))
    tokens = np.concatenate(tokens) if tokens else np.zeros(0, np.int32)
    if tokens.size == 0:
        raise BadInput(f"{where}.model_input: empty")
    out = {"tokens": tokens}
    for key, tensor in msg.loss_fn_inputs.items():
        value = _tensor(tensor, f"{where}.loss_fn_inputs[{key!r}]")
        if value.ndim != 1:
            raise BadInput(f"{where}.loss_fn_inputs[{key!r}]: shape {list(value.shape)} is not 1-D")
        if len(value) != len(tokens):
            raise BadInput(
                f"{where}.loss_fn_inputs[{key!r}]: length {len(value)} != model_input length {len(tokens)} "
                "(model_input = seq[:-1], target_tokens = seq[1:])"
            )
        if not np.all(np.isfinite(value)):
            raise BadInput(f"{where}.loss_fn_inputs[{key!r}]: holds a NaN or infinite value")
        out[key] = value
    if "target_tokens" not in out:
        raise BadInput(f"{where}.loss_fn_inputs: 'target_tokens' is missing")
    for key in ("tokens", "target_tokens"):
        ids = out[key]
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        if bad.size:
            field = "model_input" if key == "tokens" else "loss_fn_inputs['target_tokens']"
            raise BadInput(f"{where}.{field}: token id {int(bad[0])} is outside the vocabulary [0, {vocab_size})")
        out[key] = ids.astype(np.int32)
    return out


def parse_forward_backward(body: bytes, encoding: str | None, vocab_size: int) -> FwdBwdRequest:
    if encoding == "zstd":
        import zstandard  # a tinker dependency

        try:
            body = zstandard.ZstdDecompressor().decompress(body, max_output_size=1 << 31)
        except zstandard.ZstdError as e:
            raise BadInput(f"body: not valid zstd ({e})") from None
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError
        raise BadInput(f"body: not a ForwardBackwardRequest protobuf ({e})") from None
    if not msg.data:
        raise BadInput("data: empty (no datum to run)")
    config = dict(msg.loss_fn_config)
    for key, value in msg.loss_fn_config_v2.items():
        kind = value.WhichOneof("value")
        if kind is None or not isinstance(getattr(value, kind), (int, float)):
            raise BadInput(f"loss_fn_config[{key!r}]: only numbers are taken")
        config[key] = float(getattr(value, kind))
    datums = [_datum(d, i, vocab_size) for i, d in enumerate(msg.data)]
    return FwdBwdRequest(msg.model_id, msg.seq_id, msg.loss_fn, config, msg.forward_only, datums)


def forward_backward_output(logprobs: list[np.ndarray], metrics: dict[str, float]) -> bytes:
    """ForwardBackwardOutput with one ArrayRecord: per-datum float32 `logprobs`."""
    arrays = [np.asarray(a, np.float32) for a in logprobs]
    offsets = np.concatenate([[0], np.cumsum([a.nbytes for a in arrays])]).astype(np.int64)
    record = pb.ArrayRecord(type_tag="ArrayRecord", num_datums=len(arrays))
    record.fields["logprobs"].CopyFrom(
        pb.BatchedTensor(data=b"".join(a.tobytes() for a in arrays), offsets=offsets.tobytes(), dtype=pb.DTYPE_FLOAT32)
    )
    out = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", loss_fn_outputs=[record])
    for k, v in metrics.items():
        out.metrics[k] = float(v)
    return out.SerializeToString()


def _topk(ids_nk: np.ndarray, lps_nk: np.ndarray) -> pb.TopkLogprobs:
    n, k = ids_nk.shape
    return pb.TopkLogprobs(
        token_ids=ids_nk.astype(np.int32).tobytes(), logprobs=lps_nk.astype(np.float32).tobytes(), k=k, length=n
    )


def sample_response(sequences, prompt_logprobs=None, topk_prompt=None) -> bytes:
    """SampleResponse from [(tokens, logprobs, "stop" | "length")], the prompt's logprobs (NaN first) and
    optionally its top-k (ids [T, K], logprobs [T, K])."""
    out = pb.SampleResponse()
    for tokens, logprobs, reason in sequences:
        out.sequences.append(
            pb.SampledSequence(
                stop_reason=pb.STOP_REASON_STOP if reason == "stop" else pb.STOP_REASON_LENGTH,
                tokens=np.asarray(tokens, np.int32).tobytes(),
                logprobs=np.asarray(logprobs, np.float32).tobytes(),
            )
        )
    if prompt_logprobs is not None:
        out.prompt_logprobs = np.asarray(prompt_logprobs, np.float32).tobytes()
    if topk_prompt is not None:
        out.topk_prompt_logprobs.CopyFrom(_topk(*topk_prompt))
    return out.SerializeToString()
