"""Regions and IoU with the object on synthetic maps and masks whose answers are known."""
import math

import pytest
import torch

from kdengine.viz.regions import cam_region, iou, mean_iou, normalise, similarity_regions, upsample


def _square(size, top, left, side):
    m = torch.zeros(size, size, dtype=torch.uint8)
    m[top : top + side, left : left + side] = 1
    return m


def test_iou_of_known_masks():
    a = _square(8, 0, 0, 4)  # 16 px
    b = _square(8, 2, 2, 4)  # 16 px, overlap 2x2 = 4
    got = iou(torch.stack([a, a, a]).bool(), torch.stack([a, b, torch.zeros_like(a)]))
    assert got.tolist() == pytest.approx([1.0, 4 / 28, 0.0])


def test_both_empty_is_nan_and_left_out_of_the_mean():
    empty = torch.zeros(2, 4, 4, dtype=torch.bool)
    full = torch.ones(1, 4, 4, dtype=torch.bool)
    values = torch.cat([iou(empty, empty), iou(full, full)])
    assert math.isnan(values[0]) and math.isnan(values[1]) and values[2] == 1
    assert mean_iou(values) == pytest.approx(100.0)
    assert math.isnan(mean_iou(iou(empty, empty)))


def test_cam_region_of_a_map_peaking_on_the_object():
    # a 4x4 CAM hot in its top two rows; at 16 px bilinear ramps cross 0.5 exactly on the band's edge
    cam = torch.zeros(1, 4, 4)
    cam[0, :2] = 3.0
    cam = cam - 1.0  # the offset does not matter: the map is scaled per image
    top = torch.zeros(1, 16, 16, dtype=torch.uint8)
    top[0, :8] = 1
    assert iou(cam_region(cam, (16, 16)), top).item() == pytest.approx(1.0)
    # hot in the top-left 2x2 cells: the 8x8 block less its inner corner pixel, where the two
    # ramps multiply (0.625 * 0.625 < 0.5), while (6, 7) keeps 0.875 * 0.625 >= 0.5
    cam = torch.zeros(1, 4, 4)
    cam[0, :2, :2] = 1.0
    region = cam_region(cam, (16, 16))
    assert region.sum() == 63 and not region[0, 7, 7] and region[0, 6, 7]
    assert iou(region, _square(16, 0, 0, 8)[None]).item() == pytest.approx(63 / 64)


def test_similarity_regions_split_at_the_mean():
    sim = torch.tensor([[[0.9, 0.9], [-0.5, -0.5]]])  # mean 0.2: the top row is the similar half
    similar, discrepant = similarity_regions(sim, (2, 2))
    assert similar.tolist() == [[[True, True], [False, False]]]
    assert torch.equal(discrepant, ~similar)
    # upsampled to 8 px: the top half of the image, as the object's mask
    similar, discrepant = similarity_regions(sim, (8, 8))
    top = torch.zeros(1, 8, 8, dtype=torch.uint8)
    top[0, :4] = 1
    assert iou(similar, top).item() == pytest.approx(1.0)
    assert iou(discrepant, top).item() == pytest.approx(0.0)


def test_consensus_region_is_where_adm_weights_exceed_one():
    from kdengine.ops import adm_attention_reference

    torch.manual_seed(0)
    fs, ft = torch.randn(3, 8, 5, 5), torch.randn(3, 8, 5, 5)
    sim = torch.nn.functional.cosine_similarity(fs, ft, dim=1, eps=1e-8)
    attn_co, attn_di = adm_attention_reference(fs, ft, eps=0.0)
    similar, discrepant = similarity_regions(sim, (5, 5))
    assert torch.equal(similar, attn_co >= 1 - 1e-6)
    assert torch.equal(discrepant, attn_di > 1 + 1e-6)


def test_upsample_and_normalise():
    x = torch.arange(4.0).view(1, 2, 2)
    assert torch.equal(upsample(x, (2, 2)), x)
    assert upsample(x, (6, 6)).shape == (1, 6, 6)
    n = normalise(torch.tensor([[[2.0, 4.0], [6.0, 10.0]]]))
    assert n.min() == 0 and n.max() == 1 and n[0, 0, 1] == pytest.approx(0.25)
    assert torch.equal(normalise(torch.ones(1, 2, 2)), torch.zeros(1, 2, 2))


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="one shape"):
        iou(torch.zeros(1, 2, 2, dtype=torch.bool), torch.zeros(1, 3, 3))
