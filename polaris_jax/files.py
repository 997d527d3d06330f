"""`write_atomic`: the one way polaris_jax writes a file that someone may be reading.

The content goes to a temp file in the destination's directory, is flushed, and replaces the
destination with `os.replace`, so a reader (or a resumed run after a kill) sees the old file or the
new one, never half of one; a failure leaves the old file and no temp file behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


def jsonl(records: Iterable) -> Iterable[str]:
    """The lines of a jsonl file, for `write_atomic`."""
    return (json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def write_atomic(path: str | os.PathLike, content: str | bytes | Iterable[str | bytes]) -> None:
    """Writes `content` (text, bytes, or an iterable of text chunks such as jsonl lines) to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        chunks = [content] if isinstance(content, (str, bytes)) else content
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk if isinstance(chunk, bytes) else chunk.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
