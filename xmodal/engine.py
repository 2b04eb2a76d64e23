"""Training on Accelerate: devices, mixed precision, processes; checkpoints and resume.

One ``Engine`` per ``xmodal run``. Each stage of a recipe (teacher, a distillation method, a
finetune) is a :class:`xmodal.stage.Stage`: a module holding everything trainable, a step
function that returns named loss terms, a dataset and a schedule. :meth:`Engine.fit` runs it
epoch by epoch in the order :class:`xmodal.sampler.GlobalBatchSampler` gives, writes a
full-state checkpoint after every epoch (one file, replaced atomically: :mod:`xmodal.files`) and,
when the stage's folder already holds one of the same identity, continues from it.
"""
from __future__ import annotations

import json
import random
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from xmodal.errors import CheckpointError, ConfigError, XmodalError
from xmodal.models.batchnorm import convert_batchnorm
from xmodal.precision import EmulatedBf16, cpu_bf16_kernels, resolve_cpu_bf16_convs
from xmodal.runlock import OutputLock
from xmodal.files import atomic_save, atomic_write_text, read_state_file
from xmodal.sampler import GlobalBatchSampler
from xmodal.stage import Stage, another_configuration, as_json, fingerprint

CHECKPOINT = "checkpoint.pt"
FINAL = "final.pt"
RESULT = "result.json"
_CHECKPOINT_KEYS = {"config", "epoch", "module", "optimizer", "scheduler", "rng", "history"}


class NonFiniteLossError(XmodalError, FloatingPointError):
    """A loss term became NaN or Inf: the step was not applied and no checkpoint was written."""


SLOW_CPU_BF16 = (
    "mixed_precision=bf16 cpu_bf16_convs=native on a CPU without oneDNN's bf16 path (on x86 it needs AVX512BW/VL/DQ): "
    "PyTorch runs bf16 convolutions through its fallback kernel, several times slower than fp32, summing weight "
    "gradients in bf16 image by image (an error growing with the batch; python benchmarks/bf16_conv.py measures both "
    "here); cpu_bf16_convs=auto runs them as bf16 kernels would, on float32 kernels")
EMULATED_CPU_BF16 = (
    "mixed_precision=bf16 on a CPU without oneDNN's bf16 path: convolutions take bf16-rounded operands, sum in "
    "float32 and round their results to bf16 (the numerics of bf16 kernels) on float32 kernels "
    "(cpu_bf16_convs=auto; =native runs PyTorch's slower fallback kernel)")


class Engine:
    """Accelerate-backed runner shared by every stage of one run.

    Args:
        output_dir: the run's folder; stages write under ``stages/``, TensorBoard under ``tb/``.
        seed: drives data order, augmentation and initialisation.
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"``.
        cpu_bf16_convs: for bf16 on the CPU, ``"auto"``, ``"emulated"`` or ``"native"``
            convolutions (:mod:`xmodal.precision`).
        cpu: force the CPU even when an accelerator is present.
        num_workers: DataLoader workers per process (they only decode).
        log: the trackers the per-epoch scalars go to, through Accelerate (``tensorboard``,
            ``wandb``, ``mlflow``, ``aim``; each needs its package installed), all under ``tb/``;
            ``True``: TensorBoard; ``False`` or ``[]``: none.
    """

    def __init__(self, output_dir: Path, seed: int = 0, mixed_precision: str = "no", cpu: bool = False,
                 num_workers: int = 2, log: Union[bool, Sequence[str]] = True, resolved_config: Optional[str] = None,
                 cpu_bf16_convs: str = "auto") -> None:
        if mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"mixed_precision={mixed_precision!r}: expected 'no', 'fp16' or 'bf16'")
        self.output_dir = Path(output_dir)
        self.seed, self.num_workers = seed, num_workers
        trackers = check_trackers(["tensorboard"] if log is True else list(log or []))
        _release_single_process_state()
        self.accelerator = Accelerator(
            mixed_precision=mixed_precision,
            cpu=cpu,
            log_with=trackers or None,
            project_dir=str(self.output_dir / "tb"),
            # Students may leave heads unused (e.g. a classifier when only CRD trains).
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        self._log, self._resolved_config, self._started = bool(trackers), resolved_config, False
        self._lock = OutputLock(self.output_dir)
        if self.is_main:  # a folder another live run is writing is refused before any work
            OutputLock.check(self.output_dir)
        self._mixed_precision = mixed_precision
        kernels = cpu_bf16_kernels() if mixed_precision == "bf16" and self.device.type == "cpu" else None
        #: ``"emulated"`` / ``"native"`` for a bf16 run on the CPU, else None (report.json records it).
        self.cpu_bf16_convs = resolve_cpu_bf16_convs(cpu_bf16_convs, mixed_precision, self.device, kernels)
        if kernels is False and self.is_main:
            note = EMULATED_CPU_BF16 if self.cpu_bf16_convs == "emulated" else SLOW_CPU_BF16
            print(f"[xmodal] note: {note}", file=sys.stderr, flush=True)
        if mixed_precision == "fp16" and self.device.type == "cpu":
            # Accelerate makes no scaler for fp16 on the CPU; given one, its backward and the
            # optimizers it prepares scale the loss and skip overflowing steps as on a GPU.
            self.accelerator.scaler = torch.amp.GradScaler("cpu")
        set_seed(seed)

    @property
    def scaler(self) -> Optional["torch.amp.GradScaler"]:
        """The fp16 loss scaler of this run (its state travels with every checkpoint), or None."""
        return self.accelerator.scaler

    def start_outputs(self) -> None:
        """Create the output folder, write ``config.yaml`` and open TensorBoard, once.

        Deferred to the first stage, so a run that fails on its input leaves nothing behind.
        """
        if self._started:
            return
        self._started = True
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()  # a second run started on this folder meanwhile is refused here
            if self._resolved_config is not None:
                atomic_write_text(self._resolved_config, self._config_path())
        if self._log:
            self.accelerator.init_trackers("xmodal")

    def close(self) -> None:
        """End the run: release the output folder's lock and Accelerate's trackers."""
        self._lock.release()
        self.accelerator.end_training()

    # ------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def barrier(self) -> None:
        """Wait until every process gets here.

        CPU processes wait on a plain barrier: Accelerate's ``wait_for_everyone`` names the rank's
        accelerator index (``device_ids=[local rank]``), which on a machine with fewer GPUs than
        processes makes a ``--cpu`` launch fail with "CUDA error: invalid device ordinal" (seen
        with two processes on a one-GPU H100 machine).
        """
        if self.world > 1 and self.device.type == "cpu":
            dist.barrier()
        else:
            self.accelerator.wait_for_everyone()

    def _config_path(self) -> Path:
        """``config.yaml``, or ``config.N.yaml`` when the folder already records another config.

        A run into a folder that holds an earlier run never overwrites that run's record.
        """
        path, n = self.output_dir / "config.yaml", 1
        while path.exists() and path.read_text() != self._resolved_config:
            path, n = self.output_dir / f"config.{n}.yaml", n + 1
        return path

    def autocast(self):
        """The mixed-precision context of this run (a no-op for ``mixed_precision="no"``).

        Accelerate's own context ignores fp16 on the CPU; here fp16 on the CPU autocasts for
        real (with the loss scaler of :attr:`scaler`), so CPU runs exercise the same low-precision
        paths a GPU run takes. bf16 on the CPU with emulated convolutions also enters :class:`EmulatedBf16`.
        """
        if self._mixed_precision == "fp16" and self.device.type == "cpu":
            return torch.autocast("cpu", dtype=torch.float16)
        if self.cpu_bf16_convs == "emulated":
            stack = ExitStack()
            stack.enter_context(self.accelerator.autocast())
            stack.enter_context(EmulatedBf16())
            return stack
        return self.accelerator.autocast()

    def identity(self, stage: Stage) -> Mapping[str, Any]:
        """What a finished or resumable stage must match: its config, and the run's precision.

        A float32 run's identity is the stage's config alone (as before precision counted);
        a mixed-precision run's adds ``precision`` (and, for bf16 on the CPU, which convolutions
        ran), so a folder of fp32 stages never hands back its students to a bf16 run, nor the
        reverse.
        """
        if self._mixed_precision == "no":
            return stage.config
        precision = {"mixed_precision": self._mixed_precision}
        if self.cpu_bf16_convs is not None:
            precision["cpu_bf16_convs"] = self.cpu_bf16_convs
        return {**stage.config, "precision": precision}

    def stage_dir(self, name: str) -> Path:
        return self.output_dir / "stages" / name

    # --------------------------------------------------------------- loaders
    def loader(self, dataset: Dataset, batch_size: int, shuffle: bool, epoch: int = 0,
               drop_last: bool = False, seed: Optional[int] = None) -> DataLoader:
        """A DataLoader over this rank's share of every global batch of ``dataset``, shuffled from
        ``seed`` (the run's when ``None``)."""
        if drop_last and len(dataset) < batch_size:
            raise ConfigError(
                f"batch_size={batch_size} exceeds the {len(dataset)} training samples; lower batch_size"
            )
        sampler = GlobalBatchSampler(len(dataset), batch_size, shuffle, self.seed if seed is None else seed, epoch, drop_last,
                                     self.rank, self.world)
        return DataLoader(dataset, batch_sampler=sampler, num_workers=self.num_workers,
                          pin_memory=self.device.type == "cuda", persistent_workers=False)

    def to_device(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}

    def first_batch(self, dataset: Dataset, size: int = 8) -> dict[str, Any]:
        """The first ``size`` samples of ``dataset`` (unshuffled), batched and on the device: what
        the losses read feature shapes from before a stage is built."""
        return self.to_device(next(iter(self.loader(dataset, min(size, len(dataset)), shuffle=False))))

    def batches(self, dataset: Dataset, batch_size: int, desc: str) -> Iterator[dict[str, Any]]:
        """This process's share of ``dataset`` in dataset order, each batch on the device, under a
        progress bar: the loop of every evaluation and inference pass."""
        for batch in self.progress(self.loader(dataset, batch_size, shuffle=False), desc=desc):
            yield self.to_device(batch)

    def progress(self, iterable, **kwargs):
        """A progress bar on the main process; redrawn at most every 15 s into a log file."""
        interval = 0.1 if sys.stderr.isatty() else 15.0
        return tqdm(iterable, disable=not self.is_main, dynamic_ncols=True, leave=False,
                    mininterval=interval, **kwargs)

    # -------------------------------------------------------------- training
    def fit(self, stage: Stage) -> list[dict[str, float]]:
        """Train ``stage.module`` in place to its last epoch, resuming from its checkpoint.

        Returns the per-epoch history (mean of each loss term, seconds, learning rate).
        """
        folder = self.stage_dir(stage.name)
        module = stage.module.to(self.device)
        if self.world > 1:  # P processes at global batch B must train like one process at B
            convert_batchnorm(module, self.device.type)
        for frozen in stage.frozen.values():
            frozen.to(self.device).eval().requires_grad_(False)
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = stage.optimizer(params)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, stage.lr_lambda)
        wrapped, optimizer = self.accelerator.prepare(module, optimizer)
        start = self._resume(folder, stage, module, optimizer, scheduler)
        history: list[dict[str, float]] = start.pop("history")
        for epoch in range(start["epoch"], stage.epochs):
            if stage.on_epoch_start is not None:
                stage.on_epoch_start(epoch)
            wrapped.train()
            sums: dict[str, float] = {}
            count = 0
            began = time.perf_counter()
            loader = self.loader(stage.dataset, stage.batch_size, shuffle=True, epoch=epoch, drop_last=True,
                                 seed=stage.data_seed)
            bar = self.progress(loader, desc=f"{stage.name} {epoch + 1}/{stage.epochs}")
            for step_in_epoch, batch in enumerate(bar):
                batch = self.to_device(batch)
                with self.autocast():
                    terms = stage.step(wrapped, batch)
                self._check_finite(terms, stage.name, epoch, step_in_epoch)
                optimizer.zero_grad(set_to_none=True)
                self.accelerator.backward(terms["loss"])  # scaled under fp16; an overflowing step is skipped
                optimizer.step()
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0.0) + float(value.detach())
                count += 1
                bar.set_postfix(loss=f"{sums['loss'] / count:.4f}", refresh=False)
            scheduler.step()
            record = {k: v / max(count, 1) for k, v in sums.items()}
            record.update(epoch=epoch + 1, seconds=time.perf_counter() - began, lr=optimizer.param_groups[0]["lr"])
            history.append(record)
            self.accelerator.log({f"{stage.name}/{k}": v for k, v in record.items() if k != "epoch"}, step=epoch + 1)
            self._save(folder, stage, module, optimizer, scheduler, epoch + 1, history)
        # Drop DDP and the mixed-precision forward patch, so later stages see the plain module.
        self.accelerator.unwrap_model(wrapped, keep_fp32_wrapper=False)
        self.accelerator.free_memory()
        return history

    def _check_finite(self, terms: Mapping[str, Tensor], stage: str, epoch: int, step: int) -> None:
        values = torch.stack([t.detach().float().reshape(()) for t in terms.values()])
        finite = torch.isfinite(values).all().to(torch.int32)
        if self.world > 1:  # every rank must stop together, or the others hang in a collective
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not bool(finite):
            bad = [k for k, v in terms.items() if not torch.isfinite(v.detach()).all()] or ["(on another rank)"]
            raise NonFiniteLossError(
                f"stage {stage!r}: loss term {bad[0]!r} is not finite at epoch {epoch + 1}, step {step + 1}; "
                "the step was not applied and the last checkpoint is intact"
            )

    # ------------------------------------------------------------ checkpoint
    def _save(self, folder: Path, stage: Stage, module: nn.Module, optimizer, scheduler, epoch: int,
              history: list[dict[str, float]]) -> None:
        state = module.state_dict()  # also applies pending memory-bank updates, on every rank
        for key, value in state.items():  # identical on every rank, so all stop together
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise NonFiniteLossError(f"stage {stage.name!r}: {key} holds NaN/Inf after epoch {epoch}; no checkpoint written")
        rng = _gather_rng_states(self.world)
        if not self.is_main:
            self.barrier()
            return
        identity = self.identity(stage)
        atomic_save(
            {
                "stage": stage.name,
                "config": fingerprint(identity),
                "identity": as_json(identity),
                "epoch": epoch,
                "module": state,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": None if self.scaler is None else self.scaler.state_dict(),
                "rng": rng,
                "history": history,
            },
            folder / CHECKPOINT,
        )
        self.barrier()

    def _resume(self, folder: Path, stage: Stage, module: nn.Module, optimizer, scheduler) -> dict[str, Any]:
        path = folder / CHECKPOINT
        if not path.exists():
            return {"epoch": 0, "history": []}
        ckpt = read_state_file(path, "delete it to restart the stage", self.device)
        if not isinstance(ckpt, dict) or not _CHECKPOINT_KEYS <= set(ckpt):
            raise CheckpointError(f"checkpoint {path} is not an xmodal stage checkpoint; delete it to restart the stage")
        if ckpt.get("config") != fingerprint(self.identity(stage)):
            what = f"checkpoint {path} was written by a run with another configuration of stage {stage.name!r}"
            raise CheckpointError(f"{another_configuration(what, ckpt.get('identity'), self.identity(stage))}; "
                                  "choose another output_dir or delete that folder")
        try:
            module.load_state_dict(ckpt["module"])
        except RuntimeError as err:
            raise CheckpointError(f"checkpoint {path} does not fit stage {stage.name!r}: {str(err).splitlines()[0]}") from None
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if self.scaler is not None and ckpt.get("scaler"):  # a run before scalers were saved starts afresh
                self.scaler.load_state_dict(ckpt["scaler"])
            _set_rng_state(ckpt["rng"][self.rank] if self.rank < len(ckpt["rng"]) else ckpt["rng"][0])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as err:
            # an older xmodal's RNG states (numpy arrays), or a damaged file
            raise CheckpointError(f"checkpoint {path} holds a state this xmodal cannot restore ({type(err).__name__}); "
                                  "delete it to restart the stage") from None
        if self.is_main:
            print(f"[xmodal] {stage.name}: resuming after epoch {ckpt['epoch']} from {path}", flush=True)
        return {"epoch": int(ckpt["epoch"]), "history": list(ckpt["history"])}

    # --------------------------------------------------------------- results
    def run(self, stage: Stage, evaluate: Callable[[], dict[str, Any]] = dict) -> dict[str, Any]:
        """Train ``stage`` and evaluate it, or reload both when an earlier run finished it.

        A finished stage leaves ``final.pt`` (the module's weights) and ``result.json`` (what
        ``evaluate`` returned, the history, the config fingerprint); re-running the same
        recipe into the same ``output_dir`` skips it, so a killed run resumes where it was.
        """
        folder = self.stage_dir(stage.name)
        done = self.stage_result(stage.name)
        if done is not None:
            if done.get("config") != fingerprint(self.identity(stage)) or not (folder / FINAL).exists():
                what = f"{folder} holds stage {stage.name!r} of a run with another configuration"
                raise CheckpointError(f"{another_configuration(what, done.get('identity'), self.identity(stage))}; "
                                      "choose another output_dir (or delete that folder to redo the stage)")
            redo = f"delete {folder} to redo the stage, or choose another output_dir"
            state = read_state_file(folder / FINAL, redo)
            try:
                stage.module.load_state_dict(state)
            except (RuntimeError, TypeError, AttributeError) as err:
                raise CheckpointError(f"{folder / FINAL} does not fit stage {stage.name!r} "
                                      f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); {redo}") from None
            stage.module.to(self.device)
            return done
        self.start_outputs()
        began = time.perf_counter()
        history = self.fit(stage)
        result = dict(evaluate())
        identity = self.identity(stage)
        result.update(history=history, config=fingerprint(identity), identity=as_json(identity),
                      seconds=time.perf_counter() - began)
        if self.is_main:
            atomic_save(stage.module.state_dict(), folder / FINAL)
            atomic_write_text(json.dumps(result, indent=2, default=float), folder / RESULT)
            # The stage is finished: final.pt and result.json replace the resumable checkpoint
            # (which also holds the optimiser state, about as large again).
            (folder / CHECKPOINT).unlink(missing_ok=True)
        self.barrier()
        return result

    def stage_result(self, name: str) -> Optional[dict[str, Any]]:
        """The saved result of a finished stage, or ``None``."""
        path = self.stage_dir(name) / RESULT
        if not path.exists():
            return None
        redo = f"delete {path.parent} to redo the stage, or choose another output_dir"
        try:
            result = json.loads(path.read_bytes())
        except (ValueError, OSError) as err:  # truncated, empty, binary or unreadable
            raise CheckpointError(f"{path} is not a readable result file ({type(err).__name__}); {redo}") from None
        if not isinstance(result, dict) or not isinstance(result.get("config"), str):
            raise CheckpointError(f"{path} is not an xmodal stage result (no config fingerprint); {redo}")
        return result

    def gather_rows(self, tensor: Tensor) -> Tensor:
        """Concatenate every rank's rows (sizes may differ), in rank order."""
        from losses.contrast.distributed import all_gather_rows

        return all_gather_rows(tensor.contiguous())[0]


def _rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain numbers, so a checkpoint loads with
    ``weights_only=True`` (numpy's state is an array: stored as an int64 tensor)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    state = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": python_gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`_rng_state` saved. The checkpoint was loaded onto the run's device,
    so the generators' states (byte tensors the generators only take on the CPU) come back to
    the CPU first; CUDA states are restored for the GPUs saved and present (a run resumed on a
    machine with fewer or no GPUs keeps the rest at their seeds)."""
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].cpu().numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)


#: Trackers Accelerate logs to, and the package each needs.
TRACKERS = ("tensorboard", "wandb", "mlflow", "aim")


def check_trackers(names: Sequence[str]) -> list[str]:
    """``names`` if each is a known tracker Accelerate finds installed; else one ConfigError."""
    from accelerate.tracking import get_available_trackers

    installed = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"log_with: unknown tracker {name!r}; expected some of {list(TRACKERS)}")
        if name not in installed:
            raise ConfigError(f"log_with={name} needs its package: pip install {name}")
    return list(names)


def _release_single_process_state() -> None:
    """Let a new Engine in an unlaunched process choose its own device and precision.

    Accelerate keeps one state per process and refuses an Accelerator that asks for another
    device or precision than the first one did ("restart your runtime"); on a machine with a
    GPU, an ``Engine(cpu=False)`` followed by an ``Engine(cpu=True)`` in one Python session
    would fail, and one the other way round would silently stay on the CPU. An Engine is one
    run, so in a single process the previous run's state is dropped (an earlier Engine should
    not be used after a new one is made). Launched processes (several) keep theirs: every rank
    was started with the launch's settings.
    """
    if PartialState._shared_state and PartialState._shared_state.get("num_processes", 1) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)


def _gather_rng_states(world: int) -> list[dict[str, Any]]:
    if world == 1:
        return [_rng_state()]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, _rng_state())
    return out
