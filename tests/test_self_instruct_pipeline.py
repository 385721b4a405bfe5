"""Self-Instruct pipeline: report accounting with a real (random) model, the selfinstruct collection, and the
CLI end to end (train a tiny model, generate, register, finetune on the generated data)."""
import json
import os

import jax
import numpy as np
import pytest
import seqio

from flan_jax.data import registry
from flan_jax.generation import filters, prompts, self_instruct
from flan_jax.generation.model import TextModel
from flan_jax.generation.rouge import RougePool
from flan_jax.models import t5
from flan_jax.tasks import selfinstruct

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = os.path.join(REPO, "tasks", "self_instruct_seed_tasks.jsonl")
TINY = os.path.join(REPO, "gin_configs", "runs", "tiny_test.gin")
EOS_BOOST = 4.0


def _check_report_and_rows(report, rows, seeds):
    gen = report["instruction_generation"]
    assert gen["prompts"] == gen["rounds"] * 4 and gen["cut_off_responses"] <= gen["prompts"]
    assert gen["dropped_cut_off_items"] <= gen["cut_off_responses"]
    # every parsed instruction is either filtered (under exactly one rule), kept, or beyond what was asked for
    assert gen["parsed_instructions"] == sum(report["instruction_filters"].values()) + gen["kept_instructions"] \
        + gen["not_needed"]
    inst = report["instance_generation"]
    assert inst["responses"] == gen["kept_instructions"] == sum(report["classification"].values())
    assert report["output"]["instructions"] == inst["responses"] - inst["instructions_without_instances"] == len(rows)
    pool = RougePool(s.instruction for s in seeds)
    for row in rows:
        assert filters.rule_filter(row["instruction"]) is None
        assert pool.max_score(row["instruction"])[0] <= filters.ROUGE_THRESHOLD
        pool.add(row["instruction"])
        assert 1 <= len(row["instances"]) <= filters.MAX_INSTANCES
        assert all(filters.invalid_instance(i["input"], i["output"]) is None for i in row["instances"])
    assert report["timing"]["kept_instructions_per_s"] >= 0


def test_pipeline_accounting_with_a_random_model(tmp_path):
    from flan_jax.tasks import default
    vocab = default.vocabulary()     # word-sized pieces, so random outputs still contain words
    config = t5.T5Config(vocab_size=vocab.vocab_size, emb_dim=32, num_heads=2, head_dim=8, mlp_dim=48,
                         num_encoder_layers=1, num_decoder_layers=1)
    params = t5.init_params(config, jax.random.PRNGKey(0))
    # A large EOS logit at some steps (as in test_decoding) so that some outputs end before the length limit.
    kernel = params["decoder"]["logits_dense"]["kernel"]
    params["decoder"]["logits_dense"]["kernel"] = kernel.at[:, 1].multiply(EOS_BOOST)
    seeds = prompts.load_seed_tasks(SEEDS)
    model = TextModel(config, params, vocab, max_input_length=96, batch_size=4)
    cfg = self_instruct.SelfInstructConfig(num_instructions=3, max_instruction_tokens=32, max_instance_tokens=32,
                                           max_rounds=3, temperature=1.0, top_p=0.9, instance_temperature=1.0)
    report = self_instruct.run(model, seeds, cfg, str(tmp_path))
    with open(tmp_path / "self_instruct.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert report["instruction_generation"]["parsed_instructions"] > 0
    _check_report_and_rows(report, rows, seeds)


def _write_dir(path, n_instructions=12):
    rows = []
    for k in range(n_instructions):
        instances = [{"input": f"number {k} and {j}" if k % 3 else "", "output": f"answer {k}.{j}"} for j in range(2)]
        rows.append({"instruction": f"Do task number {k} with care please.", "is_classification": False,
                     "instances": instances})
    path.mkdir(exist_ok=True)
    (path / "self_instruct.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_collection_holds_out_whole_instructions_and_builds(tmp_path):
    _write_dir(tmp_path)
    names = selfinstruct.register(str(tmp_path), validation_fraction=0.25)
    assert names == ["selfinstruct_with_input_zs_noopt", "selfinstruct_no_input_zs_noopt"]
    records = selfinstruct.split_records(selfinstruct.read_rows(str(tmp_path)), 0.25)
    train = {r["instruction"] for k in ("with_input", "no_input") for r in records[(k, "train")]}
    held_out = {r["instruction"] for k in ("with_input", "no_input") for r in records[(k, "validation")]}
    assert len(held_out) == 3 and len(train) == 9 and not train & held_out
    info = registry.task_info("selfinstruct_with_input_zs_noopt")
    assert info.num_examples == {"train": len(records[("with_input", "train")]),
                                 "validation": len(records[("with_input", "validation")])}
    assert info.num_templates == len(selfinstruct.WITH_INPUT_TEMPLATES) and info.collection == "selfinstruct"
    task = seqio.get_mixture_or_task("selfinstruct_with_input_zs_noopt")
    examples = list(task.get_dataset({"inputs": 128, "targets": 32}, split="train", shuffle=False).as_numpy_iterator())
    assert len(examples) == info.num_examples["train"]
    outputs = {i: {(r["input"], r["output"]) for r in records[("with_input", "train")] if r["instruction"] == i}
               for i in train}
    used_templates = set()
    for e in examples:
        text, target = e["inputs_pretokenized"].decode(), e["targets_pretokenized"].decode()
        instruction = next(i for i in train if i in text)
        assert any(inp in text and out == target for inp, out in outputs[instruction])
        used_templates.add(text.replace(instruction, "{instruction}").split("number")[0][:12])
    assert len(used_templates) > 1      # our templates are drawn per example
    assert "selfinstruct_train" in seqio.MixtureRegistry.names()


def test_collection_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="self_instruct.jsonl"):
        selfinstruct.register(str(tmp_path))


@pytest.mark.slow
def test_cli_end_to_end_trains_on_generated_data(tmp_path, capsys):
    """A tiny model trained a few steps on the seed tasks themselves (as a selfinstruct collection, BPE vocabulary
    of the default collection) generates data with the CLI; the data is registered and trained on."""
    import shutil

    from flan_jax.cli import self_instruct as cli
    from flan_jax.cli import train as train_main
    from flan_jax.tasks import default

    seed_dir, model_dir, out = tmp_path / "seeds", str(tmp_path / "model"), str(tmp_path / "si")
    seed_dir.mkdir()
    shutil.copy(SEEDS, seed_dir / "self_instruct.jsonl")
    (seed_dir / "vocabulary.model").write_bytes(default.vocabulary().sp_model)
    selfinstruct.register(str(seed_dir))
    on_seeds = ["--gin.MIXTURE_OR_TASK_NAME='selfinstruct_train'", "--gin.EVAL_MIXTURE_OR_TASK_NAME=None",
                "--gin.BEST_METRIC=None", "--gin.EVAL_PERIOD=0"]
    train_main.train_main([f"--gin_file={TINY}", f"--gin.MODEL_DIR={model_dir}", *on_seeds, "--gin.TRAIN_STEPS=10",
                           "--gin.LEARNING_RATE=1e-2", "--gin.CHECKPOINT_PERIOD=10"])
    assert cli.main([f"--gin_file={TINY}", f"--checkpoint={model_dir}", *on_seeds, f"--seed_tasks={SEEDS}",
                     f"--out={out}", "--num_instructions=4", "--batch_size=4", "--max_instruction_tokens=48",
                     "--max_instance_tokens=48", "--max_rounds=6", "--temperature=1.0", "--top_p=0.9"]) == 0
    assert "instructions/s" in capsys.readouterr().out
    report = json.loads(open(os.path.join(out, "report.json")).read())
    rows = [json.loads(line) for line in open(os.path.join(out, "self_instruct.jsonl"))]
    _check_report_and_rows(report, rows, prompts.load_seed_tasks(SEEDS))
    assert rows, report   # a dataset, whatever its quality
    assert os.path.isfile(os.path.join(out, "vocabulary.model"))
    selfinstruct.register(out)
    train_main.train_main([f"--gin_file={TINY}", f"--gin.MODEL_DIR={tmp_path / 'ft'}", *on_seeds,
                           "--gin.TRAIN_STEPS=2", "--gin.CHECKPOINT_PERIOD=0"])
    losses = [r for r in map(json.loads, open(tmp_path / "ft" / "metrics.jsonl")) if r["metric"] == "loss"]
    assert losses and all(np.isfinite(r["value"]) for r in losses)
