"""The README documents every setting the services read."""

from __future__ import annotations

from pathlib import Path

from tenants.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_setting_is_documented():
    text = README.read_text()
    missing = [f"TAILOR_{name.upper()}" for name in Settings.model_fields if f"TAILOR_{name.upper()}" not in text]
    assert not missing, f"settings missing from README.md: {missing}"


def test_readme_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    block = lines[lines.index("```") + 1: lines.index("```") + 3]
    assert block[0].startswith("make serve") and block[1].startswith("make test")
