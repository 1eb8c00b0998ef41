"""Test set-up: Triton's interpreter on machines without a GPU, the `cuda` marker, fresh seeds."""
import os
import random
import zlib

import torch

# Triton decides between compiling and interpreting when a kernel is decorated, so this must be set before
# any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# One base seed per run: fresh inputs every run, and SE_TEST_SEED=<n> replays a run exactly. It is put in the
# environment so pytest-xdist workers (spawned after this module loads) draw the same inputs.
BASE_SEED = int(os.environ.setdefault("SE_TEST_SEED", str(random.SystemRandom().randrange(2**31))))


def pytest_report_header(config):
    return f"test inputs: SE_TEST_SEED={BASE_SEED} (set it to replay this run's random inputs)"


def seed_of(nodeid):
    """The seed of one test: the run's base seed mixed with the test's id (crc32, stable across processes)."""
    return zlib.crc32(f"{BASE_SEED}:{nodeid}".encode()) % (2**31)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Seeds torch per test, so inputs are random but a failure replays with the SE_TEST_SEED in the header."""
    seed = seed_of(request.node.nodeid)
    torch.manual_seed(seed)
    return seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(("random inputs", f"SE_TEST_SEED={BASE_SEED} (torch seed {seed_of(item.nodeid)})"))
