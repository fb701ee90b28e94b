"""Typed settings: the service's own and its security settings."""
