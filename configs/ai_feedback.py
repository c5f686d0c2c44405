"""RLAIF labels: two samples per prompt from a policy, a judge model picks the better one.

python -m ptx.main --config=configs/ai_feedback.py:tiny --workdir=runs/aif \
    --config.policy_checkpoint=runs/sft --config.judge_checkpoint=runs/pt
Writes preferences.jsonl ({prompt, chosen, rejected, prob_chosen}), an input of
the reward and DPO stages (--config.data.train=runs/aif/preferences.jsonl),
and stats.json (kept / dropped pairs, position flip rate, oracle agreement).
"""
from configs import common, sample

# A small constitution: one plain line each above every comparison. The
# world's reviews were pre-trained without it; [] gives their exact format.
PRINCIPLES = (
    "A good answer is correct.",
    "A good answer gives the answer and stops.",
    "A good answer refuses a request that could hurt someone and helps with a harmless one.",
)


def get_config(arg=None):
    c = common.base_config("ai_feedback", arg)
    tiny = "tiny" in common.parse_arg(arg)
    c.data.kind = "prompt"  # prompts from data.train, or the embedded world's SFT prompts
    c.policy_checkpoint = ""  # the policy whose samples get labelled (an SFT workdir)
    c.judge_checkpoint = ""  # the judge: any ptx language-model workdir (may be the policy's)
    c.num_prompts = 16 if tiny else 1024  # distinct prompts labelled, in file order; 0 = all
    c.pairs_per_prompt = 1  # independent pairs of samples labelled per prompt
    c.batch_size = 16 if tiny else 64  # rows per sampler call (a multiple of the data-parallel devices)
    c.sampling = sample.sampling_config(tiny)
    del c.sampling.num_samples  # always two responses per prompt

    c.judge = common.ml_collections.ConfigDict()
    c.judge.principles = PRINCIPLES  # plain lines prepended to the judge prompt; () = none
    c.judge.template = ""  # {prompt} {a} {b}, ending where " A" / " B" follows; '' = the world's review format
    c.judge.threshold = 0.55  # keep pairs whose confidence max(p, 1 - p) reaches it
    c.judge.batch_size = 16  # judge prompts per forward (a multiple of the data-parallel devices)
    return c
