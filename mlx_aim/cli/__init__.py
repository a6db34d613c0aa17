"""The command lines of mlx-aim: one module per command, each with `build_parser()` and `main(argv) -> int`.

    mlx-aim classify --model aim-600M photos/      # the installed command (`main.py`), one subcommand each
    python -m mlx_aim.cli.classify --model ...     # one command as a module
    python scripts/classify.py --model ...         # the repository's shims

Commands: classify, zero-shot, extract-features, probe (train | eval), search, pretrain, convert, demo, scaling,
benchmark, visualize.
`options.py` holds the options they share, `output.py` how they print and end. One convention for all:
- exit status 0: done; 1: ran but produced nothing (every image skipped, the loss diverged); 2: usage and
  load errors (bad options, missing files, unreadable checkpoints);
- an error is one line `error: ...` on stderr, without a traceback (argparse reports bad options with the
  usage, also with status 2);
- `--json` prints one JSON object on the last line of stdout; `--no-progress` turns progress bars off;
- `--quantize {4,8}` with `--q-group-size` wherever a model is loaded.
The library under them neither prints nor exits: it returns results and raises typed errors, and logs
skipped images (logger `mlx_aim`), which the commands print.
"""
