"""The embedded default: a procedurally generated visual-QA world, the recipe that trains its small teacher,
the shipped models and the demo."""

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
SHIPPED_TEACHER = ASSETS / "teacher"  # trained by `matvlm teacher` on this world; see its README.md
