"""Reward-model data from the SFT policy's own samples, ranked by the checkable rule (InstructGPT's RM data are
comparisons of policy outputs): per prompt of the embedded preference tasks, K samples at temperature 1; every wrong
sample becomes a pair against a right sample (or the reference answer when no sample is right), and the rule's own
slip pair is kept. Written as JSONL {prompt, chosen, rejected} and registered as preference task `policy_cmp_pref`;
then the reward model trains on it with the preference trainer.

    python scripts/policy_comparisons.py OUT_DIR SFT_CHECKPOINT [TRAIN_STEPS]
"""
from __future__ import annotations

import itertools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from flan_jax.data import preference as preference_data, templates
from flan_jax.cli import train as main_lib
from flan_jax.train import optim
from flan_jax.train.preference import loop as preference_loop, pairs
from flan_jax.train.rl import rollout as rollout_lib, rule_reward

TASK = "policy_cmp"


def comparisons(model_cfg, params, vocab, split: str, prompts_per_task: int, samples: int, seed: int = 0) -> list:
    records = []
    for t, task in enumerate(pairs.task_names("flan_default_preference")):
        groups = list(itertools.islice(preference_data.iter_groups(task, split), prompts_per_task))
        tokens = np.zeros((len(groups), 64), np.int32)
        for i, g in enumerate(groups):
            ids = list(vocab.encode(g.inputs))[:63] + [1]
            tokens[i, :len(ids)] = ids
        repeated = jnp.asarray(np.repeat(tokens, samples, axis=0))
        drawn = np.asarray(rollout_lib.sample(model_cfg, params, repeated, jax.random.PRNGKey(seed * 100 + t),
                                              rollout_lib.SamplingConfig(16)))
        for i, g in enumerate(groups):
            texts = {rule_reward.response_text(vocab, row).strip() for row in drawn[i * samples:(i + 1) * samples]}
            best = g.responses[0].strip()
            wrong = sorted(x for x in texts if x and x != best)
            records += [{"prompt": g.inputs, "chosen": best, "rejected": w} for w in wrong]
            records.append({"prompt": g.inputs, "chosen": g.responses[0], "rejected": g.responses[1]})
    return records


def main(argv) -> int:
    out_dir, sft = argv[0], argv[1]
    steps = int(argv[2]) if len(argv) > 2 else 400
    _, train_cfg = main_lib.load_config(["--gin_file=gin_configs/runs/default_cpu.gin"])
    params, _, vocab = main_lib.restore_trained(train_cfg, sft)
    os.makedirs(out_dir, exist_ok=True)
    files = {}
    for split, n in (("train", 500), ("validation", 100)):
        records = comparisons(train_cfg.model, params, vocab, split, n, samples=4)
        files[split] = os.path.join(out_dir, f"comparisons_{split}.jsonl")
        with open(files[split], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        print(f"{split}: {len(records)} comparisons", flush=True)
    preference_data.register_preference_task(
        TASK, preference_data.PreferenceJsonlSource(files), [templates.Template("{prompt}", "-")],
        prompt_fields=["prompt"], vocabulary=vocab)
    cfg = preference_loop.PreferenceConfig(
        kind="reward", model_dir=out_dir, model=train_cfg.model, init_checkpoint=sft,
        mixture_or_task_name=TASK + "_pref", task_feature_lengths={"inputs": 64, "targets": 16}, train_steps=steps,
        train_prompts_per_task=100_000, eval_prompts_per_task=100_000,
        schedule=optim.ScheduleConfig(learning_rate=1e-3), eval_period=0, log_period=50)
    summary = preference_loop.run(cfg)
    print("reward model on policy comparisons: held-out preference accuracy",
          summary["initial"]["mean"]["preference_accuracy"], "->", summary["final"]["mean"]["preference_accuracy"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
