"""Figures of the reward service on the real broker, with the synthetic stream (users like answers that end
in "!").

    rlhf-online kafka start
    .venv/bin/python benchmarks/reward_throughput.py --kafka-bootstrap 127.0.0.1:19092 \
        --backlog 2000 --rate 10

1. Throughput: a backlog of `--backlog` joined ratings is waiting in Kafka; the service (in this process)
   absorbs it; labelled events/s = backlog / (time from its first record consumed to the last rating applied).
2. Latency and learning: ratings produced in real time at `--rate`/s for `--duration-s`, each stamped with the
   time it was produced; rating-to-update latency = end of the update that applied it - that stamp (the
   FeedbackEvent timestamp is when SubmitFeedback accepted it, so through the inference service this is the
   same span minus the broker acknowledgement). Held-out accuracy is printed against ratings seen.
Each phase uses fresh topics and a fresh registry. Prints one JSON object. The reward-model shape flags
(`--backbone-layers`, `--trainable-layers`, `--max-length`, `--steps-per-update`) are the service's.
"""

import argparse
import json
import logging
import random
import tempfile
import time
import uuid
from pathlib import Path

from bench_server import percentile

from rlhf_online import contract
from rlhf_online.broker.clients import ensure_topics, make_producer, wait_for_broker
from rlhf_online.reward.config import RewardConfig
from rlhf_online.reward.service import create_service
from rlhf_online.reward.synthetic import synthetic_examples, to_events
from rlhf_online.topics import Topics

log = logging.getLogger(__name__)


def _service(args, root: Path, topics: Topics):
    config = RewardConfig(
        kafka_bootstrap=args.kafka_bootstrap,
        topic_prefix=topics.prefix,
        registry_dir=str(root / "registry"),
        grpc_port=0,
        metrics_port=-1,
        base_model_dir=args.base_model_dir,
        torch_threads=args.torch_threads,
        eval_every_updates=args.eval_every_updates,
        checkpoint_every_updates=args.checkpoint_every_updates,
        steps_per_update=args.steps_per_update,
        backbone_layers=args.backbone_layers,
        trainable_layers=args.trainable_layers,
        max_length=args.max_length,
    )
    return create_service(config)


def _fresh_topics(args) -> Topics:
    topics = Topics(prefix=f"bench{uuid.uuid4().hex[:8]}")
    ensure_topics(args.kafka_bootstrap, topics, partitions=2)
    return topics


def _send(producer, topics: Topics, example, timestamp_ms: int | None = None) -> None:
    interaction, feedback = to_events(example, timestamp_ms)
    key = example.response_id.encode()
    producer.send(topics.interactions, key=key, value=interaction.SerializeToString())
    producer.send(topics.feedback, key=key, value=feedback.SerializeToString())


def throughput(args, root: Path) -> dict:
    topics = _fresh_topics(args)
    producer = make_producer(args.kafka_bootstrap, client_id="reward-bench")
    for ex in synthetic_examples(args.backlog, seed=11, noise=0.1):
        _send(producer, topics, ex)
    producer.flush()
    producer.close()
    service = _service(args, root / "throughput", topics)
    service.start()
    try:
        service.wait_until(lambda s: s.records_consumed > 0, timeout_s=120)
        started, cpu_started = time.monotonic(), time.process_time()
        done = service.wait_until(lambda s: s.examples_applied >= args.backlog, timeout_s=args.backlog)
        elapsed, cpu = time.monotonic() - started, time.process_time() - cpu_started
    finally:
        service.stop()
    return {
        "backlog": args.backlog,
        "applied": service.examples_applied,
        "complete": done,
        "seconds": round(elapsed, 2),
        "labelled_events_per_s": round(service.examples_applied / elapsed, 1),
        "cpu_seconds": round(cpu, 1),  # of this whole process (service threads + Kafka client)
        "labelled_events_per_cpu_s": round(service.examples_applied / cpu, 1),
        "updates": service.learner.updates,
    }


def latency_and_learning(args, root: Path) -> dict:
    topics = _fresh_topics(args)
    producer = make_producer(args.kafka_bootstrap, client_id="reward-bench")
    service = _service(args, root / "latency", topics)
    service.start()
    examples = synthetic_examples(int(args.rate * args.duration_s) + 1, seed=12, noise=0.1)
    rng = random.Random(0)
    try:
        service.wait_until(lambda s: bool(s.offsets.owned), timeout_s=60)
        started = time.monotonic()
        for i, ex in enumerate(examples):
            wait = started + i / args.rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            _send(producer, topics, ex, contract.now_ms())
            if rng.random() < 0.05:
                producer.flush()
        producer.flush()
        service.wait_until(lambda s: s.examples_applied >= len(examples), timeout_s=60)
    finally:
        producer.close()
        service.stop()
    lat = list(service.latencies_s)
    return {
        "rate_per_s": args.rate,
        "ratings": len(examples),
        "applied": service.examples_applied,
        "latency_p50_s": round(percentile(lat, 50), 3) if lat else None,
        "latency_p95_s": round(percentile(lat, 95), 3) if lat else None,
        "heldout_vs_seen": [
            (int(h["examples_seen"]), round(h["accuracy"], 3), round(h["auc"], 3), int(h["n"]))
            for h in service.eval_history
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kafka-bootstrap", default="127.0.0.1:19092")
    parser.add_argument("--base-model-dir", default="", help="default: the tiny preset")
    parser.add_argument("--backlog", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--duration-s", type=float, default=120.0)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--eval-every-updates", type=int, default=10)
    parser.add_argument("--checkpoint-every-updates", type=int, default=20)
    parser.add_argument("--steps-per-update", type=int, default=2)
    parser.add_argument("--backbone-layers", type=int, default=-1, help="the demo's tiny-model setting: 0")
    parser.add_argument("--trainable-layers", type=int, default=2, help="the demo's tiny-model setting: -1")
    parser.add_argument("--max-length", type=int, default=256, help="the demo's tiny-model setting: 40")
    parser.add_argument("--skip", choices=["throughput", "latency"], default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)
    wait_for_broker(args.kafka_bootstrap)
    with tempfile.TemporaryDirectory(prefix="reward-bench-") as tmp:
        result = {}
        if args.skip != "throughput":
            result["throughput"] = throughput(args, Path(tmp))
        if args.skip != "latency":
            result["latency"] = latency_and_learning(args, Path(tmp))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
