"""Training: the run scaffold shared by every job that trains (`runs`: resumable folders, atomic checkpoints, the log,
the divergence error), the optimizer and its schedule (`optim`), pre-training (`pretrain`) and the attentive probe
(`probe`)."""
