"""What a user does with a trained model: classify and extract features (`inference`), zero-shot classification and
the LiT's embeddings (`zeroshot`, `lit`), photo search (`search`), feature shards on disk (`shards`) and pictures
(`visualize`)."""
