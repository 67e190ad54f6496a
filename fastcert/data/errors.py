"""Missing data sets: :class:`DatasetNotFoundError`, whose message names the expected path and
how to obtain the files, and the translation of torchvision's own "not found" errors into it."""
from __future__ import annotations

import os
from collections.abc import Sequence
from urllib.error import URLError


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are missing (or fail their checksum) under the configured root."""


def not_found(name: str, path: str, how: str, detail: str = "") -> DatasetNotFoundError:
    msg = f"{name} not found: expected its files under '{path}'."
    if detail:
        msg += f" {detail}"
    msg += f" To get them: {how}"
    return DatasetNotFoundError(msg)


def torchvision_howto(path: str) -> str:
    return (
        "run once with data.download=true on a machine with network access, "
        f"or copy torchvision's files for this dataset to '{path}' (and point data.root at "
        f"their parent)."
    )


def load_torchvision(cls, name: str, root: str, path: str, expected: Sequence[str],
                     download: bool, **kw):
    """Construct a torchvision dataset, turning its 'Dataset not found' errors into ours."""
    try:
        return cls(root, download=download, **kw)
    except RuntimeError as e:
        text = str(e)
        if "not found" not in text.lower() and not download:
            raise
        missing = [f for f in expected if not os.path.isfile(os.path.join(path, f))]
        if download and "not found" not in text.lower():
            short = " ".join(text.split())[:400] or type(e).__name__
            detail = f"Downloading failed ({short})."
        elif missing:
            detail = f"Missing: {', '.join(missing)}."
        else:
            detail = (
                "The files are present but failed torchvision's MD5 check "
                "(corrupted, or not the official files)."
            )
        raise not_found(name, path, torchvision_howto(path), detail) from e
    except URLError as e:  # download=True without network (some torchvision paths raise it)
        raise not_found(name, path, torchvision_howto(path), f"Downloading failed ({e}).") from e
