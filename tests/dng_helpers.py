"""Writes small Adobe DNG files (DNG 1.4: a TIFF whose raw IFD holds Bayer-mosaic sensor values), so that the RAW
tests read real RAW files through LibRaw without shipping a camera's. rawpy reads RAW files but cannot write
them; the layout follows the DNG specification: IFD 0 holds the DNG tags and the orientation, and either the raw
data itself or a preview (NewSubFileType 1) with the raw data in a SubIFD."""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

BYTE, ASCII, SHORT, LONG, SRATIONAL = 1, 2, 3, 4, 10
_FORMATS = {BYTE: "B", ASCII: "B", SHORT: "H", LONG: "I", SRATIONAL: "i"}
WHITE_LEVEL = 4095  # 12-bit sensor values in 16-bit samples


def _dng_tags(orientation: int) -> dict:
    identity = [1, 1, 0, 1, 0, 1, 0, 1, 1, 1, 0, 1, 0, 1, 0, 1, 1, 1]  # ColorMatrix1 = I (9 rationals)
    return {271: (ASCII, b"mlx-aim\0"), 272: (ASCII, b"test camera\0"), 274: (SHORT, [orientation]),
            50706: (BYTE, [1, 4, 0, 0]), 50707: (BYTE, [1, 1, 0, 0]), 50708: (ASCII, b"mlx-aim test camera\0"),
            50721: (SRATIONAL, identity), 50778: (SHORT, [21])}  # CalibrationIlluminant1 = D65


def _raw_tags(cfa: np.ndarray, offset: int, subfile_type: int) -> dict:
    height, width = cfa.shape
    return {254: (LONG, [subfile_type]), 256: (LONG, [width]), 257: (LONG, [height]), 258: (SHORT, [16]),
            259: (SHORT, [1]), 262: (SHORT, [32803]), 273: (LONG, [offset]), 277: (SHORT, [1]), 278: (LONG, [height]),
            279: (LONG, [cfa.size * 2]), 284: (SHORT, [1]),
            33421: (SHORT, [2, 2]), 33422: (BYTE, [0, 1, 1, 2]),  # an RGGB Bayer pattern
            50714: (LONG, [0]), 50717: (LONG, [WHITE_LEVEL])}  # BlackLevel, WhiteLevel


def _preview_tags(preview: bytes, shape: tuple, jpeg: bool, offset: int) -> dict:
    height, width = shape[:2]
    return {254: (LONG, [1]), 256: (LONG, [width]), 257: (LONG, [height]), 258: (SHORT, [8, 8, 8]),
            259: (SHORT, [7 if jpeg else 1]), 262: (SHORT, [6 if jpeg else 2]),  # JPEG as YCbCr, or plain RGB
            273: (LONG, [offset]), 277: (SHORT, [3]), 278: (LONG, [height]), 279: (LONG, [len(preview)]),
            284: (SHORT, [1])}


class _Tiff:
    """A little-endian TIFF built front to back: blobs and IFDs appended, IFD 0's offset patched in last."""

    def __init__(self):
        self.data = bytearray(b"II*\0\0\0\0\0")

    def put(self, blob: bytes) -> int:
        if len(self.data) % 2:
            self.data += b"\0"  # TIFF offsets are even
        offset = len(self.data)
        self.data += blob
        return offset

    def put_ifd(self, tags: dict) -> int:
        start = self.put(b"")
        entries, extra = [], bytearray()
        values_start = start + 2 + 12 * len(tags) + 4
        for tag in sorted(tags):
            kind, values = tags[tag]
            raw = bytes(values) if kind == ASCII else struct.pack(f"<{len(values)}{_FORMATS[kind]}", *values)
            count = len(raw) if kind in (ASCII, BYTE) else len(values) // (2 if kind == SRATIONAL else 1)
            if len(raw) <= 4:
                field = raw.ljust(4, b"\0")
            else:
                field = struct.pack("<I", values_start + len(extra))
                extra += raw + (b"\0" if len(raw) % 2 else b"")
            entries.append(struct.pack("<HHI", tag, kind, count) + field)
        self.put(struct.pack("<H", len(tags)) + b"".join(entries) + b"\0\0\0\0" + bytes(extra))
        return start


def write_dng(path: Path, cfa: np.ndarray, preview: Optional[np.ndarray] = None, orientation: int = 1,
              jpeg_preview: bool = True) -> Path:
    """A DNG of the Bayer values `cfa` (HxW uint16, RGGB, white level 4095) with EXIF `orientation`; with
    `preview` (HxWx3 uint8) also an embedded preview, JPEG (quality 95, carrying the same EXIF orientation) or
    uncompressed RGB."""
    tiff = _Tiff()
    cfa_offset = tiff.put(np.ascontiguousarray(cfa, "<u2").tobytes())
    if preview is None:
        ifd0 = tiff.put_ifd({**_dng_tags(orientation), **_raw_tags(cfa, cfa_offset, 0)})
    else:
        raw_ifd = tiff.put_ifd(_raw_tags(cfa, cfa_offset, 0))
        if jpeg_preview:
            buffer = io.BytesIO()
            exif = Image.Exif()
            exif[0x0112] = orientation  # as cameras tag their previews: applied on top, the photo would turn twice
            Image.fromarray(preview).save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
            blob = buffer.getvalue()
        else:
            blob = np.ascontiguousarray(preview, np.uint8).tobytes()
        preview_offset = tiff.put(blob)
        ifd0 = tiff.put_ifd({**_dng_tags(orientation), **_preview_tags(blob, preview.shape, jpeg_preview,
                                                                        preview_offset), 330: (LONG, [raw_ifd])})
    tiff.data[4:8] = struct.pack("<I", ifd0)
    path.write_bytes(bytes(tiff.data))
    return path
