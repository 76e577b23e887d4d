"""The config trees of the three methods: `override`'s errors, `validate`'s range rules (shared sections checked
by the same rules in every method), the JSON round trip, and the registry of named configs. No jax."""

import dataclasses

import pytest

from efficientad_jax import config as config_lib
from efficientad_jax.config import Config, ConfigError
from efficientad_jax.distillation.config import DistillConfig
from efficientad_jax.efficientad_ast.config import AstConfig
from experiments import configs

CLASSES = (Config, AstConfig, DistillConfig)


@pytest.mark.parametrize(
  "assignment,fragments",
  [
    ("train.sede=5", ["no field 'sede'", "seed"]),
    ("trian.seed=5", ["no field 'trian'", "train"]),
    ("train=5", ["'train'", "is a section"]),
    ("train.seed.x=5", ["'seed' is not a section"]),
    ("train.seed=many", ["train.seed", "expected int", "'many'"]),
    ("optim.learning_rate=fast", ["optim.learning_rate", "expected float"]),
    ("data.download=maybe", ["data.download", "expected a boolean", "'maybe'"]),  # distillation has no boolean
    ("data.mean=0.5,x,0.4", ["data.mean", "expected float", "'x'"]),
    ("train.steps", ["expected key=value"]),
  ],
)
def test_override_errors(assignment, fragments):
  for cls in CLASSES if "download" not in assignment else (Config, AstConfig):
    with pytest.raises(ConfigError) as e:
      config_lib.override(cls(), [assignment])
    assert all(f in str(e.value) for f in fragments), (cls.__name__, str(e.value))


def test_override_parses_every_kind_of_field():
  cfg = config_lib.override(
    Config(),
    ["train.steps=7", "optim.learning_rate=2e-3", "data.download=yes", "data.mean=0.1,0.2,0.3", "model.size=medium"],
  )
  assert (cfg.train.steps, cfg.optim.learning_rate, cfg.data.download) == (7, 2e-3, True)
  assert cfg.data.mean == (0.1, 0.2, 0.3) and cfg.model.size == "medium"
  distill = config_lib.override(DistillConfig(), ["backbone.blocks=1,1,2", "train.steps=3"])
  assert distill.backbone.blocks == (1, 1, 2) and distill.train.steps == 3
  ast = config_lib.override(AstConfig(), ["train.flow_epochs=2", "maps.st_weight=0.25"])
  assert ast.train.flow_epochs == 2 and ast.maps.st_weight == 0.25


# (config class, a bad assignment, the field the error names, a fragment of the requirement).
RANGE_ERRORS = [
  (Config, "model.dtype=float8", "model.dtype", "one of"),
  (
    Config,
    "model.image_size=100",
    "model.image_size",
    "multiple of 32, at least 64, on each side (the autoencoder's encoder",
  ),
  (Config, "model.image_size=300", "model.image_size", "nearest valid 288 or 320"),
  (Config, "model.image_size=48", "model.image_size", "nearest valid 64"),
  (Config, "loss.hard_quantile=1.5", "loss.hard_quantile", "in [0, 1]"),
  (Config, "maps.q_start=0.999", "maps.q_end", "> maps.q_start"),
  (Config, "maps.pad=-1", "maps.pad", ">= 0"),
  (Config, "data.validation_fraction=0", "data.validation_fraction", "in (0, 1)"),
  (Config, "data.penalty_resize=100", "data.penalty_resize", ">= the networks' input side"),
  (AstConfig, "model.ae_dropout=1", "model.ae_dropout", "in [0, 1)"),
  (AstConfig, "backbone.stages=9", "backbone.stages", "in [1, 7]"),
  (AstConfig, "flow.kernel=2", "flow.kernel", "odd"),
  (AstConfig, "train.student_epochs=0", "train.student_epochs", ">= 1"),
  (AstConfig, "train.patience_fraction=2", "train.patience_fraction", "in [0, 1]"),
  (DistillConfig, "model.size=large", "model.size", "one of"),
  (DistillConfig, "backbone.image_size=100", "backbone.image_size", "multiple of 16"),
  (DistillConfig, "target.num_stat_images=0", "target.num_stat_images", ">= 1"),
  (DistillConfig, "data.grayscale_prob=2", "data.grayscale_prob", "in [0, 1]"),
  (DistillConfig, "train.log_every=0", "train.log_every", ">= 1"),
]


@pytest.mark.parametrize("cls,assignment,field,requirement", RANGE_ERRORS)
def test_validate_names_the_bad_field(cls, assignment, field, requirement):
  with pytest.raises(ConfigError) as e:
    config_lib.validate(config_lib.override(cls(), [assignment]))
  message = str(e.value)
  assert message.startswith(f"{field} = ") and f"--set {field}=" in message and requirement in message
  assert "\n" not in message


@pytest.mark.parametrize(
  "assignment",
  [
    "optim.b1=1",
    "optim.learning_rate=0",
    "optim.decay_factor=0",
    "train.batch_size=0",
    "train.checkpoint_every=0",
    "train.max_to_keep=0",
    "data.num_workers=-2",
    "data.std=1,0,1",
  ],
)
def test_shared_sections_have_the_same_rules_in_every_method(assignment):
  field = assignment.split("=")[0]
  for cls in CLASSES:
    with pytest.raises(ConfigError, match=f"^{field} = "):
      config_lib.validate(config_lib.override(cls(), [assignment]))


def test_ast_penalty_resize_is_checked_only_with_a_penalty():
  cfg = config_lib.validate(AstConfig())  # 512 < 768, but no penalty images are read
  with pytest.raises(ConfigError, match="data.penalty_resize"):
    config_lib.validate(config_lib.override(cfg, ["data.penalty=/images"]))


def test_defaults_and_registered_configs_are_valid():
  named = [configs.get(method, dataset, arg) for (method, dataset) in configs.REGISTRY for arg in ("small", "medium")]
  named += [
    configs.get("efficientad", "synthetic", "small,tiny"),
    configs.get("efficientad_ast", "synthetic", "tiny"),
    configs.get("distill", "imagenet", "small,tiny"),
  ]
  for cfg in [cls() for cls in CLASSES] + named:
    assert config_lib.validate(cfg) is cfg


def test_methods_share_section_types():
  """One definition of each shared section: the optimizer of all three, the step schedule of EfficientAD and
  distillation, the run settings of all three, the map weights of EfficientAD and AST."""
  cfgs = [cls() for cls in CLASSES]
  assert all(type(c.optim) is config_lib.OptimConfig for c in cfgs)
  assert all(isinstance(c.train, config_lib.RunConfig) for c in cfgs)
  assert isinstance(Config().train, config_lib.ScheduleConfig)
  assert type(DistillConfig().train) is config_lib.ScheduleConfig
  assert isinstance(Config().maps, config_lib.ScoreConfig) and type(AstConfig().maps) is config_lib.ScoreConfig
  assert isinstance(DistillConfig().data, config_lib.InputConfig) and type(AstConfig().data) is config_lib.DataConfig
  assert DistillConfig().optim.decay_factor == AstConfig().optim.decay_factor == 1.0  # constant learning rates


@pytest.mark.parametrize("cls", CLASSES)
def test_json_round_trip(cls):
  # Non-default values in every section, tuples included (JSON has lists only).
  changed = {
    Config: ["train.teacher_checkpoint=t", "data.mean=0.1,0.2,0.3", "maps.pad=2", "optim.b1=0.5"],
    AstConfig: ["flow.blocks=3", "backbone.weights=b5.pth", "train.flow_epochs=4", "maps.ae_weight=0.7"],
    DistillConfig: ["backbone.blocks=1,1,2", "target.layer_dim=64", "data.imagenet=/in", "train.steps=9"],
  }
  for cfg in (cls(), config_lib.override(cls(), changed[cls])):
    text = config_lib.to_json(cfg)
    assert config_lib.from_json(text, cls) == cfg
    assert config_lib.from_dict(cls, config_lib.to_dict(cfg)) == cfg
    assert hash(config_lib.from_json(text, cls)) == hash(cfg)  # still usable as a static jit argument


def test_from_dict_refuses_unknown_keys():
  with pytest.raises(ConfigError, match="unknown keys"):
    config_lib.from_dict(AstConfig, {**config_lib.to_dict(AstConfig()), "image_size": 768})  # the old flat key
  with pytest.raises(ConfigError, match="unknown keys"):
    config_lib.from_dict(DistillConfig, {"train": {"stepz": 1}})


def test_registry_names_and_errors():
  assert isinstance(configs.get("efficientad", "mvtec_loco", "M"), Config)
  assert isinstance(configs.get("efficientad_ast", "mvtec_ad"), AstConfig)
  assert isinstance(configs.get("distill", "imagenet", "small"), DistillConfig)
  with pytest.raises(ConfigError) as e:
    configs.get("efficientad_ast", "visa")
  message = str(e.value)
  assert "\n" not in message and "'visa'" in message
  assert "efficientad_ast: synthetic, mvtec_ad, mvtec_loco" in message and "distill: imagenet" in message


def test_resumable_fields_exist_in_every_method():
  """RESUMABLE names 'section.field' paths; the shared sections give them the same meaning everywhere."""
  for cls in CLASSES:
    fields = config_lib.flat_fields(cls())
    assert {"optim.learning_rate", "train.checkpoint_every", "train.max_to_keep", "data.num_workers"} <= set(fields)
  changed = config_lib.changed_fields(
    DistillConfig(), dataclasses.replace(DistillConfig(), train=dataclasses.replace(DistillConfig().train, steps=5))
  )
  assert changed == {"train.steps": (60_000, 5)}
