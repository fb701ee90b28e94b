"""Launchers for real local services (Kafka brokers, MongoDB) used by tests, demo and benchmarks."""

from .mongo import MongoServer
from .noida import NoidaBroker
from .ports import free_port
from .process import ManagedProcess, ServiceError
from .tansu import TansuBroker
from .topics import create_topics, kafka_ready

__all__ = [
    "ManagedProcess",
    "MongoServer",
    "NoidaBroker",
    "ServiceError",
    "TansuBroker",
    "create_topics",
    "free_port",
    "kafka_ready",
]
