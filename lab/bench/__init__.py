"""`lab bench`: step time against TransformerLens, steps to grok per recipe, memory (suite.py); the
full-sequence step against PyTorch's encoder and the bridge (sequence.py); sweep speed-up (sweep.py);
timing helpers (measure.py).

The grok runs' caps live here, without imports, so that the CLI's help can name them cheaply."""

FULL_MAX_STEPS = 20000  # `lab bench`: each grok run stops at grok or at this many steps
QUICK_MAX_STEPS = 1200  # `lab bench --quick`: every recipe that groks modadd_quick does so by step 1,150
