"""Training: the run scaffold shared by every job that trains (`runs`: resumable folders, atomic checkpoints, the log,
AdamW and its schedule), pre-training (`pretrain`) and the attentive probe (`probe`)."""
