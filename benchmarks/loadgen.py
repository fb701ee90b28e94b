"""Load generator for the search service, run as its own process (``python -m benchmarks.loadgen``).

Modes: ``single`` (one request), ``closed`` (N workers, each waits for its reply before the
next request: maximum sustained throughput), ``open`` (requests at a fixed rate whatever the
replies do: latency at a given load). Latency is send start -> reply received, matched by the
``correlation_id`` header. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import numpy as np

from producer_examples.client import SearchClient

WORDS = (
    "red blue green black white leather cotton wooden steel vintage modern slim waterproof wireless "
    "running shoes rain jacket desk lamp office chair backpack watch headphones kettle mug sofa"
).split()


def query_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.sample(WORDS, rng.randint(2, 6))) for _ in range(n)]


def summarise(latencies: list[float], sent: int, errors: int, elapsed: float) -> dict:
    arr = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "sent": sent,
        "received": len(latencies),
        "errors": errors,
        "elapsed_s": round(elapsed, 3),
        "throughput_per_s": round(len(latencies) / elapsed, 2) if elapsed > 0 else None,
        "p50_ms": round(float(np.percentile(arr, 50)), 2),
        "p90_ms": round(float(np.percentile(arr, 90)), 2),
        "p99_ms": round(float(np.percentile(arr, 99)), 2),
        "max_ms": round(float(np.max(arr)), 2),
        "mean_ms": round(float(np.mean(arr)), 2),
    }


async def run(args: argparse.Namespace) -> dict:
    texts = query_texts(max(args.requests, 1000), args.seed)
    latencies: list[float] = []
    errors = 0
    async with SearchClient(args.bootstrap, args.topic, args.reply_topic) as client:

        async def one(i: int) -> None:
            nonlocal errors
            started = time.perf_counter()
            try:
                reply = await client.search({"query_text": texts[i % len(texts)], "top_k": args.top_k}, timeout=args.timeout)
            except TimeoutError:
                errors += 1
                return
            if reply.get("status") != "ok":
                errors += 1
                return
            latencies.append(time.perf_counter() - started)

        start = time.perf_counter()
        if args.mode == "single":
            await one(0)
            sent = 1
        elif args.mode == "closed":
            counter = iter(range(10**9))
            end = start + args.duration

            async def worker() -> int:
                n = 0
                while time.perf_counter() < end:
                    await one(next(counter))
                    n += 1
                return n

            sent = sum(await asyncio.gather(*(worker() for _ in range(args.concurrency))))
        else:
            total = int(args.rate * args.duration)
            tasks = []
            for i in range(total):
                due = start + i / args.rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)
            sent = total
        elapsed = time.perf_counter() - start
    return summarise(latencies, sent, errors, elapsed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--reply-topic", required=True)
    p.add_argument("--mode", choices=["single", "closed", "open"], required=True)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rate", type=float, default=20.0)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=1)
    print(json.dumps(asyncio.run(run(p.parse_args()))))


if __name__ == "__main__":
    main()
