"""Chat templates rendered with jinja2 exactly the way transformers renders them.

A checkpoint's `tokenizer_config.json` carries its own template; we render it in the same
sandboxed environment transformers builds (`trim_blocks`, `lstrip_blocks`, the loop-controls
extension, a `{% generation %}` tag, a `tojson` filter that does not HTML-escape, and the
`raise_exception` / `strftime_now` / `namespace` / `dict` globals), with the same inputs:
message keys whose value is None are dropped, reasoning given as `thinking`/`reasoning` is
aliased to `reasoning_content`, and the named special tokens (`bos_token`, `eos_token`, ...)
are visible to the template.

Built-in templates (package resources under `templates/`), copied from the public checkpoints:
    * `qwen3`: Qwen3 hybrid-thinking template (Qwen3-0.6B ... 32B), `enable_thinking` switch.
    * `r1_distill_qwen`: DeepSeek-R1-Distill-Qwen, whose generation prompt opens `<think>\\n`
        and which drops everything up to `</think>` from assistant turns.
"""

from __future__ import annotations

import datetime
import functools
import importlib.resources
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

BUILTIN_TEMPLATES = ("qwen3", "r1_distill_qwen")
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def builtin_template(name: str) -> str:
    """Returns the text of a packaged template (`qwen3`, `r1_distill_qwen`)."""
    if name not in BUILTIN_TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; built-in templates are {BUILTIN_TEMPLATES}")
    resource = importlib.resources.files("polaris_jax.data") / "templates" / f"{name}.jinja"
    text = resource.read_text(encoding="utf-8")
    # The file ends with one newline for editors; the checkpoints store the string without it.
    return text[:-1] if text.endswith("\n") else text


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers' assistant-span marker, rendered as-is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore names, as transformers' sandbox does."""

    def __init__(*args, **kwargs):  # pylint: disable=no-method-argument
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates may not set underscore attribute {name!r}")


class _DictFactory:
    """`dict(...)` / `dict.fromkeys(...)` without exposing the builtin type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson HTML-escapes <, >, & and ' which would corrupt tool schemas.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compiles a template string once; the sandbox matches transformers' environment."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _DictFactory()
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not parse (line {e.lineno}): {e.message}") from e


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies messages the way transformers hands them to the template."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}")
        if "role" not in message:
            raise ValueError(f"message {i} has no 'role': {dict(message)!r}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    special_tokens: Mapping[str, str] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    **template_kwargs: Any,
) -> str:
    """Renders `messages` with `template`; `template_kwargs` (e.g. enable_thinking) override tokens."""
    compiled = compile_chat_template(template)
    context = {**(special_tokens or {}), **template_kwargs}
    return compiled.render(
        messages=normalize_messages(messages),
        tools=list(tools) if tools is not None else None,
        documents=list(documents) if documents is not None else None,
        add_generation_prompt=add_generation_prompt,
        **context,
    )
