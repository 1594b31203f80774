"""The small helpers every script shares: errors, run locks, files, devices and precision.
Every mistake a user can make (a missing file, a bad flag, a prompt the model cannot read)
raises UsageError; the scripts print its message as one line and exit with code 2."""

import contextlib
import errno
import math
import os
import re
import shutil
import signal
import socket
import stat
import sys
import time

import torch

try:
    import fcntl  # file locks; POSIX only
except ImportError:  # Windows: runs are not locked
    fcntl = None


class UsageError(Exception):
    """A problem with the user's input; the message says what is wrong and how to fix it."""


# Under torchrun, how long a rank above 0 waits before it says an error (run_main): rank 0,
# which meets the same checks at about the same moment, has printed long before.
RANK_ERROR_WAIT = 10  # seconds


def run_main(main, torchrun=False):
    """Run a script's main(): a UsageError, running out of memory, or output that cannot be
    written (a full disk, /dev/full) is one line on stderr and exit code 2; Ctrl-C, or SIGTERM
    (what `timeout` or a cluster's scheduler sends before a kill), exits with 130 and no
    traceback, half-written files cleaned up on the way. torchrun: main runs as one of
    torchrun's processes (train.py), where a UsageError is printed once: by rank 0, or after a
    wait by a rank above 0 (an error only it meets)."""
    quit_on_signals()  # the scripts quiet Ctrl-C while importing
    if hasattr(sys.stdout, "reconfigure"):
        # A path or prompt that is not valid UTF-8 (a terminal's lone byte arrives as a lone
        # surrogate, "\udcff") prints escaped instead of ending the run.
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        main()
    except UsageError as err:
        if torchrun and is_rank_above_0():
            # All ranks meet most errors, and rank 0 says it. When one rank ends, torchrun stops
            # the others: wait, so that it cannot stop rank 0 before rank 0 prints; an error
            # that rank 0 does not meet is printed here after the wait.
            try:
                time.sleep(RANK_ERROR_WAIT)
            except KeyboardInterrupt:  # torchrun stopped this rank: rank 0 ended, and said it
                sys.exit(130)
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as err:  # torch.OutOfMemoryError (CUDA) is one too
        # The CPU allocator raises a plain RuntimeError ("DefaultCPUAllocator: can't allocate
        # memory", on Windows "...: not enough memory"); Apple GPUs say "MPS backend out of memory".
        if not (isinstance(err, torch.OutOfMemoryError) or "DefaultCPUAllocator" in str(err)
                or "out of memory" in str(err)):
            raise  # a bug: its traceback shows
        # Every rank that runs out says so (under torchrun it may be any one: the others see only
        # a lost connection). Files already saved were written whole: kept.
        print(f"error: out of memory ({str(err).splitlines()[0][:150]}); ask for less: a lower "
              f"--batch_size (--gradient_accumulation_steps keeps the tokens per step), "
              f"--block_size or model size, or fewer --num_samples", file=sys.stderr)
        sys.exit(2)
    except MemoryError:  # Python's own allocations (preparing the data, importing a module)
        print("error: out of memory (Python's MemoryError: a memory limit, ulimit -v, or too "
              "little free memory); raise the limit, or free some memory", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # e.g. `python generate.py | head`: the reader has all it wanted
        send_nowhere()
        sys.exit(0)
    except OSError as err:  # printing failed (`> log` on a full disk), or a bug
        if output_works():
            raise  # not the output's fault: a bug, whose traceback shows
        # The run stops where it was, as a second Ctrl-C would: files already saved (train.py's
        # last checkpoint) were written whole and are kept.
        send_nowhere()
        print(f"error: {cannot_write_output(err)}", file=sys.stderr)
        sys.exit(2)
    finally:
        release_locks()


def cannot_write_output(err):
    return f"cannot write the output ({err.strerror or err}); free some disk space, or send the " \
        f"output elsewhere"


def output_works():
    """Whether stdout takes a line now (not on a full disk, nor on /dev/full)."""
    try:
        print(flush=True)
    except OSError:
        return False
    return True


def send_nowhere(stream=None, terminal_only=False):
    """Send what is left for stream (stdout if None) to /dev/null, so that writing it, and
    Python's flush at exit, cannot fail again; terminal_only: only if it writes to a terminal (a
    device), not to a file or a pipe."""
    with contextlib.suppress(OSError, ValueError, AttributeError):  # a StringIO, or None
        fd = (stream or sys.stdout).fileno()
        if not terminal_only or stat.S_ISCHR(os.fstat(fd).st_mode):
            os.dup2(os.open(os.devnull, os.O_WRONLY), fd)


def one_line(message):
    """message with every character a terminal would not print as one (a newline in a path, a
    lone surrogate, an escape code) written as Python writes it in a string: "\\n", "\\udcff"."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in message)


def torchrun_problem():
    """Why RANK and the variables beside it are not what torchrun sets, naming the variable, or
    None. A RANK alone may be left in a shell or come from another tool; numbers that make no
    sense, or a host that cannot be found, would leave the process group waiting for ever."""
    numbers = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")
    if "MASTER_ADDR" not in os.environ or not all(  # at most 9 digits: int() takes any such
            re.fullmatch(r"[0-9]{1,9}", os.environ.get(name, "")) for name in numbers):
        return ("RANK is set, but not the MASTER_ADDR, MASTER_PORT, LOCAL_RANK and WORLD_SIZE "
                "(whole numbers) that torchrun sets")
    rank, local_rank, world_size, port = (int(os.environ[name]) for name in numbers)
    for name, wrong, accepted in (("RANK", rank >= world_size, f"below WORLD_SIZE ({world_size})"),
                                  ("LOCAL_RANK", local_rank > rank, f"at most RANK ({rank})"),
                                  ("MASTER_PORT", not 0 < port < 2**16, "from 1 to 65535")):
        if wrong:
            return f"{name} is {os.environ[name]}, but torchrun sets it {accepted}"
    try:  # the address every process meets at (torchrun's --master_addr)
        socket.getaddrinfo(os.environ["MASTER_ADDR"], port)
    except OSError as err:
        return (f"MASTER_ADDR is {os.environ['MASTER_ADDR']!r:.80}, a host this machine cannot "
                f"find ({err.strerror or err})")
    return None


def is_rank_above_0():
    """Whether this is one of torchrun's processes but the first (RANK=00 is rank 0 too)."""
    return torchrun_problem() is None and int(os.environ["RANK"]) > 0


# Signals that ask a run to stop: Ctrl-C, SIGTERM (what `timeout` and schedulers send before a
# kill), SIGHUP (its terminal or ssh session closed), SIGXCPU (its CPU-time limit reached).
STOP_SIGNALS = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGXCPU")
                if hasattr(signal, name)]  # Windows has the first two


def on_stop_signals(handler):
    """handler for each stop signal, but one ignored since the process began: `nohup` ignores
    SIGHUP so that a run outlives its terminal, and it still does."""
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, handler)


def quit_on_signals():
    """Ctrl-C and the other stop signals raise KeyboardInterrupt: run_main exits with 130."""
    on_stop_signals(signal.default_int_handler)


# ---------------------------------------------------------------------------------------------
# Locks: a run holds its checkpoint's lock until main() ends; two runs never write one file

HELD_LOCKS = {}  # path -> its lock file (descriptor), held until main() ends (run_main)


def hold_lock(path, guarded=()):
    """Lock path until main() ends: None, or what the process holding it wrote (its id)."""
    path = os.path.abspath(path)
    if path not in HELD_LOCKS:
        HELD_LOCKS[path] = take_lock(path, wait=False, guarded=guarded)
        if isinstance(HELD_LOCKS[path], str):
            return HELD_LOCKS.pop(path)
    return None


def release_locks():
    while HELD_LOCKS:
        release_lock(*HELD_LOCKS.popitem())


LOCK_TEXT = re.compile(rb"process (\d+)")  # all that take_lock writes into a lock file


def take_lock(path, wait, guarded=()):
    """The lock file at path, open and locked, or (wait False) what the process holding it wrote.
    flock goes with the process however it ends: a crash leaves no stale lock. Windows: None.
    A lock file is made here, or is one a run left (all it holds is "process N"); any other
    file of that name is a user's: neither written nor, at release, removed. guarded: the files
    the lock is for (path less .lock if none are given)."""
    if fcntl is None:
        return None
    empty_looks = 0
    while True:
        lock, made = open_lock(path)
        try:  # a lock made here is only ever held a moment, by another run looking at it
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait or made else fcntl.LOCK_NB))
        except BlockingIOError:
            text = os.pread(lock, 100, 0).decode(errors="replace").strip()
            os.close(lock)
            return text or "another process"
        text, links = os.pread(lock, 100, 0), os.fstat(lock).st_nlink
        if made or links == 1 and LOCK_TEXT.fullmatch(text):
            break
        os.close(lock)
        if links == 0:
            continue  # the holder deleted it while we waited: take the new one
        if text or links > 1 or empty_looks == 50:
            raise lock_in_the_way(path)
        empty_looks += 1
        time.sleep(0.02)  # empty: most likely just made by another run, its id not yet written
    earlier = LOCK_TEXT.fullmatch(text)
    if earlier:  # left by a run killed holding it: so are the files it was writing then
        for written in guarded or [path.removesuffix(".lock")]:  # atomic_write's path.PID.tmp
            with contextlib.suppress(OSError):
                os.remove(tmp_path_for(written, earlier[1].decode()))
    ours = f"process {os.getpid()}".encode()
    try:
        os.pwrite(lock, ours, 0)
        os.ftruncate(lock, len(ours))
    except OSError as err:
        if made:
            release_lock(path, lock)  # and with it the lock file
        else:
            os.close(lock)
        raise UsageError(f"cannot write the lock file {path} ({err.strerror}); free some disk "
                         f"space") from None
    return lock


def open_lock(path):
    """(the lock file's descriptor, whether it was made here): a regular file, never opened
    through a symlink, whose text would land in the file it names."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK  # non-blocking: a FIFO there never waits
    while True:
        try:
            return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            pass
        except OSError as err:  # a full disk, a read-only folder, a name too long
            fix = ("shorten the name it is built from" if err.errno == errno.ENAMETOOLONG
                   else "free some disk space, or make its folder writable")
            raise UsageError(f"cannot make the lock file {path} ({err.strerror}); {fix}") from None
        try:
            lock = os.open(path, flags)
        except FileNotFoundError:
            continue  # removed since: make it
        except OSError as err:  # a symlink, a folder, a read-only file, a socket
            raise lock_in_the_way(path, err.strerror) from None
        if stat.S_ISREG(os.fstat(lock).st_mode):
            return lock, False
        os.close(lock)  # a FIFO or a device
        raise lock_in_the_way(path)


LEFT_BY_NO_RUN = "it is not a lock a run left: those hold only 'process N' and have one link"


def tmp_path_for(path, pid=None):
    """Where atomic_write writes path first: path.PID.tmp, PID this process's unless given."""
    return f"{path}.{pid or os.getpid()}.tmp"


def lock_in_the_way(path, reason=LEFT_BY_NO_RUN):
    """The error for a file at a lock's name that is no lock of ours: it is left as it was."""
    problem = "is a symlink" if os.path.islink(path) else regular_file_problem(path)
    return UsageError(f"cannot use the lock file {path} ({f'it {problem}' if problem else reason}"
                      f"); move it away")


def release_lock(path, lock):
    if lock is not None:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == os.fstat(lock).st_ino:  # still ours, not a file put
                os.remove(path)  # there since; while locked: a waiting run sees it gone
        os.close(lock)


def regular_file_problem(path):
    """Why path is not a plain readable file, in words, or None (a FIFO would wait for ever)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "is a symlink to nothing" if os.path.islink(path) else "does not exist"
    except OSError as err:  # a symlink loop, a name too long, ...
        return f"cannot be read ({err.strerror or err})"
    if stat.S_ISDIR(mode):
        return "is a folder"
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return "is a FIFO or a socket, not a regular file"
    return None if stat.S_ISREG(mode) else "is a device, not a regular file"


def check_regular_file(path, flag, fix, not_found):
    """Refuse a path that is not a plain file: not_found if nothing is there, else one line."""
    problem = regular_file_problem(path)
    if problem == "does not exist":
        raise UsageError(not_found)
    if problem:
        raise UsageError(f"{flag} {path} {problem}; {fix}")


def bits_per_char(mean_loss, n_tokens, n_chars):
    """Nats per token to bits per character, comparable across tokenizers (ln 2 nats a bit)."""
    return mean_loss * n_tokens / n_chars / math.log(2)


# ---------------------------------------------------------------------------------------------
# Devices and precision

DEVICE_NAME = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def pick_device(name="auto"):
    if not DEVICE_NAME.fullmatch(name):
        raise UsageError(f"unknown device {name!r}; use auto, cuda, cuda:N, mps or cpu")
    if name == "auto":
        return ("cuda" if torch.cuda.is_available()
                else "mps" if torch.backends.mps.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} asked for, but no CUDA GPU is available; "
                         f"use --device cpu (or auto)")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise UsageError(f"--device {name} asked for, but this machine has "
                         f"{torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps asked for, but MPS is not available; use --device cpu")
    return name


def device_memory(device):
    """Bytes of memory on device: the GPU's, else the machine's RAM or, in a container with
    less, the container's limit (else the kernel stops the run halfway); None where unknown."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(device).total_memory
    ram = None
    with contextlib.suppress(AttributeError, ValueError, OSError):  # no sysconf (Windows)
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(filter(None, (ram, container_memory_limit())), default=None)


# A container's memory limit: cgroup v2's file, then v1's (which says about 2**63 for no limit).
CGROUP_MEMORY_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def container_memory_limit():
    for path in CGROUP_MEMORY_FILES:
        with contextlib.suppress(OSError, ValueError), open(path) as f:
            limit = int(f.read())  # v2 writes "max" for no limit: a ValueError, read on
            if limit > 0:  # nor is a zero or negative number a limit
                return limit
    return None


def check_fits_in_memory(n_bytes, device, what, fix):
    """Refuse work too big for the device (else: an allocator's traceback, or hours of swap)."""
    available = device_memory(device)
    if available is not None and n_bytes > available:
        raise UsageError(f"{what} needs at least {gibibytes(n_bytes)} of memory, more than the "
                         f"{gibibytes(available)} on {device}; {fix}")


def gibibytes(n_bytes):
    n_gib = min(n_bytes, 10**300) / 2**30  # a float, even for an absurd number of bytes
    return f"{n_gib:,.1f} GiB" if n_gib < 1e6 else f"{n_gib:.1e} GiB"


def use_flash(setting, device):
    """SDPA or the written-out attention. On CPUs the written-out one trains faster (SDPA's CPU
    kernels, with dropout a slower fallback, lose to plain matmuls; docs/results.md), and
    generate.py then samples with the code on the page too; on GPUs SDPA's fused kernels win."""
    return device != "cpu" if setting == "auto" else setting == "true"


def pick_dtype(name, device):
    """'auto': bf16 where the chip computes in it natively, else float16 on GPUs, float32 on
    CPUs and Apple GPUs (MPS; docs/training.md: not yet run on a Mac), where bf16 needs macOS 14
    (runs.set_up) and is not native on every chip, and float16 would need loss scaling.
    docs/results.md has the measured speed-ups."""
    if name != "auto":
        return name
    if has_native_bf16(device):
        return "bfloat16"
    return "float16" if device.startswith("cuda") else "float32"


def has_native_bf16(device):
    """Whether the chip computes in bf16 itself: where it does not (a CPU with AVX2 only, a
    T4), bf16 is emulated and a bf16 matmul is many times slower than a float32 one. CPUs are
    asked by their x86 flags (other CPUs count as without); Apple GPUs count as without (bf16
    needs macOS 14 there, and is not native on every chip)."""
    if device.startswith("cuda"):
        return gpu_has_native_bf16(device)
    return device == "cpu" and cpu_has_native_bf16()


def gpu_has_native_bf16(device):
    """bf16 in hardware: compute capability 8.0 and newer (A100, RTX 30xx, H100), AMD GPUs.
    Asked without emulation: plain is_bf16_supported() says yes on a T4 or V100 too, which
    have no bf16 tensor cores (only float16 ones), so that bf16 would run slowly there."""
    try:  # (about the current GPU, which runs.set_up makes the run's one)
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # an older PyTorch, without that argument
        return torch.cuda.get_device_capability(device) >= (8, 0)


def cpu_has_native_bf16():
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def autocast(device, dtype):
    """Mixed precision: matmuls in bf16/fp16, weights and the optimizer stay in float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


def use_compile(setting, device, doing):
    """--compile auto: on CUDA only, where its start-up pays for itself; and never where it
    cannot work: a note then says why and the code runs eager."""
    if not (setting == "true" or (setting == "auto" and device.startswith("cuda"))):
        return False
    problem = compile_problem(device)
    if problem:
        print(f"Note: {doing} without torch.compile: {problem} (see TROUBLESHOOTING.md)")
    return not problem


def compile_problem(device):
    """Why torch.compile cannot work here, or None."""
    if device.startswith("cuda"):  # pick_device made sure there is one
        major, minor = torch.cuda.get_device_capability(device)
        if major < 7:  # e.g. a P100 (6.0) or a GTX 10xx (6.1)
            return (f"this GPU (compute capability {major}.{minor}) is older than Triton, "
                    f"torch.compile's GPU compiler, supports (7.0 and newer)")
        from torch.utils._triton import has_triton
        if not has_triton():
            return "Triton is not installed or does not support this GPU"
    elif device == "cpu" and not (shutil.which("g++") or shutil.which("clang++")):
        return "no C++ compiler found"
    elif device == "mps":
        return "its Apple GPU (MPS) backend is a prototype, not tried by this project"
    return None
