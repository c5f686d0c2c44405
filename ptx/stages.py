"""Dispatch a resolved config to the code of its stage."""
import jax


def run(config, workdir: str):
    stage = config.stage
    # The stages whose host reads and file writes are multi-process safe. Not yet: the judge
    # (ai_feedback, reward.source=judge) puts whole chunks as one process's rows, best-of-N
    # writes its files from every process, the quickstart's evaluation reads batch-sharded
    # arrays on the host.
    multi = stage in ("sft", "reward", "dpo", "sample") or (
        stage in ("ppo", "grpo") and config.reward.source != "judge")
    if jax.process_count() > 1 and not multi:
        what = f"stage {stage!r}" + (" with reward.source=judge" if stage in ("ppo", "grpo") else "")
        raise NotImplementedError(f"{what} runs in one process; multi-process runs (distributed.*) "
                                  f"support sft, reward, dpo, ppo, grpo and sample")
    if stage in ("sft", "reward", "dpo"):
        from ptx import train

        return train.run(config, workdir)
    if stage in ("ppo", "grpo"):
        from ptx import rl

        return rl.run(config, workdir)
    if stage == "sample":
        from ptx import inference

        return inference.run(config, workdir)
    if stage == "best_of_n":
        from ptx import best_of_n

        return best_of_n.run(config, workdir)
    if stage == "merge":
        from ptx import lora

        return lora.run(config, workdir)
    if stage == "ai_feedback":
        from ptx import judge

        return judge.run(config, workdir)
    if stage == "quickstart":
        from ptx import pipeline

        return pipeline.run(config, workdir)
    raise ValueError(f"unknown stage {stage!r}")
