"""The §4.2 capture metric against hand-computed cases."""
import numpy as np
import pytest

from mining.metrics import capture_rate, captured, coverage_matrix


def test_cover_and_fill_fractions_hand_computed():
    obj = np.array([[0, 0, 10, 10]])  # area 100
    patches = np.array([[5, 0, 25, 20], [0, 0, 10, 10]])  # inter 50 (area 400), inter 100 (area 100)
    cover, fill = coverage_matrix(obj, patches)
    np.testing.assert_allclose(cover, [[0.5, 1.0]])
    np.testing.assert_allclose(fill, [[50 / 400, 1.0]])


def test_exactly_half_covered_counts():
    obj = np.array([[0, 0, 10, 10]])
    assert captured(obj, np.array([[0, 0, 10, 5]])).tolist() == [True]  # 50 % exactly
    assert captured(obj, np.array([[0, 0, 10, 4]])).tolist() == [False]  # 40 %


def test_min_fill_five_percent():
    obj = np.array([[0, 0, 10, 10]])  # 100 px
    assert captured(obj, np.array([[0, 0, 44, 44]])).tolist() == [True]  # 100/1936 = 5.2 %
    assert captured(obj, np.array([[0, 0, 45, 45]])).tolist() == [False]  # 100/2025 = 4.9 %


def test_both_conditions_must_hold_for_the_same_patch():
    obj = np.array([[0, 0, 10, 10]])
    big = [0, 0, 100, 100]  # covers 100 % but fill 1 %
    partial = [0, 0, 10, 4]  # fill 100 % but covers 40 %
    assert captured(obj, np.array([big, partial])).tolist() == [False]
    assert captured(obj, np.array([big, partial, [0, 0, 20, 20]])).tolist() == [True]


def test_no_patches_and_no_objects():
    assert captured(np.array([[0, 0, 5, 5]]), np.zeros((0, 4))).tolist() == [False]
    assert captured(np.zeros((0, 4)), np.array([[0, 0, 5, 5]])).shape == (0,)
    assert np.isnan(capture_rate(np.zeros((0, 4)), np.array([[0, 0, 5, 5]])))


def test_capture_rate_and_thresholds():
    objs = np.array([[0, 0, 10, 10], [100, 100, 110, 110], [50, 50, 60, 60]])
    patches = np.array([[0, 0, 20, 20], [95, 95, 115, 115]])
    assert capture_rate(objs, patches) == pytest.approx(2 / 3)
    # stricter cover threshold: the object half inside no longer counts
    assert captured(np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 5]]), min_cover=0.6).tolist() == [False]


def test_rejects_bad_boxes():
    with pytest.raises(ValueError):
        captured(np.array([[0, 0, 10]]), np.array([[0, 0, 5, 5]]))
    with pytest.raises(ValueError):
        captured(np.array([[5, 0, 5, 10]]), np.array([[0, 0, 5, 5]]))
