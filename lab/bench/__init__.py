"""`lab bench`: step time against TransformerLens, steps to grok per recipe, memory (suite.py); sweep speed-up (sweep.py); timing helpers (measure.py)."""
