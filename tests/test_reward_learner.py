"""The reward model and online learner on the tiny model: tokenization, freezing, dedup, learning a hidden
preference from a synthetic stream, and checkpoints that resume the same lineage."""

import pytest
import torch
from torch.testing import assert_close

from rlhf_online.registry import Registry
from rlhf_online.reward import checkpoint
from rlhf_online.reward.config import RewardConfig
from rlhf_online.reward.learner import HELDOUT, TRAIN, LearnerSettings, OnlineLearner, is_heldout
from rlhf_online.reward.model import freeze_lower_layers, init_reward_model, load_reward_model
from rlhf_online.reward.synthetic import synthetic_examples


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine is shared; one thread is also the fastest for this size
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model(tiny_model_dir):
    return init_reward_model(tiny_model_dir, max_length=64, seed=0)


def test_encode_keeps_the_end_and_appends_eos(model):
    tok = model.tokenizer
    batch = model.encode(["p" * 100, "short "], ["the answer!", "yes"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == (2, 64) and mask[0].all() and mask[1].sum() == 1 + 9 + 1
    assert tok.decode(ids[0, 1:-1]).endswith("the answer!") and ids[0, -1] == tok.eos_token_id
    assert ids[0, 0] == tok.bos_token_id and ids[1, 10] == tok.eos_token_id
    assert (ids[1, 11:] == tok.pad_token_id).all()
    scores = model.score(["a", "b", "c"], ["x", "y", "z"], batch_size=2)
    assert scores.shape == (3,) and not scores.requires_grad
    # Padding does not change a score.
    assert_close(model.score(["a"], ["x"]), model.score(["a", "a much longer prompt"], ["x", "y"])[:1])


def test_only_the_top_layers_and_head_train(model):
    n1 = freeze_lower_layers(model, 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".layers.3." in n for n in trainable) and not any(".layers.2." in n for n in trainable)
    assert "backbone.score.weight" in trainable and "backbone.model.norm.weight" in trainable
    assert "backbone.model.embed_tokens.weight" not in trainable
    assert freeze_lower_layers(model, 0) < n1 < freeze_lower_layers(model, 2)
    assert freeze_lower_layers(model, -1) == sum(p.numel() for p in model.parameters())


def test_heldout_split_is_deterministic_and_about_the_fraction():
    ids = [f"event-{i}" for i in range(4000)]
    share = sum(is_heldout(e, 0.1) for e in ids) / len(ids)
    assert 0.08 < share < 0.12
    assert [is_heldout(e, 0.1) for e in ids[:50]] == [is_heldout(e, 0.1) for e in ids[:50]]
    assert not any(is_heldout(e, 0.0) for e in ids)


def test_events_are_admitted_once_and_updates_are_due_by_count_or_time(model):
    learner = OnlineLearner(model, LearnerSettings(heldout_fraction=0.0))
    [a, b] = synthetic_examples(2)
    assert learner.add(a, now=0.0) == TRAIN
    assert learner.add(a, now=0.0) is None  # waiting: a duplicate
    assert not learner.due(every_examples=2, interval_s=5.0, now=1.0)
    assert learner.due(every_examples=2, interval_s=5.0, now=5.0)
    learner.add(b, now=1.0)
    assert learner.due(every_examples=2, interval_s=5.0, now=1.0)
    result = learner.update()
    assert [ex.event_id for ex in result.examples] == [a.event_id, b.event_id]
    assert learner.add(a) is None and learner.counts["duplicate"] == 2  # applied: still a duplicate
    assert learner.applied == [(a.event_id, TRAIN), (b.event_id, TRAIN)]
    assert learner.update() is None


def test_learns_a_hidden_preference_from_a_stream(model):
    """Held-out accuracy far above chance after ~250 ratings (users like answers whose words end in '!')."""
    settings = LearnerSettings(
        learning_rate=1e-3, trainable_layers=2, steps_per_update=2, heldout_fraction=0.15, seed=0
    )
    learner = OnlineLearner(model, settings)
    stream = synthetic_examples(256, seed=1, noise=0.05)
    before = learner.evaluate(ex for ex in stream if is_heldout(ex.event_id, 0.15))
    for ex in stream:
        learner.add(ex, now=0.0)
        if learner.due(16, 5.0, now=0.0):
            learner.update()
    after = learner.evaluate()
    assert learner.counts[HELDOUT] == after["n"] > 30
    assert after["accuracy"] > 0.85 and after["auc"] > 0.9, (before, after)
    assert after["log_loss"] < before["log_loss"]


def test_checkpoint_round_trip_resumes_the_lineage(model, tmp_path):
    settings = LearnerSettings(heldout_fraction=0.2, replay_capacity=8, seed=0)
    learner = OnlineLearner(model, settings)
    stream = synthetic_examples(40, seed=2)
    for ex in stream[:30]:
        learner.add(ex)
    registry = Registry(tmp_path)
    offsets = {"t.feedback:0": 17}
    with pytest.raises(RuntimeError, match="update"):  # examples wait: the caller applies them first
        checkpoint.publish_checkpoint(registry, learner, parent_version=None, offsets=offsets)
    assert registry.latest("reward") is None
    learner.update()
    manifest = checkpoint.publish_checkpoint(registry, learner, parent_version=None, offsets=offsets)
    assert manifest.extra["offsets"] == offsets and manifest.extra["applied_events"] == 30

    restored = checkpoint.restore(registry, manifest.version)
    folder = registry.verify("reward", manifest.version)
    assert sorted(checkpoint.applied_event_ids(folder)) == sorted(ex.event_id for ex in stream[:30])
    assert restored.offsets == offsets
    assert_close(restored.model.score(["x"], ["y!"]), learner.model.score(["x"], ["y!"]))
    assert load_reward_model(folder).max_length == 64
    resumed = OnlineLearner(restored.model, settings, restored.state)
    checkpoint.load_optimizer_state(resumed, restored.optimizer_state)
    assert resumed.applied == learner.applied and resumed.replay == learner.replay
    assert list(resumed.heldout) == list(learner.heldout) and resumed.updates == learner.updates
    assert all(resumed.add(ex) is None for ex in stream[:30])  # replays collapse on event_id
    assert all(resumed.add(ex) is not None for ex in stream[30:])
    # Same rng state: the next replay sample is the same in both.
    assert resumed._sample_replay(stream[30:32]) == learner._sample_replay(stream[30:32])


@pytest.mark.parametrize("layers", [0, 1])
def test_a_shallower_reward_model_saves_and_loads_at_its_depth(tiny_model_dir, tmp_path, layers):
    model = init_reward_model(tiny_model_dir, max_length=64, seed=0, layers=layers)
    full = init_reward_model(tiny_model_dir, max_length=64, seed=0)
    assert model.backbone.config.num_hidden_layers == layers
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in full.parameters())
    # What is kept (the bottom blocks, embeddings, norm, head) is the full model's, unchanged.
    full_params = dict(full.backbone.named_parameters())
    for name, p in model.backbone.named_parameters():
        assert_close(p, full_params[name])
    model.save(tmp_path)
    loaded = load_reward_model(tmp_path)
    assert loaded.backbone.config.num_hidden_layers == layers
    assert_close(loaded.score(["x", "y"], ["up!", "down"]), model.score(["x", "y"], ["up!", "down"]))
    with pytest.raises(ValueError, match="has 4 transformer blocks; cannot keep 5"):
        init_reward_model(tiny_model_dir, max_length=64, seed=0, layers=5)
    with pytest.raises(ValueError, match="--backbone-layers must be -1"):
        RewardConfig(backbone_layers=-2)
