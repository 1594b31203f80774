"""What every script does first, before its slow imports (torch takes seconds to load)."""

import os
import signal
import time

STARTED_AT = time.time()  # train.py's "elapsed" counts from here: the imports are included


def exit_at_once_on_ctrl_c(module_name):
    """Run as a script: Ctrl-C while torch loads exits at once (130, no traceback); os._exit, as
    nothing is open yet and a library's bare `except:` could swallow an exception mid-import."""
    if module_name == "__main__":
        signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))
