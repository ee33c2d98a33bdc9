"""The output folder of a sequential run: written stage by stage, resumable, never half-written.

    output_dir/
      manifest.json              what the run is (its fingerprint) and which stages are finished
      stages/<module name>.pt2   one quantized stage: the reference QDQ graph with its integer codes
                                 and scales (torch.export.save of the converted stage)
      float.safetensors          the tensors no stage quantizes (embeddings, ...), written last
      carry/                     propagate_error=False, while the run is unfinished: the last finished
                                 stage's calibrated outputs, per rank (CarryFiles)
      onnx/                      with onnx=True: each stage as QDQ ONNX with external data, the float
                                 parts, and model.onnx chaining them (see onnx_output.py)

Every file is written under a temporary name in the same folder and renamed into place
(`os.replace`, atomic on POSIX), the manifest after the stage file it lists: a killed run leaves
at most a `*.partial-<pid>.*` file behind, never a truncated file under a final name, and a rerun
starts after the last stage the manifest lists. A run with another model, checkpoint, recipe or
calibration data is refused rather than mixed into the folder.
"""
from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
from typing import Callable

from ..errors import CheckpointError

MANIFEST = "manifest.json"
FORMAT = "qcompile-sequential"
VERSION = 1
FLOAT_FILE = "float.safetensors"


def atomic_write(path: pathlib.Path, write: Callable[[str], None]) -> int:
    """Call `write(tmp_path)`, then rename tmp_path to `path`; returns the size written. On failure
    the temporary file is removed and `path` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.partial-{os.getpid()}{path.suffix}")  # keeps the suffix torch checks
    try:
        write(str(tmp))
        size = tmp.stat().st_size
        os.replace(tmp, path)
        return size
    except BaseException as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        _raise_write_error(path, e)
        raise


def atomic_write_files(folder: pathlib.Path, names: list[str], write: Callable[[pathlib.Path], None]) -> int:
    """Call `write(tmp_folder)`, which creates the files `names` there (files that refer to each
    other by name, like an ONNX model and its external data), then rename them into `folder` in
    the order given: the last one is the file that makes the set visible. Returns the bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        size = 0
        for name in names:
            size += (tmp / name).stat().st_size
            os.replace(tmp / name, folder / name)
        return size
    except BaseException as e:
        _raise_write_error(folder / names[-1], e)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _raise_write_error(path: pathlib.Path, e: BaseException) -> None:
    """A failed write as a CheckpointError that says what to do (a full disk above all)."""
    if isinstance(e, OSError) or (isinstance(e, RuntimeError) and "write" in str(e).lower()):
        free = shutil.disk_usage(path.parent).free
        full = getattr(e, "errno", None) == errno.ENOSPC or "space" in str(e).lower()
        why = "the disk is full" if full else (getattr(e, "strerror", None) or str(e))
        raise CheckpointError(f"writing {path} failed: {why} ({free / 2**20:.0f} MiB free there). Nothing "
                              "under that name was changed; free space (or choose another output_dir) and run "
                              "again: finished stages are kept") from e


class OutputDir:
    def __init__(self, path, fingerprint: dict, writer: bool = True):
        self.path = pathlib.Path(path)
        self.writer = writer
        self.fingerprint = fingerprint
        manifest = self.path / MANIFEST
        if manifest.is_file():
            try:
                self.manifest = json.loads(manifest.read_text())
            except ValueError as e:
                raise CheckpointError(f"{manifest} is not a qcompile manifest ({e}); choose another output_dir") from e
            if self.manifest.get("format") != FORMAT:
                raise CheckpointError(f"{self.path} holds something else than a qcompile sequential run; "
                                      "choose another output_dir")
            old = self.manifest.get("fingerprint", {})
            differ = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            if differ:
                raise CheckpointError(f"{self.path} holds a run with another {', '.join(differ)}; it is not "
                                      "overwritten: choose another output_dir, or delete that folder to start over")
        else:
            if self.path.exists() and any(f for f in self.path.iterdir() if ".partial-" not in f.name):
                raise CheckpointError(f"{self.path} is not empty and holds no {MANIFEST}; it is not overwritten: "
                                      "choose another (or an empty) output_dir")
            self.manifest = {"format": FORMAT, "version": VERSION, "fingerprint": fingerprint,
                             "stages": {}, "order": [], "complete": False}

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def cleanup_partial(self) -> None:
        """Remove what a killed run was writing (our own `*.partial-<pid>` files)."""
        if self.writer and self.path.is_dir():
            for f in list(self.path.glob("*.partial-*")) + list(self.path.glob("stages/*.partial-*")) + \
                    list(self.path.glob(f"{CarryFiles.FOLDER}/*.partial-*")):
                f.unlink(missing_ok=True)
            for d in self.path.glob("onnx/.partial-*"):
                shutil.rmtree(d, ignore_errors=True)

    # -- stages ----------------------------------------------------------------------------------

    def stage_file(self, name: str) -> pathlib.Path:
        return self.path / "stages" / f"{name}.pt2"

    def finished(self, name: str) -> bool:
        info = self.manifest["stages"].get(name)
        if info is None:
            return False
        f = self.stage_file(name)
        if not f.is_file() or f.stat().st_size != info.get("bytes"):
            raise CheckpointError(f"{f} is missing or has another size than {MANIFEST} records "
                                  f"({info.get('bytes')} bytes); delete {self.path} to start over")
        return True

    def save_stage(self, name: str, exported_program, info: dict) -> None:
        import torch

        if self.writer:
            info = dict(info, bytes=atomic_write(self.stage_file(name),
                                                 lambda tmp: torch.export.save(exported_program, tmp)))
            self.manifest["stages"][name] = info
            if name not in self.manifest["order"]:
                self.manifest["order"].append(name)
            self.write_manifest()

    def load_stage(self, name: str):
        import torch

        import qcompile  # noqa: F401  (registers the qcompile:: ops the graph calls)

        return torch.export.load(str(self.stage_file(name)))

    # -- the rest --------------------------------------------------------------------------------

    def save_floats(self, tensors: dict, aliases: dict) -> None:
        from safetensors.torch import save_file

        if self.writer:
            atomic_write(self.path / FLOAT_FILE, lambda tmp: save_file(tensors, tmp))
            self.manifest["float"] = {"file": FLOAT_FILE, "aliases": aliases}

    def write_manifest(self) -> None:
        if self.writer:
            text = json.dumps(self.manifest, indent=1, sort_keys=True)
            atomic_write(self.path / MANIFEST, lambda tmp: pathlib.Path(tmp).write_text(text))


class CarryFiles:
    """What the next stage is calibrated on, kept on disk when a resumed run cannot recompute it
    from the finished stages (`propagate_error=False`: the calibrated, unconverted stage's outputs
    are gone once it is converted). One file per rank (each calibrates its own shard), only for
    the last finished stage: an earlier one is deleted once the next stage is listed."""

    FOLDER = "carry"

    def __init__(self, out: OutputDir, enabled: bool):
        from .. import distributed

        self.out, self.enabled, self.rank = out, enabled, distributed.rank()

    def path(self, name: str) -> pathlib.Path:
        return self.out.path / self.FOLDER / f"{name}.rank{self.rank}.pt"

    def save(self, name: str, tensors: list) -> None:
        import torch

        if self.enabled:
            atomic_write(self.path(name), lambda tmp: torch.save(tensors, tmp))

    def load(self, name: str) -> list | None:
        """The saved outputs of stage `name`, or None when they were deleted (a later stage is finished)."""
        import torch

        f = self.path(name)
        return torch.load(f, weights_only=True) if self.enabled and f.is_file() else None

    def drop(self, name: str | None) -> None:
        if self.enabled and name is not None:
            self.path(name).unlink(missing_ok=True)

    def clear(self) -> None:
        """This rank's files, and the folder once no rank has any (a finished run needs none)."""
        folder = self.out.path / self.FOLDER
        for f in folder.glob(f"*.rank{self.rank}.pt"):
            f.unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:
            pass
