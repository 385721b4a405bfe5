"""Data generation with our own models: Self-Instruct (self_instruct.py) and its filters and ROUGE-L."""
