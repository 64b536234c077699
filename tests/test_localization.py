"""Pointing game, centre-of-mass distance (mm, any affine) and Dice of the thresholded region."""

from __future__ import annotations

import numpy as np
import pytest

from medimb.evaluation.localization import (
    centre_of_mass_distance_mm,
    centre_of_mass_mm,
    dice_of_threshold,
    localization_scores,
    pointing_game,
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


def test_pointing_game():
    heat, mask = lesion_and_map()
    assert pointing_game(heat, mask)
    heat[0, 0, 0] = 2.0
    assert not pointing_game(heat, mask)


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


def test_centre_of_mass_mm():
    w = np.zeros((3, 3, 3))
    w[0, 0, 0], w[2, 0, 0] = 1.0, 3.0
    np.testing.assert_allclose(centre_of_mass_mm(w, np.diag([2.0, 1.0, 1.0, 1.0])), [3.0, 0.0, 0.0])


def test_dice_of_threshold():
    heat, mask = lesion_and_map()
    assert dice_of_threshold(heat, mask) == pytest.approx(1.0)
    heat, mask = lesion_and_map(shift=(2, 0, 0))  # half the cube overlaps
    assert dice_of_threshold(heat, mask) == pytest.approx(0.5)
    assert dice_of_threshold(np.zeros_like(heat), mask, threshold=0.5) == 0.0


def test_scores_and_bad_input():
    heat, mask = lesion_and_map()
    scores = localization_scores(heat, mask, np.eye(4))
    assert scores == {"pointing_game": 1.0, "com_distance_mm": pytest.approx(0.0, abs=1e-9), "dice": 1.0}
    with pytest.raises(ValueError, match="same grid"):
        pointing_game(heat[:-1], mask)
    with pytest.raises(ValueError, match="empty"):
        dice_of_threshold(heat, np.zeros_like(mask))
