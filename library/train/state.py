"""Training states on disk: what a complete `--save_state` folder holds, the newest one of a run
(`--resume latest`), and what an interrupted save (a kill -9, a full disk) leaves behind.

A state folder is accelerate's files (weights, optimizer, schedule, every process's random
state) plus `train_state.json` (epoch, global step, position in the epoch), written last into a
hidden temporary folder that is renamed into place once every process has finished (see
TrainLoop.save_state). Only complete folders are ever resumed from.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from library.errors import UserError

STATE_FILE = "train_state.json"  # marks a --save_state folder: epoch, global step, data position
PROGRESS_KEYS = ("epoch", "global_step", "batch_in_epoch")
LATEST = "latest"


def read_progress(folder: Path) -> dict[str, int] | None:
    """The progress a state folder records, or None when its train_state.json is missing or damaged."""
    try:
        progress = json.loads((Path(folder) / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(progress, dict) or not all(isinstance(progress.get(k), int) for k in PROGRESS_KEYS):
        return None
    return {k: progress[k] for k in PROGRESS_KEYS}


def _has(folder: Path, *prefixes: str) -> bool:
    return any(p.name.startswith(prefixes) for p in folder.iterdir())


def missing_parts(folder: Path) -> list[str]:
    """What a state folder lacks to be resumed from: accelerate's weights, optimizer, schedule and
    random states (under DeepSpeed/FSDP the weights and optimizer are sub-folders of shards), and
    our train_state.json."""
    folder = Path(folder)
    if not folder.is_dir():
        return ["the folder"]
    missing = [] if read_progress(folder) is not None else [STATE_FILE]
    for what, prefixes in (("weights", ("model", "pytorch_model")), ("optimizer state", ("optimizer",)),
                           ("schedule", ("scheduler",)), ("random states", ("random_states_",))):
        if not _has(folder, *prefixes):
            missing.append(what)
    return missing


def is_complete(folder: Path) -> bool:
    return not missing_parts(folder)


def _state_name(output_name: str) -> re.Pattern:
    # NAME-state (the end), NAME-step00000500-state (--save_every_n_steps, signals), NAME-000002-state (epochs)
    return re.compile(rf"^{re.escape(output_name)}(?:-step\d{{8}}|-\d{{6}})?-state$")


def latest_state(output_dir: Path, output_name: str) -> Path | None:
    """The complete state of `output_name` in `output_dir` that is furthest along (by global step,
    then epoch, then modification time), or None."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    pattern = _state_name(output_name)
    found = []
    for folder in output_dir.iterdir():
        if folder.is_dir() and pattern.match(folder.name) and is_complete(folder):
            progress = read_progress(folder)
            found.append(((progress["global_step"], progress["epoch"], folder.stat().st_mtime_ns), folder))
    return max(found)[1] if found else None


def check_state(folder: Path, flag: str = "--resume") -> Path:
    """`folder` as a state to resume from; a clear UserError naming what is wrong otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{flag} {folder}: no such folder (give a NAME-state folder written with --save_state, or latest)")
    if read_progress(folder) is None:
        if not (folder / STATE_FILE).is_file():
            raise UserError(f"{flag} {folder}: not a training state folder (no {STATE_FILE}; "
                            "give a NAME-state folder written with --save_state)")
        raise UserError(f"{flag} {folder}: {STATE_FILE} is unreadable or incomplete (needs {', '.join(PROGRESS_KEYS)})")
    missing = missing_parts(folder)
    if missing:
        raise UserError(f"{flag} {folder}: the state is incomplete (no {', '.join(missing)}); resume from another one")
    return folder


def resolve_resume(resume: str, output_dir: str | os.PathLike, output_name: str) -> Path | None:
    """The state folder `--resume` names: none, a folder, or `latest`, the newest complete state of
    this --output_dir / --output_name."""
    if not resume:
        return None
    if resume != LATEST:
        return check_state(Path(resume))
    found = latest_state(Path(output_dir), output_name)
    if found is None:
        raise UserError(f"--resume latest: {output_dir} holds no complete training state of {output_name!r} "
                        f"({output_name}-state, {output_name}-stepNNNNNNNN-state, ...); start without --resume "
                        "(states are written with --save_state, and on SIGTERM/SIGINT)")
    return found


def clean_interrupted_saves(output_dir: Path, output_name: str) -> list[str]:
    """Remove what an interrupted save of `output_name` left in `output_dir` (and its sample/
    folder): the hidden temporary files and folders of atomic writes, and a state folder's hidden
    previous copy (`.NAME-state.old`), which is put back in place if the folder itself is gone (a
    kill between the two renames of a replacement). Returns a line per thing done."""
    done = []
    for folder in (Path(output_dir), Path(output_dir) / "sample"):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            name = path.name
            if not name.startswith((f".{output_name}-", f".{output_name}.", f".{output_name}_")):
                continue
            if name.endswith(".old") and path.is_dir():
                target = path.with_name(name[1 : -len(".old")])
                if not target.exists() and is_complete(path):
                    os.replace(path, target)
                    done.append(f"restored {target.name} (its replacement was interrupted)")
                    continue
            elif ".tmp" not in name:
                continue
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            done.append(f"removed {path} (left by an interrupted save)")
    return done
