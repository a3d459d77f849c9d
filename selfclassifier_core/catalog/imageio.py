"""Reading images: the one place where files from an image folder are decoded.

Everyone in the project reads images through :func:`load_rgb` (RGB, orientation applied, first
frame, 16-bit scaled, transparency on white) so that the catalog, the trainer, thumbnails and
exports all see the same pixels. :func:`probe` is the catalog's full check of one file.

Files come from arbitrary photo dumps, so every failure is turned into an :class:`ImageLoadError`
whose ``reason`` a person can act on ("truncated image", "empty file (0 bytes)", ...). The
image size in the header is checked against ``max_pixels`` *before* any pixel is decoded, so a
decompression bomb never allocates its claimed size.
"""
from __future__ import annotations

import io
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
"""Lower-case file extensions (with the dot) that the catalog treats as images."""

DEFAULT_MAX_PIXELS = 200_000_000
"""Largest image (width × height) decoded by default: 200 MP, ~600 MB as RGB."""

WHITE = (255, 255, 255)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# EXIF orientation -> the transpose that undoes it (as in PIL.ImageOps.exif_transpose).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112


def printable_text(text: str | bytes) -> str:
    """``text`` with every byte or character that cannot be shown written as an escape.

    Reasons end up in the database, on the terminal and in the app, so they must be plain
    printable text. Bytes are decoded as UTF-8, an undecodable byte becoming ``\\xNN``; in a
    string, a lone surrogate from ``surrogateescape`` (an undecodable byte of a file name) becomes
    ``\\xNN`` of that byte, and any other character that is not printable (control characters,
    other surrogates, U+FFFD left by an earlier lossy decode) its ``\\xNN``/``\\uNNNN`` escape.
    """
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", "backslashreplace")
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch.isprintable() and code != 0xFFFD:
            out.append(ch)
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        else:
            out.append(f"\\u{code:04x}")
    return "".join(out)


class ImageLoadError(Exception):
    """An image file cannot be used; ``reason`` says why in words (no traceback needed).

    The reason is cleaned with :func:`printable_text`: decoders' messages can carry raw bytes.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        reason = printable_text(reason)
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):  # picklable across worker processes despite the two-argument init
        return type(self), (self.path, self.reason)


@dataclass(frozen=True)
class ImageInfo:
    """What :func:`probe` found: size as loaded (EXIF orientation applied) and the file's mode."""

    width: int
    height: int
    mode: str


def load_rgb(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS,
             max_side: int | None = None) -> Image.Image:
    """Decode an image file into an RGB :class:`PIL.Image.Image`.

    EXIF orientation is applied, animations give their first frame, 16-bit images are scaled
    to 8 bits, transparency is composited on white and CMYK/palette/grayscale become RGB.

    Args:
        path: the image file.
        max_pixels: refuse images whose header claims more than this many pixels (checked
            before decoding); ``None`` for no limit.
        max_side: if given, the longer side of the result is at most this; JPEGs are then
            decoded at a reduced scale (``Image.draft``), which is much faster.

    Raises:
        ImageLoadError: the file is missing, empty, not an image, corrupt, truncated or too big.
        ValueError: ``max_pixels`` or ``max_side`` is not a positive integer.
    """
    _check_positive("max_pixels", max_pixels)
    _check_positive("max_side", max_side)
    image, _mode = _decode(Path(path), max_pixels, max_side)
    return image


def probe(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Fully decode ``path`` (the catalog's check) and return its loaded size and original mode.

    Raises :class:`ImageLoadError` exactly when :func:`load_rgb` would.
    """
    _check_positive("max_pixels", max_pixels)
    image, mode = _decode(Path(path), max_pixels, None)
    return ImageInfo(width=image.width, height=image.height, mode=mode)


def is_image_name(name: str) -> bool:
    """True if the file name has one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


# --------------------------------------------------------------------------- decoding
def _check_positive(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


def _decode(path: Path, max_pixels: int | None, max_side: int | None) -> tuple[Image.Image, str]:
    """Read, check and decode ``path``; return (RGB image, original mode)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ImageLoadError(path, "file not found") from exc
    except IsADirectoryError as exc:
        raise ImageLoadError(path, "is a folder, not a file") from exc
    except PermissionError as exc:
        raise ImageLoadError(path, "permission denied") from exc
    except OSError as exc:
        raise ImageLoadError(path, f"cannot read file ({exc.strerror or exc})") from exc
    if not data:
        raise ImageLoadError(path, "empty file (0 bytes)")
    if data.startswith(_PNG_SIGNATURE):
        problem = _png_problem(data)
        if problem:
            raise ImageLoadError(path, problem)

    try:
        im = _open(data, path)
    except ImageLoadError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageLoadError(path, _unidentified_reason(data)) from exc
    except Exception as exc:  # noqa: BLE001 - any decoder failure on untrusted input is a reason
        raise ImageLoadError(path, _failure_reason(exc, None)) from exc

    width, height = im.size
    if width < 1 or height < 1:
        raise ImageLoadError(path, f"invalid image size {width}×{height} in header")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(path, f"decompression bomb: header claims {width}×{height} pixels "
                                   f"(limit {max_pixels:,})")
    mode = im.mode
    fmt = im.format
    try:
        if max_side is not None and fmt == "JPEG":
            # Decode at 1/2, 1/4 or 1/8 scale while the longer side stays >= max_side.
            scale = max_side / max(width, height)
            if scale < 1:
                im.draft(None, (max(1, round(width * scale)), max(1, round(height * scale))))
        im.load()
        orientation = _orientation(im)
        rgb = _to_rgb(im)
    except MemoryError as exc:
        raise ImageLoadError(path, "too large to decode (out of memory)") from exc
    except Exception as exc:  # noqa: BLE001 - see above
        raise ImageLoadError(path, _failure_reason(exc, fmt)) from exc
    if orientation in _ORIENTATION:
        rgb = rgb.transpose(_ORIENTATION[orientation])
    if max_side is not None and max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return rgb, mode


def _open(data: bytes, path: Path) -> Image.Image:
    """``Image.open`` on the bytes, with Pillow's own bomb limit replaced by ours.

    Pillow refuses headers above 2 × ``Image.MAX_IMAGE_PIXELS`` inside ``open``; we open such
    files through the format registry instead (header only, nothing decoded) so that the caller
    can report the claimed size and apply its own ``max_pixels``.
    """
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        pass
    Image.init()
    prefix = data[:16]
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        if accept is not None and accept(prefix) is not True:
            continue
        try:
            return factory(io.BytesIO(data), str(path))
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue
    raise UnidentifiedImageError(f"cannot identify image file {path}")


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - broken EXIF must not make a decodable image unreadable
        log.debug("ignoring unreadable EXIF in %s", getattr(im, "filename", "image"))
        return 1


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB (transparency composited on white, 16-bit scaled to 8-bit)."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in _SIXTEEN_BIT_MODES:
        # Pillow's own I;16 -> L conversion clips at 255 instead of scaling: do it here.
        # Mode "I" is how Pillow has represented 16-bit images, so it is read as 0..65535 too.
        values = np.asarray(im).astype(np.float32)
        gray = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "F":
        values = np.asarray(im, dtype=np.float32)
        if values.size and np.nanmax(values) <= 1.0:
            values = values * 255.0
        gray = np.clip(np.nan_to_num(np.rint(values)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        alpha = rgba.getchannel("A")
        if alpha.getextrema() == (255, 255):
            return rgba.convert("RGB")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=alpha)
        return background
    return im.convert("RGB")


# --------------------------------------------------------------------------- reasons
def _png_problem(data: bytes) -> str | None:
    """Walk the PNG chunks and check their CRCs (Pillow skips the CRCs of image data)."""
    pos = len(_PNG_SIGNATURE)
    end = len(data)
    while True:
        if pos + 8 > end:
            return "truncated image (PNG ends before its IEND chunk)"
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        if pos + 12 + length > end:
            return "truncated image (PNG ends inside a chunk)"
        body = data[pos + 4:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        if zlib.crc32(body) & 0xFFFFFFFF != crc:
            return f"corrupt PNG (bad CRC in {printable_text(ctype)} chunk)"
        if ctype == b"IEND":
            return None
        pos += 12 + length


def _unidentified_reason(data: bytes) -> str:
    head = data[:1024]
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftyphevc", b"ftypavif"):
        return "unsupported format (HEIC/AVIF) saved under an image extension"
    if head.startswith(_PNG_SIGNATURE):
        return "corrupt PNG header"
    if head.startswith(b"\xff\xd8"):
        return "corrupt JPEG header"
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if b"<svg" in head.lower():
        return "not a raster image (looks like SVG)"
    if stripped.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")) or _is_text(head):
        return "not an image (looks like HTML/text)"
    return "not an image (unrecognised file format)"


def _is_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # a multi-byte character cut at the end of the sample is still text
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    printable = sum(ch.isprintable() or ch in "\t\r\n" for ch in text)
    return bool(text) and printable / len(text) > 0.95


def _failure_reason(exc: BaseException, fmt: str | None) -> str:
    msg = str(exc)
    what = fmt or "image"
    if isinstance(exc, Image.DecompressionBombError):
        return f"decompression bomb ({msg})"
    if isinstance(exc, EOFError) or "truncated" in msg.lower():
        return "truncated image"
    if isinstance(exc, zlib.error):
        return f"corrupt {what} (bad compressed data)"
    if "broken data stream" in msg:
        return f"corrupt {what} (broken data stream)"
    if isinstance(exc, SyntaxError):
        return f"corrupt {what} ({msg})"
    if isinstance(exc, ValueError) and "conversion" in msg:
        return f"unsupported colour mode ({msg})"
    return f"cannot decode {what}: {type(exc).__name__}: {msg}" if msg else \
        f"cannot decode {what}: {type(exc).__name__}"
