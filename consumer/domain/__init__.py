"""What the service is about, with no I/O: the error tree and its wire codes, the wire names, the feature vector codec."""
