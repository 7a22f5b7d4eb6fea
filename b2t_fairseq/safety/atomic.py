"""Files that appear complete or not at all: write to a temporary name beside the target, rename when done.

A process killed half-way leaves only the temporary name behind, which the next run overwrites; the target
either keeps its old content or does not exist.
"""
import contextlib
import os
import shutil
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside ``path`` (a file or a directory) to write; renamed to ``path`` on success,
    removed on failure. An existing directory at ``path`` is replaced."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if tmp.is_dir() and path.is_dir():
        _remove(path)
    os.replace(tmp, path)


def write_text(path, text, encoding="utf-8"):
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
