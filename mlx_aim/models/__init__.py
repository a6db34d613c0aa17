"""The models: their configs (`config`), the layers they are built from (`layers`), AIM, AIMv2 and AIMv2-LiT
(`model`), the pre-training objective (`objective`) and the LiT's CLIP tokenizer (`tokenizer`). Nothing here reads a
checkpoint, an image file or a run folder: `mlx_aim.checkpoints` fills these models with weights."""
