"""Contrastive representation distillation (Tian, Krishnan, Isola, ICLR 2020).

``CRDLoss`` = two embedding heads (Linear + L2 norm) + the contrastive core of
``losses.contrast``: memory banks, negative sampling, fast scoring, the NCE (or InfoNCE)
objective. With the defaults it computes exactly RepDistiller's ``CRDLoss``: same loss,
gradients and bank updates for the same heads, banks and ``contrast_idx``.

Where it differs from the reference, deliberately:

* scoring never materialises the ``(B, K+1, d)`` gather (``losses.contrast.scoring``);
* the bank update of a step is applied at the start of the next step (or on ``state_dict``),
  so backward sees the banks that produced the scores without copying them;
* uniform negatives exclude the anchor's own row and are drawn without replacement;
* with several processes, indices and embeddings are all-gathered before the update, ``Z`` is
  agreed across ranks, and negatives are drawn for the global batch from a generator every
  rank holds in the same state, so two processes reproduce one process at the same global batch;
* the core runs in float32 with autocast disabled and in log space, so it stays finite under
  fp16/bf16 autocast and as cosines approach 1;
* banks, ``Z`` and the sampler's random state live in ``state_dict()``.

Two options trade the paper's per-anchor negatives for speed and memory at large N (both off by
default; ``benchmarks/contrastive_core.py`` measures them):

* ``shared_negatives=True``: one uniform draw of K bank rows per batch serves every anchor (one
  ``(B, d) @ (d, K)`` product instead of B x (K+1) random row reads);
* ``bank="queue"``: no N-row banks; the last K embeddings of each view in a MoCo-style ring are
  every anchor's negatives, its positive the paired view's embedding in the batch
  (``losses.contrast.queue``). Memory is K x d per view, whatever N. Positives and queue entries
  come from *key heads*, moving averages of the two embedding heads (MoCo's momentum encoder):
  were they made by the trained heads themselves, a positive (made now) and the negatives (made
  by older heads) would differ by their age, and the critic can separate them by that alone.
"""
from __future__ import annotations

import copy
import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from losses.base import DistillLoss
from losses.contrast.distributed import all_gather_rows
from losses.contrast.memory import STATE_KEYS, ContrastMemory
from losses.contrast.queue import QUEUE_STATE_KEYS, ContrastQueue
from losses.contrast.objectives import OBJECTIVES, NORMALISERS, batch_log_z, infonce_loss, nce_loss, update_log_z
from losses.contrast.sampling import NegativeSampler
from losses.contrast.scoring import ScoreWorkspace, bank_scores, choose_scoring, dense_scores
from losses.features import Features
from losses.registry import register

_BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BANKS = ("full", "queue")


class Embed(nn.Module):
    """Projection head g: ``Linear(dim_in, dim_out)`` then L2 normalisation.

    Shapes: ``(B, *)`` (flattened to ``(B, dim_in)``) -> ``(B, dim_out)`` unit vectors.
    """

    def __init__(self, dim_in: int, dim_out: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


def _check_features(name: str, f: Tensor, width: int, batch: Optional[int]) -> None:
    if f.dim() < 2 or f[0].numel() != width:
        raise ValueError(f"{name} has shape {tuple(f.shape)}: expected (B, {width}) to match its embedding head")
    if batch is not None and f.shape[0] != batch:
        raise ValueError(f"{name} has batch size {f.shape[0]}, expected {batch} like f_s")
    if not bool(torch.isfinite(f).all()):
        raise ValueError(f"{name} contains NaN or Inf values: expected finite features")


@register("crd")
class CRDLoss(DistillLoss):
    """CRD critic: ``loss(student anchors vs teacher bank) + loss(teacher anchors vs student bank)``.

    Args:
        student_dim: width of the student feature ``f_s`` (flattened).
        teacher_dim: width of the teacher feature ``f_t`` (flattened).
        n_data: N, memory-bank rows (the dataset size); ``index`` must lie in ``[0, N)``.
        feat_dim: embedding width d (paper: 128).
        nce_k: negatives K per anchor (paper: 16384).
        nce_t: temperature tau (paper: 0.07).
        nce_m: bank momentum m (paper: 0.5).
        objective: ``"nce"`` (paper) or ``"infonce"`` (softmax over 1 + K, the paper's ablation).
        normaliser: ``"once"`` (Z from the first batch, paper) or ``"ema"`` (running estimate).
        z_momentum: momentum of the ``"ema"`` normaliser.
        negatives: ``"uniform"`` (unlabeled data) or ``"class"`` (negatives of another class).
        positive: ``"exact"`` (own row) or ``"relax"`` (a random row of the same class).
        replacement: draw negatives with replacement (the reference's uniform sampler); the
            default draws without, so ``nce_k`` must not exceed the negatives available.
        labels: ``(N,)`` class of every row; required by ``negatives="class"``.
        scoring: ``"auto"``, ``"full"`` (score every row with one matmul) or ``"gather"``.
        bank_dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` storage for the banks.
        bank: ``"full"`` (two N-row banks, the paper) or ``"queue"`` (the last ``nce_k``
            embeddings of each view; memory independent of N).
        shared_negatives: one draw of ``nce_k`` rows per batch for every anchor (full bank).
        key_momentum: momentum of the queue's key heads (``bank="queue"``; 0: the heads themselves).
        seed: seeds the initial banks and the negative sampler (same on every rank).

    Call: ``crd(f_s, f_t, index, contrast_idx=None, labels=None)`` -> scalar loss, with
    ``f_s`` ``(B, student_dim)``, ``f_t`` ``(B, teacher_dim)``, ``index`` ``(B,)`` long bank
    rows, ``contrast_idx`` ``(B, K+1)`` long (column 0 the positive) to fix the sample, and
    ``labels`` ``(B,)`` to check against the dataset labels given at construction.
    """

    default_weight = 0.8  # beta in RepDistiller's CIFAR runs (CE gamma = 1, KD alpha = 0)
    memory_bank = True

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        n_data: int,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        nce_m: float = 0.5,
        objective: str = "nce",
        normaliser: str = "once",
        z_momentum: float = 0.99,
        negatives: str = "uniform",
        positive: str = "exact",
        labels: Optional[Tensor] = None,
        replacement: bool = False,
        scoring: str = "auto",
        bank_dtype: str = "float32",
        bank: str = "full",
        shared_negatives: bool = False,
        key_momentum: float = 0.99,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("student_dim", student_dim), ("teacher_dim", teacher_dim), ("n_data", n_data), ("feat_dim", feat_dim)):
            if int(value) < 1:
                raise ValueError(f"{name}={value}: expected a positive integer")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r}: expected one of {OBJECTIVES}")
        if normaliser not in NORMALISERS:
            raise ValueError(f"normaliser={normaliser!r}: expected one of {NORMALISERS}")
        if not 0.0 <= z_momentum < 1.0:
            raise ValueError(f"z_momentum={z_momentum}: expected a momentum in [0, 1) (0: Z from each batch alone)")
        if nce_t <= 0:
            raise ValueError(f"nce_t={nce_t}: expected a positive temperature")
        if bank_dtype not in _BANK_DTYPES:
            raise ValueError(f"bank_dtype={bank_dtype!r}: expected one of {tuple(_BANK_DTYPES)}")
        if bank not in BANKS:
            raise ValueError(f"bank={bank!r}: expected one of {BANKS}")
        if not isinstance(shared_negatives, bool):
            raise ValueError(f"shared_negatives={shared_negatives!r}: expected true or false")
        if bank == "queue" and (negatives, positive, bool(shared_negatives)) != ("uniform", "exact", False):
            raise ValueError("bank='queue' scores every queue entry of other samples: it does not combine "
                             "with negatives='class', positive='relax' or shared_negatives")
        self.student_dim, self.teacher_dim, self.n_data = int(student_dim), int(teacher_dim), int(n_data)
        self.nce_k, self.nce_t = int(nce_k), float(nce_t)
        self.objective, self.normaliser, self.z_momentum = objective, normaliser, float(z_momentum)
        self.embed_s = Embed(self.student_dim, feat_dim)
        self.embed_t = Embed(self.teacher_dim, feat_dim)
        self.bank, self.shared_negatives = bank, bool(shared_negatives)
        self.scoring = choose_scoring(scoring, self.n_data, self.nce_k)
        self._workspace = ScoreWorkspace()
        init = torch.Generator().manual_seed(seed)
        if not 0.0 <= key_momentum < 1.0:
            raise ValueError(f"key_momentum={key_momentum}: expected a momentum in [0, 1)")
        self.key_momentum = float(key_momentum)
        if bank == "queue":
            # Frozen copies, moved towards the heads before each step: not trained, but saved.
            self.key_s, self.key_t = copy.deepcopy(self.embed_s), copy.deepcopy(self.embed_t)
            for p in (*self.key_s.parameters(), *self.key_t.parameters()):
                p.requires_grad_(False)
            self.sampler = None
            self.memory = ContrastQueue(self.nce_k, feat_dim, _BANK_DTYPES[bank_dtype], init)
        else:
            self.sampler = NegativeSampler(self.n_data, self.nce_k, negatives, positive, labels, replacement)
            self.memory = ContrastMemory(self.n_data, feat_dim, nce_m, _BANK_DTYPES[bank_dtype], init)
        # NCE's noise prior is uniform over the rows negatives come from: the queue's K or the bank's N.
        self._noise_rows = self.nce_k if bank == "queue" else self.n_data
        self._seed = int(seed)
        # Negatives of step t come from a generator seeded by (seed, t): a counter is the whole
        # sampler state, identical on every rank and portable between devices.
        self._sample_step = 0
        self._watched: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ API
    @classmethod
    def from_features(cls, student: Features, teacher: Features, *, n_data=None, labels=None, **options) -> "CRDLoss":
        if n_data is None:
            raise ValueError("crd needs n_data, the number of training samples (memory-bank rows)")
        if options.get("negatives", "uniform") == "class" and "labels" not in options:
            options["labels"] = labels
        return cls(student.pooled.shape[1], teacher.pooled.shape[1], n_data, **options)

    @classmethod
    def capped_options(cls, options: dict, n_data: int) -> dict:
        """Negatives are drawn without replacement among the other rows, so at most ``n_data - 1``
        (a set of 18 frames cannot supply the paper's K = 16384)."""
        default = inspect.signature(CRDLoss.__init__).parameters["nce_k"].default
        return {**options, "nce_k": min(int(options.get("nce_k", default)), n_data - 1)}

    def forward_features(self, student: Features, teacher: Features, index=None, labels=None) -> Tensor:
        return self(student.pooled, teacher.pooled, index, labels=labels)

    def forward(
        self,
        f_s: Tensor,
        f_t: Tensor,
        index: Tensor,
        contrast_idx: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
    ) -> Tensor:
        self._check_inputs(f_s, f_t, index, contrast_idx, labels)
        index = index.to(self.memory.student_bank.device)
        self.memory.flush()
        with torch.autocast(device_type=f_s.device.type, enabled=False):
            v_s, v_t = self._embed(f_s, f_t)
            keys = self._keys(f_s, f_t) if self.bank == "queue" else (v_s, v_t)
            # Student anchors against the teacher bank, teacher anchors against the student bank.
            # Scaling the B anchors by 1/tau is cheaper than scaling the B x (K+1) scores.
            logits_s, logits_t = self._scores(v_s / self.nce_t, v_t / self.nce_t, *keys, index, contrast_idx)
            loss = self._objective(logits_s, 0) + self._objective(logits_t, 1)
            self._watch(logits_s.detach(), logits_t.detach())
        self.memory.queue_update(index, keys[0].detach(), keys[1].detach())
        return loss

    @torch.no_grad()
    def _keys(self, f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
        """The queue's keys of a batch: key heads moved towards the heads, then applied."""
        for key, head in ((self.key_s, self.embed_s), (self.key_t, self.embed_t)):
            for k, h in zip(key.parameters(), head.parameters()):
                k.mul_(self.key_momentum).add_(h.detach(), alpha=1 - self.key_momentum)
        dtype = self.key_s.linear.weight.dtype
        return self.key_s(f_s.to(dtype)), self.key_t(f_t.to(dtype))

    def _scores(self, a_s: Tensor, a_t: Tensor, k_s: Tensor, k_t: Tensor, index: Tensor, contrast_idx: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """``(B, K+1)`` scores of the student anchors ``a_s`` and the teacher anchors ``a_t``
        (``k_s``, ``k_t``: the queue's keys of the batch)."""
        memory = self.memory
        if self.bank == "queue":
            own = memory.own_entries(index)
            return (dense_scores(a_s, k_t, memory.teacher_bank, own), dense_scores(a_t, k_s, memory.student_bank, own))
        if self.shared_negatives:
            rows = self._shared_rows(index) if contrast_idx is None else _shared_columns(contrast_idx.to(index.device))
            return (dense_scores(a_s, memory.teacher_bank[index], memory.teacher_bank[rows]),
                    dense_scores(a_t, memory.student_bank[index], memory.student_bank[rows]))
        contrast_idx = self.sample_contrast(index) if contrast_idx is None else contrast_idx.to(index.device)
        return (bank_scores(a_s, memory.teacher_bank, contrast_idx, self.scoring, self._workspace),
                bank_scores(a_t, memory.student_bank, contrast_idx, self.scoring, self._workspace))

    def diagnostics(self) -> dict[str, Tensor]:
        """Mean cosine of each anchor with its positive bank row and with its negatives.

        Averaged over both directions (student anchors vs the teacher bank and the reverse), for
        the last batch. Their gap is what the critic has learnt to tell apart: a loss can fall
        while it stays near zero (all embeddings drifting together), and then the student has
        learnt little.
        """
        return dict(self._watched)

    @property
    def warm_rows(self) -> int:
        """Samples a warm start must see to fill the memory: every bank row, or the queue's K."""
        return self.nce_k if self.bank == "queue" else self.n_data

    @torch.no_grad()
    def warm_start(self, f_s: Tensor, f_t: Tensor, index: Tensor) -> None:
        """Fill bank rows ``index`` with this batch's embeddings (no momentum).

        One pass over the data before training removes the cold first epoch, in which every
        positive is still a random initial row (docs/notes/crd-variants.md measures the effect).
        Not part of the paper's recipe; off unless a run asks for it.
        """
        self._check_inputs(f_s, f_t, index, None, None)
        with torch.autocast(device_type=f_s.device.type, enabled=False):
            views = self._keys(f_s, f_t) if self.bank == "queue" else self._embed(f_s, f_t)
            self.memory.write(index.to(self.memory.student_bank.device), *views)

    # ------------------------------------------------------------- internals
    def _watch(self, logits_s: Tensor, logits_t: Tensor) -> None:
        # Sums over the contiguous score matrices: negligible next to the scoring itself.
        k = logits_s.shape[1] - 1
        pos = (logits_s[:, 0].sum() + logits_t[:, 0].sum()) / (2 * logits_s.shape[0])
        if self.bank == "queue":  # excluded entries are -inf: leave them out of the mean
            negatives = torch.cat([logits_s[:, 1:], logits_t[:, 1:]])
            kept = negatives.isfinite()
            neg = negatives.where(kept, 0.0).sum() / kept.sum().clamp(min=1)
        else:
            neg = ((logits_s.sum() + logits_t.sum()) / (2 * logits_s.shape[0]) - pos) / k
        self._watched = {"pos_cos": pos * self.nce_t, "neg_cos": neg * self.nce_t}

    def _embed(self, f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
        # float32 under any autocast; float64 only when the heads were made double (gradcheck).
        dtype = torch.float64 if self.embed_s.linear.weight.dtype == torch.float64 else torch.float32
        return self.embed_s(f_s.to(dtype)), self.embed_t(f_t.to(dtype))

    def sample_contrast(self, index: Tensor) -> Tensor:
        """``(B, K+1)`` for bank rows ``index`` ``(B,)``: the draw ``forward`` makes.

        Public so that critics over the same rows (an ensemble's) can share one draw per step;
        with ``shared_negatives`` every row holds the same K negatives. A collective under
        several processes: every rank must call it at the same step.
        """
        index = index.to(self.memory.student_bank.device)
        if self.shared_negatives:
            rows = self._shared_rows(index)
            return torch.cat([index[:, None], rows[None, :].expand(index.shape[0], -1)], dim=1)
        # Draw for the global batch from a generator every rank holds in the same state, then
        # keep this rank's rows: the sample does not depend on how the batch is split.
        global_index, offset = all_gather_rows(index)
        sample = self.sampler.sample(global_index, self._step_generator(index.device))
        return sample[offset : offset + index.shape[0]]

    def _shared_rows(self, index: Tensor) -> Tensor:
        """``(K,)`` negatives of the whole global batch, none of them a row of the batch."""
        global_index, _ = all_gather_rows(index)
        return self.sampler.sample_shared(global_index, self._step_generator(index.device))

    def _step_generator(self, device: torch.device) -> torch.Generator:
        if self.sampler is None:
            raise ValueError("bank='queue' scores every queue entry: it draws no contrast_idx")
        generator = torch.Generator(device=device)
        generator.manual_seed((self._seed * 1_000_003 + self._sample_step) % (2**63))
        self._sample_step += 1
        return generator

    def _objective(self, logits: Tensor, side: int) -> Tensor:
        if self.objective == "infonce":
            return infonce_loss(logits)
        log_z = self.memory.log_z[side]
        if self.normaliser == "ema" or bool(torch.isnan(log_z)):
            log_z = update_log_z(log_z, batch_log_z(logits, self._noise_rows), self.normaliser, self.z_momentum)
            self.memory.log_z[side] = log_z
        return nce_loss(logits, float(log_z), self._noise_rows)

    def _check_inputs(self, f_s, f_t, index, contrast_idx, labels) -> None:
        _check_features("f_s", f_s, self.student_dim, None)
        _check_features("f_t", f_t, self.teacher_dim, f_s.shape[0])
        if index.shape != (f_s.shape[0],) or index.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"index has shape {tuple(index.shape)} and dtype {index.dtype}: expected ({f_s.shape[0]},) integers")
        _check_rows("index", index, self.n_data)
        if contrast_idx is not None and self.bank == "queue":
            raise ValueError("bank='queue' scores every queue entry: contrast_idx does not apply")
        if contrast_idx is not None:
            expected = (f_s.shape[0], self.nce_k + 1)
            if tuple(contrast_idx.shape) != expected:
                raise ValueError(f"contrast_idx has shape {tuple(contrast_idx.shape)}: expected {expected} (B, nce_k + 1)")
            _check_rows("contrast_idx", contrast_idx, self.n_data)
        if labels is not None and self.sampler is not None and self.sampler.labels is not None:
            known = self.sampler.labels.to(index.device)[index]
            if not torch.equal(known, labels.to(known)):
                raise ValueError("labels disagree with the dataset labels the critic was built with at these index rows")

    # ----------------------------------------------------------- state/device
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # Follow the heads' device; keep the banks' own storage dtype (fn may cast to half).
        device = self.embed_s.linear.weight.device
        self.memory.to(device)
        if self.sampler is not None:
            self.sampler.to(device)
        return self

    def _memory_keys(self) -> tuple[str, ...]:
        # InfoNCE has no normaliser: its log Z would stay NaN ("unset") forever, and a
        # checkpoint must hold only finite numbers (the engine refuses to write one that does not).
        keys = QUEUE_STATE_KEYS if self.bank == "queue" else STATE_KEYS
        return tuple(k for k in keys if k != "log_z") if self.objective == "infonce" else keys

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        state = self.memory.state_dict()
        for key in self._memory_keys():
            destination[prefix + "memory." + key] = state[key] if keep_vars else state[key].detach()
        destination[prefix + "sampler_state"] = torch.tensor([self._seed, self._sample_step], dtype=torch.long)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        memory, keys = {}, self._memory_keys()
        for key in keys:
            full = prefix + "memory." + key
            if full in state_dict:
                memory[key] = state_dict.pop(full)
            elif strict:
                missing_keys.append(full)
        if len(memory) == len(keys):
            try:
                self.memory.load_state_dict(memory)
            except ValueError as err:
                error_msgs.append(str(err))
        sampler_key = prefix + "sampler_state"
        if sampler_key in state_dict:
            self._seed, self._sample_step = (int(v) for v in state_dict.pop(sampler_key))
        elif strict:
            missing_keys.append(sampler_key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


def _shared_columns(contrast_idx: Tensor) -> Tensor:
    """The K negatives of a ``contrast_idx`` whose rows all hold the same ones (a shared draw)."""
    rows = contrast_idx[0, 1:]
    if not torch.equal(contrast_idx[:, 1:], rows[None, :].expand_as(contrast_idx[:, 1:])):
        raise ValueError("shared_negatives: every row of contrast_idx must hold the same negatives (columns 1..K)")
    return rows


def _check_rows(name: str, rows: Tensor, n_data: int) -> None:
    if rows.numel() == 0:
        return
    low, high = int(rows.min()), int(rows.max())
    if low < 0 or high >= n_data:
        bad = high if high >= n_data else low
        raise ValueError(f"{name} holds row {bad}: expected rows in [0, n_data={n_data})")


@register("infonce")
class InfoNCELoss(CRDLoss):
    """CRD's critic with the InfoNCE objective (softmax over 1 + K) on the same core."""

    def __init__(self, student_dim: int, teacher_dim: int, n_data: int, **options) -> None:
        options.setdefault("objective", "infonce")
        super().__init__(student_dim, teacher_dim, n_data, **options)
