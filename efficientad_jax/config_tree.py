"""Operations on any config tree (nested frozen dataclasses with `range_rules()` per section): JSON, dotted
command-line overrides with type checking, range validation, and field-by-field comparison. The config classes
themselves live in config.py, ast/config.py and distill_config.py."""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Sequence
from typing import Any

Rule = tuple[str, bool, str]  # (field, holds, requirement), e.g. ("steps", steps >= 1, ">= 1")


class ConfigError(ValueError):
  """A config value the run cannot use (a bad `--set`, a field out of range): a usage error (exit 2)."""


def to_dict(cfg: Any) -> dict:
  return dataclasses.asdict(cfg)


def from_dict(cls: type, d: dict) -> Any:
  """Inverse of `to_dict` for nested dataclasses; unknown keys are an error."""
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = set(d) - names
  if unknown:
    raise ConfigError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
  kwargs = {}
  for key, value in d.items():
    hint = hints[key]
    if dataclasses.is_dataclass(hint):
      kwargs[key] = from_dict(hint, value)
    elif isinstance(value, list):
      kwargs[key] = tuple(value)
    else:
      kwargs[key] = value
  return cls(**kwargs)


def to_json(cfg: Any) -> str:
  return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def _parse(text: str, hint: Any, where: str) -> Any:
  if hint is bool:
    if text.lower() in ("1", "true", "yes"):
      return True
    if text.lower() in ("0", "false", "no"):
      return False
    raise ConfigError(f"{where}: expected a boolean, got {text!r}")
  origin = typing.get_origin(hint)
  if origin is tuple:
    item = typing.get_args(hint)[0]
    return tuple(_parse(t, item, where) for t in text.split(","))
  try:
    return hint(text)
  except ConfigError as e:  # the type's own message (config.ImageSize)
    raise ConfigError(f"{where}: {e}") from None
  except ValueError:
    raise ConfigError(f"{where}: expected {hint.__name__}, got {text!r}") from None


def override(cfg: Any, assignments: Sequence[str]) -> Any:
  """Returns `cfg` with dotted `key=value` assignments applied, e.g. `train.steps=100`."""
  for assignment in assignments:
    if "=" not in assignment:
      raise ConfigError(f"override {assignment!r}: expected key=value, e.g. train.steps=100")
    path, text = assignment.split("=", 1)
    cfg = _set(cfg, path.split("."), text, path)
  return cfg


def _set(node: Any, keys: list[str], text: str, path: str) -> Any:
  names = {f.name for f in dataclasses.fields(node)}
  if keys[0] not in names:
    raise ConfigError(f"override {path!r}: {type(node).__name__} has no field {keys[0]!r}; fields: {sorted(names)}")
  child = getattr(node, keys[0])
  if len(keys) == 1:
    if dataclasses.is_dataclass(child):
      raise ConfigError(f"override {path!r}: is a section, name one of its fields")
    value = _parse(text, typing.get_type_hints(type(node))[keys[0]], path)
  else:
    if not dataclasses.is_dataclass(child):
      raise ConfigError(f"override {path!r}: {keys[0]!r} is not a section")
    value = _set(child, keys[1:], text, path)
  return dataclasses.replace(node, **{keys[0]: value})


def rules(cfg: Any) -> list[Rule]:
  """Every range rule of a sectioned config (`Config`, `AstConfig`, `DistillConfig`): each section's own,
  named 'section.field', then the config's rules across sections. A shared section type brings the same
  rules to every method."""
  out = [
    (f"{f.name}.{name}", holds, requirement)
    for f in dataclasses.fields(cfg)
    for name, holds, requirement in getattr(cfg, f.name).range_rules()
  ]
  return out + cfg.range_rules()


def validate(cfg: Any) -> Any:
  """Returns `cfg` if every field is in range; else raises ConfigError naming the first bad field."""
  for field, holds, requirement in rules(cfg):
    if not holds:
      section, name = field.split(".")
      value = getattr(getattr(cfg, section), name)
      raise ConfigError(f"{field} = {value!r} is out of range (--set {field}=...): it must be {requirement}")
  return cfg


def flat_fields(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{'section.field': value} of a config (any nesting of dataclasses or dicts)."""
  items = dataclasses.asdict(tree).items() if dataclasses.is_dataclass(tree) else tree.items()
  out = {}
  for key, value in items:
    if isinstance(value, dict):
      out.update(flat_fields(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
  return out


def changed_fields(old: Any, new: Any) -> dict[str, tuple[Any, Any]]:
  """{'section.field': (old, new)} for the fields whose values differ."""
  a, b = flat_fields(old), flat_fields(new)
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
