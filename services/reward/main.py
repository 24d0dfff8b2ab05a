"""`rlhf-online serve-reward`: learn the reward model online from the joined feedback stream.

    rlhf-online serve-reward --registry-dir .rlhf/registry --kafka-bootstrap 127.0.0.1:19092
    RLHF_TRAINABLE_LAYERS=1 RLHF_CHECKPOINT_EVERY_UPDATES=10 rlhf-online serve-reward

SIGTERM or SIGINT: applies the ratings that wait, publishes a reward checkpoint, commits the offsets it
includes, and exits 0. Exits 1 if the loop failed (nothing past the last checkpoint was committed; a restart
replays it).
"""

import logging
import signal
import threading
from collections.abc import Mapping, Sequence

from prometheus_client import start_http_server

from rlhf_online.broker.clients import wait_for_broker
from rlhf_online.config import parse_config
from rlhf_online.reward.config import RewardConfig
from rlhf_online.reward.service import create_service

log = logging.getLogger(__name__)


def main(argv: Sequence[str], env: Mapping[str, str]) -> int:
    config = parse_config(RewardConfig, argv, env, prog="rlhf-online serve-reward")
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("kafka").setLevel(logging.WARNING)
    if config.metrics_port >= 0:
        server, _ = start_http_server(config.metrics_port)
        log.info("Prometheus metrics on port %d", server.server_port)
    wait_for_broker(config.kafka_bootstrap, timeout_s=60)
    service = create_service(config)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopping.set())
    service.start()
    while not stopping.wait(timeout=1.0):
        if not service.running:
            break
    log.info("shutting down: publishing a final reward checkpoint")
    service.stop()
    if service.error is not None:
        log.error("the reward service failed: %s", service.error)
        return 1
    return 0
