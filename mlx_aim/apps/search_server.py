"""`mlx-aim search serve`: a local web page over a search index. The model stays loaded, so a query costs one
text-tower pass and a scan of the index; results come back as a grid of thumbnails with their scores, each one a link
to the full photo and a "more like this" button (an image query by index row, `#ROW`).

    service = SearchService(index_folder, open_model, model_name)
    server = make_server(service, "127.0.0.1", 8765)
    server.serve_forever()

The server is the standard library's `http.server.ThreadingHTTPServer`: it parses HTTP itself (request lines,
headers, their limits, malformed requests answered 400/414/431/501), it is maintained with Python, and it adds no
dependency: the runtime dependencies are kept to mlx, numpy, pillow, huggingface_hub, tqdm and tokenizers, and a
framework (Flask, aiohttp) would bring its own tree for four GET routes. Its documentation warns it is not meant for
production: the page is for one user on one machine, and listens on the loopback address unless told otherwise.

Routes (GET only; any other path is 404, and the server keeps serving):

- `/`, `/app.js`: the page, two files of `mlx_aim/assets` (plain HTML and JavaScript, nothing from the network);
- `/api/search?q=QUERY[&k=N][&threshold=S]`: JSON, the hits with their rows, scores and file names; a query that
  cannot be answered is 400 with {"error": ...} naming the term;
- `/thumb/ROW`, `/photo/ROW`: a row's thumbnail (JPEG, made once and cached under `INDEX/thumbnails/`, written
  under a temporary name and renamed) and its full photo (the file's bytes for formats every browser shows, else a
  JPEG of it).

Only files in the index are served, named by their row, never by a path from the request: a row's file is served
when it still has the size and modification time the index recorded and its real path (symbolic links followed)
lies inside a folder or file the index was built from. A symbolic link out of that set, a file swapped since, a row
past the end and every other path get 404. Queries take texts and rows, not image paths (the page names no
file). Query strings are capped (`MAX_TARGET_CHARS`, `tasks.query.MAX_QUERY_CHARS`), and on the loopback address
a request whose Host header is not the loopback one is refused (403), so a web site cannot read the answers through
a DNS name rebound to 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import ipaddress
import json
import logging
import os
import re
import shutil
import stat
import threading
import time
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qs, urlsplit

from PIL import Image, ImageOps

from ..backend import compute_threads
from ..data import ImageLoadError, load_image
from ..fileio import atomic_file, remove_stale_temporaries
from ..tasks.query import MAX_QUERY_CHARS, ModelOpener, QueryError, check_threshold, parse_query, query_vector
from ..tasks.search import SearchIndex, file_stamp

log = logging.getLogger(__name__)

PORT = 8765
# BLAS and native-kernel threads for a query (`backend.compute_threads`; 0: the libraries' own counts). A text query
# is a few tokens through the text tower: skinny matrix products, which one thread does in about the time two do on
# a quiet machine, and many times faster on a busy one, where each multithreaded product waits at its barrier for a
# descheduled thread (mlx_aim/_blas.py; `benchmarks/bench_search.py --stages serve` measures both).
QUERY_THREADS = 1
TOP_K = 40
MAX_TOP_K = 500
MAX_TARGET_CHARS = 4 * MAX_QUERY_CHARS  # a query percent-encoded, and the other parameters
THUMBNAIL_SIZE = 320  # pixels, the longer side: sharp in the page's 160-pixel cells on a Retina screen
PHOTO_SIZE = 2560  # the longer side of a JPEG made for a format browsers do not show
THUMBNAILS = "thumbnails"
SOCKET_TIMEOUT = 30  # seconds a connection may idle: a slow client cannot hold a thread for ever
# What every browser shows as it is; other formats (TIFF, HEIC, ...) are sent as a JPEG made from the file.
WEB_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".gif": "image/gif",
             ".webp": "image/webp", ".bmp": "image/bmp"}
ASSET_FOLDER = Path(__file__).parents[1] / "assets"
ASSETS = {"/": ("search-serve.html", "text/html; charset=utf-8"),
          "/app.js": ("search-serve.js", "text/javascript; charset=utf-8")}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_ROW_PATH = re.compile(r"/(thumb|photo)/([0-9]{1,12})")
_GLOB_MAGIC = re.compile(r"[*?[]")


class SearchService:
    """The page's work, apart from HTTP: answers queries with the model kept loaded (`search`), and finds the
    files it may serve by row (`indexed_file`, `thumbnail`, `open_photo`). The index is reopened when an indexer has
    rewritten it since. `open_model(with_tokenizer)` is called on the first query that needs the model."""

    def __init__(self, folder: str | os.PathLike, open_model: ModelOpener, model_name: str = "",
                 threads: int = QUERY_THREADS):
        self.folder = Path(folder)
        self._open_model, self.model_name, self.threads = open_model, model_name, threads
        self._model = None
        self._lock = threading.Lock()  # one query at a time: the model and the index reopen
        self._stamp = None
        self.index = self._reopen()
        if (self.folder / THUMBNAILS).is_dir():
            remove_stale_temporaries(self.folder / THUMBNAILS)  # thumbnails a killed server was writing

    def _reopen(self) -> SearchIndex:
        stamp = file_stamp(self.folder / "index.json")
        if stamp != self._stamp:
            index = SearchIndex.open(self.folder).keep_in_memory()
            if self._model is not None:
                index.check_model(self._model[0], self.model_name)
            self.index, self._stamp = index, stamp
            self.roots = indexed_roots(index.index.get("inputs", []))
        return self.index

    def model(self, with_tokenizer: bool = True):
        """`query_vector`'s opener: the model, opened once, always with its tokenizer (the page's queries are mostly
        texts), and checked to be the index's (ValueError naming both otherwise); checked again only when the index
        is reopened."""
        if self._model is None:
            model = self._open_model(True)
            self.index.check_model(model[0], self.model_name)
            self._model = model
        return self._model

    def load_model(self) -> None:
        """Opens the model now, so the first query does not wait for it."""
        with self._lock:
            self.model(True)

    def search(self, text: str, top_k: int = TOP_K, threshold: Optional[float] = None) -> dict:
        """The hits for `text` (the query algebra, texts and rows only) as the page shows them; QueryError when it
        cannot be answered."""
        tick = time.perf_counter()
        query = parse_query(text, image_paths=False)
        with self._lock, compute_threads(self.threads):
            index = self._reopen()
            found = query_vector(query, index, self.model, self.model_name, check_model=False)
            hits = index.search(found.vector, top_k, threshold)
        return {"query": query.to_dict(), "num_images": len(index), "top_k": top_k, "threshold": threshold,
                "results": [{"row": h.row, "score": round(h.score, 6), "name": os.path.basename(h.path),
                             "path": h.path} for h in hits],
                "seconds": round(time.perf_counter() - tick, 4)}

    def indexed_file(self, row: int) -> Optional[tuple[str, tuple[int, int]]]:
        """(the real path, the recorded (size, mtime_ns)) of row `row`'s file when it may be served: a regular
        file unchanged since it was indexed, inside the indexed folders with symbolic links followed; else None."""
        with self._lock:
            index = self._reopen()
            if not 0 <= row < len(index):
                return None
            path, stamp, roots = index.row_path(row), index.row_stamp(row), self.roots
        real = os.path.realpath(path)
        if not any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in roots):
            return None
        try:
            return (real, stamp) if is_stamped(os.stat(real), stamp) else None
        except OSError:
            return None

    def open_photo(self, row: int):
        """(row `row`'s file opened for reading, its content type: None for a format to send as a JPEG), checked
        again once open (no symbolic link in its place, same size and time); None when it may not be served."""
        found = self.indexed_file(row)
        if found is None:
            return None
        path, stamp = found
        try:
            # Named by its path (load_image reads the format from it), opened without following a link.
            f = open(path, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NOFOLLOW))
        except OSError:
            return None
        if not is_stamped(os.fstat(f.fileno()), stamp):
            f.close()
            return None
        return f, WEB_TYPES.get(os.path.splitext(path)[1].lower())

    def thumbnail(self, row: int) -> Optional[Path]:
        """Row `row`'s JPEG thumbnail, made on first use under INDEX/thumbnails/ (named by the file's path, size
        and time, so it outlives re-indexing and is made anew for a changed file); None when the row may not be
        served or its file cannot be read."""
        found = self.indexed_file(row)
        if found is None:
            return None
        path, (size, mtime) = found
        key = hashlib.sha256(f"{path}\0{size}\0{mtime}\0{THUMBNAIL_SIZE}".encode()).hexdigest()[:40]
        cached = self.folder / THUMBNAILS / f"{key}.jpg"
        if not cached.is_file():
            try:
                image = ImageOps.contain(load_image(path), (THUMBNAIL_SIZE, THUMBNAIL_SIZE),
                                         Image.Resampling.BICUBIC)
            except ImageLoadError as error:
                log.warning("thumbnail of row %d: %s", row, error)
                return None
            cached.parent.mkdir(exist_ok=True)
            with atomic_file(cached) as tmp:
                image.save(tmp, format="JPEG", quality=85)
        return cached


def is_stamped(st: os.stat_result, stamp: tuple[int, int]) -> bool:
    """Whether `st` is a regular file's with the (size, mtime_ns) `stamp`."""
    return stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns) == tuple(stamp)


def indexed_roots(inputs) -> list[str]:
    """The real paths of the folders and files an index was built from; a glob stands for the folder above its
    first wildcard."""
    roots = []
    for item in inputs:
        text = os.path.abspath(os.path.expanduser(str(item)))
        if _GLOB_MAGIC.search(text):
            text = os.path.dirname(text[: _GLOB_MAGIC.search(text).start()]) or os.sep
        roots.append(os.path.realpath(text))
    return roots


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or name to listen on) is this machine alone: 127.0.0.0/8, ::1, localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Handler(http.server.BaseHTTPRequestHandler):
    """The routes of the module docstring. `server.service` is the SearchService; `server.allowed_hosts` the Host
    header values taken (None: any)."""

    server_version = "mlx-aim-search"
    sys_version = ""
    timeout = SOCKET_TIMEOUT
    error_content_type = "text/plain; charset=utf-8"
    error_message_format = "%(code)d %(message)s\n"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        try:
            self._route()
        except Exception:  # a bug or a file gone mid-request: this request fails, the server goes on
            log.exception("%s %s", self.command, self.path[:200])
            if not self._started:
                self._send_json(500, {"error": "internal error (see the server's log)"})

    _started = False

    def _route(self) -> None:
        if len(self.path) > MAX_TARGET_CHARS:
            return self.send_error(414, f"request target over {MAX_TARGET_CHARS} characters")
        allowed = self.server.allowed_hosts
        if allowed is not None and self.headers.get("Host", "").lower() not in allowed:
            return self.send_error(403, "unexpected Host header (this page answers on its loopback address only)")
        target = urlsplit(self.path)
        if target.scheme or target.netloc or target.fragment:
            return self.send_error(404)
        if target.path in ASSETS and not target.query:
            name, kind = ASSETS[target.path]
            return self._send_bytes(200, (ASSET_FOLDER / name).read_bytes(), kind)
        if target.path == "/api/search":
            return self._search(target.query)
        match = _ROW_PATH.fullmatch(target.path)
        if match and not target.query:
            return self._file(match.group(1), int(match.group(2)))
        return self.send_error(404)

    def _search(self, query_string: str) -> None:
        try:
            fields = parse_qs(query_string, keep_blank_values=True, strict_parsing=True, errors="strict",
                              max_num_fields=3)
        except (ValueError, UnicodeDecodeError) as error:
            return self._send_json(400, {"error": f"malformed query string ({error})"})
        if set(fields) - {"q", "k", "threshold"} or "q" not in fields or any(len(v) > 1 for v in fields.values()):
            return self._send_json(400, {"error": "expected q=QUERY, optionally k=N and threshold=S, each once"})
        try:
            top_k = int(fields["k"][0]) if "k" in fields else TOP_K
            if not 1 <= top_k <= MAX_TOP_K:
                raise ValueError
        except ValueError:
            return self._send_json(400, {"error": f"k: expected a whole number from 1 to {MAX_TOP_K}"})
        try:
            threshold = check_threshold(fields["threshold"][0]) if "threshold" in fields else None
            result = self.server.service.search(fields["q"][0], top_k, threshold)
        except QueryError as error:
            return self._send_json(400, {"error": str(error)})
        return self._send_json(200, result)

    def _file(self, kind: str, row: int) -> None:
        service = self.server.service
        if kind == "thumb":
            path = service.thumbnail(row)
            if path is None:
                return self.send_error(404)
            return self._send_file(str(path), "image/jpeg")
        found = service.open_photo(row)
        if found is None:
            return self.send_error(404)
        f, content_type = found
        with f:
            if content_type:
                self._headers(200, content_type, os.fstat(f.fileno()).st_size)
                return shutil.copyfileobj(f, self.wfile)
            try:
                image = load_image(f)  # by its name's format: a RAW file gives its preview
            except (ImageLoadError, OSError):
                return self.send_error(404)
        image.thumbnail((PHOTO_SIZE, PHOTO_SIZE), Image.Resampling.BICUBIC)
        body = io.BytesIO()
        image.save(body, format="JPEG", quality=90)
        return self._send_bytes(200, body.getvalue(), "image/jpeg")

    def _send_file(self, path: str, content_type: str) -> None:
        try:
            f = open(path, "rb")
        except OSError:
            return self.send_error(404)
        with f:
            size = os.fstat(f.fileno()).st_size
            self._headers(200, content_type, size)
            shutil.copyfileobj(f, self.wfile)

    def _send_json(self, code: int, obj: dict) -> None:
        self._send_bytes(code, json.dumps(obj).encode(), "application/json")

    def _send_bytes(self, code: int, body: bytes, content_type: str) -> None:
        self._headers(code, content_type, len(body))
        self.wfile.write(body)

    def _headers(self, code: int, content_type: str, length: int) -> None:
        self._started = True
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        log.debug("%s " + format, self.address_string(), *args)


class SearchServer(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a connection still open does not keep the program from ending

    def __init__(self, service: SearchService, host: str, port: int):
        super().__init__((host, port), Handler)
        self.service = service
        self.port = self.server_address[1]
        # On the loopback address only these Host headers are taken (DNS rebinding: module docstring).
        self.allowed_hosts = ({f"{name}:{self.port}" for name in ("127.0.0.1", "localhost", "[::1]")}
                              if is_loopback(host) else None)

    @property
    def url(self) -> str:
        host = self.server_address[0]
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.port}/"


def make_server(service: SearchService, host: str = "127.0.0.1", port: int = PORT) -> SearchServer:
    """A server bound to (`host`, `port`; 0 picks a free port) answering with `service`; `serve_forever()` runs
    it, `shutdown()` (from another thread) stops it."""
    return SearchServer(service, host, port)
