"""The `rlhf-online` console script: one subcommand per job, each a `main(argv, env)` in its own module.

Subcommands are imported lazily so `rlhf-online kafka status` does not pay for importing torch.
"""

import importlib
import os
import sys
from collections.abc import Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    "serve-inference": ("services.inference.main", "serve the policy over gRPC (ChatService, ModelAdmin)"),
    "serve-reward": ("services.reward.main", "learn the reward model from the feedback stream"),
    "serve-trainer": ("services.trainer.main", "run PPO rounds and publish gated policy versions"),
    "kafka": ("rlhf_online.broker.local", "start|stop|status of the local single-node Kafka broker"),
    "init-model": ("rlhf_online.engine.presets", "write a model folder: tiny (random) or smollm2-135m"),
    "simulate": ("rlhf_online.sim.simulate", "simulated users who chat and rate answers"),
    "demo": ("rlhf_online.sim.demo", "run the whole loop on this machine"),
    "report": ("rlhf_online.sim.report", "write an HTML report of what the loop learned"),
}


def usage() -> str:
    lines = ["usage: rlhf-online COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<16} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "Run `rlhf-online COMMAND --help` for the flags of one command."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatches to the subcommand's `main(argv, env)` and returns its exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"rlhf-online: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest, os.environ) or 0)


if __name__ == "__main__":
    sys.exit(main())
