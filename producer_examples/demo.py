"""The main job on an embedded default: a local broker, the service, the sample catalog, a few searches.

    ./run.sh demo      (or: python -m producer_examples.demo)

Uses ``CLIP_MODEL`` when it can be loaded (a local directory, or a hub id with
network access); otherwise it builds a tiny random-weights CLIP and says so
loudly: with random weights only exact matches rank meaningfully.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from devservices import TansuBroker, create_topics
from producer_examples.client import SearchClient, load_catalog, product_text, publish
from producer_examples.search import format_reply

REPO = Path(__file__).resolve().parents[1]
TOPICS = {
    "SEARCH_REQUESTS_TOPIC": "search-requests",
    "PRODUCT_UPDATES_TOPIC": "product-updated",
    "REPLY_TOPIC": "search-results",
    "DEAD_LETTER_TOPIC": "search-dead-letters",
    "FEATURES_TOPIC": "product-features",
}


def resolve_model() -> str:
    """``CLIP_MODEL`` if its config can be fetched within 30 s, else a tiny random model (with a loud notice)."""
    wanted = os.environ.get("CLIP_MODEL", "openai/clip-vit-base-patch32")
    probe = [sys.executable, "-c", "import sys; from consumer.encoder.manifest import model_config; model_config(sys.argv[1])", wanted]
    try:
        if subprocess.run(probe, capture_output=True, timeout=30).returncode == 0:
            return wanted
    except subprocess.TimeoutExpired:
        pass
    from consumer.tools.model_builder import build_random_clip

    tiny = build_random_clip(REPO / ".cache" / "models" / "tiny", size="tiny")
    bar = "!" * 78
    print(
        f"\n{bar}\n  CLIP_MODEL={wanted!r} could not be loaded (no network or hub access).\n"
        f"  Falling back to a TINY RANDOM-WEIGHTS CLIP at {tiny}.\n"
        f"  Rankings below are meaningless except exact matches (identical text or image).\n{bar}\n"
    )
    return str(tiny)


async def run_searches(bootstrap: str, catalog: list[dict]) -> None:
    async with SearchClient(bootstrap, TOPICS["SEARCH_REQUESTS_TOPIC"], TOPICS["REPLY_TOPIC"]) as client:
        deadline = time.monotonic() + 120
        while True:
            probe = await client.search({"query_text": "probe", "top_k": 100, "similarity_threshold": -1})
            if len(probe["items"]) >= len(catalog):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"catalog not indexed after 120 s ({len(probe['items'])}/{len(catalog)})")
            await asyncio.sleep(0.2)
        text_product = next(p for p in catalog if "image_b64" not in p)
        image_product = next(p for p in catalog if "image_b64" in p)
        searches = [
            (f"text: {product_text(text_product)!r}", {"query_text": product_text(text_product), "top_k": 3}),
            (
                "text: 'comfortable shoes', footwear only",
                {"query_text": "comfortable shoes", "top_k": 3, "filters": {"category": "footwear"}},
            ),
            (
                "text: 'gift under 20'",
                {"query_text": "gift under 20", "top_k": 3, "filters": {"max_price": 20}, "similarity_threshold": -1},
            ),
            (f"image of {image_product['product_id']}", {"query_image_b64": image_product["image_b64"], "top_k": 3}),
            ("invalid: top_k 10000", {"query_text": "anything", "top_k": 10000}),
        ]
        for label, request in searches:
            print(format_reply(label, await client.search(request)))


def main() -> None:
    model = resolve_model()
    catalog = load_catalog()
    with TansuBroker() as broker:
        bootstrap = broker.bootstrap
        asyncio.run(create_topics(bootstrap, list(TOPICS.values()), partitions=1))
        env = (
            os.environ
            | TOPICS
            | {
                "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                "CLIP_MODEL": model,
                "MODEL_CACHE_DIR": os.environ.get("MODEL_CACHE_DIR", str(REPO / ".cache")),
                "KAFKA_SESSION_TIMEOUT_MS": "1500",
                "KAFKA_HEARTBEAT_INTERVAL_MS": "250",
            }
        )
        service = subprocess.Popen([sys.executable, "-m", "consumer"], env=env)
        try:
            print(f"broker on {bootstrap}; service pid {service.pid}; publishing {len(catalog)} products")
            asyncio.run(publish(bootstrap, TOPICS["PRODUCT_UPDATES_TOPIC"], catalog, key_field="product_id"))
            asyncio.run(run_searches(bootstrap, catalog))
        finally:
            service.send_signal(signal.SIGTERM)
            service.wait(30)
    print("demo finished")


if __name__ == "__main__":
    main()
