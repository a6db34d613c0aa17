"""A tiny AIMv2-LiT with random weights and CLIP's real tokenizer files, written as an MLX model folder: what the
zero-shot, search and LiT-use tests load, as a user would load a converted LiT."""

from pathlib import Path

from clip_vocab import write_clip_tokenizer_files
from mlx_aim.apps.benchmark import write_random_model
from mlx_aim.models.config import AIMv2Config, AIMv2LiTConfig


def tiny_lit_config(image_size: int = 32) -> AIMv2LiTConfig:
    """A LiT small enough for the default suite, reading CLIP's vocabulary (49408 ids, end token 49407)."""
    image = AIMv2Config(image_size=image_size, patch_size=8, width=32, depth=2, num_heads=2, hidden_dim=64)
    return AIMv2LiTConfig(image=image, text_width=32, text_depth=2, text_num_heads=2, text_hidden_dim=64,
                          projection_dim=16)


def write_tiny_lit(folder: Path, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny random-weight LiT folder with CLIP's `vocab.json` and `merges.txt` beside its weights."""
    write_random_model(folder, tiny_lit_config(image_size), seed=seed)
    write_clip_tokenizer_files(folder)
    return folder
