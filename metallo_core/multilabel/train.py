"""Training the heads (and any trainable encoder part): the epoch loop, test error rates, epochs to saturation.

Inputs are cached features (N, D) float32, or images (N, S, S, 3) uint8 when the encoder trains (small
CNN, unfrozen last stage), held in memory as tensors: on features an epoch is a few matrix products, so
no DataLoader or worker processes are involved. Early stopping watches a validation split of the
training rows (or, without one, the training loss); the test set is evaluated every `eval_every_epochs`
to record the error curve and never decides anything during training.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from metallo_core.errors import TrainingDiverged
from metallo_core.multilabel.config import OptimSettings
from metallo_core.multilabel.model import MultiTaskLoss, images_to_unit_tensor
from metallo_core.multilabel.properties import PropertyInfo

CUMULATIVE = "cumulative_error"
EVAL_BATCH = 512


@dataclass
class EpochRecord:
    epoch: int  # passes over the training set so far (0: before training)
    train_loss: float  # mean over the epoch's batches (NaN at epoch 0)
    errors: dict[str, float]  # property -> test error rate (classification) or MAE (regression)
    cumulative_error: float  # sum of the classification error rates (as seed 002 reports it)
    validation_loss: float = math.nan  # summed multi-task loss on the validation rows (NaN without them)
    validation_error: float = math.nan  # cumulative classification error on the validation rows


@dataclass
class TrainingHistory:
    records: list[EpochRecord] = field(default_factory=list)
    epochs_trained: int = 0
    stopped_early: bool = False
    seconds: float = 0.0
    # The epoch whose weights the network ends with (the best validation epoch when they were restored)
    # and its test errors; None: the last epoch's.
    kept: EpochRecord | None = None

    @property
    def final(self) -> EpochRecord:
        """The test errors of the weights training returns."""
        return self.kept if self.kept is not None else self.records[-1]

    @property
    def seconds_per_epoch(self) -> float:
        return self.seconds / max(self.epochs_trained, 1)

    def curve(self, name: str) -> list[float]:
        return [r.cumulative_error if name == CUMULATIVE else r.errors[name] for r in self.records]

    def epochs(self) -> list[int]:
        return [r.epoch for r in self.records]


def as_model_input(batch: torch.Tensor) -> torch.Tensor:
    return images_to_unit_tensor(batch) if batch.dtype == torch.uint8 else batch


def make_optimizer(parameters, optim: OptimSettings) -> torch.optim.Optimizer:
    if optim.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=optim.lr, weight_decay=optim.weight_decay)
    return torch.optim.Adam(parameters, lr=optim.lr, weight_decay=optim.weight_decay)


def predict_outputs(network: torch.nn.Module, inputs: torch.Tensor,
                    batch_size: int = EVAL_BATCH) -> dict[str, torch.Tensor]:
    """Raw head outputs for all of `inputs`, in eval mode, without gradients."""
    was_training = network.training
    network.eval()
    chunks: dict[str, list[torch.Tensor]] = {}
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            for name, output in network(as_model_input(inputs[start:start + batch_size])).items():
                chunks.setdefault(name, []).append(output.float())
    network.train(was_training)
    return {name: torch.cat(parts) for name, parts in chunks.items()}


def error_rates(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                properties: list[PropertyInfo]) -> dict[str, float]:
    """Classification: fraction misclassified. Regression: mean absolute error in the property's units."""
    errors = {}
    for prop in properties:
        output, target = outputs[prop.name], targets[prop.name]
        if prop.is_class:
            errors[prop.name] = float((output.argmax(-1) != target).float().mean())
        else:
            values = output * prop.target_std + prop.target_mean
            errors[prop.name] = float((values - target.float()).abs().mean())
    return errors


def cumulative_error(errors: dict[str, float], properties: list[PropertyInfo]) -> float:
    return float(sum(errors[p.name] for p in properties if p.is_class))


def evaluate(network: torch.nn.Module, inputs: torch.Tensor, targets: dict[str, torch.Tensor],
             properties: list[PropertyInfo]) -> dict[str, float]:
    return error_rates(predict_outputs(network, inputs), targets, properties)


def epochs_to_saturation(epochs: list[int], errors: list[float], tolerance: float, *, relative: bool = False) -> int:
    """The first epoch whose error is within `tolerance` of the run's lowest error (absolute, or a fraction
    of that lowest error when `relative`)."""
    if not errors:
        return 0
    lowest = min(errors)
    threshold = lowest * (1 + tolerance) if relative else lowest + tolerance
    for epoch, error in zip(epochs, errors):
        if error <= threshold + 1e-12:
            return epoch
    return epochs[-1]


def saturation_epoch(history: TrainingHistory, properties: list[PropertyInfo], tolerance: float) -> int:
    """Saturation of the cumulative classification error; for regression-only models, of the summed MAE
    with `tolerance` read as a relative margin (an absolute one has no meaning across units)."""
    if any(p.is_class for p in properties):
        return epochs_to_saturation(history.epochs(), history.curve(CUMULATIVE), tolerance)
    summed = [sum(r.errors[p.name] for p in properties) for r in history.records]
    return epochs_to_saturation(history.epochs(), summed, max(tolerance, 0.05), relative=True)


def validation_score(network: torch.nn.Module, loss_fn: MultiTaskLoss, inputs: torch.Tensor,
                     targets: dict[str, torch.Tensor], properties: list[PropertyInfo]) -> tuple[float, float]:
    """(cumulative classification error, summed multi-task loss) on held-out rows, in eval mode.

    Early stopping compares the error first and the loss only between epochs of equal error: on small
    feature sets the loss of a wide head starts rising (over-confidence) long before the error stops
    falling, so the loss alone stops far too early. Regression-only models have no error (0.0): the
    loss decides.
    """
    outputs = predict_outputs(network, inputs)
    with torch.inference_mode():
        loss, _ = loss_fn(outputs, targets)
    return cumulative_error(error_rates(outputs, targets, properties), properties), float(loss)


def _snapshot(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of what training changes: trainable parameters and buffers (BatchNorm statistics, input norm)."""
    state = {name: p.detach().clone() for name, p in network.named_parameters() if p.requires_grad}
    state.update({name: b.detach().clone() for name, b in network.named_buffers()})
    return state


def fit(
    network: torch.nn.Module,
    properties: list[PropertyInfo],
    train_inputs: torch.Tensor,
    train_targets: dict[str, torch.Tensor],
    test_inputs: torch.Tensor,
    test_targets: dict[str, torch.Tensor],
    optim: OptimSettings,
    *,
    seed: int = 0,
    max_epochs: int | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    validation_inputs: torch.Tensor | None = None,
    validation_targets: dict[str, torch.Tensor] | None = None,
) -> TrainingHistory:
    """Minibatch training of every parameter that requires grad, on in-memory tensors.

    Inputs are (N, D) float features or (N, S, S, 3) uint8 images; targets map property -> (N,) class ids
    or values. Each epoch is one shuffled pass in batches of `optim.batch_size`. With validation rows,
    training stops after `optim.patience` epochs without a better validation score (a lower cumulative
    error, or an equal one with a loss lower by `optim.min_delta`; see `validation_score`), and
    (`optim.restore_best`) the best validation epoch's weights are restored;
    without them, `patience` watches the training loss. The test set is evaluated every
    `optim.eval_every_epochs` to record the error curve and decides nothing. Raises FloatingPointError
    when the training loss diverges.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    loss_fn = MultiTaskLoss(properties)
    trainable = [p for p in network.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, optim)
    max_epochs = max_epochs or optim.max_epochs
    validating = validation_inputs is not None and validation_targets is not None and len(validation_inputs) > 0
    history = TrainingHistory()
    started = time.perf_counter()
    best, best_epoch, best_state, stale_epochs = (math.inf, math.inf), 0, None, 0
    best_record: EpochRecord | None = None
    count = len(train_inputs)
    # Epoch 0: the untrained heads, the start of every error curve.
    errors = evaluate(network, test_inputs, test_targets, properties)
    history.records.append(EpochRecord(0, math.nan, errors, cumulative_error(errors, properties)))
    for epoch in range(1, max_epochs + 1):
        network.train()
        order = torch.randperm(count, generator=generator)
        loss_sum = torch.zeros(())  # summed on the tensor side: no per-step synchronisation with Python
        for start in range(0, count, optim.batch_size):
            rows = order[start:start + optim.batch_size]
            outputs = network(as_model_input(train_inputs[rows]))
            loss, _ = loss_fn(outputs, {name: values[rows] for name, values in train_targets.items()})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(rows)
        epoch_loss = float(loss_sum) / count
        if not math.isfinite(epoch_loss):
            raise TrainingDiverged(f"training loss became {epoch_loss} at epoch {epoch}; lower optim.lr")
        watched = validation_score(network, loss_fn, validation_inputs, validation_targets, properties) \
            if validating else (0.0, epoch_loss)
        improved = (watched[0] < best[0] - 1e-12
                    or (watched[0] <= best[0] + 1e-12 and watched[1] < best[1] - optim.min_delta))
        if improved:
            best, best_epoch, stale_epochs = watched, epoch, 0
            if validating and optim.restore_best:
                best_state = _snapshot(network)
        else:
            stale_epochs += 1
        stop = bool(optim.patience) and stale_epochs >= optim.patience
        record = None
        if epoch % optim.eval_every_epochs == 0 or epoch == max_epochs or stop:
            errors = evaluate(network, test_inputs, test_targets, properties)
            record = EpochRecord(epoch, epoch_loss, errors, cumulative_error(errors, properties),
                                 watched[1] if validating else math.nan, watched[0] if validating else math.nan)
            history.records.append(record)
            if on_epoch is not None:
                on_epoch(record)
        if improved:
            best_record = record  # None when this epoch was not evaluated
        history.epochs_trained = epoch
        if stop:
            history.stopped_early = True
            break
    if best_state is not None and best_epoch != history.epochs_trained:
        network.load_state_dict(best_state, strict=False)
        if best_record is None:
            errors = evaluate(network, test_inputs, test_targets, properties)
            best_record = EpochRecord(best_epoch, math.nan, errors, cumulative_error(errors, properties), *best[::-1])
        history.kept = best_record
    history.seconds = time.perf_counter() - started
    return history


def to_tensors(inputs: np.ndarray, targets: dict[str, np.ndarray],
               rows: np.ndarray) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Row subsets of numpy inputs and targets as tensors (copies, so callers' arrays stay untouched)."""
    return (torch.from_numpy(np.ascontiguousarray(inputs[rows])),
            {name: torch.from_numpy(np.ascontiguousarray(values[rows])) for name, values in targets.items()})
