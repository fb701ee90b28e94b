"""Publish the sample catalog (or a JSON file of products) as ProductUpdated events.

python -m producer_examples.publish_catalog --bootstrap 127.0.0.1:9092
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from producer_examples.client import CATALOG, load_catalog, publish


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "localhost:9092"))
    parser.add_argument("--topic", default=os.environ.get("PRODUCT_UPDATES_TOPIC", "product-updated"))
    parser.add_argument("--catalog", type=Path, default=CATALOG)
    args = parser.parse_args()
    events = load_catalog(args.catalog)
    asyncio.run(publish(args.bootstrap, args.topic, events, key_field="product_id"))
    print(f"published {len(events)} products to {args.topic}")


if __name__ == "__main__":
    main()
