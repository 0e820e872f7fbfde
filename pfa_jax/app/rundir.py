"""One writer per run directory, and a run that fails before its first checkpoint leaves the
directory as it found it.

``RunDirectory(out, ...)`` is used as a context manager around everything a run does to ``out``
(``pfa_jax.app.experiment.train_and_evaluate``):

1. **Lock.** ``out/.lock`` is created if missing and held with an exclusive ``fcntl.flock`` for
   the life of the process (released on any exit, also SIGKILL: the kernel drops it). It holds the
   holder's pid and host. A second writer (``pfa-jax train``, ``--resume``, ``--overwrite``, a
   runner worker) gets ``RunDirectoryBusyError`` naming them, and nothing changes. A ``.lock``
   left by a killed process is not held, so the next writer takes it over (stale locks need no
   cleaning). The lock is removed when the run ends. On a remote file system (``gs://``) nothing
   is locked. In a multi-process run only process 0 locks and writes these files.
2. **Overwrite.** ``set_aside()`` moves an existing run's files into ``out/previous-run/`` (saying
   so on stderr) instead of deleting them (on remote storage they are deleted at once); they are
   deleted once the new run has written its first
   checkpoint (``commit``), and moved back if it fails before.
3. **Rollback.** Everything under ``out`` is noted when the run starts (``begin``): the paths, and
   the bytes of the top-level files (``config.json``, ``metrics.jsonl``, ``summary.json``, ...).
   Until ``commit()`` (the first checkpoint the run writes, or its end), a failure (an exception,
   also ``KeyboardInterrupt``) removes every path the run created, moves back what it moved
   (``rename``: damaged checkpoints set aside, the previous run) and rewrites every noted file
   that changed, so a failed start, a resume that fails late, or a new run that diverges before
   its first checkpoint leave the directory byte for byte as it was. A directory the run
   created is removed again. Remote run directories get neither lock nor rollback.
"""
from __future__ import annotations

import fcntl
import os
import pathlib
import shutil
import socket
import sys

from etils import epath

__all__ = ["LOCK", "PREVIOUS", "RunDirectory", "RunDirectoryBusyError"]

LOCK = ".lock"
PREVIOUS = "previous-run"


class RunDirectoryBusyError(RuntimeError):
    """Another process holds the run directory's lock."""


class RunDirectory:
    """The lock, set-aside and rollback of one run directory (module docstring)."""

    def __init__(self, out: str | epath.Path, writer: bool = True):
        self.local = "://" not in str(out)
        self.out = pathlib.Path(out) if self.local else epath.Path(out)
        self.writer = writer
        self.created = False
        self._lock = None
        self._paths: set[str] | None = None
        self._files: dict[str, bytes] = {}
        self._renames: list[tuple[epath.Path, epath.Path]] = []  # since begin
        self._moved_aside: list[tuple[epath.Path, epath.Path]] = []  # set_aside, before begin
        self._previous = False

    # -- lock ------------------------------------------------------------------------------------
    def __enter__(self) -> RunDirectory:
        if not self.writer:
            return self
        if not self.local:  # object storage: no lock, the directory made as before
            self.out.mkdir(parents=True, exist_ok=True)
            return self
        if self.out.exists() and not self.out.is_dir():
            raise FileExistsError(f"{self.out} is a file, not a run directory; choose another --out")
        if not self.out.exists():
            try:
                self.out.mkdir(parents=True)
                self.created = True
            except FileExistsError:
                pass  # another writer made it just now: the lock below decides
            except OSError as error:
                raise FileExistsError(f"cannot create the run directory {self.out}: "
                                      f"{error.strerror} ({error.filename}); choose another "
                                      "--out") from None
        path = self.out / LOCK
        handle = open(path, "a+")  # noqa: SIM115 - held for the life of the run
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunDirectoryBusyError(
                f"run directory {self.out} is being written by {holder}; wait until it has "
                "finished (or stop it), or choose another --out. Nothing was changed") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._lock = handle
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is not None and self._paths is not None:
            self.rollback()
        if self._lock is not None:
            (self.out / LOCK).unlink(missing_ok=True)
            self._lock.close()  # releases the flock
            self._lock = None
        if error is not None and self.created and self.out.exists() and not any(
                self.out.iterdir()):
            self.out.rmdir()

    # -- what the run changes ----------------------------------------------------------------------
    def holds_a_run(self) -> bool:
        """Whether ``out`` holds anything besides the lock."""
        return self.out.is_dir() and any(p.name != LOCK for p in self.out.iterdir())

    def set_aside(self) -> None:
        """Moves the existing run's files into ``out/previous-run`` (``--overwrite``)."""
        if not self.writer:
            return
        if not self.local:  # no rollback on remote storage: the old run goes as before
            self.out.rmtree()
            self.out.mkdir(parents=True)
            return
        target = self.out / PREVIOUS
        if target.exists():  # left by an overwrite that was killed: that older run goes now
            shutil.rmtree(target)
        target.mkdir()
        for entry in sorted(self.out.iterdir()):
            if entry.name not in (LOCK, PREVIOUS):
                entry.rename(target / entry.name)
                self._moved_aside.append((entry, target / entry.name))
        self._previous = True
        print(f"pfa-jax: the run that was in {self.out} is kept in {target} until the new run "
              "writes its first checkpoint (and moved back if it fails before)", file=sys.stderr)

    def begin(self) -> None:
        """Notes the directory as the run finds it (after ``set_aside``): what ``rollback``
        restores."""
        if not (self.writer and self.local):
            return
        self._paths = {str(p.relative_to(self.out)) for p in self.out.rglob("*")}
        self._files = {p.name: p.read_bytes() for p in self.out.iterdir()
                       if p.is_file() and p.name != LOCK}

    def rename(self, source: epath.Path, target: epath.Path) -> None:
        """``source.rename(target)``, undone by ``rollback``."""
        source.rename(target)
        self._renames.append((source, target))

    def commit(self) -> None:
        """The run has written a checkpoint (or finished): failures from now on keep the files,
        and the previous run set aside is deleted."""
        if self._paths is None:
            return
        self._paths, self._files, self._renames, self._moved_aside = None, {}, [], []
        if self._previous:
            shutil.rmtree(self.out / PREVIOUS)
            self._previous = False

    def rollback(self) -> None:
        """Undoes everything since ``begin`` (module docstring)."""
        for source, target in reversed(self._renames):
            target.rename(source)
        kept = self._paths | {LOCK} | ({PREVIOUS} if self._previous else set())
        for path in sorted(self.out.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            name = str(path.relative_to(self.out))
            if name not in kept and not name.startswith(PREVIOUS + "/") and path.exists():
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        for source, target in reversed(self._moved_aside):
            target.rename(source)
        if self._previous:
            (self.out / PREVIOUS).rmdir()
        for name, raw in self._files.items():
            path = self.out / name
            if not path.exists() or path.read_bytes() != raw:
                path.write_bytes(raw)
        self._paths, self._renames, self._moved_aside, self._previous = None, [], [], False
