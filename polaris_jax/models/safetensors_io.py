"""A minimal safetensors reader (memory-mapped, tensor by tensor) and writer, bf16 included.

The format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import mmap
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """Lazily maps one .safetensors file; `get(name)` returns a zero-copy read-only numpy view."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            try:
                (header_len,) = struct.unpack("<Q", f.read(8))
                self.header = json.loads(f.read(header_len))
            except (struct.error, ValueError) as e:
                raise ValueError(f"{path} is not a valid safetensors file: {e}") from e
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.header.pop("__metadata__", None)
        self._data_start = 8 + header_len

    def keys(self):
        return self.header.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        buf = memoryview(self._mmap)[self._data_start + start : self._data_start + end]
        return np.frombuffer(buf, dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
    """Writes tensors (in the dict's order) to `path`; the caller handles atomicity of the directory."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    arrays = []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        if array.dtype not in _NAMES:
            raise ValueError(f"cannot write tensor {name!r} of dtype {array.dtype}")
        header[name] = {
            "dtype": _NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
        arrays.append(array)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keeps tensor data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for array in arrays:
            f.write(array.tobytes())
        f.flush()
        os.fsync(f.fileno())


class CheckpointReader:
    """All tensors of a HF checkpoint dir (single file or index + shards), by name."""

    def __init__(self, directory: str):
        index_path = os.path.join(directory, "model.safetensors.index.json")
        single_path = os.path.join(directory, "model.safetensors")
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            files = {}
            self._where = {}
            for name, shard in weight_map.items():
                shard_path = os.path.join(directory, shard)
                if shard not in files:
                    if not os.path.exists(shard_path):
                        raise FileNotFoundError(f"shard {shard} named in {index_path} does not exist")
                    files[shard] = SafetensorsFile(shard_path)
                self._where[name] = files[shard]
        elif os.path.exists(single_path):
            file = SafetensorsFile(single_path)
            self._where = {name: file for name in file.keys()}
        else:
            raise FileNotFoundError(f"{directory} has neither model.safetensors nor model.safetensors.index.json")
        self.directory = directory

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self):
        return self._where.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def get(self, name: str) -> np.ndarray:
        return self._file(name).get(name)

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self._where:
            raise KeyError(f"checkpoint {self.directory} is missing tensor {name!r}")
        return self._where[name]
