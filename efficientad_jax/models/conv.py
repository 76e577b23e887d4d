"""2-D convolution with a custom backward pass for fast CPU training (forward is XLA's own).

XLA's CPU backend computes the weight gradient of a convolution as another convolution with the batch as
the contracted feature dimension. For the PDN's wide layers (128-256 input channels) that is fast, but for
the autoencoder's narrow (32-64 channel) and strided layers it is many times slower than a matmul
(BUILD_NOTES.md, "Performance"). The weight gradient is a plain matrix product of image patches and output
gradients,

  dW[i, j, c, o] = sum_{b, y, x} X_pad[b, s*y + i, s*x + j, c] * G[b, y, x, o],

which XLA:CPU runs through its fast GEMM. `conv_general_dilated(impl)` returns a drop-in replacement for
`jax.lax.conv_general_dilated` that `flax.linen.Conv(conv_general_dilated=...)` accepts, so the parameters
(kernel HWIO, bias) and the forward numbers stay exactly those of `nn.Conv`.

Implementations (`ModelConfig.conv_impl`):
  "xla"      plain `lax.conv_general_dilated`, XLA differentiates it (best on GPU/TPU).
  "im2col"   custom VJP: dX by the transposed conv (lax's own transpose rule), dW by one im2col matmul
             [kh*kw*Cin, N] @ [N, Cout], N = B*Ho*Wo (patches materialised: kh*kw x the input).
  "shifted"  custom VJP: dX as above, dW by kh*kw matmuls [Cin, N] @ [N, Cout], one per kernel offset
             (no kh*kw-times patch tensor).
  "mixed"    per conv: "xla" for stride-1 convs with at least XLA_WGRAD_MIN_CHANNELS input channels,
             "shifted" for the rest.
  "auto"     "mixed" when the default backend is CPU, else "xla" (decided at trace time).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from efficientad_jax.config import CONV_IMPLS

IMPLS = CONV_IMPLS  # defined with the config that names them
CPU_IMPL = "mixed"  # what "auto" picks on CPU: the fastest there (`experiments.benchmark --mode conv`)
# "mixed" keeps XLA's own weight gradient from this many input channels up (stride 1): there XLA:CPU's own is
# as fast as the matmuls, below it far slower (BUILD_NOTES.md, "Performance").
XLA_WGRAD_MIN_CHANNELS = 128


def resolve_impl(impl: str) -> str:
  """ "auto" -> CPU_IMPL on the CPU backend, "xla" elsewhere; other names are checked and returned."""
  if impl not in IMPLS:
    raise ValueError(f"conv_impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    return CPU_IMPL if jax.default_backend() == "cpu" else "xla"
  return impl


def _forward(
  x: jnp.ndarray, w: jnp.ndarray, strides: tuple[int, int], padding: tuple[tuple[int, int], tuple[int, int]]
) -> jnp.ndarray:
  """The forward conv, NHWC x HWIO -> NHWC: the very call `nn.Conv` makes, so the numbers are identical."""
  dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn)


def _shifted_inputs(
  x: jnp.ndarray,
  kernel: tuple[int, int],
  strides: tuple[int, int],
  padding: tuple[tuple[int, int], tuple[int, int]],
  out_hw: tuple[int, int],
) -> list[jnp.ndarray]:
  """The kh*kw strided views of the padded input, one per kernel offset (i, j), each [B, Ho, Wo, Cin]."""
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  (sh, sw), (ho, wo) = strides, out_hw
  return [
    xp[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :]
    for i in range(kernel[0])
    for j in range(kernel[1])
  ]


def weight_grad(
  x: jnp.ndarray,
  g: jnp.ndarray,
  kernel_shape: Sequence[int],
  strides: tuple[int, int],
  padding: tuple[tuple[int, int], tuple[int, int]],
  method: str = "shifted",
) -> jnp.ndarray:
  """dL/dW [kh, kw, Cin, Cout] (float32 accumulation) from x [B, H, W, Cin], output grad g [B, Ho, Wo, Cout].

  method "im2col": one matmul over materialised patches; "shifted": one matmul per kernel offset.
  """
  kh, kw, cin, cout = kernel_shape
  n = g.shape[0] * g.shape[1] * g.shape[2]
  g2 = g.reshape(n, cout)
  cols = _shifted_inputs(x, (kh, kw), strides, padding, g.shape[1:3])
  contract = (((0,), (0,)), ((), ()))  # sum over the N = B*Ho*Wo rows of both operands
  if method == "im2col":
    patches = jnp.stack(cols, axis=3).reshape(n, kh * kw * cin)  # column order (i, j, c) = HWI
    dw = lax.dot_general(patches, g2, contract, preferred_element_type=jnp.float32)
  elif method == "shifted":
    dw = jnp.stack([lax.dot_general(c.reshape(n, cin), g2, contract, preferred_element_type=jnp.float32) for c in cols])
  else:
    raise ValueError(f"unknown weight-gradient method {method!r}")
  return dw.reshape(kh, kw, cin, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, padding, method):
  return _forward(x, w, strides, padding)


def _conv_fwd(x, w, strides, padding, method):
  return _forward(x, w, strides, padding), (x, w)


def _conv_bwd(strides, padding, method, residuals, g):
  x, w = residuals
  # Input gradient: the linear transpose of the forward conv in x (lax's own rule: a conv of the padded,
  # dilated output gradient with the flipped kernel), which XLA:CPU runs at forward speed.
  (dx,) = jax.linear_transpose(lambda x_: _forward(x_, w, strides, padding), x)(g)
  dw = weight_grad(x, g, w.shape, strides, padding, method).astype(w.dtype)
  return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def _is_plain_2d(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count) -> bool:
  """True for the convs this project uses: 2-D NHWC/HWIO, explicit padding, no dilation, no groups."""
  if lhs.ndim != 4 or isinstance(padding, str) or feature_group_count != 1:
    return False
  if any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ())):
    return False
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
  return lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc


def conv_general_dilated(impl: str = "auto") -> Callable[..., jnp.ndarray]:
  """A `lax.conv_general_dilated` replacement for `nn.Conv(conv_general_dilated=...)`.

  Anything other than a plain 2-D NHWC conv (dilation, groups, string padding) falls back to lax.
  """

  def conv_fn(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
  ) -> jnp.ndarray:
    method = resolve_impl(impl)
    plain = (
      batch_group_count == 1
      and precision is None
      and preferred_element_type is None
      and _is_plain_2d(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count)
    )
    if method == "mixed" and plain:
      wide = rhs.shape[2] >= XLA_WGRAD_MIN_CHANNELS and all(int(s) == 1 for s in window_strides)
      method = "xla" if wide else "shifted"
    if method == "xla" or not plain:
      return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        batch_group_count,
        precision,
        preferred_element_type,
      )
    strides = tuple(int(s) for s in window_strides)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv(lhs, rhs, strides, pads, method)

  conv_fn.impl = impl  # readable in module reprs and tests
  return conv_fn


@functools.cache
def conv_fn_for(impl: str) -> Callable[..., Any]:
  """One function object per impl name, so equal modules stay equal (flax modules compare by fields)."""
  resolve_impl(impl)  # validates the name early
  return conv_general_dilated(impl)
