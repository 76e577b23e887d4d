"""Image decoding and preprocessing: pure NumPy/PIL functions (SPEC 2).

Decoding conversions (documented and tested):
  * grayscale ("L", "1", "LA") -> 3 equal channels;
  * RGBA / LA -> the colour channels, alpha dropped (not composited: the alpha of scanned parts is
    not a matte, and compositing would invent a background colour);
  * palette ("P"), CMYK, YCbCr -> RGB via PIL;
  * 16-bit grayscale PNG ("I;16*", or "I" from older Pillow) -> 8 bit as round(v * 255 / 65535);
  * anything else (float images, ...) or a corrupt/truncated file -> `DataError` naming the file.
Resizing is PIL bilinear, which antialiases when it shrinks (torchvision's Resize on PIL images does
the same). Float images are HWC float32 in [0, 1] before `normalize`.
"""

from __future__ import annotations

import io
import pathlib
from typing import Sequence, Union

import numpy as np
from PIL import Image

from efficientad_jax.data.records import DataError

ImageSource = Union[str, pathlib.Path, bytes, np.ndarray]

# torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma), used by contrast and saturation.
_LUMA = np.array([0.2989, 0.587, 0.114], np.float32)


def _open(source: ImageSource, name: str) -> Image.Image:
  try:
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    image.load()  # decode now: a truncated file fails here, not later in a worker
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(f"{name}: corrupt, truncated or not an image ({type(e).__name__}: {e})"
                    ) from None
  return image


def _to_rgb_array(image: Image.Image, name: str) -> np.ndarray:
  mode = image.mode
  if mode.startswith("I;16") or mode == "I":
    # 16-bit grayscale: scale the full 16-bit range to 8 bits (PIL's convert("L") would clip).
    wide = np.asarray(image).astype(np.float64)
    gray = np.clip(np.round(wide * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  if mode in ("L", "1"):
    return np.repeat(np.asarray(image.convert("L"))[..., None], 3, axis=-1)
  if mode == "LA":
    return np.repeat(np.asarray(image)[..., :1], 3, axis=-1)
  if mode == "RGBA":
    return np.asarray(image)[..., :3].copy()
  if mode == "RGB":
    return np.asarray(image)
  if mode in ("P", "PA", "CMYK", "YCbCr", "RGBX", "LAB", "HSV"):
    return np.asarray(image.convert("RGB"))
  raise DataError(f"{name}: unsupported image mode {mode!r} (expected 8-bit gray/RGB/RGBA, "
                  "palette or 16-bit gray)")


def array_to_rgb(array: np.ndarray, name: str) -> np.ndarray:
  """An already decoded array (e.g. from a TFDS record) -> [H, W, 3] uint8, same conversions."""
  array = np.asarray(array)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim == 2:
    array = np.repeat(array[..., None], 3, axis=-1)
  if array.ndim != 3 or array.shape[-1] not in (3, 4):
    raise DataError(f"{name}: expected an [H, W], [H, W, 1|3|4] image, got shape {array.shape}")
  if array.dtype == np.uint16:
    array = np.round(array.astype(np.float64) * (255.0 / 65535.0))
  return np.clip(array[..., :3], 0, 255).astype(np.uint8)


def decode_image(source: ImageSource, name: str = "") -> np.ndarray:
  """Reads an image file, encoded bytes or array -> [H, W, 3] uint8 (conversions: module doc)."""
  name = name or (str(source) if isinstance(source, (str, pathlib.Path)) else "<image bytes>")
  if isinstance(source, np.ndarray):
    return array_to_rgb(source, name)
  return _to_rgb_array(_open(source, name), name)


def decode_gray(source: ImageSource, name: str = "") -> np.ndarray:
  """Reads a mask / ground-truth PNG -> [H, W] integer array of its raw values (no scaling)."""
  name = name or (str(source) if isinstance(source, (str, pathlib.Path)) else "<mask bytes>")
  if isinstance(source, np.ndarray):
    array = source
  else:
    image = _open(source, name)
    if image.mode == "P":
      image = image.convert("L")
    array = np.asarray(image)
  if array.ndim == 3:
    # An RGB(A) mask: a pixel is marked when any colour channel is (a colour-coded mask's max).
    array = array[..., :3].max(axis=-1)
  return array


def load_mask(source: ImageSource, image_hw: tuple[int, int], name: str = "") -> np.ndarray:
  """A ground-truth mask -> [H, W] bool (nonzero = anomalous); its size must match the image's."""
  mask = decode_gray(source, name)
  if mask.shape != tuple(image_hw):
    raise DataError(f"{name or 'mask'}: mask size {mask.shape} (H, W) differs from its image's "
                    f"{tuple(image_hw)}")
  return mask != 0


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """[H, W, 3] uint8 -> [size, size, 3] uint8, PIL bilinear with antialias (SPEC 2)."""
  if image.shape[:2] == (size, size):
    return image
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def to_float(image: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [0, 1]."""
  return image.astype(np.float32) / np.float32(255.0)


def normalize(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """(x - mean) / std per channel, [..., 3] float32 (ImageNet statistics by default, SPEC 2)."""
  return ((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)


def grayscale(x: np.ndarray) -> np.ndarray:
  """[H, W, 3] float -> [H, W] luma (torchvision weights)."""
  return x @ _LUMA


def adjust_brightness(x: np.ndarray, factor: float) -> np.ndarray:
  """torchvision: x * f, clipped to [0, 1]."""
  return np.clip(x * np.float32(factor), 0.0, 1.0)


def adjust_contrast(x: np.ndarray, factor: float) -> np.ndarray:
  """torchvision: blend with the mean of the grayscale image, f * x + (1 - f) * mean, clipped."""
  mean = grayscale(x).mean()
  return np.clip(np.float32(factor) * x + np.float32(1 - factor) * mean, 0.0, 1.0)


def adjust_saturation(x: np.ndarray, factor: float) -> np.ndarray:
  """torchvision: blend with the grayscale image, f * x + (1 - f) * gray, clipped."""
  gray = grayscale(x)[..., None]
  return np.clip(np.float32(factor) * x + np.float32(1 - factor) * gray, 0.0, 1.0)


JITTERS = (adjust_brightness, adjust_contrast, adjust_saturation)


def color_jitter(x: np.ndarray, rng: np.random.Generator, low: float, high: float) -> np.ndarray:
  """Autoencoder input (SPEC 2): ONE of brightness, contrast, saturation, factor U(low, high).

  Args:
    x: [H, W, 3] float32 in [0, 1] (before normalisation).
  Returns:
    [H, W, 3] float32 in [0, 1].
  """
  which = int(rng.integers(len(JITTERS)))
  factor = float(rng.uniform(low, high))
  return JITTERS[which](x, factor).astype(np.float32)


def penalty_image(image: np.ndarray, rng: np.random.Generator, resize_to: int, size: int,
                  gray_prob: float, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """Penalty input (SPEC 2): resize to resize_to^2, grayscale w.p. gray_prob, centre crop, normalise.

  Args:
    image: [H, W, 3] uint8.
  Returns:
    [size, size, 3] float32, normalised; grayscale images have 3 equal channels.
  """
  if size > resize_to:
    raise ValueError(f"penalty crop {size} is larger than penalty_resize {resize_to}")
  pil = Image.fromarray(image).resize((resize_to, resize_to), Image.BILINEAR)
  if rng.uniform() < gray_prob:
    pil = pil.convert("L").convert("RGB")  # torchvision RandomGrayscale on PIL: same luma
  top = int(round((resize_to - size) / 2.0))  # torchvision CenterCrop's offset
  crop = np.asarray(pil)[top:top + size, top:top + size]
  return normalize(to_float(crop), mean, std)
