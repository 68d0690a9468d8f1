"""Use a finalized model on new images, without Ray.

    python -m search.predict --model experiments/backbones-20261123-0100/final/ensemble \\
        --images new_xrays/ --out predictions.csv

Writes a CSV with `path`, `p_<class>` per class (calibrated probabilities) and `predicted` (the
class at the model's threshold); with `--saliency DIR` also a Grad-CAM overlay per image. The model
directory format is described in `search/saved_model.py`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from search.cli import handle_errors
from search.records import write_atomic
from search.saliency import write_overlays
from search.saved_model import device_name, image_files, load_model, predict_files
from trainables import UserError
from trainables.ingest.decoding import decode_images


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m search.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory: <experiment>/final/ensemble")
    p.add_argument("--images", required=True, help="an image file, or a folder searched recursively")
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
    model = load_model(args.model, device=device_name(args.device))
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return handle_errors(lambda: predict(args))


if __name__ == "__main__":
    sys.exit(main())
