"""BPE at scale, for dataset.py: the merges and the tokens of BPETokenizer (tokenizer.py), the
readable reference, only faster. tests/test_dataset.py checks that both are the reference's.

- train() learns BPETokenizer.train's merges, faster on a big sample (docs/data.md): the
  reference finds each merge with max() over every pair, most of its time; this keeps a heap.
- encode_pieces() encodes a text in pieces on every core, each worker with the reference's
  encode() and its chunk cache. Pieces are cut where no BPE chunk can span (word_end_pieces),
  so the tokens are those of encoding the whole text at once.
"""

import collections
import heapq
import itertools
import multiprocessing
import os
import re
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from tqdm import tqdm

from tokenizer import BPETokenizer, merge_pair

PIECE_CHARS = 1 << 20  # characters per piece a worker encodes
# A worker's chunk -> ids cache is emptied past this many entries (~170 bytes each, so ~350 MB):
# fewer made a worker re-encode its frequent words again and again (docs/results.md).
CACHE_ENTRIES = 2_000_000
WORD_END = re.compile(r"\S(?=\s)")  # a character that is not whitespace, with whitespace next
LAST_WORD_END = re.compile(r".*\S(?=\s)", re.DOTALL)  # greedy: searches back from the end


def train(text, vocab_size):
    """BPETokenizer.train(text, vocab_size), merge for merge, ties included: the reference's
    loop, plus a heap of (-count, when the pair was last added to the counts, pair). Of the
    pairs with the highest count, max() in the reference returns the first in the counts' order,
    the order they were (last) added in: the heap's smallest valid entry. An entry is valid while
    its pair still has that count and that time; stale ones are skipped."""
    words, counts = BPETokenizer.chunk_words(text, vocab_size)
    pair_counts, added_at, clock = {}, {}, itertools.count()
    words_with = collections.defaultdict(set)  # pair -> indices of words that contain it

    def add(pair, count, i):
        if pair not in pair_counts:  # Counter's += on a missing pair: it goes last
            pair_counts[pair], added_at[pair] = 0, next(clock)
        pair_counts[pair] += count
        words_with[pair].add(i)

    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            add(pair, counts[i], i)
    heap, merges = [], []
    for new_token in tqdm(range(256, vocab_size), desc="Learning BPE merges", unit="merge",
                          delay=1, dynamic_ncols=True, file=sys.stderr):
        if not pair_counts:
            break  # every chunk is a single token already
        if not heap or len(heap) > 4 * len(pair_counts) + 1000:  # first, or mostly stale
            heap = [(-count, added_at[pair], pair) for pair, count in pair_counts.items()]
            heapq.heapify(heap)
        while pair_counts.get(heap[0][2]) != -heap[0][0] or added_at[heap[0][2]] != heap[0][1]:
            heapq.heappop(heap)  # stale: the pair's count or time has changed since
        best = heap[0][2]
        merges.append(best)
        changed = set()
        for i in words_with.pop(best):  # as the reference, in the same (set) order
            old = words[i]
            for pair in zip(old, old[1:]):
                pair_counts[pair] -= counts[i]
                if pair_counts[pair] <= 0:
                    del pair_counts[pair]
                changed.add(pair)
            words[i] = merge_pair(old, best, new_token)
            for pair in zip(words[i], words[i][1:]):
                add(pair, counts[i], i)
                changed.add(pair)
        for pair in changed & pair_counts.keys():
            heapq.heappush(heap, (-pair_counts[pair], added_at[pair], pair))
    return BPETokenizer(merges)


# ---------------------------------------------------------------------------------------------
# Encoding in pieces, on every core

def word_end_pieces(tagged_chunks, piece_chars):
    """(split, piece): each split's text cut into pieces of about piece_chars characters. A cut
    goes after a character that is not whitespace and before one that is: BPE's chunks
    (BPETokenizer.CHUNK) never hold whitespace after another character, so none spans such a
    place, and the pieces encode exactly as the whole split does. The train split's end is
    always a cut: the reference encodes the two splits apart."""
    held, held_split = "", "train"
    for split, text in tagged_chunks:
        if split != held_split:  # the train split ended
            if held:
                yield held_split, held
            held, held_split = "", split
        held += text
        start = 0
        while len(held) - start > piece_chars:
            # The last word end before start + piece_chars, else the first one after it.
            limit = start + piece_chars
            word_end = LAST_WORD_END.match(held, start, limit) or WORD_END.search(held, limit)
            if word_end is None and len(held) - start < 8 * piece_chars:
                break  # no word end yet: wait for more text
            cut = word_end.end() if word_end else limit  # else a "word" of millions: cut anyway
            yield split, held[start:cut]
            start = cut
        held = held[start:]
    if held:
        yield held_split, held


def encode_pieces(pieces, merges, dtype, workers):
    """(split, piece, ids) for each piece, in order, encoded by BPETokenizer.encode in
    `workers` processes; at most 2 pieces per worker in flight at a time, so memory does not
    grow with the text."""
    # fork: workers start at once with the merges; they use no threads, torch or GPU.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else None)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=start_worker,
                             initargs=(merges, os.getpid())) as pool:
        in_flight = collections.deque()
        for split, piece in pieces:
            try:  # the first submit starts the workers
                in_flight.append((split, piece, pool.submit(encode_piece, piece, dtype)))
            except OSError:  # no descriptors left (ulimit -n) for the next worker's pipes
                # The workers started would wait for work, and this process's exit for them, for
                # ever. Killed (every child: preparing starts no other), as they inherited the
                # scripts' SIGTERM handler, which would not end them.
                for worker in multiprocessing.active_children():
                    worker.kill()
                raise
            if len(in_flight) >= 2 * workers:
                split, piece, ids = in_flight.popleft()
                yield split, piece, ids.result()
        for split, piece, ids in in_flight:
            yield split, piece, ids.result()


WORKER_TOKENIZER = None  # each worker process's own BPETokenizer, with its own chunk cache


def start_worker(merges, parent):
    global WORKER_TOKENIZER
    WORKER_TOKENIZER = BPETokenizer(merges)
    threading.Thread(target=exit_with_parent, args=(parent,), daemon=True).start()


def exit_with_parent(parent):
    """A worker whose parent was killed (kill -9, out of memory) would wait for work for ever:
    once the parent is gone (the worker is handed to another), the worker exits too."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def encode_piece(piece, dtype):
    """The piece's token ids with the reference encoder, as an array of dtype."""
    ids = np.array(WORKER_TOKENIZER.encode(piece), dtype=dtype)
    if len(WORKER_TOKENIZER.cache) > CACHE_ENTRIES:
        WORKER_TOKENIZER.cache.clear()  # bounded memory; the frequent chunks come back at once
    return ids


def cpu_count():
    """The cores this process may use (Linux), else all of the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
