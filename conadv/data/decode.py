"""Encoded image bytes -> a uint8 RGB tensor [3, H, W], refusing what would crash or exhaust
the process instead of decoding it.

JPEG goes through torchvision's decoder (libjpeg-turbo), the fast path every loader in the
project shares. Every other format goes through Pillow, after checks. PNG especially: under
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

# samples per pixel of each PNG colour type (grey, RGB, palette, grey+alpha, RGBA), and the
# bit depths the PNG standard allows for it
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_INFLATE_PIECE = 1 << 20
# Adam7 interlacing: (x0, y0, dx, dy) of each pass
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2))
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8"


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
    if not data.startswith(_JPEG_SIGNATURE):
        return _decode_with_pillow(data)
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                            mode=ImageReadMode.RGB)
    except RuntimeError as err:
        raise UnreadableImage(str(err).splitlines()[0][:200]) from None


def _decode_with_pillow(data: bytes) -> torch.Tensor:
    """A checked PNG (or GIF, WEBP...: torchvision's GIF decoder writes later frames out of
    bounds) through Pillow, first frame only: 16-bit grey keeps its 8 high bits (Pillow's RGB
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
        raise UnreadableImage(f"it does not decode ({type(err).__name__}: "
                              f"{str(err)[:120]})") from None
    return torch.from_numpy(np.array(rgb, copy=True)).permute(2, 0, 1).contiguous()


def _check_png(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(height, width) of a PNG that libpng would read too (so that DALI's decoder and this
    one skip the same files): IHDR first and once, with a valid depth for its colour type and
    standard compression, filter and interlace methods; a palette before the image data of a
    palette image; the image data in consecutive chunks, inflating to exactly what the size
    needs, every row with a known filter; no critical chunk this decoder does not know; each
    critical chunk's checksum right. The size is checked against `max_pixels` before any
    inflating, and inflating goes in bounded pieces (never the whole image at once)."""
    chunks = list(_png_chunks(data))
    if not chunks or chunks[0][0] != b"IHDR" or len(chunks[0][1]) != 13:
        raise UnreadableImage("the PNG does not start with a valid IHDR chunk")
    header = chunks[0][1]
    width, height = struct.unpack(">II", header[:8])
    depth, colour, compression, filtering, interlace = header[8:13]
    if width == 0 or height == 0 or depth not in _PNG_DEPTHS.get(colour, ()) or (
            compression, filtering) != (0, 0) or interlace not in (0, 1):
        raise UnreadableImage("the PNG's IHDR chunk is invalid")
    _check_pixels(height, width, max_pixels)
    kinds = [kind for kind, _ in chunks]
    unknown = {k for k in kinds if k[:1].isupper()} - {b"IHDR", b"PLTE", b"IDAT", b"IEND"}
    first_data = kinds.index(b"IDAT") if b"IDAT" in kinds else -1
    if (kinds.count(b"IHDR") != 1 or first_data < 0 or unknown
            or kinds[first_data:first_data + kinds.count(b"IDAT")] != [b"IDAT"] * kinds.count(
                b"IDAT")
            or (colour == 3 and b"PLTE" not in kinds[:first_data])):
        raise UnreadableImage("the PNG's chunks are out of order, missing or unknown")
    _check_image_data([body for kind, body in chunks if kind == b"IDAT"], width, height,
                      depth * _PNG_CHANNELS[colour], interlace)
    return height, width


def _png_chunks(data: bytes):
    """(kind, body) of each chunk up to IEND, checksums of critical chunks checked."""
    position = len(_PNG_SIGNATURE)
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        end = position + 12 + length
        if end > len(data):
            raise UnreadableImage("the PNG is truncated")
        body = data[position + 8:end - 4]
        (crc,) = struct.unpack(">I", data[end - 4:end])
        if kind[:1].isupper() and zlib.crc32(kind + body) & 0xFFFFFFFF != crc:
            raise UnreadableImage(f"the PNG's {kind.decode('latin-1')!r} chunk is corrupt "
                                  "(checksum mismatch)")  # libpng only warns for others
        yield kind, body
        if kind == b"IEND":
            return
        position = end
    raise UnreadableImage("the PNG has no IEND chunk (truncated)")


def _check_image_data(compressed: list[bytes], width: int, height: int, bits: int,
                      interlace: int) -> None:
    """The image data inflates, in pieces of at most _INFLATE_PIECE bytes, to exactly the
    rows the size needs, each starting with a filter type libpng knows (0-4)."""
    row_starts, expected = [], 0
    for x0, y0, dx, dy in (_ADAM7 if interlace else ((0, 0, 1, 1),)):
        pass_width, pass_height = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if pass_width > 0 and pass_height > 0:
            row = 1 + -(-pass_width * bits // 8)
            row_starts.append((expected, row, pass_height))
            expected += pass_height * row
    inflater, seen, pending = zlib.decompressobj(), 0, b"".join(compressed)
    try:
        while True:
            piece = inflater.decompress(pending, _INFLATE_PIECE)
            pending = inflater.unconsumed_tail
            _check_filters(piece, seen, row_starts)
            seen += len(piece)
            if seen > expected:
                break
            if not piece and not pending:
                break
    except zlib.error as err:
        raise UnreadableImage(f"the PNG's image data is corrupt ({err})") from None
    if seen != expected:
        raise UnreadableImage(f"the PNG's image data holds {'more than ' * (seen > expected)}"
                              f"{seen:,} bytes where its size needs {expected:,} (truncated "
                              "or corrupt)")


def _check_filters(piece: bytes, offset: int, row_starts: list[tuple[int, int, int]]) -> None:
    """Every row start inside `piece` (which begins at `offset` of the inflated data) holds a
    filter type from 0 to 4."""
    end = offset + len(piece)
    for start, row, rows in row_starts:
        last = start + row * (rows - 1)
        if end <= start or offset > last:
            continue
        first = start + max(0, -(-(offset - start) // row)) * row
        for at in range(first, min(end, last + 1), row):
            if piece[at - offset] > 4:
                raise UnreadableImage("the PNG's image data has a row of an unknown filter "
                                      "type (corrupt)")
