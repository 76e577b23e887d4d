"""Makes a variant of the reference fixtures: other names and counts, the same expected numbers.

    python -m tools.make_fixture_variant /tmp/variant            # from tests/fixtures
    EFFICIENTAD_FIXTURES=/tmp/variant python -m pytest -q tests/test_data_indexes.py ...

The fixture-driven tests must take every name, size and count from a fixture set's own JSON documents and
folder trees; running them on this variant shows they do. Only what the expected numbers do not depend on
is changed, and every document that names it is updated to match:

* MVTec AD: the category (another real MVTec AD category, as the TFDS builders accept only those), the defect
  folders, the test image ids (renumbered in the same order, so every curve sums in the same order), the
  dataset and anomaly-map folders; two more training images (training images are never evaluated).
* MVTec LOCO: the object (another real LOCO object), every defect name and pixel value (the ground-truth
  PNGs are rewritten with the new values), the test image ids (same order), the dataset, map and metrics
  file names; one more training image and one validation image fewer.
* preprocess: the input image files.
* networks and full_path are kept: their seeds and image indices produce the expected numbers.

`VARIANT.json` in the output lists every renaming.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil

import numpy as np
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
AD_CATEGORIES = ("hazelnut", "cable", "bottle")  # real MVTec AD categories: the first one not in use
AD_DEFECTS = ("cut", "print", "poke", "squeeze", "fold", "glue", "rough", "faulty_imprint")
LOCO_OBJECTS = ("screw_bag", "juice_bottle", "pushpins")
ID_START, ID_STEP = 10, 3  # test id i -> ID_START + ID_STEP * i: other names, the same sort order


def _read(path: pathlib.Path):
  return json.loads(path.read_text())


def _write(path: pathlib.Path, doc) -> None:
  path.write_text(json.dumps(doc, indent=2) + "\n")


def _pick(candidates, taken: str) -> str:
  return next(c for c in candidates if c != taken)


def _renumber(stems) -> dict[str, str]:
  """Sorted stems -> new three-digit stems in the same order."""
  return {s: f"{ID_START + ID_STEP * i:03d}" for i, s in enumerate(sorted(stems))}


def _rename_key(doc: dict, old: str, new: str) -> dict:
  return {(new if k == old else k): v for k, v in doc.items()}


# ----------------------------------------------------------------------------------------- MVTec AD


def mvtec_ad(part: pathlib.Path) -> dict:
  doc = _read(part / "expected.json")
  old_cat = doc["object"]
  new_cat = _pick(AD_CATEGORIES, old_cat)
  data_dir, maps_dir = "data_v/", "maps_v/"
  (part / doc["dataset_dir"]).rename(part / data_dir)
  (part / doc["anomaly_maps_dir"]).rename(part / maps_dir)
  cat = part / data_dir / old_cat
  cat = cat.rename(cat.parent / new_cat)
  maps = (part / maps_dir / old_cat).rename(part / maps_dir / new_cat)

  # Defect folders: test/<d>, ground_truth/<d>, maps/<cat>/test/<d>.
  old_defects = sorted(p.name for p in (cat / "test").iterdir() if p.is_dir() and p.name != "good")
  defects = dict(zip(old_defects, [d for d in AD_DEFECTS if d not in old_defects]))
  for old, new in defects.items():
    for folder in (cat / "test", cat / "ground_truth", maps / "test"):
      (folder / old).rename(folder / new)

  # Test ids, per folder, in the same order; masks <id>_mask.png and maps <id>.tiff follow.
  ids = {}
  for folder in sorted(p for p in (cat / "test").iterdir() if p.is_dir()):
    ids[folder.name] = _renumber(p.stem for p in folder.glob("*.png"))
    for old, new in ids[folder.name].items():
      (folder / f"{old}.png").rename(folder / f"{new}.png")
      (maps / "test" / folder.name / f"{old}.tiff").rename(maps / "test" / folder.name / f"{new}.tiff")
      if folder.name != "good":
        gt = cat / "ground_truth" / folder.name
        (gt / f"{old}_mask.png").rename(gt / f"{new}_mask.png")

  # Two more training images.
  train = sorted((cat / "train/good").glob("*.png"))
  for k in range(2):
    shutil.copy(train[k % len(train)], cat / "train/good" / f"{len(train) + 100 + k:03d}.png")

  for image in doc["images"]:
    path = pathlib.PurePosixPath(image["path"])  # test/<folder>/<id>.png
    folder = path.parent.name
    new_folder = defects.get(folder, folder)
    image["path"] = f"test/{new_folder}/{ids[new_folder][path.stem]}.png"
    image["label"] = defects.get(image["label"], image["label"])
  doc["object"], doc["dataset_dir"], doc["anomaly_maps_dir"] = new_cat, data_dir, maps_dir
  for key in [k for k in doc if k.startswith("official_cli_metrics_json_at_")]:
    doc[key] = _rename_key(doc[key], old_cat, new_cat)
  _write(part / "expected.json", doc)
  return {
    "category": [old_cat, new_cat],
    "defects": defects,
    "test_ids": ids,
    "folders": {"dataset/": data_dir, "anomaly_maps/": maps_dir},
    "train_images": [len(train), len(train) + 2],
  }


# --------------------------------------------------------------------------------------- MVTec LOCO


def mvtec_loco(part: pathlib.Path) -> dict:
  doc = _read(part / "expected.json")
  old_obj = doc["object"]
  new_obj = _pick(LOCO_OBJECTS, old_obj)
  data_dir = "data_v/"
  (part / doc["dataset_dir"]).rename(part / data_dir)
  obj = (part / data_dir / old_obj).rename(part / data_dir / new_obj)
  cases = [k for k, v in doc.items() if isinstance(v, dict) and "anomaly_maps_dir" in v]
  map_dirs = {}
  for case in cases:
    new_dir = f"maps_{case}_v/"
    (part / doc[case]["anomaly_maps_dir"]).rename(part / new_dir)
    (part / new_dir / old_obj).rename(part / new_dir / new_obj)
    map_dirs[doc[case]["anomaly_maps_dir"]] = new_dir
    doc[case]["anomaly_maps_dir"] = new_dir
    new_json = f"metrics_{case}_v.json"
    (part / doc[case]["metrics_json"]).rename(part / new_json)
    doc[case]["metrics_json"] = new_json

  # Defect names and pixel values: the config, every ground-truth PNG, expected.json.
  config = _read(obj / "defects_config.json")
  names = {d["defect_name"]: f"{d['defect_name']}_v" for d in config}
  values = {d["pixel_value"]: d["pixel_value"] - 10 * (i + 1) for i, d in enumerate(config)}
  for d in config + doc["defects_config"]:
    d["defect_name"], d["pixel_value"] = names[d["defect_name"]], values[d["pixel_value"]]
  _write(obj / "defects_config.json", config)
  for png in sorted((obj / "ground_truth").rglob("*.png")):
    mask = np.asarray(Image.open(png))
    out = np.zeros_like(mask)
    for old, new in values.items():
      out[mask == old] = new
    assert np.array_equal(out != 0, mask != 0), f"{png}: a pixel value outside defects_config.json"
    Image.fromarray(out).save(png)

  # Test ids per split, in the same order: test/<split>/<id>.png, ground_truth/<split>/<id>/, maps.
  ids = {}
  for split in sorted(p.name for p in (obj / "test").iterdir() if p.is_dir()):
    ids[split] = _renumber(p.stem for p in (obj / "test" / split).glob("*.png"))
    for old, new in ids[split].items():
      (obj / "test" / split / f"{old}.png").rename(obj / "test" / split / f"{new}.png")
      if (obj / "ground_truth" / split / old).is_dir():
        (obj / "ground_truth" / split / old).rename(obj / "ground_truth" / split / new)
      for new_dir in map_dirs.values():
        tiff = part / new_dir / new_obj / "test" / split
        (tiff / f"{old}.tiff").rename(tiff / f"{new}.tiff")
  for image in doc["images"]:
    image["id"] = ids[image["split"]][image["id"]]
    for c in image["channels"]:
      c["defect"], c["pixel_value"] = names[c["defect"]], values[c["pixel_value"]]

  # One more training image, one validation image fewer (neither is evaluated).
  train = sorted((obj / "train/good").glob("*.png"))
  shutil.copy(train[0], obj / "train/good" / f"{len(train) + 100:03d}.png")
  validation = sorted((obj / "validation/good").glob("*.png"))
  assert len(validation) >= 2, "the LOCO fixture needs two validation images to drop one"
  validation[-1].unlink()

  doc["object"], doc["dataset_dir"] = new_obj, data_dir
  _write(part / "expected.json", doc)
  return {
    "object": [old_obj, new_obj],
    "defect_names": names,
    "pixel_values": values,
    "test_ids": ids,
    "folders": {"dataset/": data_dir, **map_dirs},
    "train_images": [len(train), len(train) + 1],
    "validation_images": [len(validation), len(validation) - 1],
  }


# --------------------------------------------------------------------------------------- preprocess


def preprocess(part: pathlib.Path) -> dict:
  doc = _read(part / "preprocess.json")
  files = sorted({c["image"] for c in doc["cases"]})
  renamed = {f: str(pathlib.PurePosixPath(f).with_name("v_" + pathlib.PurePosixPath(f).name)) for f in files}
  for old, new in renamed.items():
    (part / old).rename(part / new)
  for case in doc["cases"]:
    case["image"] = renamed[case["image"]]
  if "files_sha256" in doc:  # keyed by bare file name
    names = {pathlib.PurePosixPath(o).name: pathlib.PurePosixPath(n).name for o, n in renamed.items()}
    doc["files_sha256"] = {names.get(k, k): v for k, v in doc["files_sha256"].items()}
  _write(part / "preprocess.json", doc)
  return {"images": renamed}


def make_variant(source: pathlib.Path, out: pathlib.Path) -> dict:
  if out.exists():
    shutil.rmtree(out)
  shutil.copytree(source, out, ignore=shutil.ignore_patterns("__pycache__"))
  changes = {
    "source": str(source),
    "mvtec_ad": mvtec_ad(out / "mvtec_ad"),
    "mvtec_loco": mvtec_loco(out / "mvtec_loco"),
  }
  if (out / "preprocess" / "preprocess.json").exists():
    changes["preprocess"] = preprocess(out / "preprocess")
  _write(out / "VARIANT.json", changes)
  return changes


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("out", type=pathlib.Path, help="output folder (replaced if it exists)")
  parser.add_argument(
    "--source",
    type=pathlib.Path,
    default=REPO / "tests" / "fixtures",
    help="fixture set to start from (default: the vendored tests/fixtures)",
  )
  args = parser.parse_args(argv)
  changes = make_variant(args.source, args.out)
  print(f"variant of {args.source} written to {args.out}:")
  print(json.dumps({k: v for k, v in changes.items() if k != "source"}, indent=1)[:3000])


if __name__ == "__main__":
  main()
