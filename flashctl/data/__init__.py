"""Training data: sources -> Arrow IPC shards + manifest.json -> batches.

`schema` (the one row schema), `jsonl` (user manifests), `shards` (deterministic shard
writer), `manifest` (manifest.json, `read_manifest`), `prepare` (`prepare_data`, the
`prepare-data` command) and `loader` (`ShardLoader`, the only module that imports torch).
Nothing is imported here, so `import flashctl.data.prepare` stays light.
"""
