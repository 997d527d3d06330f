import pytest

from polaris_jax.rewards.extraction import ExtractionConfig, extract_answer, last_boxed


def test_last_box_wins_and_keeps_nested_braces():
    text = r"first \boxed{1} then \boxed{\frac{a}{b^{2}}} done"
    assert extract_answer(text).answer == r"\frac{a}{b^{2}}"
    assert extract_answer(text).source == "boxed"


def test_fbox_and_bare_boxed_forms():
    assert extract_answer(r"so \fbox{12}").answer == "12"
    assert extract_answer(r"so \boxed 7 and done").answer == "7"
    assert extract_answer(r"\boxed {x+1}").answer == "x+1"


def test_escaped_set_braces_do_not_close_the_box():
    assert extract_answer(r"\boxed{\{1, 2\}}").answer == r"\{1, 2\}"


def test_unbalanced_final_box_gets_no_answer_even_after_a_closed_one():
    found = extract_answer(r"\boxed{1} and finally \boxed{\frac{2}{3}")
    assert found.answer is None
    assert found.source == "unbalanced_box"


def test_any_unclosed_box_in_the_answer_makes_it_unbalanced():
    assert last_boxed(r"\boxed{ oops \boxed{3}").source == "unbalanced_box"
    assert last_boxed(r"\boxed{ {3 }").source == "unbalanced_box"
    # stray closers and unclosed plain braces outside boxes are just text
    assert last_boxed(r"} { \boxed{3} }").answer == "3"
    assert last_boxed(r"{ \boxed{3}").answer == "3"


def test_nested_boxes_take_the_last_opened():
    assert last_boxed(r"\boxed{a \boxed{b}}").answer == "b"


@pytest.mark.parametrize(
    "think, text, expected",
    [
        ("strip", r"<think>maybe \boxed{1}</think> so \boxed{2}", "2"),
        ("strip", r"<think>maybe \boxed{1} still thinking", None),  # unfinished reasoning
        ("strip", r"no tags \boxed{3}", "3"),
        ("strip", r"forced-prefix thoughts \boxed{1}</think>answer \boxed{4}", "4"),
        ("require", r"no tags \boxed{3}", None),
        ("require", r"<think>x</think>\boxed{5}", "5"),
        ("ignore", r"<think>maybe \boxed{1} still thinking", "1"),
    ],
)
def test_think_policies(think, text, expected):
    assert extract_answer(text, ExtractionConfig(think=think)).answer == expected


def test_after_think_region_has_no_answer_when_only_thoughts_box():
    found = extract_answer(r"<think>\boxed{1}</think> I am not sure.", ExtractionConfig(answer_is_fallback=False))
    assert found.answer is None


def test_gsm8k_hash_form_and_its_switch():
    assert extract_answer("work...\n#### 1,234\n").answer == "1,234"
    assert extract_answer("#### 5", ExtractionConfig(hash_answer=False, answer_is_fallback=False)).answer is None


def test_box_beats_hash_and_answer_is():
    assert extract_answer("The answer is 3.\n#### 4\n\\boxed{5}").answer == "5"


def test_answer_is_fallback_takes_the_last_sentence_and_keeps_decimals():
    text = "First the answer is 2. Then, after checking, the final answer is $3.5$. Done."
    assert extract_answer(text).answer == "3.5"
    assert extract_answer(text, ExtractionConfig(answer_is_fallback=False)).answer is None


def test_overlong_answer_is_refused():
    found = extract_answer("\\boxed{" + "1" * 2000 + "}")
    assert (found.answer, found.source) == (None, "answer_too_long")


def test_empty_box():
    assert extract_answer(r"\boxed{}").source == "empty_answer"


def test_bad_config_and_input():
    with pytest.raises(ValueError, match="think policy"):
        ExtractionConfig(think="maybe")
    with pytest.raises(TypeError, match="completion must be a str"):
        extract_answer(b"\\boxed{1}")


def test_last_boxed_reports_missing_box():
    assert last_boxed("nothing here").source == "no_box"
