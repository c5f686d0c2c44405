"""Tests for the oracle world: the splits and the generated data sets (the scorer: test_oracle.py)."""
import dataclasses
import json
import math
import random

import pytest

from ptx import world as world_lib
from ptx.oracle import KINDS, PROBLEMS
from ptx.world import JUDGE_OPTIONS, World, WorldConfig

SMALL = WorldConfig(seed=3, n_pretrain=1500, n_sft=3000, n_pref=3000, n_heldout=200)


@pytest.fixture(scope="module")
def world():
    return World(SMALL)


@pytest.fixture(scope="module")
def data(world):
    return {"pretrain": world.pretrain_corpus(), "sft": world.sft_data(),
            "preference": world.preference_data(),
            "preference_heldout": world.preference_data(heldout=True),
            "heldout": world.heldout_prompts()}


def test_generators_are_deterministic_per_seed(data):
    again = World(SMALL)
    assert again.pretrain_corpus() == data["pretrain"]
    assert again.sft_data() == data["sft"]
    assert again.preference_data() == data["preference"]
    assert again.preference_data(heldout=True) == data["preference_heldout"]
    assert again.heldout_prompts() == data["heldout"]
    other = World(dataclasses.replace(SMALL, seed=4))
    assert other.facts != again.facts
    assert other.sft_data() != data["sft"]
    assert other.pretrain_corpus() != data["pretrain"]
    assert other.heldout_prompts() != data["heldout"]


def test_heldout_prompts_never_appear_in_training_files(data):
    heldout = [r["prompt"] for r in data["heldout"]]
    assert len(set(heldout)) == len(heldout)
    training_prompts = {r["prompt"] for r in data["sft"] + data["preference"]}
    assert not training_prompts & set(heldout)
    # Substring search also covers prompts inside transcripts and review text.
    corpus = "\n".join(r["text"] for r in data["pretrain"])
    assert "\n\nHuman: " in corpus and "Better answer:" in corpus
    assert [p for p in heldout if p in corpus] == []
    assert {r["prompt"] for r in data["preference_heldout"]} <= set(heldout)


def test_heldout_covers_every_kind_evenly(world, data):
    counts = {k: sum(r["kind"] == k for r in data["heldout"]) for k in KINDS}
    assert counts == {k: 50 for k in KINDS}
    assert all(world.kind_of(r["prompt"]) == r["kind"] for r in data["heldout"])


def test_good_response_is_perfect_and_every_bad_style_is_not(world, data):
    rng = random.Random(0)
    prompts = [r["prompt"] for r in data["heldout"] + data["sft"][:400]]
    for row in data["heldout"]:
        assert world.good_response(row["prompt"]) == row["answer"]
    for p in prompts:
        assert world.score(p, world.good_response(p)) == 1.0, p
        for style in world.bad_styles(p):
            for _ in range(3):
                bad = world.bad_response(p, rng, style)
                assert world.score(p, bad) < 1.0, (p, style, bad)
    with pytest.raises(ValueError, match="does not apply"):
        world.bad_response("What is 1 + 1?", rng, "unsafe")


def test_sft_bad_share_matches_config(world, data):
    bad = sum(world.score(r["prompt"], r["completion"]) < 1 for r in data["sft"])
    share, n = SMALL.sft_bad_share, len(data["sft"])
    assert abs(bad / n - share) < 4 * math.sqrt(share * (1 - share) / n)
    clean = World(dataclasses.replace(SMALL, n_sft=300, sft_bad_share=0.0)).sft_data()
    assert all(r["completion"] == world.good_response(r["prompt"]) for r in clean)


def _agreement(world, rows):
    """Fraction of pairs whose chosen side the oracle scores higher, and the expectation."""
    agree, expected = 0, 0.0
    for r in rows:
        sc, sr = world.score(r["prompt"], r["chosen"]), world.score(r["prompt"], r["rejected"])
        assert sc != sr
        agree += sc > sr
        expected += world_lib._sigmoid(abs(sc - sr) / world.config.label_noise)
    return agree / len(rows), expected / len(rows)


def test_preference_labels_follow_bradley_terry_noise(world, data):
    observed, expected = _agreement(world, data["preference"])
    n = len(data["preference"])
    assert 0.8 < expected < 0.99
    assert abs(observed - expected) < 4 * math.sqrt(expected * (1 - expected) / n)


def test_noiseless_and_heldout_preference_labels_agree_with_oracle(world, data):
    noiseless = World(dataclasses.replace(SMALL, label_noise=0.0, n_pref=500))
    rows = noiseless.preference_data()
    assert all(noiseless.score(r["prompt"], r["chosen"])
               > noiseless.score(r["prompt"], r["rejected"]) for r in rows)
    assert len(data["preference_heldout"]) == SMALL.n_heldout
    assert all(world.score(r["prompt"], r["chosen"]) > world.score(r["prompt"], r["rejected"])
               for r in data["preference_heldout"])


def test_mismatch_and_off_topic_answers_are_right_answers_to_other_requests(world, data):
    """What small models do wrong: answer a similar request, or a request of another kind."""
    rng = random.Random(1)
    statements = {s.format(c=c, v=world.facts[c, a]) for (c, a) in world.facts for s in [world_lib.FACTS[a][1]]}
    for row in data["heldout"]:
        p, kind = row["prompt"], row["kind"]
        for style in ("mismatch", "off_topic"):
            if style not in world.bad_styles(p):
                continue
            answer = world.bad_response(p, rng, style)
            assert world.score(p, answer) == 0.0, (p, style, answer)
            if style == "mismatch" and kind == "arithmetic":
                a, op, b, c = answer.rstrip(".").replace("=", "").split()
                assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b))
            elif style == "mismatch" and kind == "reverse":
                w, _, _, r = answer.rstrip(".").split()
                assert r == w[::-1] and w not in p.split()
            elif style == "mismatch":
                assert answer in statements
            else:
                assert answer in {world.good_response(q) for k in KINDS if k not in (kind, "harmful")
                                  for q in world._prompts[k]["train"]}


def test_review_data_is_sft_rows_with_verdicts_of_judge_accuracy(world):
    rows = world.review_data()
    assert len(rows) == world.config.n_reviews
    right = 0
    for r in rows:
        prompt, a, b = (line.split(": ", 1)[1] for line in r["prompt"].split("\n")[:3])
        assert r["prompt"] == world_lib.judge_prompt(prompt, a, b) and r["completion"] in JUDGE_OPTIONS
        right += r["completion"] == ("A" if world.score(prompt, a) > world.score(prompt, b) else "B")
    acc, n = world.config.judge_accuracy, len(rows)
    assert abs(right / n - acc) < 4 * math.sqrt(acc * (1 - acc) / n)


def test_review_text_verdicts_match_judge_accuracy(world, data):
    reviews = [r["text"] for r in data["pretrain"] if r["text"].startswith("Request: ")]
    assert len(reviews) > 100
    right = 0
    for text in reviews:
        head, verdict = text.rsplit(" ", 1)
        prompt, a, b = (line.split(": ", 1)[1] for line in head.split("\n")[:3])
        assert head == world_lib.judge_prompt(prompt, a, b) and verdict in JUDGE_OPTIONS
        better = "A" if world.score(prompt, a) > world.score(prompt, b) else "B"
        right += verdict == better
    acc, n = world.config.judge_accuracy, len(reviews)
    assert abs(right / n - acc) < 4 * math.sqrt(acc * (1 - acc) / n)


def test_pretrain_states_heldout_knowledge_as_plain_text(world, data):
    corpus = "\n".join(r["text"] for r in World(dataclasses.replace(SMALL, n_pretrain=6000))
                       .pretrain_corpus())
    facts = [r for r in data["heldout"] if r["kind"] == "facts"]
    assert all(r["answer"] in corpus for r in facts)


def _source(text: str) -> str:
    """The `_PRETRAIN_MIX` source a pre-training row was drawn from, by its form."""
    if text.startswith("\n\nHuman: "):
        return "transcript"
    if text.startswith("Request: "):
        return "review"
    if " is spelled " in text:
        return "spelling"
    return "numbers" if " = " in text else "facts"


def test_pretrain_rows_follow_the_mix_and_state_every_sum_often():
    # The default size: at 0.15 of the rows the sums were stated too rarely for the quickstart
    # model to recall them; the held-out sums are answered from these statements alone.
    w = World(WorldConfig())
    rows = [r["text"] for r in w.pretrain_corpus()]
    n = len(rows)
    for source, share in world_lib._PRETRAIN_MIX.items():
        got = sum(_source(t) == source for t in rows) / n
        assert abs(got - share) < 4 * math.sqrt(share * (1 - share) / n), source
    statements = " ".join(t for t in rows if _source(t) == "numbers")
    counts = [statements.count(f"{a} {op} {b} = {a + b if op == '+' else a - b}.") for a, op, b in PROBLEMS]
    assert min(counts) >= 40
    heldout = [r["prompt"] for r in w.heldout_prompts() if r["kind"] == "arithmetic"]
    assert all(w.good_response(p) in statements for p in heldout)


def test_write_produces_jsonl_files_with_schema_fields(tmp_path):
    cfg = WorldConfig(seed=1, n_pretrain=50, n_sft=40, n_pref=30, n_heldout=20, n_reviews=10)
    paths = World(cfg).write(str(tmp_path / "world"))
    fields = {"pretrain": {"text"}, "sft": {"prompt", "completion"},
              "preference": {"prompt", "chosen", "rejected"},
              "preference_heldout": {"prompt", "chosen", "rejected"},
              "heldout": {"prompt", "kind", "answer"}, "reviews": {"prompt", "completion"}}
    sizes = {"pretrain": 50, "sft": 40, "preference": 30, "preference_heldout": 20, "heldout": 20,
             "reviews": 10}
    assert set(paths) == set(fields)
    for name, path in paths.items():
        assert path.endswith(f"{name}.jsonl")
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        assert len(rows) == sizes[name]
        assert all(set(r) == fields[name] and all(isinstance(v, str) and v for v in r.values())
                   for r in rows), name


def test_oracle_reward_uses_the_default_world():
    w = World(WorldConfig())
    prompt = w.heldout_prompts()[120]["prompt"]
    assert world_lib.oracle_reward(prompt, w.good_response(prompt)) == 1.0
    assert world_lib.make_reward_fn(w)(prompt, "") == 0.0


def test_human_labels_drop_ties_follow_bradley_terry_and_are_deterministic(world):
    rng = random.Random(5)
    prompts = [world._train_prompt(rng) for _ in range(4000)]
    rows = []
    for p in prompts:
        x, y = world._response(p, rng, 0.5), world._response(p, rng, 0.5)
        rows.append({"prompt": p, "chosen": x, "rejected": y})
    labelled = world.human_labels(rows, seed=0)
    assert labelled == world.human_labels(rows, seed=0) != world.human_labels(rows, seed=1)
    unequal = [r for r in rows if world.score(r["prompt"], r["chosen"]) != world.score(r["prompt"], r["rejected"])]
    assert len(labelled) == len(unequal) < len(rows)
    # Each label is right with probability sigmoid(|score gap| / label_noise).
    right = [world.score(r["prompt"], r["chosen"]) > world.score(r["prompt"], r["rejected"]) for r in labelled]
    expected = [1 / (1 + math.exp(-abs(world.score(r["prompt"], r["chosen"])
                                       - world.score(r["prompt"], r["rejected"])) / world.config.label_noise))
                for r in labelled]
    n = len(right)
    var = sum(p * (1 - p) for p in expected)
    assert abs(sum(right) - sum(expected)) < 4 * math.sqrt(var) + 1
    noiseless = World(dataclasses.replace(SMALL, label_noise=0.0))
    assert all(noiseless.score(r["prompt"], r["chosen"]) > noiseless.score(r["prompt"], r["rejected"])
               for r in noiseless.human_labels(rows, seed=0)) and n > 1000
