"""Drops the C++ start-up lines that TensorFlow/XLA write straight to file descriptor 2 while they load.

Lines logged before absl::InitializeLog() ("Could not find cuda drivers", oneDNN notices) ignore
TF_CPP_MIN_LOG_LEVEL, so the only way to hide them is to capture the descriptor during the imports and replay
everything else.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from typing import Iterator

# absl's pre-initialization banner and its INFO/WARNING lines ("I0000 00:00:... file.cc:31] ...").
NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
                   r"|[IW]\d{4} [\d:.]+\s+\d+ [\w.]+:\d+\] .*)$")


def drop_noise(text: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if not NOISE.match(line.rstrip("\n")))


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Captures fd 2 for the block, then writes back what is not start-up noise (errors always come back)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real descriptor (an embedding host): nothing to filter
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = drop_noise(capture.read().decode(errors="replace"))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()
