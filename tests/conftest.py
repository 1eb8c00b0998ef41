"""Test set-up: Triton's interpreter on machines without a GPU, the `cuda` marker, fresh seeds."""
import os

import torch

# Triton decides between compiling and interpreting when a kernel is decorated, so this must be set before
# any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from sparsity_engine import _launch  # noqa: E402

# every fast Triton launch in the tests checks it runs the variant Triton's own dispatch would (see _launch)
_launch.VERIFY = True


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different seed per test (derived from its name), so inputs are random but failures reproduce."""
    seed = abs(hash(request.node.nodeid)) % (2**31)
    torch.manual_seed(seed)
    return seed
