"""Odd-but-valid frames decode to upright RGB; broken ones give a clear DecodeError (issue 9)."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mining.decode import DecodeError, decode_image

FIX = Path(__file__).parent / "fixtures"


def _read(name):
    return (FIX / name).read_bytes()


@pytest.mark.parametrize("name", ["odd/gray16.png", "odd/gray8.png", "odd/rgba.png", "odd/palette.png", "odd/cmyk.jpg", "odd/tiny.png"])
def test_odd_formats_decode_to_rgb_uint8(name):
    arr = decode_image(_read(name))
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    assert arr.flags.writeable


def test_sixteen_bit_png_keeps_its_dynamic_range():
    arr = decode_image(_read("odd/gray16.png"))
    raw = np.asarray(Image.open(FIX / "odd/gray16.png")).astype(np.int64)
    assert raw.max() > 255  # the fixture really is 16-bit
    # 16-bit values are v*257; the top byte gives back v
    assert np.abs(arr[..., 0].astype(int) - (raw >> 8)).max() <= 1
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    assert arr.max() > 150  # not collapsed to black by a naive cast


def test_cmyk_jpeg_colours_are_not_inverted():
    arr = decode_image(_read("odd/cmyk.jpg"))
    h, w = arr.shape[:2]
    sign = arr[int(h * 0.3), int(w * 0.75)]
    assert sign[0] > 150 and sign[1] < 100 and sign[2] < 100, sign  # the red disc stays red


def test_exif_orientation_applied_before_selection():
    arr = decode_image(_read("odd/exif_rot90.jpg"))
    assert arr.shape[:2] == (320, 200)  # stored 320x200 landscape, orientation 6 -> upright portrait
    # the red disc, top-right-ish in the stored frame, lands bottom-right after a 90° CW turn
    red = (arr[..., 0] > 150) & (arr[..., 1] < 100)
    ys, xs = np.nonzero(red)
    assert ys.mean() > 320 * 0.6 and xs.mean() > 200 * 0.55


def test_rgba_alpha_composited():
    arr = decode_image(_read("odd/rgba.png"))
    src = np.asarray(Image.open(FIX / "odd/rgba.png"))
    expect = (src[..., :3].astype(int) * 200 + 127) // 255
    assert np.abs(arr.astype(int) - expect).max() <= 2


@pytest.mark.parametrize("name,needle", [
    ("broken/zero_bytes.jpg", "empty file"),
    ("broken/truncated.jpg", "truncated"),
    ("broken/not_an_image.jpg", "not an image"),
    ("broken/bomb.png", "decompression bomb"),
])
def test_broken_inputs_give_clear_reasons(name, needle):
    with pytest.raises(DecodeError) as ei:
        decode_image(_read(name))
    assert needle in ei.value.reason


def test_pixel_limit_is_a_parameter():
    data = _read("odd/tiny.png")  # 40x30 = 1200 px
    assert decode_image(data, max_pixels=1200).shape == (30, 40, 3)
    with pytest.raises(DecodeError):
        decode_image(data, max_pixels=1199)
