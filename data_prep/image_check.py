"""Decide what to store for one input image: its bytes as they are, or an RGB JPEG made from it.

Validation is structural by default, so sharding runs near the byte-copy limit: the header is parsed
(format, mode, size) and a JPEG must end with its end-of-image marker. Plain 8-bit grayscale or
colour JPEGs (nearly all of ImageNet) have their marker segments walked here, up to the start of
scan, for a fraction of the cost of PIL's header parse; anything else, or anything odd, goes through
PIL. ``full_decode`` decodes every image as well. JPEGs in RGB or grayscale are stored byte for
byte; CMYK JPEGs and other formats (a PNG named ``.JPEG``) are converted to RGB JPEG and flagged;
the optional resize re-encodes images whose shorter side exceeds the target.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from data_prep.sources import Reason

# A valid JPEG ends with FF D9; some writers pad a few bytes after it. Inside entropy-coded data FF is
# always followed by 00, so the marker cannot appear there by chance.
_EOI = b"\xff\xd9"
_EOI_SEARCH_BYTES = 1024
STORED_JPEG_MODES = ("RGB", "L")
# Magic numbers of JPEG, PNG, GIF, BMP, TIFF: a file that starts like an image but does not parse is
# damaged ("unreadable"), anything else is "not an image".
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")


# Start-of-frame markers: the ones taken on the fast path (baseline, extended, progressive Huffman) and
# all of them; the rest (lossless, hierarchical, arithmetic) are left to PIL.
_SOF_FAST = frozenset((0xC0, 0xC1, 0xC2))
_SOF_ANY = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE_MARKERS = frozenset((0x01, *range(0xD0, 0xD8)))
_START_OF_SCAN = 0xDA
# Segments a plain JPEG has before its scan: APP0-15, comment, quantisation and Huffman tables,
# restart interval. Any other marker sends the file to PIL.
_KNOWN_SEGMENTS = frozenset((*range(0xE0, 0xF0), 0xFE, 0xDB, 0xC4, 0xDD))


class RejectedImage(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    width: int
    height: int
    converted: bool   # re-encoded because the source was not an RGB/grayscale JPEG
    resized: bool


def has_end_marker(data: bytes) -> bool:
    return data.find(_EOI, max(0, len(data) - _EOI_SEARCH_BYTES)) >= 0


def jpeg_frame(data: bytes) -> tuple[int, int, str] | None:
    """(width, height, mode) of an 8-bit baseline or progressive JPEG with 1 (``L``) or 3 (``RGB``)
    components, from its marker segments up to the start of scan: every segment must be whole and
    chained. None for anything else (no SOI, junk between segments, CMYK, 12-bit, several frames, an
    MPO's extra images, ...): PIL's parser then decides, so this path only ever accepts what PIL does."""
    if not data.startswith(b"\xff\xd8"):
        return None
    pos, end, frame = 2, len(data), None
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _STANDALONE_MARKERS:
            pos += 2
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 2 or pos + 2 + length > end:
            return None
        if marker == _START_OF_SCAN:
            return frame
        if marker in _SOF_ANY:
            if marker not in _SOF_FAST or frame is not None or length < 8 or (length - 8) % 3:
                return None
            precision, components = data[pos + 4], data[pos + 9]
            height, width = (data[pos + 5] << 8) | data[pos + 6], (data[pos + 7] << 8) | data[pos + 8]
            if precision != 8 or components not in (1, 3) or not width or not height:
                return None
            if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:  # PIL's bomb check
                return None
            frame = (width, height, "L" if components == 1 else "RGB")
        elif marker not in _KNOWN_SEGMENTS or not _plain_segment(data, marker, pos + 4, length - 2):
            return None
        pos += 2 + length
    return None


def _plain_segment(data: bytes, marker: int, start: int, size: int) -> bool:
    """False for a segment PIL's header parser interprets in a way that can fail (or that makes the
    file something else than a plain JPEG): EXIF, Photoshop and multi-picture data, short JFIF, Adobe
    or ICC headers, quantisation tables that do not add up."""
    payload = data[start:start + min(size, 16)]
    if marker == 0xDB:  # DQT: tables of 1 + 64 x (1 or 2) bytes
        end, pos = start + size, start
        while pos < end:
            pos += 1 + 64 * (1 if data[pos] < 16 else 2)
        return pos == end
    if marker == 0xE1:
        return not payload.startswith(b"Exif\0\0")
    if marker == 0xE2:
        return not payload.startswith(b"MPF\0") and (not payload.startswith(b"ICC_PROFILE\0") or size >= 14)
    if marker == 0xED:
        return not payload.startswith(b"Photoshop 3.0\0")
    if (marker == 0xE0 and payload.startswith(b"JFIF")) or (marker == 0xEE and payload.startswith(b"Adobe")):
        return size >= 12
    return True


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(w, h) with the shorter side ``shorter``, aspect kept (torchvision's ``Resize(int)`` rule)."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def prepare_image(data: bytes, *, full_decode: bool = False, resize: int | None = None,
                  jpeg_quality: int = 95) -> StoredImage:
    """The image to store for ``data``; raises :class:`RejectedImage` with a reason when unusable."""
    if not data:
        raise RejectedImage(Reason.ZERO_BYTES)
    if not full_decode and (frame := jpeg_frame(data)) is not None and has_end_marker(data):
        width, height, _ = frame
        if resize is None or min(width, height) <= resize:
            return StoredImage(data, width, height, converted=False, resized=False)
    try:
        image = Image.open(io.BytesIO(data))
        fmt, mode, (width, height) = image.format, image.mode, image.size
    except UnidentifiedImageError:
        if data.startswith(_IMAGE_SIGNATURES) or data[8:12] == b"WEBP":
            raise RejectedImage(Reason.UNREADABLE, "image signature but a damaged header") from None
        raise RejectedImage(Reason.NOT_AN_IMAGE, "not a format PIL recognises") from None
    except Exception as err:  # noqa: BLE001 - any parser failure means the file is unusable
        raise RejectedImage(Reason.UNREADABLE, _describe(err)) from None
    if width < 1 or height < 1:
        raise RejectedImage(Reason.UNREADABLE, f"empty image {width}x{height}")
    is_jpeg = fmt == "JPEG"
    if is_jpeg and not has_end_marker(data):
        raise RejectedImage(Reason.TRUNCATED, "no JPEG end-of-image marker")
    convert = not is_jpeg or mode not in STORED_JPEG_MODES
    shrink = resize is not None and min(width, height) > resize
    if not (full_decode or convert or shrink):
        return StoredImage(data, width, height, converted=False, resized=False)

    target = resized_size(width, height, resize) if shrink else (width, height)
    try:
        if shrink and is_jpeg and mode in STORED_JPEG_MODES:
            image.draft(mode, target)  # DCT-domain downscale: decode at most 2x larger than needed
        image.load()
    except Exception as err:  # noqa: BLE001
        reason = Reason.TRUNCATED if "truncated" in str(err).lower() else Reason.UNREADABLE
        raise RejectedImage(reason, _describe(err)) from None
    if not (convert or shrink):
        return StoredImage(data, width, height, converted=False, resized=False)

    rgb = _to_rgb(image)
    if shrink:
        rgb = rgb.resize(target, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    # 4:4:4 chroma: a converted image should lose no more than the re-encoding has to.
    rgb.save(out, format="JPEG", quality=jpeg_quality, subsampling=0)
    return StoredImage(out.getvalue(), rgb.width, rgb.height, converted=convert, resized=shrink)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:300]
