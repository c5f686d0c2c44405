"""Sample completions from a checkpoint; writes samples.jsonl and prints them.

python -m ptx.main --config=configs/sample.py --workdir=runs/sample \
    --config.checkpoint=runs/sft --config.prompt="What is 2 + 3?"
"""
from configs import common


def sampling_config(tiny=False):
    c = common.ml_collections.ConfigDict()
    c.temperature = 1.0  # 0 = greedy
    c.top_k = 0  # 0 = off
    c.top_p = 1.0  # 1.0 = off
    c.min_p = 0.0  # 0 = off
    c.max_new_tokens = 32 if tiny else 64
    c.stop = ("\n\nHuman:",)  # stop strings (each one or more tokens); a tuple, so flags can set it
    c.keep_stop = False  # keep the matched stop sequence in the output
    c.num_samples = 1  # completions per prompt
    return c


def get_config(arg=None):
    c = common.base_config("sample", arg)
    tiny = "tiny" in common.parse_arg(arg)
    c.checkpoint = ""  # a ptx workdir (any stage) to sample from
    c.prompt = ""  # one prompt (the template is applied)
    c.prompts = ""  # or a jsonl / json / csv / parquet file with a 'prompt' field
    c.output = ""  # '' = <workdir>/samples.jsonl
    c.batch_size = 8  # rows per sampler call (a multiple of the data-parallel devices)
    c.sampling = sampling_config(tiny)
    return c
