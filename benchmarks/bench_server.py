"""What the inference benchmarks share: a real inference server in this process (port 0, tiny model, CPU,
no metrics port) on topics of its own, and percentiles."""

import statistics
import tempfile
import uuid
from pathlib import Path

import torch

from rlhf_online.broker.clients import ensure_topics
from rlhf_online.engine.tiny_model import write_tiny_model
from rlhf_online.inference.config import InferenceConfig
from rlhf_online.inference.server import InferenceServer, create_server
from rlhf_online.topics import Topics


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


async def start_server(
    kafka_bootstrap: str, *, torch_threads: int, partitions: int = 2, **overrides
) -> tuple[InferenceServer, Topics, Path]:
    """The server (config fields in `overrides`), its topics and its scratch folder (registry, models)."""
    torch.set_num_threads(torch_threads)  # the service's default is 1
    topics = Topics(f"bench{uuid.uuid4().hex[:6]}")
    ensure_topics(kafka_bootstrap, topics, partitions=partitions)
    work = Path(tempfile.mkdtemp(prefix="rlhf-bench-"))
    config = InferenceConfig(
        grpc_port=0,
        metrics_port=-1,
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topics.prefix,
        registry_dir=str(work / "registry"),
        base_model_dir=str(write_tiny_model(work / "tiny", seed=0)),
        signing_key="b" * 32,
        replica_id="bench",
        **overrides,
    )
    return await create_server(config), topics, work
