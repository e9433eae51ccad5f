"""Checkpoints that survive a killed job: atomic writes, truncation checks, ``last`` fallback.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file
lives in the system temp dir; when that is another filesystem than the checkpoint folder (the
usual case on clusters: local ``/tmp``, shared ``/scratch``), the final move is a copy, and a
job killed during it leaves a truncated ``last.ckpt``. :class:`AtomicCheckpointIO` writes
beside the target, fsyncs and ``os.replace``s, which is atomic on one filesystem.

A checkpoint is a zip archive (``torch.save``); a truncated one has lost its central
directory at the end, a corrupted one fails a member's CRC. :func:`check_checkpoint` finds
both without unpickling, and :func:`resolve_last` picks the newest checkpoint that passes.
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

log = logging.getLogger(__name__)


class CorruptCheckpointError(ValueError):
    """A checkpoint file is truncated or corrupted."""


class CheckpointMismatchError(ValueError):
    """A pretrained checkpoint cannot be read, or does not fit the model it is loaded into."""


def read_checkpoint(path: str | Path, role: str = "checkpoint") -> Any:
    """``torch.load`` of a checkpoint on CPU with ``weights_only=True`` (no arbitrary
    unpickling), the one place the framework reads a checkpoint it did not resume from.

    Errors name ``role`` (the option that gave the path, e.g. ``init_from checkpoint``) and
    the file: :class:`FileNotFoundError` when absent, :class:`CheckpointMismatchError` when
    it cannot be loaded."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{role} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointMismatchError(f"{role} {path} could not be loaded: {err}") from err


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file in the checkpoint's own folder, fsync, rename.

    A reader (or a requeued job) sees either the previous complete file or the new complete
    file, never a partial one. Remote paths (s3://, ...) keep Lightning's own writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint does not take storage_options "
                f"(got {storage_options!r})"
            )
        if "://" in str(path) and not str(path).startswith("file://"):
            super().save_checkpoint(checkpoint, path)
            return
        path = Path(str(path).removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; keep the usual permissions
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        try:  # make the rename itself durable
            dir_fd = os.open(path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)


def check_checkpoint(path: str | Path) -> None:
    """Raise :class:`CorruptCheckpointError`, naming ``path``, if it is not a complete
    ``torch.save`` archive (truncated, zero bytes, or a member failing its CRC)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise CorruptCheckpointError(
            f"checkpoint {path} ({size} bytes) is truncated or not a torch checkpoint ({err}); "
            "it was probably cut off by a killed job: resume from an earlier checkpoint "
            "(--ckpt_path last picks the newest complete one) or delete it"
        ) from err
    if bad is not None:
        raise CorruptCheckpointError(
            f"checkpoint {path} is corrupted (member {bad!r} fails its CRC check): resume from "
            "an earlier checkpoint or delete it"
        )


def resume_candidates(checkpoint_dir: str | Path, root_dir: str | Path) -> list[Path]:
    """Every checkpoint a resume could start from, newest first: the ModelCheckpoint folder
    (``last.ckpt`` and the kept ones) and Lightning's SLURM ``hpc_ckpt_<n>.ckpt`` files."""
    found = set(Path(checkpoint_dir).glob("*.ckpt")) | set(Path(root_dir).glob("hpc_ckpt_*.ckpt"))
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def resolve_last(checkpoint_dir: str | Path, root_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None when there is none yet (a first start).

    Truncated or corrupted newer files are skipped with a warning naming them; when every
    file is bad the error lists them all.
    """
    candidates = resume_candidates(checkpoint_dir, root_dir)
    problems = []
    for path in candidates:
        try:
            check_checkpoint(path)
        except CorruptCheckpointError as err:
            problems.append(str(err))
            continue
        for problem in problems:
            rank_zero_warn(f"skipping a bad checkpoint for --ckpt_path last: {problem}")
        if problems:
            rank_zero_warn(f"--ckpt_path last falls back to {path}")
        return path
    if problems:
        raise CorruptCheckpointError(
            "--ckpt_path last found no usable checkpoint:\n  " + "\n  ".join(problems)
        )
    return None
