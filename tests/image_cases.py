"""Builds an image folder with every case a real photo dump throws at the catalog.

Usage from a test (``tests/`` is on ``sys.path`` when pytest collects a test file there)::

    from image_cases import make_case_folder
    expected = make_case_folder(tmp_path / "images")
    expected["rotated.jpg"].size   # (16, 32): EXIF orientation 6 swaps the stored 32×16

The expectations are written here from how each file is built, never from the code under test.
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# statuses of Case.status
OK = "ok"                  # catalogued, decodes
UNREADABLE = "unreadable"  # catalogued with a reason
IGNORED = "ignored"        # non-image file: counted, not catalogued
HIDDEN = "hidden"          # dot-file or inside a dot-folder: not catalogued
LINK_SKIPPED = "link_skipped"  # symlink that leaves the root or loops: reported


@dataclass(frozen=True)
class Case:
    """What a correct scan must say about one path (relative to the folder, POSIX form).

    ``reason``: a lower-case word that the human-readable reason must contain (unreadable files
    and skipped links). ``size``: (width, height) as loaded (after EXIF orientation). ``mode``:
    the file's original Pillow mode. ``pixel``: the expected RGB of ``load_rgb`` at (0, 0).
    """

    status: str
    reason: str | None = None
    size: tuple[int, int] | None = None
    mode: str | None = None
    pixel: tuple[int, int, int] | None = None


def _rgb(size, color=(200, 30, 30)) -> Image.Image:
    return Image.new("RGB", size, color)


def _save(img: Image.Image, path: Path, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def png_chunk(ctype: bytes, data: bytes) -> bytes:
    """One PNG chunk with a correct CRC."""
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(
        ">I", zlib.crc32(ctype + data) & 0xFFFFFFFF)


def bomb_png(width: int = 40000, height: int = 40000) -> bytes:
    """A valid-looking 8-bit grayscale PNG whose header claims ``width``×``height`` pixels.

    A few hundred bytes on disk: the IDAT holds only a few compressed rows.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1) * 2, 9)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def bad_crc_png() -> bytes:
    """A 16×16 PNG whose IDAT chunk's CRC field is flipped (pixel data intact)."""
    buf = io.BytesIO()
    _rgb((16, 16)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    pos = data.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", data[pos:pos + 4])
    crc_at = pos + 8 + length
    for i in range(4):
        data[crc_at + i] ^= 0xFF
    return bytes(data)


def truncated_jpeg() -> bytes:
    """A 64×64 noisy JPEG cut at 60 % of its bytes: header intact, scan data missing."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    return data[: len(data) * 6 // 10]


def rotated_jpeg(path: Path) -> None:
    """Stored 32×16 (left half red, right half blue) with EXIF orientation 6 (rotate 90° CW)."""
    img = _rgb((32, 16), (255, 0, 0))
    img.paste((0, 0, 255), (16, 0, 32, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    _save(img, path, "JPEG", exif=exif.tobytes(), quality=95)


def make_case_folder(root: str | os.PathLike) -> dict[str, Case]:
    """Create the case folder at ``root`` and return ``{relpath: Case}`` for every entry.

    Symlinks are created only where the platform allows; all paths are inside ``root`` except
    the targets of the two escaping links (``/etc`` and ``/etc/passwd``, only pointed at).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cases: dict[str, Case] = {}

    def good(rel: str, img: Image.Image, fmt: str, size=None, mode=None, pixel=None, **kw):
        _save(img, root / rel, fmt, **kw)
        cases[rel] = Case(OK, size=size or img.size, mode=mode or img.mode, pixel=pixel)

    # --- good formats and modes
    good("rgb.jpg", _rgb((24, 16), (0, 200, 0)), "JPEG", quality=95)
    good("gray.png", Image.new("L", (16, 12), 77), "PNG", pixel=(77, 77, 77))
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))   # fully transparent black -> white on load
    good("rgba.png", rgba, "PNG", pixel=(255, 255, 255))
    pal = Image.new("P", (12, 12), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    good("palette.png", pal, "PNG", pixel=(10, 20, 30))
    pal_t = Image.new("P", (12, 12), 0)
    pal_t.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    good("palette_transparent.png", pal_t, "PNG", transparency=0, pixel=(255, 255, 255))
    good("cmyk.jpg", Image.new("CMYK", (16, 16), (0, 0, 0, 0)), "JPEG", quality=95,
         pixel=(255, 255, 255))
    gray16 = Image.fromarray(np.full((8, 16), 65535, dtype=np.uint16))
    good("gray16.png", gray16, "PNG", mode="I;16", pixel=(255, 255, 255))
    frames = [Image.new("P", (10, 10), i) for i in range(3)]
    for f in frames:
        f.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    good("animated.gif", frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50,
         loop=0, pixel=(255, 0, 0))
    rotated_jpeg(root / "rotated.jpg")
    cases["rotated.jpg"] = Case(OK, size=(16, 32), mode="RGB")
    good("tiny.png", _rgb((1, 1)), "PNG")
    good("panorama.png", _rgb((2000, 20)), "PNG")
    good("photo.webp", _rgb((16, 16)), "WEBP", lossless=True, pixel=(200, 30, 30))
    good("bitmap.bmp", _rgb((16, 8)), "BMP", pixel=(200, 30, 30))
    good("scan.tiff", _rgb((8, 16)), "TIFF", pixel=(200, 30, 30))
    good("scan2.tif", Image.new("L", (8, 8), 5), "TIFF")
    good("UPPER.JPG", _rgb((16, 16)), "JPEG")
    good("Mixed.JpEg", _rgb((16, 16)), "JPEG")
    good("misnamed.png", _rgb((16, 16)), "JPEG")           # JPEG bytes under .png: fine
    good("ünïcødé name ✓.png", _rgb((9, 9)), "PNG")
    good("nested/deeper/leaf.png", _rgb((8, 8)), "PNG")
    good("nested/dir with space/x y.jpg", _rgb((16, 16)), "JPEG")

    # --- each bad kind
    bad = root / "bad"
    bad.mkdir()
    (bad / "truncated.jpg").write_bytes(truncated_jpeg())
    cases["bad/truncated.jpg"] = Case(UNREADABLE, reason="truncated")
    (bad / "empty.jpg").write_bytes(b"")
    cases["bad/empty.jpg"] = Case(UNREADABLE, reason="empty")
    (bad / "page.jpg").write_text("<!DOCTYPE html>\n<html><body>404 Not Found</body></html>\n")
    cases["bad/page.jpg"] = Case(UNREADABLE, reason="html")
    (bad / "badcrc.png").write_bytes(bad_crc_png())
    cases["bad/badcrc.png"] = Case(UNREADABLE, reason="crc")
    (bad / "bomb.png").write_bytes(bomb_png())
    cases["bad/bomb.png"] = Case(UNREADABLE, reason="decompression bomb")
    (bad / "noise.gif").write_bytes(np.random.default_rng(1).bytes(300))
    cases["bad/noise.gif"] = Case(UNREADABLE, reason="not an image")

    # --- hidden: skipped even though they are valid images
    _save(_rgb((8, 8)), root / ".hidden.jpg", "JPEG")
    cases[".hidden.jpg"] = Case(HIDDEN)
    _save(_rgb((8, 8)), root / ".cache" / "inside.png", "PNG")
    cases[".cache"] = Case(HIDDEN)
    cases[".cache/inside.png"] = Case(HIDDEN)

    # --- non-image files
    (root / "notes.txt").write_text("hello\n")
    cases["notes.txt"] = Case(IGNORED)
    (root / "meta.json").write_text("{}\n")
    cases["meta.json"] = Case(IGNORED)
    (root / "nested" / "README").write_text("no extension\n")
    cases["nested/README"] = Case(IGNORED)

    # --- symlinks
    os.symlink("/etc", root / "link_etc")
    cases["link_etc"] = Case(LINK_SKIPPED, reason="outside")
    os.symlink("/etc/passwd", root / "passwd.jpg")
    cases["passwd.jpg"] = Case(LINK_SKIPPED, reason="outside")
    os.symlink("..", root / "nested" / "loop")
    cases["nested/loop"] = Case(LINK_SKIPPED, reason="loop")
    os.symlink("rgb.jpg", root / "link_to_rgb.jpg")
    cases["link_to_rgb.jpg"] = Case(OK, size=(24, 16), mode="RGB")
    os.symlink("does-not-exist.png", root / "dangling.png")
    cases["dangling.png"] = Case(LINK_SKIPPED, reason="broken")
    return cases


def expected_counts(cases: dict[str, Case]) -> dict[str, int]:
    """Counts a first scan of the case folder must report."""
    def n(status):
        return sum(c.status == status for c in cases.values())

    return {"usable": n(OK), "unreadable": n(UNREADABLE), "ignored": n(IGNORED),
            "skipped_links": n(LINK_SKIPPED)}
