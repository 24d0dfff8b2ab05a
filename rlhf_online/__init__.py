"""rlhf-online: serve a policy over gRPC, learn a reward model from live ratings through Kafka, improve the
policy with PPO and hot-swap it into serving."""

__version__ = "0.1.0"
