"""Device choice (issue 12): what --device auto picks, and one line with the fix for a device that is
not here.
"""

from __future__ import annotations

import pytest
import torch


# --- 16. device choice ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cuda, mps, local_rank, expected", [
    (True, True, None, "cuda:0"),
    (True, False, "1", "cuda:1"),
    (False, True, None, "mps"),
    (False, False, None, "cpu"),
])
def test_device_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, local_rank, expected):
    from vgpt_cli.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2 if cuda else 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert str(resolve_device("auto")) == expected
    assert str(resolve_device(None)) == expected


def test_device_names_that_are_not_here_fail_with_the_fix(monkeypatch):
    from vgpt_cli.device import resolve_device
    from vgpt_cli.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for name, message in (("cuda", "no CUDA GPU is visible"), ("mps", "MPS is not available"),
                          ("tpu", "use auto, cpu")):
        with pytest.raises(ConfigError, match=message):
            resolve_device(name)
