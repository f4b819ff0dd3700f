"""Encoded image bytes -> a uint8 RGB tensor [3, H, W], refusing what would crash or exhaust
the process instead of decoding it.

JPEG (and the other formats torchvision reads) goes through torchvision's decoders
(libjpeg-turbo), the fast path every loader in the project shares. PNG does not: under
torchvision, every libpng error (image data that ends early, a chunk whose checksum does not
match...) ends the whole process with a segfault, with `data.bad_images=skip` too, and every
resume meets the same file again (found by tests/fuzz.py). PNGs are checked here (chunk
checksums, image data inflated to exactly the size the header needs, bounded by it) and decoded
by Pillow, which raises instead; the pixels are the same (PNG is lossless). And a small file
can declare a 30000 x 30000 image that takes gigabytes to decode: every header's size is
refused above `data.max_pixels` before anything is decoded. What fails raises
UnreadableImage, which the unreadable-image policy counts and names."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

# samples per pixel of each PNG colour type (grey, RGB, palette, grey+alpha, RGBA)
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# Adam7 interlacing: (x0, y0, dx, dy) of each pass
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2))
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class UnreadableImage(ValueError):
    """A file that is not decoded: corrupt, truncated, or larger than allowed."""


def image_header(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """(format, height, width) from the header alone; raises UnreadableImage."""
    if not data:
        raise UnreadableImage("the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                kind = image.format or "unknown"
    except Image.DecompressionBombError as err:  # PIL's own limit, above any sane one
        raise UnreadableImage(f"it declares more pixels than data.max_pixels={max_pixels:,} "
                              f"({err})") from None
    except Exception as err:  # noqa: BLE001 (PIL raises many kinds for a bad header)
        raise UnreadableImage(f"not an image PIL can read ({type(err).__name__})") from None
    return kind, height, width


def check_decodable(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(height, width) of a file the decoders can safely decode; raises UnreadableImage."""
    if data.startswith(_PNG_SIGNATURE):  # read here: PIL's own limit would speak first
        return _check_png(data, max_pixels)
    _, height, width = image_header(data, max_pixels)
    _check_pixels(height, width, max_pixels)
    return height, width


def _check_pixels(height: int, width: int, max_pixels: int) -> None:
    if height * width > max_pixels:
        raise UnreadableImage(f"it declares {width} x {height} = {height * width:,} pixels, "
                              f"above data.max_pixels={max_pixels:,}")


def decode_rgb(data: bytes, max_pixels: int) -> torch.Tensor:
    """uint8 [3, H, W] of an encoded image, after check_decodable."""
    check_decodable(data, max_pixels)
    if data.startswith(_PNG_SIGNATURE):
        return _decode_png(data)
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                            mode=ImageReadMode.RGB)
    except RuntimeError as err:
        raise UnreadableImage(str(err).splitlines()[0][:200]) from None


def _decode_png(data: bytes) -> torch.Tensor:
    """A checked PNG through Pillow: 16-bit grey keeps its 8 high bits (Pillow's RGB
    conversion would clip it), everything else is Pillow's conversion to RGB."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode.startswith("I"):
                grey = (np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8)
                rgb = np.repeat(grey[:, :, None], 3, axis=2)
            else:
                rgb = np.asarray(image.convert("RGB"))
    except Exception as err:  # noqa: BLE001 (Pillow raises OSError, SyntaxError, ValueError)
        raise UnreadableImage(f"the PNG does not decode ({type(err).__name__}: "
                              f"{str(err)[:120]})") from None
    return torch.from_numpy(np.array(rgb, copy=True)).permute(2, 0, 1).contiguous()


def _check_png(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(height, width) of a PNG whose header is valid, whose size is within `max_pixels` and
    whose image data inflates to exactly what that size needs (libpng aborts the process
    when there is less)."""
    position, header, compressed = len(_PNG_SIGNATURE), None, []
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        body = data[position + 8:position + 8 + length]
        if len(body) < length or position + 12 + length > len(data):
            raise UnreadableImage("the PNG is truncated")
        (crc,) = struct.unpack(">I", data[position + 8 + length:position + 12 + length])
        critical = kind[:1].isupper()  # libpng only warns about an ancillary chunk's
        if critical and zlib.crc32(kind + body) & 0xFFFFFFFF != crc:
            raise UnreadableImage(f"the PNG's {kind.decode('latin-1')!r} chunk is corrupt "
                                  "(checksum mismatch)")
        if kind == b"IHDR" and header is None and not compressed:
            header = body
        elif kind == b"IDAT":
            compressed.append(body)
        elif kind == b"IEND":
            break
        position += 12 + length
    else:
        raise UnreadableImage("the PNG has no IEND chunk (truncated)")
    if header is None or len(header) != 13:
        raise UnreadableImage("the PNG has no valid IHDR chunk")
    width, height = struct.unpack(">II", header[:8])
    _check_pixels(height, width, max_pixels)
    depth, colour, interlace = header[8], header[9], header[12]
    if colour not in _PNG_CHANNELS or depth not in (1, 2, 4, 8, 16):
        raise UnreadableImage("the PNG's IHDR chunk is invalid")
    bits = depth * _PNG_CHANNELS[colour]
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    expected = 0
    for x0, y0, dx, dy in passes:
        pass_width, pass_height = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if pass_width > 0 and pass_height > 0:
            expected += pass_height * (1 + -(-pass_width * bits // 8))
    inflater = zlib.decompressobj()
    try:
        inflated = len(inflater.decompress(b"".join(compressed), expected + 1))
    except zlib.error as err:
        raise UnreadableImage(f"the PNG's image data is corrupt ({err})") from None
    if inflated != expected:
        raise UnreadableImage(f"the PNG's image data holds {inflated:,} bytes where its size "
                              f"needs {expected:,} (truncated or corrupt)")
    return height, width
