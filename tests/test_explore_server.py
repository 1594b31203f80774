"""`python explore.py --serve`: the live page's JSON answers are explore.py's numbers (also when
only the new positions run, through the KV cache), every bad request gets a 4xx JSON error and
the server goes on, startup problems are one line, and the page really draws in Chromium."""

import base64
import io
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

import explore
import explore_server
from checkpoint import save_checkpoint
from chromium import Browser, find_chromium
from conftest import ROOT, TINY_TEXT, run_in_process
from generate import load_model
from model import GPTConfig, GPTModel
from tokenizer import CharTokenizer
from utils import UsageError


def tiny_checkpoint(path, seed=0):
    """A small character model as train.py saves it (untrained: what is tested holds for any
    weights), with the facts the page shows."""
    tokenizer = CharTokenizer.from_text(TINY_TEXT)
    model_args = dict(vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=2, n_head=4,
                      block_size=16, dropout=0.0, flash=True)
    torch.manual_seed(seed)
    model = GPTModel(GPTConfig(**model_args))
    save_checkpoint(dict(model=model.state_dict(), model_args=model_args, step=200,
                         val_loss=2.5, val_bpc=3.6, tokenizer=tokenizer.to_dict()), str(path))
    return str(path)


def serve_args(checkpoint, **overrides):
    return types.SimpleNamespace(**{**dict(checkpoint=checkpoint, compare=None, port=0,
                                           host="127.0.0.1", weights="best"), **overrides})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("serve") / "small.pt")


def running(args):
    """Start the server in a thread of this process; returns (base URL, server)."""
    server = explore_server.start_server(args, "cpu")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


@pytest.fixture(scope="module")
def url(checkpoint):
    base, server = running(serve_args(checkpoint))
    yield base
    server.shutdown()
    server.server_close()


JSON = {"Content-Type": "application/json"}  # as the page's POSTs say


def request(url, path, body=None, raw=None, method=None, headers=JSON):
    """(HTTP status, answer as bytes) of a GET (no body) or a POST."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def look(url, prompt, known=()):
    status, answer = request(url, "/api/look", dict(prompt=prompt, known=list(known)))
    assert status == 200, answer
    return json.loads(answer)


def attention_rows(answer, n_layer=2, n_head=4):
    """The answer's attention rows as an array (T - start, n_layer, n_head, T)."""
    T = len(answer["ids"])
    flat = np.frombuffer(base64.b64decode(answer["attention"]), dtype="<f4")
    return flat.reshape(T - answer["start"], n_layer, n_head, T)


def reference(checkpoint, ids):
    """explore.py's numbers for the whole prompt at once: (probabilities (T, V), next-token
    rows, attention (T, n_layer, n_head, T))."""
    model, _, _ = load_model(checkpoint, "cpu", flash=False)
    probs, attention = explore.look_inside(model, ids)
    return probs, explore.next_token_rows(probs, ids, 5), attention.permute(2, 0, 1, 3).numpy()


# --- the JSON answers --------------------------------------------------------------------------

def test_model_answer_has_the_facts_and_the_embedding_map(url, checkpoint):
    status, answer = request(url, "/api/model")
    model = json.loads(answer)
    assert status == 200
    assert model["facts"] == dict(checkpoint=checkpoint, parameters=28132, step=200, val_loss=2.5,
                                  val_bpc=3.6, tokenizer="char", vocab_size=36, n_layer=2,
                                  n_head=4, n_embd=32, block_size=16)
    assert len(model["tokens"]) == len(model["kinds"]) == len(model["embedding"]) == 36
    assert "␣" in model["tokens"] and "↵" in model["tokens"] and model["kinds"][0] == "space, newline"
    weight = torch.load(checkpoint, weights_only=True)["model"]["tok_emb.weight"]
    coords, _ = explore.embedding_pca(weight)
    assert np.allclose(model["embedding"], coords.numpy(), atol=1e-5)


def test_look_gives_explore_pys_table_and_causal_attention_rows(url, checkpoint):
    answer = look(url, "ROMEO:\nBut")
    ids = answer["ids"]
    probs, rows, attention = reference(checkpoint, ids)
    assert probs.sum(dim=-1).allclose(torch.ones(len(ids)))
    assert answer["start"] == 0 and answer["cut"] == 0
    assert [(r[0], r[1]) for r in answer["rows"]] == [(r[0], r[1]) for r in rows]
    for got, want in zip(answer["rows"], rows):
        assert got[2] == pytest.approx(want[2], abs=1e-5)  # p(next), None at the end
        assert [i for i, _ in got[3]] == [i for i, _ in want[3]]
        assert np.allclose([p for _, p in got[3]], [p for _, p in want[3]], atol=1e-5)
    weights = attention_rows(answer)
    assert weights.shape == (10, 2, 4, 10)
    assert np.allclose(weights.sum(axis=-1), 1, atol=1e-5)  # each row sums to 1
    for t in range(10):  # 0 above the diagonal: position t sees nothing after it
        assert np.all(weights[t, :, :, t + 1:] == 0)
    assert np.allclose(weights, attention, atol=1e-5)


def test_typing_runs_only_the_new_positions_and_gives_the_same_numbers(url, checkpoint):
    first = look(url, "ROMEO:\nBut so")
    typed = look(url, "ROMEO:\nBut sof", known=first["ids"])  # one more character
    assert typed["start"] == len(first["ids"])  # only the new position ran
    _, rows, attention = reference(checkpoint, typed["ids"])
    assert attention_rows(typed).shape == (1, 2, 4, 14)
    assert np.allclose(attention_rows(typed), attention[-1:], atol=1e-5)
    assert typed["rows"][-2][1] == typed["ids"][-1]  # the row before now knows what came next
    assert typed["rows"][-2][2] == pytest.approx(rows[-2][2], abs=1e-5)
    # A correction in the middle: from there on everything runs again, and still agrees.
    edited = look(url, "ROMEO:\nbut sof", known=typed["ids"])
    assert edited["start"] == 7
    assert np.allclose(attention_rows(edited), reference(checkpoint, edited["ids"])[2][7:],
                       atol=1e-5)
    # Deleting at the end: nothing new to run. A page that holds nothing gets every row.
    assert look(url, "ROMEO:\nbut", known=edited["ids"])["start"] == 10
    assert look(url, "ROMEO:\nbut", known=[])["start"] == 0


def test_an_over_long_prompt_keeps_the_last_block_size_tokens(url):
    answer = look(url, "ROMEO:\nBut soft, what light")  # 27 characters, block_size 16
    assert answer["cut"] == 11 and len(answer["ids"]) == 16 and len(answer["rows"]) == 16
    assert attention_rows(answer).shape == (16, 2, 4, 16)


def sample(url, **body):
    status, answer = request(url, "/api/continue", dict(prompt="ROMEO:", **body))
    assert status == 200, answer
    return "".join(json.loads(line)["text"] for line in answer.decode().splitlines())


def test_continue_streams_generate_pys_sample_for_the_seed(url, checkpoint):
    text = sample(url, temperature=1.0, top_k=10, seed=7, length=40)
    assert len(text) == 40 and text == sample(url, temperature=1.0, top_k=10, seed=7, length=40)
    assert text != sample(url, temperature=1.0, top_k=10, seed=8, length=40)
    model, tokenizer, _ = load_model(checkpoint, "cpu")
    generator = torch.Generator().manual_seed(7)
    tokens = model.generate(torch.tensor([tokenizer.encode("ROMEO:")]), 40, temperature=1.0,
                            top_k=10, generator=generator)
    assert text == tokenizer.decode(tokens[0, 6:].tolist())
    assert len(sample(url, temperature=0, length=3, top_p=0.5)) == 3


def one_piece_then_a_bug(*args, **kwargs):
    """A stand-in for stream_text that fails after its first piece, as a bug would."""
    yield "F"
    raise ValueError("a bug while sampling")


def test_an_error_inside_a_started_stream_ends_it_with_an_error_line(url, monkeypatch):
    monkeypatch.setattr(explore_server, "stream_text", one_piece_then_a_bug)
    status, answer = request(url, "/api/continue", dict(prompt="RO", length=5))
    assert status == 200 and b"HTTP/" not in answer  # never a second answer inside the stream
    assert [json.loads(line) for line in answer.decode().splitlines()] == [
        {"text": "F"}, {"error": "internal error: ValueError: a bug while sampling"}]


def test_compare_shows_the_second_models_table_for_the_same_prompt(checkpoint, tmp_path):
    other = tiny_checkpoint(tmp_path / "other.pt", seed=1)
    base, server = running(serve_args(checkpoint, compare=other))
    try:
        answer = look(base, "ROMEO")
        assert answer["compare"] == look(base, "ROMEO")["compare"]
        want = reference(other, answer["ids"])[1]
        assert [[i for i, _ in r[3]] for r in answer["compare"]] == [[i for i, _ in r[3]] for r in want]
        assert np.allclose([p for r in answer["compare"] for _, p in r[3]],
                           [p for r in want for _, p in r[3]], atol=1e-5)
        assert answer["rows"] != answer["compare"]
        assert json.loads(request(base, "/api/model")[1])["compare"]["checkpoint"] == other
    finally:
        server.shutdown()
        server.server_close()


# --- hostile requests ---------------------------------------------------------------------------

BAD_REQUESTS = [  # (path, JSON body or raw bytes, expected status, words in the error)
    ("/api/look", dict(prompt="ROMEO\u00e9"), 400, "not in the model's vocabulary"),
    ("/api/look", dict(prompt="x" * 30_000), 400, "at most 20000"),
    ("/api/look", dict(prompt=17), 400, "prompt must be a string"),
    ("/api/look", dict(prompt="ROMEO", known="all"), 400, "known must be a list"),
    ("/api/continue", dict(temperature="hot"), 400, "temperature must be a number"),
    ("/api/continue", dict(temperature=-1), 400, "temperature must be 0"),
    ("/api/continue", dict(temperature=1e400), 400, "temperature must be a number"),
    ("/api/continue", dict(top_k=0), 400, "top_k must be at least 1"),
    ("/api/continue", dict(top_k=2.5), 400, "top_k must be a whole number"),
    ("/api/continue", dict(top_p=1.5), 400, "top_p must be from 1e-6 to 1"),
    ("/api/continue", dict(top_p=True), 400, "top_p must be a number"),
    ("/api/continue", dict(seed=-1), 400, "seed must be from 0"),
    ("/api/continue", dict(seed=10**30), 400, "seed must be a whole number"),
    ("/api/continue", b'{"seed": 1' + b"0" * 400 + b"}", 400, "seed must be a whole number"),
    ("/api/continue", dict(length=0), 400, "length must be from 1 to 2000"),
    ("/api/continue", dict(length=10**6), 400, "length must be from 1 to 2000"),
    ("/api/continue", dict(length="ten"), 400, "length must be a whole number"),
    ("/api/continue", dict(prompt="ROMEO\u00e9"), 400, "not in the model's vocabulary"),
    ("/api/look", b"{not json", 400, "not JSON"),
    ("/api/look", b"\xff\xfe", 400, "not JSON"),
    ("/api/look", b"[1, 2]", 400, "must be a JSON object"),
    ("/api/look", b"[" * 50_000, 400, "not JSON"),  # nested too deep for Python's parser
    ("/api/continue", dict(temperature=1e300), 400, "temperature must be a number of at most"),
    ("/api/look", b"x" * (explore_server.MAX_BODY + 1), 413, "at most 65536"),
    ("/api/nothing", dict(prompt="a"), 404, "no such request"),
    ("/../model.py", None, 404, "no such page"),
    ("/%2e%2e/model.py", None, 404, "no such page"),
    ("/web/explore.js", None, 404, "no such page"),
    ("/explore_server.py", None, 404, "no such page"),
]


@pytest.mark.parametrize("path, body, status, words", BAD_REQUESTS)
def test_a_bad_request_gets_a_json_error_and_the_server_goes_on(url, path, body, status, words):
    raw = body if isinstance(body, bytes) else None
    got, answer = request(url, path, body=None if raw else body, raw=raw)
    assert got == status
    assert words in json.loads(answer)["error"]
    assert look(url, "ROMEO")["ids"]  # still answering


def test_garbled_http_gets_a_4xx_and_the_server_goes_on(url):
    host, port = url[len("http://"):].split(":")
    for garbage in (b"NONSENSE\r\n\r\n", b"PUT / HTTP/1.1\r\n\r\n",
                    b"POST /api/look HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
                    b"POST /api/look HTTP/1.1\r\nContent-Length: many\r\n\r\n"):
        with socket.create_connection((host, int(port)), timeout=30) as connection:
            connection.sendall(garbage)
            reply = b"".join(iter(lambda: connection.recv(4096), b""))  # to the server's close
        assert reply.startswith(b"HTTP/1.0 4"), reply
        assert b'{"error": ' in reply
    status, _ = request(url, "/")
    assert status == 200


FOREIGN = [  # what a page of another web site open in the browser can send to 127.0.0.1
    ("/api/model", None, {"Host": "evil.example:{port}"}, 403, "is not this server's address"),
    ("/", None, {"Host": "evil.example"}, 403, "is not this server's address"),  # DNS rebinding
    ("/api/continue", dict(prompt="RO"), {**JSON, "Origin": "http://evil.example"}, 403,
     "from another web site (http://evil.example) is refused"),
    ("/api/continue", dict(prompt="RO"), {**JSON, "Origin": "file://127.0.0.1:{port}"}, 403,
     "from another web site (file://"),  # this host, but not a page it served
    ("/api/continue", dict(prompt="RO"), {"Content-Type": "text/plain"}, 415,  # no preflight
     "Content-Type must be application/json"),
    ("/api/look", dict(prompt="RO"), {}, 415, "Content-Type must be application/json"),
]


@pytest.mark.parametrize("path, body, headers, status, words", FOREIGN)
def test_another_web_sites_requests_are_refused_and_the_pages_own_answered(
        url, path, body, headers, status, words):
    port = url.rsplit(":", 1)[1]
    headers = {name: value.format(port=port) for name, value in headers.items()}
    got, answer = request(url, path, body, headers=headers)
    assert (got, json.loads(answer)["error"].count(words)) == (status, 1)
    # The page's own requests, as a browser sends them (Origin on a POST), by every local name.
    # Any port: a browser that reaches the page through a forwarded port names its own port.
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}",
                 "127.0.0.1:9931", "localhost:1"):
        assert request(url, "/api/model", headers={"Host": host})[0] == 200
        scheme = "https" if host == "localhost" else "http"  # behind a proxy that adds TLS
        own = {**JSON, "Host": host, "Origin": f"{scheme}://{host}"}
        got, answer = request(url, "/api/continue", dict(prompt="RO", length=3), headers=own)
        pieces = [json.loads(line)["text"] for line in answer.splitlines()]
        assert got == 200 and len("".join(pieces)) == 3


def test_host_0_0_0_0_answers_any_host_name_of_this_machine(checkpoint):
    base, server = running(serve_args(checkpoint, host="0.0.0.0"))
    try:
        headers = {**JSON, "Host": "my-desktop.lan:8000", "Origin": "http://my-desktop.lan:8000"}
        assert request(base, "/api/look", dict(prompt="RO"), headers=headers)[0] == 200
    finally:
        server.shutdown()
        server.server_close()


def test_a_silent_connection_is_closed_and_a_slow_reader_still_gets_its_whole_stream(
        checkpoint, monkeypatch, capsys):
    assert 0 < explore_server.Handler.timeout <= 60  # the server closes silent connections
    monkeypatch.setattr(explore_server.Handler, "timeout", 0.5)  # the same, in a quick test
    base, server = running(serve_args(checkpoint))
    port = server.server_address[1]
    try:
        for half_sent in (b"GET / HTTP/1.1\r\nHost: x\r\n",  # no blank line: headers unfinished
                          b"POST /api/look HTTP/1.1\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"pro"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
                connection.sendall(half_sent)
                assert connection.recv(4096) == b""  # closed by the server, well before 10 s
        want = sample(base, seed=5, length=30)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            body = json.dumps(dict(prompt="ROMEO:", seed=5, length=30)).encode()
            connection.sendall(b"POST /api/continue HTTP/1.0\r\nContent-Type: application/json"
                               b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            started, reply = time.monotonic(), b""
            while chunk := connection.recv(16):  # a page reading slowly, for longer than 0.5 s
                reply += chunk
                time.sleep(0.05)
        assert time.monotonic() - started > 1
        lines = reply.split(b"\r\n\r\n", 1)[1].decode().splitlines()
        assert "".join(json.loads(line)["text"] for line in lines) == want
        assert look(base, "ROMEO")["ids"]  # still answering
    finally:
        server.shutdown()
        server.server_close()
    assert capsys.readouterr().err == ""  # a client falling silent is no error of the server


def test_an_internal_error_is_one_whole_line_on_stderr(url, monkeypatch):
    writes = []  # each write to stderr: threads writing at once must not join two lines
    monkeypatch.setattr(sys, "stderr", types.SimpleNamespace(write=writes.append))
    monkeypatch.setattr(explore_server, "model_answer", lambda *args: 1 / 0)
    status, answer = request(url, "/api/model")
    assert status == 500 and b"ZeroDivisionError" in answer
    assert writes == ["error: /api/model: ZeroDivisionError: division by zero\n"]


def test_two_tabs_at_once(url):
    results = {}

    def tab(name, prompt):
        known = []
        for end in range(1, len(prompt) + 1):  # typing, one character at a time
            answer = look(url, prompt[:end], known)
            known = answer["ids"]
        results[name] = (answer, sample(url, seed=3, length=20))

    threads = [threading.Thread(target=tab, args=(name, prompt))
               for name, prompt in (("a", "ROMEO:\nBut"), ("b", "JULIET:\nO"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, prompt in (("a", "ROMEO:\nBut"), ("b", "JULIET:\nO")):
        answer, text = results[name]
        full = look(url, prompt)
        assert [row[:2] for row in answer["rows"]] == [row[:2] for row in full["rows"]]
        assert np.allclose([p for row in answer["rows"] for _, p in row[3]],
                           [p for row in full["rows"] for _, p in row[3]], atol=1e-5)
        assert len(text) == 20 and text == sample(url, seed=3, length=20)


def test_the_page_files_are_served(url):
    for path, kind in (("/", b"<!DOCTYPE html>"), ("/explore.js", b"// The page"),
                       ("/explore.css", b"/* The look")):
        status, answer = request(url, path)
        assert status == 200 and answer.startswith(kind)
    # Everything the page loads comes from the server itself: no CDN, no web font.
    page = b"".join(request(url, path)[1] for path in ("/", "/explore.js", "/explore.css"))
    assert b"http://" not in page.replace(b"http://127.0.0.1", b"") and b"https://" not in page


def test_the_page_has_a_colour_for_every_group_of_embeddings_png():
    with open(os.path.join(ROOT, "web", "explore.js"), encoding="utf-8") as file:
        script = file.read()
    colours = script.split("const KIND_COLOURS = {")[1].split("};")[0]
    assert re.findall(r'"([^"]+)": "#', colours) == list(explore.KIND_COLOURS)  # same order too


# --- starting and stopping ------------------------------------------------------------------------

def serve(argv):
    from explore import main
    return run_in_process(main, ["--serve", *argv])


def test_startup_problems_are_one_line_and_exit_2(checkpoint, tmp_path):
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(open(checkpoint, "rb").read()[:3000])
    other_text = tmp_path / "other_text.pt"
    model_args = dict(vocab_size=3, n_embd=32, n_layer=2, n_head=4, block_size=16)
    save_checkpoint(dict(model=GPTModel(GPTConfig(**model_args)).state_dict(), model_args=model_args,
                         tokenizer=CharTokenizer("abc").to_dict()), str(other_text))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for argv, words in [(["--checkpoint", tmp_path / "none.pt"], "checkpoint not found"),
                            (["--checkpoint", damaged], "damaged checkpoint"),
                            (["--checkpoint", checkpoint, "--port", port], "cannot listen on"),
                            (["--checkpoint", checkpoint, "--port", "70000"], "--port must be"),
                            (["--checkpoint", checkpoint, "--port", "http"], "invalid int"),
                            (["--checkpoint", checkpoint, "--host", "no.such.host.invalid"],
                             "no such IPv4 address"),
                            (["--checkpoint", checkpoint, "--host", "::1"], "no such IPv4"),
                            (["--checkpoint", checkpoint, "--host", "192.0.2.1"],
                             "not an address of this machine"),
                            (["--checkpoint", checkpoint, "--compare", other_text],
                             "another tokenizer")]:
            code, out, err = serve(argv)
            assert code == 2 and words in err and err.strip().count("\n") == 0, (argv, err)
    code, _, err = run_in_process(explore.main, ["--checkpoint", checkpoint, "--port", "8000"])
    assert code == 2 and "belong to --serve" in err


@pytest.mark.parametrize("argv, words", [
    (["--host", ""], "--host must not be empty"),  # else: every interface
    (["--prompt", "ROMEO:"], "--prompt does not apply to --serve"),
    (["--out", "look"], "--out does not apply to --serve"),
    (["--top_k", "3"], "--top_k does not apply to --serve"),
])
def test_a_flag_the_page_would_ignore_is_refused_before_it_starts(checkpoint, argv, words):
    with pytest.raises(UsageError, match=words):  # parse_args: a server would run until Ctrl-C
        explore.parse_args(["--serve", "--checkpoint", checkpoint, *argv])


def test_without_port_the_first_free_one_from_8000_is_taken(checkpoint):
    servers = [explore_server.start_server(serve_args(checkpoint, port=None), "cpu")
               for _ in range(2)]
    ports = [server.server_address[1] for server in servers]
    for server in servers:
        server.server_close()
    assert 8000 <= ports[0] < ports[1] < 8100  # the second found the first's port taken


@pytest.mark.parametrize("host", ["127.1", "127.0.0.2", "LOCALHOST"])
def test_a_host_of_this_machine_only_gets_no_warning(checkpoint, host, monkeypatch, capsys):
    start_server = explore_server.start_server

    def started_but_not_serving(args, device):
        server = start_server(args, device)
        server.serve_forever = lambda: None  # serve() prints its lines and returns
        return server

    monkeypatch.setattr(explore_server, "start_server", started_but_not_serving)
    explore_server.serve(serve_args(checkpoint, host=host), "cpu")
    assert capsys.readouterr().out.startswith(f"Looking inside {checkpoint}\nOpen http://127.0.0.")


def test_serve_in_a_real_process_prints_the_url_and_stops_quietly_on_ctrl_c(checkpoint):
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "explore.py"), "--serve",
                                "--checkpoint", checkpoint, "--port", "0", "--host", "0.0.0.0"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [process.stdout.readline() for _ in range(3)]
        assert lines[0].startswith("warning: --host 0.0.0.0 lets other machines reach this page")
        url = lines[2].split()[1]
        assert url.startswith("http://127.0.0.1:") and lines[2].startswith("Open http")
        status, answer = request(url.rstrip("/"), "/api/model")
        assert status == 200 and json.loads(answer)["facts"]["n_layer"] == 2
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0 and "Traceback" not in err and "Stopped." in out


def test_ctrl_c_while_a_continuation_streams_stops_cleanly_every_time(tmp_path):
    """The stream runs the model in a thread of its own: Python shutting down under it made
    torch's C++ abort ("terminate called without an active exception", exit code 134)."""
    tokenizer = CharTokenizer.from_text(TINY_TEXT)
    model_args = dict(vocab_size=tokenizer.vocab_size, n_embd=256, n_layer=4, n_head=4,
                      block_size=64, dropout=0.0, flash=True)  # a token takes a while
    save_checkpoint(dict(model=GPTModel(GPTConfig(**model_args)).state_dict(),
                         model_args=model_args, tokenizer=tokenizer.to_dict()),
                    str(tmp_path / "big.pt"))
    for _ in range(3):
        process = subprocess.Popen([sys.executable, os.path.join(ROOT, "explore.py"), "--serve",
                                    "--checkpoint", tmp_path / "big.pt", "--port", "0"],
                                   cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        try:
            url = [process.stdout.readline() for _ in range(2)][1].split()[1].rstrip("/")
            data = json.dumps(dict(prompt="ROMEO:", length=2000)).encode()
            answer = urllib.request.urlopen(urllib.request.Request(
                url + "/api/continue", data=data, headers=JSON), timeout=60)
            answer.readline()  # the stream has begun; read on, so that it goes on
            threading.Thread(target=answer.read, daemon=True).start()
        finally:
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=60)
        assert (process.returncode, err) == (0, "") and out.endswith("Stopped.\n")


# --- the page in a real browser ---------------------------------------------------------------------

@pytest.fixture
def browser():
    executable = find_chromium()
    if executable is None:
        pytest.skip("no Chromium found (on Debian: apt-get install chromium); the page is not "
                    "tested in a browser here")
    browser = Browser(executable)
    yield browser
    browser.close()


def test_the_page_draws_the_table_and_attention_and_follows_hover_and_typing(browser, tmp_path,
                                                                            monkeypatch):
    """On a tiny checkpoint, or on EXPLORE_CHECKPOINT; the screenshot goes to $TEST_ARTIFACTS
    (default: the test's temporary folder) as explore_page.png."""
    checkpoint = os.environ.get("EXPLORE_CHECKPOINT") or tiny_checkpoint(tmp_path / "page.pt")
    base, server = running(serve_args(checkpoint))
    try:
        browser.open(base + "/?prompt=ROMEO&head=all")
        browser.wait_for("document.body && document.body.dataset.ready === 'yes'")
        columns = "document.querySelectorAll('#table .column').length"
        assert browser.js(columns) == 5
        assert browser.js("document.querySelector('#table .column .token').textContent") == "R"
        n_head = browser.js("document.querySelectorAll('#attention-maps canvas').length")
        assert n_head == json.loads(request(base, "/api/model")[1])["facts"]["n_head"]
        inked = """[...document.querySelectorAll('#attention-maps canvas')].map((c) => {
            const pixels = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0; for (let i = 0; i < pixels.length; i += 4) n += pixels[i] < 250; return n; })"""
        assert all(n > 100 for n in browser.js(inked))  # every head's map is drawn
        shading = "[...document.querySelectorAll('#attention-text span')].map(s => s.style.background)"
        last_position = browser.js(shading)
        assert all(s.startswith("rgba(31, 119, 180") for s in last_position)
        # Hover the first column: position 0 can only look at itself (weight 1).
        hover_column(browser, 0)
        browser.wait_for("document.getElementById('attention-note').textContent"
                         ".startsWith('Position 0')")
        assert browser.js(shading)[0] == "rgb(31, 119, 180)" and browser.js(shading)[1] == ""
        # Typing: the table and the maps grow with the prompt.
        browser.js("(() => { const p = document.getElementById('prompt'); p.focus(); "
                   "p.setSelectionRange(p.value.length, p.value.length); })()")
        browser.type_text(":\nBut soft")
        browser.wait_for(f"{columns} === 15", timeout=120)
        assert browser.js("location.search").startswith("?prompt=ROMEO%3A%0ABut+soft")
        assert browser.js("document.getElementById('message').textContent") == ""
        hover_column(browser, 13)  # the "f" of "soft"
        browser.wait_for("document.getElementById('attention-note').textContent"
                         ".startsWith('Position 13 (f)')")
        assert sum(s != "" for s in browser.js(shading)) == 14  # positions 0..13 have weights
        # "continue" streams a sample into the page.
        browser.js("document.getElementById('length').value = 120; "
                   "document.getElementById('continue').click()")
        browser.wait_for("document.getElementById('sample').textContent.length === 120")
        height = browser.js("document.documentElement.scrollHeight")
        browser.send("Emulation.setDeviceMetricsOverride", width=1280, height=height,
                     deviceScaleFactor=1, mobile=False)
        folder = os.environ.get("TEST_ARTIFACTS") or str(tmp_path)
        os.makedirs(folder, exist_ok=True)
        browser.screenshot(os.path.join(folder, "explore_page.png"))
        with open(os.path.join(folder, "explore_page.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        # A character the model never saw: the message says which.
        browser.type_text("é")
        browser.wait_for("document.getElementById('message').textContent.includes('é')")
        # A stream that fails after its first piece: the message shows the error line.
        monkeypatch.setattr(explore_server, "stream_text", one_piece_then_a_bug)
        browser.js("document.getElementById('prompt').value = 'RO'; "
                   "document.getElementById('continue').click()")
        browser.wait_for("document.getElementById('message').textContent.includes('a bug')")
        assert browser.js("document.getElementById('sample').textContent") == "F"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("facts, shown", [(dict(val_loss=math.nan), "step 200"),
                                           (dict(val_bpc=None), "step 200, val loss 2.5000")])
def test_the_page_loads_a_checkpoint_with_a_nan_or_missing_figure(browser, tmp_path, facts, shown):
    """A NaN val loss (not JSON: sent as null) or no val_bpc (an older or hand-made checkpoint),
    which generate.py takes, is left out of the facts; the page still loads."""
    path = tiny_checkpoint(tmp_path / "odd.pt")
    checkpoint = {k: v for k, v in torch.load(path, weights_only=True).items() if k not in facts}
    torch.save({**checkpoint, **{k: v for k, v in facts.items() if v is not None}}, path)
    base, server = running(serve_args(path))
    try:
        json.loads(request(base, "/api/model")[1], parse_constant=lambda name: 1 / 0)  # no NaN
        browser.open(base + "/?prompt=RO")
        browser.wait_for("document.body && document.body.dataset.ready === 'yes'")
        text = browser.js("document.getElementById('facts').textContent")
        assert text.endswith(shown) and "nan" not in text.lower(), text
    finally:
        server.shutdown()
        server.server_close()


def test_the_page_shows_a_failed_model_answer_instead_of_loading_for_ever(browser, checkpoint,
                                                                         monkeypatch):
    monkeypatch.setattr(explore_server, "model_answer", lambda *args: 1 / 0)  # a bug: a 500
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # (its one line, tested above)
    base, server = running(serve_args(checkpoint))
    try:
        browser.open(base + "/")
        browser.wait_for("document.getElementById('facts').textContent.includes('division')")
    finally:
        server.shutdown()
        server.server_close()


def hover_column(browser, t):
    """Move the mouse over the middle of the table's column t (scrolled into view first)."""
    box = json.loads(browser.js(f"(() => {{ const c = document.querySelectorAll('#table .column')[{t}]; "
                                "c.scrollIntoView({block: 'center'}); "
                                "return JSON.stringify(c.getBoundingClientRect()); })()"))
    browser.move_mouse(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)


def test_the_facts_name_the_weights_the_page_runs(tmp_path):
    """With best weights in the checkpoint, the page shows their step, val loss and bits per
    character (none where the checkpoint kept none for them: never another evaluation's);
    --weights last shows the last step's."""
    path = tiny_checkpoint(tmp_path / "run.pt")
    checkpoint = torch.load(path, weights_only=True)
    torch.manual_seed(1)
    best_weights = GPTModel(GPTConfig(**checkpoint["model_args"])).state_dict()
    checkpoint.update(best={"step": 100, "val_loss": 2.0, "val_bpc": 2.9}, best_model=best_weights)
    torch.save(checkpoint, path)
    best = explore_server.load_explorer(path, "cpu")
    assert (best.facts["step"], best.facts["val_loss"], best.facts["val_bpc"]) == (100, 2.0, 2.9)
    assert torch.equal(best.model.tok_emb.weight, best_weights["tok_emb.weight"])
    last = explore_server.load_explorer(path, "cpu", "last")
    assert (last.facts["step"], last.facts["val_loss"], last.facts["val_bpc"]) == (200, 2.5, 3.6)
    del checkpoint["best"]["val_bpc"]  # as in older checkpoints
    for val_loss in (0.0, None):
        checkpoint["val_loss"] = val_loss
        torch.save(checkpoint, path)
        facts = explore_server.load_explorer(path, "cpu").facts
        assert (facts["step"], facts["val_loss"], facts["val_bpc"]) == (100, 2.0, None)
