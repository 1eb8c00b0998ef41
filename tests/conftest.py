"""Test set-up: Triton's interpreter on machines without a GPU, the `cuda` marker, fresh seeds, poisoned
outputs."""
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


SEED_LINE = f"test inputs: SE_TEST_SEED={BASE_SEED} (set it to replay this run's random inputs)"


def pytest_report_header(config):
    return SEED_LINE


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # the header is hidden under -q (the README's command): the summary shows the seed whatever the verbosity
    terminalreporter.write_line(SEED_LINE)


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


# ---------------------------------------------------------------- poisoned outputs

def _poisoned(t: torch.Tensor) -> torch.Tensor:
    """Fill a fresh allocation with a value no op should leave: NaN for floats, 0x5A bytes otherwise (for a
    bool view that is neither False nor a True the ops write)."""
    if t.is_floating_point() or t.is_complex():
        return t.fill_(float("nan"))
    if t.numel():
        t.view(torch.uint8).fill_(0x5A) if t.element_size() == 1 else t.fill_(-0x5A5A5A5)
    return t


@pytest.fixture
def poison_outputs(monkeypatch):
    """torch.empty / empty_like / new_empty (as Python code calls them) return poisoned memory for the test, so
    an output element an implementation forgets to write fails the comparison instead of holding a plausible
    leftover (on the CPU the allocator hands out fresh pages, often zeros)."""
    real_empty, real_empty_like, real_new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def empty(*args, **kwargs):
        return _poisoned(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return _poisoned(real_empty_like(*args, **kwargs))

    def new_empty(self, *args, **kwargs):
        return _poisoned(real_new_empty(self, *args, **kwargs))

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    monkeypatch.setattr(torch.Tensor, "new_empty", new_empty)
