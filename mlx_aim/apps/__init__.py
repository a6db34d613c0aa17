"""Whole programs built on the layers below: the demo (`demo`), the paper's findings at laptop scale (`scaling`) and
the benchmarks (`benchmark`). The command lines (`mlx_aim.cli`) run them."""
