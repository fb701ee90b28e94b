"""Kafka-native, memory-frugal CLIP product search."""
