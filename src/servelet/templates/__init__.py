"""Starting folders for `servelet new`: a working model the user edits into their own."""

from __future__ import annotations

import shutil
from pathlib import Path

HERE = Path(__file__).parent
NAME_MARK = "__NAME__"  # replaced by the folder's name in the template's text files


class TemplateError(ValueError):
    """The template cannot be written there; the message says why."""


def write_template(kind: str, target: Path) -> list[Path]:
    """Copy template `kind` into the new folder `target`, naming it; refuse a folder that already holds files."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise TemplateError(f"{target} already exists and is not an empty folder: pick a new name")
    shutil.copytree(HERE / kind, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
    written = sorted(p for p in target.rglob("*") if p.is_file())
    for path in written:
        if path.suffix in (".md", ".py", ".txt"):
            path.write_text(path.read_text().replace(NAME_MARK, target.resolve().name))
    return written
