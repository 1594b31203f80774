"""Tokenization: how text becomes the integers a GPT reads, and how its output becomes text.

A model sees only token ids, 0 to vocab_size - 1. Two tokenizers turn text into a list of ids
and back:

- CharTokenizer: one token per character (65 for Tiny Shakespeare). Simple, and every id is
  one character, so a sample is easy to read; but the model has to spell every word.
- BPETokenizer: byte-level byte-pair encoding, as GPT-2 uses. Frequent words become a single
  token, so the same context window (block_size tokens) holds about three times more text.

Both travel inside the checkpoint as plain data (to_dict, then tokenizer_from_dict), so
generate.py needs nothing but the checkpoint. dataset.py runs them over the training text
(fast_bpe.py learns the same merges as BPETokenizer.train, faster).
"""

import collections
import re

from utils import UsageError


class CharTokenizer:
    """One token per character. Vocabulary = the sorted distinct characters of the text."""

    def __init__(self, chars):
        self.chars = list(chars)
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text):
        return cls(sorted(set(text)))

    @property
    def vocab_size(self):
        return len(self.chars)

    def encode(self, text):
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            check_decodable("".join(unknown))
            raise UsageError(f"characters not in the model's vocabulary: {''.join(unknown)!r}; "
                             f"use only characters from the training text")
        return [self.stoi[ch] for ch in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def to_dict(self):
        return {"kind": "char", "chars": "".join(self.chars)}


class BPETokenizer:
    """Byte-level byte-pair encoding (BPE), as GPT-2 uses.

    How it works. Text is first turned into UTF-8 bytes: 256 base tokens, so any text in any
    script (Chinese, emoji) can be encoded, and decoding gives it back exactly. Training then
    repeats one step: find the pair of adjacent tokens that occurs most often in the training
    text and make it a new token (b"t" + b"h" -> b"th", later b"th" + b"e" -> b"the"), until
    the vocabulary has vocab_size tokens. Frequent words end up as a single token, rare ones
    as a few pieces, so a token covers several characters on average. Encoding applies the
    learned merges in the order they were learned.

    Pairs are never merged across word boundaries: the text is first split into chunks (a word
    with its leading space, a run of digits, of punctuation or of underscores, a run of spaces),
    which keeps tokens meaningful and lets each distinct chunk be counted and encoded once.
    """

    CHUNK = re.compile(r" ?[^\W\d_]+| ?\d+| ?[^\s\w]+| ?_+|\s+(?!\S)|\s+")

    def __init__(self, merges):
        self.merges = [tuple(pair) for pair in merges]
        self.rank = {pair: 256 + i for i, pair in enumerate(self.merges)}  # pair -> new token
        self.token_bytes = [bytes([b]) for b in range(256)]
        for left, right in self.merges:
            self.token_bytes.append(self.token_bytes[left] + self.token_bytes[right])
        self.cache = {}

    @classmethod
    def chunk_words(cls, text, vocab_size):
        """Each distinct chunk of text as a list of its UTF-8 bytes, and how often it occurs:
        what merges are learned from (here and in fast_bpe.train)."""
        if vocab_size < 256:
            raise UsageError(f"--vocab_size for BPE must be at least 256 (the byte tokens), "
                             f"got {vocab_size}")
        chunk_counts = collections.Counter(cls.CHUNK.findall(text))
        return [list(chunk.encode("utf-8")) for chunk in chunk_counts], list(chunk_counts.values())

    @classmethod
    def train(cls, text, vocab_size):
        words, counts = cls.chunk_words(text, vocab_size)
        pair_counts = collections.Counter()
        words_with = collections.defaultdict(set)  # pair -> indices of words that contain it
        for i, word in enumerate(words):
            for pair in zip(word, word[1:]):
                pair_counts[pair] += counts[i]
                words_with[pair].add(i)
        merges = []
        for new_token in range(256, vocab_size):
            if not pair_counts:
                break  # every chunk is a single token already
            best = max(pair_counts, key=pair_counts.get)
            merges.append(best)
            # Only the words containing `best` change: take their old pairs out of the counts,
            # merge, and put their new pairs in.
            for i in words_with.pop(best):
                old = words[i]
                for pair in zip(old, old[1:]):
                    pair_counts[pair] -= counts[i]
                    if pair_counts[pair] <= 0:
                        del pair_counts[pair]
                words[i] = merge_pair(old, best, new_token)
                for pair in zip(words[i], words[i][1:]):
                    pair_counts[pair] += counts[i]
                    words_with[pair].add(i)
        return cls(merges)

    @property
    def vocab_size(self):
        return len(self.token_bytes)

    def encode(self, text):
        check_decodable(text)
        ids = []
        for chunk in self.CHUNK.findall(text):  # each distinct chunk is encoded once
            if chunk not in self.cache:
                self.cache[chunk] = self.encode_chunk(chunk)
            ids.extend(self.cache[chunk])
        return ids

    def encode_chunk(self, chunk):
        tokens = list(chunk.encode("utf-8"))
        while len(tokens) > 1:
            # Apply the earliest-learned merge present; later merges build on earlier ones.
            pair = min(zip(tokens, tokens[1:]), key=lambda p: self.rank.get(p, float("inf")))
            if pair not in self.rank:
                break
            tokens = merge_pair(tokens, pair, self.rank[pair])
        return tokens

    def decode(self, ids):
        # A sampled sequence can stop inside a multi-byte character: show it as U+FFFD.
        return b"".join(self.token_bytes[i] for i in ids).decode("utf-8", errors="replace")

    def to_dict(self):
        return {"kind": "bpe", "merges": [list(pair) for pair in self.merges]}


def merge_pair(tokens, pair, new_token):
    """tokens with every occurrence of the adjacent pair replaced by new_token, left to right."""
    merged, i = [], 0
    while i < len(tokens):
        if i + 1 < len(tokens) and (tokens[i], tokens[i + 1]) == pair:
            merged.append(new_token)
            i += 2
        else:
            merged.append(tokens[i])
            i += 1
    return merged


def check_decodable(text):
    """Refuse lone surrogates: how Python passes on a byte of an argument or of stdin that is not
    valid UTF-8 (byte b becomes U+DC00 + b), or half of a UTF-16 pair. Not characters at all."""
    undecodable = re.search("[\ud800-\udfff]", text)
    if undecodable:
        byte = ord(undecodable[0]) - 0xDC00
        what = f"the byte 0x{byte:02x}, not UTF-8" if 0x80 <= byte <= 0xFF else "half a pair"
        raise UsageError(f"the text has a character that is not valid Unicode "
                         f"({undecodable[0]!r}: {what}); remove it, or convert the text to UTF-8")


def tokenizer_from_dict(state):
    if state["kind"] == "bpe":
        return BPETokenizer(state["merges"])
    return CharTokenizer(state["chars"])


def start_tokens(tokenizer):
    """What generation starts from when there is no prompt: a newline, as a text file would."""
    try:
        return tokenizer.encode("\n")
    except UsageError:  # a character vocabulary without a newline
        return [0]
