"""Reward functions that test configs name as `reward.function = "module:function"`.

A module of its own, not conftest.py: the stage imports it by name, and the multi-process tests'
subprocesses import it as `tests.reward_fns` (importing conftest there would run its set-up again)."""


def letter_share(prompt: str, completion: str) -> float:
    """A dense, known reward: the share of letters among the completion's characters."""
    return sum(ch.isalpha() for ch in completion) / max(len(completion), 1)
