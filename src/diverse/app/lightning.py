"""Train any diverse method with Lightning's ``Trainer``: ``pip install 'diverse[lightning]'``.

:class:`DiverseModule` is a ``LightningModule`` around an
:class:`~diverse.nets.ensemble.Ensemble` and a :class:`~diverse.methods.catalog.Method`. It
uses manual optimization: each ``training_step`` sets the scheduled learning
rate, calls the method's update on the batch (the same
:class:`~diverse.methods.base.Step` that :func:`diverse.fit` builds) and takes the
optimizer step with the gradient the method returned (a sampler, whose update
moves the parameters itself, takes none). Lightning then brings its own
callbacks, loggers, checkpointing and device placement; the ensemble is an
``nn.Module``, so ``Trainer`` moves and saves it like any other.

Logged: ``train_loss`` (the method's objective per example), ``train_nll``,
``train_accuracy`` / ``train_neg_mse``, the method's diagnostics as
``diag_<name>``, and on validation batches ``val_nll`` and ``val_accuracy`` /
``val_rmse`` of the pooled prediction. A Bayesian baseline's weight samples are
drawn at the end of training (``module.samples``).

Departures from :func:`diverse.fit`: Lightning owns the data loop, so the
per-epoch reseeding of the loader and the mid-epoch resume are Lightning's
(``seed_everything`` and its fault-tolerant checkpoints), and Lightning's
``precision`` plugins do not apply to the method's update (use the ensemble's
own precision, :mod:`diverse.nets.precision`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diverse.app.config import TrainConfig
from diverse.app.optim import build_optimizer, schedule_factor
from diverse.errors import UserError
from diverse.evaluation.prediction import member_outputs
from diverse.methods.base import LogPosterior, StepResult
from diverse.methods.catalog import Method, check_training
from diverse.methods.train_step import train_step
from diverse.nets.ensemble import Ensemble
from diverse.nets.likelihoods import Likelihood, LikelihoodConfig, as_likelihood
from diverse.nets.samples import Samples

try:
    import lightning as L
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("diverse.app.lightning needs Lightning: pip install 'diverse[lightning]'"
                      ) from err


class DiverseModule(L.LightningModule):
    """A ``LightningModule`` that trains ``ensemble`` with ``method``.

    Args:
        ensemble: the members, from ``method.ensemble(factory, M)``.
        method: a :class:`~diverse.methods.catalog.Method`.
        n_train: the training-set size N (the likelihood's weight in the posterior).
        likelihood: ``"categorical"``, ``"gaussian"``, a config or a built likelihood.
        train: optimizer, learning rate, schedule, prior σ and seed
            (:class:`~diverse.app.config.TrainConfig`); the number of steps comes from
            the ``Trainer`` (``estimated_stepping_batches``).
    """

    def __init__(self, ensemble: Ensemble, method: Method, *, n_train: int,
                 likelihood: Likelihood | LikelihoodConfig | str = "categorical",
                 train: TrainConfig | None = None) -> None:
        super().__init__()
        method.check_ensemble(ensemble)
        self.automatic_optimization = False
        self.ensemble = ensemble
        self.method = method
        self.n_train = n_train
        self.train_cfg = train if train is not None else TrainConfig()
        check_training(method.name, self.train_cfg.prior_std, self.train_cfg.weight_decay)
        self.likelihood = as_likelihood(likelihood)
        self.target = LogPosterior(self.likelihood, n_train, self.train_cfg.prior_std)
        # the method's state: buffers of this module, so Lightning checkpoints hold them
        self._state_names = []
        for name, value in method.init_state(ensemble).items():
            self.register_buffer(f"method_state_{name}", value)
            self._state_names.append(name)
        # the step counter is state: saved in Lightning's checkpoints with the weights
        self.register_buffer("diverse_step", torch.zeros((), dtype=torch.int64))
        self.samples: Samples | None = None

    def method_state(self) -> dict[str, Tensor]:
        """The method's state ``{name: (M, ...)}`` (this module's ``method_state_*`` buffers)."""
        return {name: getattr(self, f"method_state_{name}") for name in self._state_names}

    def forward(self, x: Tensor) -> Tensor:
        """Outputs of every predictive sample ``(S, B, ...)``."""
        return member_outputs(self.ensemble, x, self.method.prediction_draws())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        t = self.train_cfg
        return build_optimizer(list(self.ensemble.trainable.values()), t.optimizer, t.lr,
                               momentum=t.momentum, nesterov=t.nesterov,
                               betas=(t.betas[0], t.betas[1]), weight_decay=t.weight_decay)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        t = self.train_cfg
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        index = int(self.diverse_step)
        progress = index / total
        optimizer = self.optimizers()
        lr = t.lr * schedule_factor(t.schedule, progress, final=t.final_lr_factor)
        for group in optimizer.param_groups:
            group["lr"] = lr
        result = train_step(self.ensemble, self.method, optimizer, (x, y), self.target,
                            progress=progress, index=index, state=self.method_state(),
                            check=_finite(index))
        self.diverse_step += 1
        fit_name = ("train_accuracy" if self.likelihood.task == "classification"
                    else "train_neg_mse")
        figures = {"train_loss": result.loss.mean(),
                   "train_nll": self.likelihood.nll(result.outputs, y).mean(),
                   fit_name: self.likelihood.correct(result.outputs, y).mean(), "lr": lr}
        figures.update({f"diag_{k}": float(v) for k, v in result.logs.items()})
        self.log_dict(figures, on_step=True, on_epoch=True, batch_size=len(y))

    @torch.no_grad()
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        pred = self.likelihood.predict(self(x))
        if "probs" in pred:
            mean = pred["probs"].double().mean(0)
            figures = {"val_nll": -mean.gather(1, y[:, None]).clamp_min(1e-45).log().mean(),
                       "val_accuracy": (mean.argmax(1) == y).double().mean()}
        else:
            target = y if y.dim() > 1 else y[:, None]
            figures = {"val_rmse": (pred["means"].mean(0) - target).square().mean().sqrt()}
        self.log_dict(figures, on_epoch=True, batch_size=len(y))

    @torch.no_grad()
    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.likelihood.predict(self(x))

    def on_train_end(self) -> None:
        """A Bayesian baseline's weight samples (``self.samples``)."""
        state = self.method_state()
        self.samples = self.method.finalize(self.ensemble, self.train_cfg.seed,
                                            self.train_cfg.prior_std, state)


def _finite(index: int) -> Callable[[StepResult], None]:
    """The divergence stop of a Lightning step: a non-finite loss is never applied."""

    def check(result: StepResult) -> None:
        if not bool(torch.isfinite(result.loss).all()):
            raise UserError(f"non-finite loss at step {index + 1}")

    return check
