"""Library versions recorded in store attributes (what produced the numbers)."""

from __future__ import annotations

from importlib import metadata


def library_versions() -> dict[str, str]:
    """Installed versions of lessons and the libraries that shape stored values."""
    versions = {}
    for package in ("lessons", "torch", "numpy", "zarr"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions
