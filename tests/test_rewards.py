"""Reward sources: the function interface (a data row's fields reach the verifiers that name them)
and the verifiable rewards (math answer equivalence, format, length)."""
import functools
import os

import numpy as np
import pytest

from ptx import data, rewards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "gsm8k_style.jsonl")


@pytest.mark.parametrize("completion,answer,want", [
    ("So she makes \\boxed{72} muffins.", "72", 1.0),
    ("48 / 2 = 24 and 48 + 24 = 72.\n#### 72", "In all 48 + 24 = 72 muffins.\n#### 72", 1.0),
    ("The answer is 72.", "#### 72", 1.0),
    ("Half is \\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("It is 3/8 of the pizza.", "#### 3/8", 1.0),
    ("Sam has 12000 dollars.", "#### 12,000", 1.0),
    ("The answer is $x^2 + 1$", "x^2+1", 1.0),
    ("48 + 24 = 72, minus 1: \\boxed{71}", "72", 0.0),
    ("#### 73", "In all 48 + 24 = 72.\n#### 72", 0.0),
    ("I do not know.", "72", 0.0),
    ("", "72", 0.0),
])
def test_math_reward_is_answer_equivalence(completion, answer, want):
    assert rewards.math_reward("Q", completion, answer=answer) == want


def test_math_reward_reads_the_solution_field_and_needs_a_reference():
    assert rewards.math_reward("Q", "\\boxed{5}", solution="We get $\\boxed{5}$.") == 1.0
    with pytest.raises(ValueError, match="'answer' or 'solution'"):
        rewards.math_reward("Q", "5")
    with pytest.raises(ValueError, match="cannot read"):
        rewards.math_reward("Q", "5", answer="???")


def test_format_reward_wants_reasoning_in_think_tags_then_an_answer():
    assert rewards.format_reward("Q", "<think>48 / 2 = 24</think> The answer is 72.") == 1.0
    assert rewards.format_reward("Q", "\n<think>\nline one\nline two\n</think>\n\\boxed{72}") == 1.0
    assert rewards.format_reward("Q", "The answer is 72.") == 0.0
    assert rewards.format_reward("Q", "<think>no answer follows</think>  ") == 0.0
    assert rewards.format_reward("Q", "<think>a</think><think>b</think> 72") == 0.0
    boxed = functools.partial(rewards.format_reward, pattern=r".*\\boxed\{[^}]+\}\s*")
    assert rewards.FunctionReward(boxed)(None, ["Q", "Q"], ["so \\boxed{3}", "so 3"]).tolist() == [1.0, 0.0]


def test_length_penalty_counts_words_beyond_the_limit():
    assert rewards.length_penalty("Q", "one two three", limit=4) == 0.0
    assert rewards.length_penalty("Q", "one two three four five six", limit=4) == -0.5
    assert rewards.length_penalty("Q", " ".join(["w"] * 50), limit=4) == -1.0
    # Without a limit: twice the reference's words (here 3, so 6 are free).
    assert rewards.length_penalty("Q", "a b c d e f", answer="It is 72.") == 0.0
    assert rewards.length_penalty("Q", "a b c d e f g h i", solution="It is 72.") == -0.5


def test_function_reward_passes_the_fields_a_function_names():
    seen = []
    named = lambda prompt, completion, answer=None: seen.append(("named", answer)) or 1.0
    every = lambda prompt, completion, **fields: seen.append(("every", fields)) or 2.0
    plain = lambda prompt, completion: seen.append(("plain",)) or 3.0
    rows = [{"prompt": "P", "completion": "demo", "answer": "7", "kind": "math"}]
    for fn in (named, every, plain):
        rewards.FunctionReward(fn)(None, ["P"], ["c"], rows=rows)
    assert seen == [("named", "7"), ("every", {"answer": "7", "kind": "math"}), ("plain",)]
    # Without rows (a reward model's caller, the evaluation): the function's defaults.
    assert rewards.FunctionReward(named)(None, ["P"], ["c"]).tolist() == [1.0] and seen[-1] == ("named", None)


def test_the_gsm8k_style_example_grades_its_own_solutions_right_and_a_wrong_number_wrong():
    rows, _ = data.load_rows(EXAMPLE, "prompt")
    source = rewards.make_source(rewards.SourceConfig(source="function", function="ptx.rewards:math_reward"), None)
    solutions = [r["answer"] for r in rows]
    assert source(None, [r["prompt"] for r in rows], solutions, rows=rows).tolist() == [1.0] * len(rows)
    wrong = [s.rsplit("####", 1)[0] + "#### 1" for s in solutions]
    np.testing.assert_array_equal(source(None, [r["prompt"] for r in rows], wrong, rows=rows), 0.0)
