"""core.data.images: safe decoding of every allowed format and mode, and the pixel helpers.

All test images are made here, in memory, with Pillow.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from core.data import images
from core.data.images import ImageRejected, content_hash, decode_image, fit_square, png_data_url


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(size=(64, 48), mode="RGB", seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose header declares width x height 1-bit pixels (no real data needed:
    the decoder must refuse it from the header alone)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 16)) + png_chunk(b"IEND", b""))


def rejected_reason(data: bytes, name: str = "f") -> str:
    with pytest.raises(ImageRejected) as info:
        decode_image(data, name)
    assert info.value.name == name
    assert str(info.value) == f"{name}: {info.value.reason}"
    return info.value.reason


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_colour_formats_decode_to_rgb(fmt):
    im = Image.new("RGB", (30, 20), (200, 30, 40))
    px = decode_image(encode(im, fmt), f"a.{fmt.lower()}")
    assert px.dtype == np.uint8 and px.shape == (20, 30, 3)
    assert px.flags.writeable  # callers own the pixels (torch.from_numpy, augmentation)
    assert np.abs(px.astype(int) - [200, 30, 40]).max() <= 12  # lossy formats and GIF palette


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP"])
def test_grayscale_stays_one_channel(fmt):
    px = decode_image(encode(Image.new("L", (9, 7), 77), fmt), "g")
    assert px.shape == (7, 9, 1)
    assert abs(int(px[3, 3, 0]) - 77) <= 2


def test_one_bit_image_is_grayscale_0_or_255():
    im = Image.new("1", (8, 8), 0)
    im.putpixel((0, 0), 1)
    px = decode_image(encode(im, "PNG"), "bits.png")
    assert px.shape == (8, 8, 1) and px[0, 0, 0] == 255 and px[1, 1, 0] == 0


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    px = decode_image(data, "anim.gif")
    assert px.shape == (16, 16, 3)
    assert tuple(px[8, 8]) == (255, 0, 0)


def test_16_bit_png_is_scaled_not_clipped():
    arr = np.array([[0, 1000, 30000, 65535]], dtype=np.uint16)
    px = decode_image(encode(Image.fromarray(arr), "PNG"), "deep.png")
    assert px.shape == (1, 4, 1)
    # Clipping would give 255 for 1000 and 30000; scaling by range gives value / 257.
    assert px[0, :, 0].tolist() == [0, 4, 117, 255]


def test_cmyk_jpeg_becomes_rgb():
    im = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # full magenta + yellow = red
    px = decode_image(encode(im, "JPEG", quality=95), "print.jpg")
    assert px.shape == (16, 16, 3)
    r, g, b = px[8, 8].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_palette_png_with_transparency_composites_on_white():
    im = Image.new("P", (4, 4), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black, index 1 red
    im.putpixel((1, 1), 1)
    data = encode(im, "PNG", transparency=0)  # index 0 is transparent
    px = decode_image(data, "pal.png")
    assert px.shape == (4, 4, 3)
    assert tuple(px[0, 0]) == (255, 255, 255)  # transparent black became white, not black
    assert tuple(px[1, 1]) == (255, 0, 0)


def test_rgba_and_la_composite_on_white():
    rgba = Image.new("RGBA", (2, 2), (0, 0, 255, 0))
    rgba.putpixel((1, 1), (0, 0, 255, 255))
    px = decode_image(encode(rgba, "PNG"), "rgba.png")
    assert tuple(px[0, 0]) == (255, 255, 255) and tuple(px[1, 1]) == (0, 0, 255)
    la = decode_image(encode(Image.new("LA", (2, 2), (0, 128)), "PNG"), "la.png")
    assert la.shape == (2, 2, 1) and abs(int(la[0, 0, 0]) - 127) <= 1  # half black on white


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_is_applied(orientation):
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = orientation
    px = decode_image(encode(im, "JPEG", quality=95, exif=exif.tobytes()), "phone.jpg")
    assert px.shape == (40, 20, 3)  # stored 40 wide x 20 high; shown 20 wide x 40 high
    # 6 = rotate 90° clockwise to display: the left half goes to the top; 8: to the bottom.
    red_row = 5 if orientation == 6 else 35
    assert px[red_row, 10, 0] > 200 and px[red_row, 10, 2] < 60


@pytest.mark.parametrize("data", [b"hello, world", b"", b"\x89PNG\r\n\x1a\n"])
def test_not_an_image(data):
    assert "not a recognised image" in rejected_reason(data)


def test_formats_outside_the_list_are_refused():
    assert "not a recognised image" in rejected_reason(encode(Image.new("RGB", (4, 4)), "TIFF"))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_rejected(fmt):
    data = encode(noise((128, 128)), fmt)
    assert decode_image(data, "whole").shape == (128, 128, 3)
    assert rejected_reason(data[: len(data) // 2]) == "file is truncated or corrupt"


def test_decompression_bomb_is_refused_from_the_header():
    # 10000x5000 is over our 40 M cap but under Pillow's own threshold: our check names the size.
    data = bomb_png(10000, 5000)
    assert len(data) < 200
    assert rejected_reason(data, "bomb.png") == (
        "image is 10000×5000 pixels, over the 40 million pixel limit (decompression bomb?)")
    # 20000x20000 trips Pillow's error inside open(): still refused, with the pixel count.
    assert rejected_reason(bomb_png(20000, 20000)).endswith(
        "pixels, over the 40 million pixel limit (decompression bomb?)")


def test_pillow_bomb_warning_is_an_error(monkeypatch):
    # Our own cap out of the way: Pillow's warning (here at 1,000 pixels) must still refuse.
    monkeypatch.setattr(images, "MAX_PIXELS", 10**12)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    reason = rejected_reason(encode(Image.new("L", (40, 40)), "PNG"))
    assert "decompression bomb" in reason


def test_file_over_the_size_limit(monkeypatch):
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 2**20)
    data = b"\x89PNG" + bytes(int(2.5 * 2**20))
    assert rejected_reason(data, "big.png") == "file is 2.5 MB, over the 1 MB limit"


def test_size_message_matches_the_default_limit():
    assert images.size_reason(25 * 2**20) == "file is 25.0 MB, over the 20 MB limit"
    assert images.size_reason(images.MAX_FILE_BYTES) is None


def test_load_truncated_images_must_stay_off(monkeypatch):
    monkeypatch.setattr(images.ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError):
        decode_image(encode(Image.new("L", (2, 2)), "PNG"), "x")


def test_fit_square_keeps_channels_and_crops_the_centre():
    arr = np.zeros((30, 90, 3), np.uint8)
    arr[:, :30] = (255, 0, 0)
    arr[:, 30:60] = (0, 0, 255)
    arr[:, 60:] = (0, 255, 0)
    out = fit_square(arr, 10)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8 and out.flags.writeable
    assert tuple(out[5, 5]) == (0, 0, 255)
    assert out[:, :, 2].mean() > 230  # the red and green sides were cropped away
    tall = fit_square(np.full((50, 20, 1), 9, np.uint8), 8)
    assert tall.shape == (8, 8, 1) and (tall == 9).all()
    assert fit_square(np.zeros((3, 5, 1), np.uint8), 16).shape == (16, 16, 1)  # upscales too


def test_png_data_url_round_trips_gray_and_colour():
    for arr in (np.arange(12, dtype=np.uint8).reshape(3, 4, 1),
                np.arange(36, dtype=np.uint8).reshape(3, 4, 3)):
        url = png_data_url(arr)
        assert url.startswith("data:image/png;base64,")
        data = base64.b64decode(url.split(",", 1)[1])
        assert data == images.to_png_bytes(arr)
        assert np.array_equal(decode_image(data, "thumb.png"), arr)


def test_content_hash_follows_pixels_and_shape():
    a = np.arange(16, dtype=np.uint8).reshape(4, 4, 1)
    assert content_hash(a) == content_hash(a.copy())
    assert content_hash(a) != content_hash(a.reshape(2, 8, 1))
    b = a.copy()
    b[0, 0, 0] = 99
    assert content_hash(a) != content_hash(b)
    # The same picture saved as PNG and BMP decodes to the same pixels and so the same hash.
    im = noise((12, 10))
    assert (content_hash(decode_image(encode(im, "PNG"), "a"))
            == content_hash(decode_image(encode(im, "BMP"), "b")))
