"""`mlx-aim search serve` (mlx_aim.apps.search_server) over real HTTP: a server started in-process on a free port over a
tiny LiT's index of generated photos. Answers equal the library's; thumbnails are cached; only indexed files are
served, by row; every hostile request (traversal, absolute paths, symbolic links out of the indexed set, swapped
files, oversized and malformed requests, image paths in queries, a foreign Host header) is refused, and the server
keeps serving after each."""

import http.client
import json
import os
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from lit_helpers import write_tiny_lit  # noqa: F401 (the lit fixtures' helper)
from mlx_aim.apps.search_server import MAX_TARGET_CHARS, THUMBNAIL_SIZE, SearchService, make_server
from mlx_aim.cli import search as search_cli
from mlx_aim.data import preprocessing_for
from mlx_aim.tasks.query import MAX_QUERY_CHARS, parse_query, query_vector
from mlx_aim.tasks.search import SearchIndex, build_index
from test_search import NUM_PHOTOS, write_photo


@pytest.fixture
def library(tmp_path, lit):
    """Photos (PNG, a JPEG, a TIFF), a symbolic link in them to a photo outside, and their index."""
    root = tmp_path / "photos"
    for i in range(NUM_PHOTOS):
        write_photo(root / ("trip" if i % 3 == 0 else ".") / f"{i:02d}.{'jpg' if i == 4 else 'png'}", i)
    write_photo(root / "scan.tif", 12)
    outside = write_photo(tmp_path / "private" / "secret.png", 13)
    os.symlink(outside, root / "link.png")
    model, tokenizer = lit
    build_index(model, [root], tmp_path / "index", model_name="tiny-lit", progress=False)
    return root, tmp_path / "index"


@pytest.fixture
def served(library, lit):
    """(base URL pieces, the service, the library) with a server running on a free loopback port."""
    model, tokenizer = lit
    opened = []

    def open_model(with_tokenizer):
        opened.append(with_tokenizer)
        return model, tokenizer, preprocessing_for(model.config.image)

    service = SearchService(library[1], open_model, "tiny-lit")
    server = make_server(service, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, service, library, opened
    server.shutdown()
    server.server_close()


def get(server, target, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request("GET", target, headers=headers or {})
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, dict(response.getheaders()), body


def raw(server, data: bytes) -> int:
    """The status the server answers to `data` sent as it is on a fresh connection (a request it reads as HTTP/0.9
    gets a bare body, which starts with the status)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    answer = b"".join(chunks)
    return int(answer.split(b" ")[1] if answer.startswith(b"HTTP/") else answer.split(b" ")[0])


def search(server, query, **params):
    from urllib.parse import urlencode

    status, _, body = get(server, "/api/search?" + urlencode({"q": query, **params}))
    return status, json.loads(body)


def row_of(index, path):
    return next(r for r in range(len(index)) if index.row_path(r) == str(path))


def test_page_and_answers_equal_the_library(served, lit):
    server, service, (root, folder), opened = served
    status, headers, page = get(server, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b'id="q"' in page
    assert "script-src 'self'" in headers["Content-Security-Policy"] and headers["X-Content-Type-Options"] == "nosniff"
    status, headers, script = get(server, "/app.js")
    assert status == 200 and b"/api/search" in script and "javascript" in headers["Content-Type"]

    model, tokenizer = lit
    index = SearchIndex.open(folder)
    status, answer = search(server, "2:a red disc - stripes", k=100)
    assert status == 200 and answer["num_images"] == len(index) == NUM_PHOTOS + 2
    expected = index.search(query_vector(parse_query("2:a red disc - stripes"), index,
                                         lambda _: (model, tokenizer, None)).vector, 100)
    assert [(r["row"], r["path"], r["name"]) for r in answer["results"]] == [
        (h.row, h.path, os.path.basename(h.path)) for h in expected]
    np.testing.assert_allclose([r["score"] for r in answer["results"]], [h.score for h in expected], atol=1e-6)
    # More like this: an image query by row, alone or mixed with text; a threshold keeps the best.
    row = answer["results"][3]["row"]
    status, answer = search(server, f"#{row}", k=3)
    assert status == 200 and answer["results"][0]["row"] == row and answer["results"][0]["score"] == pytest.approx(1)
    assert len(answer["results"]) == 3
    status, mixed = search(server, f"#{row} + 0.5:a disc", k=50)
    cut = (mixed["results"][2]["score"] + mixed["results"][3]["score"]) / 2
    status, answer = search(server, f"#{row} + 0.5:a disc", threshold=cut, k=50)
    assert status == 200 and answer["results"] == mixed["results"][:3]
    assert opened == [True]  # the model was opened once, for the first text


def test_thumbnails_are_cached_and_photos_are_the_indexed_files(served):
    server, service, (root, folder), _ = served
    index = SearchIndex.open(folder)
    row = row_of(index, root / "trip" / "03.png")
    status, headers, body = get(server, f"/thumb/{row}")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    cached = list((folder / "thumbnails").iterdir())
    assert len(cached) == 1 and cached[0].read_bytes() == body and cached[0].suffix == ".jpg"
    with Image.open(cached[0]) as thumb:
        assert thumb.format == "JPEG" and max(thumb.size) <= THUMBNAIL_SIZE
    made = cached[0].stat().st_mtime_ns
    assert get(server, f"/thumb/{row}")[2] == body and cached[0].stat().st_mtime_ns == made  # from the cache
    status, headers, body = get(server, f"/photo/{row}")
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert body == (root / "trip" / "03.png").read_bytes()
    # A TIFF, which browsers do not show, comes as a JPEG of it.
    status, headers, body = get(server, f"/photo/{row_of(index, root / 'scan.tif')}")
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and body[:2] == b"\xff\xd8"
    assert not [p for p in (folder / "thumbnails").iterdir() if p.name.startswith(".")]  # no temporaries left
    # What a server killed mid-write leaves is cleared by the next one.
    (folder / "thumbnails" / f".{cached[0].name}.tmp-1-abcd.jpg").write_bytes(b"half a JPEG")
    SearchService(folder, None)
    assert [p.name for p in (folder / "thumbnails").iterdir()] == [cached[0].name]


def test_hostile_requests_are_refused_and_the_server_keeps_serving(served, tmp_path):
    server, service, (root, folder), _ = served
    index = SearchIndex.open(folder)
    link = row_of(index, root / "link.png")  # indexed: a symbolic link to a photo outside the indexed folder
    good = row_of(index, root / "01.png")
    n = len(index)
    not_found = [
        f"/photo/{n}", f"/thumb/{n}", "/photo/-1", "/photo/abc", "/photo/1.0", "/photo/01x", f"/photo/{'9' * 40}",
        f"/photo/{link}", f"/thumb/{link}",  # symlink out of the indexed set
        "/photo/../../../etc/passwd", "/../index.json", "/%2e%2e/%2e%2e/etc/passwd", "/photo/%2e%2e%2fetc%2fpasswd",
        "//etc/passwd", "/photo//etc/passwd", "/photo/%2Fetc%2Fpasswd", str(root / "01.png"), "/index.json",
        "/thumbnails/", "/assets/search-serve.html", f"/photo/{good}?path=/etc/passwd", f"/photo/{good}/",
        "/app.js/../../index.json", "http://example.com/photo/1", "/favicon.ico", "/api/search/../../index.json",
    ]
    for target in not_found:
        status, _, body = get(server, target, headers={"Host": f"127.0.0.1:{server.port}"})
        assert status == 404, (target, status, body)
        assert get(server, f"/photo/{good}")[0] == 200, target  # still serving
    bad_queries = {
        "q=" + "x" * (MAX_QUERY_CHARS + 1): "characters long",
        "q=cat+%2B+%2Fetc%2Fpasswd": "image files are not taken here",
        "q=.%2Fx.jpg": "image files are not taken here",
        "q=%ff%fe": "malformed query string",
        "q=a&q=b": "each once",
        "x=1": "each once",
        "": "each once",
        "q=a&k=0": "k: expected",
        "q=a&k=1e3": "k: expected",
        "q=a&threshold=2": "a number from -1 to 1",
        "q=0%3Acat": "is not a weight",
        "q=cat+-+cat": "cancel out",
        f"q=%23{n}": f"the index has rows 0 to {n - 1}",
        "q=a&k=1&threshold=0&extra=1": "malformed query string",
    }
    for query, message in bad_queries.items():
        status, _, body = get(server, "/api/search?" + query)
        assert status == 400 and message in json.loads(body)["error"], (query, status, body)
    assert get(server, "/api/search?q=" + "x" * MAX_TARGET_CHARS)[0] == 414
    assert raw(server, b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n") == 414
    assert raw(server, b"GARBAGE\r\n\r\n") == 400
    assert raw(server, b"GET / HTTP/9.9\r\nHost: x\r\n\r\n") in (400, 505)
    assert raw(server, f"GET /\x00 HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode()) == 404
    assert raw(server, b"POST /api/search HTTP/1.1\r\nContent-Length: 3\r\n\r\nq=a") == 501
    assert raw(server, b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n") == 431
    # A page on another site, its name rebound to 127.0.0.1, sends its own Host: refused.
    assert get(server, "/api/search?q=cat", headers={"Host": f"evil.example:{server.port}"})[0] == 403
    assert get(server, "/api/search?q=cat", headers={"Host": f"localhost:{server.port}"})[0] == 200

    # A file changed since it was indexed, or swapped for a link to a file outside, is not served either.
    changed = root / "02.png"
    os.utime(changed, ns=(1, changed.stat().st_mtime_ns + 10**9))
    stat = (root / "05.png").stat()
    (root / "05.png").unlink()
    os.symlink(tmp_path / "private" / "secret.png", root / "05.png")
    os.utime(root / "05.png", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    for path in (changed, root / "05.png"):
        row = row_of(index, path)
        assert (get(server, f"/photo/{row}")[0], get(server, f"/thumb/{row}")[0]) == (404, 404), path
    status, answer = search(server, "a disc", k=3)
    assert status == 200 and len(answer["results"]) == 3


def test_a_reindexed_folder_is_reopened(served, lit):
    server, service, (root, folder), _ = served
    assert search(server, "a disc")[1]["num_images"] == NUM_PHOTOS + 2
    write_photo(root / "new.png", 20)
    time.sleep(0.01)
    build_index(lit[0], [root], folder, model_name="tiny-lit", progress=False)
    status, answer = search(server, "a disc", k=100)
    assert status == 200 and answer["num_images"] == NUM_PHOTOS + 3
    assert str(root / "new.png") in [r["path"] for r in answer["results"]]


def test_the_command_warns_off_loopback_and_refuses_a_wrong_index(lit_folder, library, monkeypatch, capsys):
    root, folder = library
    servers = []

    def capture(service, host, port):
        servers.append(make_server(service, host, port))
        return servers[-1]

    monkeypatch.setattr(search_cli, "make_server", capture)
    results = []
    thread = threading.Thread(target=lambda: results.append(search_cli.main(
        ["serve", "--index", str(folder), "--model", str(lit_folder), "--host", "0.0.0.0", "--port", "0",
         "--json"])))
    thread.start()
    for _ in range(300):
        if servers and servers[0].socket.fileno() >= 0:
            break
        time.sleep(0.05)
    try:
        for _ in range(100):  # serve_forever starts right after the lines are printed
            try:
                status = get(servers[0], "/api/search?q=cat", headers={"Host": f"192.168.1.9:{servers[0].port}"})[0]
                break
            except ConnectionError:
                time.sleep(0.05)
        assert status == 200  # another address was asked for: any Host header is taken
    finally:
        servers[0].shutdown()
        thread.join(10)
    captured = capsys.readouterr()
    assert results == [0]
    assert "warning: listening on 0.0.0.0" in captured.err and f"127.0.0.1:{servers[0].port}/" in captured.out
    started = json.loads(captured.out.splitlines()[-1])
    assert started["port"] == servers[0].port and started["num_images"] == NUM_PHOTOS + 2
    assert search_cli.main(["serve", "--index", str(folder.parent / "nowhere")]) == 2
    assert "cannot open the index" in capsys.readouterr().err
