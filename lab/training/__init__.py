"""Training: the run loop (trainer.py), losses, recipes (Grokfast, ⊥Grad, StableMax), batching."""
