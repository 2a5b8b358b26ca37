"""File helpers: all-or-nothing output folders and content hashes."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flexi_export.errors import InputError


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an output path that is a file, or a non-empty folder without ``overwrite``."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise InputError(f"output {out} exists and is not a folder")
        if any(out.iterdir()) and not overwrite:
            raise InputError(f"output folder {out} exists and is not empty (pass --overwrite to replace it)")
    return out


@contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; on success it replaces ``out``, on any error (or Ctrl-C) it
    is deleted, so ``out`` is never left half-written."""
    out = check_output_dir(out, overwrite).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def update_digest(digest: hashlib._Hash, path: str | Path, chunk: int = 1 << 22) -> None:
    """Feed a file's bytes to ``digest`` in chunks (constant memory for multi-GB weight files)."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    update_digest(digest, path)
    return digest.hexdigest()
