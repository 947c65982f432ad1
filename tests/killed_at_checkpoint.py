"""Run `mixq ARGS...` and SIGKILL it right after its N-th checkpoint change: `python
killed_at_checkpoint.py N ARGS...`.

A checkpoint change is a rename into the job's `.OUT.resume/` directory, or a removal from it, of a
`.safetensors` or `.profile` file. Killing from inside the process, at the moment of the change, makes
each kill point exact however loaded the machine is (a watcher polling the directory misses changes
that come close together)."""

import os
import signal
import sys
from pathlib import Path

from mixq.cli import main

CHECKPOINT_SUFFIXES = (".safetensors", ".profile")


def kill_at(n: int) -> None:
    changes = 0
    replace, unlink = os.replace, os.unlink

    def counted(path) -> None:
        nonlocal changes
        path = Path(os.fsdecode(path))
        if path.parent.name.endswith(".resume") and path.suffix in CHECKPOINT_SUFFIXES \
                and not path.name.startswith("."):
            changes += 1
            if changes >= n:
                os.kill(os.getpid(), signal.SIGKILL)

    def replace_then_count(src, dst, *args, **kwargs):
        replace(src, dst, *args, **kwargs)
        counted(dst)

    def unlink_then_count(path, *args, **kwargs):
        unlink(path, *args, **kwargs)
        if "dir_fd" not in kwargs:  # a whole work directory being removed is no checkpoint change
            counted(path)

    os.replace, os.unlink = replace_then_count, unlink_then_count


if __name__ == "__main__":
    kill_at(int(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
