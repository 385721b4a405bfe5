"""Self-Instruct (Wang et al. 2022): bootstrap instruction data from a model and a small seed set.

Stages (every count goes into report.json):
  1. instruction generation: each prompt lists 8 instructions (6 seeds, plus 2 machine-generated ones once the
     pool holds some, else 8 seeds), sampled at temperature 0.7 / top-p 0.5; the numbered continuation is parsed
     and an item cut off by the length limit dropped;
  2. filters: the rules in `filters` then ROUGE-L F1 > 0.7 against every instruction already in the pool;
  3. classification identification: few-shot "Yes"/"No", decided by which the model scores higher;
  4. instances: output-first for classification tasks, input-first for the others (greedy by default);
  5. instance filters (`filters.filter_instances`), at most 5 instances per instruction.
Output: OUT/self_instruct.jsonl in the seed file's format, OUT/report.json.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from typing import Sequence

import jax

from flan_jax.generation import filters, prompts
from flan_jax.generation.model import TextModel
from flan_jax.generation.rouge import RougePool

DATA_FILE, REPORT_FILE = "self_instruct.jsonl", "report.json"


@dataclasses.dataclass(frozen=True)
class SelfInstructConfig:
    num_instructions: int
    seeds_per_prompt: int = 6
    generated_per_prompt: int = 2
    temperature: float = 0.7
    top_p: float = 0.5
    max_instruction_tokens: int = 128
    max_instance_tokens: int = 128
    instance_temperature: float = 0.0   # greedy, as in the paper; instance sampling (if > 0) uses top_p too
    rouge_threshold: float = filters.ROUGE_THRESHOLD
    max_instances: int = filters.MAX_INSTANCES
    classification_shots: int = 6
    instance_shots: int = 2
    max_rounds: int = 0        # rounds of `batch_size` prompts; 0: 20 x the rounds needed at one kept per prompt
    seed: int = 0

    def __post_init__(self):
        if self.num_instructions < 1:
            raise ValueError(f"num_instructions must be >= 1, got {self.num_instructions}")
        if self.seeds_per_prompt < 1 or self.generated_per_prompt < 0:
            raise ValueError("seeds_per_prompt must be >= 1 and generated_per_prompt >= 0")


def generate_instructions(model: TextModel, seeds: Sequence[prompts.SeedTask], cfg: SelfInstructConfig,
                          report: dict) -> list[str]:
    """Stages 1-2: new instructions that pass every filter, in the order they were accepted."""
    rng = random.Random(cfg.seed)
    key = jax.random.PRNGKey(cfg.seed)
    seed_texts = [s.instruction for s in seeds]
    pool = RougePool(seed_texts)
    kept: list[str] = []
    stage = report["instruction_generation"]
    counts = report["instruction_filters"]
    max_rounds = cfg.max_rounds or 20 * -(-cfg.num_instructions // model.batch_size)
    for round_index in range(max_rounds):
        if len(kept) >= cfg.num_instructions:
            break
        batch = []
        for _ in range(model.batch_size):
            shown_generated = rng.sample(kept, cfg.generated_per_prompt) if len(kept) >= cfg.generated_per_prompt \
                else []
            shown = rng.sample(seed_texts, min(len(seed_texts), cfg.seeds_per_prompt + cfg.generated_per_prompt
                                               - len(shown_generated))) + shown_generated
            batch.append(prompts.instruction_prompt(shown))
        responses = model.generate(batch, cfg.max_instruction_tokens, jax.random.fold_in(key, round_index),
                                   cfg.temperature, cfg.top_p)
        stage["rounds"] += 1
        stage["prompts"] += len(batch)
        for text, cut_off in responses:
            items, dropped = prompts.parse_instructions(text, cut_off)
            stage["cut_off_responses"] += int(cut_off)
            stage["dropped_cut_off_items"] += dropped
            stage["parsed_instructions"] += len(items)
            for item in items:
                if len(kept) >= cfg.num_instructions:
                    stage["not_needed"] += 1
                    continue
                reason = filters.rule_filter(item)
                if reason is None and pool.max_score(item, cfg.rouge_threshold)[0] > cfg.rouge_threshold:
                    reason = "rouge_similar"
                if reason:
                    counts[reason] += 1
                    continue
                pool.add(item)
                kept.append(item)
    stage["kept_instructions"] = len(kept)
    stage["stopped"] = "enough" if len(kept) >= cfg.num_instructions else f"max_rounds={max_rounds}"
    return kept


def identify_classification(model: TextModel, instructions: Sequence[str], seeds: Sequence[prompts.SeedTask],
                            cfg: SelfInstructConfig, report: dict) -> list[bool]:
    """Stage 3: balanced few-shot examples (half classification seeds), then "Yes" vs "No" by model score."""
    yes = [s for s in seeds if s.is_classification][:cfg.classification_shots // 2]
    no = [s for s in seeds if not s.is_classification][:cfg.classification_shots - len(yes)]
    shots = [t for pair in zip(no, yes) for t in pair] + no[len(yes):] + yes[len(no):]
    scores = model.option_scores([prompts.classification_prompt(i, shots) for i in instructions],
                                 prompts.CLASSIFICATION_OPTIONS)
    labels = [bool(s[0] > s[1]) for s in scores]
    report["classification"] = {"classification": sum(labels), "not_classification": len(labels) - sum(labels)}
    return labels


def generate_instances(model: TextModel, instructions: Sequence[str], is_classification: Sequence[bool],
                       seeds: Sequence[prompts.SeedTask], cfg: SelfInstructConfig, report: dict) -> list[dict]:
    """Stages 4-5: instances per instruction, filtered; instructions left with none are dropped (and counted)."""
    rng = random.Random(cfg.seed + 1)
    by_kind = {kind: [s for s in seeds if s.is_classification == kind] or list(seeds) for kind in (True, False)}
    batch = [prompts.instance_prompt(i, c, rng.sample(by_kind[c], min(cfg.instance_shots, len(by_kind[c]))))
             for i, c in zip(instructions, is_classification)]
    responses = model.generate(batch, cfg.max_instance_tokens, jax.random.PRNGKey(cfg.seed + 1),
                               cfg.instance_temperature, cfg.top_p if cfg.instance_temperature > 0 else 1.0)
    stage, counts = report["instance_generation"], report["instance_filters"]
    rows = []
    for instruction, cls, (text, cut_off) in zip(instructions, is_classification, responses):
        parsed = (prompts.parse_output_first if cls else prompts.parse_input_first)(text)
        stage["responses"] += 1
        stage["cut_off_responses"] += int(cut_off)
        stage["parsed_instances"] += len(parsed)
        instances, dropped = filters.filter_instances(parsed, truncated_last=cut_off, max_instances=cfg.max_instances)
        for name, n in dropped.items():
            counts[name] += n
        if not instances:
            stage["instructions_without_instances"] += 1
            continue
        rows.append({"instruction": instruction, "is_classification": cls,
                     "instances": [{"input": i, "output": o} for i, o in instances]})
    return rows


def new_report() -> dict:
    return {
        "instruction_generation": dict.fromkeys(("rounds", "prompts", "cut_off_responses", "dropped_cut_off_items",
                                                 "parsed_instructions", "not_needed"), 0),
        "instruction_filters": dict.fromkeys(filters.INSTRUCTION_FILTER_NAMES, 0),
        "instance_generation": dict.fromkeys(("responses", "cut_off_responses", "parsed_instances",
                                              "instructions_without_instances"), 0),
        "instance_filters": dict.fromkeys(filters.INSTANCE_FILTER_NAMES, 0),
    }


def run(model: TextModel, seeds: Sequence[prompts.SeedTask], cfg: SelfInstructConfig, out_dir: str) -> dict:
    """All stages; writes OUT/self_instruct.jsonl and OUT/report.json and returns the report."""
    os.makedirs(out_dir, exist_ok=True)
    report = new_report()
    start = time.perf_counter()
    instructions = generate_instructions(model, seeds, cfg, report)
    generated_s = time.perf_counter() - start
    labels = identify_classification(model, instructions, seeds, cfg, report) if instructions else []
    rows = generate_instances(model, instructions, labels, seeds, cfg, report) if instructions else []
    total_s = time.perf_counter() - start
    with open(os.path.join(out_dir, DATA_FILE), "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    report["output"] = {"instructions": len(rows), "instances": sum(len(r["instances"]) for r in rows),
                        "classification_instructions": sum(r["is_classification"] for r in rows)}
    report["prompts_truncated_to_max_input_length"] = model.truncated_prompts
    report["timing"] = {"instruction_stage_s": round(generated_s, 3), "total_s": round(total_s, 3),
                        "kept_instructions_per_s": round(len(instructions) / max(generated_s, 1e-9), 3),
                        "output_instructions_per_s": round(len(rows) / max(total_s, 1e-9), 3)}
    report["config"] = dataclasses.asdict(cfg)
    with open(os.path.join(out_dir, REPORT_FILE), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    return report
