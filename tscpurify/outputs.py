"""Where results go, so that nothing the user did not ask to replace is ever lost.

Every command that writes a folder (`attack`, `encoder`, `purify`, `demo`) goes through here:
  1. `check_out` refuses, before any work, an output that is a symlink, the current folder or
     one of its parents, an input run or a folder inside it, a file, an existing folder without
     --overwrite, an existing folder that tscpurify did not write (even with --overwrite), or
     one whose parent cannot be written;
  2. `atomic_folder` takes an exclusive lock for the output (a second run to the same --out is
     refused at once), builds the result in a temporary sibling, and moves it into place only
     when it is complete: an existing run folder is swapped out only at that moment (with
     --overwrite), and a folder that appeared meanwhile is never replaced. Temporary folders,
     the lock and parent folders it created are removed on every exit path.
Files written in place, where a folder cannot be swapped (a bench's tables and plots, TSC's
saved stages), go through `write_atomic` / `save_figure_atomic`: a reader, or a crash, sees
the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import OutputBusyError, OutputError

# Files that mark a folder as tscpurify's own: a run folder's sidecar, a bench or demo folder.
MARKERS = ("model.json", "results.jsonl", "tuning.jsonl", "bench.json", "backdoored/model.json",
           "purified/model.json")
BENCH_MARKERS = ("results.jsonl", "tuning.jsonl", "bench.json")


def is_tscpurify_folder(path: Path) -> bool:
    """True for a folder tscpurify wrote: a run folder, a demo folder or a bench folder."""
    if not path.is_dir():
        return False
    return (any((path / marker).is_file() for marker in MARKERS)
            or any(path.glob("results.shard*.jsonl")) or any(path.glob("tuning.shard*.jsonl")))


def is_bench_folder(path: Path) -> bool:
    """True for a folder a bench wrote (its marker, or rows), not a run or demo folder."""
    return path.is_dir() and (
        any((path / marker).is_file() for marker in BENCH_MARKERS)
        or any(path.glob("results.shard*.jsonl")) or any(path.glob("tuning.shard*.jsonl")))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_place(out: Path) -> Path:
    """Never a symlink, the current folder or one of its parents; returns the resolved path."""
    if str(out).strip() in ("", "."):
        raise OutputError(f"--out {str(out)!r} is the current folder; give a new folder name")
    if out.is_symlink():
        raise OutputError(f"--out {out} is a symbolic link; give a real folder path")
    resolved = out.resolve()
    if _inside(Path.cwd().resolve(), resolved):
        raise OutputError(f"--out {out} is the current folder or one of its parents; "
                          f"give a new folder name")
    return resolved


def check_resumable_out(out: str | Path) -> Path:
    """A folder that a resumable command (bench) adds to: new, empty, or a bench's own."""
    out = Path(out)
    _check_place(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder")
    # A bench's own folder only: a run or demo folder would get a bench's files mixed in.
    if out.is_dir() and any(out.iterdir()) and not is_bench_folder(out):
        raise OutputError(f"{out} is not a bench folder (no bench.json, results.jsonl or "
                          f"tuning.jsonl); give a new or empty folder")
    _check_writable(out if out.is_dir() else out.resolve().parent)
    return out


def _check_writable(folder: Path) -> None:
    """The nearest existing folder on the way to `folder` must be writable."""
    ancestor = folder.resolve()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():  # a file on the way: no permission would make it a folder
        raise OutputError(f"cannot write into {ancestor}: it is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write into {ancestor}: permission denied")


def check_out(out: str | Path, overwrite: bool = False, inputs: Iterable[str | Path] = ()
              ) -> Path:
    """Refuse an output folder that could lose data; returns it as a Path. Raises OutputError."""
    out = Path(out)
    resolved = _check_place(out)
    for source in inputs:
        source = Path(source).resolve()
        if _inside(resolved, source) or _inside(source, resolved):
            raise OutputError(f"--out {out} overlaps the input {source}; write the result to "
                              f"another folder")
    if (out.exists() or out.is_symlink()) and not _empty_folder(out):
        if not out.is_dir():
            raise OutputError(f"--out {out} exists and is not a folder")
        if not overwrite:
            raise OutputError(f"{out} already exists; choose another --out or pass --overwrite")
        if not is_tscpurify_folder(out):
            raise OutputError(f"{out} exists and was not written by tscpurify (no model.json or "
                              f"results.jsonl); --overwrite replaces only tscpurify's folders")
    _check_writable(resolved.parent)
    return out


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """An exclusive lock on `out` for this process, released (and its file removed) on exit; a
    lock held by another process is refused at once. The kernel drops it if the process dies."""
    lock = out.parent / f".{out.name}.lock"
    while True:
        handle = open(lock, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            handle.close()
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise OutputBusyError(f"another tscpurify run is writing {out} (lock {lock}); "
                                      f"wait for it or choose another --out") from None
            raise
        # The previous holder may have removed the file between our open and our lock: then
        # this lock guards nothing, so take the lock again on the file that is there now.
        try:
            same = os.path.samestat(os.fstat(handle.fileno()), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
        handle.close()


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; returns those created, deepest first."""
    created = []
    path = folder
    while not path.exists():
        created.append(path)
        path = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    return created


@contextlib.contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False,
                  inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary folder that becomes `out` only if the block finishes (see the module
    docstring). On any error nothing is left behind: no temporary folder, no lock, no parent
    folder this call created."""
    out = check_out(out, overwrite, inputs)
    created = _make_parents(out.parent)
    finished = False
    try:
        with output_lock(out):
            # Under the lock no other run is building `out`: a temporary folder left by a run
            # that was killed outright (SIGKILL, power loss) is debris, removed now.
            for stale in out.parent.glob(f".{out.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
            try:
                yield tmp
                _as_umask_allows(tmp)
                _move_into_place(tmp, out, overwrite)
                finished = True
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if not finished:
            for folder in created:  # deepest first; only if still empty
                with contextlib.suppress(OSError):
                    folder.rmdir()


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def _as_umask_allows(folder: Path) -> None:
    """Give a finished result the permissions a plain mkdir and open would have: mkdtemp makes
    its folder 0700 and safetensors writes its files 0600, so on a shared machine nobody else
    could read a purified model or a bench's results, as no user would expect."""
    mask = _umask()
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _empty_folder(path: Path) -> bool:
    """An empty real folder holds nothing to lose: it may be the output without --overwrite."""
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if not (out.exists() or out.is_symlink()) or _empty_folder(out):
        try:
            os.rename(tmp, out)  # fails rather than replace a folder with contents
        except OSError as err:
            raise OutputError(f"{out} appeared while this run was working; nothing was "
                              f"replaced ({err.strerror})") from None
        return
    # Checked again: a folder may have appeared while the run was working.
    if not (overwrite and out.is_dir() and not out.is_symlink() and is_tscpurify_folder(out)):
        raise OutputError(f"{out} appeared while this run was working and is not a tscpurify "
                          f"folder to replace; nothing was written")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / "previous")  # `out` is free only for the instant of the swap
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old / "previous", out)  # put the user's folder back before anything else
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def replaced_whole(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; it replaces `path` only if the writing
    ends without error, and never lingers. Same folder, so the replace is a rename within one
    file system; the same suffix, so writers that infer a format from it (matplotlib) still do."""
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield temporary
        temporary.chmod(0o666 & ~_umask())  # as open() would make it (safetensors: 0600)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` whole: it appears (or replaces the old file) only once written."""
    with replaced_whole(path) as temporary:
        temporary.write_text(text)


def save_figure_atomic(figure: object, path: str | Path, **savefig_kwargs: object) -> None:
    """`figure.savefig(path)`, whole or not at all, as `write_atomic`."""
    with replaced_whole(path) as temporary:
        figure.savefig(temporary, **savefig_kwargs)  # type: ignore[attr-defined]
