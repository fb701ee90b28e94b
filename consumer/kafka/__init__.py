"""The Kafka side: client construction and publishing, the service loop, the features-topic follower."""
