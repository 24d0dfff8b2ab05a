"""`rlhf-online serve-trainer`: PPO rounds against the latest reward model, gated publishes to the registry.

    rlhf-online serve-trainer --registry-dir .rlhf/registry --base-model-dir .rlhf/tiny-model
    RLHF_MIN_NEW_RATINGS=64 RLHF_ROUND_INTERVAL_S=300 rlhf-online serve-trainer

SIGTERM or SIGINT abandons a round in progress (nothing partial is published) and exits 0. SIGUSR1 drains:
no new round or canary trial starts, a trial running goes on to its decision, then the process exits 0.
"""

import logging
import signal
import threading
from collections.abc import Mapping, Sequence

from prometheus_client import start_http_server

from rlhf_online.config import parse_config
from rlhf_online.trainer.config import TrainerConfig
from rlhf_online.trainer.service import create_service

log = logging.getLogger(__name__)


def main(argv: Sequence[str], env: Mapping[str, str]) -> int:
    config = parse_config(TrainerConfig, argv, env, prog="rlhf-online serve-trainer")
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if config.metrics_port >= 0:
        start_http_server(config.metrics_port)
    service = create_service(config)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopping.set())
    signal.signal(signal.SIGUSR1, lambda signum, frame: service.drain(then=stopping.set))
    service.start()
    stopping.wait()
    log.info("shutting down: abandoning any round in progress")
    service.stop()
    return 0
