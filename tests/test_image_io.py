"""Image decoding: every valid encoding becomes 8-bit RGB the right way up; every bad file is
refused with one line naming it; writes are atomic."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image, ImageOps

from dfd_data import atomic
from dfd_data.atomic import TEMP_PREFIX, atomic_write_bytes
from dfd_data.image_io import ImageError, decode_image, read_image, write_image
from tests.hostile import bad_files, bomb_png, exif_rotated_jpeg, good_variants



@pytest.fixture(scope="module")
def astronaut():
    import skimage.data

    return skimage.data.astronaut()


def test_every_valid_encoding_decodes_to_rgb8(astronaut):
    for name, data in good_variants(astronaut).items():
        image = decode_image(data, name)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
        assert image.shape[:2] == astronaut.shape[:2], name
        gray = astronaut.mean(axis=2)
        assert abs(float(image.mean(axis=2).mean()) - float(gray.mean())) < 12, name  # same photo, same brightness


def test_exif_orientation_is_applied(astronaut):
    image = decode_image(exif_rotated_jpeg(astronaut), "rotated.jpg")
    assert image.shape == astronaut.shape
    assert np.abs(image.astype(int) - astronaut.astype(int)).mean() < 6  # upright again, not lying on its side


def test_sixteen_bit_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, "PNG")
    image = decode_image(buffer.getvalue(), "ramp16.png")
    assert image[0, 0, 0] == 0 and image[-1, -1, 0] == 255
    assert 120 <= image[32, 0, 0] <= 135  # mid-grey stays mid-grey


def test_a_float_image_with_nan_values_is_one_line_without_warnings():
    values = np.full((32, 32), 0.5, np.float32)
    values[4, 4] = np.nan
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, "TIFF")  # (float32: mode F)
    with np.errstate(all="raise"):  # a cast of NaN would raise FloatingPointError here
        with pytest.raises(ImageError, match=r"^nan\.tiff: a floating-point image with NaN"):
            decode_image(buffer.getvalue(), "nan.tiff")


def test_transparency_composites_on_white():
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    rgba.paste((10, 20, 30, 255), (0, 0, 16, 32))
    for mode in ("RGBA", "P"):
        buffer = io.BytesIO()
        (rgba if mode == "RGBA" else rgba.convert("P")).save(buffer, "PNG")
        image = decode_image(buffer.getvalue(), f"{mode}.png")
        assert tuple(image[5, 25]) == (255, 255, 255), mode
        assert tuple(image[5, 5]) == (10, 20, 30), mode


def test_a_trns_transparent_colour_composites_on_white():
    """Gray and RGB PNGs can name one transparent colour in a tRNS chunk instead of carrying
    an alpha channel: that colour is paper, not ink."""
    for mode, ink, clear in (("L", 40, 0), ("RGB", (10, 20, 30), (0, 0, 0))):
        picture = Image.new(mode, (32, 32), clear)
        picture.paste(ink, (0, 0, 16, 32))
        buffer = io.BytesIO()
        picture.save(buffer, "PNG", transparency=clear)
        image = decode_image(buffer.getvalue(), f"{mode}-trns.png")
        assert tuple(image[5, 25]) == (255, 255, 255), mode
        assert tuple(image[5, 5]) == ((ink,) * 3 if mode == "L" else ink), mode


@pytest.mark.parametrize("name", sorted(bad_files(np.zeros((64, 64, 3), np.uint8)).keys() - {"noise-no-face.png", "flat-no-face.jpg"}))
def test_bad_files_are_refused_with_one_line(tmp_path, astronaut, name):
    path = tmp_path / name
    path.write_bytes(bad_files(astronaut)[name])
    with pytest.raises(ImageError) as raised:
        read_image(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    expected = {"empty.jpg": "empty", "truncated.jpg": "truncated", "truncated.png": "truncated", "text.jpg": "not an image",
                "page.png": "not an image", "bomb.png": "too large", "tiny.png": "too small"}[name]
    assert expected in message


def test_unreadable_paths_are_one_line(tmp_path):
    os.symlink("loop.jpg", tmp_path / "loop.jpg")
    with pytest.raises(ImageError, match=r"loop\.jpg: cannot read file"):
        read_image(tmp_path / "loop.jpg")
    with pytest.raises(ImageError, match="cannot read file"):
        read_image(tmp_path / "missing.png")


def test_a_format_pillow_does_not_implement_is_one_line():
    """A DDS header with pixel format flags Pillow does not know raises NotImplementedError in
    Pillow (found by fuzzing the app, which answered 500)."""
    header = bytes.fromhex(
        "444453207c0000000f100000400000004000000000010000000000000000000000000000000000000000006d"
        "000000000000000000003c000000000000000000000000000000000000000000200000009300000000000000"
        "200000000000ff0000ff0000ff000000000000ff0010000000000000000000000000000000000000")
    with pytest.raises(ImageError, match=r"x\.dds: cannot decode image \(Unknown pixel format flags 147\)"):
        decode_image(header + bytes(16384), "x.dds")


def test_bomb_header_is_refused_before_decoding():
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(bomb_png(20_000, 20_000), "bomb.png")


def test_write_image_round_trips(tmp_path, astronaut):
    write_image(tmp_path / "a.png", astronaut)
    assert np.array_equal(read_image(tmp_path / "a.png"), astronaut)
    gray = astronaut[:, :, 0]
    write_image(tmp_path / "g.png", gray)
    assert np.array_equal(read_image(tmp_path / "g.png")[:, :, 0], gray)


def test_atomic_write_leaves_nothing_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "out" / "file.bin"
    atomic_write_bytes(target, b"old")

    def fail(*_args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", fail)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"old"
    assert not [p for p in target.parent.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_a_stack_written_on_a_full_disk_is_one_line_and_leaves_the_old_one(tmp_path, monkeypatch):
    """crop-components streams its .npy stacks through atomic_write_npy (a memory map would
    die of SIGBUS on a full disk): the same file as np.save, and on a full disk a WriteError
    naming the stack, the earlier stack untouched and no temporary file."""
    from dfd_data.atomic import WriteError, atomic_write_npy
    from tests.hostile import fill_disk_after

    stack = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    target = tmp_path / "nose.npy"
    digest = atomic_write_npy(target, stack.shape, (row.tobytes() for row in stack))
    saved = io.BytesIO()
    np.save(saved, stack)
    assert target.read_bytes() == saved.getvalue() and digest == atomic.sha256_bytes(saved.getvalue())
    fill_disk_after(monkeypatch, 0)
    with pytest.raises(WriteError) as caught:
        atomic_write_npy(target, stack.shape, (row.tobytes() for row in stack[::-1]))
    assert str(caught.value) == f"{target}: cannot write (No space left on device)"
    assert target.read_bytes() == saved.getvalue()
    assert [p.name for p in tmp_path.iterdir()] == ["nose.npy"]


def test_safetensors_written_one_tensor_at_a_time_read_back_exactly(tmp_path, monkeypatch):
    """Checkpoints and model folders stream their tensors through atomic_write_safetensors
    (safetensors' own writers hold a contiguous copy of all of them, which ran full-size
    training out of memory): safetensors reads back every dtype, layout and shape, with the
    metadata; size and digest are the file's; a full disk leaves the old file and no temp."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from dfd_data.atomic import WriteError, atomic_write_safetensors, sha256_file
    from tests.hostile import fill_disk_after

    torch.manual_seed(0)
    tensors = {"conv.weight": torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last),
               "moment.bf16": torch.randn(5, 3).bfloat16(), "half": torch.randn(2, 7).half(),
               "double": torch.randn(3).double(), "step": torch.tensor(12), "rng": torch.get_rng_state(),
               "mask": torch.rand(4, 4) > 0.5, "empty": torch.zeros(0, 4), "strided": torch.randn(6, 6)[::2, 1:]}
    target = tmp_path / "t.safetensors"
    size, digest = atomic_write_safetensors(target, tensors, {"format": "test"})
    assert (size, digest) == (target.stat().st_size, sha256_file(target))
    loaded = load_file(target)
    assert loaded.keys() == tensors.keys()
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    with safe_open(target, "pt") as handle:
        assert handle.metadata() == {"format": "test"}

    as_float32 = tmp_path / "f.safetensors"
    atomic_write_safetensors(as_float32, tensors, float_dtype=torch.float32)
    loaded = load_file(as_float32)
    assert loaded["moment.bf16"].dtype == torch.float32 and torch.equal(loaded["moment.bf16"], tensors["moment.bf16"].float())
    assert loaded["step"].dtype == torch.int64 and loaded["mask"].dtype == torch.bool

    for metadata in ({"steps": 3}, {"nested": {"a": "b"}}):  # the format keeps text only
        with pytest.raises(TypeError, match="metadata must map text to text"):
            atomic_write_safetensors(target, tensors, metadata)
    with pytest.raises(TypeError, match="header's own key"):
        atomic_write_safetensors(target, {"__metadata__": torch.ones(1)})
    assert load_file(target).keys() == tensors.keys()  # the file refused metadata left intact
    with pytest.raises(TypeError, match="complex64"):
        atomic_write_safetensors(tmp_path / "c.safetensors", {"z": torch.zeros(2, dtype=torch.complex64)})
    before = target.read_bytes()
    fill_disk_after(monkeypatch, 0)
    with pytest.raises(WriteError, match="No space left"):
        atomic_write_safetensors(target, {"other": torch.ones(3)})
    assert target.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_a_photo_with_a_damaged_exif_block_decodes_without_warnings():
    """Pillow warns of a damaged EXIF block in two lines that name no file, once per photo of
    a batch (under ray, with colour codes); the pixels decode all the same."""
    import warnings

    exif = Image.Exif()
    exif[0x0112] = 6  # an orientation, so that the block is read
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((64, 48, 3), np.uint8)).save(buffer, "JPEG", exif=exif.tobytes())
    data = bytearray(buffer.getvalue())
    ifd = data.find(b"Exif\x00\x00") + 6
    data[ifd + 8:ifd + 10] = b"\xff\x7f"  # an entry count far past the block's end
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = Image.open(io.BytesIO(bytes(data)))
        ImageOps.exif_transpose(image)
        assert any("Corrupt EXIF" in str(warning.message) for warning in caught)  # (Pillow's own warning)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert sorted(decode_image(bytes(data), "damaged.jpg").shape) == [3, 48, 64]  # (turned where it could be read)
    assert not caught
