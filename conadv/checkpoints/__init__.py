"""Checkpoints and weights as files: what a checkpoint directory is and how it is read
(`format`), and the weights a user points at (`weights`). Below the training loop, which
writes checkpoints (conadv/train/checkpoint.py), and below distillation, which reads teachers."""
