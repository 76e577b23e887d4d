"""Image decoding and preprocessing: pure NumPy/PIL functions (docs/method.md §4.1).

Decoding conversions (documented and tested):
  * grayscale ("L", "1", "LA") -> 3 equal channels;
  * RGBA / LA -> the colour channels, alpha dropped (not composited: the alpha of scanned parts is
    not a matte, and compositing would invent a background colour);
  * palette ("P"), CMYK, YCbCr -> RGB via PIL;
  * 16-bit grayscale PNG ("I;16*", or "I" from older Pillow) -> 8 bit as round(v * 255 / 65535);
  * anything else (float images, ...) or a corrupt/truncated file -> `DataError` naming the file.
Resizing is PIL bilinear, which antialiases when it shrinks (torchvision's Resize on PIL images does
the same). Float images are HWC float32 in [0, 1] before `normalize`. The autoencoder's colour jitter
and the penalty's grayscale work on uint8 images through PIL, exactly as torchvision does on PIL images.
"""

from __future__ import annotations

import io
import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageStat

from efficientad_jax.config import ImageSize
from efficientad_jax.data.records import DataError

ImageSource = str | pathlib.Path | bytes | np.ndarray


def _open(source: ImageSource, name: str) -> Image.Image:
  try:
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    image.load()  # decode now: a truncated file fails here, not later in a worker
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(f"{name}: corrupt, truncated or not an image ({type(e).__name__}: {e})") from None
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
  raise DataError(f"{name}: unsupported image mode {mode!r} (expected 8-bit gray/RGB/RGBA, palette or 16-bit gray)")


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
    raise DataError(f"{name or 'mask'}: mask size {mask.shape} (H, W) differs from its image's {tuple(image_hw)}")
  return mask != 0


def resize(image: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
  """[H, W, 3] uint8 -> [h, w, 3] uint8 for size (h, w) (an int: a square), PIL bilinear with antialias
  (docs/method.md §4.1)."""
  h, w = ImageSize(size)
  if image.shape[:2] == (h, w):
    return image
  return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def to_float(image: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [0, 1]."""
  return image.astype(np.float32) / np.float32(255.0)


def normalize(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """(x - mean) / std per channel, [..., 3] float32 (ImageNet statistics by default, docs/method.md §4.1)."""
  return ((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)


def network_input(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 [..., 3] (an image or a batch) -> float32, scaled to [0, 1], then normalised (torchvision `ToTensor`,
  `Normalize`)."""
  return normalize(to_float(image), mean, std)


# torchvision's ColorJitter kinds (it calls PIL.ImageEnhance's Brightness, Contrast and Color on PIL images).
JITTER_KINDS = ("brightness", "contrast", "saturation")


def _blend_table(degenerate: int, factor: float) -> list[int]:
  """PIL's blend of every 8-bit value v with a constant `degenerate`, as a table indexed by v (the blend is
  computed per byte, so a constant degenerate image makes it a function of the value alone)."""
  values = Image.frombytes("L", (256, 1), bytes(range(256)))
  return list(Image.blend(Image.new("L", (256, 1), degenerate), values, factor).tobytes())


def _jitter_pil(image: Image.Image, kind: str, factor: float) -> Image.Image:
  """`adjust_color` on a PIL RGB image. Brightness (degenerate 0) and contrast (degenerate: the rounded mean
  luma, computed as ImageEnhance.Contrast does) blend with a constant, so they run as a per-value table
  (`Image.point`: the same bytes, without a full-size degenerate image); saturation blends with the image's own
  luma and runs through ImageEnhance.Color."""
  if kind == "brightness":
    return image.point(_blend_table(0, factor) * 3)
  if kind == "contrast":
    mean = int(ImageStat.Stat(image.convert("L")).mean[0] + 0.5)
    return image.point(_blend_table(mean, factor) * 3)
  if kind == "saturation":
    return ImageEnhance.Color(image).enhance(factor)
  raise ValueError(f"colour jitter kind must be one of {JITTER_KINDS}, got {kind!r}")


def adjust_color(image: np.ndarray, kind: str, factor: float) -> np.ndarray:
  """torchvision `F.adjust_<kind>(pil_image, factor)`: [H, W, 3] uint8 -> [H, W, 3] uint8.

  On PIL images torchvision calls `PIL.ImageEnhance`, which blends the image with a degenerate one,
  out = degenerate + factor * (image - degenerate), truncated and clipped to uint8 (PIL's blend):
    brightness: degenerate = black;
    contrast:   a solid image of int(mean(L) + 0.5), L = PIL's ITU-R 601-2 luma of the image;
    saturation: L as RGB (PIL's `Color` enhancer).
  Done on the decoded full-resolution image, before any resize, as the reference does (docs/method.md
  §4.1; paper section 3.3 names the augmentation but not its order).
  """
  return np.asarray(_jitter_pil(Image.fromarray(image), kind, factor))


def jittered_resized(image: np.ndarray, kind: str, factor: float, size: int | Sequence[int]) -> np.ndarray:
  """`resize(adjust_color(image, kind, factor), size)`, [H, W, 3] uint8 -> [h, w, 3] uint8, with the
  full-resolution image kept in PIL between the two (the same bytes, two full-size copies fewer)."""
  h, w = ImageSize(size)
  jittered = _jitter_pil(Image.fromarray(image), kind, factor)
  if jittered.size != (w, h):
    jittered = jittered.resize((w, h), Image.BILINEAR)
  return np.asarray(jittered)


def draw_jitter(rng: np.random.Generator, low: float, high: float) -> tuple[str, float]:
  """ONE of `JITTER_KINDS`, uniformly, and its factor ~ U(low, high) (torchvision `ColorJitter(0.2)`)."""
  kind = JITTER_KINDS[int(rng.integers(len(JITTER_KINDS)))]
  return kind, float(rng.uniform(low, high))


def model_input(
  image: np.ndarray, size: int | Sequence[int], mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
  """The networks' input: [H, W, 3] uint8 -> [h, w, 3] float32 for size (h, w), resized (bilinear), normalised.

  torchvision `Resize((S, S))`, `ToTensor`, `Normalize(mean, std)` (paper section 4; docs/method.md §4.1).
  """
  return network_input(resize(image, size), mean, std)


def describe(size: int | Sequence[int]) -> str:
  """`model_input` in words, for the metadata of exported models (what a caller outside this library does)."""
  h, w = ImageSize(size)
  return (
    f"decode to RGB uint8 (gray -> 3 channels, alpha dropped); resize to width {w}, height {h} with PIL "
    f"bilinear (antialiased); x = (rgb / 255 - mean) / std; NHWC float32 [N, {h}, {w}, 3]"
  )


def autoencoder_input(
  image: np.ndarray, kind: str, factor: float, size: int | Sequence[int], mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
  """The autoencoder's training input: `adjust_color` at full resolution, then `model_input`.

  Args:
    image: [H, W, 3] uint8, the decoded training image.
  Returns:
    [h, w, 3] float32 for size (h, w), normalised.
  """
  return network_input(jittered_resized(image, kind, factor, size), mean, std)


def penalty_crop(image: np.ndarray, gray: bool, resize_to: int, size: int | Sequence[int]) -> np.ndarray:
  """Penalty input before normalisation, its random decision made: resize to resize_to^2, grayscale if `gray`,
  centre crop. [H, W, 3] uint8 -> [h, w, 3] uint8 for size (h, w) (grayscale: 3 equal channels).

  torchvision `Resize((2S, 2S))`, `RandomGrayscale` (when it fires: `convert('L')`, 3 channels),
  `CenterCrop(S)` (paper section 3.2, the ImageNet penalty; docs/method.md §4.1).
  """
  h, w = ImageSize(size)
  if max(h, w) > resize_to:
    raise ValueError(f"penalty crop {ImageSize(size)} is larger than penalty_resize {resize_to}")
  pil = Image.fromarray(image).resize((resize_to, resize_to), Image.BILINEAR)
  if gray:
    pil = pil.convert("L").convert("RGB")  # torchvision rgb_to_grayscale on PIL: the same luma
  top, left = (int(round((resize_to - n) / 2.0)) for n in (h, w))  # torchvision CenterCrop's offsets
  return np.asarray(pil)[top : top + h, left : left + w]


def draw_gray(rng: np.random.Generator, gray_prob: float) -> bool:
  """The penalty's `RandomGrayscale(gray_prob)` decision."""
  return bool(rng.uniform() < gray_prob)


def penalty_transform(
  image: np.ndarray, gray: bool, resize_to: int, size: int | Sequence[int], mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
  """`penalty_crop`, then `ToTensor`, `Normalize`: [H, W, 3] uint8 -> [h, w, 3] float32, normalised."""
  return network_input(penalty_crop(image, gray, resize_to, size), mean, std)


def penalty_image(
  image: np.ndarray,
  rng: np.random.Generator,
  resize_to: int,
  size: int | Sequence[int],
  gray_prob: float,
  mean: Sequence[float],
  std: Sequence[float],
) -> np.ndarray:
  """`penalty_transform` with the grayscale decision drawn: gray with probability `gray_prob`."""
  return penalty_transform(image, draw_gray(rng, gray_prob), resize_to, size, mean, std)
