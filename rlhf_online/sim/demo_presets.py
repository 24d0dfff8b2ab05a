"""What the demo runs on: a model, and the users' settings sized for it on a 2-core CPU machine.

`rlhf-online demo` runs the tiny preset by default (a random 2.6M-parameter model: the loop learns within a
few minutes, what the fast tests use) and SmolLM2-135M-Instruct with `--model smollm2-135m` (`make
demo-smollm2`: a real chat model, its answers real English; on two CPU cores its rounds are 3-4 minutes,
and 10 minutes of learning have not yet shown a clear rise, docs/real-model.md). `--model-dir` runs any
Hugging Face folder with the real model's settings. Every setting the user passes wins over the preset's;
the services' flags sized for each model are in `sim.processes`.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from rlhf_online.engine.presets import SMOLLM2, TINY
from rlhf_online.engine.tiny_model import is_tiny_preset
from rlhf_online.sim.config import DemoConfig

MODELS_DIR = Path(".rlhf/models")


@dataclass(frozen=True)
class DemoPreset:
    """The defaults of one kind of model; `init_preset` is what `init-model --preset` writes ('' = none)."""

    label: str  # for the terminal and the report
    model_dir: Path
    init_preset: str
    judge: str
    duration_s: float
    rate: float  # requests per second
    max_new_tokens: int


PRESETS: dict[str, DemoPreset] = {
    # The tiny model answers 32 random characters quickly: 3 requests/s leave CPU to learn, and its
    # suite's judges are character classes (sim.judges, sim.preferences).
    TINY: DemoPreset(
        "tiny preset (random 2.6M-parameter model)", MODELS_DIR / "tiny", TINY, "lowercase", 360.0, 3.0, 32
    ),
    # SmolLM2 answers about one 48-token request a second on one core beside the trainer; 0.7 a second
    # leaves the trainer most of the other core. The judge is the real-text one whose reward model learns
    # from the fewest ratings (held-out AUC 0.98 after 150, docs/real-model.md); `concise` was tried
    # first and its reward model was still at AUC 0.6-0.8 after 450 live ratings.
    SMOLLM2: DemoPreset(
        "SmolLM2-135M-Instruct", MODELS_DIR / "smollm2-135m", SMOLLM2, "addresses_user", 600.0, 0.7, 48
    ),
}


def preset_for(config: DemoConfig) -> DemoPreset:
    """The preset of `--model`, or, with `--model-dir`, the tiny one if that folder is the tiny preset and
    the real model's otherwise (pointed at that folder)."""
    if not config.model_dir:
        return PRESETS[config.model]
    folder = Path(config.model_dir)
    base = PRESETS[TINY] if is_tiny_preset(folder) else PRESETS[SMOLLM2]
    label = base.label if base.init_preset == TINY else f"your model ({folder.name})"
    return dataclasses.replace(base, label=label, model_dir=folder, init_preset="")


def with_preset(config: DemoConfig, preset: DemoPreset) -> DemoConfig:
    """`config` with the settings the user left unset taken from `preset`."""
    unset = {
        "judge": (config.judge == "", preset.judge),
        "duration_s": (config.duration_s == 0, preset.duration_s),
        "rate": (config.rate < 0, preset.rate),
        "max_new_tokens": (config.max_new_tokens == 0, preset.max_new_tokens),
    }
    return dataclasses.replace(config, **{name: value for name, (blank, value) in unset.items() if blank})
