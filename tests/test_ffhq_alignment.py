"""FFHQ alignment geometry on synthetic landmarks and pixels (no detector involved)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from dfd_data.ffhq_alignment import (TEMPLATE_LEFT_EYE, TEMPLATE_MOUTH, TEMPLATE_RIGHT_EYE, align_face,
                                     face_features, ffhq_quad, points_to_output)


def synthetic_landmarks(eye_l, eye_r, mouth_l, mouth_r) -> np.ndarray:
    """68 points whose eye means and mouth corners are the given positions."""
    lm = np.zeros((68, 2))
    lm[36:42] = eye_l
    lm[42:48] = eye_r
    lm[48] = mouth_l
    lm[54] = mouth_r
    return lm


def rotate(points, angle_deg, centre):
    angle = np.deg2rad(angle_deg)
    matrix = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return (np.asarray(points) - centre) @ matrix.T + centre


UPRIGHT = synthetic_landmarks((400, 500), (600, 500), (430, 700), (570, 700))


def test_quad_is_an_upright_square_for_an_upright_face():
    quad = ffhq_quad(UPRIGHT)
    side = quad[3] - quad[0]
    down = quad[1] - quad[0]
    assert side[1] == pytest.approx(0) and down[0] == pytest.approx(0)
    assert np.hypot(*side) == pytest.approx(np.hypot(*down))
    assert np.hypot(*side) == pytest.approx(2 * 2.0 * 200)  # eye distance rules here: 2 * 2.0 * |eye_to_eye|


def test_eyes_and_mouth_land_on_the_template():
    quad = ffhq_quad(UPRIGHT)
    feats = face_features(UPRIGHT)
    out = points_to_output(np.stack([feats["left_eye"], feats["right_eye"], feats["mouth"]]), quad, 512) / 512
    assert out[0] == pytest.approx(TEMPLATE_LEFT_EYE, abs=0.02)
    assert out[1] == pytest.approx(TEMPLATE_RIGHT_EYE, abs=0.02)
    assert out[2] == pytest.approx(TEMPLATE_MOUTH, abs=0.05)


def test_rotated_face_is_levelled():
    tilted = rotate(UPRIGHT, 25, centre=(500, 600))
    quad = ffhq_quad(tilted)
    feats = face_features(tilted)
    out = points_to_output(np.stack([feats["left_eye"], feats["right_eye"]]), quad, 512)
    assert out[0][1] == pytest.approx(out[1][1], abs=1e-6)  # eyes level after alignment
    assert out[0] == pytest.approx(points_to_output(np.stack([face_features(UPRIGHT)["left_eye"]]), ffhq_quad(UPRIGHT), 512)[0])


def test_quad_corners_map_to_output_corners():
    quad = ffhq_quad(UPRIGHT)
    corners = points_to_output(quad, quad, 256)
    assert corners == pytest.approx(np.array([[-0.5, -0.5], [-0.5, 255.5], [255.5, 255.5], [255.5, -0.5]]))


@pytest.mark.parametrize("angle", [0, 12, -30])
def test_pixels_follow_the_geometry(angle):
    """Dots drawn at the eyes of a synthetic photo appear where points_to_output says."""
    image = np.full((1000, 1000, 3), 200, np.uint8)
    lm = rotate(UPRIGHT, angle, centre=(500, 600))
    feats = face_features(lm)
    for point, colour in ((feats["left_eye"], (255, 0, 0)), (feats["right_eye"], (0, 0, 255))):
        cv2.circle(image, tuple(int(round(v)) for v in point), 12, colour, -1, lineType=cv2.LINE_AA)
    quad = ffhq_quad(lm)
    aligned = align_face(image, quad, 256)
    expected = points_to_output(np.stack([feats["left_eye"], feats["right_eye"]]), quad, 256)
    for channel, centre in ((0, expected[0]), (2, expected[1])):
        mask = (aligned[:, :, channel].astype(int) - aligned[:, :, 1].astype(int)) > 100
        ys, xs = np.nonzero(mask)
        assert np.hypot(xs.mean() - centre[0], ys.mean() - centre[1]) < 0.75


def test_face_leaving_the_photo_is_padded_not_black():
    """A face near the border: the part of the square outside the photo is filled."""
    image = np.full((700, 700, 3), (90, 140, 200), np.uint8)
    lm = UPRIGHT - (330, 380)  # eyes near the top-left corner
    aligned = align_face(image, ffhq_quad(lm), 128)
    assert aligned.shape == (128, 128, 3)
    assert aligned.min() > 40  # no black fill
    assert np.abs(aligned.astype(int) - (90, 140, 200)).max() < 8  # reflection of a flat photo is flat


def test_big_photo_is_shrunk_first_and_still_lands_right():
    image = np.full((4000, 4000, 3), 180, np.uint8)
    lm = synthetic_landmarks((1600, 2000), (2400, 2000), (1720, 2800), (2280, 2800))
    feats = face_features(lm)
    cv2.circle(image, tuple(int(v) for v in feats["left_eye"]), 40, (255, 0, 0), -1)
    quad = ffhq_quad(lm)
    aligned = align_face(image, quad, 128)
    expected = points_to_output(feats["left_eye"][None], quad, 128)[0]
    ys, xs = np.nonzero(aligned[:, :, 0].astype(int) - aligned[:, :, 1].astype(int) > 40)
    assert np.hypot(xs.mean() - expected[0], ys.mean() - expected[1]) < 1.0
