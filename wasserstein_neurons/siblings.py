"""Hidden sibling folders owned by a process: the one home of "a temporary folder next to
the real one, tagged with the process that made it".

A run that replaces an old run moves it to ``.<name>.replaced-<pid>``; a model-cache build
writes into ``.<name>.build-<pid>-<random>``. Either is *stale* once its process is gone
(killed, power loss): :func:`stale_siblings` finds those, so the next process can put an old
run back or delete a half-written cache.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (this process counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def sibling_path(path: Path, tag: str) -> Path:
    """``path``'s hidden sibling ``.<name>.<tag>-<pid>`` for this process."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}")


def make_sibling_dir(path: Path, tag: str) -> Path:
    """A new, unique hidden folder ``.<name>.<tag>-<pid>-<random>`` beside ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.{tag}-{os.getpid()}-", dir=path.parent))


def stale_siblings(path: Path, tag: str) -> Iterator[Path]:
    """The hidden ``tag`` siblings of ``path`` whose process is gone."""
    if not path.parent.is_dir():
        return
    for sibling in sorted(path.parent.glob(f".{path.name}.{tag}-*")):
        pid = sibling.name[len(f".{path.name}.{tag}-") :].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            yield sibling
