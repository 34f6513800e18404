"""Just enough PNG decoding to look at a screenshot's pixels, with numpy and zlib only.

Chromium writes 8-bit RGB or RGBA PNGs with adaptive row filters; the project has no image
library, and the benchmark only needs the pixel values (to tell a blank page from a drawn one).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Colour type -> samples per pixel (grey, RGB, grey + alpha, RGBA).
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    if not data.startswith(SIGNATURE):
        raise ValueError("not a PNG")
    chunks, at = [], len(SIGNATURE)
    while at + 8 <= len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind = data[at + 4 : at + 8]
        chunks.append((kind, data[at + 8 : at + 8 + length]))
        at += 12 + length
        if kind == b"IEND":
            break
    return chunks


def _paeth(left: int, up: int, up_left: int) -> int:
    estimate = left + up - up_left
    to_left, to_up, to_corner = abs(estimate - left), abs(estimate - up), abs(estimate - up_left)
    if to_left <= to_up and to_left <= to_corner:
        return left
    return up if to_up <= to_corner else up_left


def _unfilter_sequential(kind: int, row: np.ndarray, prior: np.ndarray, bpp: int) -> np.ndarray:
    """Average (3) and Paeth (4) depend on the row's own decoded bytes: one byte at a time."""
    out = row.astype(np.int64).tolist()
    above = prior.astype(np.int64).tolist()
    for i in range(len(out)):
        left = out[i - bpp] if i >= bpp else 0
        if kind == 3:
            out[i] = (out[i] + (left + above[i]) // 2) & 0xFF
        else:
            corner = above[i - bpp] if i >= bpp else 0
            out[i] = (out[i] + _paeth(left, above[i], corner)) & 0xFF
    return np.array(out, dtype=np.uint8)


def _unfilter(kind: int, row: np.ndarray, prior: np.ndarray, bpp: int) -> np.ndarray:
    if kind == 0:
        return row
    if kind == 1:  # Sub: a running sum per channel
        sums = row.reshape(-1, bpp).astype(np.int64).cumsum(axis=0)
        return (sums & 0xFF).astype(np.uint8).reshape(-1)
    if kind == 2:  # Up
        return ((row.astype(np.int64) + prior) & 0xFF).astype(np.uint8)
    if kind in (3, 4):
        return _unfilter_sequential(kind, row, prior, bpp)
    raise ValueError(f"unknown PNG row filter {kind}")


def decode_png(data: bytes) -> np.ndarray:
    """The image as a ``uint8`` array of shape (height, width, channels).

    Only 8-bit, non-interlaced grey/RGB/grey-alpha/RGBA images (what Chromium writes);
    anything else is a :class:`ValueError`.
    """
    chunks = _chunks(data)
    if not chunks or chunks[0][0] != b"IHDR":
        raise ValueError("PNG without a header")
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    if depth != 8 or colour not in _CHANNELS or interlace:
        raise ValueError(f"unsupported PNG (depth {depth}, colour {colour}, interlace {interlace})")
    bpp = _CHANNELS[colour]
    raw = np.frombuffer(
        zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT")), np.uint8
    )
    stride = width * bpp + 1
    if raw.size < stride * height:
        raise ValueError("PNG image data is short")
    rows = raw[: stride * height].reshape(height, stride)
    image = np.zeros((height, width * bpp), dtype=np.uint8)
    prior = np.zeros(width * bpp, dtype=np.uint8)
    for y in range(height):
        prior = image[y] = _unfilter(int(rows[y, 0]), rows[y, 1:], prior, bpp)
    return image.reshape(height, width, bpp)


def pixel_variance(data: bytes) -> float:
    """The variance of the screenshot's pixels, per colour channel (alpha left out) and
    averaged over the channels.

    A blank page (one flat colour, whatever the colour) scores 0; a few lines of black text
    on white score tens to hundreds.
    """
    image = decode_png(data)
    channels = 3 if image.shape[2] >= 3 else 1
    colour = image[..., :channels].reshape(-1, channels).astype(np.float64)
    return float(colour.var(axis=0).mean())
