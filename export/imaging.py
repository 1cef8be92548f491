"""The one image decoder: file bytes -> uint8 (C, H, W) exactly as the model card's input
spec says. Training (`trainer/data/image_folder.py`), `trainer predict` and every other
runtime call this function, so a model is served the pixels it was trained on.

Torch-free (pillow + numpy). The steps, in order, and recorded in the card so another
runtime can reproduce them:
1. decode; a header declaring more than `MAX_PIXELS` pixels is refused before any pixel
   is allocated (decompression bombs);
2. apply the EXIF orientation (a phone photo stored sideways is turned upright);
3. reduce the bit depth to 8 bits by scaling (16-bit 0..65535 -> 0..255, value / 257
   rounded), never by truncation;
4. convert to the colour mode: palette images are expanded, CMYK is converted by pillow,
   an alpha channel is dropped (not composited), RGB -> L uses ITU-R 601-2 luma;
5. resize to (H, W) with pillow's antialiased bilinear filter when the size differs.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np

from export.card import InputSpec
from export.errors import InputError

MAX_PIXELS = 64_000_000  # 8000 x 8000; larger headers are refused as decompression bombs
# What `decode` does, stored in the card's input spec (`preprocessing`).
PREPROCESSING = {"decoder": "pillow", "exif_orientation": True, "bit_depth": "scaled to 8",
                 "alpha": "dropped", "resample": "bilinear (antialiased, pillow)"}


def _to_8bit(img):
    """16/32-bit integer and float greyscale modes -> 8-bit 'L' by scaling to their depth."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        depth = 65535.0
    elif img.mode == "I":  # 32-bit container; PNG 16-bit greyscale decodes to it
        depth = 65535.0
    elif img.mode == "F":
        depth = 1.0
    else:
        return img
    arr = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(arr * (255.0 / depth)), 0, 255).astype(np.uint8), "L")


@contextlib.contextmanager
def _opened(data: bytes, source: str):
    """The decoded, upright image; every decoding failure becomes one InputError line."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > MAX_PIXELS:  # known from the header alone
                    raise InputError(f"{source}: image is {img.width}x{img.height} pixels, more "
                                     f"than the {MAX_PIXELS:,} allowed (decompression bomb?)")
                yield ImageOps.exif_transpose(img)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{source}: refused as a decompression bomb ({exc})") from None
    except UnidentifiedImageError:  # its message quotes a BytesIO address, not the file
        raise InputError(f"{source}: cannot decode image (not a PNG, JPEG or other format "
                         "pillow reads)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{source}: cannot decode image ({exc})") from None


def decode(data: bytes, spec: InputSpec, source: str) -> np.ndarray:
    """Bytes of a PNG/JPEG (any format pillow reads) -> uint8 (C, H, W) per `spec`
    (`shape` [C, H, W] and `color_mode` L or RGB). `source` names the file in errors."""
    from PIL import Image

    channels, height, width = spec.shape
    mode = spec.color_mode or ("L" if channels == 1 else "RGB")
    with _opened(data, source) as img:
        img = _to_8bit(img)
        if img.mode in ("P", "PA"):
            img = img.convert("RGBA")
        if img.mode != mode:
            if mode == "L" and img.mode not in ("RGB", "RGBA", "LA"):
                img = img.convert("RGB")  # CMYK, YCbCr, ... -> RGB -> L
            img = img.convert(mode)
        if img.size != (width, height):
            img = img.resize((width, height), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def image_mode_and_size(data: bytes, source: str) -> tuple[str, tuple[int, int]]:
    """Colour mode (L or RGB) and (H, W) an image decodes to by default: what a training
    folder's first image decides when no size or mode is configured."""
    with _opened(data, source) as img:
        grey = img.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
        return ("L" if grey else "RGB"), (img.height, img.width)
