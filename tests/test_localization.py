"""Pointing game, centre-of-mass distance (mm, any affine) and Dice of the thresholded region."""

from __future__ import annotations

import numpy as np
import pytest

from medimb.evaluation.localization import (
    centre_of_mass_distance_mm,
    centre_of_mass_mm,
    dice_of_threshold,
    localization_scores,
    peak_on_border,
    pointing_game,
    summarize_by_label,
    summarize_scores,
)


def lesion_and_map(shift=(0, 0, 0)):
    mask = np.zeros((20, 20, 10), bool)
    mask[8:12, 8:12, 4:6] = True
    heat = np.zeros(mask.shape, np.float32)
    sl = tuple(slice(a + s, b + s) for (a, b), s in zip(((8, 12), (8, 12), (4, 6)), shift))
    heat[sl] = 1.0
    heat += 0.01
    heat /= heat.max()
    return heat, mask


def test_pointing_game_hits_only_when_the_peak_is_inside_the_lesion():
    heat, mask = lesion_and_map()
    assert pointing_game(heat, mask)
    heat[0, 0, 0] = 2.0
    assert not pointing_game(heat, mask)


def test_peak_on_border_flags_maps_that_peak_on_the_scan_faces():
    heat, _ = lesion_and_map()
    assert not peak_on_border(heat)
    for corner in ((5, 5, 0), (5, 5, 9), (0, 7, 4), (5, 19, 4)):
        edged = heat.copy()
        edged[corner] = 2.0
        assert peak_on_border(edged), corner


def test_com_distance_uses_world_millimetres():
    heat, mask = lesion_and_map(shift=(3, 0, 1))
    affine = np.diag([0.5, 2.0, 4.0, 1.0])
    assert centre_of_mass_distance_mm(heat, mask, affine) == pytest.approx(np.hypot(3 * 0.5, 1 * 4.0))
    rotated = np.eye(4)
    rotated[:3, :3] = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]]) @ np.diag([0.5, 2.0, 4.0])
    rotated[:3, 3] = [10, -5, 3]
    assert centre_of_mass_distance_mm(heat, mask, rotated) == pytest.approx(np.hypot(1.5, 4.0))
    # a threshold of 0 includes the faint background, which moves the centre of mass
    whole_map = centre_of_mass_distance_mm(heat, mask, affine, threshold=0.0)
    assert whole_map != pytest.approx(np.hypot(1.5, 4.0), abs=0.1)


def test_centre_of_mass_is_intensity_weighted_in_world_millimetres():
    w = np.zeros((3, 3, 3))
    w[0, 0, 0], w[2, 0, 0] = 1.0, 3.0
    np.testing.assert_allclose(centre_of_mass_mm(w, np.diag([2.0, 1.0, 1.0, 1.0])), [3.0, 0.0, 0.0])


def test_dice_of_thresholded_map_is_one_on_the_lesion_and_half_when_shifted_half():
    heat, mask = lesion_and_map()
    assert dice_of_threshold(heat, mask) == pytest.approx(1.0)
    heat, mask = lesion_and_map(shift=(2, 0, 0))  # half the cube overlaps
    assert dice_of_threshold(heat, mask) == pytest.approx(0.5)
    assert dice_of_threshold(np.zeros_like(heat), mask, threshold=0.5) == 0.0


def test_perfect_map_scores_perfectly_and_mismatched_or_empty_masks_are_errors():
    heat, mask = lesion_and_map()
    scores = localization_scores(heat, mask, np.eye(4))
    assert scores == {"pointing_game": 1.0, "com_distance_mm": pytest.approx(0.0, abs=1e-9), "dice": 1.0,
                      "peak_on_border": 0.0}
    with pytest.raises(ValueError, match="same grid"):
        pointing_game(heat[:-1], mask)
    with pytest.raises(ValueError, match="empty"):
        dice_of_threshold(heat, np.zeros_like(mask))


def test_summaries_count_hits_over_all_cases_and_per_true_class():
    scores = [{"pointing_game": hit, "com_distance_mm": d, "dice": 0.5} for hit, d in
              ((1.0, 1.0), (1.0, 3.0), (0.0, 20.0), (0.0, 30.0), (1.0, 2.0))]
    labels = [1, 1, 0, 0, None]
    overall = summarize_scores(scores)
    assert (overall["cases"], overall["hits"], overall["pointing_game"]) == (5, 3, 0.6)
    assert overall["com_distance_mm_median"] == 3.0
    by_label = summarize_by_label(scores, labels)
    assert sorted(by_label) == ["0", "1"]  # the unlabelled case is in neither class
    assert (by_label["1"]["hits"], by_label["1"]["pointing_game"], by_label["1"]["com_distance_mm_median"]) == (2, 1.0, 2.0)
    assert (by_label["0"]["hits"], by_label["0"]["cases"]) == (0, 2)
    with pytest.raises(ValueError):
        summarize_by_label(scores, labels[:2])
    with pytest.raises(ValueError):
        summarize_scores([])


@pytest.mark.parametrize("flip", [False, True], ids=["oblique", "oblique_lps"])
def test_oracle_mask_survives_preprocess_and_inversion(tmp_path, flip):
    """The localisation benchmark's sanity row: a lesion mask pushed through the checkpoint's
    geometric preprocessing (reorient, resample, crop one axis and pad another) and inverted onto the
    source grid with the *image's* recorded transforms scores as a perfect map."""
    from helpers.explain import oblique_affine
    from helpers.nifti import write_nifti

    from medimb.data.transforms import Preprocessing, build_eval_transforms
    from medimb.explain.export import forward_to_network_grid, invert_to_source

    affine = oblique_affine(spacing=(0.75, 0.75, 1.5))
    if flip:
        affine = affine @ np.diag([-1.0, -1.0, 1.0, 1.0])
    shape = (32, 28, 12)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    world = ijk @ affine[:3, :3].T
    centre = np.array([19, 12, 7]) @ affine[:3, :3].T
    mask = np.linalg.norm(world - centre, axis=-1) <= 3.0  # a 3 mm ball off the centre
    image = np.random.default_rng(1).random(shape).astype(np.float32) + 2.0 * mask
    write_nifti(tmp_path / "image.nii.gz", image, affine, scanner_codes=True)
    write_nifti(tmp_path / "mask.nii.gz", mask.astype(np.float32), affine, scanner_codes=True)
    pre = Preprocessing(spatial_size=(24, 40, 16), pixdim=(0.9, 0.9, 2.0))
    transform = build_eval_transforms(pre)
    data = transform({"image": [str(tmp_path / "image.nii.gz")]})
    on_net = forward_to_network_grid(tmp_path / "mask.nii.gz", pre.to_dict())
    assert on_net.shape == (1, *pre.spatial_size) and on_net.max() > 0.5
    back = invert_to_source(on_net, data, transform)
    assert back.shape == shape
    scores = localization_scores(back / back.max(), mask, affine)
    assert scores["pointing_game"] == 1.0
    assert scores["com_distance_mm"] < 0.9
    assert scores["dice"] > 0.6
