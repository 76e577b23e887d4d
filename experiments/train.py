"""Train (and evaluate) EfficientAD.

  python -m experiments.train                                  # synthetic CPU demo (a few minutes)
  python -m experiments.train --dataset mvtec_loco --size M --workdir runs/loco_bb \
      --set data.root=/data/mvtec_loco --set data.category=breakfast_box \
      --set train.teacher_checkpoint=teachers/medium

Config: the one named by --method and --dataset in `experiments.configs.REGISTRY` (`get_config(size)`), or
--config FILE (a .py with get_config); every field can be overridden with --set section.field=value and is
range-checked before jax starts. Re-running the same command resumes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys

from efficientad_jax import config as config_lib
from efficientad_jax.efficientad_ast.config import AstConfig
from experiments import cli, configs

METHOD_CONFIGS = {"efficientad": config_lib.Config, "efficientad_ast": AstConfig}  # what each method trains


def load_config(dataset: str, size: str, config_file: str | None, method: str = "efficientad"):
  """`get_config(size)` of --config FILE, else of the registered config (method, dataset); a config of another
  method than `method` is a ConfigError."""
  if config_file:
    path = pathlib.Path(config_file)
    if not path.is_file():
      raise config_lib.ConfigError(f"no config file {path} (--config)")
    spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(size)
  else:
    cfg = configs.get(method, dataset, size)
  if not isinstance(cfg, METHOD_CONFIGS[method]):
    raise config_lib.ConfigError(
      f"the config is a {type(cfg).__name__}, but --method {method} trains a {METHOD_CONFIGS[method].__name__}"
    )
  return cfg


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument(
    "--dataset", default="synthetic", help=f"with --method, a registered config: {configs.names(tuple(METHOD_CONFIGS))}"
  )
  p.add_argument(
    "--size",
    default="small",
    help="S/small or M/medium; --dataset synthetic also takes 'small,tiny' (a seconds-long test run)",
  )
  p.add_argument("--config", help="a config .py with get_config(arg), instead of --dataset")
  p.add_argument(
    "--method",
    default="efficientad",
    choices=tuple(METHOD_CONFIGS),
    help="efficientad (the paper) or efficientad_ast (asymmetric student-teacher variant)",
  )
  p.add_argument("--workdir", help="run directory (default: runs/<dataset>_<category>_<size>_seed<seed>)")
  p.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="override a config field, e.g. --set train.steps=1000 (repeatable)",
  )
  p.add_argument("--no-eval", action="store_true", help="train and calibrate only")
  p.add_argument(
    "--distributed",
    action="store_true",
    help="call jax.distributed.initialize() (multi-host; reads the usual cluster env vars)",
  )
  cli.add_debug_flag(p)
  return p.parse_args(argv)


def default_workdir(cfg, method: str = "efficientad") -> str:
  d = cfg.data
  if method == "efficientad_ast":
    return f"runs/ast_{d.dataset}_{d.category or 'default'}_seed{cfg.train.seed}"
  return f"runs/{d.dataset}_{d.category or 'default'}_{cfg.model.size}_seed{cfg.train.seed}"


def main(argv=None) -> int:
  args = parse_args(argv)
  cli.setup_logging()
  cli.init_distributed(args.distributed)
  cfg = config_lib.override(load_config(args.dataset, args.size, args.config, args.method), args.set)
  config_lib.validate(cfg)  # a bad --set value fails here, before jax starts
  workdir = args.workdir or default_workdir(cfg, args.method)
  if args.method == "efficientad_ast":
    from efficientad_jax.efficientad_ast.trainer import train_ast

    model = train_ast(cfg, workdir)
  else:
    from efficientad_jax.efficientad import trainer  # after distributed init

    model = trainer.train(cfg, workdir)
  print(f"model: {model}")
  if not args.no_eval:
    from efficientad_jax.evaluation import evaluate

    metrics = evaluate.evaluate(workdir)
    print(json.dumps(metrics, indent=2, default=str))
  return 0


def command() -> None:
  """The `efficientad-train` console script (pyproject.toml [project.scripts])."""
  sys.exit(cli.run(main))


if __name__ == "__main__":
  command()
