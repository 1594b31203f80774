"""What every script does first, before its slow imports (torch takes seconds to load)."""

import io
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
    # First tqdm, which torch imports: it reads its TQDM_* defaults as it loads, and uses some
    # only when it draws a bar (TQDM_BAR_FORMAT, TQDM_UNIT_DIVISOR): so draw one, into nowhere,
    # counting in thousands, at once (not after TQDM_DELAY), without its colour (a mere warning).
    try:
        import tqdm
        tqdm.tqdm(total=10**6, initial=10**6, unit_scale=True, delay=0, colour=None,
                  file=io.StringIO()).close()
    except Exception as err:
        refuse_settings("tqdm", "TQDM_", f"{type(err).__name__}: {err}")  # exits if any are set
        raise
    try:
        import torch  # noqa: F401  (the script's own `import torch` then finds it loaded)
    except (ValueError, OSError) as err:
        refuse_settings("torch", "TORCH_LOGS", str(err) or type(err).__name__)  # exits if set
        raise
    except (MemoryError, ImportError) as err:  # a memory limit (ulimit -v) too low for torch
        if isinstance(err, ImportError) and "failed to map segment" not in str(err):
            raise  # (the lower the limit, the earlier it fails: mapping its library, at first)
        print("error: out of memory while loading torch (a memory limit, ulimit -v, or too little "
              "free memory); raise the limit, or free some memory", file=sys.stderr)
        sys.exit(2)


def refuse_settings(library, prefix, reason):
    """With environment variables library reads (names starting with prefix) set: say that it
    cannot load with them, in one line, and exit 2. Without any: return (a bug: a traceback)."""
    settings = [f"{name}={value!r}" for name, value in os.environ.items()
                if name.startswith(prefix)]
    if settings:
        reason = " ".join(reason.strip().split("\n\n")[0].split())
        print(f"error: {library} cannot load with {', '.join(settings)} ({reason[:300]}); unset "
              f"{'it' if len(settings) == 1 else 'the one that is wrong'}, or correct it",
              file=sys.stderr)
        sys.exit(2)
