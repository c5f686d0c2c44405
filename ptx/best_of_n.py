"""Best-of-N: sample N completions per prompt in batched sampler calls, score
all with a reward source, keep the best (the stage: ptx/stages/best_of_n.py)."""
import math

import numpy as np

from ptx import inference


def kl_bound(n: int) -> float:
    """Analytic KL(best-of-n || base) upper bound: log n - (n - 1) / n."""
    return math.log(n) - (n - 1) / n


def select(scores: np.ndarray, ns) -> dict:
    """scores: [prompts, N_max] float. For each n, the first n candidates of each
    prompt compete (so every N reuses the same samples).

    Returns {n: {'best_index' [prompts] int, 'best', 'random', 'worst' (means)}};
    'random' is the first candidate, an unbiased pick since samples are i.i.d.
    """
    out = {}
    for n in ns:
        if n > scores.shape[1]:
            raise ValueError(f"best-of-{n} asked for but only {scores.shape[1]} samples per prompt")
        head = scores[:, :n]
        out[n] = {"best_index": np.argmax(head, axis=1), "best": float(head.max(1).mean()),
                  "random": float(head[:, 0].mean()), "worst": float(head.min(1).mean())}
    return out


def sample_and_score(smp: inference.Sampler, source, prompt_tokens, prompt_lens, n: int, seed: int,
                     settings: dict, prompts_text: list[str], rows: list[dict] = None):
    """n samples per prompt, scored (rows: each prompt's data row, for a verifier's reference fields).
    Returns (texts [prompts][n], scores [prompts, n] float32)."""
    tokens = np.repeat(prompt_tokens, n, axis=0)
    lens = np.repeat(prompt_lens, n, axis=0)
    repeated = [p for p in prompts_text for _ in range(n)]
    repeated_rows = [r for r in rows or [{}] * len(prompts_text) for _ in range(n)]
    chunks = smp(tokens, lens, seed, **settings)
    texts, scores, start = [], [], 0
    for c in chunks:
        chunk_texts = smp.texts([c])
        chunk_prompts = repeated[start:start + c["rows"]]
        # A padded last chunk: score the full device batch, keep the real rows.
        full_prompts = chunk_prompts + [chunk_prompts[-1]] * (smp.batch_size - c["rows"])
        full_texts = chunk_texts + [chunk_texts[-1]] * (smp.batch_size - c["rows"])
        chunk_rows = repeated_rows[start:start + c["rows"]]
        full_rows = chunk_rows + [chunk_rows[-1]] * (smp.batch_size - c["rows"])
        scores.append(source(c["seq"], full_prompts, full_texts, rows=full_rows)[:c["rows"]])
        texts.extend(chunk_texts)
        start += c["rows"]
    scores = np.concatenate(scores).reshape(len(prompt_lens), n)
    return [texts[i * n:(i + 1) * n] for i in range(len(prompt_lens))], scores
