"""Reward sources: the function interface (a data row's fields reach the verifiers that name them)
and the verifiable rewards (math answer equivalence, format, length)."""
import functools
import json
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


@pytest.mark.parametrize("name, problem", [
    ("no_such_module:f", "cannot import module 'no_such_module' (No module named 'no_such_module')"),
    ("ptx.rewards:no_such_reward", "module 'ptx.rewards' has no attribute 'no_such_reward'"),
    ("ptx.rewards:SOURCES", "'SOURCES' is a tuple, not a function"),
    ("math_reward", "expected 'module:function'"),
])
def test_a_reward_function_that_is_not_there_is_named_when_the_config_is_built(name, problem):
    with pytest.raises(rewards.RewardError) as e:
        rewards.SourceConfig(source="function", function=name)
    assert str(e.value) == f"reward.function={name!r}: {problem}"


def prompts_file(tmp_path, rows) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_reward_functions_fields_are_checked_against_the_data_before_anything_runs(tmp_path):
    path = prompts_file(tmp_path, [{"prompt": "1+1?", "answer": "2"}, {"prompt": "2+2?"}])
    rows, _ = data.load_rows(path, "prompt")
    cfg = rewards.SourceConfig(source="function", function="ptx.rewards:math_reward")
    with pytest.raises(rewards.RewardError) as e:
        rewards.make_source(cfg, None, rows)
    assert str(e.value) == (f"reward.function='ptx.rewards:math_reward' reads field 'answer' or 'solution' of each "
                            f"row; {path}: line 2 has none")
    needs_kind = rewards.FunctionReward(lambda prompt, completion, kind: 1.0, "m:needs_kind")
    with pytest.raises(rewards.RewardError, match=f"reads field 'kind' of each row; {path}: line 1 has none"):
        needs_kind.check_rows(rows)


def raises(prompt, completion, answer):
    return 1.0 / 0


@pytest.mark.parametrize("fn, problem", [
    (raises, "raised ZeroDivisionError: float division by zero on {where}"),
    (lambda p, c, answer: float("nan"), "returned nan on {where}; a reward must be a finite number"),
    (lambda p, c, answer: None, "returned None on {where}; a reward must be a finite number"),
    (lambda p, c, answer: "1.0", "returned '1.0' on {where}; a reward must be a finite number"),
])
def test_a_reward_that_fails_while_scoring_names_the_function_the_row_and_the_value(tmp_path, fn, problem):
    path = prompts_file(tmp_path, [{"prompt": "a", "answer": "1"}, {}, {"prompt": "b", "answer": "2"}])
    rows, _ = data.load_rows(path, "prompt", on_bad_row="skip")  # line 2 skipped: rows keep their lines
    source = rewards.FunctionReward(fn, "my_rewards:score")
    with pytest.raises(rewards.RewardError) as e:
        source(None, ["a", "b"], ["x", "y"], rows=rows)
    assert str(e.value) == "reward.function='my_rewards:score' " + problem.format(where=f"{path}: line 1")
    assert (e.value.__cause__ is not None) == (fn is raises)  # the user's traceback, for --verbose
