"""The seed's documented approach, rebuilt faithfully for comparison (``python -m benchmarks.seed_baseline``).

One process; the full fp32 ``CLIPModel`` (transformers + torch) loaded at start; product
features as one fp32 matrix (the seed's cached tier); requests consumed one at a time from
Kafka, encoded alone (no batching), ranked with numpy, answered on ``reply_to`` with the
request id as correlation header, then committed. Configured by the same environment
variables as the service (bootstrap, topics, group, CLIP_MODEL) plus BENCH_PRODUCTS.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal

import numpy as np
import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from transformers import CLIPModel, CLIPTokenizerFast

from benchmarks.catalog import features, fields


async def serve() -> None:
    env = os.environ
    model_dir = env["CLIP_MODEL"]
    threads = env.get("TORCH_NUM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    n = int(env["BENCH_PRODUCTS"])
    tokenizer = CLIPTokenizerFast.from_pretrained(model_dir)
    model = CLIPModel.from_pretrained(model_dir).eval()
    matrix = features(n)
    names = [fields(i)["name"] for i in range(n)]
    consumer = AIOKafkaConsumer(
        env["SEARCH_REQUESTS_TOPIC"],
        bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"],
        group_id=env["CONSUMER_GROUP_ID"],
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=int(env.get("KAFKA_SESSION_TIMEOUT_MS", "10000")),
        heartbeat_interval_ms=int(env.get("KAFKA_HEARTBEAT_INTERVAL_MS", "3000")),
    )
    producer = AIOKafkaProducer(bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"], acks="all")
    await producer.start()
    await consumer.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("seed baseline consuming", flush=True)
    while not stop.is_set():
        batch = await consumer.getmany(timeout_ms=200, max_records=1)
        for tp, records in batch.items():
            for record in records:
                request = json.loads(record.value)
                tokens = tokenizer([request["query_text"]], padding=True, return_tensors="pt")
                with torch.no_grad():
                    query = model.get_text_features(**tokens).pooler_output[0].numpy()
                query /= np.linalg.norm(query)
                scores = matrix @ query
                top_k = int(request.get("top_k", 10))
                best = np.argsort(-scores)[:top_k]
                reply = {
                    "status": "ok",
                    "request_id": request["request_id"],
                    "items": [
                        {"rank": r + 1, "product_id": fields(int(i))["product_id"], "name": names[i], "score": float(scores[i])}
                        for r, i in enumerate(best)
                    ],
                }
                rid = request["request_id"].encode()
                await producer.send_and_wait(
                    request.get("reply_to", env["REPLY_TOPIC"]), json.dumps(reply).encode(), key=rid, headers=[("correlation_id", rid)]
                )
                await consumer.commit({tp: record.offset + 1})
    await consumer.stop()
    await producer.stop()


if __name__ == "__main__":
    asyncio.run(serve())
