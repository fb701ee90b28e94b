"""Publish a search and print the ranked reply (matched by correlation id, with a timeout).

python -m producer_examples.search "red t-shirt" --top-k 3 --category apparel
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
from pathlib import Path
from typing import Any

from producer_examples.client import SearchClient


def format_reply(query: str, reply: dict[str, Any]) -> str:
    if reply.get("status") != "ok":
        return f"{query!r}: error {reply['error']['code']}: {reply['error']['message']}"
    lines = [f"{query!r} ({reply['timings']['total_ms']:.0f} ms, model {reply['model_id']}):"]
    for item in reply["items"]:
        price = "" if item.get("price") is None else f"  {item['price']:.2f}"
        lines.append(f"  {item['rank']:>2}. {item['score']:.3f}  {item['product_id']}  {item['name']}{price}")
    if not reply["items"]:
        lines.append("  (no products matched)")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    request: dict[str, Any] = {}
    if args.query:
        request["query_text"] = args.query
    if args.image:
        request["query_image_b64"] = base64.b64encode(args.image.read_bytes()).decode()
    if args.top_k:
        request["top_k"] = args.top_k
    filters = {
        k: v for k, v in (("category", args.category), ("min_price", args.min_price), ("max_price", args.max_price)) if v is not None
    }
    if filters:
        request["filters"] = filters
    async with SearchClient(args.bootstrap, args.topic, args.reply_topic) as client:
        return await client.search(request, timeout=args.timeout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("query", nargs="?", default="")
    parser.add_argument("--image", type=Path)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--category")
    parser.add_argument("--min-price", type=float)
    parser.add_argument("--max-price", type=float)
    parser.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "localhost:9092"))
    parser.add_argument("--topic", default=os.environ.get("SEARCH_REQUESTS_TOPIC", "search-requests"))
    parser.add_argument("--reply-topic", default=os.environ.get("REPLY_TOPIC", "search-results"))
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--json", action="store_true", help="print the raw reply")
    args = parser.parse_args()
    reply = asyncio.run(run(args))
    print(json.dumps(reply, indent=2) if args.json else format_reply(args.query or str(args.image), reply))


if __name__ == "__main__":
    main()
