"""The training loop shared by teacher fine-tuning and student distillation, and evaluation."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from cache_store import ShardRows

from .errors import CheckpointError
from .runtime import CPU, autocast
from .tasks.base import Outputs, Task, padded
from .tracking import Tracker

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Collator:
    """Turns unpadded token id arrays into a model's inputs, right-padded to the longest row.

    For models with segment embeddings (BERT's ``type_vocab_size`` > 1) it also derives
    ``token_type_ids`` from the separator: 0 up to and including the first [SEP], 1 after,
    which is what the tokenizer produces for a sentence pair and all zeros for one text.
    """

    pad_id: int
    sep_id: int | None = None  # None: the model has no segment embeddings

    @classmethod
    def for_model(cls, tokenizer, model_config) -> Collator:
        segments = getattr(model_config, "type_vocab_size", 1) > 1 and tokenizer.sep_token_id is not None
        return cls(tokenizer.pad_token_id, tokenizer.sep_token_id if segments else None)

    @classmethod
    def for_tokenizer(cls, tokenizer) -> Collator:
        """Every input any model of this tokenizer takes (segment ids included); each model picks its ``inputs``."""
        return cls(tokenizer.pad_token_id, tokenizer.sep_token_id)

    @property
    def inputs(self) -> tuple[str, ...]:
        """The batch keys this collator makes: what a model of its kind is called with."""
        return (
            ("input_ids", "attention_mask", "token_type_ids")
            if self.sep_id is not None
            else ("input_ids", "attention_mask")
        )

    def __call__(self, ids: list[np.ndarray]) -> Batch:
        """input_ids, attention_mask (and token_type_ids), each (B, T) int64."""
        lengths = np.array([len(x) for x in ids])
        input_ids = np.full((len(ids), lengths.max()), self.pad_id, dtype=np.int64)
        mask = np.arange(lengths.max()) < lengths[:, None]
        input_ids[mask] = np.concatenate(ids)
        batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask.astype(np.int64))}
        if self.sep_id is not None:
            separators = input_ids == self.sep_id
            segment = (np.cumsum(separators, axis=1) - separators) > 0  # a [SEP] lies before this position
            batch["token_type_ids"] = torch.from_numpy((segment & mask).astype(np.int64))
        return batch


def token_budget_batches(lengths: np.ndarray, *, max_rows: int, max_tokens: int) -> list[np.ndarray]:
    """Row indices sorted by length and cut into batches of at most ``max_rows`` rows and
    ``max_tokens`` padded tokens (rows x longest row); a row longer than the budget goes alone.

    The batches depend only on the lengths and the two limits, so a window of rows is
    always cut the same way.
    """
    order = np.argsort(lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        end = start + 1
        # sorted ascending, so the batch's longest row is its last
        while end < len(order) and end - start < max_rows and (end + 1 - start) * lengths[order[end]] <= max_tokens:
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


def length_grouped_batches(
    lengths: np.ndarray, batch_size: int, rng: np.random.Generator, *, window: int = 50
) -> list[np.ndarray]:
    """Random batches of rows of similar length, so little compute goes to padding.

    Rows are shuffled, sorted by length within windows of ``window`` batches, cut into
    batches, and the batches shuffled (as HF's ``group_by_length`` does).
    """
    order = rng.permutation(len(lengths))
    batches = []
    for start in range(0, len(order), batch_size * window):
        chunk = order[start : start + batch_size * window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def collate_rows(collate: Collator, rows: ShardRows, index: np.ndarray, fills: dict[str, int]) -> Batch:
    """A batch of the rows at ``index``: the model inputs, and each column of ``fills`` (stacked, or
    padded to the batch's length with its fill where it is per token); integer columns as int64."""
    batch = collate([rows.input_ids[i] for i in index])
    length = batch["input_ids"].shape[1]
    for name, fill in fills.items():
        batch[name] = column_batch(rows, name, index, length, fill)
    return batch


def column_batch(rows: ShardRows, name: str, index: np.ndarray, length: int, fill) -> torch.Tensor:
    """Column ``name`` of the rows at ``index``: stacked, or padded to ``length`` with ``fill`` where it is
    per token; integers as int64."""
    value = rows[name]
    value = value[index] if isinstance(value, np.ndarray) else padded([value[i] for i in index], length, fill)
    return torch.from_numpy(value.astype(np.int64) if value.dtype.kind == "i" else value)


@torch.inference_mode()
def predict(model: nn.Module, rows: ShardRows, *, task: Task, collate: Collator, batch_size: int = 32) -> Outputs:
    """What the task's metrics read of each row (``Task.batch_outputs``: logits (N, C), per token N arrays
    (L_i, C), or a causal LM's per-block sums), in row order; batches are formed from length-sorted rows."""
    model.eval()
    device = next(model.parameters()).device
    ids = rows.input_ids
    order = np.argsort(rows.lengths, kind="stable")
    out = [None] * len(ids)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = to_device(collate_rows(collate, rows, index, task.batch_columns), device)
        real = batch["attention_mask"].flatten().nonzero().squeeze(1)
        values = (
            task.batch_outputs(task.outputs(model(**{k: batch[k] for k in collate.inputs})), batch, real).cpu().numpy()
        )
        for i, value in zip(index, split_rows(values, [len(ids[i]) for i in index], task.outputs_per_token),
                            strict=True):  # fmt: skip
            out[i] = value
    if task.outputs_per_token:
        return out
    return np.stack(out) if out else np.zeros((0, model.config.num_labels), np.float32)


def split_rows(values: np.ndarray, lengths: list[int] | np.ndarray, per_token: bool) -> list[np.ndarray]:
    """A batch's packed outputs as one array per row: (B, ...) row by row, or per token (tokens, C) by lengths."""
    if not per_token:
        return list(values)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [values[bounds[i] : bounds[i + 1]] for i in range(len(lengths))]


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]  # the task's metrics
    examples_per_s: float
    tokens_per_s: float


def evaluate(model: nn.Module, rows: ShardRows, *, task: Task, label_names: tuple[str, ...], collate: Collator,
             batch_size: int = 32) -> Evaluation:  # fmt: skip
    """The task's metrics of the model over ``rows`` and its inference throughput (rows/s and tokens/s
    at ``batch_size``)."""
    start = time.perf_counter()
    outputs = predict(model, rows, task=task, collate=collate, batch_size=batch_size)
    elapsed = time.perf_counter() - start
    return Evaluation(task.metrics(outputs, rows, label_names), len(rows) / elapsed, rows.lengths.sum() / elapsed)


def make_optimizer(modules: list[nn.Module], *, lr: float, weight_decay: float, total_steps: int, warmup_ratio: float):
    """AdamW (no decay on biases and norms) with linear warmup then linear decay."""
    decay, no_decay = [], []
    for module in modules:
        for name, param in module.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    warmup = int(warmup_ratio * total_steps)
    return optimizer, get_linear_schedule_with_warmup(optimizer, warmup, total_steps)


@dataclass
class EpochRecord:
    epoch: int
    steps: int  # optimizer steps taken from the start of training to the end of this epoch
    train_loss: float
    validation: dict[str, float]  # the task's metrics on the validation split


class Checkpoint:
    """A training run's resumable state in one file, replaced atomically.

    It holds the trainable modules, optimizer, schedule, loss scaler, RNG states, the
    position (epoch, step within it), the history and the best weights so far. It is read
    with ``torch.load(weights_only=True)``: tensors and plain containers only, no pickled code.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # a file that torch cannot read back is not a checkpoint we can trust
            raise CheckpointError(f"checkpoint {self.path} is unreadable ({e}); delete it to start over") from None

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seeded_rng_state(seed: int) -> dict:
    """The RNG state ``torch.manual_seed(seed)`` gives, without touching the current one."""
    saved = _rng_state()
    torch.manual_seed(seed)
    state = _rng_state()
    _set_rng_state(saved)
    return state


StepLoss = Callable[[Batch, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class Learner:
    """One model that ``fit`` trains; several learners share every batch (many students, one pass).

    Each learner has its own optimizer, schedule and random state (dropout), so it trains
    exactly as it would alone.
    """

    name: str
    model: nn.Module  # what ``validate`` evaluates; left holding its best epoch's weights
    trainable: list[nn.Module]  # modules whose parameters the optimizer updates (model, projections)
    step_loss: StepLoss  # (batch on the device, global step) -> (loss, each term's value)
    validate: Callable[[], dict[str, float]]  # metrics on the validation split; the best ``primary_metric`` is kept
    lr: float
    weight_decay: float
    warmup_ratio: float
    primary_metric: str  # the validation metric whose best epoch is kept (the task's)
    lower_is_better: bool = False  # the primary metric is best when lowest (perplexity)
    seed: int = 0  # seeds this learner's random state
    history: list[EpochRecord] = dataclasses.field(default_factory=list)


class _LearnerState:
    """What ``fit`` keeps for a learner while training, and saves in checkpoints."""

    def __init__(self, learner: Learner, total_steps: int, device: torch.device, precision: torch.dtype):
        self.learner = learner
        self.optimizer, self.schedule = make_optimizer(
            learner.trainable, lr=learner.lr, weight_decay=learner.weight_decay, total_steps=total_steps,
            warmup_ratio=learner.warmup_ratio,
        )  # fmt: skip
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)
        self.rng = seeded_rng_state(learner.seed)
        self.best_state, self.best_score, self.losses = None, -float("inf"), []

    def step(self, batch: Batch, global_step: int, device: torch.device, precision: torch.dtype) -> dict[str, float]:
        _set_rng_state(self.rng)
        with autocast(device, precision):
            loss, parts = self.learner.step_loss(batch, global_step)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.rng = _rng_state()
        self.losses.append(loss.item())
        return {"total": self.losses[-1], **{k: float(v) for k, v in parts.items()}}

    def end_epoch(self, epoch: int, steps: int) -> dict[str, float]:
        metrics = self.learner.validate()
        self.learner.history.append(EpochRecord(epoch + 1, steps, float(np.mean(self.losses)), metrics))
        score = metrics[self.learner.primary_metric] * (-1 if self.learner.lower_is_better else 1)
        if score > self.best_score:
            self.best_score = score
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.learner.model.state_dict().items()}
        self.losses = []
        return metrics

    def state_dict(self) -> dict:
        return {
            "trainable": [m.state_dict() for m in self.learner.trainable], "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(), "scaler": self.scaler.state_dict(), "rng": self.rng,
            "history": [dataclasses.asdict(h) for h in self.learner.history], "best_state": self.best_state,
            "best_score": self.best_score, "losses": self.losses,
        }  # fmt: skip

    def load_state_dict(self, saved: dict) -> None:
        for module, state in zip(self.learner.trainable, saved["trainable"], strict=True):
            module.load_state_dict(state)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.schedule.load_state_dict(saved["schedule"])
        self.scaler.load_state_dict(saved["scaler"])
        self.rng, self.best_state, self.best_score = saved["rng"], saved["best_state"], saved["best_score"]
        self.learner.history[:] = [EpochRecord(**record) for record in saved["history"]]
        self.losses = list(saved["losses"])


def fit(
    learners: list[Learner],
    *,
    epochs: int,
    steps_per_epoch: int | Sequence[int],
    epoch_batches: Callable[[int, int], Iterable[Batch]],
    desc: str,
    device: torch.device = CPU,
    precision: torch.dtype = torch.float32,
    checkpoint: Checkpoint | None = None,
    checkpoint_steps: int = 500,
    trackers: Sequence[Tracker] | None = None,
    epoch_scalars: Callable[[int], dict[str, float]] | None = None,
    quiet: bool = False,
) -> None:
    """Train every learner on the same batches for ``epochs``, validate each after every
    epoch, and leave each model holding its best epoch's weights (history in ``learner.history``).

    Args:
        steps_per_epoch: batches per epoch: the same for every epoch, or one count per epoch.
        epoch_batches: ``(epoch, start)`` -> the batches of that epoch from batch ``start`` on;
            the same each time it is called (a resumed run starts where the checkpoint stopped).
        precision: autocast dtype on ``device``; float16 adds dynamic loss scaling.
        checkpoint: where to save every learner's state and the position every
            ``checkpoint_steps`` steps and after every epoch, and to resume from when it
            exists; the caller removes it once the results are saved.
        trackers: one per learner (``tracking.open_trackers``), closed at the end: every loss term, the
            learning rate and examples/s per step, validation metrics per epoch.
        epoch_scalars: ``epoch`` -> scalars every tracker records at the epoch's first step (rows kept).
        quiet: no progress bar or messages (the other ranks of a torchrun job).
    """
    per_epoch = [steps_per_epoch] * epochs if isinstance(steps_per_epoch, int) else list(steps_per_epoch)
    first_steps = np.concatenate([[0], np.cumsum(per_epoch)]).tolist()  # each epoch's first global step
    total_steps = first_steps[-1]
    states = [_LearnerState(learner, total_steps, device, precision) for learner in learners]
    first_epoch, first_step = 0, 0
    say = _silent if quiet else tqdm.write
    saved = checkpoint.load() if checkpoint else None
    if saved is not None:
        try:
            for state in states:
                state.load_state_dict(saved["learners"][state.learner.name])
        except (KeyError, TypeError) as e:
            raise CheckpointError(
                f"checkpoint {checkpoint.path} holds another run's state or another kdcache version's ({e!r}); "
                "delete it to start over"
            ) from None
        first_epoch, first_step = saved["epoch"], saved["step"]
        say(f"{desc}: resuming from {checkpoint.path} at epoch {first_epoch + 1}, step {first_step}")
    writers = list(trackers) if trackers is not None else [Tracker() for _ in learners]

    def save(epoch: int, step: int) -> None:
        learner_states = {state.learner.name: state.state_dict() for state in states}
        checkpoint.save({"epoch": epoch, "step": step, "learners": learner_states})

    for epoch in range(first_epoch, epochs):
        for learner in learners:
            learner.model.train()
        step = first_step if epoch == first_epoch else 0
        seen, start = 0, time.perf_counter()
        for name, value in (epoch_scalars(epoch) if epoch_scalars else {}).items():
            for writer in writers:
                writer.add_scalar(name, value, first_steps[epoch])
        bar = tqdm(total=per_epoch[epoch], initial=step, desc=f"{desc} epoch {epoch + 1}/{epochs}", unit="step",
                   leave=False, disable=quiet)  # fmt: skip
        with bar:
            for batch in epoch_batches(epoch, step):
                batch = to_device(batch, device)
                global_step = first_steps[epoch] + step
                terms = [state.step(batch, global_step, device, precision) for state in states]
                seen, step = seen + len(batch["input_ids"]), step + 1
                rate = seen / (time.perf_counter() - start)
                for writer, state, values in zip(writers, states, terms, strict=True):
                    for name, value in values.items():
                        writer.add_scalar(f"loss/{name}", value, global_step)
                    writer.add_scalar("learning_rate", state.schedule.get_last_lr()[0], global_step)
                    writer.add_scalar("examples_per_s", rate, global_step)
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(states[0].losses[-50:]):.4f}", ex_s=f"{rate:.0f}")
                if checkpoint and step % checkpoint_steps == 0 and step < per_epoch[epoch]:
                    save(epoch, step)
        for writer, state in zip(writers, states, strict=True):
            metrics = state.end_epoch(epoch, first_steps[epoch + 1])
            record = state.learner.history[-1]
            for name, value in metrics.items():
                writer.add_scalar(f"validation/{name}", value, first_steps[epoch + 1])
            primary = state.learner.primary_metric
            say(f"{state.learner.name} epoch {epoch + 1}: loss {record.train_loss:.4f}, "
                f"validation {primary} {record.validation[primary]:.4f}")  # fmt: skip
        if checkpoint and epoch + 1 < epochs:
            save(epoch + 1, 0)
    for writer in writers:
        writer.close()
    for state in states:
        state.learner.model.load_state_dict(state.best_state)


def _silent(message: str) -> None:
    pass
