"""What a wheel of aiproxy holds: every package of the source tree."""

from __future__ import annotations

from pathlib import Path

from aiproxy.rules.toml import tomllib

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_is_listed_for_the_wheel() -> None:
    """Each folder of ``aiproxy/`` with an ``__init__.py`` is in ``pyproject.toml``'s
    package list, so that an installed aiproxy is the whole of it (a missing one only
    shows in an installed copy, as CI's is)."""
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "aiproxy").rglob("__init__.py")
    }
    assert found - listed == set()
