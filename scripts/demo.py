"""The main job on a built-in default: for now, a tiny AIM on a generated image (no download)."""

import argparse
import json
import time

import mlx.core as mx
import numpy as np

import mlx_aim
from mlx_aim.data import eval_transform


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    config = mlx_aim.get_config("aim-tiny")
    model = mlx_aim.build_model(config)
    pixels = (np.indices((96, 128)).sum(0) % 32 * 8).astype(np.uint8)
    image = eval_transform(np.stack([pixels, pixels[::-1], pixels[:, ::-1]], -1), config.image_size)
    start = time.perf_counter()
    normed, blocks = model.extract_features(mx.array(image)[None])
    logits = model(mx.array(image)[None])
    mx.eval(normed, logits)
    seconds = time.perf_counter() - start
    print(f"aim-tiny (random weights): {len(blocks)} blocks, tokens {tuple(normed.shape)}, "
          f"logits {tuple(logits.shape)}, {seconds * 1000:.0f} ms")
    if args.json:
        print(json.dumps({"blocks": len(blocks), "tokens": list(normed.shape), "ms": round(seconds * 1000, 1)}))


if __name__ == "__main__":
    main()
