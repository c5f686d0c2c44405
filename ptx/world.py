"""The embedded oracle world: generated data sets and the exact scorer.

A tiny instruction-following world in plain English that a d_model-64
transformer learns on a laptop CPU, with an exact oracle to measure every
post-training method against the truth. The requests, their answers and
the scorer are `ptx.oracle`; `World` adds the data sets written from them:
pre-training text, SFT demonstrations, preference pairs (labelled like noisy
human labellers; held-out pairs by the oracle), held-out prompts and the
reviews that tune an AI judge. Each follows from the seed alone.

Review text (pre-training rows that teach an AI judge the comparison format):

    Request: {prompt}
    Answer A: {a}
    Answer B: {b}
    Better answer: A

`judge_prompt(prompt, a, b)` renders everything up to and including
"Better answer:"; the verdict follows after one space as the single letter of
`JUDGE_OPTIONS`. The verdict names the answer the oracle scores higher with
probability `judge_accuracy`, in the pre-training corpus and in `review_data`
(the same kind of text as SFT rows, to tune a judge on).
"""
import dataclasses
import functools
import json
import math
import os
import random
import uuid

from ptx.oracle import FACTS, KINDS, PROBLEMS, WORDS, Oracle, request_text

JUDGE_TEMPLATE = "Request: {prompt}\nAnswer A: {a}\nAnswer B: {b}\nBetter answer:"
JUDGE_OPTIONS = ("A", "B")

# Shares of the pre-training rows. Sums at 0.3 (each of the 126 stated ~86 times in the default
# 6000 rows): at 0.15 the quickstart model recalled a held-out sum after "a + b =" with
# probability 0.37, at 0.3 with 0.46-0.52.
_PRETRAIN_MIX = {"transcript": 0.25, "facts": 0.15, "numbers": 0.3, "spelling": 0.15,
                 "review": 0.15}


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    seed: int = 0                    # everything (facts, splits, rows) follows from it
    n_pretrain: int = 6000           # rows of pre-training text
    n_sft: int = 3000                # demonstrations
    n_pref: int = 3000               # preference pairs on training prompts
    n_heldout: int = 200             # held-out prompts (split evenly over kinds) and pairs
    sft_bad_share: float = 0.35      # demonstrations that are wrong, rambling or unsafe
    label_noise: float = 0.2         # Bradley-Terry temperature of labels; 0 = noiseless
    pretrain_bad_share: float = 0.3  # transcripts in pre-training with a bad answer
    judge_accuracy: float = 0.85     # how often a review's verdict is right
    n_reviews: int = 3000            # review rows in the judge-tuning set (`review_data`)


class World(Oracle):
    """All requests, answers and data sets of one seed, and the exact scorer."""

    def __init__(self, config: WorldConfig = WorldConfig()):
        super().__init__(config.seed)
        self.config = config

    # --------------------------------------------------------------- data sets

    def _response(self, prompt: str, rng: random.Random, bad_share: float) -> str:
        """The good answer, or with probability `bad_share` a bad one of a random style."""
        if rng.random() < bad_share:
            return self.bad_response(prompt, rng, rng.choice(self.bad_styles(prompt)))
        return self.good_response(prompt)

    def _unequal_pair(self, prompt: str, rng: random.Random) -> tuple[str, str, float, float]:
        """Two responses that the oracle scores differently, in random order.

        Equal scores carry no preference, so such pairs are redrawn rather
        than labelled by a coin flip; at least half of all draws are unequal.
        """
        while True:
            x, y = self._response(prompt, rng, 0.5), self._response(prompt, rng, 0.5)
            sx, sy = self.score(prompt, x), self.score(prompt, y)
            if sx != sy:
                return x, y, sx, sy

    def _rng(self, stream: str) -> random.Random:
        # One stream per data set: each is reproducible alone, in any call order.
        return random.Random(f"{self.config.seed}:{stream}")

    def _train_prompt(self, rng: random.Random) -> str:
        return rng.choice(self._prompts[rng.choice(KINDS)]["train"])

    def pretrain_corpus(self) -> list[dict]:
        """Rows {'text'}: transcripts, fact, sum and spelling statements, reviews.

        Transcripts are "\\n\\nHuman: {prompt}\\n\\nAssistant: {response}" on
        training prompts, with `pretrain_bad_share` bad answers, as on the web.
        """
        rng, cfg = self._rng("pretrain"), self.config
        rows = []
        for source in rng.choices(list(_PRETRAIN_MIX), list(_PRETRAIN_MIX.values()),
                                  k=cfg.n_pretrain):
            if source == "transcript":
                p = self._train_prompt(rng)
                response = self._response(p, rng, cfg.pretrain_bad_share)
                text = f"\n\nHuman: {p}\n\nAssistant: {response}"
            elif source == "facts":
                c = rng.choice(self.countries)
                text = " ".join(rng.sample([s.format(c=c, v=self.facts[c, attr])
                                            for attr, (_, s) in FACTS.items()], len(FACTS)))
            elif source == "numbers":
                text = " ".join(f"{a} {op} {b} = {a + b if op == '+' else a - b}."
                                for a, op, b in rng.sample(PROBLEMS, 6))
            elif source == "spelling":
                text = " ".join(f"{w} is spelled {' '.join(w)}. {w} backwards is {w[::-1]}."
                                for w in rng.sample(WORDS, 3))
            else:
                review, verdict = self._review(rng)
                text = f"{review} {verdict}"
            rows.append({"text": text})
        return rows

    def _review(self, rng: random.Random) -> tuple[str, str]:
        """(review text up to "Better answer:", verdict letter), right with probability `judge_accuracy`."""
        p = self._train_prompt(rng)
        x, y, sx, sy = self._unequal_pair(p, rng)
        says_a = (sx > sy) == (rng.random() < self.config.judge_accuracy)
        return judge_prompt(p, x, y), JUDGE_OPTIONS[0 if says_a else 1]

    def review_data(self) -> list[dict]:
        """Rows {'prompt': review text, 'completion': verdict letter}: `n_reviews`
        reviews from the web (the pre-training corpus's kind, same accuracy), in
        the SFT schema, so a judge can be tuned on its verdicts with an empty
        prompt template. No row is an oracle label: `judge_accuracy` of them are right.
        """
        rng = self._rng("reviews")
        return [dict(zip(("prompt", "completion"), self._review(rng))) for _ in range(self.config.n_reviews)]

    def sft_data(self) -> list[dict]:
        """Rows {'prompt', 'completion'}; `sft_bad_share` of completions score < 1.

        The prompt is the bare request: the data module adds the template.
        """
        rng, rows = self._rng("sft"), []
        for _ in range(self.config.n_sft):
            p = self._train_prompt(rng)
            rows.append({"prompt": p,
                         "completion": self._response(p, rng, self.config.sft_bad_share)})
        return rows

    def preference_data(self, heldout: bool = False) -> list[dict]:
        """Rows {'prompt', 'chosen', 'rejected'} over responses of unequal oracle score.

        Training pairs (`n_pref`) are labelled as noisy human labellers would:
        P(x chosen) = sigmoid((score_x - score_y) / label_noise). Held-out
        pairs (`n_heldout`, on held-out prompts) carry the noiseless oracle
        label, so that reward-model accuracy is measured against the truth.
        """
        rng = self._rng("pref-heldout" if heldout else "pref")
        prompts = [r["prompt"] for r in self.heldout_prompts()] if heldout else []
        rows = []
        for i in range(self.config.n_heldout if heldout else self.config.n_pref):
            p = prompts[i % len(prompts)] if heldout else self._train_prompt(rng)
            x, y, sx, sy = self._unequal_pair(p, rng)
            x_wins = sx > sy if heldout else self._human_prefers_first(sx, sy, rng)
            rows.append({"prompt": p, "chosen": x if x_wins else y, "rejected": y if x_wins else x})
        return rows

    def _human_prefers_first(self, sx: float, sy: float, rng: random.Random) -> bool:
        noise = self.config.label_noise
        return sx > sy if noise == 0 else rng.random() < _sigmoid((sx - sy) / noise)

    def human_labels(self, rows: list[dict], seed: int) -> list[dict]:
        """The simulated human labellers on any pairs, e.g. samples of a policy (as
        InstructGPT's labellers compared the model's own outputs).

        rows: {prompt, chosen, rejected} (the order is ignored). Returns rows
        {prompt, chosen, rejected} labelled like `preference_data`'s, without
        the pairs the oracle scores equally (a tie carries no preference).
        """
        rng = random.Random(f"{self.config.seed}:human-labels:{seed}")
        out = []
        for r in rows:
            p, x, y = r["prompt"], r["chosen"], r["rejected"]
            sx, sy = self.score(p, x), self.score(p, y)
            if sx != sy:
                x_wins = self._human_prefers_first(sx, sy, rng)
                out.append({"prompt": p, "chosen": x if x_wins else y, "rejected": y if x_wins else x})
        return out

    def heldout_prompts(self) -> list[dict]:
        """Rows {'prompt', 'kind', 'answer'}: `n_heldout` held-out requests, even over kinds."""
        rng, n = self._rng("heldout"), self.config.n_heldout
        rows = []
        for i, kind in enumerate(KINDS):
            pool = self._prompts[kind]["heldout"]
            k = min(n // len(KINDS) + (i < n % len(KINDS)), len(pool))
            rows += [{"prompt": p, "kind": kind, "answer": self.good_response(p)}
                     for p in rng.sample(pool, k)]
        return rows

    def write(self, outdir: str) -> dict[str, str]:
        """Writes the data sets as UTF-8 JSON lines; returns name -> path.

        Names: pretrain, sft, preference, preference_heldout, heldout, reviews.
        """
        os.makedirs(outdir, exist_ok=True)
        sets = {"pretrain": self.pretrain_corpus(), "sft": self.sft_data(),
                "preference": self.preference_data(),
                "preference_heldout": self.preference_data(heldout=True),
                "heldout": self.heldout_prompts(), "reviews": self.review_data()}
        paths = {}
        for name, rows in sets.items():
            paths[name] = os.path.join(outdir, f"{name}.jsonl")
            # Write, then rename: every process of a multi-host run writes these same
            # files into the shared workdir while the others may already be reading them.
            tmp = f"{paths[name]}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            os.replace(tmp, paths[name])
        return paths


def judge_prompt(prompt: str, a: str, b: str) -> str:
    """The review text up to "Better answer:"; the judge then reads " A" vs " B".

    Line breaks inside the answers become spaces: one line per field.
    """
    return JUDGE_TEMPLATE.format(prompt=request_text(prompt), a=" ".join(a.split()),
                                 b=" ".join(b.split()))


def make_reward_fn(world: World):
    """The oracle of `world` as a reward function (prompt, completion) -> float."""
    return world.score


@functools.lru_cache(maxsize=1)
def _default_world() -> World:
    return World(WorldConfig())


def oracle_reward(prompt: str, completion: str) -> float:
    """The oracle of the default world (`WorldConfig()`), usable by name as a reward."""
    return _default_world().score(prompt, completion)
