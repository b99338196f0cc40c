"""Patient-level prediction from omics + clinical variables (+ slide tile bags) with the fusion
model of cfm.models.fusion, evaluated against baselines on the same patient-level folds.

`run(config, workdir)` for `config.task = "response"` (binary response or multi-class RECIST);
cfm.finetune.survival calls the same pipeline with a survival head. Stages:

1. load the cohorts (cfm.finetune.tabular_data), drop patients without a label;
2. evaluation units: one per held-out cohort (`data.test_cohort`, leave-one-cohort-out), one
   per cohort (`cv.within_cohort`), or the pooled patients; each unit's splits are patient-level
   stratified k-fold (cfm.evaluate.cv; k shrinks to the smallest class where needed and the
   report says so) or the single train/test cohort split;
3. per split: standardise features on the training patients, group genes into expression
   modules (k-means on training patients; or a GMT gene-set file), train `train.ensemble`
   fusion models (AdamW, full batch, early stopping on an inner stratified validation split of
   the training patients), predict the test patients (ensemble mean; spread = uncertainty);
   fit the baselines on the same training patients;
4. metrics with bootstrap CIs (cfm.evaluate.report), ROC / calibration / KM plots, integrated
   gradient biomarker tables and per-patient text reports (cfm.explain); results.json and
   report.md in the workdir.
"""

from __future__ import annotations

import functools
import os
import time
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cfm.evaluate import cv, metrics, report
from cfm.explain import attributions, text_report
from cfm.finetune import losses, tabular_data
from cfm.finetune.common import FinetuneError, check, write_json
from cfm.models.fusion import FusionModel, group_edges

HEADS = ("binary", "multiclass", "cox", "nll")
SURVIVAL_HEADS = ("cox", "nll")
CLIP = 5.0  # standardised features are clipped to +-5 sd (TCGA RNA-seq has heavy tails)


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------

def _split(s: str) -> list[str]:
    return [x.strip() for x in str(s).split(",") if x.strip()]


def validate(config: ml_collections.ConfigDict) -> None:
    """FinetuneError naming the first config value that cannot work."""
    check(config.head in HEADS, "head", config.head, f"choose one of {list(HEADS)}")
    mods = _split(config.modalities)
    check(bool(mods) and set(mods) <= {"omics", "clinical", "tiles"}, "modalities",
          config.modalities, "a comma list of omics, clinical, tiles")
    check("tiles" not in mods, "modalities", config.modalities,
          "slide tiles are not wired into the tabular cohorts (no slides for ICB/TCGA here); "
          "cfm.models.fusion takes them, use omics and/or clinical")
    if config.omics.encoder:
        raise FinetuneError(f"config.omics.encoder={config.omics.encoder!r}: a pretrained omics "
                            "encoder is not yet supported; leave it empty to use raw features")
    check(config.omics.grouping in ("modules", "vector", "gene_sets"), "omics.grouping",
          config.omics.grouping, "use modules, vector or gene_sets")
    if config.omics.grouping == "gene_sets":
        check(os.path.isfile(config.omics.gene_sets), "omics.gene_sets", config.omics.gene_sets,
              "must be a GMT file (name, description, genes... tab-separated per line)")
    check(config.cv.k >= 2, "cv.k", config.cv.k, "must be >= 2")
    check(config.train.ensemble >= 1, "train.ensemble", config.train.ensemble, "must be >= 1")
    check(0 < config.train.val_fraction < 0.5, "train.val_fraction", config.train.val_fraction,
          "must be in (0, 0.5)")
    check(1 <= config.train.min_epochs <= config.train.max_epochs, "train.min_epochs",
          config.train.min_epochs, f"must be in [1, train.max_epochs={config.train.max_epochs}]")
    check(config.model.dim % config.model.heads == 0, "model.dim", config.model.dim,
          f"must be a multiple of model.heads={config.model.heads}")


# ---------------------------------------------------------------------------------------------
# data -> labelled patients and evaluation units
# ---------------------------------------------------------------------------------------------

def load_data(config: ml_collections.ConfigDict) -> tabular_data.TabularData:
    d = config.data
    if d.source == "icb":
        data = tabular_data.load_icb(d.path, _split(d.cohorts), _split(d.clinical),
                                     label=d.get("label", "response"))
    elif d.source == "tcga":
        data = tabular_data.load_tcga(d.path, d.cancer, _split(d.omics_kinds),
                                      _split(d.clinical))
    else:
        raise FinetuneError(f"config.data.source={d.source!r}: use icb or tcga")
    if d.labels:
        data = tabular_data.apply_label_file(data, d.labels)
    return data


def _labelled(data: tabular_data.TabularData, head: str) -> tabular_data.TabularData:
    if head in SURVIVAL_HEADS:
        ok = np.isfinite(data.time) & np.isfinite(data.event) & (data.time > 0)
    else:
        ok = np.isfinite(data.label)
    if not ok.any():
        raise FinetuneError("no patient has a label for head "
                            f"{head!r} in the chosen data")
    return data.subset(np.flatnonzero(ok))


def _strata(data: tabular_data.TabularData, head: str) -> np.ndarray:
    return (data.event if head in SURVIVAL_HEADS else data.label).astype(int)


def _check_classes(data: tabular_data.TabularData, rows: np.ndarray, head: str,
                   what: str) -> None:
    s = _strata(data, head)[rows]
    if len(np.unique(s)) < 2:
        kind = "event status" if head in SURVIVAL_HEADS else "class"
        raise FinetuneError(f"{what}: all {len(rows)} patients have the same {kind} "
                            f"({s[0]}); a model cannot be trained or evaluated on one class")


def evaluation_units(data: tabular_data.TabularData, config: ml_collections.ConfigDict
                     ) -> tuple[list[dict], list[str]]:
    """[{name, splits: [(train_rows, test_rows)], kind}], notes."""
    head = config.head
    notes: list[str] = []
    units = []
    test = config.data.get("test_cohort", "")
    if test:
        if test not in set(data.cohort):
            raise FinetuneError(f"config.data.test_cohort={test!r} is not among the loaded "
                                f"cohorts {sorted(set(data.cohort))}")
        tr = np.flatnonzero(data.cohort != test)
        te = np.flatnonzero(data.cohort == test)
        if len(tr) == 0:
            raise FinetuneError("config.data.test_cohort: no training cohort left")
        _check_classes(data, tr, head, f"training cohorts {sorted(set(data.cohort[tr]))}")
        _check_classes(data, te, head, f"test cohort {test}")
        units.append({"name": f"test_{test}", "splits": [(tr, te)], "kind": "cohort"})
        return units, notes
    groups = ([(c, np.flatnonzero(data.cohort == c)) for c in sorted(set(data.cohort))]
              if config.cv.within_cohort else [("pooled", np.arange(len(data)))])
    for name, rows in groups:
        _check_classes(data, rows, head, f"cohort {name}")
        strata = _strata(data, head)[rows]
        if not config.cv.within_cohort and len(set(data.cohort)) > 1:
            strata = np.array([f"{c}|{s}" for c, s in zip(data.cohort[rows], strata)])
        smallest = min(np.unique(strata, return_counts=True)[1])
        k = config.cv.k
        if smallest < k:
            if smallest < 2:
                raise FinetuneError(f"cohort {name}: a stratum has a single patient; cannot "
                                    "cross-validate (use fewer cohorts or within_cohort)")
            notes.append(f"{name}: k reduced from {k} to {smallest} (smallest class has "
                         f"{smallest} patients)")
            k = smallest
        folds = cv.patient_folds(data.patient_ids[rows], strata, k=k, seed=config.cv.seed)
        units.append({"name": name, "splits": [(rows[a], rows[b]) for a, b in folds],
                      "kind": f"{k}-fold CV"})
    return units, notes


# ---------------------------------------------------------------------------------------------
# features of one split (fitted on the training patients only)
# ---------------------------------------------------------------------------------------------

def _read_gmt(path: str, names: list[str]) -> list[tuple[str, tuple[int, ...]]]:
    index = {n: i for i, n in enumerate(names)}
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            idx = tuple(sorted({index[g] for g in parts[2:] if g in index}))
            if len(parts) >= 3 and idx:
                out.append((parts[0], idx))
    if not out:
        raise FinetuneError(f"config.omics.gene_sets={path!r}: no set shares a gene with the "
                            "features")
    return out


def prepare_features(data: tabular_data.TabularData, train: np.ndarray,
                     config: ml_collections.ConfigDict, seed: int) -> dict:
    mods = _split(config.modalities)
    out: dict = {"modalities": mods}
    if "omics" in mods:
        if data.omics.shape[1] == 0:
            raise FinetuneError("modality 'omics' has no feature for any patient")
        x = data.omics.astype(np.float64)
        mu, sd = x[train].mean(0), x[train].std(0)
        # every feature is kept (constant ones become 0 on the training patients) so that
        # shapes, and the compiled model, are the same in every split
        keep = np.ones(x.shape[1], bool)
        if config.omics.max_features and x.shape[1] > config.omics.max_features:
            order = np.argsort(-sd, kind="mergesort")
            keep = np.zeros_like(keep)
            keep[order[:config.omics.max_features]] = True
        sd = np.where(sd > 0, sd, 1.0)
        x = np.clip((x[:, keep] - mu[keep]) / sd[keep], -CLIP, CLIP).astype(np.float32)
        names = [n for n, k in zip(data.feature_names, keep) if k]
        out["omics"] = x
        out["omics_mask"] = np.ones(len(x), bool)
        out["omics_names"] = names
        out["omics_kinds"] = [str(k) for k, kk in zip(data.feature_kinds, keep) if kk]
        grouping = config.omics.grouping
        if grouping == "vector":
            groups, out["group_names"] = None, ["omics"]
        elif grouping == "gene_sets":
            sets = _read_gmt(config.omics.gene_sets, data.feature_names)
            index = {n: i for i, n in enumerate(names)}
            full = data.feature_names
            groups = [tuple(index[full[i]] for i in idx if full[i] in index) for _, idx in sets]
            out["group_names"] = [n for n, _ in sets]
        else:
            from sklearn.cluster import KMeans
            n_mod = min(config.omics.n_modules, x.shape[1])
            km = KMeans(n_mod, n_init=1, random_state=seed).fit(x[train].T)
            groups = [tuple(np.flatnonzero(km.labels_ == m).tolist()) for m in range(n_mod)]
            out["group_names"] = [f"module_{i}" for i in range(n_mod)]
        if groups is not None:
            # edges padded to a split-independent count (modules: G; gene sets: all members)
            n_edges = x.shape[1] if grouping == "modules" else sum(len(i) for _, i in sets)
            out["omics_edges"] = group_edges(groups, n_edges)
            out["n_groups"] = len(groups)
    if "clinical" in mods:
        c = data.clinical.astype(np.float64)
        present = np.isfinite(c)
        if c.shape[1] == 0 or not present.any():
            raise FinetuneError("modality 'clinical' is missing for every patient "
                                f"(variables {data.clinical_names})")
        if not present[train].any():
            raise FinetuneError("modality 'clinical' is missing for every training patient")
        ct = np.where(present[train], c[train], np.nan)
        with warnings.catch_warnings():  # a variable absent in every training patient: mean 0
            warnings.simplefilter("ignore")
            mu, sd = np.nanmean(ct, 0), np.nanstd(ct, 0)
        mu, sd = np.nan_to_num(mu), np.where(np.isfinite(sd) & (sd > 0), sd, 1.0)
        z = np.where(present, (c - mu) / sd, 0.0)
        out["clinical"] = np.clip(z, -CLIP, CLIP).astype(np.float32)
        out["clinical_mask"] = present
        out["clinical_names"] = list(data.clinical_names)
    return out


def _batch(feats: dict, rows: np.ndarray) -> dict:
    b = {}
    for k in ("omics", "omics_mask", "clinical", "clinical_mask"):
        if k in feats:
            b[k] = jnp.asarray(feats[k][rows])
    for k, v in feats.get("omics_edges", {}).items():
        b[k] = jnp.asarray(v)
    return b


# ---------------------------------------------------------------------------------------------
# the fusion model: targets, losses, training with early stopping, prediction
# ---------------------------------------------------------------------------------------------

def n_outputs(head: str, data: tabular_data.TabularData, config) -> int:
    if head == "binary" or head == "cox":
        return 1
    if head == "multiclass":
        return int(np.nanmax(data.label)) + 1
    return int(config.survival.n_bins)


def targets(data: tabular_data.TabularData, head: str, edges: np.ndarray | None) -> dict:
    t = {"y": np.nan_to_num(data.label).astype(np.float32),
         "time": np.nan_to_num(data.time).astype(np.float32),
         "event": np.nan_to_num(data.event).astype(np.float32)}
    if head == "nll":
        t["ybin"] = losses.to_bins(data.time, edges).astype(np.int32)
    return {k: jnp.asarray(v) for k, v in t.items()}


def loss_fn(head: str, out: jax.Array, tgt: dict, w: jax.Array, alpha: float) -> jax.Array:
    if head == "binary":
        return losses.binary_ce(out[:, 0], tgt["y"], w)
    if head == "multiclass":
        return losses.softmax_ce(out, tgt["y"].astype(jnp.int32), w)
    if head == "cox":
        return losses.cox_neg_log_partial_likelihood(out[:, 0], tgt["time"], tgt["event"], w)
    return losses.discrete_time_nll(out, tgt["ybin"], tgt["event"], w, alpha)


def score_fn(head: str, out: jax.Array) -> jax.Array:
    """The number evaluated: P(response), class probabilities, or a risk score."""
    if head == "binary":
        return jax.nn.sigmoid(out[:, 0])
    if head == "multiclass":
        return jax.nn.softmax(out, axis=-1)
    if head == "cox":
        return out[:, 0]
    return losses.discrete_risk(out)


def explain_fn(head: str, out: jax.Array) -> jax.Array:
    """The scalar attributed by integrated gradients: the logit, or the risk score."""
    if head == "binary":
        return out[:, 0]
    if head == "multiclass":  # log-odds of the best (first) class, e.g. CR for RECIST
        return jax.nn.log_softmax(out, axis=-1)[:, 0]
    return score_fn(head, out)


_COMPILED: dict = {}


def prng_key(seed: int) -> jax.Array:
    """A typed key of the `rbg` PRNG: XLA's RngBitGenerator compiles about 4x faster on CPU than
    the default threefry (whose hash is unrolled into every parameter's initializer and dropout
    mask), which dominates the run time of these small models."""
    return jax.random.key(seed, impl="rbg")


def compiled(model: FusionModel, head: str, lr: float, wd: float, alpha: float) -> dict:
    """The jitted init / train step / validation loss / score / IG functions of one model and
    head, built once per process: every split, member and cohort with the same shapes reuses
    the same executables (compiling dominates the run time on CPU otherwise)."""
    key = (model, head, lr, wd, alpha)
    if key in _COMPILED:
        return _COMPILED[key]
    tx = optax.adamw(lr, weight_decay=wd)

    def loss(params, batch, tg, w, rng, train):
        out = model.apply({"params": params}, batch, train=train, rngs={"dropout": rng})
        return loss_fn(head, out, tg, w, alpha)

    @jax.jit
    def init(rng, batch):
        params = model.init({"params": rng, "dropout": rng}, batch)["params"]
        return params, tx.init(params)

    @jax.jit
    def step(params, opt_state, batch, tg, w, rng):
        val, grads = jax.value_and_grad(loss)(params, batch, tg, w, rng, True)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, val

    @jax.jit
    def evaluate(params, batch, tg, w):
        return loss(params, batch, tg, w, prng_key(0), False)

    @jax.jit
    def score(params, batch):
        return score_fn(head, model.apply({"params": params}, batch))

    def explained(stacked, batch):  # ensemble mean of the explained scalar, [B]
        outs = jax.vmap(lambda p: explain_fn(head, model.apply({"params": p}, batch)))(stacked)
        return outs.mean(0)

    @functools.partial(jax.jit, static_argnames=("steps",))
    def ig(stacked, batch, keys_base, steps):
        """Integrated gradients over the inputs named in keys_base (dict of baselines)."""
        fixed = {k: v for k, v in batch.items() if k not in keys_base}
        f = lambda inp: explained(stacked, dict(fixed, **inp))  # noqa: E731
        x = {k: batch[k] for k in keys_base}
        attr = attributions.integrated_gradients_fn(f, x, keys_base, steps)
        return attr, f(x) - f(keys_base)  # attributions, f(x) - f(baseline) per patient

    fns = {"init": init, "step": step, "evaluate": evaluate, "score": score, "ig": ig}
    _COMPILED[key] = fns
    return fns


def pad_bucket(n: int) -> int:
    """Padded row count: 32, 64, 128, then multiples of 128. Few distinct shapes (so cohorts and
    cancer types of similar size share compiled steps) without padding 21 patients to 264."""
    for b in (32, 64, 128):
        if n <= b:
            return b
    return -(-n // 128) * 128


def _pad(rows: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    w = np.zeros(n, np.float32)
    w[:len(rows)] = 1.0
    return np.concatenate([rows, np.full(n - len(rows), rows[0])]).astype(np.int64), w


class Trainer:
    """Full-batch AdamW training of one FusionModel with early stopping on an inner validation
    split. Row sets are padded to `n_pad` rows (weight 0) so all splits share one compile."""

    def __init__(self, model: FusionModel, head: str, config, tgt: dict, feats: dict,
                 n_pad: int):
        self.model, self.head, self.config, self.tgt, self.feats = model, head, config, tgt, feats
        self.n_pad = n_pad
        alpha = float(config.survival.alpha) if head == "nll" else 0.0
        self.fns = compiled(model, head, float(config.train.lr),
                            float(config.train.weight_decay), alpha)

    def _rows(self, rows: np.ndarray, class_weights: bool):
        idx, w = _pad(rows, self.n_pad)
        if class_weights and self.head in ("binary", "multiclass"):
            y = np.asarray(self.tgt["y"])[rows].astype(int)
            counts = np.bincount(y, minlength=int(y.max()) + 1).astype(np.float32)
            cw = len(y) / (np.count_nonzero(counts) * np.maximum(counts, 1))
            w[:len(rows)] *= cw[y]
        batch = _batch(self.feats, idx)
        tg = {k: v[idx] for k, v in self.tgt.items()}
        return batch, tg, jnp.asarray(w)

    def fit(self, train: np.ndarray, strata: np.ndarray, seed: int) -> tuple[dict, dict]:
        """Train on `train` rows minus an inner validation split; returns (best params, log)."""
        tc = self.config.train
        rng = np.random.default_rng(seed)
        val_parts = []
        for s in np.unique(strata[train]):
            members = rng.permutation(train[strata[train] == s])
            n_val = int(round(tc.val_fraction * len(members)))
            val_parts.append(members[:min(n_val, len(members) - 1)])
        val = np.sort(np.concatenate(val_parts))
        fit = np.setdiff1d(train, val)
        fb, ft, fw = self._rows(fit, True)
        vb, vt, vw = self._rows(val if len(val) else fit, True)
        key = prng_key(seed)
        params, opt_state = self.fns["init"](key, fb)
        best, best_loss, best_epoch, bad = params, np.inf, 0, 0
        for epoch in range(tc.max_epochs):
            params, opt_state, _ = self.fns["step"](params, opt_state, fb, ft, fw,
                                                    jax.random.fold_in(key, epoch + 1))
            v = float(self.fns["evaluate"](params, vb, vt, vw))
            if epoch + 1 < tc.min_epochs:  # the first epochs only warm up: no stopping
                continue
            if v < best_loss - 1e-4:
                best, best_loss, best_epoch, bad = params, v, epoch + 1, 0
            else:
                bad += 1
                if bad >= tc.patience:
                    break
        return best, {"best_epoch": best_epoch, "val_loss": best_loss, "n_fit": len(fit),
                      "n_val": len(val)}

    def scores(self, params: dict, rows: np.ndarray) -> np.ndarray:
        idx, _ = _pad(rows, self.n_pad)
        return np.asarray(self.fns["score"](params, _batch(self.feats, idx)))[:len(rows)]


# ---------------------------------------------------------------------------------------------
# baselines (same training patients, same features)
# ---------------------------------------------------------------------------------------------

def _design(feats: dict) -> np.ndarray:
    parts = []
    if "omics" in feats:
        parts.append(feats["omics"])
    if "clinical" in feats:
        parts += [feats["clinical"], feats["clinical_mask"].astype(np.float32)]
    return np.concatenate(parts, axis=1).astype(np.float64)


def _best_threshold(y: np.ndarray, s: np.ndarray) -> float:
    """Threshold with the best balanced accuracy on the training patients."""
    cands = np.unique(s)
    accs = [metrics.balanced_accuracy(y, (s >= c).astype(int)) for c in cands]
    return float(cands[int(np.argmax(accs))])


def baseline_scores(name: str, data: tabular_data.TabularData, feats: dict, train: np.ndarray,
                    test: np.ndarray, config) -> tuple[np.ndarray, np.ndarray | None]:
    """(test scores, test predicted classes or None) of one baseline."""
    head = config.head
    if name in data.signatures:
        s = data.signatures[name]
        if head in SURVIVAL_HEADS:  # immune-hot predicted protective: risk = -score (a priori)
            return -s[test], None
        if head == "multiclass":
            return None, None
        thr = _best_threshold(data.label[train].astype(int), s[train])
        return s[test], (s[test] >= thr).astype(int)
    x = _design(feats)
    if name == "logreg":
        from sklearn.linear_model import LogisticRegression
        clf = LogisticRegression(C=config.baselines.C, class_weight="balanced", max_iter=5000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf.fit(x[train], data.label[train].astype(int))
        if head == "multiclass":
            return clf.predict_proba(x[test]), clf.predict(x[test])
        return clf.predict_proba(x[test])[:, 1], clf.predict(x[test])
    if name == "cox":
        import pandas as pd
        from lifelines import CoxPHFitter
        from sklearn.decomposition import PCA
        parts, k = [], config.baselines.cox_pcs
        if "omics" in feats:
            pca = PCA(min(k, len(train) - 1, feats["omics"].shape[1]),
                      random_state=0).fit(feats["omics"][train])
            z = pca.transform(feats["omics"])
            parts.append(z / z[train].std(0))
        if "clinical" in feats:
            parts.append(feats["clinical"])
        z = np.concatenate(parts, axis=1)
        df = pd.DataFrame(z[train], columns=[f"x{i}" for i in range(z.shape[1])])
        df = df.loc[:, df.std() > 0]
        df["T"], df["E"] = data.time[train], data.event[train]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cph = CoxPHFitter(penalizer=config.baselines.cox_penalizer).fit(df, "T", "E")
        cols = [c for c in df.columns if c not in ("T", "E")]
        zt = pd.DataFrame(z[test], columns=[f"x{i}" for i in range(z.shape[1])])[cols]
        return np.asarray(cph.predict_log_partial_hazard(zt), float).reshape(-1), None
    raise FinetuneError(f"config.baselines.names: unknown baseline {name!r}; use logreg / cox "
                        f"or a signature {sorted(data.signatures)}")


# ---------------------------------------------------------------------------------------------
# one evaluation unit: splits -> out-of-fold scores, attributions
# ---------------------------------------------------------------------------------------------

def run_unit(data: tabular_data.TabularData, unit: dict, config, log,
             n_test_pad: int = 0) -> dict:
    """Train and predict every split of `unit`; IG rows are padded to `n_test_pad` (the largest
    test set of all units, so one IG compile serves them all)."""
    head = config.head
    strata = _strata(data, head)
    model_names = ["cfm_fusion"] + _split(config.baselines.names)
    if head == "multiclass":
        model_names = [m for m in model_names if m not in data.signatures]
    if head in SURVIVAL_HEADS:
        model_names = [m for m in model_names if m != "logreg"]
    else:
        model_names = [m for m in model_names if m != "cox"]
    scores = {m: {} for m in model_names}
    preds = {m: {} for m in model_names}
    members, attr_rows, fold_logs = {}, [], []
    n_test_pad = max([n_test_pad] + [len(te) for _, te in unit["splits"]])
    n_pad = pad_bucket(max(max(len(tr), len(te)) for tr, te in unit["splits"]))
    for f, (train, test) in enumerate(unit["splits"]):
        t0 = time.time()
        seed = config.seed * 1000 + f
        feats = prepare_features(data, train, config, seed)
        edges = (losses.survival_bins(data.time[train], data.event[train],
                                      config.survival.n_bins) if head == "nll" else None)
        tgt = targets(data, head, edges)
        model = FusionModel(n_out=n_outputs(head, data, config), dim=config.model.dim,
                            heads=config.model.heads, depth=config.model.depth,
                            dropout=config.model.dropout,
                            feature_dropout=config.model.feature_dropout,
                            modality_dropout=config.model.modality_dropout,
                            n_groups=feats.get("n_groups", 0))
        trainer = Trainer(model, head, config, tgt, feats, n_pad=n_pad)
        params_list, member_scores, train_logs = [], [], []
        for m in range(config.train.ensemble):
            params, tlog = trainer.fit(train, strata, seed * 10 + m)
            params_list.append(params)
            train_logs.append(tlog)
            member_scores.append(trainer.scores(params, test))
        ms = np.stack(member_scores)  # [M, n_test] or [M, n_test, K]
        for i, r in enumerate(test):
            scores["cfm_fusion"][int(r)] = ms[:, i].mean(0)
            members[int(r)] = ms[:, i]
        if head == "binary":
            train_scores = np.mean([trainer.scores(p, train) for p in params_list], axis=0)
            thr = _best_threshold(data.label[train].astype(int), train_scores)
            for i, r in enumerate(test):
                preds["cfm_fusion"][int(r)] = int(ms[:, i].mean() >= thr)
        elif head == "multiclass":
            for i, r in enumerate(test):
                preds["cfm_fusion"][int(r)] = int(np.argmax(ms[:, i].mean(0)))
        for name in model_names[1:]:
            s, p = baseline_scores(name, data, feats, train, test, config)
            for i, r in enumerate(test):
                scores[name][int(r)] = s[i]
                if p is not None:
                    preds[name][int(r)] = int(p[i])
        if config.explain.enabled:
            attr_rows.append(_attribute(trainer, params_list, feats, test, n_test_pad, config))
        fold_logs.append({"fold": f, "n_train": len(train), "n_test": len(test),
                          "members": train_logs, "wall_s": round(time.time() - t0, 1)})
        log(f"  {unit['name']} split {f + 1}/{len(unit['splits'])}: {len(train)} train, "
            f"{len(test)} test, best epochs {[t['best_epoch'] for t in train_logs]}, "
            f"{time.time() - t0:.1f} s")
    return {"scores": scores, "preds": preds, "members": members, "attr": attr_rows,
            "folds": fold_logs}


def _attribute(trainer: Trainer, params_list: list, feats: dict, rows: np.ndarray,
               n_pad: int, config) -> dict:
    """IG of the ensemble-mean explained output (logit / risk) over omics features and clinical
    values of the test patients; baseline = the training mean (0 after standardising)."""
    keys = [k for k in ("omics", "clinical") if k in feats]
    idx, _ = _pad(rows, n_pad)
    batch = _batch(trainer.feats, idx)
    stacked = jax.tree_util.tree_map(lambda *p: jnp.stack(p), *params_list)
    base = {k: jnp.zeros_like(batch[k]) for k in keys}
    ig, delta = trainer.fns["ig"](stacked, batch, base, steps=int(config.explain.ig_steps))
    n = len(rows)
    ig = {k: np.asarray(v)[:n] for k, v in ig.items()}
    gap = sum(v.reshape(n, -1).sum(1) for v in ig.values()) - np.asarray(delta)[:n]
    return {"rows": rows, "ig": ig, "values": {k: feats[k][rows] for k in keys}, "gap": gap,
            "names": {"omics": feats.get("omics_names", []),
                      "clinical": feats.get("clinical_names", [])},
            "kinds": feats.get("omics_kinds", [])}


# ---------------------------------------------------------------------------------------------
# summaries, plots, report
# ---------------------------------------------------------------------------------------------

def _ordered(d: dict, rows: np.ndarray) -> np.ndarray:
    return np.array([d[int(r)] for r in rows])


def summarize_unit(data, unit: dict, out: dict, config, workdir: str) -> tuple[dict, list[str]]:
    head = config.head
    rows = np.sort(np.concatenate([te for _, te in unit["splits"]]))
    res = {"kind": unit["kind"], "n_splits": len(unit["splits"]), "models": {}}
    md = []
    nb, seed = config.cv.n_boot, config.cv.seed
    if head == "binary":
        y = data.label[rows]
        curves = {}
        for m, sc in out["scores"].items():
            s = _ordered(sc, rows)
            p = _ordered(out["preds"][m], rows) if out["preds"][m] else None
            res["models"][m] = report.summarize_binary(y, s, p, n_boot=nb, seed=seed)
            curves[m] = (y, s)
        report.plot_roc(curves, os.path.join(workdir, f"roc_{unit['name']}.png"),
                        f"{unit['name']} ({unit['kind']})")
        report.plot_calibration(y, _ordered(out["scores"]["cfm_fusion"], rows),
                                os.path.join(workdir, f"calibration_{unit['name']}.png"),
                                f"cfm_fusion, {unit['name']}")
        table = [(m, r["n"], r["n_pos"], report.fmt_ci(r["auc"]),
                  report.fmt_ci(r.get("balanced_accuracy")))
                 for m, r in res["models"].items()]
        md += [report.markdown_table(["model", "n", "responders", "AUC (95% CI)",
                                      "balanced accuracy (95% CI)"], table), "",
               f"![ROC](roc_{unit['name']}.png) ![calibration](calibration_{unit['name']}.png)"]
    elif head == "multiclass":
        y = data.label[rows].astype(int)
        for m in out["scores"]:
            p = _ordered(out["preds"][m], rows)
            res["models"][m] = report.summarize_binary(  # AUC of P(class 0 or 1) = CR/PR
                (y <= 1).astype(float), _ordered(out["scores"][m], rows)[:, :2].sum(1),
                n_boot=nb, seed=seed)
            res["models"][m]["balanced_accuracy"] = report._ci(metrics.balanced_accuracy,
                                                               (y, p), nb, seed)
            res["models"][m]["accuracy"] = float(np.mean(p == y))
        table = [(m, r["n"], report.fmt_ci(r.get("balanced_accuracy")),
                  f"{r['accuracy']:.3f}", report.fmt_ci(r["auc"]))
                 for m, r in res["models"].items()]
        md += [report.markdown_table(["model", "n", "balanced accuracy (95% CI)", "accuracy",
                                      "AUC of P(CR or PR) (95% CI)"], table)]
    else:
        t, e = data.time[rows], data.event[rows]
        for m, sc in out["scores"].items():
            res["models"][m] = report.summarize_survival(t, e, _ordered(sc, rows), n_boot=nb,
                                                         seed=seed)
        risk = _ordered(out["scores"]["cfm_fusion"], rows)
        p = report.plot_km(t, e, risk > np.median(risk),
                           os.path.join(workdir, f"km_{unit['name']}.png"),
                           f"cfm_fusion, {unit['name']}: median split of predicted risk")
        res["models"]["cfm_fusion"]["logrank_p_median_split"] = p
        table = [(m, r["n"], r["n_events"], report.fmt_ci(r["c_index"]))
                 for m, r in res["models"].items()]
        md += [report.markdown_table(["model", "n", "events", "c-index (95% CI)"], table), "",
               f"Log-rank p (cfm_fusion, median split of out-of-fold risk): {p:.3g}", "",
               f"![KM](km_{unit['name']}.png)"]
    return res, md


def explain_unit(data, unit: dict, out: dict, config, workdir: str) -> tuple[dict, list[str]]:
    if not out["attr"]:
        return {}, []
    head = config.head
    name = unit["name"]
    # feature sets can differ between splits (max_features): align by name
    all_names: dict[str, str] = {}
    for a in out["attr"]:
        for n_, k in zip(a["names"]["omics"], a["kinds"]):
            all_names.setdefault(n_, k)
        for n_ in a["names"]["clinical"]:
            all_names.setdefault(n_, "clinical")
    names = list(all_names)
    col = {n_: j for j, n_ in enumerate(names)}
    n_rows = sum(len(a["rows"]) for a in out["attr"])
    attr = np.zeros((n_rows, len(names)))
    vals = np.zeros((n_rows, len(names)))
    row_ids, gaps, i0 = [], [], 0
    for a in out["attr"]:
        k = len(a["rows"])
        for mod in ("omics", "clinical"):
            if mod in a["ig"]:
                cols = [col[n_] for n_ in a["names"][mod]]
                attr[i0:i0 + k, cols] = a["ig"][mod]
                vals[i0:i0 + k, cols] = a["values"][mod]
        row_ids += list(a["rows"])
        gaps += list(a["gap"])
        i0 += k
    df = attributions.biomarker_table(attr, vals, names, [all_names[n_] for n_ in names])
    attributions.write_biomarker_table(
        df, os.path.join(workdir, f"biomarkers_{name}.csv"),
        os.path.join(workdir, f"biomarkers_{name}.md"), top_k=config.explain.top_k,
        title=f"{name}: top features by mean |integrated gradient| over "
              f"{n_rows} test patients")
    # per-patient reports
    order = np.argsort(row_ids)
    reports = []
    scores = out["scores"]["cfm_fusion"]
    all_scores = np.array([np.atleast_1d(scores[int(r)])[0] if head != "multiclass" else 0.0
                           for r in row_ids])
    for j in order[:config.explain.n_patients]:
        r = int(row_ids[j])
        top = np.argsort(-np.abs(attr[j]))[:config.explain.n_drivers]
        drivers = [(names[c], float(vals[j, c]), float(attr[j, c])) for c in top]
        if head == "binary":
            truth = "responder" if data.label[r] == 1 else "non-responder"
            ref = f"Responder rate among all evaluated patients: {np.mean(data.label):.2f}."
            reports.append(text_report.patient_report(
                data.patient_ids[r], data.cohort[r], "response", float(scores[r]),
                out["members"][r], drivers, ref, truth))
        elif head in SURVIVAL_HEADS:
            pct = 100.0 * np.mean(all_scores <= scores[r])
            grp = "high" if scores[r] > np.median(all_scores) else "low"
            ref = (f"That is the {pct:.0f}th percentile of the test patients' risks "
                   f"({grp}-risk group at the median split).")
            truth = (f"{'death' if data.event[r] else 'censored'} at "
                     f"{data.time[r]:.1f} months")
            reports.append(text_report.patient_report(
                data.patient_ids[r], data.cohort[r], "survival", float(scores[r]),
                out["members"][r], drivers, ref, truth))
    res = {"biomarkers_csv": f"biomarkers_{name}.csv",
           "top_features": df.head(config.explain.top_k)[["feature", "modality", "mean_abs_ig",
                                                          "direction"]].to_dict("records"),
           "ig_completeness_max_abs_gap": float(np.max(np.abs(gaps))) if gaps else None}
    md = [f"Top {min(5, len(df))} features by mean |IG|: "
          + ", ".join(f"{r.feature} ({r.direction})" for r in df.head(5).itertuples())
          + f" (full table: biomarkers_{name}.md / .csv)."]
    if reports:
        with open(os.path.join(workdir, "patient_reports.md"), "a", encoding="utf-8") as fh:
            fh.write(f"## {name}\n\n" + "\n\n".join(reports) + "\n\n")
    return res, md


def run_pipeline(config: ml_collections.ConfigDict, workdir: str, title: str) -> dict:
    validate(config)
    t0 = time.time()
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    data = _labelled(load_data(config), config.head)
    cohorts = sorted(str(c) for c in set(data.cohort))
    units, notes = evaluation_units(data, config)
    log(f"cfm.finetune {config.task}: {len(data)} labelled patients from {cohorts}, "
        f"{len(units)} evaluation unit(s)")
    results = {"task": config.task, "head": config.head, "n_patients": len(data),
               "cohorts": cohorts, "notes": notes,
               "signature_genes": data.signature_genes, "units": {}}
    md = [f"# {title}", "", f"{len(data)} labelled patients; cohorts "
          f"{', '.join(cohorts)}; modalities {config.modalities}; "
          f"head {config.head}; ensemble of {config.train.ensemble} per split; "
          f"{config.cv.n_boot} bootstrap resamples of patients for the 95% CIs.", ""]
    md += [f"- note: {n}" for n in notes]
    md.append("")
    n_test_pad = pad_bucket(max(len(te) for u in units for _, te in u["splits"]))
    for unit in units:
        out = run_unit(data, unit, config, log, n_test_pad)
        res, umd = summarize_unit(data, unit, out, config, workdir)
        ex, emd = explain_unit(data, unit, out, config, workdir)
        res["explain"] = ex
        res["folds"] = out["folds"]
        results["units"][unit["name"]] = res
        md += [f"## {unit['name']} ({unit['kind']})", ""] + umd + [""] + emd + [""]
    results["wall_s"] = round(time.time() - t0, 1)
    metric = "c_index" if config.head in SURVIVAL_HEADS else (
        "auc" if config.head == "binary" else "balanced_accuracy")
    results["summary_line"] = "; ".join(
        f"{u}: cfm_fusion {metric} {report.fmt_ci(r['models']['cfm_fusion'].get(metric))}"
        for u, r in results["units"].items())
    md += ["## Signature genes used", ""]
    md += [f"- {k}: {', '.join(v)}" for k, v in data.signature_genes.items()]
    md += ["", f"Wall time {results['wall_s']} s.", "", "## Log", "", "```", *lines, "```"]
    with open(os.path.join(workdir, "report.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(md) + "\n")
    write_json(os.path.join(workdir, "results.json"), results)
    return results


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """`task = "response"`: binary response (or multi-class RECIST) from omics + clinical."""
    check(config.head in ("binary", "multiclass"), "head", config.head,
          "the response task uses binary or multiclass (survival heads: task survival)")
    return run_pipeline(config, workdir, "Response prediction")
