"""The engine: global batches, resume, atomic checkpoints, the non-finite guard."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from xmodal.engine import CHECKPOINT, Engine, GlobalBatchSampler, NonFiniteLossError, Stage, atomic_save
from xmodal.errors import CheckpointError


class Toy(Dataset):
    def __init__(self, n: int = 40) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, generator=g)
        self.y = (self.x.sum(1) > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "label": self.y[i], "index": torch.tensor(i)}


def _stage(name="toy", epochs=3, config=None, on_epoch_start=None, poison_at=None) -> Stage:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    calls = {"n": 0}

    def step(wrapped, batch):
        calls["n"] += 1
        loss = nn.functional.cross_entropy(wrapped(batch["x"]), batch["label"])
        if poison_at is not None and calls["n"] == poison_at:
            loss = loss * float("nan")
        return {"loss": loss, "ce": loss}

    return Stage(name=name, module=model, step=step, dataset=Toy(), epochs=epochs, batch_size=8,
                 optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                 lr_lambda=lambda e: 0.5 ** e, config=config or {"lr": 0.1}, on_epoch_start=on_epoch_start)


@pytest.fixture
def engine(tmp_path):
    return Engine(tmp_path / "run", seed=3, num_workers=0, log=False)


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_split_every_global_batch(world):
    single = list(GlobalBatchSampler(37, 8, True, seed=1, epoch=2, drop_last=False))
    shards = [list(GlobalBatchSampler(37, 8, True, seed=1, epoch=2, drop_last=False, rank=r, world=world))
              for r in range(world)]
    for i, batch in enumerate(single):
        joined = [idx for shard in shards if i < len(shard) for idx in shard[i]]
        assert joined == batch
    assert sorted(i for b in single for i in b) == list(range(37))
    assert [len(list(s)) for s in shards] == [len(GlobalBatchSampler(37, 8, True, 1, 2, False, r, world)) for r in range(world)]


def test_order_depends_only_on_seed_and_epoch():
    a = list(GlobalBatchSampler(20, 4, True, seed=1, epoch=0, drop_last=True))
    assert a == list(GlobalBatchSampler(20, 4, True, seed=1, epoch=0, drop_last=True))
    assert a != list(GlobalBatchSampler(20, 4, True, seed=1, epoch=1, drop_last=True))


def test_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    full = _stage()
    Engine(tmp_path / "a", seed=3, num_workers=0, log=False).run(full)

    def crash(epoch):
        if epoch == 2:
            raise KeyboardInterrupt  # as if the process died after writing epoch 2's checkpoint

    engine = Engine(tmp_path / "b", seed=3, num_workers=0, log=False)
    with pytest.raises(KeyboardInterrupt):
        engine.run(_stage(on_epoch_start=crash))
    assert torch.load(tmp_path / "b/stages/toy" / CHECKPOINT, weights_only=False)["epoch"] == 2
    resumed = _stage()
    result = engine.run(resumed)
    for key, value in full.module.state_dict().items():
        assert torch.equal(value, resumed.module.state_dict()[key]), key
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]


def test_finished_stage_is_reloaded_not_retrained(engine):
    first = _stage()
    engine.run(first)
    again = _stage(on_epoch_start=lambda e: pytest.fail("a finished stage must not train again"))
    engine.run(again)
    assert torch.equal(first.module.weight, again.module.weight)


def test_stage_of_another_config_is_refused(engine):
    engine.run(_stage())
    with pytest.raises(CheckpointError, match="another configuration"):
        engine.run(_stage(config={"lr": 0.2}))


def test_non_finite_loss_stops_before_the_step(engine):
    stage = _stage(poison_at=7)  # epoch 2 (5 batches per epoch), second step
    with pytest.raises(NonFiniteLossError, match=r"loss term 'loss' is not finite at epoch 2, step 2"):
        engine.run(stage)
    assert all(torch.isfinite(p).all() for p in stage.module.parameters())
    ckpt = torch.load(engine.stage_dir("toy") / CHECKPOINT, weights_only=False)
    assert ckpt["epoch"] == 1  # the last good checkpoint, untouched


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_save({"epoch": 1}, path)

    def broken(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        atomic_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind


def test_corrupt_checkpoint_gets_a_clear_error(engine):
    folder = engine.stage_dir("toy")
    folder.mkdir(parents=True)
    (folder / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        engine.run(_stage())
