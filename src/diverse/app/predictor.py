"""Load a trained run and predict on new inputs: ``diverse.load(RUN_DIR)``.

Everything prediction needs is in the run directory: the resolved config
(``config.toml``), what it needs of the data (``data.json``: input shape,
outputs, the per-channel normalization), the latest checkpoint (safetensors),
the weight samples of a Bayesian baseline (``samples/``) and, when the run had
a validation split, its post-hoc calibration (``calibration.json``/``.npz``).
No training data is read (a run trained before ``data.json`` existed falls
back to loading its data set once for the normalization).

Inputs are given in the units of the user's data — the same units as the
files the run was trained on (e.g. images in ``[0, 1]``) — as a tensor or a
NumPy array ``(N, *input_shape)``; the stored normalization is applied here.
Predictions are exactly those of ``diverse evaluate`` (same code path, same
Monte Carlo seed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from diverse import metrics, rundir
from diverse.app.checkpointing import check_frozen
from diverse.app.loop import MODEL_FILE
from diverse.checkpoint import load_checkpoint
from diverse.data.datasets import data_spec, load_dataset, normalize, read_data_spec
from diverse.errors import UserError
from diverse.evaluation.posthoc import Calibration, load_calibration, regression_summary
from diverse.math import calibration as temperature
from diverse.methods.catalog import METHODS, Method
from diverse.metrics.conformal import RANDOM_SEED, prediction_sets
from diverse.nets.ensemble import EXECUTIONS
from diverse.nets.forms import form_from_record
from diverse.nets.heterogeneous import Heterogeneous
from diverse.nets.likelihoods import LikelihoodConfig, build_likelihood
from diverse.nets.samples import Samples, load_run_samples

__all__ = ["Prediction", "Predictor", "load"]


@dataclass(frozen=True)
class Prediction:
    """Predictive samples and their summaries.

    Classification: ``probs`` and ``logits`` ``(S, N, C)`` (``logits`` is ``None``
    after pool-then-calibrate scaling, whose output is one distribution, S = 1).
    Regression: ``means`` and ``stds`` ``(S, N, D)`` (per-sample Gaussian).
    """

    probs: Tensor | None = None
    logits: Tensor | None = None
    means: Tensor | None = None
    stds: Tensor | None = None

    @property
    def mean(self) -> Tensor:
        """``p̄ (N, C)`` or the mixture mean ``(N, D)``, float64."""
        if self.probs is not None:
            return metrics.mean_probs(self.probs)
        return self.means.to(torch.float64).mean(0)

    @property
    def std(self) -> Tensor:
        """Regression: the mixture's predictive std ``(N, D)`` (law of total variance)."""
        if self.means is None:
            raise ValueError("std is a regression summary; this is a classification prediction")
        return metrics.predictive_std(self.means, self.stds)

    @property
    def entropy(self) -> Tensor:
        """Predictive entropy ``H[p̄]`` ``(N,)`` (classification)."""
        return metrics.predictive_entropy(self._probs())

    @property
    def mutual_information(self) -> Tensor:
        """Mutual information ``(N,)`` between label and sample (classification)."""
        return metrics.mutual_information(self._probs())

    def _probs(self) -> Tensor:
        if self.probs is None:
            raise ValueError("entropy and mutual information are classification summaries")
        return self.probs

    def numpy(self) -> dict[str, np.ndarray]:
        """Every array and summary as NumPy, for ``np.savez``."""
        out: dict[str, np.ndarray] = {}
        if self.probs is not None:
            out.update(probs=self.probs.numpy(), mean=self.mean.numpy(),
                       entropy=self.entropy.numpy(),
                       mutual_information=self.mutual_information.numpy())
            if self.logits is not None:
                out["logits"] = self.logits.numpy()
        else:
            out.update(means=self.means.numpy(), stds=self.stds.numpy(), mean=self.mean.numpy(),
                       std=self.std.numpy())
        return out


class Predictor:
    """A trained run, ready to predict (built by :func:`load`).

    Attributes:
        run_dir: the run directory. cfg: its resolved config.
        data: its :class:`diverse.data.datasets.DataSpec`.
        calibration: the post-hoc :class:`diverse.evaluation.posthoc.Calibration`, or ``None``.
    """

    def __init__(self, run_dir: Path, device: torch.device | str = "cpu",
                 factory: Callable[[], nn.Module] | None = None) -> None:
        from diverse.app.config import from_mapping, load_config
        from diverse.app.train import model_description, predict_trained
        from diverse.nets import precision
        from diverse.nets.models import MODELS, build_model

        self.run_dir = Path(run_dir)
        described = rundir.has(self.run_dir, rundir.MODEL)
        configured = rundir.has(self.run_dir, rundir.CONFIG)
        if not (described or configured):
            raise UserError(f"{str(self.run_dir)!r} is not a run directory (no config.toml or "
                            f"{MODEL_FILE})")
        if not (self.run_dir / "checkpoints" / "latest.json").is_file():
            raise UserError(f"{str(self.run_dir)!r} has no checkpoint yet: train it first")
        self.device = torch.device(device)
        #: a CLI run's resolved config (None for a run trained through diverse.fit)
        self.cfg = load_config(rundir.path(self.run_dir, rundir.CONFIG)) if configured else None
        if factory is not None and self.cfg is not None:
            raise UserError("factory= is for runs trained through diverse.fit; a CLI run "
                            "builds its model from config.toml")
        # one description for every run: model.json (a CLI run written before it had one:
        # the same description, from its config.toml)
        saved = (rundir.read_json(self.run_dir, rundir.MODEL) if described
                 else model_description(self.cfg))  # type: ignore[arg-type]
        spec = read_data_spec(self.run_dir)
        if spec is None:  # only a CLI run can lack data.json: its data set says it
            spec = data_spec(load_dataset(self.cfg.data))  # type: ignore[union-attr]
        self.data = spec
        self.likelihood = build_likelihood(LikelihoodConfig(**saved["likelihood"]))
        name = saved["method"]["name"]
        if name not in METHODS:
            raise UserError(f"{self.run_dir}: unknown method {name!r} in {MODEL_FILE}")
        config = from_mapping(METHODS[name].config, saved["method"], "[method]")
        self.method = Method(config, for_training=False)
        if factory is not None:
            build = factory
        elif saved.get("model"):  # a model of the registry ([model] of a CLI run)
            model_cfg = from_mapping(MODELS[saved["model"]["name"]][0], saved["model"],
                                     "[model]")
            outputs = self.likelihood.outputs_per_target(self.data.num_outputs)

            def build() -> nn.Module:
                return build_model(model_cfg, self.data.input_shape, outputs)
        elif saved.get("groups"):  # heterogeneous: every group's factory
            build = Heterogeneous([(import_factory(g, self.run_dir), int(g["members"]))
                                   for g in saved["groups"]])
        else:
            build = import_factory(saved, self.run_dir)
        self.members = int(saved["members"])
        self.ensemble = self.method.ensemble(
            build, self.members, seed=int(saved["seed"]), device=self.device,
            execution=(saved.get("execution") if saved.get("execution") in EXECUTIONS
                       else "auto"),  # (the checkpoint's resolved choice is set below)
            members_as=form_from_record(saved.get("members_as")))
        if saved.get("precision"):  # as the run trained (bf16, compilation)
            precision.configure(self.ensemble, saved["precision"][0], bool(saved["precision"][1]),
                                double_backward=self.method.spec.double_backward, name=name)
        #: the run trained on integer inputs (token ids): ``prepare`` keeps them int64
        self.integer_inputs = saved.get("input_dtype", "float32").startswith("int")
        model_t, _optim, manifest = load_checkpoint(self.run_dir)
        check_frozen(manifest, self.ensemble.frozen_fingerprint())
        self.ensemble.load_state_tensors({k: v.to(self.device) for k, v in model_t.items()})
        self.ensemble.execution = manifest["execution"]
        self.samples: Samples | None = load_run_samples(self.run_dir, self.device)
        self.calibration: Calibration | None = load_calibration(self.run_dir)
        self._predict = predict_trained

    # ----------------------------------------------------------------- inputs
    def prepare(self, x: Tensor | np.ndarray) -> Tensor:
        """Raw inputs ``(N, *input_shape)`` in data units → normalized float32 tensor.

        A ``(N,)`` array is taken as ``(N, 1)`` for one-feature inputs. Wrong shapes,
        channels-last images and NaN/inf are refused with a one-line error.
        """
        t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
        if not (t.dtype.is_floating_point or t.dtype in (torch.uint8, torch.int16, torch.int32,
                                                          torch.int64)):
            raise UserError(f"inputs must be numeric, got dtype {t.dtype}")
        if self.integer_inputs:  # token ids (a model that embeds them): as trained, int64
            if t.dtype.is_floating_point:
                raise UserError(f"inputs must be integer ids (the run trained on int64 inputs), "
                                f"got dtype {t.dtype}")
            return t.to(torch.int64)
        t = t.to(torch.float32)
        shape = tuple(self.data.input_shape)
        if t.dim() == 1 and shape == (1,):
            t = t[:, None]
        if tuple(t.shape[1:]) != shape:
            hint = ""
            if len(shape) == 3 and tuple(t.shape[1:]) == (shape[1], shape[2], shape[0]):
                hint = " (channels-last images: channels first is expected, e.g. " \
                       "x.transpose(0, 3, 1, 2))"
            raise UserError(f"inputs have shape {tuple(t.shape)}; this run expects "
                            f"(N, {', '.join(map(str, shape))}){hint}")
        if not bool(torch.isfinite(t).all()):
            raise UserError("inputs contain NaN or inf")
        return normalize(t, self.data.mean, self.data.std)

    # -------------------------------------------------------------- prediction
    def predict(self, x: Tensor | np.ndarray, calibration: str | None = None,
                batch_size: int = 1000) -> Prediction:
        """Predictive samples on raw inputs ``x (N, *input_shape)``.

        ``calibration``: ``None`` (as trained), ``"pooled"`` (pool-then-calibrate
        temperature, one distribution ``(1, N, C)``), ``"members"`` (one temperature
        on every sample's logits, ``(S, N, C)``) or ``"std"`` (regression: the
        mixture scaled by the fitted std scale). Needs a run evaluated with a
        validation split.
        """
        raw = self._raw_prediction(self.prepare(x), batch_size)
        if calibration is None:
            return raw
        cal = self._calibration()
        if cal.task == "classification":
            if calibration not in cal.temperature:
                raise UserError(f"calibration = {calibration!r}; this run has "
                                f"{', '.join(cal.temperature)} (or None)")
            t = cal.temperature[calibration]
            probs = temperature.apply_temperature(t, calibration, probs=raw.probs,
                                                  logits=raw.logits)
            logits = None if calibration == "pooled" else raw.logits.to(torch.float64) / t
            return Prediction(probs=probs, logits=logits)
        if calibration != "std":
            raise UserError(f"calibration = {calibration!r}; a regression run has 'std' (or None)")
        means, stds = temperature.apply_std_scale(cal.std_scale, raw.means.to(torch.float64),
                                                  raw.stds.to(torch.float64))
        return Prediction(means=means, stds=stds)

    def predict_set(self, x: Tensor | np.ndarray, alpha: float, score: str = "aps",
                    batch_size: int = 1000) -> Tensor | tuple[Tensor, Tensor]:
        """Split-conformal prediction sets at miscoverage ``alpha``.

        Classification: ``(N, C)`` bool, class ``c`` in the set of input ``n``
        (``score`` ``"lac"``, ``"aps"`` or ``"raps"``, :mod:`diverse.metrics.conformal`;
        coverage ``≥ 1 − α`` for inputs exchangeable with the validation split).
        Regression: the intervals ``(lower, upper)``, each ``(N, D)``.
        """
        cal = self._calibration()
        raw = self._raw_prediction(self.prepare(x), batch_size)
        if cal.task == "classification":
            try:
                q = cal.threshold(alpha, score)
                return prediction_sets(cal.class_scores(raw.probs, score, RANDOM_SEED), q)
            except ValueError as err:
                raise UserError(str(err)) from err
        try:
            q = cal.threshold(alpha, "regression")
        except ValueError as err:
            raise UserError(str(err)) from err
        mean, std = regression_summary(raw.means, raw.stds)
        return mean - q * std, mean + q * std

    def _calibration(self) -> Calibration:
        if self.calibration is None:
            raise UserError(f"{self.run_dir} has no calibration: train with [data] "
                            "validation_fraction > 0 and evaluate it (diverse evaluate)")
        return self.calibration

    def _raw_prediction(self, x: Tensor, batch_size: int) -> Prediction:
        return Prediction(**self._predict(self.method, self.likelihood, self.ensemble,
                                          self.samples, x, batch_size))

    def __repr__(self) -> str:
        return (f"Predictor({str(self.run_dir)!r}, method={self.method.name!r}, "
                f"members={self.members}, data={self.data.name!r}, "
                f"calibrated={self.calibration is not None})")


def load(run_dir: str | Path, device: torch.device | str = "cpu",
         factory: Callable[[], nn.Module] | None = None) -> Predictor:
    """A trained run from any working directory, ready to :meth:`Predictor.predict`.

    A run trained through :func:`diverse.fit` is rebuilt with its model factory:
    re-imported from where it was defined (a top-level function or class of a
    module or script), or ``factory`` when given (needed for a lambda).
    """
    return Predictor(Path(run_dir).expanduser().resolve(), device, factory)


def import_factory(saved: dict[str, Any], run_dir: Path) -> Callable[[], nn.Module]:
    """The model factory a Python-API run recorded (``factory`` ``"module:qualname"``,
    ``file`` the script it was defined in, if run as one)."""
    import importlib
    import importlib.util

    ref, file = saved.get("factory"), saved.get("file")
    if not ref:
        raise UserError(f"{run_dir} was trained with a model factory that cannot be re-imported "
                        "(a lambda or a nested function): pass it, diverse.load(RUN, "
                        "factory=...)")
    module_name, _, qualname = ref.partition(":")
    try:
        module = None
        try:
            module = importlib.import_module(module_name)
            if file and getattr(module, "__file__", None) and \
                    Path(module.__file__).resolve() != Path(file):
                module = None  # a different module of that name: use the recorded file
        except ImportError:
            if not file:
                raise
        if module is None and file:
            # a script's top level runs again on import: only one that keeps its work
            # under a main guard is imported (else its training would run again)
            if not Path(file).is_file():
                raise ImportError(f"no such file {file!r}")
            source = Path(file).read_text(errors="replace")
            if "__name__ == \"__main__\"" not in source and \
                    "__name__ == '__main__'" not in source:
                raise ImportError(f"the script {file!r} has no `if __name__ == \"__main__\":` "
                                  "guard, so importing it would run it again")
            spec = importlib.util.spec_from_file_location(f"diverse_user_{module_name}", file)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot import {file!r}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        target: Any = module
        for part in qualname.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as err:
        raise UserError(f"{run_dir}: cannot import the model factory {ref!r} ({err}); pass it, "
                        "diverse.load(RUN, factory=...)") from err
    return target


def predict_file(run_dir: Path, inputs: Path, out: Path, calibration: str | None = None,
                 alphas: tuple[float, ...] = (), score: str = "aps") -> dict[str, Any]:
    """``diverse predict``: read ``x`` from ``inputs`` (.npz), write the prediction to ``out``.

    The .npz must hold an array ``x`` (or exactly one array). With ``alphas``,
    ``sets_<α>`` (classification) or ``lower_<α>``/``upper_<α>`` (regression) are added.
    Returns a summary (examples, keys written).
    """
    import zipfile

    from diverse.checkpoint import atomic_save_npz

    predictor = load(run_dir)
    try:
        with np.load(Path(inputs).expanduser(), allow_pickle=False) as f:
            if "x" in f.files:
                x = np.asarray(f["x"])
            elif len(f.files) == 1:
                x = np.asarray(f[f.files[0]])
            else:
                raise UserError(f"{inputs}: no array 'x' (has {sorted(f.files)}); save the "
                                "inputs with numpy.savez(PATH, x=...)")
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise UserError(f"cannot read inputs {str(inputs)!r} ({err}); give a .npz with an "
                        "array x") from err
    for alpha in alphas:
        if not 0 < alpha < 1:
            raise UserError(f"--conformal {alpha}: the miscoverage level must be in (0, 1)")
    if alphas:
        predictor._calibration()
    prediction = predictor.predict(x, calibration)
    arrays = prediction.numpy()
    for alpha in alphas:
        result = predictor.predict_set(x, alpha, score)
        if isinstance(result, tuple):
            arrays[f"lower_{alpha:g}"], arrays[f"upper_{alpha:g}"] = (r.numpy() for r in result)
        else:
            arrays[f"sets_{alpha:g}"] = result.numpy()
    atomic_save_npz(Path(out), arrays)
    return {"examples": len(x), "keys": sorted(arrays)}
