"""`write_atomic`: the one way polaris_jax writes a file that someone may be reading.

The content goes to a temp file in the destination's directory, is flushed, and replaces the
destination with `os.replace`, so a reader (or a resumed run after a kill) sees the old file or the
new one, never half of one; a failure leaves the old file and no temp file behind.
`atomic_directory` does the same for a directory of files (an export, an adapter).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
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


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[str]:
    """Yields a temp directory beside `path` to fill; on success it replaces `path`, on any failure it is
    removed and `path` is left as it was. An existing non-empty `path` is refused unless `overwrite`."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=os.path.dirname(path))
    try:
        yield tmp
        if os.path.exists(path):
            shutil.rmtree(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
