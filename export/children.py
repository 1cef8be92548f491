"""Child processes that end with their parent."""

from __future__ import annotations

import os
import signal
import sys


def die_with_parent() -> None:
    """Called first in a child process: on Linux it is killed when its parent dies (an
    ingest worker would otherwise wait for work forever, holding the killed command's
    output pipes open; an API server would keep a port its supervisor no longer watches),
    and Ctrl-C, which reaches the whole process group, is left to the parent to handle."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if os.getppid() == 1:  # the parent died before the call
            os._exit(1)
