"""Writing files so that nothing half-written is ever seen and nothing is replaced by accident."""

import contextlib
import os
import tempfile
from pathlib import Path


def _umask() -> int:
    # The only portable way to read the umask is to set it; put it straight back.
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs):
    """Open a temporary file beside `path`; on success it is renamed over `path`, on any error
    (Ctrl-C included) it is removed and `path` is untouched.

    The file gets the permissions an ordinary `open(path, "w")` would give (0666 less the umask):
    `mkstemp` creates private 0600 files, which would hide results from the user's group.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
