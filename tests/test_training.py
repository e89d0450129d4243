"""Training loop: schedule, optimisers, loss going down, exact resume, model selection, checkpoints."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from fss_core.data.episodes import Episode
from fss_core.models.backbones import Backbone
from fss_core.models.fss import FSSModelConfig, FSSNetwork
from fss_core.training import trainer
from fss_core.training import (
    TrainCallbacks,
    TrainSettings,
    build_optimizers,
    load_model_weights,
    poly_warmup_lr,
    read_checkpoint,
    save_checkpoint,
    train,
    validate,
)

SIZE = 33
TINY = FSSModelConfig(hidden=32, heads=4, layers=1, ffn=64, points=3, fg_prototypes=4, bg_prototypes=6)
COLOURS = np.array([[2.0, -1.0, -1.0], [-1.0, 2.0, -1.0], [-1.0, -1.0, 2.0]])


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny tensors: extra threads only add overhead (and one thread count keeps sums bit-identical)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ToyBackbone(Backbone):
    """Stride-8 backbone with a BatchNorm (so the checkpoint holds buffers too)."""

    channels = {"layer2": 8, "layer3": 8, "layer4": 8}
    strides = {"layer2": 8, "layer3": 8, "layer4": 8}
    embedding_layer = "layer4"

    def __init__(self) -> None:
        super().__init__()
        self.layer2 = nn.Sequential(nn.Conv2d(3, 8, 8, stride=8, padding=4), nn.BatchNorm2d(8), nn.ReLU())
        self.layer3 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.layer4 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        layer2 = self.layer2(x)
        layer3 = self.layer3(layer2)
        return {"layer2": layer2, "layer3": layer3, "layer4": self.layer4(layer3)}


def make_model(seed: int = 0, **overrides) -> FSSNetwork:
    torch.manual_seed(seed)
    return FSSNetwork(ToyBackbone(), dataclasses.replace(TINY, **overrides))


class ToyEpisodes(Dataset):
    """Coloured squares on noise; class = colour. Drawn from ``(seed, epoch, index)``.

    The last 3 rows are padding (mask 255) and the square's top row is ignore (255).
    ``fail_at=(epoch, index)`` raises there, to simulate a crash mid-epoch.
    """

    def __init__(self, n: int, shots: int = 1, seed: int = 0, fail_at: tuple[int, int] | None = None):
        self.n, self.shots, self.seed, self.fail_at, self.epoch = n, shots, seed, fail_at, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def _image(self, rng: np.random.Generator, class_id: int):
        image = rng.normal(0.0, 0.3, (3, SIZE, SIZE))
        mask = np.zeros((SIZE, SIZE), dtype=np.int64)
        side = int(rng.integers(12, 21))
        top, left = rng.integers(0, SIZE - 3 - side, 2)
        image[:, top : top + side, left : left + side] += COLOURS[class_id][:, None, None]
        mask[top : top + side, left : left + side] = 1
        mask[top, left : left + side] = 255
        padding = np.zeros((SIZE, SIZE), dtype=bool)
        padding[-3:] = True
        mask[padding] = 255
        image[:, padding] = 0.0
        return torch.tensor(image, dtype=torch.float32), torch.tensor(mask), torch.tensor(padding)

    def __getitem__(self, i: int) -> Episode:
        if self.fail_at == (self.epoch, i):
            raise RuntimeError("simulated crash")
        rng = np.random.default_rng([self.seed, self.epoch, i])
        class_id = i % len(COLOURS)
        query = self._image(rng, class_id)
        supports = [self._image(rng, class_id) for _ in range(self.shots)]
        return Episode(
            query_img=query[0], query_mask=query[1], query_padding=query[2],
            support_imgs=torch.stack([s[0] for s in supports]),
            support_masks=torch.stack([s[1] for s in supports]),
            support_padding=torch.stack([s[2] for s in supports]),
            class_id=class_id, query_id=f"q{i}", support_ids=[f"s{i}_{k}" for k in range(self.shots)],
            query_hw=(SIZE, SIZE),
        )


def settings(tmp_path, **overrides) -> TrainSettings:
    values = dict(epochs=2, batch_size=2, base_lr=0.005, checkpoint_dir=tmp_path / "ckpt", seed=7, device="cpu")
    values.update(overrides)
    return TrainSettings(**values)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


# ---------------------------------------------------------------- schedule and optimisers


def test_poly_warmup_lr_matches_the_reference_formula():
    base, max_it, warm = 0.002, 1000, 100
    for it in (0, 1, 50, 99):
        assert poly_warmup_lr(base, it, max_it, warm, 0.9, 15.0) == pytest.approx(15 * base * (0.001 + 0.999 * it / warm))
    for it in (100, 101, 500, 999):
        assert poly_warmup_lr(base, it, max_it, warm, 0.9, 15.0) == pytest.approx(15 * base * (1 - it / max_it) ** 0.9)
    assert poly_warmup_lr(base, max_it, max_it, warm) == 0.0
    # the scale is explicit and multiplies the whole schedule
    assert poly_warmup_lr(base, 300, max_it, warm, scale=1.0) * 15 == pytest.approx(poly_warmup_lr(base, 300, max_it, warm))
    with pytest.raises(ValueError, match="max_it"):
        poly_warmup_lr(base, max_it + 1, max_it, warm)


def test_optimisers_split_parameters_and_keep_the_backbone_out():
    model = make_model()
    sgd, adamw = build_optimizers(model, base_lr=0.002)
    sgd_ids = {id(p) for g in sgd.param_groups for p in g["params"]}
    adamw_groups = {g["weight_decay"]: {id(p) for p in g["params"]} for g in adamw.param_groups}
    for name, p in model.named_parameters():
        if name.startswith("backbone."):
            assert id(p) not in sgd_ids and all(id(p) not in ids for ids in adamw_groups.values())
        elif "transformer" in name:
            assert id(p) in adamw_groups[0.0 if "bias" in name else 1e-2], name
        else:
            assert id(p) in sgd_ids, name
    assert sgd.param_groups[0]["lr"] == pytest.approx(0.03)  # the explicit x15
    assert sgd.param_groups[0]["momentum"] == 0.9 and sgd.param_groups[0]["weight_decay"] == 1e-4
    assert all(g["lr"] == 1e-4 for g in adamw.param_groups)


# ---------------------------------------------------------------- training


def test_validation_builds_no_autograd_graph_and_restores_train_mode():
    model = make_model(seed=1).train()
    grad_modes = []
    model.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    validate(model, ToyEpisodes(4, shots=1, seed=3), 2, torch.device("cpu"), seed=0)
    assert grad_modes and not any(grad_modes)  # no graph kept for episodes that are only scored
    assert model.training


def test_training_lowers_the_loss_and_follows_the_schedule(tmp_path):
    model = make_model(seed=1)
    data = ToyEpisodes(8, shots=2, seed=1)
    held_out = ToyEpisodes(6, shots=2, seed=99)
    before = validate(model, held_out, 3, torch.device("cpu"), seed=0)[0]
    seen: list[tuple[int, dict]] = []
    result = train(model, data, held_out, settings(tmp_path, epochs=5, base_lr=0.01, transformer_lr=1e-3),
                   TrainCallbacks(on_epoch_end=lambda e, m: seen.append((e, m))), progress=False)
    after = validate(model, held_out, 3, torch.device("cpu"), seed=0)[0]
    assert after < 0.9 * before
    # best.pt holds weights whose score on the passed episodes (validated with seed 7) is the best score
    best = make_model(seed=5)
    load_model_weights(result.best_path, best)
    assert validate(best, held_out, 3, torch.device("cpu"), seed=7)[1] == pytest.approx(result.best_score)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert [e for e, _ in seen] == list(range(5))
    steps = 4  # 8 episodes, batch 2
    for epoch, metrics in seen:
        assert metrics["sgd_lr"] == pytest.approx(poly_warmup_lr(0.01, (epoch + 1) * steps, 5 * steps, steps))
        assert metrics["transformer_lr"] == 1e-3
        assert {"train_loss", "val_loss", "val_miou", "seconds"} <= metrics.keys()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Reference run: 2 epochs in one go."""
    tmp = tmp_path_factory.mktemp("reference")
    model = make_model()
    result = train(model, ToyEpisodes(8), ToyEpisodes(4, seed=5), settings(tmp), progress=False)
    return model.state_dict(), result


def test_resume_after_a_kill_between_epochs_is_bit_identical(tmp_path, uninterrupted):
    def crash(epoch, _metrics):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(make_model(), ToyEpisodes(8), ToyEpisodes(4, seed=5), settings(tmp_path),
              TrainCallbacks(on_epoch_end=crash), progress=False)
    assert read_checkpoint(tmp_path / "ckpt" / "last.pt")["epoch"] == 0
    model = make_model(seed=123)  # a fresh process would start from other weights
    result = train(model, ToyEpisodes(8), ToyEpisodes(4, seed=5), settings(tmp_path), progress=False)
    reference_state, reference = uninterrupted
    assert_same_weights(model.state_dict(), reference_state)
    assert without_seconds(result.history) == without_seconds(reference.history)
    assert (result.best_epoch, result.best_score) == (reference.best_epoch, reference.best_score)


def test_resume_after_a_crash_mid_epoch_is_bit_identical(tmp_path, uninterrupted):
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(make_model(), ToyEpisodes(8, fail_at=(1, 3)), ToyEpisodes(4, seed=5), settings(tmp_path),
              progress=False)
    assert read_checkpoint(tmp_path / "ckpt" / "last.pt")["epoch"] == 0
    model = make_model(seed=123)
    result = train(model, ToyEpisodes(8), ToyEpisodes(4, seed=5), settings(tmp_path), progress=False)
    reference_state, reference = uninterrupted
    assert_same_weights(model.state_dict(), reference_state)
    assert_same_weights(read_checkpoint(result.final_path)["model"], reference_state)
    assert without_seconds(result.history) == without_seconds(reference.history)


def test_resume_refuses_changed_settings(tmp_path):
    train(make_model(), ToyEpisodes(4), None, settings(tmp_path, epochs=1), progress=False)
    with pytest.raises(ValueError, match="base_lr"):
        train(make_model(), ToyEpisodes(4), None, settings(tmp_path, epochs=1, base_lr=0.1), progress=False)


def test_best_checkpoint_is_selected_on_the_validation_episodes_passed_in(tmp_path, monkeypatch):
    scripted = iter([0.2, 0.5, 0.3, 0.1])
    validated = []

    def fake_validate(model, dataset, *args, **kwargs):
        validated.append(dataset)
        return 0.0, next(scripted)

    monkeypatch.setattr(trainer, "validate", fake_validate)
    model = make_model()
    val = ToyEpisodes(4, seed=42)
    snapshots, kinds = {}, []

    def snapshot(epoch, _metrics):
        snapshots[epoch] = {k: v.clone() for k, v in model.state_dict().items()}

    result = train(model, ToyEpisodes(4), val, settings(tmp_path, epochs=4),
                   TrainCallbacks(on_epoch_end=snapshot, on_checkpoint=lambda p, k: kinds.append(k)), progress=False)
    assert len(validated) == 4 and all(d is val for d in validated)
    assert [h["val_miou"] for h in result.history] == [0.2, 0.5, 0.3, 0.1]
    assert (result.best_epoch, result.best_score) == (1, 0.5)
    best = read_checkpoint(result.best_path)
    assert (best["epoch"], best["score"]) == (1, 0.5)
    assert_same_weights(best["model"], snapshots[1])
    assert_same_weights(read_checkpoint(result.final_path)["model"], snapshots[3])
    assert kinds == ["best", "last", "best", "last", "last", "last", "final"]


def test_validation_runs_every_val_every_epochs_and_after_the_last(tmp_path):
    result = train(make_model(), ToyEpisodes(4), ToyEpisodes(2, seed=5), settings(tmp_path, epochs=4, val_every=3),
                   progress=False)
    assert ["val_miou" in h for h in result.history] == [False, False, True, True]


def test_validation_miou_pools_intersections_per_class():
    class HalfPredictor(nn.Module):
        """Predicts foreground on the left half of every query."""

        def forward(self, query, *args, generator=None):
            logits = torch.zeros(query.shape[0], 2, *query.shape[2:])
            logits[:, 1, :, : SIZE // 2] = 1.0
            return logits

    data = ToyEpisodes(5)
    intersection, union = np.zeros(3), np.zeros(3)
    for i in range(len(data)):
        episode = data[i]
        valid = (episode.query_mask != 255) & ~episode.query_padding
        predicted = torch.zeros(SIZE, SIZE, dtype=torch.bool)
        predicted[:, : SIZE // 2] = True
        target = episode.query_mask == 1
        intersection[episode.class_id] += (predicted & target & valid).sum().item()
        union[episode.class_id] += ((predicted | target) & valid).sum().item()
    _, miou = validate(HalfPredictor(), data, 2, torch.device("cpu"), seed=0)
    assert miou == pytest.approx(np.mean(intersection / union))


# ---------------------------------------------------------------- checkpoints


def test_finetuning_starts_from_every_key_of_a_saved_checkpoint(tmp_path):
    result = train(make_model(), ToyEpisodes(4), None, settings(tmp_path, epochs=1), progress=False)
    saved = read_checkpoint(result.final_path)["model"]
    model = make_model(seed=9)
    assert not all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    load_model_weights(result.final_path, model)
    assert_same_weights(model.state_dict(), saved)


def test_loading_into_another_architecture_names_the_keys(tmp_path):
    path = save_checkpoint({"model": make_model().state_dict()}, tmp_path / "a.pt")
    with pytest.raises(ValueError, match=r"mis-shaped .*query_adapter\.0\.weight"):
        load_model_weights(path, make_model(hidden=16, heads=4))
    deeper = make_model(layers=2).state_dict()
    extra = sorted(set(deeper) - set(make_model().state_dict()))[0]
    with pytest.raises(ValueError, match=re.escape(f"unexpected keys ['{extra}'")):
        load_model_weights(save_checkpoint({"model": deeper}, tmp_path / "b.pt"), make_model())
    partial = make_model().state_dict()
    del partial["head.3.bias"]
    with pytest.raises(ValueError, match=re.escape("missing keys ['head.3.bias']")):
        load_model_weights(save_checkpoint(partial, tmp_path / "c.pt"), make_model())


def test_a_failed_checkpoint_write_keeps_the_previous_file(tmp_path):
    path = save_checkpoint({"value": torch.ones(3)}, tmp_path / "last.pt")
    with pytest.raises(Exception):
        save_checkpoint({"value": torch.zeros(3), "unpicklable": lambda: None}, path)
    assert torch.equal(read_checkpoint(path)["value"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_settings_are_validated():
    with pytest.raises(ValueError, match="batch_size"):
        TrainSettings(epochs=1, batch_size=0, base_lr=0.1, checkpoint_dir="x")
    with pytest.raises(ValueError, match="device"):
        TrainSettings(epochs=1, batch_size=1, base_lr=0.1, checkpoint_dir="x", device="tpu")
    assert math.isclose(TrainSettings(epochs=1, batch_size=1, base_lr=0.1, checkpoint_dir="x").sgd_lr_scale, 15.0)


def test_worker_processes_do_not_change_the_result(tmp_path):
    states = []
    for workers in (0, 2):
        model = make_model()
        train(model, ToyEpisodes(8), None, settings(tmp_path / str(workers), epochs=1, num_workers=workers),
              progress=True)
        states.append(model.state_dict())
    assert_same_weights(*states)


def test_persistent_worker_processes_give_the_epochs_of_no_workers(tmp_path):
    """Two epochs through one loader: its worker gets each epoch with the indices."""
    runs = []
    for workers in (0, 1):
        model = make_model()
        result = train(model, ToyEpisodes(8), None, settings(tmp_path / str(workers), epochs=2, num_workers=workers),
                       progress=False)
        runs.append((model.state_dict(), without_seconds(result.history)))
    assert_same_weights(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]


def test_the_dice_switch_reaches_the_training_and_validation_loss(tmp_path):
    histories = {}
    for flag in (True, False):
        result = train(make_model(), ToyEpisodes(4), ToyEpisodes(2, seed=1),
                       settings(tmp_path / str(flag), epochs=1, dice_ignores_void=flag), progress=False)
        histories[flag] = result.history[0]
    assert histories[True]["train_loss"] != pytest.approx(histories[False]["train_loss"])
    assert histories[True]["val_loss"] != pytest.approx(histories[False]["val_loss"])


def test_a_checkpoint_that_predates_a_setting_resumes_with_its_default(tmp_path):
    """A last.pt written before a setting existed resumes when the setting has its default value
    (what that run used), and is refused when it does not."""
    model = make_model()
    train(model, ToyEpisodes(4), None, settings(tmp_path, epochs=1), progress=False)
    last = tmp_path / "ckpt" / "last.pt"
    saved = read_checkpoint(last)
    del saved["settings"]["dice_ignores_void"]
    save_checkpoint(saved, last)
    train(make_model(), ToyEpisodes(4), None, settings(tmp_path, epochs=1), progress=False)  # resumes
    with pytest.raises(ValueError, match="dice_ignores_void"):
        train(make_model(), ToyEpisodes(4), None, settings(tmp_path, epochs=1, dice_ignores_void=False),
              progress=False)
