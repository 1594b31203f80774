"""The live page behind `python explore.py --serve`: watch your own checkpoint think as you type.

    python explore.py --serve                        # then open the printed URL
    python explore.py --serve --compare other.pt     # two checkpoints side by side

A small web server from Python's standard library. It serves the page's own files (web/, a fixed
list: no path from the URL ever reaches the file system) and answers three JSON requests:

    GET  /api/model      the checkpoint's facts and the 2-D map of its token embeddings
    POST /api/look       {"prompt", "known"}: the next-token table and the new attention rows
    POST /api/continue   {"prompt", "temperature", "top_k", "top_p", "seed", "length"}: the
                         sampled text, one JSON line per piece, sent as it is generated
                         (an error once it has begun: a last line, {"error": ...})

It answers only requests that name it (the Host header) and POSTs sent as JSON by its own page
(Content-Type, Origin): another web site open in the browser cannot use it (TROUBLESHOOTING.md).

Why typing stays fast: in a causal model, the prediction and the attention row of position t
depend only on tokens 0..t, so a character added at the end leaves every earlier row as it was.
The server keeps the KV cache (model.py: KVCache) of the last few prompts it has seen and runs
only the positions after the part they share (explore.look_inside), and the page keeps the rows
it has and asks only for the new ones ("known": the token ids it holds rows for).
"""

import base64
import errno
import ipaddress
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import torch

import explore
from checkpoint import load_checkpoint
from generate import check_args, load_model, prompt_ids_for, stream_text
from utils import UsageError, one_line

WEB_DIR = Path(__file__).resolve().parent / "web"
PAGE_FILES = {"/": "index.html", "/index.html": "index.html", "/explore.css": "explore.css",
              "/explore.js": "explore.js"}
CONTENT_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript"}
MAX_BODY = 64 * 1024  # bytes in a request: a prompt of a few thousand characters, and more
MAX_PROMPT_CHARS = 20_000  # longer prompts are refused; up to it, the last block_size tokens count
MAX_LENGTH = 2000  # tokens one "continue" may ask for
TOP_K = 5  # guesses shown per position
KEPT_PROMPTS = 4  # KV caches kept per model: a few tabs typing at once each find theirs
FIRST_PORT = 8000  # without --port: the first free port from here on


class RequestError(UsageError):
    """A bad request: the message goes back to the page, with an HTTP status (400, 404, 413)."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------------------
# Loading: the model(s) the page looks into

def load_explorer(path, device, weights="best", flag="--checkpoint"):
    """The model and tokenizer of path with its facts, a lock (one forward pass at a time: the
    KV caches are shared) and its kept prompts; flag: the one that named path."""
    facts = load_checkpoint(path, flag=flag)  # read once more: load_model drops step and losses
    model, tokenizer, _ = load_model(path, device, weights=weights)
    step, val_loss, val_bpc = (facts.get(name) for name in ("step", "val_loss", "val_bpc"))
    if weights == "best" and "best_model" in facts:  # (older checkpoints: no bpc)
        step, val_loss, val_bpc = (facts["best"].get(name) for name in ("step", "val_loss",
                                                                         "val_bpc"))
    # JSON has no NaN: a figure that is not a finite number (a hand-made checkpoint's) goes as
    # null, and bits per character go with the val loss they come from.
    val_loss, val_bpc = (x if isinstance(x, (int, float)) and math.isfinite(x) else None
                         for x in (val_loss, val_bpc))
    val_bpc = None if val_loss is None else val_bpc
    shape = {name: facts["model_args"][name]
             for name in ("n_layer", "n_head", "n_embd", "block_size")}
    return types.SimpleNamespace(
        model=model, tokenizer=tokenizer, device=device, lock=threading.Lock(), prompts=[],
        facts=dict(checkpoint=path, parameters=model.num_params(), step=step, val_loss=val_loss,
                   val_bpc=val_bpc, tokenizer=facts["tokenizer"]["kind"],
                   vocab_size=tokenizer.vocab_size, **shape))


def model_answer(explorer, other):
    """GET /api/model: the facts, every token's text, and the embedding map (explore.py's PCA)."""
    token_text = [explore.readable(explorer.tokenizer.decode([i]))
                  for i in range(explorer.tokenizer.vocab_size)]
    coords, explained = explore.embedding_pca(explorer.model.tok_emb.weight.detach().cpu())
    return dict(facts=explorer.facts, compare=other.facts if other else None, tokens=token_text,
                kinds=[explore.kind_of(text) for text in token_text],
                embedding=coords.tolist(), explained=explained.tolist())


# ---------------------------------------------------------------------------------------------
# Looking inside, one new position at a time

def look(explorer, prompt, known=None):
    """POST /api/look for one model: the prompt's last block_size tokens, every position's
    next-token table, and the attention rows the page lacks (it has those of `known`; None: all)."""
    if known is not None and not (isinstance(known, list) and all(type(i) is int for i in known)):
        raise RequestError("known must be a list of token ids")
    ids = encode(explorer.tokenizer, prompt)
    cut = max(0, len(ids) - explorer.model.block_size)
    ids = ids[cut:]
    with explorer.lock:
        known_length = len(ids) if known is None else shared_length(known, ids)
        probs, start, attention = run_prompt(explorer, ids, known_length)
    rows = explore.next_token_rows(probs, ids, min(TOP_K, explorer.tokenizer.vocab_size))
    attention = attention.permute(2, 0, 1, 3)  # (T - start, n_layer, n_head, T): row by row
    return dict(ids=ids, cut=cut, start=start, rows=rows,
                attention=base64.b64encode(attention.numpy().astype("<f4").tobytes()).decode())


def encode(tokenizer, prompt):
    if not isinstance(prompt, str):
        raise RequestError("prompt must be a string")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(f"the prompt is {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
    return tokenizer.encode(prompt)  # a UsageError (400) names characters the model never saw


def shared_length(a, b):
    return len(os.path.commonprefix([a, b]))  # how many tokens lists a and b share at the start


def run_prompt(explorer, ids, known):
    """(probabilities (T, V), start, attention (n_layer, n_head, T - start, T)) of ids: only the
    positions after what both the best-matching kept prompt and the page (`known`) hold run."""
    kept = max(explorer.prompts, key=lambda p: shared_length(p.ids, ids), default=None)
    if kept and (shared_length(kept.ids, ids) > 0 or len(explorer.prompts) == KEPT_PROMPTS):
        explorer.prompts.remove(kept)  # the best match or, when none matches, the oldest
    else:
        kept = types.SimpleNamespace(ids=[], probs=torch.zeros(0, explorer.tokenizer.vocab_size),
                                     cache=explorer.model.new_cache(batch_size=1))
    start = min(shared_length(kept.ids, ids), known)
    probs, attention = explore.look_inside(explorer.model, ids[start:], kept.cache, start)
    kept.ids, kept.probs = ids, torch.cat([kept.probs[:start], probs])
    explorer.prompts.append(kept)  # the most recently used last
    return kept.probs, start, attention


# ---------------------------------------------------------------------------------------------
# Continuing the prompt, as generate.py does

def sampling_args(body):
    """The sampling settings of a /api/continue request, checked as generate.py checks its flags."""
    args = types.SimpleNamespace(
        temperature=number(body, "temperature", 0.8, float),
        top_k=number(body, "top_k", 200, int), top_p=number(body, "top_p", None, float),
        seed=number(body, "seed", 1337, int), max_new_tokens=number(body, "length", 200, int),
        num_samples=1, no_cache=False, checkpoint="-")
    if not 1 <= args.max_new_tokens <= MAX_LENGTH:
        raise RequestError(f"length must be from 1 to {MAX_LENGTH}, got {args.max_new_tokens}")
    check_args(args)
    return args


def number(body, name, default, kind):
    value = body.get(name, default)
    if value is None and default is None:
        return None
    # (A NaN fails the comparison too; an infinity, or an integer too big for a float, is over.)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= 2**64
    if not ok or (kind is int and value != int(value)):
        raise RequestError(f"{name} must be a{' whole' if kind is int else ''} number of at "
                           f"most 2**64, got {json.dumps(value)[:40]}")
    return kind(value)


# ---------------------------------------------------------------------------------------------
# The web server

class Handler(BaseHTTPRequestHandler):
    """One request, answered from self.server.explorer and, with --compare, self.server.other."""
    default_request_version = "HTTP/1.0"  # so that even a garbled request gets a status line
    # Each connection holds a thread and a file descriptor: without a limit, clients that send
    # half a request and wait would use them all up and lock every page out. The limit is per
    # read or write, so a long streamed answer to a page that keeps reading goes on.
    timeout = 30  # seconds a connection may send or take nothing before it is closed
    streaming = False  # True once a streamed answer's 200 is sent: no second status may follow

    def do_GET(self):  # and do_POST: any error becomes a JSON error answer, never a dead server
        try:
            self.respond(urlsplit(self.path).path, self.server.explorer, self.server.other)
        except UsageError as err:  # a RequestError, or a bad prompt or setting: the page's fault
            self.send({"error": str(err)}, status=getattr(err, "status", 400))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the page went away (a new keystroke, a closed tab) or fell silent
        except Exception as err:  # a bug: say so in one line and keep serving
            # One write per line: print's two (text, then newline) run into other threads' lines.
            sys.stderr.write(one_line(f"error: {self.path}: {type(err).__name__}: {err}") + "\n")
            self.send({"error": f"internal error: {type(err).__name__}: {err}"}, status=500)

    do_POST = do_GET

    def respond(self, path, explorer, other):
        # Another web site open in the browser can send requests here too. Its own host name
        # made to point at 127.0.0.1 (DNS rebinding) is no Host of ours; a POST of its page says
        # where it comes from (Origin), and a JSON Content-Type makes the browser ask us first.
        # Any port: through a forwarded one (ssh -L 8000:127.0.0.1:8001) the browser names its own.
        host = self.headers.get("Host")  # none: an HTTP/1.0 client, never a browser
        if None not in (host, self.server.hosts) and \
                re.sub(r":\d+$", "", host.lower()) not in self.server.hosts:
            raise RequestError(f"Host {host[:100]} is not this server's address; open the URL "
                               f"explore.py printed", 403)
        if self.command == "GET":
            if path == "/api/model":
                return self.send(model_answer(explorer, other))
            if path not in PAGE_FILES:
                raise RequestError(f"no such page: {path[:100]}", 404)
            page = WEB_DIR / PAGE_FILES[path]
            return self.send(page.read_bytes(), f"{CONTENT_TYPES[page.suffix]}; charset=utf-8")
        body = self.read_json()
        if path == "/api/look":
            answer = look(explorer, body.get("prompt"), body.get("known", []))
            if other:  # the second model's table for the same prompt (its rows only)
                answer["compare"] = look(other, body.get("prompt"))["rows"]
            return self.send(answer)
        if path != "/api/continue":
            raise RequestError(f"no such request: POST {path[:100]}", 404)
        args, prompt = sampling_args(body), body.get("prompt", "")
        encode(explorer.tokenizer, prompt)  # refuse a prompt that is no string, or too long
        generator = torch.Generator(explorer.device).manual_seed(args.seed)
        pieces = stream_text(explorer.model, explorer.tokenizer,
                             prompt_ids_for(prompt, explorer.tokenizer), args, explorer.device,
                             generator=generator)  # generate.py's sample, piece by piece
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.end_headers()  # HTTP/1.0: the answer ends when the connection closes
        self.streaming = True
        while True:
            with explorer.lock:  # step by step: another tab's look may come in between
                piece = next(pieces, None)
            if piece is None:
                return
            self.send({"text": piece})  # one JSON line

    def read_json(self):
        origin = self.headers.get("Origin")  # a browser's POST names the page that sends it
        page = urlsplit(origin or "")  # the page that sends it: http(s)://this server's Host
        if origin is not None and (page.scheme not in ("http", "https")
                                   or page.netloc != self.headers.get("Host")):
            raise RequestError(f"a POST from another web site ({origin[:100]}) is refused; use "
                               f"the page this server serves", 403)
        if self.headers.get_content_type() != "application/json":
            raise RequestError("a POST's Content-Type must be application/json", 415)
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise RequestError("a POST needs a Content-Length header", 411) from None
        if not 0 <= length <= MAX_BODY:
            raise RequestError(f"the request body is {length} bytes; at most {MAX_BODY}", 413)
        try:
            body = json.loads(self.rfile.read(length))
        except (ValueError, RecursionError) as err:  # bad JSON, bad UTF-8, nested too deep
            raise RequestError(f"the request body is not JSON: {err}") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        return body

    def send(self, data, content_type="application/json", status=200):
        """Answer data: bytes, or a value sent as JSON (inside a started stream: its last line)."""
        if self.streaming:  # an error while sampling: the page shows {"error": ...} and stops
            return self.wfile.write((json.dumps(data) + "\n").encode())
        data = data if isinstance(data, bytes) else json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a garbled request line, an unknown method), as JSON."""
        if code == 501:
            code, message = 405, "only GET and POST are answered"
        self.send({"error": message or self.responses.get(code, ("error",))[0]}, status=code)

    def log_message(self, format, *args):
        pass  # no line per request: the terminal stays readable


def start_server(args, device):
    """Load the checkpoint(s) and bind the port: a server ready to serve_forever. Every problem
    (no checkpoint, a damaged one, a port in use, two tokenizers) is a UsageError."""
    explorer = load_explorer(args.checkpoint, device, args.weights)
    other = load_explorer(args.compare, device, args.weights, "--compare") if args.compare else None
    if other and other.tokenizer.to_dict() != explorer.tokenizer.to_dict():
        raise UsageError(f"--compare {args.compare} has another tokenizer than {args.checkpoint}; "
                         f"compare checkpoints trained on the same text with the same --tokenizer")
    ports = [args.port] if args.port is not None else range(FIRST_PORT, FIRST_PORT + 100)
    for port in ports:
        try:
            server = ThreadingHTTPServer((args.host, port), Handler)
        except socket.gaierror:  # also an IPv6 address: the server listens on IPv4
            raise UsageError(f"--host {args.host}: no such IPv4 address; use 127.0.0.1 (this "
                             f"machine only) or 0.0.0.0 (every network it is on)") from None
        except OSError as err:
            if err.errno == errno.EADDRNOTAVAIL:  # an address of another machine
                raise UsageError(f"cannot listen on {args.host} ({err.strerror}): it is not an "
                                 f"address of this machine; use 127.0.0.1 or 0.0.0.0") from None
            if args.port is not None or port == ports[-1]:
                raise UsageError(f"cannot listen on {args.host}:{port} ({err.strerror}); pass "
                                 f"another --port, or stop the program using it") from None
            continue
        server.explorer, server.other = explorer, other  # what Handler answers from
        # The Host names a request may give: 0.0.0.0 is every address of this machine, so any.
        bound = server.server_address[0]
        server.hosts = None if bound == "0.0.0.0" else {
            "127.0.0.1", "localhost", "[::1]", args.host.lower(), bound}
        server.daemon_threads = True  # Ctrl-C does not wait for open connections
        server.handle_error = lambda request, client_address: None  # never a traceback
        return server


def serve(args, device):
    """python explore.py --serve: start the server, print the URL, serve until Ctrl-C."""
    server = start_server(args, device)
    host, port = server.server_address[:2]
    if not ipaddress.ip_address(host).is_loopback:  # the address bound: 127.1 is 127.0.0.1
        print(f"warning: --host {args.host} lets other machines reach this page and run the model "
              f"on this computer; there is no password. Use it only on a network you trust.")
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    print(f"Looking inside {args.checkpoint}" + (f" (and {args.compare})" if args.compare else ""))
    print(f"Open http://{shown_host}:{port}/ in a browser; Ctrl-C stops the server.", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C changes nothing
        print("\nStopped.", flush=True)
        # A page's request may be running the model in a thread of its own: Python shutting
        # down under it makes torch's C++ abort ("terminate called without an active
        # exception", exit code 134). The server writes no file: leave at once, threads and all.
        os._exit(0)
    finally:
        server.server_close()
