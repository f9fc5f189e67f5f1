"""Shared test settings.

Optional dependencies (hypothesis, nflows, pyro, diffusers, transformers, sklearn, accelerate) are never
imported here at module level by a test file without ``pytest.importorskip``: with a bare
``pip install -e . pytest`` the tests that need one skip with its name as the reason.

Importing zuko switches torch's global argument validation off; trajflow's classes validate on their own,
and tests that rely on torch's flag restore it here.
"""

import os

import pytest
import torch
import zuko  # noqa: F401  (import first, so the fixture below sees its side effect undone)
from torch.distributions import Distribution

try:  # hypothesis is a test extra (trajflow[dev]); the files that use it skip without it (importorskip)
    from hypothesis import settings
except ImportError:
    pass
else:
    settings.register_profile("ci", deadline=None, max_examples=20, derandomize=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# One thread for the whole suite: the models are tiny, so intra-op threads cost more than they give
# (token-by-token decoding most, ~10-50x on a busy 2-core machine), and the bitwise resume tests need the
# same reduction order in both runs.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _validate_and_seed():
    Distribution.set_default_validate_args(True)
    torch.manual_seed(0)
    yield
