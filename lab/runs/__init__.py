"""Run folders: storage on disk (storage.py), reading a run back (run.py: `lab.load_run`), memorise/grok outcomes (outcomes.py)."""
