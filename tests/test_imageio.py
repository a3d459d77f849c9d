"""imageio: every case of the case folder loads (or fails) as it should, with readable reasons."""
from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image, ImageFile, JpegImagePlugin

from image_cases import OK, UNREADABLE, bomb_png, make_case_folder
from selfclassifier_core.catalog.imageio import (
    IMAGE_EXTENSIONS, ImageInfo, ImageLoadError, is_image_name, load_rgb, probe)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("imageio") / "images"
    return root, make_case_folder(root)


def test_good_cases_load_as_rgb_with_expected_size_mode_and_pixel(cases):
    root, expected = cases
    good = {rel: c for rel, c in expected.items() if c.status == OK}
    assert len(good) >= 20
    for rel, case in good.items():
        img = load_rgb(root / rel)
        assert img.mode == "RGB", rel
        assert img.size == case.size, rel
        info = probe(root / rel)
        assert info == ImageInfo(case.size[0], case.size[1], case.mode), rel
        if case.pixel is not None:
            assert np.abs(np.subtract(img.getpixel((0, 0)), case.pixel)).max() <= 3, rel


def test_bad_cases_raise_with_human_reason(cases):
    root, expected = cases
    bad = {rel: c for rel, c in expected.items() if c.status == UNREADABLE}
    assert len(bad) >= 6
    for rel, case in bad.items():
        for fn in (probe, load_rgb):
            with pytest.raises(ImageLoadError) as info:
                fn(root / rel)
            assert case.reason in info.value.reason.lower(), (rel, info.value.reason)
            assert info.value.path == str(root / rel)
            assert "Traceback" not in info.value.reason


def test_reasons_are_specific(cases):
    root, _ = cases

    def reason(rel):
        with pytest.raises(ImageLoadError) as info:
            probe(root / rel)
        return info.value.reason

    assert reason("bad/empty.jpg") == "empty file (0 bytes)"
    assert reason("bad/page.jpg") == "not an image (looks like HTML/text)"
    assert reason("bad/truncated.jpg") == "truncated image"
    assert reason("bad/badcrc.png") == "corrupt PNG (bad CRC in IDAT chunk)"
    assert reason("bad/bomb.png").startswith("decompression bomb: header claims 40000×40000 pixels")


def test_exif_orientation_6_rotates_clockwise(cases):
    root, _ = cases
    img = load_rgb(root / "rotated.jpg")
    # stored 32×16, left half red / right half blue; rotated 90° clockwise -> top red, bottom blue
    assert img.size == (16, 32)
    top, bottom = np.asarray(img)[4, 8], np.asarray(img)[28, 8]
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    got = np.asarray(load_rgb(path))[0, :, 0]
    assert got.tolist() == [0, 64, 128, 255]
    # mode "I" (32-bit int holding 16-bit values, as older Pillow produced) is scaled the same
    path_i = tmp_path / "g32.tif"
    Image.fromarray(values.astype(np.int32), "I").save(path_i)
    assert Image.open(path_i).mode == "I"
    assert np.asarray(load_rgb(path_i))[0, :, 0].tolist() == [0, 64, 128, 255]


def test_semi_transparent_la_composited_on_white(tmp_path):
    la = Image.new("LA", (4, 4), (0, 128))  # black at 50 % alpha -> mid gray on white
    path = tmp_path / "la.png"
    la.save(path)
    value = load_rgb(path).getpixel((0, 0))
    assert all(120 <= v <= 135 for v in value), value


def test_animated_gif_gives_first_frame(cases):
    root, _ = cases
    with Image.open(root / "animated.gif") as im:
        assert getattr(im, "n_frames", 1) == 3
    assert load_rgb(root / "animated.gif").getpixel((5, 5)) == (255, 0, 0)


def test_bomb_is_refused_before_any_decoding(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(40000, 40000))
    assert path.stat().st_size < 1000

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageLoadError) as info:
        probe(path)
    assert "40000×40000" in info.value.reason and "limit" in info.value.reason


def test_max_pixels_limit_applies_to_small_images_too(tmp_path):
    path = tmp_path / "p.png"
    Image.new("RGB", (100, 50)).save(path)
    with pytest.raises(ImageLoadError, match=r"header claims 100×50 pixels \(limit 4,999\)"):
        load_rgb(path, max_pixels=4999)
    assert load_rgb(path, max_pixels=5000).size == (100, 50)
    # a bomb larger than Pillow's own limit is still decoded when the caller allows it
    big = tmp_path / "wide.png"
    big.write_bytes(bomb_png(200_000, 1))  # 200k px, fine; check the registry path separately
    assert probe(big, max_pixels=None) == ImageInfo(200_000, 1, "L")


def test_header_over_pillow_limit_reports_claimed_size(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses > 2000 px in open()
    path = tmp_path / "p.png"
    Image.new("L", (100, 30)).save(path)
    with pytest.raises(ImageLoadError, match="header claims 100×30"):
        probe(path, max_pixels=2999)
    assert probe(path, max_pixels=3000) == ImageInfo(100, 30, "L")


@pytest.mark.parametrize("max_side", [8, 64, 100])
def test_max_side_uses_draft_for_jpeg_and_bounds_longer_side(tmp_path, monkeypatch, max_side):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (400, 100), (10, 200, 10)).save(path, quality=90)
    decoded_sizes = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        decoded_sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    img = load_rgb(path, max_side=max_side)
    assert max(img.size) == max_side
    assert abs(img.size[0] / img.size[1] - 4) < 0.6
    # decoded at the smallest 1/2^k scale whose longer side is still >= max_side
    want = {8: (50, 13), 64: (100, 25), 100: (100, 25)}[max_side]
    assert decoded_sizes[0] == want
    assert img.getpixel((img.width // 2, img.height // 2))[1] > 180


def test_max_side_on_rotated_and_non_jpeg(cases):
    root, _ = cases
    assert load_rgb(root / "rotated.jpg", max_side=8).size == (4, 8)
    assert load_rgb(root / "panorama.png", max_side=100).size == (100, 1)
    assert load_rgb(root / "tiny.png", max_side=100).size == (1, 1)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "10", True])
def test_bad_arguments_raise_value_error_naming_value(tmp_path, bad):
    with pytest.raises(ValueError, match="max_side"):
        load_rgb(tmp_path / "x.png", max_side=bad)
    with pytest.raises(ValueError, match="max_pixels"):
        probe(tmp_path / "x.png", max_pixels=bad)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageLoadError, match="file not found") as info:
        load_rgb(tmp_path / "nope.jpg")
    assert isinstance(info.value.__cause__, FileNotFoundError)
    with pytest.raises(ImageLoadError, match="folder"):
        load_rgb(tmp_path)


def test_text_and_svg_reasons(tmp_path):
    (tmp_path / "a.png").write_text("just some notes\nwith two lines\n")
    (tmp_path / "b.jpg").write_text('<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>')
    with pytest.raises(ImageLoadError, match=r"not an image \(looks like HTML/text\)"):
        probe(tmp_path / "a.png")
    with pytest.raises(ImageLoadError, match="SVG"):
        probe(tmp_path / "b.jpg")


def test_truncated_png_reason(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buf, "PNG")
    (tmp_path / "t.png").write_bytes(buf.getvalue()[:-20])
    with pytest.raises(ImageLoadError, match="truncated"):
        probe(tmp_path / "t.png")


def test_error_pickles_with_path_and_reason():
    err = pickle.loads(pickle.dumps(ImageLoadError("/a/b.jpg", "truncated image")))
    assert (err.path, err.reason, str(err)) == ("/a/b.jpg", "truncated image",
                                               "/a/b.jpg: truncated image")


def test_extensions():
    assert IMAGE_EXTENSIONS == {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
    assert is_image_name("A.JPEG") and is_image_name("x.TiF") and not is_image_name("x.txt")
    assert not is_image_name("jpg")


# --------------------------------------------------------------------------- printable reasons
def test_printable_text_escapes_what_cannot_be_shown():
    from selfclassifier_core.catalog.imageio import printable_text

    assert printable_text(b"IDA\xc1") == "IDA\\xc1"                # an undecodable byte
    assert printable_text(b"caf\xc3\xa9") == "café"                # valid UTF-8 stays
    assert printable_text("f\udcff.png") == "f\\xff.png"           # surrogateescape'd byte
    assert printable_text("a\x00b\tc\x7f") == "a\\x00b\\x09c\\x7f"  # control characters
    assert printable_text("lost \ufffd byte, \u200b") == "lost \\ufffd byte, \\u200b"
    assert printable_text("plain text (ok) — 10×20") == "plain text (ok) — 10×20"
    once = printable_text("x\udcc1\x01")
    assert printable_text(once) == once                          # cleaning twice changes nothing
    err = ImageLoadError("/a.png", "cannot decode image: OSError: bad \x01\udcc1")
    assert err.reason == "cannot decode image: OSError: bad \\x01\\xc1"
    assert pickle.loads(pickle.dumps(err)).reason == err.reason


def _png_with_chunk(name: bytes, good_crc: bool) -> bytes:
    from image_cases import png_chunk

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buf, "PNG")
    data = buf.getvalue()
    chunk = png_chunk(name, b"xx")
    if not good_crc:
        chunk = chunk[:-4] + bytes(4)
    ihdr_end = 8 + 12 + 13          # signature, then IHDR: length, type, 13 bytes, CRC
    return data[:ihdr_end] + chunk + data[ihdr_end:]


def test_bad_crc_in_a_chunk_named_with_a_non_ascii_byte_is_printable(tmp_path):
    """The reason used to read ``bad CRC in IDA\ufffd chunk`` (the byte lost, a glyph shown)."""
    path = tmp_path / "odd.png"
    path.write_bytes(_png_with_chunk(b"IDA\xc1", good_crc=False))
    with pytest.raises(ImageLoadError) as info:
        probe(path)
    assert info.value.reason == "corrupt PNG (bad CRC in IDA\\xc1 chunk)"
    assert info.value.reason.isprintable()


def test_scan_stores_and_reports_printable_reasons(tmp_path):
    """Through the scanner: the stored reason, and a link whose target name is not UTF-8."""
    import os

    from selfclassifier_core.catalog.scanner import scan
    from selfclassifier_core.catalog.summary import catalog_summary

    root = tmp_path / "images"
    root.mkdir()
    (root / "odd.png").write_bytes(_png_with_chunk(b"IDA\xc1", good_crc=False))
    Image.new("RGB", (4, 4)).save(root / "fine.png")
    os.symlink(b"/nowhere/\xff.png", os.path.join(bytes(root), b"link.png"))
    report = scan(root, tmp_path / "ws", workers=1)
    assert catalog_summary(tmp_path / "ws").unreadable == [
        ("odd.png", "corrupt PNG (bad CRC in IDA\\xc1 chunk)")]
    assert report.skipped_links == [("link.png", "broken link (-> /nowhere/\\xff.png)")]
    text = report.summary()
    assert "\\xff" in text and "\ufffd" not in text
    text.encode("utf-8")                             # no lone surrogate left to crash a print
