"""Chat template rendering: published Qwen3 / R1-Distill prompt formats, and live parity with
transformers' `apply_chat_template` on the same template and messages."""

import jinja2
import pytest

from polaris_jax.data.chat_template import builtin_template, render_chat_template

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "a < b & c > d",
            "parameters": {"type": "object", "properties": {"a": {"type": "number"}}},
        },
    }
]
CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is 2+2?"}],
    "system": [
        {"role": "system", "content": "You are a careful mathematician."},
        {"role": "user", "content": "Solve x^2=4."},
    ],
    "multi_turn_inline_think": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "times 3?"},
        {"role": "assistant", "content": "<think>\n4*3\n</think>\n\n**12**"},
    ],
    "reasoning_field": [
        {"role": "user", "content": "Is 7 prime?"},
        {"role": "assistant", "content": "Yes.", "reasoning_content": "7 has no divisors but 1 and 7."},
    ],
    "reasoning_alias": [
        {"role": "user", "content": "Is 9 prime?"},
        {"role": "assistant", "content": "No.", "thinking": "9 = 3 * 3."},
    ],
    "unicode": [
        {"role": "user", "content": "证明 √2 是无理数 🤔"},
        {"role": "assistant", "content": "<think>反证法</think>\n\n见上"},
    ],
    "tools": [
        {"role": "user", "content": "add 1 and 2"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}],
        },
        {"role": "tool", "content": "3"},
        {"role": "tool", "content": "done"},
    ],
    "none_values": [{"role": "user", "content": "hi", "name": None}],
}


@pytest.fixture(scope="module")
def hf_render():
    pytest.importorskip("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(template, messages, **kwargs):
        # What PreTrainedTokenizerBase.apply_chat_template does before rendering.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        rendered, _ = render_jinja_template(conversations=[messages], chat_template=template, **kwargs)
        return rendered[0]

    return render


def test_qwen3_published_prompt_format(qwen3_tok):
    messages = [{"role": "user", "content": "Hi"}]
    assert qwen3_tok.apply_chat_template(messages) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert qwen3_tok.apply_chat_template(messages, enable_thinking=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    full = messages + [{"role": "assistant", "content": "<think>\nhmm\n</think>\n\nHello!"}]
    assert qwen3_tok.apply_chat_template(full, add_generation_prompt=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\nhmm\n</think>\n\nHello!<|im_end|>\n"
    )


def test_r1_distill_published_prompt_format(r1_tok):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert r1_tok.apply_chat_template(messages) == "<｜begin▁of▁sentence｜>S<｜User｜>Q<｜Assistant｜><think>\n"


# R1-Distill's template concatenates tool-call arguments as strings, so it gets no dict-argument case.
CASES = [
    (t, n)
    for t in ("qwen3", "r1_distill_qwen")
    for n in sorted(CONVERSATIONS)
    if (t, n) != ("r1_distill_qwen", "tools")
]


@pytest.mark.parametrize("template_name, name", CASES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_builtin_templates_match_transformers(hf_render, qwen3_tok, r1_tok, name, template_name, add_generation_prompt):
    tok = qwen3_tok if template_name == "qwen3" else r1_tok
    messages = CONVERSATIONS[name]
    tools = TOOLS if name == "tools" else None
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools)
    theirs = hf_render(
        builtin_template(template_name),
        messages,
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        **tok.special_tokens_map,
    )
    assert ours == theirs


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_enable_thinking_matches_transformers(hf_render, qwen3_tok, enable_thinking):
    messages = CONVERSATIONS["multi_turn_inline_think"][:3]
    ours = qwen3_tok.apply_chat_template(messages, enable_thinking=enable_thinking)
    theirs = hf_render(
        builtin_template("qwen3"),
        messages,
        add_generation_prompt=True,
        enable_thinking=enable_thinking,
        **qwen3_tok.special_tokens_map,
    )
    assert ours == theirs


EXOTIC_TEMPLATE = (
    "{%- for m in messages %}{%- if loop.index0 > 2 %}{% break %}{% endif %}"
    "{%- if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}"
    "  {{ m.role }}: {{ m.content | tojson }}\n"
    "{%- if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% endif %}\n"
    "{% endfor %}{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
    "{{ ns.n }} {{ dict(a=1) | tojson }} {{ bos_token }}{{ eos_token }}"
)


def test_environment_matches_transformers(hf_render):
    messages = [
        {"role": "user", "content": "<b>&'\"</b> ü"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "never shown"},
    ]
    tokens = {"bos_token": "<s>", "eos_token": "</s>"}
    ours = render_chat_template(EXOTIC_TEMPLATE, messages, special_tokens=tokens)
    assert ours == hf_render(EXOTIC_TEMPLATE, messages, **tokens)
    assert '"<b>&\'\\"</b> ü"' in ours  # tojson does not HTML-escape


def test_raise_exception_and_sandbox():
    with pytest.raises(jinja2.exceptions.TemplateError, match="bad role system"):
        render_chat_template(EXOTIC_TEMPLATE, [{"role": "system", "content": "s"}])
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat_template("{% set ns = namespace(_x=1) %}", [])
    with pytest.raises(ValueError, match="does not parse"):
        render_chat_template("{% if %}", [])


def test_strftime_now_is_available():
    import datetime

    out = render_chat_template("{{ strftime_now('%Y') }}", [])
    assert out == str(datetime.datetime.now().year)


def test_bad_messages_are_named():
    with pytest.raises(ValueError, match="message 1 has no 'role'"):
        render_chat_template("x", [{"role": "user", "content": "a"}, {"content": "b"}])
    with pytest.raises(TypeError, match="list of dicts"):
        render_chat_template("x", "hello")
    with pytest.raises(ValueError, match="unknown chat template"):
        builtin_template("llama")
