"""Analyses of trained models, one module per concern.

- `attention`: every head's pattern over one text; the `=`-to-`a` attention over the modular grid.
- `ablation`: loss and accuracy with one head (or some MLP neurons) zeroed or mean-replaced.
- `heads`: for a_and_b runs, which head looks at `a` and which at `b`.
- `fourier`: the Fourier basis of Z_p, Fourier norms, key frequencies, restricted/excluded loss
  (Nanda et al. 2023).
- `progress`: those progress measures at every checkpoint of a run, cached in the run folder.
- `patching`, `attribution`, `logit_lens`, `circuits`: activation patching, direct logit attribution, the
  logit lens, QK / OV circuits and composition scores, with TransformerLens's definitions.
- `circuit_history`: a summary of those at every checkpoint, cached in the run folder (the Circuits page).
- `gradients`: the gradient norm of each layer's weights (at initialisation: the skip-connection question).

The public calls are re-exported lazily as `lab.attention`, `lab.ablate_heads`, ... .
"""
