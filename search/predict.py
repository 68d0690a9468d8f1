"""Use a finalized model on new images, without Ray.

    python -m search.predict --model experiments/backbones-20261123-0100/final/ensemble \\
        --images new_xrays/ --out predictions.csv

Writes a CSV with `path`, `p_<class>` per class (calibrated probabilities) and `predicted` (the
class at the model's threshold); with `--saliency DIR` also a Grad-CAM overlay per image. The model
directory format is described in `search/final/saved_model.py`.

With labels, a test on data from elsewhere (`search/final/external.py`): the CSV gains `label`, and beside it
`<out>.md` (the final report's read-out, the drop from the internal test), `<out>.json` and `<out>_roc.png`:

    python -m search.predict --model experiments/lite-x/final/ensemble \
        --data ../shared/data/covid-ct-ucsd/patients.csv --class-map NonCOVID=non-COVID --out ucsd.csv
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from core.formatting import figure
from core.errors import UserError
from search.cli import handle_errors
from search.data.external_sets import load_externals
from search.final.external import evaluate_external, external_lines
from search.outputs.plots import plot_external_roc
from search.outputs.records import versions, write_atomic, write_json
from search.final.saliency import write_overlays
from search.final.saved_model import SavedModel, device_name, image_files, load_model, predict_files
from ingest.decoding import decode_images


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m search.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory: <experiment>/final/ensemble")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--images", help="an image file, or a folder searched recursively")
    given.add_argument("--data", help="a labelled data set from elsewhere (image folder of class folders, .npz or CSV "
                                      "manifest): its predictions with their labels and the read-out of the final "
                                      "report on them, the model's threshold unchanged")
    p.add_argument("--class-map", action="append", metavar="THEIRS=OURS",
                   help="with --data: the model's class for a class of the set whose name differs beyond case, spaces "
                        "and punctuation (repeatable)")
    p.add_argument("--out", required=True, help="CSV to write: path, p_<class> per class, predicted")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--skip-corrupt", action="store_true",
                   help="predict the readable images; an unreadable one gets a row with its reason in `error`")
    p.add_argument("--saliency", help="folder to write one Grad-CAM overlay per image into (<image path>.png), "
                                      "for the class each was called")
    return p


def predict(args: argparse.Namespace) -> None:
    out = Path(args.out).expanduser()
    if not out.parent.is_dir():
        raise UserError(f"--out {args.out!r}: folder {str(out.parent)!r} does not exist")
    if args.saliency and Path(args.saliency).expanduser().exists() and not Path(args.saliency).expanduser().is_dir():
        raise UserError(f"--saliency {args.saliency!r} is a file; give a folder (it is created if missing)")
    if args.class_map and not args.data:
        raise UserError("--class-map applies to a labelled set given with --data")
    model = load_model(args.model, device=device_name(args.device))
    if args.data:
        return predict_labelled(args, model, out)
    images = Path(args.images).expanduser()
    files = image_files(images)
    table = predict_files(model, files, root=images if images.is_dir() else None, skip_corrupt=args.skip_corrupt)
    write_atomic(out, lambda f: table.to_csv(f, index=False))
    predicted = table[table["predicted"].notna()]
    if args.saliency:
        pre, names = model.record["preprocessing"], model.class_names
        pixels, _, _ = decode_images(files, image_size=pre["image_size"], channels=pre["channels"],
                                     ct_window=pre.get("ct_window", "lung"), skip_corrupt=args.skip_corrupt)
        write_overlays(model, pixels, predicted["predicted"].map(names.index).to_numpy(),
                       list(predicted["path"]) if images.is_dir() else [images.name], Path(args.saliency).expanduser())
        print(f"saliency overlays: {args.saliency}")
    print(f"{len(predicted)} image(s) -> {out}: {predicted['predicted'].value_counts().to_dict()} (threshold "
          f"{model.record['threshold']:.3f} on p_{model.record['positive_class']})"
          + (f"; {len(table) - len(predicted)} unreadable (see the error column)" if len(table) > len(predicted) else ""))


def predict_labelled(args: argparse.Namespace, model: SavedModel, out: Path) -> None:
    """`--data`: the model on a labelled set, read out as an external test set of its final report."""
    pre = model.record["preprocessing"]
    ext = load_externals([args.data], args.class_map, classes=model.class_names, image_size=pre["image_size"],
                         channels=pre["channels"], ct_window=pre.get("ct_window", "lung"),
                         own_fingerprint=model.record.get("data", {}).get("fingerprint"),
                         skip_corrupt=args.skip_corrupt)[0]
    internal = _internal_test(Path(args.model).expanduser(), model)
    figures, probs = evaluate_external(model, ext, internal=internal)
    names, data = model.class_names, ext.data
    table = pd.DataFrame({"path": data.paths if data.paths is not None else np.arange(len(data.labels)),
                          "label": [names[k] for k in data.labels]})
    for c, name in enumerate(names):
        table[f"p_{name}"] = probs[:, c]
    table["predicted"] = [names[k] for k in model.decide(probs)]
    write_atomic(out, lambda f: table.to_csv(f, index=False))
    stem = out.with_suffix("")
    write_json(stem.with_suffix(".json"), {"model": str(args.model), "internal_test": internal, "external": figures,
                                           "versions": versions()})
    positive = names.index(model.record["positive_class"])
    plot_external_roc([(ext.name, data.labels == positive, probs[:, positive], figures)], names[positive],
                      Path(f"{stem}_roc.png"))
    lines = external_lines([figures], internal, plot=f"{stem.name}_roc.png")
    text = "\n".join([f"# {args.model} on {ext.name}", ""] + lines) + "\n"
    write_atomic(stem.with_suffix(".md"), lambda f: f.write_text(text))
    print(f"{len(table)} image(s) of {ext.name} -> {out}: AUC {figures['auc']:.4f} "
          f"[{figures['ci']['auc'][0]:.3f}, {figures['ci']['auc'][1]:.3f}], sensitivity {figure(figures['sensitivity'])}, "
          f"specificity {figure(figures['specificity'])}"
          + (f" (internal test AUC {internal['auc']:.4f})" if internal else "") + f"; read-out: {stem}.md")


def _internal_test(model_dir: Path, model: SavedModel) -> dict | None:
    """The model's figures on its internal test, from the final/metrics.json beside its folder (None
    where that is not there or belongs to other data)."""
    for path in (model_dir.parent / "metrics.json", model_dir.parent.parent / "metrics.json"):
        try:
            metrics = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if metrics.get("data", {}).get("fingerprint") == model.record.get("data", {}).get("fingerprint"):
            return metrics.get("models", {}).get(model.record.get("name"), {}).get("test")
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return handle_errors(lambda: predict(args))


if __name__ == "__main__":
    sys.exit(main())
