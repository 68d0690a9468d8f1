"""Write a MedMNIST-style .npz as an image folder of PNGs, the way users' own data looks.

    python -m bench.make_png_folder ../shared/data/pneumoniamnist/pneumoniamnist.npz /tmp/pneumonia-pngs

Grayscale PNGs of varied sizes (each image upscaled to a random side between --min-size and
--max-size, aspect ratio up to 1.15), class folders named with spaces, inside train/ val/ test/
so the split is the .npz's own (`--no-splits` writes class folders only).
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = {"pneumoniamnist": ["normal lung", "viral pneumonia"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("npz")
    p.add_argument("out")
    p.add_argument("--min-size", type=int, default=28)
    p.add_argument("--max-size", type=int, default=96)
    p.add_argument("--no-splits", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    arrays, out = np.load(args.npz), Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} is not empty")
    names = CLASS_NAMES.get(Path(args.npz).stem, None)
    rng = np.random.default_rng(args.seed)
    written = 0
    for split in ("train", "val", "test"):
        if f"{split}_images" not in arrays.files:
            continue
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"].ravel()
        for k, (image, label) in enumerate(zip(images, labels)):
            name = names[label] if names else f"class {label}"
            folder = out / name if args.no_splits else out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            side = int(rng.integers(args.min_size, args.max_size + 1))
            size = (side, int(side * rng.uniform(1.0, 1.15)))
            Image.fromarray(image).convert("L").resize(size, Image.BILINEAR).save(folder / f"{split} {k:05d}.png")
            written += 1
    print(f"wrote {written} PNGs under {out}")


if __name__ == "__main__":
    main()
