"""Publish one product update (or a delete).

python -m producer_examples.publish_update --product-id p-100 --version 1 --name "Blue mug" --category kitchen
python -m producer_examples.publish_update --product-id p-100 --version 2 --delete
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
from pathlib import Path

from producer_examples.client import publish


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "localhost:9092"))
    parser.add_argument("--topic", default=os.environ.get("PRODUCT_UPDATES_TOPIC", "product-updated"))
    parser.add_argument("--product-id", required=True)
    parser.add_argument("--version", type=int, required=True)
    parser.add_argument("--name", default="")
    parser.add_argument("--description", default="")
    parser.add_argument("--category")
    parser.add_argument("--price", type=float)
    parser.add_argument("--image", type=Path, help="image file sent inline as base64")
    parser.add_argument("--delete", action="store_true")
    args = parser.parse_args()
    event = {"product_id": args.product_id, "version": args.version, "deleted": args.delete}
    if not args.delete:
        event |= {"name": args.name, "description": args.description, "category": args.category, "price": args.price}
        if args.image:
            event["image_b64"] = base64.b64encode(args.image.read_bytes()).decode()
    asyncio.run(publish(args.bootstrap, args.topic, [event], key_field="product_id"))
    print(f"published {'delete' if args.delete else 'update'} of {args.product_id} v{args.version}")


if __name__ == "__main__":
    main()
