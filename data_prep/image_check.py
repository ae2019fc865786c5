"""Decide what to store for one input image: its bytes as they are, or an RGB JPEG made from it.

Validation is structural by default, so sharding runs near the byte-copy limit: the header is parsed
(format, mode, size) and a JPEG must end with its end-of-image marker. ``full_decode`` decodes every
image as well. JPEGs in RGB or grayscale are stored byte for byte; CMYK JPEGs and other formats (a
PNG named ``.JPEG``) are converted to RGB JPEG and flagged; the optional resize re-encodes images
whose shorter side exceeds the target.
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
