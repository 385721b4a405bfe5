"""ROUGE-L novelty check of Self-Instruct: our RougePool vs the rouge-score package, the same queries in one run.

    python scripts/bench_rouge.py [--pool 2000] [--queries 20]

Both sides compute each query's best ROUGE-L F1 against every pool text (ours also with the 0.7 length skip);
prints seconds, the ratio and the largest score difference.
"""
import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rouge_score import rouge_scorer  # noqa: E402

from flan_jax.generation import prompts  # noqa: E402
from flan_jax.generation.rouge import RougePool  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pool", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=20)
    args = parser.parse_args()
    seeds = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tasks",
                         "self_instruct_seed_tasks.jsonl")
    words = " ".join(s.instruction for s in prompts.load_seed_tasks(seeds)).split()
    rng = random.Random(0)
    sentence = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(6, 25)))
    pool_texts = [sentence() for _ in range(args.pool)]
    queries = [sentence() for _ in range(args.queries)]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

    start = time.perf_counter()
    pool = RougePool(pool_texts)
    ours = [pool.max_score(q)[0] for q in queries]
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    skipped = [pool.max_score(q, 0.7)[0] for q in queries]
    skip_s = time.perf_counter() - start
    start = time.perf_counter()
    ref = [max(scorer.score(p, q)["rougeL"].fmeasure for p in pool_texts) for q in queries]
    ref_s = time.perf_counter() - start
    assert all((a > 0.7) == (b > 0.7) for a, b in zip(skipped, ref))
    print(f"pool {args.pool}, {args.queries} queries: ours {ours_s:.3f} s (incl. tokenizing the pool), "
          f"ours with length skip {skip_s:.3f} s, rouge-score {ref_s:.3f} s; "
          f"rouge-score / ours = {ref_s / ours_s:.1f}x; max |diff| {max(abs(a - b) for a, b in zip(ours, ref)):.1e}")


if __name__ == "__main__":
    main()
