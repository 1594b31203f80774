"""What dataset.py promises: a text of any size prepared once into a token file with exactly the
tokens the readable tokenizers give, re-prepared when the text changes, read from a folder in a
stable order, sampled from the map, and a bounded, deterministic evaluation."""

import hashlib
import io
import os
import random
import shutil
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch

import dataset
import fast_bpe
import train
from config import Config, parse_config
from conftest import ROOT, TINY_FLAGS, TINY_TEXT, run_in_process, run_script, tiny_model
from runs import Run
from tokenizer import BPETokenizer, CharTokenizer, tokenizer_from_dict
from utils import UsageError

MIXED = ("ROMEO: café, naïve — 床前明月光，疑是地上霜。 Emoji 🙂👍🏽 and tabs\tend\n"
         "def __init__(self, max_len=2): return self._cache  # code_with_underscores\n"
         "  indented   spaces\n\n\nand\r\nwindows lines 12345 67.89\n")


def prepare_text(folder, text, tokenizer="char", vocab_size=300, **options):
    """Prepare text written to folder/text.txt; returns (metadata, all tokens as a list)."""
    path = folder / "text.txt"
    path.write_text(text, encoding="utf-8")
    return prepare_path(str(path), tokenizer, vocab_size, **options)


def prepare_path(path, tokenizer="char", vocab_size=300, bpe_sample_chars=0, **options):
    settings = dataset.corpus_settings(Config(tokenizer=tokenizer, vocab_size=vocab_size,
                                              bpe_sample_chars=bpe_sample_chars))
    stem = dataset.prepared_stem(path, settings)
    meta = dataset.prepare(dataset.find_sources(path), settings, stem, **options)
    return meta, np.fromfile(f"{stem}.tokens", dtype=meta["dtype"]).tolist()


def reference(text, kind, vocab_size=300):
    """(tokenizer, train ids, val ids): the readable tokenizers on the whole text in memory."""
    n_train = int(len(text) * (1 - dataset.VAL_FRACTION))
    train_text, val_text = text[:n_train], text[n_train:]
    tokenizer = (CharTokenizer.from_text(text) if kind == "char"
                 else BPETokenizer.train(train_text, vocab_size))
    return tokenizer, tokenizer.encode(train_text), tokenizer.encode(val_text)


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 5, 64])
def test_characters_cut_by_chunk_edges_give_the_same_tokens(tmp_path, chunk_bytes):
    text = MIXED * 3
    meta, tokens = prepare_text(tmp_path, text, chunk_bytes=chunk_bytes)
    tokenizer, train_ids, val_ids = reference(text, "char")
    assert meta["tokenizer"] == tokenizer.to_dict()
    assert tokens == train_ids + val_ids and meta["n_train"] == len(train_ids)
    assert meta["n_chars"] == len(text) and meta["dtype"] == "uint16"


@pytest.mark.parametrize("chunk_bytes, piece_chars, workers",
                         [(7, 40, 2), (1, 13, 1), (3, 3, 1), (1 << 20, 1 << 20, 2)])
def test_bpe_in_pieces_and_workers_gives_the_reference_tokens(tmp_path, chunk_bytes,
                                                              piece_chars, workers):
    text = (MIXED + TINY_TEXT[:500]) * 4
    meta, tokens = prepare_text(tmp_path, text, "bpe", 300, chunk_bytes=chunk_bytes,
                                piece_chars=piece_chars, workers=workers)
    tokenizer, train_ids, val_ids = reference(text, "bpe")
    assert meta["tokenizer"] == tokenizer.to_dict()  # the same merges: the same sample
    assert tokens == train_ids + val_ids and meta["n_train"] == len(train_ids)
    assert tokenizer.decode(tokens) == text  # underscores too


@pytest.mark.parametrize("vocab_size", [256, 257, 300, 700])
def test_fast_bpe_learns_the_reference_merges_ties_included(vocab_size):
    rng = random.Random(vocab_size)
    texts = [TINY_TEXT, MIXED * 5, "ab ab ba ba aa bb " * 10, "aaaa", "", "a_b __c__ _" * 9,
             "".join(rng.choice("ab \n.") for _ in range(3000))]  # ties, ties everywhere
    for text in texts:
        assert fast_bpe.train(text, vocab_size).merges == \
            BPETokenizer.train(text, vocab_size).merges, text[:40]


def test_pieces_cut_at_word_ends_split_into_the_same_bpe_chunks():
    rng = random.Random(0)
    alphabet = list("ab cd\n\t 1 2 _ .,!é中  \n\n\r")
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        n_train = rng.randint(0, len(text))
        tagged = dataset.split_at([text[i:i + 5] for i in range(0, len(text), 5)], n_train)
        # Pieces of at least 1/8 of the text: never a forced cut (a "word" 8 pieces long).
        pieces = list(fast_bpe.word_end_pieces(tagged, len(text) // 8 + rng.randint(1, 5)))
        train_pieces = [p for split, p in pieces if split == "train"]
        val_pieces = [p for split, p in pieces if split == "val"]
        assert "".join(train_pieces) == text[:n_train] and "".join(val_pieces) == text[n_train:]
        for whole, parts in ((text[:n_train], train_pieces), (text[n_train:], val_pieces)):
            assert BPETokenizer.CHUNK.findall(whole) == \
                [chunk for part in parts for chunk in BPETokenizer.CHUNK.findall(part)]


@pytest.mark.skipif(sys.platform != "linux", reason="BPE's workers are forked on Linux only")
def test_too_few_file_descriptors_for_the_bpe_workers_is_one_line_and_no_hang(tmp_path):
    # The second worker finds no descriptor left for its pipes (ulimit -n): the first, started,
    # must not keep the run waiting for it at the exit.
    (tmp_path / "text.txt").write_text(TINY_TEXT[:3000], encoding="utf-8")
    code = f"""if True:
        import errno, os, sys
        sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, "tests")!r}]
        import test_dataset, utils
        real_fork, forks = os.fork, []
        def fork():
            forks.append(1)
            if len(forks) > 1:
                raise OSError(errno.EMFILE, "Too many open files")
            return real_fork()
        os.fork = fork
        utils.run_main(lambda: test_dataset.prepare_path("text.txt", "bpe", 300, workers=2))"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == ("error: too many open files to prepare the token file text.txt.bpe300"
                           ".tokens (Too many open files); raise the limit on open files "
                           "(ulimit -n), e.g. to 1024\n")


def test_tiny_shakespeare_tokens_are_unchanged(tmp_path):
    source = os.path.join(ROOT, "data", "input.txt")
    if not os.path.exists(source):
        pytest.skip("data/input.txt not present")
    shutil.copy(source, tmp_path / "input.txt")
    text = (tmp_path / "input.txt").read_text()
    for kind in ("char", "bpe"):  # BPE as the README's run: 1,024 tokens
        meta, tokens = prepare_path(str(tmp_path / "input.txt"), kind, 1024,
                                    bpe_sample_chars=Config().bpe_sample_chars)
        tokenizer, train_ids, val_ids = reference(text, kind, 1024)
        assert meta["tokenizer"] == tokenizer.to_dict()
        assert tokens == train_ids + val_ids and meta["n_train"] == len(train_ids)
    assert (meta["n_chars"], meta["n_train_chars"]) == (1_115_394, 1_003_854)


def test_a_changed_text_is_prepared_again_a_touched_one_is_not(tmp_path, monkeypatch):
    path = tmp_path / "text.txt"
    path.write_text("first version of the text\n" * 20)
    config = Config(data=str(path), block_size=8)
    assert dataset.load_corpus(config).n_chars == 26 * 20
    path.write_text("the second, longer version of the text\n" * 20)
    corpus = dataset.load_corpus(config)
    assert corpus.n_chars == 39 * 20 and "," in corpus.tokenizer.chars
    os.utime(path, ns=(1, 1))  # as `touch` or a fresh checkout: a new time, the same bytes
    with monkeypatch.context() as patch:
        patch.setattr(dataset, "prepare", lambda *args, **kwargs: pytest.fail("prepared again"))
        assert dataset.load_corpus(config).n_chars == 39 * 20  # hashed: the same bytes
        patch.setattr(dataset, "scan", lambda *args: pytest.fail("hashed again"))
        assert dataset.load_corpus(config).n_chars == 39 * 20  # the new time was saved
    settings = dataset.corpus_settings(config)
    meta = dataset.read_meta(dataset.prepared_stem(str(path), settings))
    assert meta["sources"][0][2] == 1


def test_an_edit_that_keeps_the_size_and_sets_the_time_back_is_seen(tmp_path):
    """cp -p, rsync -t, touch -r: the modification time says nothing changed; the change time,
    which no tool sets back, says otherwise, and the bytes are hashed."""
    path = tmp_path / "text.txt"
    path.write_text("the earlier text\n" * 20)
    config = Config(data=str(path), block_size=8)
    assert "Z" not in dataset.load_corpus(config).tokenizer.chars
    before = os.stat(path)
    time.sleep(0.05)  # change times tick with the kernel's coarse clock (every 1-10 ms)
    path.write_text("the earlier text\n".replace("e", "Z") * 20)  # the same size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # as touch -r would
    assert "Z" in dataset.load_corpus(config).tokenizer.chars


def test_a_text_whose_change_time_is_older_than_its_tokens_is_not_hashed(tmp_path, monkeypatch):
    """A copy made with cp -p or unpacked from a tar: its modification time is older than its
    change time, but the tokens were made after both: nothing to check at each start, even
    where the metadata cannot be written."""
    path = tmp_path / "text.txt"
    text = "a text copied with its old modification time\n" * 20
    path.write_text(text)
    os.utime(path, ns=(1, 1))
    time.sleep(0.05)  # change times tick with the kernel's coarse clock (every 1-10 ms)
    config = Config(data=str(path), block_size=8)
    dataset.load_corpus(config)
    monkeypatch.setattr(dataset, "scan", lambda *args: pytest.fail("hashed"))
    monkeypatch.setattr(dataset, "write_meta", lambda *args: pytest.fail("written"))
    assert dataset.load_corpus(config).n_chars == len(text)


def test_windows_cut_inside_a_character_count_it_once():
    """Bits per character on a val subset: windows of BPE tokens can begin or end inside a
    character (here bytes alone, no merges); each character counts once, where it begins."""
    tokenizer = BPETokenizer([])  # 256 tokens: one per byte
    ids = list("中文".encode())  # 3 bytes each
    assert dataset.chars_covered(tokenizer, ids[:2]) + dataset.chars_covered(tokenizer, ids[2:]) == 2
    assert len(tokenizer.decode(ids[:2])) + len(tokenizer.decode(ids[2:])) == 3  # decoding: 3
    assert dataset.chars_covered(CharTokenizer.from_text("ab"), [0, 1, 1]) == 3


def test_bits_per_character_on_a_val_subset_count_real_characters(tmp_path):
    path = tmp_path / "zh.txt"
    rng = random.Random(0)
    path.write_text("".join(chr(0x4E00 + rng.randrange(3000)) for _ in range(30_000)))
    config = Config(data=str(path), tokenizer="bpe", vocab_size=256, block_size=16)
    corpus = dataset.load_corpus(config)  # 256 tokens: one a byte, 3 bytes a character
    subset = dataset.val_set(corpus, 340, 16, "cpu")
    assert not subset.exact and subset.n_predictions / subset.n_chars == pytest.approx(3, rel=0.02)


def test_a_folder_takes_linked_subfolders_once_and_follows_no_loop(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "corpus" / "a.txt").write_text("in the folder\n")
    (tmp_path / "real" / "sub" / "b.txt").write_text("in a linked folder\n")
    (tmp_path / "outside.txt").write_text("beside the folder: not part of it\n")
    os.symlink("../real/sub", tmp_path / "corpus" / "linked")
    os.symlink("../real/sub", tmp_path / "corpus" / "linked_again")  # the same folder: once
    os.symlink(".", tmp_path / "corpus" / "self")  # loops
    os.symlink("..", tmp_path / "corpus" / "up")
    assert dataset.find_sources(str(tmp_path / "corpus")) == [
        str(tmp_path / "corpus" / "a.txt"), str(tmp_path / "corpus" / "linked" / "b.txt")]
    # A folder inside the --data folder keeps its own name, though a link to it is met first.
    (tmp_path / "corpus" / "a" / "z").parent.mkdir()
    (tmp_path / "corpus" / "a-b").mkdir()
    (tmp_path / "corpus" / "a-b" / "c.txt").write_text("in a folder of its own\n")
    os.symlink("../a-b", tmp_path / "corpus" / "a" / "z")
    assert str(tmp_path / "corpus" / "a-b" / "c.txt") in dataset.find_sources(str(tmp_path / "corpus"))


def test_a_folder_is_its_txt_files_in_sorted_order_each_ending_a_line(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("second file, no newline at its end")
    (folder / "a.txt").write_text("first file\n")
    (folder / "sub" / "c.txt").write_text("third, in a subfolder\n" * 2 + "third")
    (folder / "empty.txt").write_text("")
    (folder / "notes.md").write_text("not a .txt file: left out\n")
    meta, tokens = prepare_path(str(folder))
    tokenizer = tokenizer_from_dict(meta["tokenizer"])
    assert tokenizer.decode(tokens) == ("first file\nsecond file, no newline at its end\n"
                                        + "third, in a subfolder\n" * 2 + "third")
    assert [name for name, _, _ in meta["sources"]] == [
        "corpus/a.txt", "corpus/b.txt", "corpus/empty.txt", "corpus/sub/c.txt"]
    assert os.path.exists(tmp_path / "corpus.char.tokens")  # beside the folder, not in it


def test_folder_and_file_mistakes_are_named(tmp_path):
    (tmp_path / "notes.md").write_text("no text files here")
    with pytest.raises(UsageError, match="no .txt files in the folder"):
        dataset.find_sources(str(tmp_path))
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(UsageError, match="are empty"):
        dataset.find_sources(str(tmp_path))
    (tmp_path / "b.txt").write_bytes("ok\ncaf\u00e9".encode("utf-8")[:-1])  # cut mid-character
    with pytest.raises(UsageError, match=r"b.txt is not UTF-8 text \(bad byte at offset 6\)"):
        prepare_path(str(tmp_path), chunk_bytes=4)


def test_token_ids_are_uint16_when_they_fit_else_uint32(tmp_path):
    assert dataset.token_dtype(65) == dataset.token_dtype(65536) == "uint16"
    assert dataset.token_dtype(65537) == "uint32"
    text = "".join(map(chr, range(0x10000, 0x10000 + 70_000))) + "\n"  # 70,001 characters
    meta, tokens = prepare_text(tmp_path, text, chunk_bytes=1000)
    assert meta["dtype"] == "uint32" and max(tokens) == 70_000
    assert os.path.getsize(tmp_path / "text.txt.char.tokens") == 4 * len(text)
    assert tokenizer_from_dict(meta["tokenizer"]).decode(tokens) == text
    meta, _ = prepare_text(tmp_path, TINY_TEXT)
    assert meta["dtype"] == "uint16"
    assert os.path.getsize(tmp_path / "text.txt.char.tokens") == 2 * len(TINY_TEXT)


def test_a_read_only_data_folder_prepares_into_the_cache_folder(tmp_path, monkeypatch):
    data = tmp_path / "shared" / "text.txt"
    data.parent.mkdir()
    data.write_text(TINY_TEXT)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: mode != os.W_OK and
                        real_access(path, mode))  # root may write anywhere, so pretend
    corpus = dataset.load_corpus(Config(data=str(data)))
    assert os.listdir(data.parent) == ["text.txt"]
    [token_file] = [n for n in os.listdir(tmp_path / "cache" / "mini-gpt") if n.endswith("tokens")]
    assert token_file.endswith("-text.txt.char.tokens") and corpus.n_chars == len(TINY_TEXT)


def test_batches_are_windows_of_the_train_split_with_targets_shifted_by_one(tmp_path):
    _, tokens = prepare_text(tmp_path, TINY_TEXT)
    corpus = dataset.load_corpus(Config(data=str(tmp_path / "text.txt")))
    train_text = corpus.tokenizer.decode(tokens[:corpus.n_train])
    x, y = dataset.get_batch(corpus, 8, 16, "cpu")
    assert x.dtype == torch.long and x.shape == y.shape == (8, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])  # each target is the next input
    for inputs, targets in zip(x.tolist(), y.tolist()):
        window = corpus.tokenizer.decode(inputs + targets[-1:])
        assert window in train_text  # T + 1 tokens in a row of the train split
    torch.manual_seed(3)
    first = dataset.get_batch(corpus, 8, 16, "cpu")
    torch.manual_seed(3)  # the same seed, the same batch: runs are reproducible
    assert all(torch.equal(a, b) for a, b in zip(first, dataset.get_batch(corpus, 8, 16, "cpu")))


def test_val_set_is_exact_when_small_else_a_fixed_even_subset(tmp_path):
    _, tokens = prepare_text(tmp_path, TINY_TEXT * 10)  # 3,720 val tokens
    corpus = dataset.load_corpus(Config(data=str(tmp_path / "text.txt")))
    val_tokens = tokens[corpus.n_train:]
    exact = dataset.val_set(corpus, len(val_tokens), 16, "cpu")
    assert exact.exact and exact.note == "exact" and exact.tokens.tolist() == val_tokens
    assert exact.n_predictions == exact.n_chars == len(val_tokens) - 1
    subset = dataset.val_set(corpus, 100, 16, "cpu")
    assert not subset.exact and subset.tokens.shape == (5, 17)  # 100 // 17 windows
    assert subset.n_predictions == 80 <= 100 and subset.note == "on 80 of 3,720 tokens"
    assert subset.tokens[0].tolist() == val_tokens[:17]  # spread from the start...
    assert subset.tokens[-1].tolist() == val_tokens[-17:]  # ...to the end
    again = dataset.val_set(corpus, 100, 16, "cpu")
    assert torch.equal(subset.tokens, again.tokens)  # the same at every evaluation


def test_eval_tokens_0_scores_the_same_amount_of_text_with_either_tokenizer(tmp_path,
                                                                          monkeypatch):
    monkeypatch.setattr(dataset, "EVAL_CHARS", 2_000)  # 2,000 characters of val text
    text = TINY_TEXT * 60  # 22,320 val characters: more than 2,000
    for tokenizer in ("char", "bpe"):
        folder = tmp_path / tokenizer
        folder.mkdir()
        prepare_text(folder, text, tokenizer)
        corpus = dataset.load_corpus(Config(data=str(folder / "text.txt"), tokenizer=tokenizer,
                                            vocab_size=300))
        val = dataset.val_set(corpus, 0, 16, "cpu")
        assert not val.exact
        # Windows covering about 2,000 characters (less a window's rounding and the first
        # token of each window), not 2,000 tokens: a BPE token is several characters.
        assert 2_000 * 0.85 < val.n_chars < 2_000 * 1.05, (tokenizer, val.n_chars)
        if tokenizer == "bpe":
            assert val.n_predictions < 2_000 * 0.6  # fewer tokens for the same text
        else:  # a block longer than that bound: the bound grows to one block
            assert dataset.val_set(corpus, 0, 22_400, "cpu").exact  # 22,320 tokens <= 22,401
        # All of a val split smaller than that is scored exactly (Tiny Shakespeare's case).
        monkeypatch.setattr(dataset, "EVAL_CHARS", len(text) // 10 + 1)
        assert dataset.val_set(corpus, 0, 16, "cpu").exact
        monkeypatch.setattr(dataset, "EVAL_CHARS", 2_000)


def test_windows_loss_counts_every_prediction_once():
    model = tiny_model()
    windows = torch.randint(0, 20, (5, 17))
    total = sum(model(w[None, :-1], w[None, 1:])[1].item() * 16 for w in windows)
    assert train.windows_loss(model, windows, 2) == pytest.approx(total / 80, rel=1e-5)


def test_training_on_a_folder_says_how_the_val_loss_was_taken(tmp_path):
    folder = tmp_path / "plays"
    folder.mkdir()
    for i in range(3):
        (folder / f"part{i}.txt").write_text(TINY_TEXT)
    result = run_script("train.py", "--data", folder, "--checkpoint", tmp_path / "c.pt",
                        *TINY_FLAGS, "--max_iters", "2", "--eval_interval", "2",
                        "--sample_tokens", "0", "--eval_tokens", "100")
    assert result.returncode == 0, result.stderr
    assert f"Dataset length: {3 * len(TINY_TEXT)} characters" in result.stdout
    assert result.stdout.count(" (on 96 of 1,116 tokens), val bpc ") == 2  # steps 0 and 2


@pytest.mark.parametrize("block_size, fewest", [(1, 11), (16, 19), (32, 37)])
def test_too_short_a_text_names_the_fewest_characters_that_really_train(tmp_path, block_size,
                                                                       fewest):
    flags = [*TINY_FLAGS, "--block_size", block_size, "--max_iters", 1, "--sample_tokens", 0]
    for n_chars in (fewest - 1, fewest):
        path = tmp_path / f"{n_chars}.txt"
        path.write_text(("abcdefghij" * 10)[:n_chars])
        code, _, err = run_in_process(train.main, ["--data", path, "--checkpoint", f"{path}.pt",
                                                   *flags])
        if n_chars < fewest:
            assert code == 2 and err == (
                f"error: {path} has {n_chars} characters, too few for block_size {block_size}: "
                f"need at least {fewest}; use a longer text or a smaller --block_size\n")
        else:
            assert code == 0, err


def test_too_short_a_text_for_bpe_counts_its_tokens_not_its_characters(tmp_path):
    path = tmp_path / "aaa.txt"
    path.write_text("a" * 400)  # 400 characters, but BPE merges the a's into a few tokens
    with pytest.raises(UsageError, match=r"aaa.txt has \d+ train and \d+ val tokens \(BPE\), too "
                                         r"few for block_size 32: need at least 33 train tokens"):
        train.load_tokens(parse_config(["--data", str(path), "--tokenizer", "bpe",
                                        "--vocab_size", "300", "--block_size", "32"])[0],
                          Run("cpu", "float32"))


@pytest.mark.parametrize("flags, message", [
    (["--eval_tokens", "32", "--block_size", "32"],
     r"--eval_tokens must be 0 \(auto\) or more than block_size"),
    (["--bpe_sample_chars", "-1"], "--bpe_sample_chars must be 0"),
])
def test_bad_data_flags_are_named(flags, message):
    with pytest.raises(UsageError, match=message):
        parse_config(flags)


def test_bench_prepare_reports_preparing_and_a_second_run(tmp_path, tiny_data):
    result = run_script("bench.py", "prepare", "--data", tiny_data, "--device", "cpu",
                        "--steps", "1", timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-3].startswith("prepare: ") and "peak RSS" in lines[-3]
    assert f"{len(TINY_TEXT):,} tokens (char, 36 in the vocabulary, uint16)" in lines[-3]
    assert lines[-2].startswith("second run: corpus mapped ")
    assert lines[-1].startswith("training: peak RSS ") and lines[-1].endswith("(val loss exact)")


# --- a data file that cannot be read: each gives a UsageError naming the problem ---------------

def load(path):
    return dataset.load_corpus(Config(data=str(path)))


def test_missing_empty_or_non_utf8_data_file(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UsageError, match="empty"):
        load(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(UsageError, match="not UTF-8"):
        load(tmp_path / "latin1.txt")


def test_unreadable_data_file(tmp_path, monkeypatch):
    path = tmp_path / "locked.txt"
    path.write_text("secret")

    def no_permission(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("builtins.open", no_permission)  # root can read any file, so pretend
    with pytest.raises(UsageError, match="permission denied"):
        list(dataset.read_blocks(str(path), 1024, newline=False))


def test_an_input_output_error_while_reading_the_data_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "on_a_failing_disk.txt"
    path.write_text("To be, or not to be " * 100)
    real_open = open

    class FailingDisk:  # opens, then fails on the second read, as a failing disk does
        def __init__(self, *args, **kwargs):
            self.file, self.reads = real_open(*args, **kwargs), 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def read(self, n):
            self.reads += 1
            if self.reads == 2:
                raise OSError(5, "Input/output error")
            return self.file.read(n)

    monkeypatch.setattr("builtins.open", FailingDisk)
    with pytest.raises(UsageError, match=r"cannot read data file .*: Input/output error; check"):
        list(dataset.read_blocks(str(path), 512, newline=False))


def test_a_symlink_loop_or_a_name_too_long_is_named(tmp_path):
    loop = tmp_path / "loop.txt"
    loop.symlink_to(loop)
    with pytest.raises(UsageError, match="data .*cannot be read .*symbolic links"):
        load(loop)
    with pytest.raises(UsageError, match="data .*cannot be read .*too long"):
        load(tmp_path / ("x" * 300))


def test_offline_download_says_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UsageError, match=r"offline\?.*data/input.txt"):
        load("data/input.txt")


class FakeResponse(io.BytesIO):
    """What urlopen returns, holding payload."""


def test_download_checks_sha256_then_saves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: FakeResponse(b"not shakespeare"))
    with pytest.raises(UsageError, match="sha256"):
        load("data/input.txt")
    assert not os.path.exists("data/input.txt")

    payload = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: FakeResponse(payload))
    monkeypatch.setattr(dataset, "DATA_SHA256", hashlib.sha256(payload).hexdigest())
    assert load("data/input.txt").n_chars == len(payload)
    assert open("data/input.txt", "rb").read() == payload


def test_a_download_that_cannot_be_saved_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    open("data", "w").close()  # a file where the data folder would go
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: FakeResponse(b"First"))
    monkeypatch.setattr(dataset, "DATA_SHA256", hashlib.sha256(b"First").hexdigest())
    with pytest.raises(UsageError, match=r"cannot save Tiny Shakespeare as data/input.txt \(part of "
                                         r"the path is a file, not a folder\); make data a folder "
                                         r"you can write, or pass"):
        load("data/input.txt")
    assert os.listdir(tmp_path) == ["data"] and os.path.getsize("data") == 0
