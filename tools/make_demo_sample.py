"""Draws the small attributed demo sample shipped in data/demo from TrashNet.

    python tools/make_demo_sample.py ../shared/datasets/trashnet data/demo

Images are picked deterministically (by a hash of the file name), re-encoded at 160x120, and
split into seed (the first labeled set), eval (the fixed evaluation set) and stream (replayed
as camera frames). Re-running it gives the same files.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

import cv2

SPLITS = {"seed": 6, "eval": 20, "stream": 40}
SIZE = (160, 120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trashnet", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    for split in SPLITS:
        shutil.rmtree(args.out / split, ignore_errors=True)
    for class_dir in sorted(p for p in args.trashnet.iterdir() if p.is_dir()):
        files = sorted(
            class_dir.glob("*.jpg"), key=lambda p: hashlib.sha256(p.name.encode()).hexdigest()
        )
        start = 0
        for split, count in SPLITS.items():
            target = args.out / split / class_dir.name
            target.mkdir(parents=True, exist_ok=True)
            for path in files[start : start + count]:
                image = cv2.imread(str(path))
                small = cv2.resize(image, SIZE, interpolation=cv2.INTER_AREA)
                cv2.imwrite(str(target / path.name), small, [cv2.IMWRITE_JPEG_QUALITY, 85])
            start += count
    print(f"wrote {sum(1 for _ in args.out.rglob('*.jpg'))} images to {args.out}")


if __name__ == "__main__":
    main()
