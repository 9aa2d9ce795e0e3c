"""Optional test dependencies (DeepSpeed, transformers, accelerate, shellcheck, SLURM, ptxas).

On a developer machine that lacks one, the tests needing it are skipped with the reason and the
install command. Where ``FLASHOPTIM_REQUIRE_OPTIONAL=1`` — ``tests/run.sh`` sets it, since it
installs every one of them — a missing dependency is a failure instead: there a skip would only
hide a broken installation, and CI would pass without running those tests.
"""

from __future__ import annotations

import importlib
import os

import pytest

REQUIRED = os.environ.get("FLASHOPTIM_REQUIRE_OPTIONAL") == "1"


def missing(reason: str, *, module_level: bool = False) -> None:
    """Skip (or, where everything is required, fail) with ``reason``."""
    if REQUIRED:
        pytest.fail(f"{reason} [FLASHOPTIM_REQUIRE_OPTIONAL=1: tests/run.sh installs it, so the setup is broken]",
                    pytrace=False)
    pytest.skip(reason, allow_module_level=module_level)


def require_module(name: str, pip_name: str = None, *, module_level: bool = False):
    """Import ``name`` or skip/fail naming ``pip install <pip_name>``."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        missing(f"optional dependency {name!r} cannot be imported ({e}); `pip install {pip_name or name}`",
                module_level=module_level)
