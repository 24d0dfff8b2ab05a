"""`rlhf-online serve-inference`: serve the policy over gRPC and publish answers and ratings to Kafka.

rlhf-online kafka start
rlhf-online init-model --preset tiny .rlhf/models/tiny
rlhf-online serve-inference --signing-key "$(openssl rand -hex 32)" --admin-token secret
"""

import asyncio
import logging
from collections.abc import Mapping, Sequence

from rlhf_online.config import parse_config
from rlhf_online.inference.config import InferenceConfig
from rlhf_online.inference.server import serve


def main(argv: Sequence[str], env: Mapping[str, str]) -> int:
    config = parse_config(InferenceConfig, argv, env, prog="rlhf-online serve-inference")
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config.apply_torch_threads()
    asyncio.run(serve(config))
    return 0
