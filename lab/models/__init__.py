"""Models: the readable transformer (transformer.py, top to bottom), the rungs below it (linear, mlp, cnn over pooled.py), build_model, the TransformerLens export, memory limits and predictions."""
