"""Runnable publishers and reply readers for the CLIP search service."""
