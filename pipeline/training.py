"""The training loop shared by teacher fine-tuning and student distillation, and evaluation."""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from .runtime import CPU, autocast

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


@torch.inference_mode()
def predict_logits(model: nn.Module, ids: list[np.ndarray], *, collate: Collator, batch_size: int = 32) -> np.ndarray:
    """Class logits (N, C) in input order; batches are formed from length-sorted rows."""
    model.eval()
    device = next(model.parameters()).device
    order = np.argsort([len(x) for x in ids], kind="stable")
    out = np.zeros((len(ids), model.config.num_labels), np.float32)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        out[index] = model(**to_device(collate([ids[i] for i in index]), device)).logits.float().cpu().numpy()
    return out


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 of argmax predictions against integer labels."""
    predictions = logits.argmax(-1)
    f1s = []
    for c in range(logits.shape[-1]):
        tp = np.sum((predictions == c) & (labels == c))
        predicted, actual = np.sum(predictions == c), np.sum(labels == c)
        f1s.append(0.0 if predicted + actual == 0 else 2 * tp / (predicted + actual))
    return {"accuracy": float(np.mean(predictions == labels)), "macro_f1": float(np.mean(f1s))}


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    macro_f1: float
    examples_per_s: float


def evaluate(
    model: nn.Module, ids: list[np.ndarray], labels: np.ndarray, *, collate: Collator, batch_size: int = 32
) -> Evaluation:
    """Accuracy, macro-F1 and inference throughput (examples/s at ``batch_size``)."""
    start = time.perf_counter()
    logits = predict_logits(model, ids, collate=collate, batch_size=batch_size)
    elapsed = time.perf_counter() - start
    metrics = classification_metrics(logits, labels)
    return Evaluation(metrics["accuracy"], metrics["macro_f1"], len(ids) / elapsed)


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
    train_loss: float
    validation_accuracy: float
    validation_macro_f1: float


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
            raise ValueError(f"checkpoint {self.path} is unreadable ({e}); delete it to start over") from None

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


def fit(
    model: nn.Module,
    *,
    trainable: list[nn.Module],
    epochs: int,
    steps_per_epoch: int,
    epoch_batches: Callable[[int], Iterable[Batch]],
    step_loss: Callable[[Batch], torch.Tensor],
    validate: Callable[[], dict[str, float]],
    lr: float,
    weight_decay: float,
    warmup_ratio: float,
    desc: str,
    device: torch.device = CPU,
    precision: torch.dtype = torch.float32,
    checkpoint: Checkpoint | None = None,
    checkpoint_steps: int = 500,
) -> list[EpochRecord]:
    """Train for ``epochs``, validate after each, and leave ``model`` holding its best epoch's weights.

    Args:
        trainable: modules whose parameters the optimizer updates (the model, plus e.g. projections).
        epoch_batches: the batches of epoch ``e``, the same each time it is called; each has
            "input_ids" (B, T). A resumed run skips the batches the checkpoint had done.
        step_loss: the scalar loss of one batch, already on ``device`` (the forward pass happens inside).
        validate: metrics on the validation split; the best "accuracy" is kept.
        precision: autocast dtype on ``device``; float16 adds dynamic loss scaling.
        checkpoint: where to save the state every ``checkpoint_steps`` steps and after every
            epoch, and to resume from when it exists; the caller removes it once the result is saved.
    """
    optimizer, schedule = make_optimizer(
        trainable, lr=lr, weight_decay=weight_decay, total_steps=epochs * steps_per_epoch, warmup_ratio=warmup_ratio
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)
    history, best_state, best_accuracy, first_epoch, first_step = [], None, -1.0, 0, 0
    saved = checkpoint.load() if checkpoint else None
    if saved is not None:
        for module, state in zip(trainable, saved["trainable"], strict=True):
            module.load_state_dict(state)
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        scaler.load_state_dict(saved["scaler"])
        _set_rng_state(saved["rng"])
        history = [EpochRecord(**record) for record in saved["history"]]
        best_state, best_accuracy = saved["best_state"], saved["best_accuracy"]
        first_epoch, first_step = saved["epoch"], saved["step"]
        tqdm.write(f"{desc}: resuming from {checkpoint.path} at epoch {first_epoch + 1}, step {first_step}")

    def save(epoch: int, step: int, losses: list[float]) -> None:
        checkpoint.save({
            "trainable": [m.state_dict() for m in trainable], "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(), "scaler": scaler.state_dict(), "rng": _rng_state(),
            "history": [dataclasses.asdict(h) for h in history], "best_state": best_state,
            "best_accuracy": best_accuracy, "epoch": epoch, "step": step, "losses": losses,
        })  # fmt: skip

    for epoch in range(first_epoch, epochs):
        model.train()
        resumed = epoch == first_epoch and saved is not None
        losses = list(saved["losses"]) if resumed else []
        step = first_step if resumed else 0
        seen, start = 0, time.perf_counter()
        bar = tqdm(total=steps_per_epoch, initial=step, desc=f"{desc} epoch {epoch + 1}/{epochs}", unit="step",
                   leave=False)  # fmt: skip
        with bar:
            for batch in itertools.islice(epoch_batches(epoch), step, None):
                with autocast(device, precision):
                    loss = step_loss(to_device(batch, device))
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                seen, step = seen + len(batch["input_ids"]), step + 1
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", ex_s=f"{seen / (time.perf_counter() - start):.0f}")
                if checkpoint and step % checkpoint_steps == 0 and step < steps_per_epoch:
                    save(epoch, step, losses)
        metrics = validate()
        history.append(EpochRecord(epoch + 1, float(np.mean(losses)), metrics["accuracy"], metrics["macro_f1"]))
        tqdm.write(
            f"{desc} epoch {epoch + 1}: loss {np.mean(losses):.4f}, validation accuracy {metrics['accuracy']:.4f}"
        )
        if metrics["accuracy"] > best_accuracy:
            best_accuracy = metrics["accuracy"]
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if checkpoint and epoch + 1 < epochs:
            save(epoch + 1, 0, [])
    model.load_state_dict(best_state)
    return history
