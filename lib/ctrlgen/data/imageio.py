"""Reading, checking and atomically writing images, masks and tables (PIL, numpy, pandas)."""
from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ctrlgen.data.errors import DataError
from ctrlgen.paths import make_public

MASK_THRESHOLD = 127  # masks are stored 0/255; anything above this is lesion
# What PIL raises for a file it cannot decode: not an image, a bad header, a truncated or corrupt body.
PIL_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageReadError(DataError):
    """An image or mask file that cannot be decoded; the message names the file and the reason."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


def decode_reason(err: BaseException, path: Path | str | None = None) -> str:
    """One-line reason for a PIL decoding error: "truncated file: ..." or "unreadable file: ..."."""
    text = str(err) or type(err).__name__
    said = text.replace(str(path), "") if path is not None else text  # classify PIL's words, not the file's name
    kind = "truncated file" if "truncated" in said.lower() or "broken" in said.lower() else "unreadable file"
    return f"{kind}: {text}"


def _decode(path: Path | str, convert):
    """Open ``path``, decode it fully and return ``convert(image)``; PIL errors become ImageReadError."""
    try:
        with Image.open(path) as im:
            im.load()  # the whole file, so a truncated body fails here and not deep inside a chapter
            return convert(im)
    except FileNotFoundError:
        raise ImageReadError(path, "no such file") from None
    except PIL_ERRORS as err:
        raise ImageReadError(path, decode_reason(err, path)) from err


def read_image(path: Path | str, mode: str = "RGB") -> np.ndarray:
    """Decode an image file to a uint8 array in ``mode`` (RGB -> (H, W, 3), L -> (H, W)).

    Raises ``ImageReadError`` (a ``DataError``) naming the file and why when it cannot be decoded.
    """
    return _decode(path, lambda im: np.asarray(im.convert(mode)))


def binarize(mask: np.ndarray) -> np.ndarray:
    """A boolean mask from a 0/255 (or 0/1, or RGB) mask array."""
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask.max(axis=-1)
    if mask.dtype == bool:
        return mask
    return mask > (MASK_THRESHOLD if mask.max(initial=0) > 1 else 0)


def read_mask(path: Path | str) -> np.ndarray:
    """Decode a binary mask file (PNG / BMP, 0/255 or 0/1) to a boolean array (H, W); ``ImageReadError`` if it cannot."""
    return _decode(path, lambda im: binarize(np.asarray(im.convert("L"))))


def image_size(path: Path | str) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels; ``ImageReadError`` if unreadable."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise ImageReadError(path, "no such file") from None
    except PIL_ERRORS as err:
        raise ImageReadError(path, decode_reason(err, path)) from err


def check_image(path: Path, is_mask: bool = False) -> tuple[str, tuple[int, int]]:
    """Decode ``path`` fully; return ("", (w, h)) when usable, else (reason, (0, 0)).

    Catches unreadable and truncated files (PIL raises on a short JPEG / PNG when decoding) and,
    for masks, an empty mask (no lesion pixel).
    """
    try:
        with Image.open(path) as im:
            im.load()
            size = im.size
            if is_mask and not binarize(np.asarray(im.convert("L"))).any():
                return "empty mask: no foreground pixel", size
            return "", size
    except PIL_ERRORS as err:
        return decode_reason(err, path), (0, 0)


def _atomic_write(path: Path, write: Callable[[Any], None], binary: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as handle:
            write(handle)
        make_public(tmp)  # usual umask permissions, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_image(path: Path, array: np.ndarray, quality: int = 95) -> None:
    """Write a uint8 array (or a bool mask, stored 0/255) atomically; the format follows the suffix."""
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    image = Image.fromarray(array)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP"}[path.suffix.lower()]
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    _atomic_write(path, lambda h: h.write(buffer.getvalue()))


def write_text(path: Path, text: str) -> None:
    """Write text atomically."""
    _atomic_write(path, lambda h: h.write(text), binary=False)


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=1, sort_keys=True, default=str))


def write_csv(path: Path, frame, **kwargs) -> None:
    """Write a pandas DataFrame as CSV atomically (gzip when the name ends in .gz)."""
    compression = "gzip" if path.suffix == ".gz" else None
    buffer = io.BytesIO()
    frame.to_csv(buffer, index=False, compression=compression, **kwargs)
    _atomic_write(path, lambda h: h.write(buffer.getvalue()))
