"""flan_jax: Flan-style instruction tuning of T5-family models in JAX."""
from setuptools import find_packages, setup

setup(
    name="flan_jax",
    version="0.1.0",
    description="Flan-style instruction tuning in JAX: templated seqio tasks, packing, T5, Adafactor, eval.",
    python_requires=">=3.10",
    # The registrations in tasks/ install as flan_jax.tasks: a `tasks` folder in a user's working directory cannot
    # shadow them.
    packages=find_packages(include=["flan_jax", "flan_jax.*"]) + ["flan_jax.tasks", "flan_jax.tasks.flan2021"],
    package_dir={"flan_jax.tasks": "tasks"},
    package_data={"": ["*.gin", "*.json", "*.jsonl", "*.yaml"]},
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "seqio>=0.0.19",
        "tensorflow",
        "tensorflow-datasets>=4.9",
        "gin-config>=0.5",
        "sentencepiece",
        "numpy",
        "tensorboardX",
        "rouge-score",
        "sacrebleu",
        "msgpack",
        "tensorstore",
        "safetensors",
        "pyyaml",
        "jinja2",
        "matplotlib",
    ],
    extras_require={
        # `flan-jax compile` and TPU slices: libtpu as jax 0.10.2 pins it (a libtpu must match its jax).
        "tpu": ["jax[tpu]==0.10.2", "libtpu==0.0.42.1"],
        # GPU hosts: the CUDA 12 plugin of the same jax (not installed by the tests: CI has no GPU).
        "cuda": ["jax[cuda12]==0.10.2"],
        # tpu: tests/test_tpu_compile.py compiles small configs for TPU topologies on the CPU host (scripts/test.sh
        # keeps the test processes on the CPU backend, JAX_PLATFORMS=cpu).
        "test": ["pytest", "pytest-xdist", "hypothesis", "torch==2.13.0", "transformers", "import-linter", "grimp",
                 "jax[tpu]==0.10.2", "libtpu==0.0.42.1", "lm-eval==0.4.13", "qwix==0.1.8",
                 "apache-beam==2.77.0", "grain==0.2.18", "array-record==0.8.6", "google-crc32c==1.9.0"],
        # google-crc32c: seqio's cache_tasks_main (the cache suite's baseline) writes TFRecords through Beam.
        "bench": ["torch==2.13.0", "transformers", "apache-beam==2.77.0", "grain==0.2.18", "array-record==0.8.6",
                  "google-crc32c==1.9.0"],
        # Loading an HF export (`flan-jax convert --to hf --verify`): tokenizers writes its tokenizer.json.
        "hf": ["torch==2.13.0", "transformers", "tokenizers", "sentencepiece", "protobuf"],
        # `flan-jax eval-harness` and the "flan_jax" model type of lm-evaluation-harness (docs/eval-harness.md).
        "lmeval": ["lm-eval==0.4.13"],
        # `flan-jax data cache` (an Apache Beam job writing ArrayRecord shards) and `train.input_pipeline = 'cache'`
        # (reading them through Grain): docs/cache.md.
        "cache": ["apache-beam==2.77.0", "grain==0.2.18", "array-record==0.8.6"],
        # QLoRA: the frozen base stored int8 / 4-bit (docs/qlora.md).
        "qlora": ["qwix==0.1.8"],
    },
    entry_points={"console_scripts": ["flan-jax=flan_jax.cli:main"]},
)
