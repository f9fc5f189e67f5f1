"""The old path trajflow.t2i keeps working for one release: it warns, names the new path and gives the very
objects of trajflow.recipes.t2i."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import trajflow.recipes.t2i as new


def test_old_path_warns_and_gives_the_same_objects():
    sys.modules.pop("trajflow.t2i", None)  # the warning is raised when the module is first imported
    with pytest.warns(DeprecationWarning, match=r"trajflow\.t2i is deprecated.*import from trajflow\.recipes\.t2i"):
        old = importlib.import_module("trajflow.t2i")
    # every name the old module exported is still there, and is the new module's object
    before = {"T2I_DATASETS", "DataConfig", "ModelConfig", "TextConfig", "SampleConfig", "T2IConfig"}
    before |= {"HashingTextEncoder", "VAE", "build_text_encoder", "build_dataset", "build_model", "dataset_captions"}
    before |= {"TextToImageObjective", "generate", "save_image_grid", "init_ntm_from_fm", "DistillConfig"}
    before |= {"DistillResult", "distill_t2i", "train_t2i", "T2IModel", "load_t2i", "apply_overrides"}
    assert before <= set(old.__all__) == set(new.__all__)
    for name in new.__all__:
        assert getattr(old, name) is getattr(new, name), name


def test_the_new_package_does_not_import_the_old_path():
    code = "import sys, trajflow.recipes.t2i; assert 'trajflow.t2i' not in sys.modules, 'old path imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
