"""Writing outputs so a destination is either its old content or the complete new one, never a half.

    with atomic_write(path) as f:      # a temp file beside `path`, fsynced, then os.replace'd over it
        f.write(text)
    with staged_output(output) as tmp: # a temp folder beside `output`, renamed into place when complete
        (tmp / "config.json").write_text(...)

Any OSError on the way becomes a typed error in the user's terms (write_error): a full disk says so, a
read-only or forbidden folder says so, and the temp file or folder is removed.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from llm_torch.core.errors import InputError, LLMError, ResourceError

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_ALLOWED = {errno.EACCES, errno.EPERM, errno.EROFS}


def write_error(e: OSError, path: Path) -> LLMError:
    """The typed error for an OSError met writing `path`: a hint that matches the cause, never a guess."""
    reason = e.strerror or str(e)
    if e.errno in _NO_SPACE:
        return ResourceError(f"no space left writing {path} ({reason}); nothing was left half-written",
                             hint="free disk space, or write to another folder")
    if e.errno in _NOT_ALLOWED:
        return InputError(f"cannot write {path}: {reason}",
                          hint="choose a folder you can write to, or fix its permissions")
    if e.errno == errno.ENOENT:
        return InputError(f"cannot write {path}: its folder does not exist", hint="create the folder first")
    return InputError(f"cannot write {path}: {reason}", hint="check the destination path")


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """A file object for `path`'s new content ("w" text in UTF-8, or "wb"); it replaces `path` only when the
    block ends without an exception; otherwise the temp file is removed and `path` keeps its old content."""
    path = Path(path).expanduser()
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise write_error(e, path) from None
    try:
        # mkstemp makes the file private (0600); the published file gets the usual umask permissions.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise write_error(e, path) from None
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def staged_output(output: str | os.PathLike, *, replace: bool = False, is_file: bool = False) -> Iterator[Path]:
    """The path to build `output` at: a temp folder beside it (or, `is_file`, a file inside one). On success it
    becomes `output` (an existing one replaced when `replace`); on failure everything staged is removed."""
    output = Path(output).expanduser().absolute()
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
    except OSError as e:
        raise write_error(e, output) from None
    target = staging / output.name if is_file else staging
    try:
        yield target
        publish(target, output, replace=replace)
    except OSError as e:
        raise write_error(e, output) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staged: Path, output: Path, *, replace: bool = False) -> None:
    """Rename `staged` (a file or folder) to `output`; an existing output (`replace`) is moved aside first and
    restored if the rename fails, so `output` is never missing with the old content lost."""
    old = None
    if output.exists() or output.is_symlink():
        if not replace:
            raise InputError(f"{output} already exists", hint="pass --force to replace it")
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent)) / output.name
        os.replace(output, old)
    try:
        os.replace(staged, output)
    except BaseException:
        if old is not None:
            os.replace(old, output)
        raise
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
