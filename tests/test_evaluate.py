"""The evaluation metrics on cases with known answers."""
from __future__ import annotations

import numpy as np
import pytest

from dfd_data.image_io import read_image
from dfd_model.evaluate import (EvaluateError, face_embedding, find_pairs, frechet_distance, inter_ocular,
                                landmark_error, landmarks_of)


@pytest.fixture(scope="module")
def face(sample_photos) -> np.ndarray:
    from dfd_data.faces import find_faces
    from dfd_data.ffhq_alignment import align_face, ffhq_quad

    photo = read_image(sample_photos / "grace_hopper.jpg")
    return align_face(photo, ffhq_quad(find_faces(photo)[0].landmarks), 256)


def test_landmark_error_is_zero_for_itself_and_scales_with_a_shift(face):
    points = landmarks_of(face)
    assert points is not None and points.shape == (68, 2)
    assert landmark_error(points, points) == 0.0
    shift = 0.1 * inter_ocular(points)
    assert landmark_error(points + [shift, 0.0], points) == pytest.approx(0.1)
    assert landmark_error(points + [0.3 * shift, 0.4 * shift], points) == pytest.approx(0.05)


def test_a_blank_image_has_no_face_and_a_real_face_has_one(face):
    assert landmarks_of(np.full((256, 256), 255, np.uint8)) is None
    assert landmarks_of(face) is not None


def test_frechet_distance_known_answers():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 8))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shifted = a + np.array([0.5] * 8)
    assert frechet_distance(a, shifted) == pytest.approx(8 * 0.25, rel=1e-6)  # same covariance: |mean shift|^2
    scaled = a * 2.0
    # |mu - 2mu|^2 + Tr(C + 4C - 2 sqrt(4C^2)) = |mu|^2 + Tr(C)
    expected = np.sum(a.mean(0) ** 2) + np.trace(np.cov(a, rowvar=False))
    assert frechet_distance(a, scaled) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError):
        frechet_distance(a[:1], a)


def test_frechet_distance_of_fewer_faces_than_dimensions_is_exact_and_quiet(recwarn):
    """20 embeddings of 128 dimensions (a small evaluation) have singular covariances."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(20, 128)), rng.normal(size=(20, 128)) * 1.5 + 0.1
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eig(cov_a @ cov_b)  # Tr sqrt(AB) = sum of sqrt of AB's eigenvalues
    trace_root = np.sqrt(np.clip(values.real, 0, None)).sum()
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a + cov_b) - 2 * trace_root
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert not recwarn.list


def test_face_embeddings_are_128_d_and_a_face_matches_itself(face):
    first, again = face_embedding(face), face_embedding(face.copy())
    assert first.shape == (128,) and np.array_equal(first, again)
    blank = face_embedding(np.full_like(face, 255))
    assert np.linalg.norm(first - blank) > 0.1


def test_pairs_need_both_folders(tmp_path):
    with pytest.raises(EvaluateError, match="needs a sketches/ folder"):
        find_pairs(tmp_path)
    (tmp_path / "sketches").mkdir()
    (tmp_path / "photos").mkdir()
    (tmp_path / "sketches" / "a.png").write_bytes(b"x")
    (tmp_path / "photos" / "b.png").write_bytes(b"x")
    with pytest.raises(EvaluateError, match="no file name appears in both"):
        find_pairs(tmp_path)


def test_a_name_with_two_images_on_one_side_or_none_on_the_other_is_left_out_and_named(tmp_path):
    for side, names in (("sketches", ["a.png", "a.jpg", "b.png", "d.png"]),
                        ("photos", ["a.png", "a.bmp", "b.jpg", "c.png"])):
        (tmp_path / side).mkdir()
        for name in names:
            (tmp_path / side / name).write_bytes(b"x")
    pairs, left_out = find_pairs(tmp_path)
    assert [(name, sketch.name, photo.name) for name, sketch, photo in pairs] == [("b", "b.png", "b.jpg")]
    assert len(left_out) == 3
    ambiguous, no_photo, no_sketch = left_out
    assert str(tmp_path / "sketches" / "a.jpg") in ambiguous and str(tmp_path / "sketches" / "a.png") in ambiguous
    assert "2 images named 'a'" in ambiguous and str(tmp_path / "photos" / "a.bmp") in ambiguous
    assert no_photo == f"{tmp_path / 'sketches' / 'd.png'}: no photo named 'd' in {tmp_path / 'photos'}"
    assert no_sketch == f"{tmp_path / 'photos' / 'c.png'}: no sketch named 'c' in {tmp_path / 'sketches'}"
