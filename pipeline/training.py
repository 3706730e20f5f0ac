"""The training loop shared by teacher fine-tuning and student distillation, and evaluation."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

Batch = dict[str, torch.Tensor]


def pad_ids(ids: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id arrays to the longest: input_ids and attention_mask, both (B, T)."""
    longest = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), longest), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.from_numpy(x.astype(np.int64))
        mask[i, : len(x)] = 1
    return input_ids, mask


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


@torch.inference_mode()
def predict_logits(model: nn.Module, ids: list[np.ndarray], *, pad_id: int, batch_size: int = 32) -> np.ndarray:
    """Class logits (N, C) in input order; batches are formed from length-sorted rows."""
    model.eval()
    order = np.argsort([len(x) for x in ids], kind="stable")
    out = [None] * len(ids)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        input_ids, mask = pad_ids([ids[i] for i in index], pad_id)
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float().numpy()  # (B, C)
        for row, i in enumerate(index):
            out[i] = logits[row]
    return np.stack(out)


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
    model: nn.Module, ids: list[np.ndarray], labels: np.ndarray, *, pad_id: int, batch_size: int = 32
) -> Evaluation:
    """Accuracy, macro-F1 and CPU inference throughput (examples/s at ``batch_size``)."""
    start = time.perf_counter()
    logits = predict_logits(model, ids, pad_id=pad_id, batch_size=batch_size)
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
) -> list[EpochRecord]:
    """Train for ``epochs``, validate after each, and leave ``model`` holding its best epoch's weights.

    Args:
        trainable: modules whose parameters the optimizer updates (the model, plus e.g. projections).
        epoch_batches: the batches of epoch ``e``; each has "input_ids" (B, T).
        step_loss: the scalar loss of one batch (the model's forward pass happens inside).
        validate: metrics on the validation split; the best "accuracy" is kept.
    """
    optimizer, schedule = make_optimizer(
        trainable, lr=lr, weight_decay=weight_decay, total_steps=epochs * steps_per_epoch, warmup_ratio=warmup_ratio
    )
    history, best_state, best_accuracy = [], None, -1.0
    for epoch in range(epochs):
        model.train()
        losses, seen, start = [], 0, time.perf_counter()
        with tqdm(total=steps_per_epoch, desc=f"{desc} epoch {epoch + 1}/{epochs}", unit="step", leave=False) as bar:
            for batch in epoch_batches(epoch):
                loss = step_loss(batch)
                loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                seen += len(batch["input_ids"])
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", ex_s=f"{seen / (time.perf_counter() - start):.0f}")
        metrics = validate()
        history.append(EpochRecord(epoch + 1, float(np.mean(losses)), metrics["accuracy"], metrics["macro_f1"]))
        tqdm.write(
            f"{desc} epoch {epoch + 1}: loss {np.mean(losses):.4f}, validation accuracy {metrics['accuracy']:.4f}"
        )
        if metrics["accuracy"] > best_accuracy:
            best_accuracy = metrics["accuracy"]
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return history
