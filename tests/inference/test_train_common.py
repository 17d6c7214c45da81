"""The trainers' shared early stopping and model-folder writer."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pacs_sentinel.inference.train_common import EarlyStopping, write_model_folder


def test_early_stopping_keeps_the_best_weights_and_stops_after_patience() -> None:
    net = torch.nn.Linear(2, 1)
    stopping = EarlyStopping(net, patience=2, initial=float("inf"), higher_is_better=False)
    assert not stopping.step(1, 0.5) and stopping.best_epoch == 1
    best = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    assert not stopping.step(2, 0.49995)  # not better by more than the minimum improvement
    assert stopping.step(3, 0.6)  # the second epoch without improvement: stop
    stopping.restore_best()
    assert torch.equal(net.weight, best) and stopping.best == 0.5 and stopping.best_epoch == 1
    assert not net.training


def test_higher_is_better_by_default() -> None:
    stopping = EarlyStopping(torch.nn.Linear(1, 1), patience=1, initial=-1.0)
    assert not stopping.step(1, 0.7) and not stopping.step(2, 0.8)
    assert stopping.best == 0.8 and stopping.best_epoch == 2
    assert stopping.step(3, 0.8)


def test_model_folder_is_written_whole(tmp_path: Path) -> None:
    state = torch.nn.Linear(2, 1).state_dict()
    write_model_folder(tmp_path / "m", state, {"name": "x"}, "# card\n")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["MODEL_CARD.md", "card.json", "model.pt"]
    assert json.loads((tmp_path / "m" / "card.json").read_text()) == {"name": "x"}
    assert torch.equal(torch.load(tmp_path / "m" / "model.pt")["weight"], state["weight"])
