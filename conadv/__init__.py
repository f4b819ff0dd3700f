"""conadv: large-batch image classifier training with Concurrent Adversarial Learning."""

__version__ = "0.1.0"
