"""The README documents every setting the proxy reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from aiproxy.config import settings

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize("setting", list(settings()), ids=lambda s: s.env)
def test_readme_lists_every_setting(setting) -> None:
    """Each environment variable appears in the README's table with its flag and default
    (an empty default as "(none)")."""
    rows = [line for line in README.read_text().splitlines() if f"| `{setting.env}` |" in line]
    assert len(rows) == 1, f"{setting.env} is not in the README's settings table"
    assert f"`--{setting.flag}`" in rows[0]
    default = setting.show_default()
    assert (f"`{default}`" if default else "(none)") in rows[0]
