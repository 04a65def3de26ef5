"""Where a command may write: never over an input, never over existing work unless told.

Rules, for every command that writes a folder (convert, distill, import-tinyllava, data synth, teacher-export,
demo, bench) or a file (eval):
- an output that is, contains or lies inside one of the command's inputs (a model folder, the records file,
  an image folder) or the installed package is refused, `--overwrite` or not: replacing it would delete the input;
- an existing non-empty output folder is refused unless `overwrite` (the caller may allow its own earlier
  output, e.g. a resumed run);
- what an interrupted write left beside the output is tidied, and said (`clean_interrupted_writes`).
Paths are compared after resolving symlinks, so a link to the teacher is the teacher.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from matvlm.errors import OutputError
from matvlm.io.files import clean_interrupted_writes

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def _resolved(path: str | os.PathLike[str]) -> Path:
    return Path(path).expanduser().resolve()


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def input_clash(out: str | os.PathLike[str], inputs: dict[str, Iterable[str | os.PathLike[str]] | str | os.PathLike[str] | None]) -> str | None:
    """Why writing `out` would touch an input, or None. `inputs`: role -> a path or paths (None entries skipped);
    a file input protects itself, a folder input itself and everything inside it."""
    target = _resolved(out)
    named = {**inputs, "installed matvlm package": PACKAGE_DIR}
    for role, paths in named.items():
        if paths is None:
            continue
        for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
            if path is None or str(path) == "":
                continue
            source = _resolved(path)
            if target == source:
                return f"it is the {role} ({path}): writing it would replace the {role}"
            if _inside(source, target):
                return f"it contains the {role} ({path}): replacing it would delete the {role}"
            if source.is_dir() and _inside(target, source):
                return f"it lies inside the {role} ({path}): inputs are never written into"
    return None


def check_output_dir(out: str | os.PathLike[str], inputs: dict, *, overwrite: bool = False,
                     own_output: bool = False, option: str = "--out") -> list[str]:
    """Refuse an output folder that would destroy an input or existing work (see the module's rules).

    `own_output`: the folder is this command's own earlier output (a resumed run), so it may be replaced without
    `overwrite`. Returns notes about leftovers of an interrupted write that were tidied.
    """
    out = Path(out)
    clash = input_clash(out, inputs)
    if clash:
        raise OutputError(f"refusing to write {option} {out}: {clash}. Choose another output folder")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{option} {out} is a file, not a folder")
    notes = clean_interrupted_writes(out)
    if out.is_dir() and any(out.iterdir()) and not (overwrite or own_output):
        raise OutputError(f"{option} {out} exists and is not empty; pass --overwrite to replace it, or choose "
                          "another folder")
    return notes


def check_output_file(out: str | os.PathLike[str], inputs: dict, option: str = "--out") -> None:
    """Refuse an output file that is or lies inside an input, that is a folder, or whose folder cannot be
    written: checked before the work that produces it."""
    out = Path(out)
    clash = input_clash(out, inputs)
    if clash:
        raise OutputError(f"refusing to write {option} {out}: {clash}. Choose another output file")
    if out.is_dir():
        raise OutputError(f"{option} {out} is a folder; give a file name")
    folder = out.parent
    while not folder.exists():  # the first existing ancestor is where the folders will be made
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise OutputError(f"cannot write {option} {out}: {folder} is not a writable folder")


def check_distill_outputs(cfg, overwrite: bool = False, resume: bool = False) -> list[str]:
    """A distillation's output folder and run folder (`OUT.run/`) against its inputs; the finished hybrid of the
    same run may be rewritten when it resumes."""
    if not cfg.out:
        return []
    out = Path(cfg.out)
    run_dir = out.with_name(out.name + ".run")
    inputs = {"teacher": cfg.teacher, "student": cfg.student or None, "records file": cfg.data,
              "image folder": cfg.images, "held-out records file": cfg.eval_data or None}
    own = resume and (run_dir / "config.json").is_file()
    notes = check_output_dir(out, inputs, overwrite=overwrite, own_output=own)
    return notes + check_output_dir(run_dir, inputs, own_output=True, option="run folder")
