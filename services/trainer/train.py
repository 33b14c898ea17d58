"""The training loop: seeded and deterministic, bin-camera augmentation on whole batches,
class-imbalance handling (weighted loss or weighted sampling), mixed precision on CUDA,
checkpoint/resume that reproduces the run exactly, and model selection with early stopping on
the validation split."""

from __future__ import annotations

import copy
import io
import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, WeightedRandomSampler

from binloop.storage.files import write_atomically
from services.trainer.averaging import WeightAverage
from services.trainer.data import ManifestDataset
from services.trainer.mixing import BatchMixer

log = logging.getLogger(__name__)

Balance = Literal["loss", "sampler", "none"]
CHECKPOINT_FORMAT = 3
"""3: the fingerprint of the data and model, and whether the gradient scaler was on."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 24
    patience: int = 8
    batch_size: int = 16
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    min_val_items: int = 20
    """Below this many validation items their accuracy and NLL are mostly noise: keep the last
    epoch, and fit no temperature (T = 1)."""
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    flip_probability: float = 0.5
    brightness: float = 0.1
    """Brightness shift drawn from [-b, b], on the [0, 1] pixel scale."""
    contrast: float = 0.1
    """Contrast factor drawn from [1 - c, 1 + c]."""
    saturation: float = 0.0
    """Saturation factor drawn from [1 - s, 1 + s] (lighting colour casts of a bin's lamp)."""
    rotation_degrees: float = 0.0
    """Rotation drawn from [-r, r]: items land in any orientation on the bin's flap."""
    scale: tuple[float, float] = (1.0, 1.0)
    """Side of the sampled window relative to the frame: < 1 crops (zooms in), > 1 zooms out
    (reflect-padded). Augmentation only: the card's preprocessing never crops."""
    blur_probability: float = 0.0
    """Chance of a 3x3 Gaussian blur: motion and an out-of-focus camera."""
    balance: Balance = "loss"
    """Class imbalance: "loss" weights the loss by inverse class frequency, "sampler" draws
    batches with inverse-frequency weights (with replacement), "none" does neither."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing: keeps a from-scratch network from growing overconfident
    on a small dataset (temperature scaling still calibrates the result)."""
    mixed_precision: bool = True
    """float16 autocast with a gradient scaler; only ever used on CUDA."""
    mixup_alpha: float = 0.0
    """Mixup: blend each batch with a shuffled copy, share ~ Beta(a, a); 0 is off."""
    cutmix_alpha: float = 0.0
    """CutMix: paste a box of a shuffled copy, area ~ Beta(a, a); 0 is off. With mixup also on,
    each batch gets one of the two."""
    ema_decay: float = 0.0
    """Exponential moving average of the weights (e.g. 0.998); validation, selection and export
    use the average. 0 is off."""


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    train_loss: float
    val_accuracy: float | None
    val_loss: float | None
    learning_rate: float = 0.0


@dataclass
class TrainResult:
    model: nn.Module
    """The selected weights, in eval mode, on the CPU."""
    best_epoch: int
    history: list[EpochStats] = field(default_factory=list)
    resumed_from_epoch: int | None = None

    @property
    def best_val_accuracy(self) -> float | None:
        return self.history[self.best_epoch - 1].val_accuracy


def class_weights(counts: torch.Tensor) -> torch.Tensor:
    """'Balanced' weights total / (classes present * count); 0 for a class with no items."""
    counts = counts.to(torch.float32)
    present = int((counts > 0).sum())
    weights = torch.zeros_like(counts)
    mask = counts > 0
    weights[mask] = counts.sum() / (present * counts[mask])
    return weights


def resolve_device(device: str) -> str:
    """ "auto" is CUDA when this torch build sees a GPU, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


_BLUR_KERNEL = torch.tensor([1.0, 2.0, 1.0])


class Augmenter:
    """Bin-camera augmentation applied in [0, 1] pixel space to a normalised batch, so the
    network still sees exactly the card's preprocessing: horizontal flip, rotation and
    scale (one affine resampling), brightness/contrast/saturation jitter, blur. Random numbers
    are drawn only for the augmentations that are switched on, always from the CPU generator
    (so a checkpoint restores them on any device); the pixel work runs on the batch's device,
    which on a GPU keeps the augmentation off the CPU."""

    def __init__(self, config: TrainConfig, generator: torch.Generator) -> None:
        self.config = config
        self.generator = generator
        self.mean = torch.tensor(config.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(config.std).view(1, 3, 1, 1)
        kernel = torch.outer(_BLUR_KERNEL, _BLUR_KERNEL)
        self.blur_kernel = (kernel / kernel.sum()).expand(3, 1, 3, 3).contiguous()

    def _uniform(self, n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
        drawn = torch.rand(n, 1, 1, 1, generator=self.generator) * (high - low) + low
        return drawn.to(device)

    def _geometry(self, pixels: torch.Tensor) -> torch.Tensor:
        n = pixels.shape[0]
        low, high = self.config.scale
        degrees = self.config.rotation_degrees
        cpu = torch.device("cpu")
        scale = self._uniform(n, low, high, cpu).view(n)
        angle = self._uniform(n, -degrees, degrees, cpu).view(n) * (math.pi / 180)
        # A crop (scale < 1) moves anywhere inside the frame; a zoom-out stays centred.
        room = (1 - scale).clamp(min=0)
        shift = (torch.rand(n, 2, generator=self.generator) * 2 - 1) * room.unsqueeze(1)
        cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
        theta = torch.stack(
            [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)],
            1,
        ).to(pixels.device)
        grid = nn.functional.affine_grid(theta, list(pixels.shape), align_corners=False)
        return nn.functional.grid_sample(
            pixels, grid, mode="bilinear", padding_mode="reflection", align_corners=False
        )

    def _blur(self, pixels: torch.Tensor) -> torch.Tensor:
        n = pixels.shape[0]
        chosen = torch.rand(n, generator=self.generator) < self.config.blur_probability
        padded = nn.functional.pad(pixels, (1, 1, 1, 1), mode="replicate")
        blurred = nn.functional.conv2d(padded, self.blur_kernel.to(pixels.device), groups=3)
        return torch.where(chosen.to(pixels.device).view(n, 1, 1, 1), blurred, pixels)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        n, device = batch.shape[0], batch.device
        config = self.config
        mean, std = self.mean.to(device), self.std.to(device)
        flip = (torch.rand(n, generator=self.generator) < config.flip_probability).to(device)
        batch = torch.where(flip.view(n, 1, 1, 1), batch.flip(-1), batch)
        pixels = batch * std + mean
        if config.rotation_degrees > 0 or config.scale != (1.0, 1.0):
            pixels = self._geometry(pixels)
        grey = pixels.mean(dim=(1, 2, 3), keepdim=True)
        contrast = self._uniform(n, 1 - config.contrast, 1 + config.contrast, device)
        brightness = self._uniform(n, -config.brightness, config.brightness, device)
        pixels = (pixels - grey) * contrast + grey + brightness
        if config.saturation > 0:
            luma = pixels.mean(dim=1, keepdim=True)
            saturation = self._uniform(n, 1 - config.saturation, 1 + config.saturation, device)
            pixels = (pixels - luma) * saturation + luma
        pixels = pixels.clamp(0.0, 1.0)
        if config.blur_probability > 0:
            pixels = self._blur(pixels)
        return (pixels - mean) / std


@torch.no_grad()
def predict_logits(model: nn.Module, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    chunks = [
        model(inputs[i : i + batch_size].to(device)).cpu()
        for i in range(0, len(inputs), batch_size)
    ]
    return torch.cat(chunks) if chunks else torch.zeros(0)


def _validate(model: nn.Module, data: ManifestDataset) -> tuple[float, float]:
    logits = predict_logits(model, data.inputs)
    loss = float(nn.functional.cross_entropy(logits, data.targets))
    accuracy = float((logits.argmax(dim=1) == data.targets).float().mean())
    return accuracy, loss


EpochCallback = Callable[[EpochStats], None]
BatchCallback = Callable[[int, int, float], None]
"""(batches done this epoch, batches per epoch, running train loss)."""


def _sampler(
    data: ManifestDataset, config: TrainConfig, generator: torch.Generator
) -> Sampler[int] | None:
    if config.balance != "sampler":
        return None
    per_class = class_weights(data.class_counts())
    return WeightedRandomSampler(
        per_class[data.targets].tolist(), len(data), replacement=True, generator=generator
    )


def _loader(
    data: ManifestDataset, config: TrainConfig, generator: torch.Generator
) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled (or weighted-sampled) batches. A last batch of one item is dropped (a different
    item each epoch): batch norm in train mode cannot normalise a single value per channel,
    which is what one item gives once a network's feature map is down to 1x1. A dataset no
    larger than one batch is never dropped."""
    sampler = _sampler(data, config, generator)
    return DataLoader(
        data,
        batch_size=config.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator if sampler is None else None,
        drop_last=len(data) > config.batch_size and len(data) % config.batch_size == 1,
    )


Fingerprint = Mapping[str, Any]
"""What a checkpoint was trained on beyond TrainConfig (data splits, input, network, classes):
JSON values by name; a resume with another fingerprint is refused."""


def _plain(fingerprint: Fingerprint | None) -> dict[str, Any]:
    """JSON-plain values (tuples become lists), so a fingerprint compares equal to itself after
    a round trip through a checkpoint."""
    plain: dict[str, Any] = json.loads(json.dumps(dict(fingerprint or {})))
    return plain


def _save_atomically(state: dict[str, Any], path: Path) -> None:
    """A crash or a power cut while saving leaves the previous checkpoint intact: the new one
    is written and fsynced beside it, then renamed over it (binloop.storage.files)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomically(path, buffer.getvalue())


class _Run:
    """Everything that changes while training, so a checkpoint can restore all of it."""

    def __init__(
        self,
        build_model: Callable[[], nn.Module],
        train_data: ManifestDataset,
        config: TrainConfig,
        device: str,
        fingerprint: Fingerprint | None = None,
    ) -> None:
        self.config = config
        self.device = device
        self.fingerprint = _plain(fingerprint)
        self.model = build_model().to(device)
        self.shuffle = torch.Generator().manual_seed(config.seed)
        self.augment = Augmenter(config, torch.Generator().manual_seed(config.seed + 1))
        self.mix = BatchMixer(config.mixup_alpha, config.cutmix_alpha, config.seed + 2)
        self.average = WeightAverage(self.model, config.ema_decay) if config.ema_decay > 0 else None
        self.loader = _loader(train_data, config, self.shuffle)
        weights = class_weights(train_data.class_counts()).to(device)
        self.criterion = nn.CrossEntropyLoss(
            weight=weights if config.balance == "loss" else None,
            label_smoothing=config.label_smoothing,
        )
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer,
            max_lr=config.learning_rate,
            total_steps=config.epochs * len(self.loader),
        )
        self.amp = config.mixed_precision and device.startswith("cuda")
        if device.startswith("cuda"):
            # Batches keep one shape: let cuDNN time its algorithms once and keep the fastest.
            torch.backends.cudnn.benchmark = True
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.history: list[EpochStats] = []
        self.best_score: tuple[float, float] | None = None
        self.best_state = copy.deepcopy(self.selected_weights())
        self.best_epoch = 1
        self.stopped = False

    @property
    def epoch(self) -> int:
        return len(self.history)

    def selected_weights(self) -> dict[str, torch.Tensor]:
        """What validation, selection and export see: the weight average when there is one."""
        return self.average.state if self.average is not None else self.model.state_dict()

    def selected_model(self) -> nn.Module:
        if self.average is None:
            return self.model
        averaged = copy.deepcopy(self.model)
        averaged.load_state_dict(self.average.state)
        return averaged

    def train_epoch(self, on_batch: BatchCallback | None) -> float:
        self.model.train()
        total_loss, seen = 0.0, 0
        batches = len(self.loader)
        for step, (inputs, targets) in enumerate(self.loader, 1):
            self.optimizer.zero_grad(set_to_none=True)
            # Augmentation and mixing run where the network does (a GPU's work, not the CPU's).
            inputs = inputs.to(self.device, non_blocking=True)
            batch = self.mix(self.augment(inputs), targets).to(self.device)
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
                loss = batch.loss(self.criterion, self.model(batch.inputs))
            torch.autograd.backward(self.scaler.scale(loss))
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            if self.average is not None:
                self.average.update(self.model)
            total_loss += loss.item() * len(targets)
            seen += len(targets)
            if on_batch is not None:
                on_batch(step, batches, total_loss / seen)
        return total_loss / max(seen, 1)

    def state_dict(self) -> dict[str, Any]:
        cuda_rng = torch.cuda.get_rng_state_all() if self.device.startswith("cuda") else []
        return {
            "format": CHECKPOINT_FORMAT,
            "config": asdict(self.config),
            "fingerprint": self.fingerprint,
            "amp": self.amp,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "history": [asdict(stats) for stats in self.history],
            "best_score": self.best_score,
            "best_state": self.best_state,
            "best_epoch": self.best_epoch,
            "stopped": self.stopped,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": cuda_rng,
                "shuffle": self.shuffle.get_state(),
                "augment": self.augment.generator.get_state(),
                "mix": self.mix.state_dict(),
            },
            "average": self.average.state_dict() if self.average is not None else None,
        }

    def _changed_settings(self, state: dict[str, Any]) -> list[str]:
        config, fingerprint = asdict(self.config), self.fingerprint
        saved_config, saved_fingerprint = state["config"], state["fingerprint"]
        changed = {
            k for k in config.keys() | saved_config.keys() if saved_config.get(k) != config.get(k)
        }
        changed |= {
            k
            for k in fingerprint.keys() | saved_fingerprint.keys()
            if saved_fingerprint.get(k) != fingerprint.get(k)
        }
        return sorted(changed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a checkpoint onto this run's device, whatever device wrote it or it was
        loaded onto (load it onto the CPU: nothing has to travel twice)."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint format {state.get('format')} is not {CHECKPOINT_FORMAT}")
        changed = self._changed_settings(state)
        if changed:
            raise ValueError(f"the checkpoint was trained with other settings: {changed}")
        # Both copy into (or cast to) the tensors already on this run's device.
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # A run without the scaler (CPU, or AMP off) saved an empty state, which an enabled
        # scaler refuses; it then starts afresh, as it would at epoch 1.
        if self.amp and state["amp"] and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.history = [EpochStats(**stats) for stats in state["history"]]
        self.best_score = state["best_score"]
        self.best_state = state["best_state"]
        self.best_epoch = state["best_epoch"]
        self.stopped = state["stopped"]
        # Generator states are accepted as CPU ByteTensors only, even a CUDA generator's.
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        if rng["cuda"] and self.device.startswith("cuda"):
            torch.cuda.set_rng_state_all([generator.cpu() for generator in rng["cuda"]])
        self.shuffle.set_state(rng["shuffle"].cpu())
        self.augment.generator.set_state(rng["augment"].cpu())
        self.mix.load_state_dict(rng["mix"])
        if self.average is not None:
            self.average.load_state_dict(state["average"])


def train_classifier(
    build_model: Callable[[], nn.Module],
    train_data: ManifestDataset,
    val_data: ManifestDataset | None,
    config: TrainConfig,
    device: str = "cpu",
    *,
    checkpoint_path: Path | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    fingerprint: Fingerprint | None = None,
    on_epoch: EpochCallback | None = None,
    on_batch: BatchCallback | None = None,
) -> TrainResult:
    """Trains a fresh model. The same seed, data and config give the same weights (on CPU).

    With at least `min_val_items` validation items the weights of the best epoch (val accuracy,
    then val loss) are kept and training stops after `patience` epochs without progress;
    otherwise the last epoch wins (its val metrics are still recorded).

    With `checkpoint_path` the whole training state (weights, optimizer, schedule, random
    generators, history) is saved after every epoch, with `fingerprint` (what the data and
    model are); `resume=True` continues from it, and the next epoch is exactly the one the
    interrupted run would have trained. A checkpoint of another config or fingerprint is
    refused with the names of what differs. `checkpoint_every` N saves after every Nth epoch
    and the last one only (a GPU trains an epoch of a small dataset faster than the whole state
    can be written and fsynced); a resume then repeats at most N - 1 epochs.
    """
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be at least 1, not {checkpoint_every}")
    if len(train_data) < 2:
        # Batch norm cannot normalise a single item in train mode.
        raise ValueError(f"{len(train_data)} training items; training needs at least 2")
    resumed_from: int | None = None
    # fork_rng keeps our seeding from leaking into (or depending on) the rest of the process.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        run = _Run(build_model, train_data, config, device, fingerprint)
        if resume and checkpoint_path is not None and checkpoint_path.exists():
            # Onto the CPU: torch.set_rng_state and Generator.set_state take CPU tensors only;
            # load_state_dict puts weights and optimizer state on the run's device.
            run.load_state_dict(torch.load(checkpoint_path, map_location="cpu", weights_only=False))
            resumed_from = run.epoch
            log.info("resumed from %s after epoch %d", checkpoint_path, run.epoch)
        select_on_val = val_data is not None and len(val_data) >= config.min_val_items
        while not run.stopped and run.epoch < config.epochs:
            epoch = run.epoch + 1
            learning_rate = float(run.scheduler.get_last_lr()[0])
            train_loss = run.train_epoch(on_batch)
            val_accuracy = val_loss = None
            if val_data is not None and len(val_data) > 0:
                val_accuracy, val_loss = _validate(run.selected_model(), val_data)
            stats = EpochStats(epoch, train_loss, val_accuracy, val_loss, learning_rate)
            run.history.append(stats)
            if not select_on_val or val_accuracy is None or val_loss is None:
                run.best_state, run.best_epoch = copy.deepcopy(run.selected_weights()), epoch
            elif run.best_score is None or (val_accuracy, -val_loss) > run.best_score:
                run.best_score = (val_accuracy, -val_loss)
                run.best_state, run.best_epoch = copy.deepcopy(run.selected_weights()), epoch
            elif epoch - run.best_epoch >= config.patience:
                log.info("early stop after epoch %d; best was epoch %d", epoch, run.best_epoch)
                run.stopped = True
            last = run.stopped or run.epoch >= config.epochs
            if checkpoint_path is not None and (last or epoch % checkpoint_every == 0):
                _save_atomically(run.state_dict(), checkpoint_path)
            if on_epoch is not None:
                on_epoch(stats)
    model = run.model
    model.load_state_dict(run.best_state)
    model.cpu().eval()
    return TrainResult(
        model=model, best_epoch=run.best_epoch, history=run.history, resumed_from_epoch=resumed_from
    )
