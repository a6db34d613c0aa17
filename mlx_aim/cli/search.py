"""Search your photos by text or by an example image, with an AIMv2-LiT; nothing leaves the machine:

    mlx-aim search index --model aimv2-large-patch14-224-lit --out photos.index ~/Pictures
    mlx-aim search query --index photos.index "a red bicycle at night" [--top-k 10] [--grid hits.png]
    mlx-aim search query --index photos.index --image ~/Pictures/bike.jpg
    mlx-aim search dupes --index photos.index --threshold 0.97 [--grid dupes/]

`index` embeds every image under the folders into INDEX. Re-run it to bring INDEX up to date: only new or changed
files are embedded (a file is known by its path, size and modification time) and deleted ones are dropped; a run
that was stopped resumes from its finished shards; PHOTOS and --model default to the index's own. Unreadable files
are skipped, listed, and not retried until they change. A moved, renamed or copied photo is found by its content
(sha256) and keeps its embedding without a model call; exact duplicates are counted (--json lists them). Hidden
files and folders are skipped unless --include-hidden; --exclude-dir NAME leaves out every folder of that name,
--exclude-dir PATH (with a "/") that one folder; without PHOTOS, the index's recorded settings are kept. One
indexer at a time: a second one stops naming the first one's pid, or with --wait starts after it.

`query` prints the top-k photos with their cosine similarity. An --image already in the index (unchanged) is
answered from its stored embedding, without loading the model; --model defaults to the index's. --grid writes a
contact sheet of the results.

`dupes` groups near-identical photos (bursts, edits, re-saves) from the stored embeddings, without a model: photos
whose cosine similarity is at least --threshold are linked, and each group is a connected set of links. --grid DIR
draws a contact sheet per group. Exit status: 1 when nothing was indexed or found, 2 on bad input (and when another
indexer holds the index).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from ..data import preprocessing_for
from ..tasks.encode import peak_memory
from ..tasks.shards import SHARD_SIZE
from ..tasks.lit import check_lit, embed_texts, open_lit
from ..checkpoints.loading import load
from ..tasks.dupes import DUPES_THRESHOLD, near_duplicates
from ..tasks.search import TOP_K, SearchIndex, build_index, image_query, recorded_run
from ..tasks.visualize import draw_contact_sheet, save_png
from .options import add_batching_options, add_model_options, add_output_options, positive_int, precision
from .output import CommandError, EXIT_EMPTY, EXIT_OK, memory_line, print_json, reported_as, run_command

LIT_HELP = ("the AIMv2-LiT: aimv2-large-patch14-224-lit, a hub repo id or a converted folder (with its tokenizer "
            "files)")


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
    q.add_argument("text", nargs="?", help="what to look for, e.g. \"a red bicycle at night\"")
    q.add_argument("--image", metavar="FILE", help="look for photos like this one instead of a text")
    q.add_argument("--index", required=True, metavar="INDEX", help="an index folder written by `search index`")
    q.add_argument("--model", help=f"{LIT_HELP} (default: the one the index was built with)")
    q.add_argument("--top-k", type=positive_int, default=TOP_K)
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


def run_query(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    with reported_as("cannot open the index"):
        index = SearchIndex.open(args.index)
    name = model_name(args.model) if args.model else index.model_name
    settings = load_settings(args, index.index)
    model_seconds = 0.0

    def open_model(with_tokenizer: bool):
        nonlocal model_seconds
        tick = time.perf_counter()
        if not name:
            raise CommandError("the index records no model name; pass --model")
        with reported_as(f"cannot load the model {name}"):
            if with_tokenizer:
                model, tokenizer = open_lit(name, **settings)
            else:
                model, tokenizer = check_lit(load(name, **settings, text_tower=False), name), None
            preprocessing = preprocessing_for(model.config.image, model.source.folder)
        model_seconds += time.perf_counter() - tick
        return model, tokenizer, preprocessing

    if args.text is not None:
        what = repr(args.text)
        model, tokenizer, _ = open_model(with_tokenizer=True)
        index.check_model(model, name)
        query, model_loaded = embed_texts(model, tokenizer, [args.text])[0], True
    else:
        what = f"photos like {args.image}"

        def model_for_image():
            model, _, preprocessing = open_model(with_tokenizer=False)
            return model, name, preprocessing

        query, model_loaded = image_query(index, args.image, model_for_image)
    tick = time.perf_counter()
    hits = index.search(query, args.top_k)
    search_seconds = time.perf_counter() - tick
    print(f"top {len(hits)} of {len(index)} photo(s) for {what}"
          + ("" if model_loaded else " (its stored embedding: no model loaded)"))
    for hit in hits:
        print(f"{hit.rank:>4}. {hit.score:+.4f}  {hit.path}")
    if args.grid and hits:
        captions = [[f"#{h.rank}  {h.score:+.3f}", os.path.basename(h.path)] for h in hits]
        save_png(draw_contact_sheet([h.path for h in hits], captions, title=f"top {len(hits)} for {what}"),
                 args.grid)
        print(f"contact sheet: {args.grid}")
    if args.json:
        print_json({"index": str(args.index), "query": {"text": args.text} if args.text is not None else
                    {"image": args.image}, "model": name, "model_loaded": model_loaded, "num_images": len(index),
                    "top_k": args.top_k, "results": [h.to_dict() for h in hits],
                    "grid": args.grid if args.grid and hits else None,
                    "seconds": round(time.perf_counter() - start, 4), "model_seconds": round(model_seconds, 4),
                    "search_seconds": round(search_seconds, 4)})
    if not hits:
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


def run(args: argparse.Namespace) -> int:
    return {"index": run_index, "query": run_query, "dupes": run_dupes}[args.command](args)


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.command == "query" and (args.text is None) == (args.image is None):
        parser.error("query: give a text or --image FILE (one of them)")
    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
