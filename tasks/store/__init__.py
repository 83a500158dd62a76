"""The soft-target store: what the teacher's outputs become on disk (or S3), and how they are read back.

    store.py       SoftTargetStore: the entry's layout, manifest, reads, checksums, listing; cache_key
    precompute.py  filling an entry: the teacher's forward as Ray tasks (or warm calls), shards, manifest
    shards.py      one shard's bytes: a block of rows <-> a Parquet file
    formats.py     how targets are kept: dense logits, or top-k + the tail's log-mass
"""
