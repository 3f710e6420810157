"""Shared fixtures: tiny real checkpoints of every supported variant, built once per session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import VARIANTS, build_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """checkpoint_factory(variant, **config_overrides) -> folder; cached per session."""
    built: dict[tuple, Path] = {}

    def make(variant: str, **overrides) -> Path:
        key = (variant, tuple(sorted(overrides.items())))
        if key not in built:
            name = variant + "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
            built[key] = build_tiny_checkpoint(variant, tmp_path_factory.mktemp(name), **overrides)
        return built[key]

    return make


@pytest.fixture(scope="session", params=list(VARIANTS))
def any_checkpoint(request, checkpoint_factory) -> tuple[str, Path]:
    """(variant, folder) for each of the six supported variants."""
    return request.param, checkpoint_factory(request.param)


@pytest.fixture(scope="session")
def stablelm_checkpoint(checkpoint_factory) -> Path:
    return checkpoint_factory("stablelm-3b")


@pytest.fixture(scope="session")
def starcoder2_checkpoint(checkpoint_factory) -> Path:
    return checkpoint_factory("starcoder2")
