"""What every script does first, before its slow imports (torch takes seconds to load)."""

import os
import signal
import sys
import time

STARTED_AT = time.time()  # train.py's "elapsed" counts from here: the imports are included


def load_torch(module_name):
    """Run as a script, import torch before anything else does. Ctrl-C meanwhile exits at once
    (130, no traceback; os._exit, as nothing is open yet and a library's bare `except:` could
    swallow an exception mid-import). A setting torch or tqdm refuses as it loads (TORCH_LOGS,
    TORCH_LOGS_OUT, TORCH_LOGS_FORMAT; tqdm's TQDM_* defaults), too little memory to load it,
    or a current folder that was deleted (torch's loader then fails with a line that names a
    library) is one line, exit code 2."""
    if module_name != "__main__":
        return
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))
    try:
        os.getcwd()
    except FileNotFoundError:
        print("error: the current folder no longer exists (it was deleted); cd to a folder that "
              "exists", file=sys.stderr)
        sys.exit(2)
    try:
        import torch  # noqa: F401  (the script's own `import torch` then finds it loaded)
        import tqdm  # noqa: F401  (torch loads it too, today)
    except (ValueError, OSError) as err:
        settings = [f"{name}={value!r}" for name, value in os.environ.items()
                    if name.startswith(("TORCH_LOGS", "TQDM_"))]
        if not settings:
            raise
        reason = " ".join(str(err).strip().split("\n\n")[0].split()) or type(err).__name__
        print(f"error: torch and tqdm cannot load with {', '.join(settings)} ({reason[:300]}); "
              f"unset it, or correct it", file=sys.stderr)
        sys.exit(2)
    except (MemoryError, ImportError) as err:  # a memory limit (ulimit -v) too low for torch
        if isinstance(err, ImportError) and "failed to map segment" not in str(err):
            raise  # (the lower the limit, the earlier it fails: mapping its library, at first)
        print("error: out of memory while loading torch (a memory limit, ulimit -v, or too little "
              "free memory); raise the limit, or free some memory", file=sys.stderr)
        sys.exit(2)
