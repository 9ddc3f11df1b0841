"""JPEG decoders behind one function: Pillow, torchvision.io, simplejpeg, PyTurboJPEG.

Pillow's wheels link libjpeg-turbo too; the others skip Pillow's per-image object overhead.
`benchmarks/jpeg_decoders.py` measures them and checks their pixels against Pillow's: a decoder
is only used when it decodes to exactly Pillow's pixels, so the loader's and the cache's images
are the ones the PIL pipeline has always seen.
"""

from __future__ import annotations

import io
import logging
import warnings
from functools import cache

import numpy as np
from PIL import Image

from strongreid.errors import ConfigError

logger = logging.getLogger("strongreid")

DECODERS = ("auto", "pil", "torchvision", "simplejpeg", "turbojpeg")
JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")
# Preference when 'auto' picks among the installed ones (fastest measured first, see
# docs/data-path.md); each must match Pillow's pixels on a probe image to be chosen.
_AUTO_ORDER = ("simplejpeg", "turbojpeg", "torchvision")


def _pil(blob: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(blob)) as img:
        return np.asarray(img.convert("RGB"))


def _torchvision(blob: bytes) -> np.ndarray:
    import torch

    with warnings.catch_warnings():  # torchvision 0.29 announces its move to torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

    data = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    return decode_jpeg(data, mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()


def _simplejpeg(blob: bytes) -> np.ndarray:
    import simplejpeg

    return simplejpeg.decode_jpeg(blob, colorspace="RGB")


@cache
def _turbojpeg_handle():
    # PyTurboJPEG loads the system libturbojpeg (Debian: libturbojpeg0; PyTurboJPEG 2 needs
    # libjpeg-turbo 3, Debian 12 ships 2.1, so use PyTurboJPEG<2 there). None when unusable.
    try:
        import turbojpeg

        return turbojpeg.TurboJPEG(), turbojpeg.TJPF_RGB
    except Exception:
        return None


def _turbojpeg(blob: bytes) -> np.ndarray:
    handle, rgb = _turbojpeg_handle()
    # PyTurboJPEG reports libjpeg-turbo's recoverable errors (a truncated file: "Premature end of
    # JPEG file") as warnings and returns a grey-filled image; they must fail like Pillow does.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return handle.decode(blob, pixel_format=rgb)


_FUNCS = {"pil": _pil, "torchvision": _torchvision, "simplejpeg": _simplejpeg, "turbojpeg": _turbojpeg}


def available_decoders() -> list[str]:
    """The decoders importable here, Pillow first."""
    names = ["pil"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import torchvision.io  # noqa: F401

        names.append("torchvision")
    except ImportError:
        pass
    try:
        import simplejpeg  # noqa: F401

        names.append("simplejpeg")
    except ImportError:
        pass
    if _turbojpeg_handle() is not None:
        names.append("turbojpeg")
    return names


def decode_jpeg_bytes(blob: bytes, decoder: str = "pil") -> np.ndarray:
    """Decode JPEG bytes to an H x W x 3 uint8 RGB array with the named decoder."""
    return _FUNCS[decoder](blob)


def _probe_jpeg() -> bytes:
    # A small picture with edges and colour, 4:2:0 subsampled as most JPEGs: where decoders
    # that differ (IDCT, chroma upsampling) show it.
    y, x = np.mgrid[0:48, 0:24]
    arr = np.stack([(x * 11 + y * 3) % 256, (y * 7) % 256, ((x ^ y) * 13) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@cache
def resolve_decoder(name: str) -> str:
    """The decoder a DATALOADER.JPEG_DECODER value means here; 'auto' = the first installed one of
    simplejpeg, turbojpeg, torchvision whose pixels equal Pillow's, else Pillow."""
    if name not in DECODERS:
        raise ConfigError(f"DATALOADER.JPEG_DECODER = {name!r}: choose one of {', '.join(map(repr, DECODERS))}")
    installed = available_decoders()
    if name != "auto":
        if name not in installed:
            raise ConfigError(f"DATALOADER.JPEG_DECODER = {name!r} is not installed here "
                              f"(available: {', '.join(installed)}); pip install {name} or choose another")
        return name
    probe = _probe_jpeg()
    reference = _pil(probe)
    for candidate in _AUTO_ORDER:
        if candidate in installed:
            try:
                if np.array_equal(_FUNCS[candidate](probe), reference):
                    return candidate
            except Exception as exc:  # a broken install must not stop training: fall back
                logger.warning("JPEG decoder %s failed on a probe image (%s); not using it", candidate, exc)
    return "pil"
