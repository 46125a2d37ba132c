r"""The demo behind ``make demo``: adapt a trained network to a new task, four ways.

A source network is trained on plenty of data from a source task (and cached in a user cache
directory). A *target* task is then observed at a few points, and the adaptations are scored
on the target's held-out test points.

**Regression** (``sine``, ``diabetes``):

* **source network** — the trained network as it is, no adaptation (reference);
* **NTK-GP (pyro_ntk)** — :class:`~pyro_ntk.NTKGPRegression`: the GP whose mean is the
  network and whose kernel is its empirical NTK; the noise s² and the kernel variance σ²
  (or one per layer) start from values scaled to the data and are fitted by
  :func:`~pyro_ntk.infer.fit` (L-BFGS on the exact marginal likelihood). The network is not
  trained;
* **fine-tuning** — a copy of the network trained on the target points by Adam;
* **last layer retrained** — a copy whose last ``nn.Linear`` alone is trained on the target
  points by Adam (the other layers frozen);
* **RBF GP (pyro.contrib.gp)** — ``GPRegression`` with an ``RBF`` kernel, fitted by
  the same :func:`~pyro_ntk.infer.fit`, ignoring the network.

The two network baselines have no uncertainty of their own; they predict
:math:`\mathcal{N}(f(x), \hat s^2)` with :math:`\hat s^2` the maximum-likelihood noise on the
target points (their mean squared training residual, floored at 1e-6), the usual
plug-in. Scores: RMSE, mean Gaussian negative log-likelihood (NLL) of the noisy test targets,
coverage of the 95 % predictive interval, and wall-clock seconds spent adapting (fit +
predict; every method is first run for two steps, so one-time start-up costs are excluded).
A PNG of the predictive bands is written to ``--out-dir``.

**Classification** (``digits``): a small CNN trained on scikit-learn's 8×8 digits 0–4 is
adapted to the digits 5–9 from ``k = --num-target`` labelled images per class; the NTK
method is :class:`~pyro_ntk.LinearizedLaplace` on the network's dense layers (categorical
likelihood, per-layer prior variances chosen by the Laplace evidence; also tempered, T by
:func:`~pyro_ntk.cross_validate_temperature`), against fine-tuning, retraining the last layer
and an RBF-kernel ``VariationalGP`` classifier (see :mod:`pyro_ntk.demo.classification`).
Scores: accuracy, NLL, expected calibration error (ECE) and seconds; the PNG holds one
reliability diagram per method.

Tasks: ``sine`` (the few-shot family of :mod:`pyro_ntk.datasets`: y = A sin(x + φ), source and
target tasks drawn from it), ``diabetes`` (scikit-learn's bundled diabetes table,
442 patients: the network is trained on patients aged below the median and adapted to older
patients from a few of them) and ``digits`` (:func:`pyro_ntk.datasets.digits_transfer`).

Modules: :mod:`~pyro_ntk.demo.config` (options and records), :mod:`~pyro_ntk.demo.tasks`
(data and architectures), :mod:`~pyro_ntk.demo.training` (Adam loops, cached source
network), :mod:`~pyro_ntk.demo.methods` (regression adaptations),
:mod:`~pyro_ntk.demo.classification` (digits adaptations), :mod:`~pyro_ntk.demo.report`
(table and plots), :mod:`~pyro_ntk.demo.runner` (:func:`run_demo`). The classification
recipes themselves (new head, prior mean, dense-layer selection, evidence-fitted and tempered
Laplace) are library functions of :mod:`pyro_ntk.adaptation`.
"""

from __future__ import annotations

from pyro_ntk.demo.classification import classification_scores as classification_scores
from pyro_ntk.demo.config import QUICK as QUICK
from pyro_ntk.demo.config import TASKS as TASKS
from pyro_ntk.demo.config import Z95 as Z95
from pyro_ntk.demo.config import ClassificationResult as ClassificationResult
from pyro_ntk.demo.config import Data as Data
from pyro_ntk.demo.config import DemoConfig as DemoConfig
from pyro_ntk.demo.config import Result as Result
from pyro_ntk.demo.config import run_settings as run_settings
from pyro_ntk.demo.methods import fine_tune as fine_tune
from pyro_ntk.demo.methods import gaussian_scores as gaussian_scores
from pyro_ntk.demo.methods import last_layer as last_layer
from pyro_ntk.demo.methods import ntk_gp as ntk_gp
from pyro_ntk.demo.methods import rbf_gp as rbf_gp
from pyro_ntk.demo.methods import source_only as source_only
from pyro_ntk.demo.report import format_table as format_table
from pyro_ntk.demo.runner import run_demo as run_demo
from pyro_ntk.demo.tasks import diabetes_data as diabetes_data
from pyro_ntk.demo.tasks import digits_data as digits_data
from pyro_ntk.demo.tasks import load_task as load_task
from pyro_ntk.demo.tasks import make_network as make_network
from pyro_ntk.demo.tasks import sine_data as sine_data
from pyro_ntk.demo.training import default_cache_dir as default_cache_dir
from pyro_ntk.demo.training import source_network as source_network
from pyro_ntk.demo.training import train_mse as train_mse

__all__ = [
    "QUICK",
    "TASKS",
    "Z95",
    "ClassificationResult",
    "Data",
    "DemoConfig",
    "Result",
    "classification_scores",
    "default_cache_dir",
    "diabetes_data",
    "digits_data",
    "fine_tune",
    "format_table",
    "gaussian_scores",
    "last_layer",
    "load_task",
    "make_network",
    "ntk_gp",
    "rbf_gp",
    "run_demo",
    "run_settings",
    "sine_data",
    "source_network",
    "source_only",
    "train_mse",
]
