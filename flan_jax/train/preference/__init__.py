"""Learning from preferences after SFT: a reward model (either family + a scalar head) and DPO / IPO.

losses.py (closed-form losses), scoring.py (response log-probs and hidden states for both families), reward.py (the
scalar head), pairs.py (tokenized pools and whole-prompt batches), loop.py (train/eval/checkpoint), main.py (gin).
"""
