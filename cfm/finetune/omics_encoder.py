"""A pretrained omics encoder (`cfm.train` masked gene modelling, a workdir or a `cfm.export`
folder) as the omics input of the fusion tasks (`--config.omics.encoder=PATH`).

1. `load_encoder`: module, params, the gene vocabulary and the normalisation the encoder was
   trained with (vocab.tsv / stats.json, found by `cfm.compat.omics_reference`).
2. `map_features`: the cohort's features mapped to the encoder's gene ids by HGNC symbol
   (`TP53_rnaseq` / `TP53_cnv` / `TP53_mut` of TCGA, `TP53` of ICB); coverage = the share of
   the encoder's expression genes the cohort measures, FinetuneError below
   `omics.min_coverage`.
3. `patient_tokens`: each patient as the token arrays of `cfm.data.omics_records` in the
   encoder's units. Expression (`omics.encoder_norm`): `model` = the encoder's own per-gene
   training mean / std after its transform (valid where the cohort's values went through the
   same transform: TCGA `_rnaseq` with `signed_log1p`), `cohort` = z-scored per gene within
   each cohort (label-free; what `data_prep.prepare_omics --vocab` does for a new cohort, and
   what removes a study's platform shift), `auto` = `model` where valid, else `cohort`; then
   clipped at the encoder's clip and binned with its bin edges. CNV: the call -2..2
   (TabularData holds call / 2); mutation 0/1.
4. `encode`: the frozen encoder's CLS (mean over a sample's windowed views, as
   `cfm.omics_embed.sample_embeddings`) and, if asked, its token outputs (each token read from
   the view whose attention window holds it) or their mean (`encoder_feature = mean`), computed
   once per run.
5. `tuning_arrays`: the windowed views as [N, V, L] arrays for fine-tuning the encoder inside
   the fusion model (cfm.finetune.encoder_tune).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import numpy as np

from cfm import compat, pretrained
from cfm.data.omics_records import MODALITIES
from cfm.data.omics_source import read_vocab
from cfm.finetune.common import FinetuneError
from cfm.finetune.tabular_data import TabularData
from cfm.omics_embed import padded_batches, sample_embeddings, window_views

KIND_MODALITY = {"rnaseq": "expression", "expr": "expression", "mut": "mutation",
                 "cnv": "cnv"}
NORMS = ("auto", "model", "cohort")


class Encoder(NamedTuple):
    path: str
    module: Any          # cfm.models.omics.OmicsTransformer
    params: dict         # numpy, per-block layout
    genes: list          # (symbol, ensembl) of gene ids 2, 3, ...
    stats: dict          # the encoder's stats.json
    depth: int
    step: int


def load_encoder(path: str, step: int | None = None) -> Encoder:
    """The encoder at `path` (export or workdir) with its vocabulary and normalisation;
    FinetuneError naming the path for anything that is not an omics model with both."""
    try:
        spec = compat.model_spec(path, step)
    except (OSError, pretrained.CheckpointError) as e:
        raise FinetuneError(f"config.omics.encoder={path!r}: {e}") from None
    if spec.arch.get("family") != "omics":
        raise FinetuneError(f"config.omics.encoder={path!r} is a "
                            f"{spec.arch.get('family', 'vit')} model, not an omics encoder")
    ref, why = compat.omics_reference(spec)
    if ref is None:
        raise FinetuneError(f"config.omics.encoder={path!r}: its gene vocabulary and "
                            f"normalisation cannot be found ({why})")
    p = pretrained.load(path, step)
    genes = read_vocab(os.path.join(ref, "vocab.tsv"))
    stats = compat._model_stats(ref)
    return Encoder(path, p.module, p.params, genes, stats,
                   int(p.info["architecture"].get("depth") or _depth(p.params)), p.step)


def _depth(params: dict) -> int:
    return sum(1 for k in params if k.startswith("block_"))


def feature_symbol(name: str, kind: str) -> str:
    """The gene symbol of a TabularData feature (`TP53_rnaseq` -> `TP53`, `TP53` -> `TP53`)."""
    suffix = f"_{kind}"
    return name[:-len(suffix)] if kind != "expr" and name.endswith(suffix) else name


def map_features(data: TabularData, enc: Encoder, min_coverage: float) -> dict:
    """{columns, gene_ids, modality} of the features the encoder knows, and the coverage report
    (`coverage`: share of the encoder's expression genes present; `used`: share of the
    cohort's features mapped). FinetuneError below `min_coverage`."""
    by_sym: dict[str, list[int]] = {}
    for i, (sym, _) in enumerate(enc.genes):
        if sym:
            by_sym.setdefault(sym, []).append(i + 2)
    model_expr = set(enc.stats["expression"]["genes"])
    cols, ids, mods = [], [], []
    for j, (name, kind) in enumerate(zip(data.feature_names, data.feature_kinds)):
        if str(kind) not in KIND_MODALITY:
            continue
        hit = by_sym.get(feature_symbol(name, str(kind)), [])
        if KIND_MODALITY[str(kind)] == "expression":  # a gene it saw as expression only
            hit = [h for h in hit if h in model_expr]
        if len(hit) == 1:  # an ambiguous symbol (two Ensembl ids) is left out
            cols.append(j)
            ids.append(hit[0])
            mods.append(MODALITIES.index(KIND_MODALITY[str(kind)]))
    ids_a, mods_a = np.asarray(ids, np.int64), np.asarray(mods, np.int64)
    have_expr = set(ids_a[mods_a == 0].tolist()) & model_expr
    cov = len(have_expr) / max(len(model_expr), 1)
    report = {"encoder_expression_genes": len(model_expr),
              "cohort_features": len(data.feature_names), "mapped_features": len(cols),
              "mapped_expression_genes": len(have_expr), "coverage": round(cov, 4),
              "used": round(len(cols) / max(len(data.feature_names), 1), 4)}
    if cov < min_coverage:
        raise FinetuneError(
            f"config.omics.encoder={enc.path!r}: the cohort measures {len(have_expr)} of the "
            f"encoder's {len(model_expr)} expression genes (coverage {cov:.1%}, matched by "
            f"symbol), below config.omics.min_coverage={min_coverage}; use an encoder "
            "pretrained on these genes or lower the minimum")
    return {"columns": np.asarray(cols, np.int64), "gene_ids": ids_a, "modality": mods_a,
            "report": report}


def _norm_mode(data: TabularData, cols: np.ndarray, enc: Encoder, norm: str) -> str:
    if norm not in NORMS:
        raise FinetuneError(f"config.omics.encoder_norm={norm!r}: use one of {list(NORMS)}")
    kinds = set(str(k) for k in data.feature_kinds[cols])
    model_ok = (enc.stats["expression"].get("transform") == "signed_log1p"
                and "expr" not in kinds)  # TabularData's TCGA _rnaseq is signed log1p
    if norm == "model" and not model_ok:
        raise FinetuneError("config.omics.encoder_norm='model': the cohort's expression is not "
                            "on the encoder's scale (encoder transform "
                            f"{enc.stats['expression'].get('transform')!r}, cohort "
                            "per-cohort z-scores); use cohort or auto")
    return "model" if norm == "model" or (norm == "auto" and model_ok) else "cohort"


def patient_tokens(data: TabularData, mapping: dict, enc: Encoder, norm: str
                   ) -> tuple[list[dict], str]:
    """(one token dict {gene_ids, modality, values, classes} per patient in the encoder's
    units, the expression normalisation used); missing values get no token."""
    cols, gid, mod = mapping["columns"], mapping["gene_ids"], mapping["modality"]
    mode = _norm_mode(data, cols, enc, norm)
    st = enc.stats["expression"]
    x = data.omics[:, cols].astype(np.float64)
    expr = mod == 0
    if mode == "model":
        mean = dict(zip(st["genes"], st["mean"]))
        std = dict(zip(st["genes"], st["std"]))
        mu = np.array([mean.get(int(g), np.nan) for g in gid[expr]])
        sd = np.array([std.get(int(g), 1.0) for g in gid[expr]])
        x[:, expr] = (x[:, expr] - mu) / sd  # NaN (no token) for a gene without statistics
    else:
        for c in np.unique(data.cohort):
            r = data.cohort == c
            block = x[np.ix_(r, expr)]
            sd = np.nanstd(block, 0)
            x[np.ix_(r, expr)] = (block - np.nanmean(block, 0)) / np.where(sd > 0, sd, 1.0)
    clip = float(st.get("clip") or 10.0)
    x[:, expr] = np.clip(x[:, expr], -clip, clip)
    cnv, mut = mod == MODALITIES.index("cnv"), mod == MODALITIES.index("mutation")
    x[:, cnv] = np.clip(np.round(x[:, cnv] * 2.0), -2, 2)
    x[:, mut] = (x[:, mut] > 0.5).astype(float)
    classes = np.zeros(x.shape, np.int64)
    edges = np.asarray(enc.stats.get("bin_edges", []), np.float64)
    classes[:, expr] = np.searchsorted(edges, np.nan_to_num(x[:, expr]), "right")
    classes[:, mut] = x[:, mut]
    classes[:, cnv] = x[:, cnv] + 2
    order = np.lexsort((mod, gid))
    out = []
    for i in range(len(x)):
        ok = np.isfinite(x[i, order])
        o = order[ok]
        if not len(o):
            raise FinetuneError(f"patient row {i} ({data.cohort[i]}) has no value for any "
                                "gene the encoder knows")
        out.append({"gene_ids": gid[o].astype(np.int32), "modality": mod[o].astype(np.uint8),
                    "values": x[i, o].astype(np.float32),
                    "classes": classes[i, o].astype(np.uint8)})
    return out, mode


def token_outputs(module, params: dict, samples: list[dict], batch: int = 16) -> np.ndarray:
    """[N, T, D] final-norm token outputs (T = the longest sample; zeros pad), each token read
    from the windowed view whose attention window holds it (`window_views`)."""
    apply = jax.jit(lambda p, b: module.apply(
        {"params": p}, b["gene_ids"], b["modality"], b["values"], b["classes"])["tokens"])
    views, _, owner, index = window_views(samples, getattr(module, "attend_tokens", 0))
    n_tok = max(len(s["gene_ids"]) for s in samples)
    out = None
    k = 0
    for n, b, _ in padded_batches(views, batch):
        t = np.asarray(apply(params, b))[:n]
        if out is None:
            out = np.zeros((len(samples), n_tok, t.shape[-1]), np.float32)
        for j in range(n):
            idx = index[k + j]  # the window's tokens sit first in the view, in this order
            out[owner[k + j], idx] = t[j, :len(idx)]
        k += n
    return out


def encode(data: TabularData, config: Any, log) -> dict:
    """Everything the fusion tasks need from the encoder, once per run: the coverage report,
    the frozen CLS [N, D], the patient vector the fusion model and the probe take (`vector`:
    the CLS or the mean token output), optionally token outputs [N, T, D] + mask, the token
    arrays (for fine-tuning) and the encoder itself."""
    o = config.omics
    step = int(o.get("encoder_step", -1))
    enc = load_encoder(o.encoder, None if step < 0 else step)
    mapping = map_features(data, enc, float(o.get("min_coverage", 0.2)))
    samples, mode = patient_tokens(data, mapping, enc, o.get("encoder_norm", "auto"))
    r = mapping["report"]
    log(f"omics encoder {o.encoder} (step {enc.step}): {r['mapped_expression_genes']} of its "
        f"{r['encoder_expression_genes']} expression genes in the cohort (coverage "
        f"{r['coverage']:.1%}); {r['mapped_features']} of {r['cohort_features']} cohort "
        f"features mapped by symbol; expression normalisation: {mode}")
    out = {"encoder": enc, "samples": samples, "report": dict(r, normalisation=mode),
           "cls": sample_embeddings(enc.module, enc.params, samples)}
    out["vector"] = out["cls"]
    feature = o.get("encoder_feature", "cls")
    if feature in ("mean", "tokens", "both"):
        tokens = token_outputs(enc.module, enc.params, samples)
        lengths = np.array([len(s["gene_ids"]) for s in samples])
        mask = np.arange(tokens.shape[1])[None] < lengths[:, None]
        if feature == "mean":  # the mean token output: one vector, like the CLS
            out["vector"] = tokens.sum(1) / lengths[:, None]
        else:
            out["tokens"], out["token_mask"] = tokens, mask
    return out


def tuning_arrays(samples: list[dict], window: int, bucket: int = 128) -> dict:
    """The windowed views of every patient as enc_* arrays [N, V, L] (+ view mask [N, V]) for
    the encoder inside the fusion model; L a multiple of `bucket`, V the most views."""
    views, _, owner, _ = window_views(samples, window)
    owner = np.asarray(owner)
    n_views = np.bincount(owner, minlength=len(samples))
    v_max = int(n_views.max())
    length = -(-max(len(v["gene_ids"]) for v in views) // bucket) * bucket
    shape = (len(samples), v_max, length)
    out = {"enc_gene_ids": np.zeros(shape, np.int32), "enc_modality": np.zeros(shape, np.int32),
           "enc_values": np.zeros(shape, np.float32), "enc_classes": np.zeros(shape, np.int32),
           "enc_view_mask": np.zeros(shape[:2], bool)}
    slot = np.zeros(len(samples), np.int64)
    for v, i in zip(views, owner):
        n, j = len(v["gene_ids"]), slot[i]
        for k in ("gene_ids", "modality", "values", "classes"):
            out[f"enc_{k}"][i, j, :n] = v[k]
        out["enc_view_mask"][i, j] = True
        slot[i] += 1
    return out
