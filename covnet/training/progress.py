"""What a training run reports: one line per epoch, the curves in ``progress.png``.

``History`` holds one value per completed epoch for each curve, as plain lists (it travels in checkpoints),
so a resumed run continues the same curves without a gap.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

from covnet.runtime.atomic import atomic_path

EMA_WEIGHT = 0.9   # nnU-Net's moving average of the pseudo-Dice: 0.9 old + 0.1 new


@dataclass
class History:
    train_loss: list[float] = field(default_factory=list)
    validation_loss: list[float] = field(default_factory=list)
    pseudo_dice: list[list[float]] = field(default_factory=list)     # per foreground label, per epoch
    ema_pseudo_dice: list[float] = field(default_factory=list)
    learning_rate: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    data_wait_share: list[float] = field(default_factory=list)
    seconds_per_iteration: list[float] = field(default_factory=list)   # training steps only

    @property
    def epochs(self) -> int:
        return len(self.train_loss)

    def record(self, train_loss: float, validation_loss: float, pseudo_dice: list[float], learning_rate: float,
               seconds: float, data_wait_share: float, seconds_per_iteration: float) -> float:
        """Append one epoch; return the new moving average of the mean pseudo-Dice."""
        mean_dice = _nan_mean(pseudo_dice)
        previous = self.ema_pseudo_dice[-1] if self.ema_pseudo_dice else None
        ema = mean_dice if previous is None or math.isnan(previous) else \
            EMA_WEIGHT * previous + (1 - EMA_WEIGHT) * mean_dice
        for name, value in (("train_loss", train_loss), ("validation_loss", validation_loss),
                            ("pseudo_dice", [float(v) for v in pseudo_dice]), ("ema_pseudo_dice", ema),
                            ("learning_rate", learning_rate), ("epoch_seconds", seconds),
                            ("data_wait_share", data_wait_share),
                            ("seconds_per_iteration", seconds_per_iteration)):
            getattr(self, name).append(value)
        return ema

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict | None) -> "History":
        return cls(**(data or {}))

    def epoch_line(self, epoch_index: int, label_names: list[str]) -> str:
        i = epoch_index
        if math.isnan(self.validation_loss[i]):       # --val-iters 0, or a fold without validation cases
            validation = "no validation"
        else:
            dice = " ".join(f"{name} {value:.3f}" for name, value in zip(label_names, self.pseudo_dice[i]))
            validation = (f"val loss {self.validation_loss[i]:.4f}, pseudo-Dice {dice} "
                          f"(EMA {self.ema_pseudo_dice[i]:.3f})")
        return (f"epoch {i + 1}: train loss {self.train_loss[i]:.4f}, {validation}, lr {self.learning_rate[i]:.2e}, "
                f"{self.epoch_seconds[i]:.1f} s ({self.seconds_per_iteration[i]:.2f} s/it), "
                f"{100 * self.data_wait_share[i]:.0f}% waiting for data")


def _nan_mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def plot_progress(history: History, path: str | os.PathLike, label_names: list[str]) -> None:
    """Losses, pseudo-Dice per label and its moving average, learning rate and epoch time, per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot

    epochs = list(range(1, history.epochs + 1))
    figure, (losses, dice, rate, seconds) = pyplot.subplots(4, 1, figsize=(9, 12), sharex=True)
    losses.plot(epochs, history.train_loss, label="train loss")
    losses.plot(epochs, history.validation_loss, label="validation loss")
    losses.set_ylabel("loss")
    for index, name in enumerate(label_names):
        dice.plot(epochs, [values[index] for values in history.pseudo_dice], alpha=0.6, label=name)
    dice.plot(epochs, history.ema_pseudo_dice, color="black", linewidth=2, label="mean (moving average)")
    dice.set_ylabel("pseudo-Dice")
    dice.set_ylim(0, 1)
    rate.plot(epochs, history.learning_rate)
    rate.set_ylabel("learning rate")
    seconds.plot(epochs, history.epoch_seconds, label="epoch")
    seconds.set_ylabel("seconds")
    seconds.set_xlabel("epoch")
    for axes in (losses, dice):
        axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=80)
    pyplot.close(figure)
