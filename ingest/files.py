"""Image files found under a folder, their paths under a root, and the phrases that list files in
messages (every unread file counted by kind, never skipped without a word).

Example:
    >>> images, unread = files_under(Path("data/train"))
    >>> unread_line(unread)
    '3 .txt files, 1 hidden files'
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from ingest.dicom import DICOM_EXTENSIONS, is_dicom

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", *DICOM_EXTENSIONS)
_IMAGE_SUFFIXES = frozenset(IMAGE_EXTENSIONS)
MAX_LISTED = 10


def files_under(folder: Path) -> tuple[list[str], Counter]:
    """The image files under `folder` (recursively; paths as strings, in the order of their path
    parts), and the files left unread, counted by kind (their extension; hidden files; files with no
    extension that are not DICOM), so that none is skipped without a word. A file with no extension
    is an image when it carries the DICOM preamble. Strings, not `Path`s: on 200,000 files pathlib
    alone costs seconds."""
    images, unread = [], Counter()
    for here, subdirs, names in os.walk(folder):  # scandir underneath: no stat per file
        inside = relative_path(here, folder)
        hidden = inside != "." and any(part.startswith(".") for part in inside.split("/"))
        prefix = os.path.join(here, "")
        for name in names:
            dot = name.rfind(".")
            suffix = name[dot:].lower() if dot > 0 else ""  # os.path.splitext's rule, without its cost per file
            if hidden or name.startswith("."):
                unread["hidden files"] += 1
            elif suffix in _IMAGE_SUFFIXES or (not suffix and _has_dicom_preamble(prefix + name)):
                images.append(prefix + name)
            else:
                unread[f"{suffix} files" if suffix else "files with no extension (not DICOM)"] += 1
    # the order of their path parts: the path with its separators as the smallest character
    images.sort(key=lambda p: p.replace(os.sep, "\0"))
    return images, unread


def relative_path(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """`path` under `root` as a '/'-separated string ("." for `root` itself)."""
    return relative_paths([path], root)[0]


def relative_paths(paths: list, root: str | os.PathLike) -> list[str]:
    """Each of `paths` under `root`, as `relative_path` gives it (the prefix worked out once: this
    runs over every file of a data set)."""
    prefix = os.path.join(os.fspath(root), "")
    out = []
    for path in map(os.fspath, paths):
        rel = path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, root)
        out.append(rel if os.sep == "/" else rel.replace(os.sep, "/"))
    return out


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return is_dicom(f.read(132))
    except OSError:
        return False


def unread_line(unread: Counter) -> str:
    """`Counter` of unread files as one phrase: "3 .txt files, 1 DICOM object without pixel data (SR)"."""
    return ", ".join(f"{n} {kind}" for kind, n in sorted(unread.items(), key=lambda kv: -kv[1]))


def listing(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")
