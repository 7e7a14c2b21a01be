"""The package version, defined once: `version` in pyproject.toml, read here from the
installed distribution's metadata (importlib.metadata), never written a second time.

A tree imported without being installed (no `tokenfeed` distribution) reports
"0+unknown" rather than failing: the version is information, never a gate; what two
processes must agree on is the protocol version (common/protocol.py).
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "tokenfeed"


@cache
def package_version() -> str:
    """The installed tokenfeed's version, e.g. "0.2.0"."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "0+unknown"
