"""Prepare TinyImageNet (``tiny-imagenet-200``) for ``torchvision.datasets.ImageFolder``.

Usage::

    python -m fastcert.prep_tinyimagenet --root ./data             # download, extract, reorganise
    python -m fastcert.prep_tinyimagenet --root ./data --zip PATH  # from a zip you already have

The archive holds ``train/<wnid>/images/*.JPEG`` (ImageFolder reads that as is: it walks class
folders recursively) but a flat ``val/images/*.JPEG`` with labels in ``val/val_annotations.txt``
(tab separated: file name, wnid, bounding box). :func:`reorganize_val` moves every validation image
to ``val/<wnid>/<file>`` and removes the then empty ``val/images``, so ImageFolder sees the same
sorted wnids, hence the same class indices, for train and val.

Every step is idempotent: an existing extraction is not extracted again, an existing zip is not
downloaded again, and images already moved stay where they are.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import urllib.request
import zipfile
from pathlib import Path
from urllib.error import URLError

__all__ = ["URL", "DIRNAME", "download", "extract", "reorganize_val", "prepare", "main"]

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
DIRNAME = "tiny-imagenet-200"
ZIPNAME = "tiny-imagenet-200.zip"


def _dataset_dir(root_dir: str | os.PathLike) -> Path:
    """Accept either the ``tiny-imagenet-200`` folder itself or the data root that contains it."""
    p = Path(root_dir)
    if not (p / "val").is_dir() and (p / DIRNAME / "val").is_dir():
        return p / DIRNAME
    return p


def download(url: str, dest: str | os.PathLike, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` (via ``dest.part``, renamed when complete)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    print(f"downloading {url} -> {dest}", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, "wb") as out:
            shutil.copyfileobj(resp, out, length=1 << 20)
    except (URLError, OSError) as e:
        part.unlink(missing_ok=True)
        raise RuntimeError(
            f"could not download {url} ({e}). This needs network access: download the zip on a "
            f"machine that has it and run again with --zip PATH/TO/{ZIPNAME}."
        ) from e
    os.replace(part, dest)
    return dest


def extract(zip_path: str | os.PathLike, root: str | os.PathLike) -> Path:
    """Extract the archive into ``root`` (skipped if ``root/tiny-imagenet-200/train`` exists)."""
    root = Path(root)
    target = root / DIRNAME
    if (target / "train").is_dir() and (target / "val").is_dir():
        print(f"{target} already extracted", flush=True)
        return target
    zip_path = Path(zip_path)
    if not zipfile.is_zipfile(zip_path):
        raise RuntimeError(f"'{zip_path}' is not a readable zip file")
    root.mkdir(parents=True, exist_ok=True)
    print(f"extracting {zip_path} -> {root}", flush=True)
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
        if not any(n.startswith(DIRNAME + "/") for n in names):
            raise RuntimeError(f"'{zip_path}' does not contain a top-level '{DIRNAME}/' folder")
        zf.extractall(root)  # ZipFile.extract drops absolute paths and '..' components
    return target


def reorganize_val(root_dir: str | os.PathLike) -> int:
    """Move ``val/images/<f>`` to ``val/<wnid>/<f>`` following ``val/val_annotations.txt``.

    ``root_dir`` is the ``tiny-imagenet-200`` folder (the data root containing it also works).
    Returns how many images were moved (0 on a second run). Raises ``FileNotFoundError`` if an
    annotated image is neither in ``val/images`` nor already in its class folder.
    """
    base = _dataset_dir(root_dir)
    val = base / "val"
    ann = val / "val_annotations.txt"
    if not ann.is_file():
        raise FileNotFoundError(f"'{ann}' not found: is '{base}' an extracted tiny-imagenet-200 "
                                f"folder?")
    images = val / "images"
    moved, missing = 0, []
    with open(ann, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) < 2:
                raise ValueError(f"{ann}:{lineno}: expected 'file<TAB>wnid<TAB>...', got {line!r}")
            fname, wnid = parts[0].strip(), parts[1].strip()
            for s in (fname, wnid):
                if not s or s in (".", "..") or "/" in s or "\\" in s:
                    raise ValueError(f"{ann}:{lineno}: bad entry {s!r}")
            src, dst = images / fname, val / wnid / fname
            if src.is_file():
                dst.parent.mkdir(exist_ok=True)
                os.replace(src, dst)
                moved += 1
            elif not dst.is_file():
                missing.append(fname)
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} validation image(s) listed in '{ann}' are in neither '{images}' nor "
            f"their class folder, e.g. {missing[:5]}"
        )
    if images.is_dir() and not any(images.iterdir()):
        images.rmdir()
    return moved


def prepare(root: str | os.PathLike, zip_path: str | os.PathLike | None = None,
            url: str = URL) -> Path:
    """Download (unless ``zip_path`` is given), extract and reorganise; returns the dataset
    folder."""
    root = Path(root)
    target = root / DIRNAME
    if not ((target / "train").is_dir() and (target / "val").is_dir()):
        if zip_path is None:
            zip_path = root / ZIPNAME
            if not (zip_path.is_file() and zipfile.is_zipfile(zip_path)):
                download(url, zip_path)
        extract(zip_path, root)
    n = reorganize_val(target)
    print(f"{target}: moved {n} validation image(s) into class folders", flush=True)
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastcert.prep_tinyimagenet",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="./data",
                    help="data root; the dataset goes to ROOT/tiny-imagenet-200")
    ap.add_argument("--zip", dest="zip_path", default=None,
                    help="use this tiny-imagenet-200.zip instead of downloading")
    ap.add_argument("--url", default=URL, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        prepare(args.root, args.zip_path, args.url)
    except (RuntimeError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
