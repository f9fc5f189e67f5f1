"""Old import paths keep working for one release: each warns, names the new path and gives the very objects
of the new module, every name it exported before the move included."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import pytest

MOVED = {
    # old module -> (new module, the names the old module exported before the move)
    "trajflow.t2i": (
        "trajflow.recipes.t2i",
        {"T2I_DATASETS", "DataConfig", "ModelConfig", "TextConfig", "SampleConfig", "T2IConfig"}
        | {"HashingTextEncoder", "VAE", "build_text_encoder", "build_dataset", "build_model", "dataset_captions"}
        | {"TextToImageObjective", "generate", "save_image_grid", "init_ntm_from_fm", "DistillConfig"}
        | {"DistillResult", "distill_t2i", "train_t2i", "T2IModel", "load_t2i", "apply_overrides"},
    ),
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_warns_and_gives_the_same_objects(old):
    new_name, before = MOVED[old]
    sys.modules.pop(old, None)  # the warning is raised when the module is first imported
    with pytest.warns(DeprecationWarning, match=rf"{re.escape(old)} is deprecated.*{re.escape(new_name)}"):
        module = importlib.import_module(old)
    new = importlib.import_module(new_name)
    assert before <= set(module.__all__) == set(new.__all__)
    for name in new.__all__:
        assert getattr(module, name) is getattr(new, name), name


def test_the_new_modules_do_not_import_the_old_paths():
    new = ", ".join(new for new, _ in MOVED.values())
    code = f"import sys, {new}; old = {sorted(MOVED)!r}; assert not set(old) & set(sys.modules), 'old path imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
