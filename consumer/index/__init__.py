"""The in-memory feature index: storage, ranking, the int8 kernel, snapshots."""
