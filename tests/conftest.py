import os

# Offline, the hub clients retry for 20-50 s before failing: make them fail at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

TESTS = Path(__file__).parent
GPT2_BPE = TESTS / "assets" / "gpt2-bpe"
SHARED = TESTS.parent.parent / "shared"
REALDATA = SHARED / "realdata"


@pytest.fixture(scope="session")
def gpt2_bpe_dir() -> Path:
    return GPT2_BPE


@pytest.fixture(scope="session")
def realdata() -> Path:
    if not REALDATA.is_dir():
        pytest.skip(f"real annotation files not found at {REALDATA} (the shared/ folder beside the checkout)")
    return REALDATA
