"""Refuse a bundle whose files do not match its manifest, before anything runs.

A bundle is trusted only as far as its manifest: every file it names must exist and every initializer's bytes
in the data file must hash to the manifest's sha256. A mismatch (a tampered or truncated data file, a manifest
from another export) raises :class:`~flexi_export.errors.BundleError` with one line.
"""

from __future__ import annotations

import hashlib
import mmap
from pathlib import Path
from typing import Any

from flexi_export.errors import BundleError, InputError
from flexi_export.export.manifest import load_manifest


def check_integrity(bundle: str | Path) -> dict[str, Any]:
    """Return the manifest of a bundle whose files and weight hashes match it; raise :class:`BundleError`."""
    folder = Path(bundle)
    if not folder.is_dir():
        raise InputError(f"no such bundle folder: {folder}")
    try:
        manifest = load_manifest(folder)
    except InputError as exc:
        raise BundleError(str(exc)) from None
    for key in ("model", "data"):
        path = folder / manifest["files"][key]
        if not path.is_file():
            raise BundleError(f"{folder}: {manifest['files'][key]} named by the manifest is missing")
    if not (folder / "reference.npz").is_file():
        raise BundleError(f"{folder}: reference.npz is missing")
    data = folder / manifest["files"]["data"]
    size = data.stat().st_size
    with open(data, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else _Empty() as view:
        for row in manifest["initializers"]:
            end = row["offset"] + row["bytes"]
            if end > size:
                raise BundleError(f"{data} is truncated: {row['name']} ends at byte {end}, the file has {size}")
            digest = hashlib.sha256(view[row["offset"] : end]).hexdigest()
            if digest != row["sha256"]:
                raise BundleError(
                    f"{data} does not match manifest.json: {row['name']} hashes to {digest[:12]}, "
                    f"the manifest says {row['sha256'][:12]} (re-export the bundle)"
                )
    return manifest


class _Empty:
    """Stands in for the mmap of an empty file (mmap refuses length 0)."""

    def __enter__(self) -> bytes:
        return b""

    def __exit__(self, *exc: object) -> None:
        return None
