"""Old import paths keep working for one release and say where things moved."""

from __future__ import annotations

import importlib
import sys

import pytest

MOVED = {
    # old module -> (new module, a name both must give)
    "trajflow.flow_matching": ("trajflow.baselines.flow_matching", "FlowMatchingLoss"),
    "trajflow.predictors.flow_matching": ("trajflow.predictors.from_velocity", "FlowMatchingPredictor"),
    "trajflow.t2i": ("trajflow.recipes.t2i", "train_t2i"),
    "trajflow.toy": ("trajflow.recipes.toy", "run_toy"),
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_warns_and_gives_the_same_objects(old):
    new, name = MOVED[old]
    sys.modules.pop(old, None)  # the warning is raised when the module is first imported
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)
