"""AI feedback (RLAIF): a ptx transformer as judge, read from next-token logits.

A judge is any language-model checkpoint prompted with a comparison template:
the principles (a small constitution, one plain line each), then the request
and two answers labelled A and B. The default is the embedded world's review
format (`world.JUDGE_TEMPLATE`), which pre-training teaches:

    Request: {prompt}
    Answer A: {a}
    Answer B: {b}
    Better answer:

P(A) = softmax([logit(" A"), logit(" B")])[0] at the last prompt token; nothing
is sampled. Each pair is judged in both orders and the two are averaged,
p_first = (P(A | a, b) + 1 - P(A | b, a)) / 2, which cancels a preference for
a position; `position_flip_rate` is the share of pairs whose verdict changes
with the order.

Direct RLAIF (d-RLAIF, Lee et al. 2023): `Judge.score` asks for a 1-10 rating
and returns its expectation under the judge's softmax over the score tokens;
`JudgeReward` is that score as a reward source (see ptx/rewards.py).

A verdict is read from one token. Verdicts that start with the same tokens
(under split digits " 7" is "▁", "7") have those appended to the prompt, and
each must be a single token after them, else ValueError. Scores are 1..9,
plus 10 only when " 10" is also a single token there: with split digits "10"
begins with the token of "1", so it cannot be told apart from "1" by the next
token, and the scale then ends at 9.

`label_pairs` turns verdicts into preference rows ({prompt, chosen, rejected,
prob_chosen}, an ordinary input of the reward and DPO stages); the
`ai_feedback` stage (ptx/stages/ai_feedback.py) runs it on a policy's samples.
"""
import jax
import jax.numpy as jnp
import numpy as np

from ptx import inference, sampler, sharding, world
from ptx.model import Transformer
from ptx.tokenizer import Tokenizer

SCORE_TEMPLATE = "Request: {prompt}\nAnswer: {response}\nScore (1-10):"
# Prompt widths are rounded up to a multiple of this, so a few shapes compile
# rather than one per call.
_WIDTH_MULTIPLE = 32


def verdict_tokens(tok: Tokenizer, verdicts) -> tuple[list[int], list[int]]:
    """(prefix ids appended to every prompt, one option id per verdict).

    verdicts: the texts that may follow the prompt, e.g. (" A", " B"). Their
    shared leading tokens form the prefix; what follows must be one token,
    distinct across verdicts, else ValueError.
    """
    encoded = [tok.encode(v) for v in verdicts]
    shared = 0
    while all(len(e) > shared + 1 for e in encoded) and len({e[shared] for e in encoded}) == 1:
        shared += 1
    for v, e in zip(verdicts, encoded):
        if len(e) != shared + 1:
            raise ValueError(f"judge verdict {v!r} is the tokens {[tok.decode([i]) for i in e]} in "
                             f"{tok.path}; the judge reads each verdict from one token, after the "
                             f"tokens that all verdicts share ({shared} here)")
    ids = [e[shared] for e in encoded]
    if len(set(ids)) != len(ids):
        raise ValueError(f"judge verdicts {list(verdicts)} share option tokens {ids} in {tok.path}")
    return encoded[0][:shared], ids


def _softmax(logits: np.ndarray) -> np.ndarray:
    """[n, k] float32 -> [n, k] float64 probabilities."""
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


class Judge:
    """A language model as pairwise judge and 1-10 rater, batched and jitted."""

    def __init__(self, policy: inference.Policy, *, principles=(), template: str = None,
                 score_template: str = SCORE_TEMPLATE, batch_size: int = 16):
        """policy: the judge's model, tokenizer and mesh (`inference.load_policy`).
        principles: plain-text lines prepended to every judge prompt.
        template: a format string with {prompt}, {a} and {b} that labels the
        answers A and B and ends where the verdict " A" / " B" follows
        (None = world.JUDGE_TEMPLATE). score_template: {prompt} and {response},
        ending where " 1" .. " 10" follows. batch_size: prompts per forward, a
        multiple of the mesh's data-parallel devices.
        """
        sharding.check_batch(policy.mesh, batch_size, "judge batch_size")
        self.policy, self.batch_size = policy, batch_size
        self.principles = tuple(principles)
        self.template = template or world.JUDGE_TEMPLATE
        self.score_template = score_template
        tok = policy.tok
        self.pair_prefix, self.pair_ids = verdict_tokens(tok, [f" {o}" for o in world.JUDGE_OPTIONS])
        self.score_prefix, self.score_ids = verdict_tokens(tok, [f" {k}" for k in range(1, 10)])
        ten = tok.encode(" 10")
        if ten[:-1] == self.score_prefix and ten[-1] not in self.score_ids:
            self.score_ids = self.score_ids + [ten[-1]]
        self.score_values = np.arange(1, len(self.score_ids) + 1, dtype=np.float64)
        model = Transformer(policy.cfg)

        def option_logits(params, tokens, lens, option_ids):
            # Left-aligned, every prompt ends in the last column: one LM-head row per prompt.
            tokens, positions, segment_ids = sampler.left_align(tokens, lens)
            out = model.apply({"params": params}, tokens, positions, segment_ids, logits="last")
            return out.logits[:, -1][:, option_ids].astype(jnp.float32)

        # Replicated out: every process reads every row's logits back to the host.
        self._option_logits = jax.jit(option_logits, out_shardings=sharding.replicated(policy.mesh))

    def render(self, template: str, prompt: str, **answers: str) -> str:
        """The judge prompt: principles, one line each, then the filled template.

        As in `world.judge_prompt`, the prompt is reduced to the bare request
        (also from a Human/Assistant prompt) and each answer to one line.
        """
        filled = template.format(prompt=world.request_text(prompt),
                                 **{k: " ".join(v.split()) for k, v in answers.items()})
        return "".join(f"{p}\n" for p in self.principles) + filled

    def option_logits(self, texts: list[str], prefix: list[int], option_ids: list[int]) -> np.ndarray:
        """Next-token logits of the options after each text: [n, len(option_ids)] float32.

        Each row is [bos] + encode(text) + prefix (no bos when the tokenizer has
        none), right-padded to a shared width; chunks of batch_size, the last
        one padded by repetition.
        """
        n, bs, tok = len(texts), self.batch_size, self.policy.tok
        if not n:
            return np.zeros((0, len(option_ids)), np.float32)
        bos = [tok.bos_id] if tok.bos_id >= 0 else []  # Qwen has none
        ids = [bos + e + prefix for e in tok.encode_batch(texts)]
        lens = np.array([len(i) for i in ids], np.int32)
        width = -(-int(lens.max()) // _WIDTH_MULTIPLE) * _WIDTH_MULTIPLE
        tokens = np.full((n, width), tok.pad_id, np.int32)
        for row, i in zip(tokens, ids):
            row[:len(i)] = i
        options = jnp.asarray(option_ids, jnp.int32)
        out = []
        # Every process holds every text: each places the rows its own devices hold.
        for placed, _, keep in sharding.chunks({"tokens": tokens, "lens": lens}, bs, self.policy.mesh):
            logits = self._option_logits(self.policy.params, placed["tokens"], placed["lens"], options)
            out.append(np.asarray(logits)[:keep])
        return np.concatenate(out)

    def compare(self, prompts, first, second) -> dict:
        """Each pair judged in both orders.

        prompts, first, second: n texts each. Returns 'p_a_given_ab' [n]
        float32 (P(A) with first as A), 'p_a_given_ba' [n] float32 (P(A) with
        second as A), 'prob_first' [n] float32 (the debiased probability that
        first is better) and 'flipped' [n] bool (the verdict changes with the
        order).
        """
        if not len(prompts) == len(first) == len(second):
            raise ValueError(f"compare needs as many prompts ({len(prompts)}) as first ({len(first)}) "
                             f"and second ({len(second)}) responses")
        n = len(prompts)
        texts = ([self.render(self.template, p, a=x, b=y) for p, x, y in zip(prompts, first, second)]
                 + [self.render(self.template, p, a=y, b=x) for p, x, y in zip(prompts, first, second)])
        p_a = _softmax(self.option_logits(texts, self.pair_prefix, self.pair_ids))[:, 0]
        ab, ba = p_a[:n], p_a[n:]
        # (ab + 1 - ba) / 2 on multiples of 2^-24, where p and 1 - p are both exact
        # in float32: the same pair with its answers swapped gets exactly 1 - p.
        prob_first = 0.5 + np.round((ab - ba) * 2.0 ** 23) / 2.0 ** 24
        return {"p_a_given_ab": ab.astype(np.float32), "p_a_given_ba": ba.astype(np.float32),
                "prob_first": prob_first.astype(np.float32), "flipped": (ab > 0.5) != (ba < 0.5)}

    def prob_first(self, prompts, first, second) -> np.ndarray:
        """[n] float32: the debiased probability that `first` is the better answer."""
        return self.compare(prompts, first, second)["prob_first"]

    def score(self, prompts, responses) -> np.ndarray:
        """d-RLAIF: [n] float32 expected rating, sum_k k * P(k) over the score tokens."""
        texts = [self.render(self.score_template, p, response=r) for p, r in zip(prompts, responses)]
        probs = _softmax(self.option_logits(texts, self.score_prefix, self.score_ids))
        return (probs @ self.score_values).astype(np.float32)


class JudgeReward:
    """The judge's expected rating as a reward source: source(seq, prompts, completions) -> [b] float32."""

    def __init__(self, judge: Judge):
        self.judge = judge

    def __call__(self, seq, prompts, completions, rows=None) -> np.ndarray:
        return self.judge.score(prompts, completions)


def label_pairs(judge: Judge, prompts, responses_a, responses_b, *, threshold: float,
                grade=None) -> tuple[list[dict], dict]:
    """Preference rows from the judge's debiased verdicts.

    threshold: pairs with confidence max(p, 1 - p) below it are dropped.
    grade: optional oracle (prompt, response) -> float, e.g. `World.score`.
    Returns (rows, stats). rows: {prompt, chosen, rejected, prob_chosen} with
    chosen the side the judge prefers and prob_chosen = max(p, 1 - p).
    stats: n_pairs, n_kept, n_dropped, position_flip_rate (over all pairs),
    mean_prob_chosen (kept), and with `grade` agreement_with_oracle (share of
    kept pairs the oracle orders the same way, ties excluded) and
    oracle_pairs (the pairs it counts); a share of nothing is None.
    """
    if not 0.5 <= threshold <= 1.0:
        raise ValueError(f"judge threshold={threshold} outside [0.5, 1]")
    out = judge.compare(prompts, responses_a, responses_b)
    rows = []
    for prompt, a, b, p in zip(prompts, responses_a, responses_b, out["prob_first"].tolist()):
        confidence = max(p, 1.0 - p)
        if confidence >= threshold:
            chosen, rejected = (a, b) if p >= 0.5 else (b, a)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                         "prob_chosen": confidence})
    n = len(out["prob_first"])
    stats = {"n_pairs": n, "n_kept": len(rows), "n_dropped": n - len(rows),
             "position_flip_rate": float(out["flipped"].mean()) if n else None,
             "mean_prob_chosen": float(np.mean([r["prob_chosen"] for r in rows])) if rows else None}
    if grade is not None:
        margins = [grade(r["prompt"], r["chosen"]) - grade(r["prompt"], r["rejected"]) for r in rows]
        decided = [m > 0 for m in margins if m != 0]
        stats["oracle_pairs"] = len(decided)
        stats["agreement_with_oracle"] = float(np.mean(decided)) if decided else None
    return rows, stats
