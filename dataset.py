"""Text of any size, prepared once into a token file, then memory-mapped: the data side of
train.py, for corpora far larger than Tiny Shakespeare, in bounded memory (docs/data.md).

    corpus = load_corpus(config)                      # prepares on first use, then maps at once
    x, y = get_batch(corpus, 64, 256, "cpu")          # (B, T) each, read from the map
    val = val_set(corpus, config.eval_tokens, 256, "cpu")

The first run streams --data (a text file, or a folder of .txt files) into <data>.char.tokens
(or .bpeN.tokens) and .tokens.json; later runs check those and map the token file at once.
"""

import codecs
import contextlib
import datetime
import errno
import hashlib
import json
import math
import os
import pathlib
import sys
import time
import urllib.request
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import fast_bpe
from checkpoint import (
    atomic_write,
    bytes_over_name_max,
    check_writable,
    make_folders,
    out_of_room,
    parse_json,
    tokenizer_problem,
    write_failure,
)
from tokenizer import CharTokenizer, tokenizer_from_dict
from utils import UsageError, check_regular_file, regular_file_problem, release_lock, take_lock, tmp_path_for

DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DATA_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_DATA = os.path.join("data", "input.txt")
FORMAT = 1  # bump when the token file or its metadata changes meaning: old ones are re-prepared
VAL_FRACTION = 0.1  # the val split: the last 10% of the characters
CHUNK_BYTES = 16 << 20  # read this much at a time: memory per pass stays ~10x this
# --eval_tokens 0: evaluate this much val text (Tiny Shakespeare's val split: 111,540 characters)
EVAL_CHARS = 112_000
SAMPLE_STRETCH_CHARS = 100_000  # BPE: the sample is stretches of this many characters


@dataclass
class Corpus:
    """A prepared text: its tokenizer, and its open token file (train tokens, then val)."""
    tokenizer: object
    tokens_file: object  # the open file: a later re-preparation cannot swap it under us
    dtype: str  # "uint16" or "uint32"
    n_train: int  # tokens
    n_val: int
    n_chars: int  # characters in the whole text
    sha256: str  # of the text: a checkpoint records it, so --resume can tell another text


@dataclass
class ValSet:
    """The val tokens that evaluate() scores: the whole split, or a fixed subset of it."""
    tokens: torch.Tensor  # exact: the split (N,); else evenly spaced windows (n, T + 1)
    exact: bool
    n_predictions: int  # next-token predictions scored
    n_chars: int  # characters those predictions cover (for bits per character)
    note: str  # for the eval line: "exact", or "on 111,360 of 100,000,000 tokens"


# ---------------------------------------------------------------------------------------------
# Batches and the val set, read from the map

def split_tokens(corpus, split):
    """One split's tokens (N,) as a fresh read-only memory map of the token file."""
    start, count = (0, corpus.n_train) if split == "train" else (corpus.n_train, corpus.n_val)
    return np.memmap(corpus.tokens_file, dtype=corpus.dtype, mode="r", shape=(count,),
                     offset=start * np.dtype(corpus.dtype).itemsize)


def get_batch(corpus, batch_size, block_size, device, split="train"):
    """Random (x, y) blocks of the split: (B, T) each, y is x shifted left by one token. A fresh
    map each time (microseconds), as in nanoGPT: the pages a map has read count as this process's
    memory until it is closed, so one map kept for a whole run would look like the whole file."""
    tokens = split_tokens(corpus, split)
    starts = torch.randint(len(tokens) - block_size, (batch_size,))
    # (B, T + 1) indices: row b is starts[b], starts[b] + 1, ..., starts[b] + T.
    windows = checked_ids(tokens[starts.numpy()[:, None] + np.arange(block_size + 1)], corpus)
    cuda = device.startswith("cuda")  # from pinned memory the copy can overlap the GPU's work
    windows = (windows.pin_memory() if cuda else windows).to(device, non_blocking=cuda)
    return windows[:, :-1], windows[:, 1:]


def checked_ids(ids, corpus):
    """ids as an int64 tensor, if each is in the vocabulary; one that is not means the token file
    was changed after it was prepared (its size and the text's are checked at every start)."""
    if ids.size and ids.max() >= corpus.tokenizer.vocab_size:
        raise UsageError(f"the token file {corpus.tokens_file.name} is damaged (an id beyond the "
                         f"vocabulary); delete it and run again to prepare it anew")
    return torch.from_numpy(ids.astype(np.int64))


def val_set(corpus, eval_tokens, block_size, device):
    """The whole val split if it has at most eval_tokens tokens (its loss is then exact), else
    eval_tokens // (T + 1) windows of T + 1 tokens spread evenly over it: the same subset at
    every evaluation, so the curve stays comparable, and a cost that does not grow with it.
    eval_tokens 0: the val tokens of EVAL_CHARS characters at the split's own characters per
    token: an evaluation scores as much text as on Tiny Shakespeare, with either tokenizer."""
    tokens, tokenizer = split_tokens(corpus, "val"), corpus.tokenizer
    val_chars = corpus.n_chars - train_chars(corpus.n_chars)
    auto_eval_tokens = math.ceil(EVAL_CHARS * corpus.n_val / max(1, val_chars))
    # (At least one window: a huge block_size could outgrow the automatic bound.)
    eval_tokens = max(eval_tokens or auto_eval_tokens, block_size + 1)
    if len(tokens) <= eval_tokens:
        exact = checked_ids(tokens, corpus)
        n_chars = chars_covered(tokenizer, exact[1:].tolist())  # what the predictions cover
        return ValSet(exact.to(device), True, len(exact) - 1, n_chars, "exact")
    n_windows = eval_tokens // (block_size + 1)
    starts = np.linspace(0, len(tokens) - block_size - 1, n_windows).astype(np.int64)
    windows = checked_ids(tokens[starts[:, None] + np.arange(block_size + 1)], corpus)  # (n, T+1)
    n_chars = sum(chars_covered(tokenizer, window[1:].tolist()) for window in windows)
    return ValSet(windows.to(device), False, n_windows * block_size, n_chars,
                  f"on {n_windows * block_size:,} of {len(tokens):,} tokens")


def chars_covered(tokenizer, ids):
    """How many characters the tokens ids cover: with BPE, the UTF-8 characters whose first byte
    they hold (a token can end inside a character), so that windows cut anywhere count each
    character once, as decoding the whole text would."""
    if isinstance(tokenizer, CharTokenizer):
        return len(ids)
    utf8 = np.frombuffer(b"".join(tokenizer.token_bytes[i] for i in ids), dtype=np.uint8)
    return int(np.count_nonzero((utf8 & 0xC0) != 0x80))  # 10xxxxxx: a character's later bytes


# ---------------------------------------------------------------------------------------------
# Loading: prepare once (rank 0 only), then map

def load_corpus(config, rank=0, world_size=1):
    """The Corpus for config.data, preparing it first if it is new or its text changed. Under
    torchrun only rank 0 prepares; the others wait for it, then map the same files (the
    operating system keeps one copy of their pages for all ranks)."""
    settings, meta = corpus_settings(config), None
    if rank == 0:  # find_sources fetches Tiny Shakespeare if it is missing
        sources = find_sources(config.data)
        meta = prepare_if_needed(sources, settings, prepared_stem(config.data, settings))
    if world_size > 1:
        # Its own group with a long timeout: preparing a big corpus can outlast the default one.
        waiting_room = torch.distributed.new_group(backend="gloo",
                                                   timeout=datetime.timedelta(days=1))
        torch.distributed.barrier(group=waiting_room)
        torch.distributed.destroy_process_group(waiting_room)
    stem = prepared_stem(config.data, settings)
    meta = meta or read_meta(stem)
    return Corpus(tokenizer_from_dict(meta["tokenizer"]), open(f"{stem}.tokens", "rb"),
                  meta["dtype"], meta["n_train"], meta["n_val"], meta["n_chars"], meta["sha256"])


def corpus_settings(config):
    """What the tokens depend on besides the text; a change means preparing anew."""
    if config.tokenizer == "char":
        return {"tokenizer": "char"}
    return {"tokenizer": "bpe", "vocab_size": config.vocab_size,
            "bpe_sample_chars": config.bpe_sample_chars}


def find_sources(path):
    """The text files --data names: the file itself, or a folder's .txt files, sorted."""
    if not os.path.exists(path) and os.path.normpath(path) == DEFAULT_DATA:
        download_tiny_shakespeare(path)
    if not os.path.isdir(path):
        fix = "pass --data PATH to a UTF-8 text file or a folder of .txt files"
        check_regular_file(path, "--data", fix, f"data file not found: {path}; {fix}")
        if os.path.getsize(path) == 0:
            raise UsageError(f"data file {path} is empty; give it some text to learn from")
        return [path]
    sources = sorted(os.path.join(folder, name) for folder, names in folders_in(path)
                     for name in names if name.endswith(".txt"))
    if not sources:
        raise UsageError(f"no .txt files in the folder {path}; put the text in .txt files "
                         f"or pass --data PATH to a text file")
    for source in sources:  # a FIFO would wait for a writer for ever; a dead link, crash
        if problem := regular_file_problem(source):
            raise UsageError(f"{source} in the --data folder {problem}; remove it, or make it "
                             f"a text file")
    if not any(os.path.getsize(p) for p in sources):
        raise UsageError(f"the .txt files in {path} are empty; give them some text to learn from")
    return sources


def folders_in(path):
    """(folder, its file names) for path and every folder below it, linked folders too, each
    once: a folder inside path under its own name, one reached only through links under the
    first name met (in sorted order); a link back up to path or above it (a loop) is not
    followed."""
    root, seen = os.path.realpath(path), set()
    own_name = {os.path.realpath(folder): folder for folder, _, _ in os.walk(path)}  # no links
    for folder, subfolders, names in os.walk(path, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen or own_name.get(real, folder) != folder or \
                real != root and os.path.commonpath([real, root]) == real:
            subfolders.clear()  # walked already or elsewhere, or a folder that holds path
            continue
        seen.add(real)
        subfolders.sort()
        yield folder, names


def download_tiny_shakespeare(path):
    print(f"Downloading Tiny Shakespeare to {path}...")
    try:
        with urllib.request.urlopen(DATA_URL, timeout=30) as response:
            payload = response.read()
    except OSError as err:
        raise UsageError(f"could not download Tiny Shakespeare ({err}); offline? Save {DATA_URL} "
                         f"as {path} by hand, or pass --data PATH to another text file")
    if hashlib.sha256(payload).hexdigest() != DATA_SHA256:
        raise UsageError(f"downloaded Tiny Shakespeare has the wrong sha256; save {DATA_URL} "
                         f"as {path} by hand")
    folder = os.path.dirname(path) or "."
    try:
        make_folders(folder)
        atomic_write(path, lambda tmp: pathlib.Path(tmp).write_bytes(payload))
    except OSError as err:  # a read-only folder, a full disk, a file where the folder goes
        raise UsageError(f"cannot save Tiny Shakespeare as {path} ({write_failure(err)}); make "
                         f"{folder} a folder you can write, or pass --data PATH to another "
                         f"text file") from None


def prepared_stem(data, settings):
    """Where the token file and its metadata go, less their extensions: beside the data, or
    in the cache folder if the data's folder is read-only."""
    key = "char" if settings["tokenizer"] == "char" else f"bpe{settings['vocab_size']}"
    data = os.path.abspath(data) if os.path.isdir(data) else data
    if os.access(os.path.dirname(os.path.abspath(data)), os.W_OK):
        return check_stem_length(f"{data}.{key}", data)
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                         "mini-gpt")
    try:
        make_folders(cache)
    except OSError as err:
        raise UsageError(f"the folder of {data} is read-only, so its token files go to the "
                         f"cache folder {cache}, which cannot be written ({err.strerror}); set "
                         f"XDG_CACHE_HOME to a folder you can write") from None
    digest = hashlib.sha256(os.path.abspath(data).encode()).hexdigest()[:12]
    return check_stem_length(os.path.join(cache, f"{digest}-{os.path.basename(data)}.{key}"), data)


def check_stem_length(stem, data):
    """stem, once it is proven short enough for the longest file named after it, atomic_write's
    <stem>.tokens.json.PID.tmp: else preparing would fail, with no fix but a shorter name."""
    if (over := bytes_over_name_max(os.path.basename(stem) + ".tokens.json")) > 0:
        room = len(os.fsencode(os.path.basename(data))) - over
        raise UsageError(f"--data {data} is too long a name: its token files are named after it, "
                         f"with {stem[stem.rindex('.'):]}.tokens.json.PID.tmp added, {over} bytes "
                         f"over a file name's limit; rename it to at most {room} bytes")
    return stem


def prepare_if_needed(sources, settings, stem):
    """The metadata of an up-to-date token file for sources, preparing one if needed. Runs that
    start together on the same text take turns (a lock file): the first prepares."""
    # Never a checkpoint's lock (<checkpoint>.lock): no --checkpoint may end in .tokens (runs.py)
    lock_path = f"{stem}.tokens.lock"
    lock = take_lock(lock_path, wait=True, guarded=[f"{stem}.tokens", f"{stem}.tokens.json"])
    try:
        meta, stats = read_meta(stem), source_stats(sources)
        if meta_fits(meta, settings, f"{stem}.tokens"):
            if meta["sources"] == stats and not changed_since(sources, f"{stem}.tokens.json"):
                return meta
            # Touched or copied but maybe not changed (git checkout, cp): compare the bytes.
            if [s[:2] for s in meta["sources"]] == [s[:2] for s in stats] and \
                    scan(sources, CHUNK_BYTES, "Checking")[2] == meta["sha256"]:
                meta["sources"] = stats
                try:  # only spares the next start this check: the tokens are right either way
                    write_meta(stem, meta)
                except OSError as err:
                    print(f"Note: cannot update {stem}.tokens.json ({write_failure(err)}); the "
                          f"tokens are right and used, but each start will check the text again")
                return meta
        return prepare(sources, settings, stem)
    finally:
        release_lock(lock_path, lock)


def meta_fits(meta, settings, tokens_path):
    """Whether the metadata is undamaged, of this format and these settings, and describes the
    token file at tokens_path, its numbers agreeing with each other and with the text's size; if
    not, the text is prepared anew."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or \
            meta.get("settings") != settings or tokenizer_problem(meta.get("tokenizer"), None):
        return False
    counts = [meta.get(name) for name in ("n_chars", "n_train_chars", "n_train", "n_val")]
    sources = meta.get("sources")
    dtype = token_dtype(tokenizer_from_dict(meta["tokenizer"]).vocab_size)
    if not (all(type(n) is int and n >= 0 for n in counts) and meta.get("dtype") == dtype and
            isinstance(meta.get("sha256"), str) and isinstance(sources, list) and
            all(isinstance(s, list) and len(s) == 3 and type(s[1]) is int for s in sources)):
        return False
    n_chars, n_train_chars, n_train, n_val = counts
    text_bytes = sum(s[1] for s in sources) + len(sources) - 1  # and a newline between files
    if settings["tokenizer"] == "char":  # a token a character
        tokens_agree = (n_train, n_train + n_val) == (n_train_chars, n_chars)
    else:  # byte-level BPE: a token covers at least a byte
        tokens_agree = n_train + n_val <= text_bytes
    return tokens_agree and n_train_chars == train_chars(n_chars) and \
        n_chars <= text_bytes <= 4 * n_chars + len(sources) - 1 and os.path.isfile(tokens_path) \
        and os.path.getsize(tokens_path) == (n_train + n_val) * np.dtype(dtype).itemsize


def read_meta(stem):
    """The metadata, or None: none yet, or damaged (then prepare anew)."""
    with contextlib.suppress(OSError), open(f"{stem}.tokens.json", "rb") as f:
        return parse_json(f.read())
    return None


def write_meta(stem, meta):
    atomic_write(f"{stem}.tokens.json",
                 lambda tmp: pathlib.Path(tmp).write_text(json.dumps(meta, indent=1)))


def source_stats(sources):
    """[name, bytes, modification time in ns] of each file: cheap to compare at every start."""
    root = os.path.dirname(os.path.commonpath([os.path.abspath(p) for p in sources]))
    return [[os.path.relpath(os.path.abspath(p), root), os.stat(p).st_size,
             os.stat(p).st_mtime_ns] for p in sources]


def changed_since(sources, path):
    """Whether a source file changed after the file at path was written. Its modification time
    can be set back (touch -r, cp -p, rsync -t) and agree with the metadata; its change time,
    which every write moves and no tool sets back, cannot."""
    written = os.stat(path).st_mtime_ns
    return any(os.stat(source).st_ctime_ns > written for source in sources)


def train_chars(n_chars):
    """How many of a text's n_chars characters are the train split; the rest are val."""
    return int(n_chars * (1 - VAL_FRACTION))


def too_short(corpus, block_size):
    """Why the text is too short to train on (more than block_size train tokens, a batch's block
    and its next token, and 2 val ones, one prediction to score), in words, or None."""
    if corpus.n_train > block_size and corpus.n_val >= 2:
        return None
    if isinstance(corpus.tokenizer, CharTokenizer):
        return (f"has {corpus.n_chars} characters, too few for block_size {block_size}: need at "
                f"least {fewest_chars(block_size)}")
    return (f"has {corpus.n_train} train and {corpus.n_val} val tokens (BPE), too few for "
            f"block_size {block_size}: need at least {block_size + 1} train tokens and 2 val ones")


def fewest_chars(block_size):
    """The shortest text --tokenizer char trains on: more than block_size train characters (a
    batch's block and its next character), and 2 val ones (one prediction to score)."""
    n_chars = int(block_size / (1 - VAL_FRACTION))  # a little short of it: counts up from here
    while train_chars(n_chars) <= block_size or n_chars - train_chars(n_chars) < 2:
        n_chars += 1
    return n_chars


def token_dtype(vocab_size):
    """The smallest unsigned integer that holds every token id."""
    return "uint16" if vocab_size <= 2 ** 16 else "uint32"


# ---------------------------------------------------------------------------------------------
# Preparing: read the text in chunks, learn the vocabulary, encode, write

def prepare(sources, settings, stem, chunk_bytes=CHUNK_BYTES, piece_chars=fast_bpe.PIECE_CHARS,
            workers=None):
    """Tokenize the sources into <stem>.tokens, then write <stem>.tokens.json; returns the
    metadata. chunk_bytes, piece_chars and workers are small in tests, to cut text anywhere."""
    for path in (f"{stem}.tokens", f"{stem}.tokens.json"):  # else found only at the rename
        check_writable(path, f"the token file {path}", "delete it (it is made from the text)")
    started, stats = time.time(), source_stats(sources)
    char_level = settings["tokenizer"] == "char"
    n_chars, code_points, sha256 = scan(sources, chunk_bytes, "Reading", want_vocab=char_level)
    n_train_chars = train_chars(n_chars)
    n_tokens = {"train": 0, "val": 0}

    def write_tokens(tmp_path):  # atomic_write calls it below, once `encoded` is made
        with open(tmp_path, "wb") as out:
            for split, ids in encoded:
                out.write(ids.tobytes())  # ids.tofile's OSError would not say why it failed
                n_tokens[split] += len(ids)
        # Refuse tokens of a text that changed while it was read (an append, an editor's save):
        # they would mix the old text and the new.
        for before, after in zip(stats, source_stats(sources)):
            if before != after:
                raise UsageError(f"the data file {after[0]} changed while it was being "
                                 f"prepared; run again once nothing is writing to it")

    try:  # learning reads the text again: a file deleted since is an OSError too
        if char_level:
            tokenizer = CharTokenizer("".join(map(chr, code_points)))
            encoded = char_ids(sources, code_points, n_train_chars, chunk_bytes)
        else:
            sample = bpe_sample(sources, n_train_chars, settings["bpe_sample_chars"], chunk_bytes)
            tokenizer = fast_bpe.train(sample, settings["vocab_size"])
            encoded = bpe_ids(sources, n_train_chars, tokenizer, chunk_bytes, piece_chars,
                              workers or fast_bpe.cpu_count())
        atomic_write(f"{stem}.tokens", write_tokens)  # encodes as it writes
        # The old metadata must not describe the new tokens; removed only once they are in place,
        # so a failed rename keeps both files. (Left by a crash or a failed removal, it no longer
        # fits the text, its sources or sha256 differ, or it describes these same tokens.)
        with contextlib.suppress(FileNotFoundError):
            os.remove(f"{stem}.tokens.json")
        meta = dict(format=FORMAT, settings=settings, sources=stats, sha256=sha256,
                    n_chars=n_chars, n_train_chars=n_train_chars, tokenizer=tokenizer.to_dict(),
                    dtype=token_dtype(tokenizer.vocab_size), n_train=n_tokens["train"],
                    n_val=n_tokens["val"], seconds=round(time.time() - started, 1))
        write_meta(stem, meta)
    except OSError as err:
        raise UsageError(cannot_write_tokens(stem, err)) from None
    return meta


def cannot_write_tokens(stem, err):
    """Why the token files could not be written, and the fix for that cause."""
    if err.errno in (errno.EMFILE, errno.ENFILE):  # BPE's workers each need pipes
        return (f"too many open files to prepare the token file {stem}.tokens ({err.strerror}); "
                f"raise the limit on open files (ulimit -n), e.g. to 1024")
    # The file that failed: os.replace names the one it could not replace second.
    path = (err.filename2 or err.filename or f"{stem}.tokens").removesuffix(tmp_path_for(""))
    if out_of_room(err):
        fix = "free some disk space, or set XDG_CACHE_HOME to a folder with room"
    elif os.path.isdir(f"{stem}.tokens") or os.path.isdir(f"{stem}.tokens.json"):
        fix = f"a folder named {stem}.tokens or {stem}.tokens.json is in the way: move it"
    elif err.errno == errno.EPERM:  # not to be replaced: chattr +a or +i, another user's in /tmp
        fix = f"delete {path} (it is made from the text), or have its owner delete it"
    else:
        fix = ("make that folder writable, or set XDG_CACHE_HOME to one you can write (token "
               "files go there when the data's folder is read-only)")
    return f"cannot write the token file {path} ({write_failure(err)}); {fix}"


def read_text_chunks(sources, chunk_bytes, what, sha256=None):
    """The joined text of the sources, as str chunks of about chunk_bytes bytes each, under a
    progress bar named what. Each file gets its own UTF-8 decoder, which holds back a character
    cut by a chunk edge until the next chunk completes it."""
    with tqdm(total=sum(os.path.getsize(p) for p in sources), desc=what, unit="B",
              unit_scale=True, delay=1, dynamic_ncols=True, file=sys.stderr) as bar:
        for i, path in enumerate(sources):
            decoder = codecs.getincrementaldecoder("utf-8")()
            for offset, block in read_blocks(path, chunk_bytes, newline=i < len(sources) - 1):
                held_back = len(decoder.getstate()[0])  # a character's start, from the last block
                try:  # the final b"": a character cut off by the end of the file is an error too
                    text = decoder.decode(block, final=not block)
                except UnicodeDecodeError as err:
                    raise UsageError(f"data file {path} is not UTF-8 text (bad byte at offset "
                                     f"{offset - held_back + err.start}); convert it to UTF-8 "
                                     f"first") from None
                if sha256:
                    sha256.update(block)
                bar.update(len(block))
                yield text


def read_blocks(path, chunk_bytes, newline):
    """(offset, bytes) of the file, chunk by chunk; then b"\n" if newline and the file does not
    end in one (a newline goes between two files), and b"" to mark the end."""
    offset, last = 0, b"\n"
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk_bytes):
                yield offset, block
                offset, last = offset + len(block), block[-1:]
    except OSError as err:  # permission denied; an I/O error (a failing disk, a network drive)
        reason = "permission denied" if isinstance(err, PermissionError) else err.strerror or err
        raise UsageError(f"cannot read data file {path}: {reason}; check the file (its "
                         f"permissions, its disk), or pass another --data") from None
    if newline and last != b"\n":
        yield offset, b"\n"
    yield offset, b""


def code_points_of(text):
    """The text's characters as Unicode code points (N,), vectorised: no Python loop."""
    if text.isascii():  # the common case, 4x less memory: one byte per character
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def scan(sources, chunk_bytes, what, want_vocab=False):
    """(number of characters, sorted distinct code points or None, sha256) of the joined text,
    in one pass; the sha256 tells a touched file from a changed one."""
    n_chars, sha256 = 0, hashlib.sha256()
    seen = np.zeros(sys.maxunicode + 1, dtype=bool) if want_vocab else None
    for text in read_text_chunks(sources, chunk_bytes, what, sha256):
        n_chars += len(text)
        if want_vocab:
            seen[code_points_of(text)] = True
    return n_chars, (np.flatnonzero(seen) if want_vocab else None), sha256.hexdigest()


def split_at(chunks, n_train_chars):
    """("train", text) for the first n_train_chars characters of the chunks, then ("val", text)."""
    position = 0
    for text in chunks:
        cut = min(len(text), max(0, n_train_chars - position))
        if cut > 0:
            yield "train", text[:cut]
        if cut < len(text):
            yield "val", text[cut:]
        position += len(text)


def char_ids(sources, code_points, n_train_chars, chunk_bytes):
    """(split, ids) of the text, chunk by chunk: a character's id is its code point's rank."""
    table = np.zeros(sys.maxunicode + 1, dtype=token_dtype(len(code_points)))  # code point -> id
    table[code_points] = np.arange(len(code_points))
    chunks = read_text_chunks(sources, chunk_bytes, "Encoding")
    for split, text in split_at(chunks, n_train_chars):
        yield split, table[code_points_of(text)]


def bpe_sample(sources, n_train_chars, sample_chars, chunk_bytes):
    """The text BPE learns its merges from: the whole train split if it has at most
    sample_chars characters (or sample_chars is 0), else stretches of SAMPLE_STRETCH_CHARS
    spread evenly over it, sample_chars in all, joined by newlines. Deterministic."""
    if sample_chars == 0 or n_train_chars <= sample_chars:
        starts, length = [0], n_train_chars
    else:
        n_stretches = max(1, sample_chars // SAMPLE_STRETCH_CHARS)
        length = sample_chars // n_stretches
        starts = [i * (n_train_chars - length) // max(1, n_stretches - 1)
                  for i in range(n_stretches)]
    stretches, position = [[] for _ in starts], 0
    for text in read_text_chunks(sources, chunk_bytes, "Sampling for BPE"):
        for stretch, start in zip(stretches, starts):
            lo, hi = max(start, position), min(start + length, position + len(text))
            if lo < hi:
                stretch.append(text[lo - position:hi - position])
        position += len(text)
        if position >= starts[-1] + length:
            break  # the rest is not in the sample
    return "\n".join("".join(pieces) for pieces in stretches)


def bpe_ids(sources, n_train_chars, tokenizer, chunk_bytes, piece_chars, workers):
    """(split, ids) of the train split, then the val split, encoded in pieces in parallel."""
    byte_lengths = np.array([len(b) for b in tokenizer.token_bytes])
    chunks = split_at(read_text_chunks(sources, chunk_bytes, "Encoding (BPE)"), n_train_chars)
    pieces = fast_bpe.word_end_pieces(chunks, piece_chars)
    dtype = token_dtype(tokenizer.vocab_size)
    for split, piece, ids in fast_bpe.encode_pieces(pieces, tokenizer.merges, dtype, workers):
        # A cheap check that no byte was lost: the tokens' bytes add up to the piece's.
        if byte_lengths[ids].sum() != len(piece.encode("utf-8")):
            raise UsageError("the BPE tokenizer does not round-trip this text; please report it")
        yield split, ids
