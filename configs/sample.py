"""Sample completions from a checkpoint; writes samples.jsonl and prints them.

python -m ptx.main --config=configs/sample.py --workdir=runs/sample \
    --config.checkpoint=runs/sft --config.prompt="What is 2 + 3?"
"""
from configs import common
from ptx.sampler import SamplingConfig


def sampling_config(tiny=False):
    return common.section(SamplingConfig, **(dict(max_new_tokens=32) if tiny else {}))


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
