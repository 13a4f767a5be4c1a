# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""An output folder that appears only when it is complete, and never replaces what is being read.

`staged_output` writes into a hidden folder next to the output and renames it into place at the end; Ctrl-C and
SIGTERM remove it, and one left by a killed process is removed by the next run for the same output. The
converters and `qilin-med-vl push` (its assembled folder) use it.
"""

import glob
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


def check_not_inside(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], what: str = "input"
                     ) -> None:
    """Refuse an `output` folder that is, or contains, one of `inputs`: replacing it would delete what is being
    read (`convert SRC SRC --force`, or an output that is a parent of the source)."""
    target = Path(output).resolve()
    for item in inputs:
        if item is None or not Path(item).exists():
            continue  # a Hub repo id lives in the cache, never under a user's output folder
        source = Path(item).resolve()
        if source == target or target in source.parents:
            raise ValueError(
                f"The output {output} is or contains the {what} {item}; replacing it would delete the {what}. "
                "Choose an output folder outside it."
            )


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _remove_stale_staging(output: Path) -> None:
    """Staging folders that a killed run (SIGKILL, power loss) left next to `output`: their names carry the pid of
    the process that made them, so only those whose process is gone are removed."""
    if not output.parent.is_dir():
        return
    for path in output.parent.glob(f".{glob.escape(output.name)}.partial-*"):
        match = re.fullmatch(rf"\.{re.escape(output.name)}\.partial-(\d+)-.*", path.name)
        if match and path.is_dir() and not path.is_symlink() and not _process_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _terminate_as_interrupt():
    """SIGTERM (a `kill`, a job scheduler's time limit) ends the process without unwinding the stack, so no
    `finally` would remove a half-written staging folder. Within this block it raises `KeyboardInterrupt` instead
    (in the main thread only: signals cannot be handled elsewhere)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        # None: the previous handler was not installed from Python (an embedding host); the default is the best guess.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _check_replaceable(output: Path) -> None:
    """`force` replaces a folder as a whole, so only one that holds a saved model (a `config.json`: an earlier
    conversion or `save_pretrained`) or nothing at all; a file, a link or a folder of other things is refused."""
    if output.is_symlink() or not output.is_dir():
        raise FileExistsError(f"{output} exists and is not a folder; --force only replaces a model folder")
    entries = sorted(path.name for path in output.iterdir())
    if entries and "config.json" not in entries:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise FileExistsError(
            f"{output} holds files that are not a saved model ({shown}); --force only replaces a model folder "
            "(one with a config.json). Choose another output folder."
        )


@contextmanager
def staged_output(output: str | os.PathLike, force: bool = False,
                  protect: Iterable[str | os.PathLike | None] = ()) -> Iterator[Path]:
    """A temporary folder next to `output` that becomes `output` only if the block completes, so an interrupted or
    failed conversion leaves no half-written model. An existing non-empty `output` needs `force=True`, and is then
    replaced only if it holds a saved model (a `config.json`); an `output` that is or contains one of the `protect`
    paths (the inputs) is always refused. Ctrl-C and SIGTERM remove the
    staging folder; one left by a killed process is removed by the next run for the same `output`."""
    output = Path(output)
    check_not_inside(output, protect)
    if output.exists() and not force and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"{output} already exists; pass force=True (--force) to replace it")
    if output.exists() and force:
        _check_replaceable(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(output)
    with _terminate_as_interrupt():
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-{os.getpid()}-", dir=output.parent))
        try:
            umask = os.umask(0)
            os.umask(umask)
            staging.chmod(0o777 & ~umask)  # mkdtemp's private 0o700 is not what a model folder should end up with
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if output.exists():
            # Move the old output aside first: a crash between the two renames still leaves one complete model.
            retired = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
            output.rename(retired)
            staging.rename(output)
            if retired.is_dir() and not retired.is_symlink():
                shutil.rmtree(retired, ignore_errors=True)
            else:
                retired.unlink()
        else:
            staging.rename(output)
