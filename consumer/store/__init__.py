"""The MongoDB product store."""
