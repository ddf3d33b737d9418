"""Sweeps: grids x seeds (sweep.py), trained together as stacked ensembles (ensemble.py), locally or on Ray (ray_backend.py)."""
