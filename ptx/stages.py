"""Dispatch a resolved config to the code of its stage."""
import jax


def run(config, workdir: str):
    stage = config.stage
    if jax.process_count() > 1 and stage not in ("sft", "reward", "dpo"):
        # Their rollouts and sampling feed process-local rows to global arrays.
        raise NotImplementedError(f"stage {stage!r} runs in one process; multi-process runs "
                                  f"(distributed.*) support sft, reward and dpo")
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
    if stage == "ai_feedback":
        from ptx import judge

        return judge.run(config, workdir)
    if stage == "quickstart":
        from ptx import pipeline

        return pipeline.run(config, workdir)
    raise ValueError(f"unknown stage {stage!r}")
