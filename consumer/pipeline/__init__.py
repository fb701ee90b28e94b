"""From records to outcomes, without Kafka: parsing, search and product handling, batching, backpressure."""
