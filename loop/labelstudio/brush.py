"""Label Studio brush masks (``brushlabels`` regions) <-> pixel masks, with label-studio-sdk's
own RLE codec (`label_studio_sdk.converter.brush`).

A brush region's ``value.rle`` is a list of byte values: Label Studio's run-length code of the
image's RGBA pixels, row by row (``height x width x 4`` values, the first 32 bits their count).
The mask is the alpha channel; a pixel is painted where its alpha is at least
`ALPHA_THRESHOLD`. The pull rules (`loop.formats.labelstudio_pull`) get `rle_to_mask` handed in by
the gateway, so they stay free of the SDK.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from loop.errors import ConversionError

ALPHA_THRESHOLD = 128
# The largest image a brush mask is decoded for (pixels): the decoder allocates 4 bytes a pixel
# before it reads a run, so a region that claims a huge image is refused first. Above the pool's
# default `ingest.max_pixels` (40 M).
MAX_PIXELS = 64_000_000


def rle_to_mask(rle: Any, image_wh: tuple[int, int]) -> npt.NDArray[np.bool_]:
    """A brush region's ``rle`` -> its ``(height, width)`` bool mask on an image of
    ``image_wh`` pixels, decoded by `label_studio_sdk.converter.brush.decode_rle`.

    Raises `ConversionError` when ``rle`` is not a list of byte values, when the image is larger
    than `MAX_PIXELS`, when its header does not announce ``width x height x 4`` values (checked
    before decoding, so a forged header cannot make the decoder allocate more than the image),
    or when it does not decode.
    """
    from label_studio_sdk.converter.brush import decode_rle

    if not isinstance(rle, list) or len(rle) < 5:
        raise ConversionError("brush mask: rle must be a list of byte values")
    if not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in rle):
        raise ConversionError("brush mask: rle must hold whole numbers 0-255")
    w, h = image_wh
    if w * h > MAX_PIXELS:
        raise ConversionError(
            f"brush mask: a {w}x{h} image is larger than {MAX_PIXELS} pixels; not decoded"
        )
    announced = int.from_bytes(bytes(rle[:4]), "big")
    if announced != w * h * 4:
        raise ConversionError(
            f"brush mask: the RLE holds {announced} values, a {w}x{h} RGBA image has "
            f"{w * h * 4}; it was painted on another image: repaint it"
        )
    try:
        flat = decode_rle(rle)
    except (IndexError, ValueError, TypeError, OverflowError) as exc:
        raise ConversionError(f"brush mask: the RLE does not decode ({exc}); repaint it") from None
    if flat.size != w * h * 4:
        raise ConversionError(f"brush mask: decoded {flat.size} values, expected {w * h * 4}")
    alpha = np.asarray(flat, dtype=np.uint8).reshape(h, w, 4)[:, :, 3]
    return alpha >= ALPHA_THRESHOLD


def mask_to_rle(mask: npt.NDArray[np.generic]) -> list[int]:
    """A ``(height, width)`` mask (non-zero = painted) -> Label Studio brush ``rle`` by
    `label_studio_sdk.converter.brush.mask2rle` (every channel 255 where painted)."""
    from label_studio_sdk.converter.brush import mask2rle

    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ConversionError(f"a brush mask must be 2-D (height, width), got {arr.shape}")
    return [int(v) for v in mask2rle(np.where(arr != 0, 255, 0).astype(np.uint8))]
