"""A torch-free, restricted reader for PyTorch `.pth` state_dicts (the zip format of `torch.save`, >= 1.6).

Why not `torch.load`: torch is a ~1 GB dependency for reading a few arrays, and unpickling executes whatever
callables the file names. Here the unpickler resolves only the globals a state_dict of dense tensors needs
(OrderedDict, the tensor/parameter rebuild functions, typed storage classes) to local stand-ins that build
NumPy arrays; every other global (a pickled `nn.Module`, user classes, `os.system`) is refused before anything
is called.

Format: a zip with one top-level folder (any name) holding `data.pkl` (pickle; tensors are
`_rebuild_tensor_v2(storage, offset, size, stride, ...)`, storages are persistent ids
`('storage', <StorageType>, key, location, numel)`), the raw storages `data/<key>` and `byteorder`.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

# Storage classes as named in the pickle -> element dtype (little endian unless `byteorder` says otherwise).
_STORAGE_DTYPES = {
  "FloatStorage": np.float32,
  "DoubleStorage": np.float64,
  "HalfStorage": np.float16,
  "BFloat16Storage": ml_dtypes.bfloat16,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}
_SAVE_HINT = "only state_dicts of tensors can be read: save it with torch.save(model.state_dict(), path)"
# Keys under which training scripts commonly nest the state_dict.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
# A tensor may be larger than its storage only through zero strides (expanded views). Cap what such a view
# may allocate so that a crafted file cannot request terabytes from a few bytes.
_MAX_EXPANDED_BYTES = 1 << 30


class PthError(ValueError):
  """A `.pth` file that cannot be read as a state_dict; the message names the file."""


class _StorageType(str):
  """Stand-in for the `torch.<X>Storage` globals: just the name, immutable (no `__dict__`), so a crafted
  pickle cannot BUILD new attributes onto the shared instance."""

  __slots__ = ()

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(_STORAGE_DTYPES[self])


def _check_int_tuple(value: Any, what: str, path: str) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and v >= 0 for v in value):
    raise PthError(f"{path}: tensor {what} must be a tuple of non-negative ints, got {value!r}")
  return tuple(value)


def _rebuild_tensor(path: str, storage: np.ndarray, offset: int, size, stride) -> np.ndarray:
  """A C-contiguous copy of the strided view `storage[offset:]` with `size` and `stride` (in elements)."""
  size = _check_int_tuple(size, "size", path)
  stride = _check_int_tuple(stride, "stride", path)
  if not isinstance(offset, int) or offset < 0 or len(size) != len(stride):
    raise PthError(f"{path}: malformed tensor (offset {offset!r}, size {size}, stride {stride})")
  if not isinstance(storage, np.ndarray):
    raise PthError(f"{path}: tensor data is not a storage reference")
  if math.prod(size) == 0:
    return np.zeros(size, storage.dtype)
  # Bounds check before as_strided: a crafted file must not read past the storage.
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise PthError(
      f"{path}: tensor (offset {offset}, size {size}, stride {stride}) runs past its storage of {storage.size} elements"
    )
  if math.prod(size) * storage.itemsize > max(storage.nbytes, _MAX_EXPANDED_BYTES):
    raise PthError(f"{path}: tensor of size {size} is implausibly large for its storage")
  view = np.lib.stride_tricks.as_strided(
    storage[offset:], shape=size, strides=[s * storage.itemsize for s in stride], writeable=False
  )
  return np.array(view, order="C")  # own the memory: independent of the zip buffer and of other views


class _Unpickler(pickle.Unpickler):
  """Resolves only allow-listed globals; storages come from the zip via persistent ids."""

  def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str, path: str):
    super().__init__(io.BytesIO(data))
    self._archive, self._prefix, self._byteorder, self._path = archive, prefix, byteorder, path
    self._storages: dict[str, np.ndarray] = {}  # views of one storage (slices) share it
    rebuild_v2 = lambda storage, offset, size, stride, *_: _rebuild_tensor(path, storage, offset, size, stride)
    self._globals = {
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("torch._utils", "_rebuild_tensor_v2"): rebuild_v2,
      # Parameters are just their data here (requires_grad and hooks are training-time state).
      ("torch._utils", "_rebuild_parameter"): lambda data, *_: data,
      ("torch._utils", "_rebuild_parameter_with_state"): lambda data, *_: data,
    }
    self._globals.update({("torch", name): _StorageType(name) for name in _STORAGE_DTYPES})

  def find_class(self, module: str, name: str) -> Any:
    try:
      return self._globals[(module, name)]
    except KeyError:
      raise PthError(
        f"{self._path}: refused to load the global {module}.{name} (the file holds more than "
        f"tensors, e.g. a whole pickled model); {_SAVE_HINT}"
      ) from None

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (
      isinstance(pid, tuple)
      and len(pid) == 5
      and pid[0] == "storage"
      and isinstance(pid[1], _StorageType)
      and isinstance(pid[2], str)
      and isinstance(pid[4], int)
    ):
      raise PthError(f"{self._path}: unsupported persistent id {pid!r}")
    _, storage_type, key, _, numel = pid
    if key not in self._storages:
      self._storages[key] = self._read_storage(storage_type.dtype, key, numel)
    storage = self._storages[key]
    if storage.dtype != storage_type.dtype.newbyteorder("="):
      raise PthError(f"{self._path}: storage {key} is used with two dtypes")
    return storage

  def _read_storage(self, dtype: np.dtype, key: str, numel: int) -> np.ndarray:
    name = f"{self._prefix}data/{key}"
    try:
      raw = self._archive.read(name)
    except KeyError:
      raise PthError(f"{self._path}: storage record {name} is missing from the archive") from None
    if len(raw) != numel * dtype.itemsize:
      raise PthError(f"{self._path}: storage {key} has {len(raw)} bytes, expected {numel} x {dtype.itemsize}")
    stored = np.frombuffer(raw, dtype.newbyteorder("<" if self._byteorder == "little" else ">"))
    return stored.astype(dtype.newbyteorder("="), copy=False)


def _archive_prefix(archive: zipfile.ZipFile, path: str) -> str:
  """The top-level folder (with trailing '/') that holds data.pkl; torch names it after the file."""
  names = archive.namelist()
  pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
  if len(pickles) != 1:
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
      raise PthError(f"{path}: this is a TorchScript archive (torch.jit.save); {_SAVE_HINT}")
    raise PthError(f"{path}: zip archive without exactly one <folder>/data.pkl; not a torch.save file")
  return pickles[0][: -len("data.pkl")]


def read_pth(path: str) -> Any:
  """Unpickles a `.pth` written by `torch.save` (PyTorch >= 1.6) with tensors as NumPy arrays.

  Args:
    path: the file.

  Returns:
    The saved object (usually an OrderedDict name -> np.ndarray); only allow-listed globals are resolved.

  Raises:
    PthError: not a zip (e.g. the legacy pre-1.6 format), a refused global, or a malformed archive.
  """
  path = str(path)
  if not zipfile.is_zipfile(path):
    raise PthError(
      f"{path}: not a zip archive. Either not a PyTorch file or the legacy (pre-1.6) torch.save "
      "format, which is not supported: re-save it with a current PyTorch, "
      "torch.save(torch.load(old), new)"
    )
  with zipfile.ZipFile(path) as archive:
    prefix = _archive_prefix(archive, path)
    byteorder = "little"
    if f"{prefix}byteorder" in archive.namelist():
      byteorder = archive.read(f"{prefix}byteorder").decode().strip()
      if byteorder not in ("little", "big"):
        raise PthError(f"{path}: unknown byteorder {byteorder!r}")
    unpickler = _Unpickler(archive.read(f"{prefix}data.pkl"), archive, prefix, byteorder, path)
    try:
      return unpickler.load()
    except PthError:
      raise
    except Exception as e:  # truncated or corrupt pickle: say which file
      raise PthError(f"{path}: corrupt data.pkl ({type(e).__name__}: {e})") from e


def as_state_dict(obj: Any, path: str) -> dict[str, np.ndarray]:
  """The name -> array mapping in `obj`, unwrapping one level of {'state_dict': ...}-style nesting."""

  def is_state(x):
    return isinstance(x, Mapping) and x and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in x.items())

  if is_state(obj):
    return dict(obj)
  if isinstance(obj, Mapping):
    for key in _WRAPPER_KEYS:
      if is_state(obj.get(key)):
        return dict(obj[key])
  kind = f"a {type(obj).__name__}" + (f" with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping) else "")
  raise PthError(f"{path}: holds {kind}, not a state_dict of tensors; {_SAVE_HINT}")


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """`read_pth` + `as_state_dict`: the tensors of a saved state_dict, by name, as NumPy arrays."""
  return as_state_dict(read_pth(path), str(path))
