import os

# Offline, the hub clients retry for 20-50 s before failing: make them fail at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist every core runs a worker: one torch thread each (and in their subprocesses), since
# more threads than cores make OpenMP spin and wait.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from helpers import GPT2_BPE, gpt2_tokenizer  # noqa: E402

TESTS = Path(__file__).parent
# Real annotation files in public formats: small excerpts (or whole files, where the licence allows)
# copied into the repository with their sources and licences, so a clone alone runs every test.
REALDATA = TESTS / "assets" / "realdata"


@pytest.fixture(scope="session")
def gpt2_bpe_dir() -> Path:
    return GPT2_BPE


@pytest.fixture(scope="module")
def tok():
    """The real GPT-2 BPE tokenizer, one per test module."""
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny forwards: a thread pool only adds waiting, badly so on a
    busy 2-core CI machine. Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def realdata() -> Path:
    """tests/assets/realdata (see its README.md for what each file is and where it comes from)."""
    return REALDATA


# --- CI runs every test ----------------------------------------------------------------------------------
# Every test's needs are installed by .ci/run or shipped in tests/assets, so on CI (CI=true, as the CI runner
# sets it) a skip means a missing install step, and it fails the run instead of hiding a test.
NO_SKIPS = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if NO_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped on CI, where every test must run (CI=true): {reason}"
