"""The last `\\boxed{}` / `\\fbox{}` in a text, with nested braces: shared by gold loading and rewards.

Plain string work, linear in the text length, so it is safe on hostile text.
"""

from __future__ import annotations

import re
from typing import NamedTuple

# A box opener, an escaped character, or a brace: everything the box scanner looks at.
_BRACE_TOKEN = re.compile(r"\\(?:boxed|fbox)\s*\{|\\.|[{}]", re.DOTALL)
# `\boxed 5` (no braces) is valid TeX for a single token and some models write it.
_BOX_BARE = re.compile(r"\\boxed[ \t]+([^\s$]+)")


class Extraction(NamedTuple):
    """The extracted answer (None when there is none) and how it was found or why not."""

    answer: str | None
    source: str  # boxed | hash | answer_is | no_answer | unbalanced_box | unfinished_think | ...


def last_boxed(text: str) -> Extraction:
    """Contents of the last `\\boxed{}`/`\\fbox{}` (nested braces kept), or why there is none.

    One left-to-right pass over braces only (a regex jumps between them, so long plain text
    costs nothing). Escaped braces (`\\{`) are literal. Any box left unclosed makes the
    whole answer unbalanced: the output is malformed, whatever came before.
    """
    open_boxes: list[int | None] = []  # per open brace: where its box content starts, or None
    last: tuple[int, int] | None = None
    for token in _BRACE_TOKEN.finditer(text):
        piece = token.group()
        if piece == "{":
            open_boxes.append(None)
        elif piece == "}":
            if open_boxes:  # a stray closer at depth 0 is just text
                content_start = open_boxes.pop()
                if content_start is not None and (last is None or content_start > last[0]):
                    last = (content_start, token.start())
        elif piece.endswith("{") and len(piece) > 2:
            open_boxes.append(token.end())
    if any(start is not None for start in open_boxes):
        return Extraction(None, "unbalanced_box")
    bare = None
    for bare in _BOX_BARE.finditer(text):  # noqa: B007 - the loop keeps the last match
        pass
    if bare is not None and (last is None or bare.start() > last[0]):
        return Extraction(bare.group(1).strip(), "boxed")
    if last is None:
        return Extraction(None, "no_box")
    return Extraction(text[last[0] : last[1]].strip(), "boxed")
