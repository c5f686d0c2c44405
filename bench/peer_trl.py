"""The peer of `--peer trl`: Hugging Face TRL's DPOTrainer and GRPOTrainer (transformers
`generate`, no vLLM) on the bench model, timed per optimiser step.

The model is `peer.llama_config` of the bench config (weights in float32; bf16 autocast where
the bench computes in bfloat16), saved once to a temporary directory from which each trainer
builds its policy and its reference, as TRL users do. A word-level tokenizer built in-process
(`tokenizer`) maps the word `t{i}` to token id i (ids 0-2: pad, EOS, unk), so rows of random token
ids become TRL's text rows and tokenize back to exactly those ids.

DPO (`trl_dpo_step`): `--batch` pairs of a `--dpo_prompt_len` prompt and `--dpo_response_len`
chosen and rejected responses (their last token EOS), the reference forward every step, the
sigmoid loss at configs/dpo.py's beta, AdamW with the bench config's settings; tokens/s counts
2 x (prompt + response) per pair, as ptx counts its pair rows.
GRPO (`trl_grpo_iteration`): `--batch` completions per step in groups of configs/grpo.py's
group_size (TRL's num_generations), new_tokens each (min_new_tokens, as ptx samples with EOS
off), the config's sampling settings, KL coefficient (TRL's beta: a reference model) and clip,
one gradient step per generation, a trivial Python reward; tokens/s = generated tokens / s of
the whole iteration, as ptx counts grpo_iteration.

Timing (`StepTimer`): each optimiser step from the trainer's `on_step_begin` to `on_step_end`, so
the batch's collation before it and the logging and saving after it are left out; the first step
is the warm-up and the result the median of the next `--repeats` (fewer where the warm-up says
they would take longer than `--budget_s`), as `peer.median_time` times ptx.
"""
import math
import statistics
import tempfile
import time

import datasets
import numpy as np
import tokenizers
import torch
import transformers
import trl

from bench.peer import dpo_lengths, entry, llama_config
from configs import common
from configs import dpo as dpo_configs
from configs import grpo as grpo_configs
from ptx.model import ModelConfig, flops_per_token

SPECIALS = ("<pad>", "</s>", "<unk>")  # token ids 0, 1, 2
EOS = "</s>"
# (ptx benchmark, TRL entry): the pairs whose tokens/s ratio `ratios` reports.
PAIRS = (("dpo_step", "trl_dpo_step"), ("dpo_step_shared_prefix", "trl_dpo_step"),
         ("grpo_iteration", "trl_grpo_iteration"))


def tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """Word `t{i}` <-> token id i for 3 <= i < vocab_size; ids 0, 1, 2 are pad, EOS and unk."""
    words = {w: i for i, w in enumerate(SPECIALS)}
    words.update({f"t{i}": i for i in range(len(SPECIALS), vocab_size)})
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token=EOS,
                                                unk_token="<unk>")


def text(ids) -> str:
    return " ".join(f"t{i}" for i in ids)


def dpo_rows(rng, pairs: int, prompt_len: int, response_len: int, vocab: int) -> datasets.Dataset:
    """TRL's text preference rows: a random prompt of prompt_len tokens, chosen and rejected
    responses of response_len - 1 random tokens and EOS (which TRL would otherwise append)."""
    row = lambda n: rng.integers(len(SPECIALS), vocab, n)
    response = lambda: f" {text(row(response_len - 1))}{EOS}"
    return datasets.Dataset.from_list([{"prompt": text(row(prompt_len)), "chosen": response(),
                                        "rejected": response()} for _ in range(pairs)])


def even_share(completions, **_) -> list:
    """A trivial reward with some spread: the share of even token ids in each completion."""
    ids = [[int(w[1:]) for w in c.split() if w[1:].isdigit()] for c in completions]
    return [sum(i % 2 == 0 for i in row) / max(len(row), 1) for row in ids]


class StepTimer(transformers.TrainerCallback):
    """Wall seconds of each optimiser step (on_step_begin -> on_step_end, device synced); stops
    training after the warm-up step and `repeats` more, fewer (at least one) where the warm-up says
    they would take longer than budget_s."""

    def __init__(self, repeats: int, budget_s: float):
        self.repeats, self.budget_s, self.times = repeats, budget_s, []
        self.sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def on_step_begin(self, args, state, control, **kwargs):
        self.sync()
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.sync()
        self.times.append(time.perf_counter() - self.t0)
        n = max(1, min(self.repeats, self.budget_s // max(self.times[0], 1e-9)))
        control.should_training_stop = len(self.times) > n
        return control

    def median(self) -> float:
        """The median step after the warm-up."""
        return statistics.median(self.times[1:])


def train_args(args, steps: int, bf16: bool, out_dir: str) -> dict:
    """TrainingArguments both trainers share: the bench's AdamW settings, no schedule, no activation
    checkpointing (TRL's default; the bench model runs without remat), no logging or saving."""
    o = common.base_config("bench").optim
    return dict(output_dir=out_dir, per_device_train_batch_size=args.batch, max_steps=steps, learning_rate=o.lr,
                lr_scheduler_type="constant", optim="adamw_torch", adam_beta1=o.b1, adam_beta2=o.b2,
                adam_epsilon=o.eps, weight_decay=o.weight_decay, max_grad_norm=o.grad_clip,
                activation_checkpointing=False, bf16=bf16, report_to="none", save_strategy="no",
                logging_strategy="no", disable_tqdm=True, dataloader_pin_memory=torch.cuda.is_available(), seed=0)


def dpo_trainer(model, tok, rows: datasets.Dataset, args, *, steps: int, bf16: bool, out_dir: str,
                ref_model=None, callbacks=()) -> trl.DPOTrainer:
    """DPOTrainer on `rows`; model: a checkpoint directory (the reference is built from it too) or a
    model; ref_model: a different reference model, None = TRL's copy of the model's checkpoint."""
    beta = dpo_configs.get_config().dpo.beta
    config = trl.DPOConfig(**train_args(args, steps, bf16, out_dir), beta=beta, loss_type=["sigmoid"],
                           max_length=None, precompute_ref_log_probs=False)
    return trl.DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=rows,
                          processing_class=tok, callbacks=list(callbacks))


def grpo_trainer(model, tok, prompts: datasets.Dataset, args, *, group: int, new: int, steps: int, bf16: bool,
                 out_dir: str, callbacks=()) -> trl.GRPOTrainer:
    """GRPOTrainer on `prompts` with configs/grpo.py's settings; `--batch` completions per step."""
    rl = grpo_configs.get_config().rl
    config = trl.GRPOConfig(
        **train_args(args, steps, bf16, out_dir), num_generations=group, max_completion_length=new,
        generation_kwargs={"min_new_tokens": new}, temperature=rl.temperature, top_p=rl.top_p, top_k=rl.top_k,
        beta=rl.kl_coef, epsilon=rl.clip_eps, num_iterations=1, use_vllm=False,
        # ptx's seq_mean_token_mean aggregation is TRL's "grpo" loss
        loss_type="grpo" if rl.aggregation == "seq_mean_token_mean" else "dapo")
    return trl.GRPOTrainer(model=model, reward_funcs=even_share, args=config, train_dataset=prompts,
                           processing_class=tok, callbacks=list(callbacks))


def trl_peer(args, cfg: ModelConfig, width: int, new: int, peak: float, names) -> dict:
    """{'trl_dpo_step' (if a dpo_* benchmark is in names), 'trl_grpo_iteration' (if grpo_iteration
    is): entries, 'peer_trl': versions and torch threads}."""
    # The trainers' per-dataset and per-checkpoint progress bars would bury the bench's table.
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    bf16 = cfg.dtype == "bfloat16"
    prompt, response = dpo_lengths(args)
    tok = tokenizer(cfg.vocab_size)
    rng = np.random.default_rng(0)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(llama_config(cfg, max(args.seq, prompt + response, width + new))
                                      ).save_pretrained(f"{tmp}/model")
        steps = 1 + args.repeats
        if any(n.startswith("dpo_") for n in names):
            timer = StepTimer(args.repeats, args.budget_s)
            rows = dpo_rows(rng, args.batch * steps, prompt, response, cfg.vocab_size)
            dpo_trainer(f"{tmp}/model", tok, rows, args, steps=steps, bf16=bf16, out_dir=f"{tmp}/dpo",
                        callbacks=[timer]).train()
            t = prompt + response
            out["trl_dpo_step"] = entry(timer.median(), 2 * args.batch * t,
                                        (3 + 1) * flops_per_token(cfg, t) * 2 * args.batch * t, peak, float("nan"),
                                        prompt_len=prompt, response_len=response, steps_timed=len(timer.times) - 1)
        if "grpo_iteration" in names:
            group = math.gcd(args.batch, grpo_configs.get_config().rl.group_size)  # as ptx's grpo_iteration
            timer = StepTimer(args.repeats, args.budget_s)
            prompts = datasets.Dataset.from_list(
                [{"prompt": text(rng.integers(len(SPECIALS), cfg.vocab_size, width))}
                 for _ in range(args.batch // group * steps)])
            grpo_trainer(f"{tmp}/model", tok, prompts, args, group=group, new=new, steps=steps, bf16=bf16,
                         out_dir=f"{tmp}/grpo", callbacks=[timer]).train()
            t, fwd = width + new, flops_per_token(cfg, width + new)
            # The work ptx's grpo_iteration counts: prefill + decode, policy and reference forwards, one update.
            flops = flops_per_token(cfg, t - 1) * args.batch * (t - 1) + (2 + 3) * fwd * args.batch * t
            out["trl_grpo_iteration"] = entry(timer.median(), args.batch * new, flops, peak, float("nan"),
                                              prompt_len=width, new_tokens=new, group_size=group,
                                              steps_timed=len(timer.times) - 1)
    for e in out.values():
        e.pop("compile_s")
    out["peer_trl"] = {"trl": trl.__version__, "transformers": transformers.__version__,
                       "accelerate": __import__("accelerate").__version__, "torch": torch.__version__,
                       "torch_threads": torch.get_num_threads()}
    return out


def ratios(results: dict) -> dict:
    """{'ptx / trl entry': ptx tokens/s / TRL tokens/s} for the PAIRS both sides ran; the DPO entries
    only where TRL's rows have the bench's --dpo_prompt_len / --dpo_response_len split."""
    out = {}
    cfg = results["config"]
    for ours, theirs in PAIRS:
        if ours not in results or theirs not in results:
            continue
        split = (results[theirs].get("prompt_len"), results[theirs].get("response_len"))
        if ours.startswith("dpo_step") and split != (cfg.get("dpo_prompt_len"), cfg.get("dpo_response_len")):
            continue
        out[f"{ours} / {theirs}"] = results[ours]["tokens_per_s"] / results[theirs]["tokens_per_s"]
    return out


def table(results: dict) -> str:
    rows = [f"peer trl: {results['peer_trl']}"]
    for name, ratio in results.get("ratios_trl", {}).items():
        rows.append(f"  {name}: {ratio:.2f}x")
    return "\n".join(rows)
