"""Alignment on the real photos in ../shared/data (CelebA-HQ, APDrawing, FS2K)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from dfd_data.dataset import Dataset
from dfd_data.faces import find_faces
from dfd_data.ffhq_alignment import TEMPLATE_LEFT_EYE, TEMPLATE_MOUTH, TEMPLATE_RIGHT_EYE, face_features
from dfd_data.image_io import read_image
from tests.conftest import dfd_data

FS2K_PER_FOLDER = 25


@pytest.fixture(scope="module")
def real_run(shared_data, tmp_path_factory):
    """Align all CelebA-HQ and APDrawing photos and 25 FS2K photos of each kind at 256 px."""
    src = tmp_path_factory.mktemp("real") / "photos"
    for folder in ("celebahq", "apdrawing"):
        shutil.copytree(shared_data / folder, src / folder)
    for kind in ("photo1", "photo2", "photo3"):
        (src / "fs2k" / kind).mkdir(parents=True)
        for path in sorted((shared_data / "fs2k_train" / "photo" / kind).glob("*.jpg"))[:FS2K_PER_FOLDER]:
            shutil.copy(path, src / "fs2k" / kind / path.name)
    dst = src.parent / "faces"
    result = dfd_data("align", src, dst, "--size", "256", "--jobs", "2")
    return src, dst, result


def test_at_least_95_percent_of_real_photos_align(real_run):
    src, dst, result = real_run
    records = Dataset(dst).records()
    tried = len(list(src.rglob("*.*")))
    assert len(records) == tried
    aligned = [r for r in records if r["status"] == "aligned"]
    assert len(aligned) / tried >= 0.95, result.stdout
    assert result.returncode == 0  # photos without a detectable face are skips, not failures
    assert all(r["status"] in ("aligned", "no_face") for r in records)


def test_aligned_faces_land_on_the_template(real_run):
    """Re-detect the landmarks on the aligned pixels: the mean eye and mouth centres must sit
    within 2% of the image size of the CelebA-HQ template positions."""
    _src, dst, _result = real_run
    centres = []
    for record in Dataset(dst).aligned():
        image = read_image(dst / record["image"])
        faces = find_faces(image)
        if faces:
            feats = face_features(faces[0].landmarks)
            centres.append([feats["left_eye"], feats["right_eye"], feats["mouth"]])
    centres = np.array(centres) / 256
    assert len(centres) >= 0.95 * len(Dataset(dst).aligned())
    mean = centres.mean(axis=0)
    for measured, template in zip(mean, (TEMPLATE_LEFT_EYE, TEMPLATE_RIGHT_EYE, TEMPLATE_MOUTH)):
        assert np.hypot(*(measured - np.array(template))) < 0.02, (measured, template)


def test_contact_sheet_shows_the_aligned_faces(real_run):
    _src, dst, _result = real_run
    sheet = read_image(dst / "previews" / "align.jpg")
    assert sheet.shape == (8 * 128, 8 * 128, 3)  # 64 faces, 8 by 8
    assert dfd_data("verify", dst).returncode == 0


def test_faces_are_found_the_same_in_a_strided_view(shared_data):
    """A model's faces come out channel-planar; evaluate hands find_faces their HWC view.
    dlib read such a view as other pixels: detector scores and landmarks changed from call to
    call (and with the batch size), and some faces were not found."""
    import cv2
    import torch

    photos = [cv2.resize(read_image(path), (256, 256), interpolation=cv2.INTER_AREA)
              for path in sorted((shared_data / "celebahq").iterdir())[:16]]
    planar = torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2).contiguous()  # as a model writes them
    for view, photo in zip(planar.permute(0, 2, 3, 1).numpy(), photos):
        assert not view.flags["C_CONTIGUOUS"]
        found, expected = find_faces(view), find_faces(photo)
        assert [(face.box, face.score) for face in found] == [(face.box, face.score) for face in expected]
        assert all(np.array_equal(a.landmarks, b.landmarks) for a, b in zip(found, expected))
