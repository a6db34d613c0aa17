"""What a user does with a trained model: classify (`classify`) and extract features (`features`), both over the
image-encoding pipeline (`encode`), with a model opened for them (`inference`), zero-shot classification and the LiT's
embeddings (`zeroshot`, `lit`), photo search (`search`), feature shards on disk (`shards`) and pictures
(`visualize`)."""
