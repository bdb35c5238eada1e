"""No library call changes global state (issue 12): the torch RNG and PIL's truncated-images setting
are left as the caller set them.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny forwards (see conftest.py)


# --- 6. no library call changes global state ---------------------------------------------------------------------
def test_load_backbone_leaves_the_global_torch_rng_alone():
    from vgpt_cli.features import load_backbone

    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    load_backbone("test_efficientnet", pretrained=False, image_size=64)
    assert torch.equal(torch.rand(3), expected)
    # and its seeded random init is still reproducible
    a = load_backbone("test_efficientnet", pretrained=False, image_size=64)
    b = load_backbone("test_efficientnet", pretrained=False, image_size=64)
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_opening_an_image_leaves_pils_truncated_images_setting_alone(tmp_path):
    from PIL import Image, ImageFile

    from vgpt_cli.features.images import open_rgb

    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(path)
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        ImageFile.LOAD_TRUNCATED_IMAGES = True  # a caller's own choice
        open_rgb(path)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before
