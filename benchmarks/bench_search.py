"""Measure photo search (mlx_aim.tasks.search): indexing a folder of generated images, re-indexing it unchanged, and
querying indexes of 10k and 100k photos, on this machine's CPU.

- query: an index of N random unit rows of width 768 (the released LiT's projection_dim) is written directly
  through the index writer (`search.IndexFolder`, the same shards `build_index` writes), then a fresh process
  times `SearchIndex.open` + `search` (a text query's work once its embedding is there: no model) and an image
  query of an indexed file (its stored row, no model), best and median of --repeats, page cache warm; and
  `search dupes --threshold 0.97` over the float32 index (every pair scored, blockwise).
- index: --images generated photos (SyntheticShapes, --photo-size pixels, PNG) indexed with a tiny random LiT (49
  tokens) at 224x224 (the released LiT's preprocessing: decode, resize, crop, normalise; a model that costs little),
  so the time is the pipeline's own; then the same folder re-indexed with nothing changed; then with one of its
  1,000-photo folders moved (renamed), which must cost no model call; then `search dupes` over it.
- full: the full-size LiT (random weights, AIMv2LiTConfig()) indexing --full-images photos: its images/s.
- serve: `search serve`'s text-query latency over HTTP (p50, p95 of --serve-queries texts) with the full-size LiT
  loaded once and an index of --serve-rows random rows recorded as that LiT's (`bench_serve`).

    python benchmarks/bench_search.py --stages query index full serve --workdir /tmp/mlx-aim-search-bench
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # clip_vocab: CLIP's tokenizer files for the full-size LiT folder

from mlx_aim.apps.benchmark import write_random_model  # noqa: E402
from mlx_aim.models.config import AIMv2Config, AIMv2LiTConfig  # noqa: E402
from mlx_aim.tasks.shards import SHARD_SIZE  # noqa: E402
from mlx_aim.tasks.search import IndexFolder, file_stamp, index_key  # noqa: E402
from mlx_aim.data.synthetic import SyntheticShapes  # noqa: E402

WIDTH = 768

QUERY = """
import json, sys, time
import numpy as np
from mlx_aim.tasks.search import SearchIndex
folder, probe, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
query = np.random.default_rng(1).standard_normal(768).astype(np.float32)
query /= np.linalg.norm(query)
text, image = [], []
for _ in range(repeats):
    tick = time.perf_counter()
    index = SearchIndex.open(folder)
    hits = index.search(query, 10)
    text.append(time.perf_counter() - tick)
    tick = time.perf_counter()
    index = SearchIndex.open(folder)
    stored = index.stored_embedding(probe)
    hits = index.search(stored, 10)
    image.append(time.perf_counter() - tick)
    assert hits[0].path == probe, hits[0]
print(json.dumps({"text_seconds": text, "image_seconds": image}))
"""


SYNTHETIC = {"model": "synthetic", "model_config": {"projection_dim": WIDTH}, "model_dtype": "float32",
             "preprocessing": {}, "image_weights_sha256": "0" * 64}


def write_synthetic_index(out: Path, rows: int, save_dtype: str, probe: Path, identity: dict = SYNTHETIC) -> None:
    """`rows` random unit rows under made-up paths, row 0 being the real file `probe` (so an image query finds it),
    recorded as written by the model `identity` (`search.model_identity`; default: none that exists)."""
    folder = IndexFolder(out, identity, save_dtype)
    plan = folder.plan({})
    rng = np.random.default_rng(0)
    for lo in range(0, rows, SHARD_SIZE):
        count = min(SHARD_SIZE, rows - lo)
        embeddings = rng.standard_normal((count, WIDTH), dtype=np.float32)
        embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
        paths = [f"/photos/{i // 1000:03d}/{i:07d}.jpg" for i in range(lo, lo + count)]
        stamps = [(100_000 + i, 1_700_000_000_000_000_000 + i) for i in range(lo, lo + count)]
        if lo == 0:
            paths[0], stamps[0] = index_key(probe), file_stamp(probe)
        folder.add_shard(paths, stamps, embeddings)
    folder.finish(plan.keep, plan.dead, {"inputs": ["/photos"], "skipped_inputs": []})
    folder.close()


def bench_query(workdir: Path, sizes, repeats: int) -> dict:
    probe = workdir / "probe.png"
    if not probe.exists():  # its stamp is in the indexes written below
        SyntheticShapes(1, image_size=64)[0][0].save(probe)
    results = {}
    for rows in sizes:
        for save_dtype in ("float32", "float16"):
            out = workdir / f"query-{rows}-{save_dtype}"
            if not (out / "index.json").exists():
                write_synthetic_index(out, rows, save_dtype, probe)
            done = subprocess.run([sys.executable, "-c", QUERY, str(out), index_key(probe), str(repeats)],
                                  capture_output=True, text=True, env=_env())
            if done.returncode:
                raise SystemExit(done.stderr)
            times = json.loads(done.stdout)
            key = f"{rows}x{WIDTH} {save_dtype}"
            results[key] = {kind: {"best": min(t), "median": float(np.median(t))} for kind, t in times.items()}
            print(f"query {key}: open+search {results[key]['text_seconds']['best']:.3f} s best, "
                  f"{results[key]['text_seconds']['median']:.3f} s median; image query of an indexed file "
                  f"{results[key]['image_seconds']['best']:.3f} s best, {results[key]['image_seconds']['median']:.3f}"
                  " s median", flush=True)
            if save_dtype == "float32":
                tick = time.perf_counter()
                dupes = run_search("dupes", "--index", out, "--threshold", "0.97")
                results[key]["dupes"] = {"seconds": dupes["seconds"], "command_seconds": time.perf_counter() - tick}
                print(f"dupes {key}: {dupes['seconds']:.2f} s in the library, "
                      f"{results[key]['dupes']['command_seconds']:.2f} s for the whole command", flush=True)
    return results


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def write_photos(folder: Path, count: int, size: int) -> Path:
    if len(list(folder.rglob("*.png"))) != count:
        shapes = SyntheticShapes(count, image_size=size, seed=5)
        for i in range(count):
            path = folder / f"{i // 1000:02d}" / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            shapes[i][0].save(path)
    return folder


def run_index(model: Path, photos: Path, out: Path, batch_size: int) -> dict:
    return run_search("index", "--model", model, "--out", out, photos, "--batch-size", batch_size, "--no-progress")


def run_search(*args) -> dict:
    """`mlx-aim search ARGS --json` in a fresh process: its JSON summary."""
    done = subprocess.run([sys.executable, "-m", "mlx_aim.cli.main", "search", *map(str, args), "--json"],
                          capture_output=True, text=True, env=_env())
    if done.returncode:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_index(workdir: Path, count: int, size: int, batch_size: int) -> dict:
    photos = write_photos(workdir / f"photos-{count}-{size}", count, size)
    image = AIMv2Config(image_size=224, patch_size=32, width=32, depth=2, num_heads=2, hidden_dim=64)
    config = AIMv2LiTConfig(image=image, text_width=32, text_depth=1, text_num_heads=2, text_hidden_dim=64,
                            projection_dim=WIDTH)
    model = write_random_model(workdir / "tiny-lit-224", config, force=True)
    out = workdir / f"index-{count}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    first = run_index(model, photos, out, batch_size)
    tick = time.perf_counter()
    again = run_index(model, photos, out, batch_size)
    wall = time.perf_counter() - tick
    assert again["num_embedded"] == 0, again
    print(f"index {count} photos ({size}x{size} PNG), tiny LiT at 224: {first['seconds']:.1f} s, "
          f"{first['images_per_second']:.0f} images/s ({1000 / first['images_per_second']:.2f} ms per image; "
          f"model {first['model_images_per_second']:.0f} images/s)", flush=True)
    print(f"re-index {count} photos, nothing changed: {again['seconds']:.2f} s in the library, {wall:.2f} s for the "
          "whole command (interpreter, imports, model load)", flush=True)
    moved = photos / "00-moved"
    (photos / "00").rename(moved)  # 1,000 photos (or all of them, for fewer than 1,000)
    try:
        tick = time.perf_counter()
        after_move = run_index(model, photos, out, batch_size)
        move_wall = time.perf_counter() - tick
    finally:
        moved.rename(photos / "00")
    assert after_move["num_embedded"] == 0 and after_move["model_images_per_second"] is None, after_move
    print(f"re-index after moving a folder of {after_move['num_by_content']} photos: {after_move['num_embedded']} "
          f"embedded, {after_move['seconds']:.2f} s in the library, {move_wall:.2f} s for the whole command",
          flush=True)
    return {"index": first, "reindex": again, "reindex_command_seconds": wall, "moved": after_move,
            "moved_command_seconds": move_wall}


def full_size_lit(workdir: Path) -> Path:
    """The released LiT's architecture (AIMv2LiTConfig(), aimv2-large-patch14-224-lit's config) with random
    weights and CLIP's tokenizer files, as a model folder."""
    from clip_vocab import write_clip_tokenizer_files

    model = workdir / "lit-large-random"
    if not (model / "config.json").exists():
        write_random_model(model, AIMv2LiTConfig())
        write_clip_tokenizer_files(model)
    return model


def bench_full(workdir: Path, count: int, batch_size: int) -> dict:
    model = full_size_lit(workdir)
    photos = write_photos(workdir / f"photos-{count}-256", count, 256)
    out = workdir / f"index-full-{count}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    result = run_index(model, photos, out, batch_size)
    print(f"full-size LiT (random weights, float32), {count} photos in batches of {batch_size}: "
          f"{result['images_per_second']:.2f} images/s ({result['model_images_per_second']:.2f} images/s in the "
          f"model), peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    return result


def bench_serve(workdir: Path, rows: int, count: int, threads: int) -> dict:
    """`search serve`'s text-query latency over HTTP: the full-size LiT loaded once, an index of `rows` stored rows
    recorded as the LiT's, `count` different texts (after 3 warm-up queries), each timed from request to parsed
    answer (the text tower, the scan of every row, the top 40 as JSON); `threads` BLAS threads per query (0: the
    libraries' own counts), as `search serve --threads`."""
    import http.client
    import threading
    from urllib.parse import quote

    from mlx_aim.apps.search_server import SearchService, make_server
    from mlx_aim.data import imagenet_classes, preprocessing_for
    from mlx_aim.tasks.lit import open_lit
    from mlx_aim.tasks.search import model_identity

    folder = full_size_lit(workdir)
    tick = time.perf_counter()
    model, tokenizer = open_lit(folder)
    load_seconds = time.perf_counter() - tick
    preprocessing = preprocessing_for(model.config.image, folder)
    probe = workdir / "probe.png"
    if not probe.exists():
        SyntheticShapes(1, image_size=64)[0][0].save(probe)
    out = workdir / f"serve-{rows}"
    if not (out / "index.json").exists():
        write_synthetic_index(out, rows, "float32", probe, model_identity(model, str(folder), preprocessing))
    service = SearchService(out, lambda _: (model, tokenizer, preprocessing), str(folder), threads)
    service.load_model()
    server = make_server(service, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    texts = [f"a photo of a {name}" for name in imagenet_classes()[: count + 3]]
    seconds, in_server = [], []
    connection = http.client.HTTPConnection("127.0.0.1", server.port)
    try:
        for i, text in enumerate(texts):
            tick = time.perf_counter()
            connection.request("GET", f"/api/search?q={quote(text)}&k=40")
            answer = json.loads(connection.getresponse().read())
            if i >= 3:
                seconds.append(time.perf_counter() - tick)
                in_server.append(answer["seconds"])
            assert answer["num_images"] == rows and len(answer["results"]) == 40, answer
    finally:
        connection.close()
        server.shutdown()
        server.server_close()
    result = {"rows": rows, "queries": len(seconds), "threads": threads, "model_load_seconds": load_seconds,
              "p50_seconds": float(np.percentile(seconds, 50)), "p95_seconds": float(np.percentile(seconds, 95)),
              "max_seconds": max(seconds), "server_p50_seconds": float(np.percentile(in_server, 50))}
    print(f"serve, full-size LiT (random weights, float32), {rows} rows, {len(seconds)} text queries over HTTP, "
          f"--threads {threads}: "
          f"p50 {result['p50_seconds']:.3f} s, p95 {result['p95_seconds']:.3f} s, max {result['max_seconds']:.3f} s "
          f"(in the server: p50 {result['server_p50_seconds']:.3f} s; model load {load_seconds:.1f} s)", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", choices=["query", "index", "full", "serve"], default=["query", "index"])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/mlx-aim-search-bench"))
    p.add_argument("--query-sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--photo-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--full-images", type=int, default=32)
    p.add_argument("--full-batch-size", type=int, default=8)
    p.add_argument("--serve-rows", type=int, default=100_000)
    p.add_argument("--serve-queries", type=int, default=50)
    p.add_argument("--serve-threads", type=int, nargs="+", default=[1, 0],
                   help="BLAS threads per query, one run each (0: the libraries' own counts)")
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = {}
    if "query" in args.stages:
        results["query"] = bench_query(args.workdir, args.query_sizes, args.repeats)
    if "index" in args.stages:
        results["index"] = bench_index(args.workdir, args.images, args.photo_size, args.batch_size)
    if "full" in args.stages:
        results["full"] = bench_full(args.workdir, args.full_images, args.full_batch_size)
    if "serve" in args.stages:
        results["serve"] = [bench_serve(args.workdir, args.serve_rows, args.serve_queries, threads)
                            for threads in args.serve_threads]
    print(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
