"""Search your photos by text or by an example image, with an AIMv2-LiT; nothing leaves the machine:

    mlx-aim search index --model aimv2-large-patch14-224-lit --out photos.index ~/Pictures
    mlx-aim search query --index photos.index "a red bicycle at night" [--top-k 10] [--grid hits.png]
    mlx-aim search query --index photos.index "beach + sunset - people"
    mlx-aim search query --index photos.index "2:dog + ./my_dog.jpg" --threshold 0.2 --paths-only | xargs open
    mlx-aim search query --index photos.index --image ~/Pictures/bike.jpg
    mlx-aim search dupes --index photos.index --threshold 0.97 [--grid dupes/]
    mlx-aim search serve --index photos.index [--open]

`index` embeds every image under the folders into INDEX. Re-run it to bring INDEX up to date: only new or changed
files are embedded (a file is known by its path, size and modification time) and deleted ones are dropped; a run
that was stopped resumes from its finished shards; PHOTOS and --model default to the index's own. Unreadable files
are skipped, listed, and not retried until they change. A moved, renamed or copied photo is found by its content
(sha256) and keeps its embedding without a model call; exact duplicates are counted (--json lists them). Hidden
files and folders are skipped unless --include-hidden; --exclude-dir NAME leaves out every folder of that name,
--exclude-dir PATH (with a "/") that one folder; without PHOTOS, the index's recorded settings are kept. One
indexer at a time: a second one stops naming the first one's pid, or with --wait starts after it.

`query` prints the top-k photos with their cosine similarity. QUERY is terms joined by " + " and " - ", each a
text, an image path (starting with /, ./, ../ or ~/) or #ROW (a row of the index), optionally weighted (2:dog); the
query vector is normalize(sum of sign * weight * unit embedding) (mlx_aim/tasks/query.py). An image already in the
index (unchanged) is answered from its stored embedding, without loading the model; --model defaults to the
index's. --threshold S keeps the photos scoring at least S (all of them unless --top-k is given); --paths-only
prints the paths alone, one per line. --grid writes a contact sheet of the results.

`serve` opens a local web page (http://127.0.0.1:8765/) with the model kept loaded: a search box taking the same
queries (texts and #ROW), a grid of thumbnails with scores, the full photo on a click and "more like this". It
listens on 127.0.0.1 unless --host says otherwise, and serves only the index's files, by row.

`dupes` groups near-identical photos (bursts, edits, re-saves) from the stored embeddings, without a model: photos
whose cosine similarity is at least --threshold are linked, and each group is a connected set of links. --grid DIR
draws a contact sheet per group.

Exit status: 1 when nothing was indexed or found, 2 on bad input (and when another indexer holds the
index).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import webbrowser
from pathlib import Path
from typing import Optional, Sequence

from ..apps.search_server import PORT, QUERY_THREADS, SearchService, is_loopback, make_server
from ..data import preprocessing_for
from ..tasks.encode import peak_memory
from ..tasks.shards import SHARD_SIZE
from ..tasks.lit import check_lit, open_lit
from ..checkpoints.loading import load
from ..tasks.dupes import DUPES_THRESHOLD, near_duplicates
from ..tasks.query import Query, QueryError, check_threshold, parse_query, query_vector
from ..tasks.search import TOP_K, SearchIndex, build_index, recorded_run
from ..tasks.visualize import draw_contact_sheet, save_png
from .options import (
    add_batching_options, add_model_options, add_output_options, at_least, positive_int, precision,
)
from .output import CommandError, EXIT_EMPTY, EXIT_OK, memory_line, print_json, reported_as, run_command

LIT_HELP = ("the AIMv2-LiT: aimv2-large-patch14-224-lit, a hub repo id or a converted folder (with its tokenizer "
            "files)")


def cosine(text: str) -> float:
    try:
        return check_threshold(text)
    except QueryError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    i = sub.add_parser("index", help="embed a photo folder into an index, or bring an index up to date")
    i.add_argument("inputs", nargs="*", metavar="PHOTOS",
                   help="folders (searched recursively), files or globs (default: the index's own)")
    i.add_argument("--model", help=f"{LIT_HELP} (default: the index's own)")
    i.add_argument("--out", required=True, metavar="INDEX", help="the index folder")
    add_batching_options(i)
    i.add_argument("--shard-size", type=positive_int, default=SHARD_SIZE, help="images per shard")
    i.add_argument("--save-dtype", choices=["float32", "float16"],
                   help="dtype of the stored embeddings, fixed when the index is created (default float32)")
    i.add_argument("--exclude-dir", action="append", metavar="DIR", dest="exclude_dirs",
                   help="leave out every folder of this name (e.g. @eaDir), or with a \"/\" this one folder "
                        "(./raw); repeatable (default: none, or the index's own when PHOTOS is not given)")
    i.add_argument("--include-hidden", action=argparse.BooleanOptionalAction, default=None,
                   help="also take hidden files and folders (names starting with \".\"; default: skip them, or the "
                        "index's own setting when PHOTOS is not given)")
    i.add_argument("--wait", action="store_true",
                   help="when another indexer is updating INDEX, wait for it instead of stopping")
    add_model_options(i, dtype_help="compute dtype (default: the index's, else as stored)")
    add_output_options(i)

    q = sub.add_parser("query", help="the photos most similar to a text or to an example image")
    q.add_argument("text", nargs="?", metavar="QUERY",
                   help="what to look for: a text, or terms joined by + and -, each a text, an image path (./x.jpg) "
                        "or #ROW, optionally weighted (2:dog): \"beach + sunset - people\", \"2:dog + ./my_dog.jpg\"")
    q.add_argument("--image", metavar="FILE", help="look for photos like this one instead of a text")
    q.add_argument("--index", required=True, metavar="INDEX", help="an index folder written by `search index`")
    q.add_argument("--model", help=f"{LIT_HELP} (default: the one the index was built with)")
    q.add_argument("--top-k", type=positive_int,
                   help=f"how many photos at most (default {TOP_K}; with --threshold, all that pass it)")
    q.add_argument("--threshold", type=cosine, metavar="S", help="only photos whose cosine similarity is at least S")
    q.add_argument("--paths-only", action="store_true",
                   help="print only the paths, one per line (for `| xargs open`); errors still go to stderr")
    q.add_argument("--grid", metavar="OUT.png", help="also write a contact sheet of the results")
    add_model_options(q, dtype_help="compute dtype (default: the index's)")
    add_output_options(q)

    d = sub.add_parser("dupes", help="groups of near-identical photos in an index (no model)")
    d.add_argument("--index", required=True, metavar="INDEX", help="an index folder written by `search index`")
    d.add_argument("--threshold", type=similarity, default=DUPES_THRESHOLD,
                   help=f"least cosine similarity of two photos linked as near-duplicates (default "
                        f"{DUPES_THRESHOLD})")
    d.add_argument("--grid", metavar="DIR", help="also write a contact sheet per group into DIR (group-0001.png...)")
    add_output_options(d)

    v = sub.add_parser("serve", help="a local web page to search the index, with the model kept loaded")
    v.add_argument("--index", required=True, metavar="INDEX", help="an index folder written by `search index`")
    v.add_argument("--model", help=f"{LIT_HELP} (default: the one the index was built with)")
    v.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on (default 127.0.0.1: this machine only; any other is warned about)")
    v.add_argument("--port", type=at_least(0), default=PORT, help=f"the port (default {PORT}; 0: any free one)")
    v.add_argument("--open", action="store_true", help="open the page in the default browser")
    v.add_argument("--threads", type=at_least(0), default=QUERY_THREADS,
                   help=f"BLAS threads for a query (default {QUERY_THREADS}: a short text runs as fast on one, and "
                        "far faster on a busy machine; 0: the libraries' own counts)")
    add_model_options(v, dtype_help="compute dtype (default: the index's)")
    add_output_options(v, json_help="also print one JSON object (url, port, index, photos, model) once listening: "
                                    "with --port 0, how a script learns the port")
    return p


def similarity(text: str) -> float:
    """A cosine similarity threshold in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: expected a cosine similarity in (0, 1]")
    return value


def model_name(text: str) -> str:
    """A model source as the index records it: a local path made absolute, so a query from elsewhere finds it."""
    return str(Path(text).resolve()) if Path(text).exists() else text


def load_settings(args: argparse.Namespace, recorded: Optional[dict]) -> dict:
    """dtype and quantization for loading the model: the options given, else the index's, so a re-run or a
    query loads the model as the index was built."""
    recorded, given = recorded or {}, precision(args)
    if given["quantize"] is None:
        given["quantize"] = (recorded.get("model_config") or {}).get("quantization")
    return {"dtype": given["dtype"] or recorded.get("model_dtype"), "quantize": given["quantize"]}


def run_index(args: argparse.Namespace) -> int:
    with reported_as(f"cannot read the index {args.out}"):
        recorded = recorded_run(args.out)
    name = args.model or (recorded or {}).get("model")
    if not name:
        raise CommandError("--model: required to create an index")
    inputs = args.inputs or (recorded or {}).get("inputs")
    if not inputs:
        raise CommandError("PHOTOS: name the folders to index (an index records them once it is built)")
    walk = {} if args.inputs else (recorded or {})  # new PHOTOS start from the defaults; a bare re-run keeps all
    exclude_dirs = args.exclude_dirs if args.exclude_dirs is not None else walk.get("exclude_dirs", [])
    include_hidden = args.include_hidden if args.include_hidden is not None else walk.get("include_hidden", False)
    name = model_name(name)
    with reported_as(f"cannot load the model {name}"):
        model = check_lit(load(name, **load_settings(args, recorded), text_tower=False), name)  # image side only
        preprocessing = preprocessing_for(model.config.image, model.source.folder)
    result = build_index(model, inputs, args.out, model_name=name, preprocessing=preprocessing,
                         batch_size=args.batch_size, num_workers=args.num_workers, shard_size=args.shard_size,
                         save_dtype=args.save_dtype, exclude_dirs=exclude_dirs, include_hidden=include_hidden,
                         wait=args.wait, progress=not args.no_progress)
    summary = result.to_dict()
    summary.update(peak_memory(), model=name, batch_size=args.batch_size)
    rate = summary["images_per_second"]
    print(f"index of {summary['num_images']} image(s) at {result.out}: {result.num_embedded} embedded now"
          f"{f' ({rate:.2f} images/s)' if rate else ''}, {result.num_reused} kept from earlier runs, "
          f"{result.num_dropped} dropped (deleted or changed), in {result.seconds:.2f} s")
    if result.num_by_content:
        print(f"{result.num_by_content} moved, renamed or copied photo(s) found by content: no model call")
    copies = summary["num_duplicate_copies"]
    print(f"exact duplicates: {copies} extra cop{'y' if copies == 1 else 'ies'} in {len(result.duplicates)} group(s)"
          + (" (--json lists them)" if copies else ""))
    print(result.skipped.report())
    print(memory_line(summary))
    if args.json:
        print_json(summary)
    return EXIT_OK if summary["num_images"] else EXIT_EMPTY


def model_opener(args: argparse.Namespace, index: SearchIndex, name: str, timer: dict):
    """`open_model(with_tokenizer)` for `query_vector`: the index's model (or --model), loaded as the index was
    built, its image side only when no text needs the tokenizer; the seconds it took go to timer["model"]."""
    settings = load_settings(args, index.index)

    def open_model(with_tokenizer: bool):
        tick = time.perf_counter()
        if not name:
            raise CommandError("the index records no model name; pass --model")
        with reported_as(f"cannot load the model {name}"):
            if with_tokenizer:
                model, tokenizer = open_lit(name, **settings)
            else:
                model, tokenizer = check_lit(load(name, **settings, text_tower=False), name), None
            preprocessing = preprocessing_for(model.config.image, model.source.folder)
        timer["model"] = timer.get("model", 0.0) + time.perf_counter() - tick
        return model, tokenizer, preprocessing

    return open_model


def run_query(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    with reported_as("cannot open the index"):
        index = SearchIndex.open(args.index)
    name = model_name(args.model) if args.model else index.model_name
    query = Query.image(args.image) if args.image is not None else parse_query(args.text)
    timer: dict = {}
    found = query_vector(query, index, model_opener(args, index, name, timer), name)
    top_k = args.top_k or (None if args.threshold is not None else TOP_K)
    tick = time.perf_counter()
    hits = index.search(found.vector, top_k, args.threshold)
    search_seconds = time.perf_counter() - tick
    what = f"photos like {args.image}" if args.image is not None else repr(args.text)
    if args.paths_only:
        for hit in hits:
            print(hit.path)
    else:
        above = f" scoring at least {args.threshold:g}" if args.threshold is not None else ""
        print(f"top {len(hits)} of {len(index)} photo(s){above} for {what}"
              + ("" if found.model_loaded else " (stored embeddings: no model loaded)"))
        for hit in hits:
            print(f"{hit.rank:>4}. {hit.score:+.4f}  {hit.path}")
    if args.grid and hits:
        captions = [[f"#{h.rank}  {h.score:+.3f}", os.path.basename(h.path)] for h in hits]
        save_png(draw_contact_sheet([h.path for h in hits], captions, title=f"top {len(hits)} for {what}"),
                 args.grid)
        print(f"contact sheet: {args.grid}", file=sys.stderr if args.paths_only else sys.stdout)
    if args.json:
        asked = {"text": args.text} if args.image is None else {"image": args.image}
        print_json({"index": str(args.index), "query": {**asked, "terms": query.to_dict()["terms"]}, "model": name,
                    "model_loaded": found.model_loaded, "num_images": len(index), "top_k": top_k,
                    "threshold": args.threshold, "results": [h.to_dict() for h in hits],
                    "grid": args.grid if args.grid and hits else None,
                    "seconds": round(time.perf_counter() - start, 4),
                    "model_seconds": round(timer.get("model", 0.0), 4), "search_seconds": round(search_seconds, 4)})
    if not hits:
        if len(index) and args.threshold is not None:
            raise CommandError(f"no photo scores at least {args.threshold:g} for {what}", EXIT_EMPTY)
        raise CommandError(f"{args.index}: the index holds no photos", EXIT_EMPTY)
    return EXIT_OK


def run_dupes(args: argparse.Namespace) -> int:
    with reported_as("cannot open the index"):
        index = SearchIndex.open(args.index)
    tick = time.perf_counter()
    groups = near_duplicates(index, args.threshold)
    seconds = time.perf_counter() - tick
    print(f"{len(groups)} group(s) of near-duplicates (cosine >= {args.threshold}) among {len(index)} photo(s), "
          f"{sum(len(g.paths) for g in groups)} photos in all, in {seconds:.2f} s")
    sheets = []
    for number, group in enumerate(groups, 1):
        print(f"group {number}: {len(group.paths)} photos, least link {group.min_score:+.4f}")
        for path, score in zip(group.paths, group.scores):
            print(f"  {score:+.4f}  {path}")
        if args.grid:
            captions = [[f"best link {score:+.3f}", os.path.basename(path)] for path, score in zip(group.paths,
                                                                                                  group.scores)]
            sheet = Path(args.grid) / f"group-{number:04d}.png"
            save_png(draw_contact_sheet(group.paths, captions, title=f"group {number}: {len(group.paths)} "
                                        f"near-duplicates (cosine >= {args.threshold})"), sheet)
            sheets.append(str(sheet))
    if sheets:
        print(f"contact sheets: {len(sheets)} in {args.grid}")
    if args.json:
        print_json({"index": str(args.index), "threshold": args.threshold, "num_images": len(index),
                    "num_groups": len(groups), "groups": [g.to_dict() for g in groups], "grids": sheets,
                    "seconds": round(seconds, 4)})
    if not len(index):
        raise CommandError(f"{args.index}: the index holds no photos", EXIT_EMPTY)
    return EXIT_OK


def run_serve(args: argparse.Namespace) -> int:
    with reported_as("cannot open the index"):
        index = SearchIndex.open(args.index)
    name = model_name(args.model) if args.model else index.model_name
    timer: dict = {}
    with reported_as("cannot open the index"):
        service = SearchService(args.index, model_opener(args, index, name, timer), name, args.threads)
    service.load_model()
    print(f"model {name} loaded in {timer['model']:.1f} s", flush=True)
    with reported_as(f"cannot listen on {args.host} port {args.port}"):
        server = make_server(service, args.host, args.port)
    if not is_loopback(args.host):
        print(f"warning: listening on {args.host}: anyone who can reach this machine on port {server.port} can "
              "search these photos and see them; use the default --host 127.0.0.1 to keep them to this machine",
              file=sys.stderr, flush=True)
    print(f"serving {len(service.index)} photo(s) of {args.index} at {server.url} (Ctrl-C to stop)", flush=True)
    if args.json:
        print_json({"url": server.url, "host": args.host, "port": server.port, "index": str(args.index),
                    "num_images": len(service.index), "model": name, "model_seconds": round(timer["model"], 4)})
    if args.open:
        webbrowser.open(server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    return {"index": run_index, "query": run_query, "dupes": run_dupes, "serve": run_serve}[args.command](args)


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.command == "query" and (args.text is None) == (args.image is None):
        parser.error("query: give a text or --image FILE (one of them)")
    if args.command == "query" and args.paths_only and args.json:
        parser.error("query: --paths-only prints paths alone; leave out --json")
    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
