"""The engine: global batches, resume, atomic checkpoints, the non-finite guard."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from xmodal.engine import CHECKPOINT, Engine, NonFiniteLossError
from xmodal.files import atomic_save
from xmodal.sampler import GlobalBatchSampler
from xmodal.stage import Stage
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
    assert torch.load(tmp_path / "b/stages/toy" / CHECKPOINT, weights_only=True)["epoch"] == 2
    resumed = _stage()
    result = engine.run(resumed)
    for key, value in full.module.state_dict().items():
        assert torch.equal(value, resumed.module.state_dict()[key]), key
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]


def _overflowing_stage(on_epoch_start=None) -> Stage:
    """A stage whose fp16 gradients overflow at the scaler's first scales (the loss is large), so
    the first steps are skipped and the scale backs off: a resumed run that forgot the scale would
    skip again and end elsewhere."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)

    def step(wrapped, batch):
        loss = 3000.0 * nn.functional.cross_entropy(wrapped(batch["x"]), batch["label"])
        return {"loss": loss, "ce": loss}

    return Stage(name="fp16", module=model, step=step, dataset=Toy(), epochs=4, batch_size=8,
                 optimizer=lambda p: torch.optim.SGD(p, lr=1e-5), lr_lambda=lambda e: 1.0, config={"fp16": 1},
                 on_epoch_start=on_epoch_start)


def test_fp16_resume_restores_the_loss_scale(tmp_path):
    def fp16(name):
        return Engine(tmp_path / name, seed=3, num_workers=0, log=False, mixed_precision="fp16", cpu=True)

    full = _overflowing_stage()
    engine = fp16("a")
    engine.run(full)
    scale = engine.scaler.get_scale()
    assert scale < 65536.0  # steps overflowed and the scale backed off

    def crash(epoch):
        if epoch == 2:
            raise KeyboardInterrupt  # as if the process died after writing epoch 2's checkpoint
    killed = fp16("b")
    with pytest.raises(KeyboardInterrupt):
        killed.run(_overflowing_stage(on_epoch_start=crash))
    saved = torch.load(tmp_path / "b/stages/fp16" / CHECKPOINT, weights_only=True)["scaler"]
    assert saved["scale"] < 65536.0
    killed.close()
    resumed = _overflowing_stage()
    fresh = fp16("b")  # a new process: its scaler starts at 65536 until the checkpoint is read
    fresh.run(resumed)
    assert fresh.scaler.get_scale() == scale
    for key, value in full.module.state_dict().items():
        assert torch.equal(value, resumed.module.state_dict()[key]), key


def test_finished_stage_is_reloaded_not_retrained(engine):
    first = _stage()
    engine.run(first)
    again = _stage(on_epoch_start=lambda e: pytest.fail("a finished stage must not train again"))
    engine.run(again)
    assert torch.equal(first.module.weight, again.module.weight)


def test_stage_of_another_config_is_refused(engine):
    engine.run(_stage(config={"lr": 0.1, "optim": {"name": "sgd", "momentum": 0.9}}))
    # the refusal names the keys that differ (a nested one, a new one), not only that something did
    with pytest.raises(CheckpointError, match=r"another configuration \(it differs in lr, optim\.momentum, seed\)"):
        engine.run(_stage(config={"lr": 0.2, "optim": {"name": "sgd", "momentum": 0.5}, "seed": 1}))


def test_a_half_trained_stage_of_another_config_names_the_difference(tmp_path):
    def crash(epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    engine = Engine(tmp_path, seed=3, num_workers=0, log=False)
    with pytest.raises(KeyboardInterrupt):
        engine.run(_stage(config={"lr": 0.1}, on_epoch_start=crash))
    with pytest.raises(CheckpointError, match=r"was written by a run with another configuration of stage 'toy' "
                                              r"\(it differs in lr\)"):
        engine.run(_stage(config={"lr": 0.3}))


def test_non_finite_loss_stops_before_the_step(engine):
    stage = _stage(poison_at=7)  # epoch 2 (5 batches per epoch), second step
    with pytest.raises(NonFiniteLossError, match=r"loss term 'loss' is not finite at epoch 2, step 2"):
        engine.run(stage)
    assert all(torch.isfinite(p).all() for p in stage.module.parameters())
    ckpt = torch.load(engine.stage_dir("toy") / CHECKPOINT, weights_only=True)
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
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind


def test_corrupt_checkpoint_gets_a_clear_error(engine):
    folder = engine.stage_dir("toy")
    folder.mkdir(parents=True)
    (folder / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        engine.run(_stage())


class _OnDevice:
    """Stands in for a generator state that ``torch.load(map_location="cuda")`` put on a GPU:
    only ``.cpu()`` gives the byte tensor back (there is no GPU here to put a real one on)."""

    def __init__(self, state: torch.Tensor) -> None:
        self._state = state

    def cpu(self) -> torch.Tensor:
        return self._state


def test_cuda_generator_states_are_restored_from_the_cpu_for_the_gpus_present(monkeypatch):
    # On a GPU, resume loads the checkpoint onto the device, and torch's CUDA generators take
    # their state only as a CPU byte tensor ("RNG state must be a torch.ByteTensor", seen on an
    # H100 before this was mended). A checkpoint from a machine with two GPUs resumed on one
    # restores the first GPU's state only.
    from xmodal import engine as engine_module

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    saved = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    state = {**engine_module._rng_state(), "cuda": [_OnDevice(s) for s in saved]}
    engine_module._set_rng_state(state)
    assert len(restored) == 1
    (got, device), = restored
    assert device == 0 and got.device.type == "cpu" and got.dtype == torch.uint8 and torch.equal(got, saved[0])


def test_generator_states_survive_a_weights_only_file(tmp_path):
    # A resume checkpoint holds every generator's state as tensors and plain numbers: it loads with
    # weights_only=True, and the draws after restoring repeat the draws after saving.
    import io
    import random

    import numpy as np

    from xmodal import engine as engine_module

    def draws():
        return random.random(), random.gauss(0, 1), float(np.random.rand()), float(np.random.randn()), \
            float(torch.rand(()))

    random.gauss(0, 1), np.random.randn()  # leave a cached Gaussian in both
    buffer = io.BytesIO()
    torch.save(engine_module._rng_state(), buffer)
    first = draws()
    engine_module._set_rng_state(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert draws() == first


def test_the_private_accelerate_api_the_engine_relies_on_is_there():
    """The Engine drops a single process's Accelerate state with AcceleratorState._reset_state
    (private; setup.cfg pins accelerate to the versions the suite passed on). If a release removes
    or renames it, this fails by name rather than a run failing later."""
    import inspect

    from accelerate.state import AcceleratorState

    reset = getattr(AcceleratorState, "_reset_state", None)
    assert callable(reset), "accelerate no longer has AcceleratorState._reset_state: see xmodal/engine.py"
    assert "reset_partial_state" in inspect.signature(reset).parameters


def test_a_later_engine_in_one_process_gets_its_own_precision(tmp_path):
    # Accelerate keeps one state per process and refused a second Accelerator with another
    # precision (or, on a GPU machine, cpu=True after a GPU run: seen on an H100). Each Engine
    # is one run and gets what it asks for, in either order.
    for precision, dtype in (("bf16", torch.bfloat16), ("no", torch.float32), ("fp16", torch.float16)):
        engine = Engine(tmp_path / precision, mixed_precision=precision, cpu=True, log=False)
        assert engine.accelerator.mixed_precision == precision
        with engine.autocast():
            out = nn.Conv2d(2, 4, 3)(torch.randn(1, 2, 8, 8))
        assert out.dtype == dtype and engine.device.type == "cpu"


@pytest.mark.parametrize("kernels", [False, True, None])
def test_bf16_on_a_cpu_without_bf16_kernels_says_so(tmp_path, monkeypatch, capsys, kernels):
    import xmodal.engine as engine_module

    monkeypatch.setattr(engine_module, "cpu_bf16_kernels", lambda: kernels)
    for precision, convs in (("bf16", "auto"), ("bf16", "native"), ("no", "auto")):
        Engine(tmp_path / precision, mixed_precision=precision, cpu=True, log=False, cpu_bf16_convs=convs)
        err = capsys.readouterr().err
        said = precision == "bf16" and kernels is False
        # auto emulates there and says so; native warns of the fallback kernel
        assert ("[xmodal] note: mixed_precision=bf16 on a CPU without oneDNN's bf16 path: convolutions take "
                "bf16-rounded operands" in err) == (said and convs == "auto")
        assert ("[xmodal] note: mixed_precision=bf16 cpu_bf16_convs=native on a CPU without" in err) == (
            said and convs == "native")


def test_cpu_bf16_kernels_is_none_where_torch_cannot_say(monkeypatch):
    from xmodal.precision import cpu_bf16_kernels

    def gone():
        raise AttributeError("no such op in this torch build")

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", gone)
    assert cpu_bf16_kernels() is None
