"""The embedded default, end to end on one CPU in minutes: world -> tokenizer +
pre-training -> SFT -> reward model -> DPO / PPO / GRPO -> best-of-N -> evaluation;
RLAIF: pre-training -> judge (tuned on review text) -> AI labels of SFT samples -> DPO;
then the extra methods from SFT: each `ptx.methods` row with a quickstart kind, set up by its
config file's `quickstart(tiny)` (`methods.<name>=False` skips one).

./launch.sh quickstart        (= python -m ptx.main --config=configs/quickstart.py --workdir=runs/quickstart)
Each stage's config sits under its name and is overridable: --config.ppo.rl.kl_coef=0.1
`quickstart.py:tiny` shrinks every stage to a few steps (the test suite runs it);
`quickstart.py:seed=1` reseeds every stage and the evaluation samples (the world stays).
"""
import importlib

from configs import ai_feedback, common, dpo, grpo, ppo, pretrain, reward, sft
from ptx import methods

# Sized so the whole recipe trains in minutes on a 2-core CPU.
QUICK_MODEL = dict(vocab_size=768, d_model=96, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=256)


def get_config(arg=None):
    tiny = "tiny" in common.parse_arg(arg)
    size = "tiny" if tiny else "size=small"
    c = common.base_config("quickstart", size)
    c.seed = int(common.parse_arg(arg).get("seed", 0))  # every stage's seed; the world's stays
    c.world.sizes = common.ml_collections.ConfigDict(
        dict(n_pretrain=6000, n_sft=3000, n_pref=20000, n_heldout=200, n_reviews=3000) if not tiny else
        dict(n_pretrain=600, n_sft=300, n_pref=300, n_heldout=40, n_reviews=100))

    def stage(module, steps, batch, lr, **extra):
        s = module.get_config(size)
        s.seed = c.seed
        if not tiny:
            s.model.update(QUICK_MODEL)
        s.train.steps, s.optim.lr = (2, lr) if tiny else (steps, lr)
        if batch or tiny:  # batch 0: an RL stage, which samples rl.rollout_batch prompts instead
            s.train.batch_size = 8 if tiny else batch
        s.train.log_every = 1 if tiny else max(steps // 20, 1)
        s.train.eval_every = 0
        s.train.ckpt_every = 0 if not tiny else 1
        s.data.max_len, s.data.max_prompt_len = 96, 40
        s.update_from_flattened_dict(extra)
        return s

    c.pretrain = stage(pretrain, 400, 32, 2e-3, **{"optim.warmup_steps": 20})
    # Packed (a demonstration is ~25 tokens: unpacked rows were 39% full) and 400 steps, ~10 epochs:
    # at 250 unpacked steps (~3 epochs) the model did not yet copy a request's numbers into its answer.
    c.sft = stage(sft, 400, 32, 5e-4, **{"optim.warmup_steps": 10, "data.max_len": 64, "data.pack": True})
    # The judge: the pre-trained model tuned on review text (SFT loss on the verdict letter,
    # no chat template, the world's review format) for the RLAIF arm.
    c.judge = stage(sft, 150, 32, 5e-4, **{"optim.warmup_steps": 10, "data.max_len": 128,
                                          "data.max_prompt_len": 124, "tokenizer.user_prefix": "",
                                          "tokenizer.assistant_prefix": ""})
    # 900 steps over ~21k comparisons: with 300 steps, or 900 over 6k (4 epochs, memorised), the
    # model scored answers without reading the request (a true fact about another country scored
    # like the right one) and best-of-16 chased those.
    c.reward = stage(reward, 900, 32, 5e-4, **{"optim.warmup_steps": 10, "data.max_len": 64})
    c.dpo = stage(dpo, 150, 32, 5e-5, **{"optim.warmup_steps": 10, "data.max_len": 64,
                                        "dpo.beta": 0.3})
    rl_batch = {"rl.rollout_batch": 8, "rl.minibatch_size": 8} if tiny else {}
    c.ppo = stage(ppo, 20, 0, 5e-5, **{"rl.max_new_tokens": 24, "rl.kl_coef": 0.1, "rl.num_epochs": 2,
                                      **rl_batch})
    c.grpo = stage(grpo, 20, 0, 5e-5, **{"rl.max_new_tokens": 24, "rl.num_epochs": 2,
                                        **({"rl.rollout_batch": 2, "rl.minibatch_size": 8} if tiny else {})})
    c.ai_feedback = ai_feedback.get_config(size)
    c.ai_feedback.seed = c.seed
    c.ai_feedback.num_prompts = 8 if tiny else 1024
    c.ai_feedback.pairs_per_prompt = 3  # the world has ~750 training requests
    c.ai_feedback.batch_size = 8 if tiny else 64
    c.ai_feedback.sampling.max_new_tokens = 24
    c.ai_feedback.data.max_prompt_len = 40
    c.ai_feedback.judge.principles = ()  # the world's judge learned reviews without a preamble
    c.ai_feedback.judge.batch_size = 8 if tiny else 64
    c.ai_feedback.judge.threshold = 0.5  # keep every pair: the soft label carries the confidence
    c.rlaif = stage(dpo, 150, 32, 5e-5, **{"optim.warmup_steps": 10, "data.max_len": 64, "dpo.beta": 0.3,
                                          "dpo.soft_labels": True})
    # The methods after the recipe: each trains from SFT after every stage above has run, so the
    # rows above do not change with them. Those on prompts use the reward model as PPO / GRPO do;
    # those on comparisons learn from DPO's (each pair one desirable and one undesirable row).
    extra = [m.name for m in methods.METHODS if m.quickstart]
    c.methods = common.ml_collections.ConfigDict({name: True for name in extra})
    for name in extra:
        module = importlib.import_module(f"configs.{name}")
        row = module.quickstart(tiny)
        c[name] = stage(module, row.pop("steps"), row.pop("batch"), row.pop("lr"), **row)
    c.eval = common.ml_collections.ConfigDict()
    c.eval.batch_size = 64 if not tiny else 8  # sampler rows per call
    c.eval.max_new_tokens = 24 if not tiny else 12
    c.eval.temperature = 1.0  # policies are compared on their own sampling distribution
    c.eval.best_of_n = (4, 16) if not tiny else (2, 4)
    c.eval.seed = c.seed + 1234  # evaluation samples differ across seeds too
    c.eval.engine = "static"  # the evaluation's decoder: static | paged (ptx/engine.py, one device for now)
    return c
