"""Learning from preferences after SFT: a reward model (either family + a scalar head) and DPO / IPO.

losses.py (closed-form losses), scoring.py (response log-probs and hidden states for both families), reward.py (the
scalar head), pairs.py (tokenized pools and whole-prompt batches), steps.py (train steps), loop.py (the run, on
train/trainer.py's loop); flan_jax/cli/preference.py reads the gin config.
"""
