"""The pydantic base every config section builds on (below `lab.config` and `lab.tasks`, which both use it)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    # Unknown keys are errors, not silently ignored: a typo in `weight_decay` must not train a different model.
    # NaN and infinity are never meaningful settings (lr = inf trains nothing but NaN): refused like any bad value.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
