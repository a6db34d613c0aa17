"""scripts/benchmark.py (mlx_aim.cli.benchmark) and mlx_aim.apps.benchmark: what the benchmark reports and how it
counts, never how fast.

The command line runs on a tiny custom-sized preset (aim-tiny at 32 px) so each case takes seconds."""

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

import mlx_aim
from conftest import TWIN_TOLERANCE, dequantized_twin, last_json, rel_err, run_script
from mlx_aim.apps import benchmark
from mlx_aim.cli import benchmark as benchmark_cli
from mlx_aim.models.config import AIMv2Config, get_config

TINY = ["--preset", "aim-tiny", "--image-size", "32", "--batch-size", "2", "--warmup", "1", "--repeats", "2"]


def run_benchmark(*args, check_rc=0):
    return run_script("scripts/benchmark.py", *args, check_rc=check_rc, timeout=600)


def test_json_report_with_torch_and_training():
    proc = run_benchmark(*TINY, "--train", "--compare-torch", "--json")
    result = last_json(proc.stdout)
    assert result["machine"]["torch"]["version"]
    assert set(result["matmul_peak_gflops"]) == {"mlx", "torch"}
    inference, training = result["runs"]
    assert inference["task"] == "inference" and training["task"] == "pretraining step"
    assert set(inference["timings"]) == {"mlx", "torch"}
    assert set(training["timings"]) == {"mlx", "torch", benchmark.TORCH_COUNTED_ROWS}  # Apple's step, and like with like
    for run in (inference, training):
        for t in run["timings"].values():
            assert len(t["times_s"]) == 2 and t["median_s"] > 0
            assert t["images_per_s"] == pytest.approx(2 / t["median_s"])
        assert run["ratio_mlx_over_torch"] == pytest.approx(
            run["timings"]["mlx"]["images_per_s"] / run["timings"]["torch"]["images_per_s"])
    # Same model, same weights: the two frameworks agree on the output and on the first loss.
    assert inference["max_rel_diff"] < 1e-4
    for name in ("torch", benchmark.TORCH_COUNTED_ROWS):
        assert training["first_losses"]["mlx"] == pytest.approx(training["first_losses"][name], rel=1e-4)
    t = training["timings"]
    assert training["ratio_mlx_over_torch_counted_rows"] == pytest.approx(
        t["mlx"]["images_per_s"] / t[benchmark.TORCH_COUNTED_ROWS]["images_per_s"])
    config = get_config("aim-tiny", image_size=32)
    assert inference["flops"] == benchmark.inference_flops(config, 2)
    assert training["flops"] == benchmark.pretraining_flops(config, 2)
    # The heads on the counted rows do less work: each step's GFLOP/s counts its own rows.
    rows = training["head_rows"]
    assert rows["all"] == 2 * 16 and 1 <= rows["counted"] <= rows["mlx"] <= 2 * 15
    assert training["flops_by_framework"] == {
        "mlx": benchmark.pretraining_flops(config, 2, rows["mlx"]),
        benchmark.TORCH_COUNTED_ROWS: benchmark.pretraining_flops(config, 2, rows["counted"])}
    assert t["mlx"]["gflops"] == pytest.approx(training["flops_by_framework"]["mlx"] / t["mlx"]["median_s"] / 1e9)
    assert result["memory"]["peak_rss_bytes"] > result["memory"]["peak_mlx_bytes"] > 0


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_finetune_step_against_torch(mode):
    config = get_config("aim-tiny", image_size=32)
    run = benchmark.bench_finetune(config, 2, mode, compare_torch=True, warmup=1, repeats=2)
    assert run["task"] == f"fine-tuning step ({mode})" and set(run["timings"]) == {"mlx", "torch"}
    # The same step: equal losses before and after one update (adapters' B = 0 at first, then AdamW moved both).
    for key in ("first_losses", "second_losses"):
        assert run[key]["mlx"] == pytest.approx(run[key]["torch"], rel=1e-4)
    assert run["second_losses"]["mlx"] != run["first_losses"]["mlx"]
    assert run["flops"] == (3 if mode == "full" else 2) * benchmark.inference_flops(config, 2)
    width, depth, classes = config.width, config.depth, benchmark.FINETUNE_CLASSES
    adapters = depth * 8 * (3 * (width + width) + (width + width))  # rank 8: q, k, v pairs and proj's
    head = 2 * width * width + width + width * classes  # k, v, the class token (1, 1, width), linear (no bias)
    if mode == "lora":
        assert run["trainable_parameters"] == adapters + head
    else:
        assert run["trainable_parameters"] > 10 * (adapters + head)


def test_finetune_qlora_from_the_command_line():
    proc = run_benchmark(*TINY, "--finetune", "lora", "--quantize", "4", "--json")
    (run,) = last_json(proc.stdout)["runs"]
    assert run["task"] == "fine-tuning step (QLoRA)" and run["quantization"]["bits"] == 4
    assert set(run["timings"]) == {"mlx"} and run["timings"]["mlx"]["median_s"] > 0
    proc = run_benchmark(*TINY, "--finetune", "full", "--quantize", "4", check_rc=None)
    assert proc.returncode == 2 and "QLoRA is lora" in proc.stderr


def test_finetune_memory_suite_row(tmp_path):
    rows = benchmark.finetune_memory_suite([("aim-tiny", "lora", 4, 2, True)], work_dir=str(tmp_path), steps=1)
    (row,) = rows
    assert (row["preset"], row["mode"], row["bits"], row["batch_size"], row["grad_checkpoint"]) == (
        "aim-tiny", "QLoRA", 4, 2, True)
    assert row["peak_rss_bytes"] > row["weight_bytes_on_disk"] > 0 and row["step_s"] > 0
    assert row["trainable_parameters"] > 0
    assert list(tmp_path.iterdir()) == []  # folders are removed once measured
    assert "QLoRA 4-bit" in benchmark_cli.format_finetune_memory(rows)


def test_table_for_a_quantized_model_without_torch():
    proc = run_benchmark(*TINY, "--quantize", "4", "--threads", "1")
    out = proc.stdout
    assert "float32 matmul peak (2048^3): mlx" in out and "torch" not in out
    assert "inference  aim-tiny 32px  mlx" in out and "float32 q4" in out
    assert "peak memory:" in out


def test_bad_arguments_are_refused():
    proc = run_benchmark(*TINY, "--train", "--quantize", "4", check_rc=None)
    assert proc.returncode != 0 and "drop --quantize" in proc.stderr
    proc = run_benchmark("--preset", "aim-huge", check_rc=None)
    assert proc.returncode != 0 and "aim-huge" in proc.stderr
    proc = run_benchmark(*TINY, "--threads", "0", check_rc=None)
    assert proc.returncode != 0 and "--threads" in proc.stderr


def test_compare_torch_outside_a_clone_names_what_it_needs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(benchmark, "REFERENCE_DIR", tmp_path)  # as installed from a wheel: no benchmarks/ folder
    assert benchmark_cli.main([*TINY, "--compare-torch"]) == 2  # a load error: the convention's exit status
    refused = capsys.readouterr().err
    assert "benchmarks/torch_reference.py" in refused and "clone" in refused


def test_inference_flops_by_hand():
    c = get_config("aim-600M")
    n, d, h = 256, 1536, 6144
    block = 2 * n * d * (4 * d + 2 * h) + 4 * n * n * d
    probe = 4 * n * d * d + 4 * n * d + 2 * d * 1000
    assert benchmark.inference_flops(c, 3) == 3 * (2 * n * 588 * d + 20 * block + probe)  # blocks 0..19
    small = get_config("aim-small")
    head = 2 * n * 384 * 512 + 12 * 4 * n * 512 * 2048 + 2 * n * 512 * 588
    trunk = 2 * n * 588 * 384 + 12 * (2 * n * 384 * (4 * 384 + 2 * 1536) + 4 * n * n * 384)
    assert benchmark.pretraining_flops(small, 2) == 3 * 2 * (trunk + head)
    assert benchmark.pretraining_flops(small, 2, head_rows=100) == 3 * (2 * trunk + 100 * head // n)


def test_time_calls_alternates_and_reports_medians():
    calls = []
    timed = benchmark.time_calls({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=2, repeats=3)
    # first call of each, one more warm-up each, then rounds a b / b a / a b
    assert calls == ["a", "a", "b", "b", "a", "b", "b", "a", "a", "b"]
    assert all(len(t["times_s"]) == 3 and t["min_s"] <= t["median_s"] for t in timed.values())
    calls.clear()
    timed = benchmark.time_calls({"a": lambda: calls.append("a")}, warmup=0, repeats=1)
    assert calls == ["a"] and timed["a"]["times_s"] == [timed["a"]["first_s"]]


def test_random_folder_is_written_tensor_by_tensor_and_loads(tmp_path):
    config = get_config("aim-tiny", image_size=32)
    folder = benchmark.write_random_model(tmp_path / "q4", config, quantize=4)
    model = mlx_aim.load(folder)
    assert model.config.quantization == {"bits": 4, "group_size": 64}
    assert model.trunk.blocks[0].mlp.fc1.weight.dtype == mx.uint32
    images = mx.array(benchmark.random_images(config, 2))
    logits = model(images)
    assert logits.shape == (2, 1000)
    twin = dequantized_twin(model)  # what the 4-bit model must compute: its dequantized weights, in float
    assert rel_err(np.array(logits), np.array(twin(images))) < TWIN_TOLERANCE["float32"]
    # The same seed writes the same weights; float_weights dequantizes what the quantized layers hold.
    again = mlx_aim.load(benchmark.write_random_model(tmp_path / "again", config, quantize=4))
    a, b = benchmark.float_weights(model), benchmark.float_weights(again)
    assert a.keys() == b.keys() and "trunk.blocks.0.mlp.fc1.weight" in a and not any(k.endswith(".scales") for k in a)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(FileExistsError):
        benchmark.write_random_model(tmp_path / "q4", config, quantize=4)


def test_memory_suite_row(tmp_path):
    rows = benchmark.memory_suite([("aim-tiny", "bfloat16", None)], work_dir=str(tmp_path))
    (row,) = rows
    assert row["preset"] == "aim-tiny" and row["dtype"] == "bfloat16"
    assert row["weight_bytes_on_disk"] >= row["weight_bytes_in_memory"] > 0
    assert row["peak_rss_bytes"] > row["weight_bytes_on_disk"]
    assert list(tmp_path.iterdir()) == []  # folders are removed once measured
    assert "aim-tiny" in benchmark_cli.format_memory(rows)


def test_block_profile_times_every_variant_and_restores_the_layers():
    import bench_kernels  # benchmarks/bench_kernels.py (conftest puts benchmarks/ on sys.path)

    from mlx_aim.models import layers

    rows = []
    gelu, attention = layers.gelu, layers.qkv_attention
    bench_kernels.block_profile(lambda kind, what, seconds: rows.append((kind, what, seconds)), reps=1,
                                with_torch=False)
    assert layers.gelu is gelu and layers.qkv_attention is attention
    variants = ["whole", "without GELU", "without attention core", "linears' matmuls only"]
    expected = [f"4x256x{dim} {v}" for dim, _ in bench_kernels.BLOCK_SHAPES for v in variants]
    assert [what for _, what, _ in rows] == expected
    assert all(kind == "block fwd+bwd" and seconds > 0 for kind, _, seconds in rows)


def test_long_attention_benchmark_times_both_kernels_and_their_memory():
    import bench_long_attention  # benchmarks/bench_long_attention.py

    with mx.stream(mx.cpu):
        row = bench_long_attention.measure(tokens=600, heads=2, dim=16, rounds=1)
    assert row["tokens"] == 600
    for mode in ("forward", "backward"):
        for kernel in ("dense", "blocked"):
            assert row[f"{mode}_{kernel}_ms"] > 0
        # the dense path holds 2 x 600 x 600 float32 weights, the blocked one never does
        assert row[f"{mode}_dense_peak_mib"] > 2 * 600 * 600 * 4 / 2**20 > row[f"{mode}_blocked_peak_mib"]


# ----------------------------------------------------------------------------------------------------
# AIMv2: the encoder against transformers' Aimv2VisionModel


def tiny_aimv2(native: bool) -> AIMv2Config:
    return AIMv2Config(image_size=None if native else 16, patch_size=4, width=64, depth=3, num_heads=2, hidden_dim=128,
                       name="tiny-v2")


@pytest.mark.parametrize("native, size, patches", [(False, None, 16), (True, 20, 25)], ids=["fixed", "native"])
def test_aimv2_encoder_against_transformers(native, size, patches):
    result = benchmark.measure(config=tiny_aimv2(native), image_size=size, batch_size=2, compare_torch=True,
                               warmup=1, repeats=2)
    (run,) = result["runs"]
    assert run["task"] == "encoder" and run["native"] is native and run["num_patches"] == patches
    assert run["image_size"] == (size or 16) and set(run["timings"]) == {"mlx", "torch"}
    assert run["max_rel_diff"] < 1e-5  # the same weights in transformers' model: the same tokens
    grid = (run["image_size"] // 4,) * 2
    assert run["flops"] == benchmark.encoder_flops(tiny_aimv2(native), 2, grid)
    assert run["ratio_mlx_over_torch"] == pytest.approx(
        run["timings"]["mlx"]["images_per_s"] / run["timings"]["torch"]["images_per_s"])


def test_encoder_flops_by_hand():
    c = get_config("aimv2-large-patch14-224")
    n, d, h = 256, 1024, 2816
    block = 2 * n * d * (4 * d + 3 * h) + 4 * n * n * d
    assert benchmark.encoder_flops(c, 2, (16, 16)) == 2 * (2 * n * 588 * d + 24 * block)


def test_aimv2_folder_from_the_command_line(tmp_path):
    """A random AIMv2 folder written tensor by tensor (as --memory-suite aimv2 writes aimv2-3B), timed through
    --weights against transformers; a native model's input size and max_patches come from the options."""
    folder = benchmark.write_random_model(tmp_path / "native-q4", tiny_aimv2(native=True), quantize=4)
    model = mlx_aim.load(folder)
    assert isinstance(model, mlx_aim.AIMv2) and model.config.quantization == {"bits": 4, "group_size": 64}
    common = ["--weights", folder, "--batch-size", "1", "--warmup", "1", "--repeats", "1"]
    result = last_json(run_benchmark(*common, "--image-size", "24", "--compare-torch", "--json").stdout)
    (run,) = result["runs"]
    assert run["task"] == "encoder" and run["image_size"] == 24 and run["num_patches"] == 36
    assert run["quantization"] == {"bits": 4, "group_size": 64}
    assert run["max_rel_diff"] < 1e-5  # transformers runs the dequantized weights the 4-bit layers multiply by
    table = run_benchmark(*common, "--image-size", "24").stdout
    assert "encoder  tiny-v2 24px  mlx" in table and "36 patches per image (native resolution)" in table
    refused = run_benchmark(*common, "--image-size", "24", "--max-patches", "30", check_rc=2)
    assert "max_patches=30" in refused.stderr and "Traceback" not in refused.stderr
    refused = run_benchmark("--preset", "aimv2-large-patch14-224", "--train", check_rc=2)
    assert "no pre-training model" in refused.stderr
    assert set(benchmark.MEMORY_SUITES["aimv2"]) == {("aimv2-3B-patch14-224", "bfloat16", None),
                                                     ("aimv2-3B-patch14-224", "float32", 4)}
    assert benchmark_cli.build_parser().parse_args(["--memory-suite"]).memory_suite == "aim"
    assert benchmark_cli.build_parser().parse_args(["--memory-suite", "aimv2"]).memory_suite == "aimv2"


def tiny_lit():
    from mlx_aim.models.config import AIMv2LiTConfig

    image = AIMv2Config(image_size=32, patch_size=8, width=32, depth=2, num_heads=2, hidden_dim=64)
    return AIMv2LiTConfig(image=image, text_width=32, text_depth=2, text_num_heads=2, text_hidden_dim=64,
                          projection_dim=16, vocab_size=1000, eos_token_id=999, name="tiny-lit")


def test_lit_towers_against_transformers():
    """The LiT's two towers timed apart, each against transformers' Aimv2Model on the same weights (its text attention
    made causal): the same unit-length embeddings, images/s for one, texts/s for the other."""
    result = benchmark.measure(config=tiny_lit(), batch_size=2, text_batch_size=3, compare_torch=True, warmup=1,
                               repeats=2)
    image, text = result["runs"]
    assert (image["task"], image["batch_size"], text["task"], text["batch_size"]) == (
        "lit image tower", 2, "lit text tower (texts)", 3)
    for run in (image, text):
        assert set(run["timings"]) == {"mlx", "torch"} and run["max_rel_diff"] < 1e-5
    assert text["flops"] == benchmark.text_flops(tiny_lit(), 3)
    assert image["flops"] == benchmark.encoder_flops(tiny_lit().image, 2, (4, 4))
    table = benchmark_cli.format_table(result)
    assert "tiny-lit 77 tokens" in table and "tiny-lit 32px" in table


def test_lit_folder_quantized_from_the_command_line(tmp_path):
    folder = benchmark.write_random_model(tmp_path / "lit-q4", tiny_lit().replace(projection_dim=64), quantize=4)
    result = last_json(run_benchmark("--weights", folder, "--batch-size", "1", "--text-batch-size", "2", "--warmup",
                                     "1", "--repeats", "1", "--json").stdout)
    assert [r["task"] for r in result["runs"]] == ["lit image tower", "lit text tower (texts)"]
    assert all(r["quantization"] == {"bits": 4, "group_size": 64} for r in result["runs"])
    assert "lit" in benchmark.MEMORY_SUITES
    assert isinstance(benchmark.model_config("aimv2-large-patch14-224-lit"), type(tiny_lit()))


def test_end_to_end_report(tmp_path):
    """benchmarks/bench_end_to_end.py on a handful of small photos, JPEG and HEIC mixed, with aim-tiny: the report's
    structure, and that every photo went through both jobs."""
    proc = run_script("benchmarks/bench_end_to_end.py", "--preset", "aim-tiny", "--num-images", "5",
                      "--photo-size", "160x120", "--batch-size", "2", "--decode-images", "3", "--format", "mixed",
                      "--workdir", tmp_path, "--json", timeout=600)
    report = last_json(proc.stdout)
    assert report["machine"]["backend_path"] and report["machine"]["cpu_model"] and "blas" in report["machine"]
    blas = report["machine"]["blas"]
    assert not blas["loaded"] or blas["binding"] in ("shim", "global")  # how MLX got the library, with the figures
    assert report["settings"]["photo_sizes"] == [[160, 120], [120, 160]]
    photos = sorted((tmp_path / "photos-160x120-q90").glob("*.*"))
    assert [p.suffix for p in photos] == [".jpg", ".jpg", ".heic", ".heic", ".jpg"]  # two of each in turn
    from mlx_aim.data import load_image

    assert [load_image(p).size for p in photos[:4]] == [(160, 120), (120, 160)] * 2
    assert Image.open(photos[0]).format == "JPEG"
    assert {kind: d["images"] for kind, d in report["decode"].items()} == {"jpeg": 3, "heic": 2}
    assert all(d["mean_seconds"] > 0 and d["load_image_mean_seconds"] > 0 and d["load_image_cpu_mean_seconds"] > 0
               for d in report["decode"].values())
    for job in ("classify", "extract_features"):
        row = report[job]
        assert row["num_images"] == 5
        assert 0 < row["images_per_second"] <= row["model_images_per_second"]
        assert row["ratio"] == pytest.approx(row["images_per_second"] / row["model_images_per_second"], abs=1e-3)
    assert len(report["load_before"]["load_average"]) == 3
    assert "classify" in proc.stdout and "model images/s" in proc.stdout
