"""``diverse posterior``: the symmetry-aware posterior study on a small network.

Laurent, Aldea & Franchi, "A symmetry-aware exploration of Bayesian neural
network posteriors" (ICLR 2024). Protocol:

1. **Reference posterior**: ``reference`` networks (default 1000) trained
   independently from their own initializations — one vectorized deep
   ensemble with ``[train] seed = reference_seed``, checkpointed in
   ``OUT/reference`` and reused (or resumed) on the next call.
2. **Methods**: every method of ``methods`` in its single-mode form (M = 1)
   and multi-mode form (M = ``members``), for ``seeds`` seeds (``[train] seed``
   0, 1, …). Every run yields the same number of weight samples, ``samples``
   (a fair MMD): ``samples / M`` draws per member (:mod:`diverse.nets.samples`).
   A deep ensemble is multi-mode only and has ``samples`` members (one
   network has no spread). Runs live in ``OUT/runs/<method>-<mode>-seed<k>``;
   a finished run (``row.json``) is reused, an interrupted one resumes.
3. **MMD** (:func:`diverse.math.mmd.mmd`, mean MMD² over Gaussian and Laplace
   kernels × 10 bandwidths) between a run's flattened weight samples and the
   reference, before and after symmetry removal
   (:func:`diverse.nets.symmetry.remove_symmetries`, ``scaling`` then canonical
   permutation, applied to both sides). The noise floor is the MMD between
   ``samples`` reference networks and the other ``reference − samples``.
4. **Uncertainty**: accuracy, ECE, ACE, Brier, NLL on the test set; AUPR
   (OOD as positive) and FPR95 with the predictive entropy as score against
   the ``ood`` set; mean mutual information in- and out-of-distribution.

Outputs in ``OUT``: ``results.csv`` (one row per run), ``results.md`` and
``results.html`` (mean ± std over seeds per method and mode, sample std),
``plots/pca.png`` (held-out reference networks and seed-0 samples projected on
the reference's first two principal components, before and after symmetry
removal) and
``plots/mmd.png`` (MMD per method and mode, before/after).

Config (TOML, every key optional): ``[study]`` (:class:`StudyConfig`), the run
sections ``[data]``, ``[model]``, ``[ensemble]``, ``[train]``, ``[likelihood]``
shared by the reference and every method (a section given replaces the
default section of :data:`DEFAULT_RUN` as a whole), and ``[overrides]``:
per method a list of ``"section.key=value"`` changes for that method's runs
(e.g. its ``[method]`` options, or ``model.dropout`` for MC dropout), default
:data:`DEFAULT_OVERRIDES` for methods not listed. Overrides may not change the
data, the architecture (``model.*`` except ``dropout``), ``ensemble.members``,
``train.seed`` or ``method.name``/``predict_samples``: those define the
comparison.
"""

from __future__ import annotations

from diverse.app.posterior.config import (
    DEFAULT_OVERRIDES,
    DEFAULT_RUN,
    DEFAULT_STUDY_METHODS,
    STUDY_METHODS,
    PosteriorConfig,
    RunSpec,
    StudyConfig,
    hmc_reference_config,
    load_posterior_config,
    posterior_config,
    reference_config,
    run_specs,
)
from diverse.app.posterior.runner import canonical, mmd_value, run_study, train_or_reuse
from diverse.app.posterior.tables import results_markdown, summarize, write_results

__all__ = ["DEFAULT_OVERRIDES", "DEFAULT_RUN", "DEFAULT_STUDY_METHODS", "STUDY_METHODS",
           "PosteriorConfig", "RunSpec", "StudyConfig", "canonical", "hmc_reference_config",
           "load_posterior_config", "mmd_value", "posterior_config", "reference_config",
           "results_markdown", "run_specs", "run_study", "summarize", "train_or_reuse",
           "write_results"]
