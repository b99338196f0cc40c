"""Does a model fit the data it is paired with? One check per kind of data, used by every job
that pairs them (`cfm.embed`, the slide fine-tuning tasks, `benchmarks.omics_eval`), before any
weights are read.

  omics  `check_omics(model, data)`: the prepared folder's gene vocabulary (vocab.tsv: the same
         genes at the same ids) and normalisation (stats.json: expression transform, clip; the
         manifest's n_bins) against the model's own, which an omics export carries and a
         cfm.train workdir finds in the prepared folder it trained on (its data.path). Per-gene
         mean/std are compared and reported, not required: a new cohort prepared with
         `--vocab MODEL/vocab.tsv` is z-scored with its own training split, as intended.
  tiles  `check_tiles(model, shards)`: tile side (px) and microns per pixel of the shards'
         manifests against those of the model's training tiles (an export's preprocessing, or
         the manifests under a workdir's data.path), mpp within `MPP_TOLERANCE`; and the
         model's input size against its patch. Unknown on either side: reported, not refused.

A mismatch is a `CompatError` (a ValueError) with one line naming both folders and what
differs; the functions return a one-line summary of what was compared.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

from cfm import checkpoint
from cfm.data.omics_source import read_manifest, read_stats, read_vocab
from cfm.export import data_manifests
from cfm.pretrained import CONFIG_FILE

MPP_TOLERANCE = 0.10  # relative difference of microns per pixel accepted as the same scale
OMICS_FILES = ("vocab.tsv", "stats.json")


class CompatError(ValueError):
    """A model and a data folder that do not fit each other (the message is one line)."""


class ModelSpec(NamedTuple):
    """What a model says about the data it was trained on, read without its weights."""

    path: str  # as given
    kind: str  # "export" or "workdir"
    arch: dict  # cfm.models.backbone.architecture()
    config: dict  # the training config ({} if the export does not carry it)
    prep: dict  # an export's preprocessing ({} for a workdir)


def model_spec(path: str, step: int | None = None) -> ModelSpec:
    """The architecture, training config and preprocessing of a cfm.export folder or a cfm.train
    workdir (its latest or `step` checkpoint's config); no weights read. FileNotFoundError or
    CheckpointError (both one line) for a path that is neither."""
    cfg_path = os.path.join(path, CONFIG_FILE)
    if os.path.isfile(cfg_path):
        try:
            with open(cfg_path, encoding="utf-8") as f:
                info = json.load(f)
            arch = info["architecture"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise checkpoint.CheckpointError(f"{cfg_path} is not a cfm.export config.json "
                                             f"({e})") from None
        return ModelSpec(path, "export", arch,
                         info.get("provenance", {}).get("training_config") or {},
                         info.get("preprocessing") or {})
    if os.path.isdir(os.path.join(path, "checkpoints")):
        ckpt = checkpoint.read_config(path, step)
        return ModelSpec(path, "workdir", ckpt.arch, ckpt.config, {})
    raise FileNotFoundError(f"{os.path.abspath(path)} is neither a cfm.export folder (no "
                            f"{CONFIG_FILE}) nor a cfm.train workdir (no checkpoints/ folder)")


def _differ(model: str, data: str, what: str) -> CompatError:
    return CompatError(f"model {model} and data {data} do not fit: {what}")


# ============================================================================ omics ===========
def omics_reference(spec: ModelSpec) -> tuple[str | None, str]:
    """(folder holding the model's vocab.tsv and stats.json, or None; why not found)."""
    if spec.kind == "export":
        if all(os.path.isfile(os.path.join(spec.path, n)) for n in OMICS_FILES):
            return spec.path, ""
        return None, f"the export {spec.path} carries no vocab.tsv/stats.json"
    data = spec.config.get("data", {})
    root = data.get("path", "")
    if data.get("source") != "prepared":
        return None, f"it trained on data.source={data.get('source')!r}, not a prepared folder"
    if not all(os.path.isfile(os.path.join(root, n)) for n in OMICS_FILES):
        return None, f"its data folder {root!r} (data.path) is gone or lacks vocab.tsv/stats.json"
    return root, ""


def _gene_key(gene: tuple[str, str]) -> str:
    symbol, ensembl = gene
    return ensembl or symbol


def compare_vocab(model_genes: list, data_genes: list) -> str | None:
    """None when both list the same genes at the same ids, else what differs (one phrase)."""
    if model_genes == data_genes:
        return None
    common = len({_gene_key(g) for g in model_genes} & {_gene_key(g) for g in data_genes})
    same_id = sum(a == b for a, b in zip(model_genes, data_genes))
    return (f"vocabulary: model {len(model_genes)} genes, data {len(data_genes)} genes "
            f"({common} in common, {same_id} at the same id)")


def compare_normalisation(model_stats: dict, data_stats: dict, model_bins: int,
                          data_bins: int) -> tuple[list[str], str]:
    """(what differs: transform, clip, n_bins; a note on the per-gene statistics)."""
    m, d = model_stats.get("expression", {}), data_stats.get("expression", {})
    bad = [f"{what}: model {m.get(k)!r}, data {d.get(k)!r}"
           for k, what in (("transform", "expression transform"), ("clip", "z-score clip"))
           if m.get(k) != d.get(k)]
    if model_bins != data_bins:
        bad.append(f"expression bins: model {model_bins}, data {data_bins}")
    if (m.get("genes"), m.get("mean"), m.get("std")) == (d.get("genes"), d.get("mean"),
                                                         d.get("std")):
        note = "per-gene mean/std are the model's training statistics"
    else:
        shared = len(set(m.get("genes") or []) & set(d.get("genes") or []))
        note = (f"per-gene mean/std fitted on the data's own training split ({shared} of the "
                f"model's {len(m.get('genes') or [])} expression genes)")
    return bad, note


def _model_stats(folder: str) -> dict:
    """The model's stats.json: an export carries it without the shards its manifest lists, so
    it is read directly, not through `read_stats` (which checks a data folder's shards)."""
    with open(os.path.join(folder, "stats.json"), encoding="utf-8") as handle:
        return json.load(handle)


def check_omics(spec: ModelSpec, data: str, trust_data: bool = False) -> str:
    """Check a prepared omics folder `data` against an omics model (see the module doc); the
    summary line, or CompatError naming both. `trust_data`: where the model's own vocabulary
    and statistics cannot be found, only sizes are checked (else that is refused too)."""
    if spec.arch.get("family") != "omics":
        raise CompatError(f"model {spec.path} is a {spec.arch.get('family', 'vit')} model; "
                          "omics data needs an omics (masked gene modelling) model")
    manifest = read_manifest(data)
    vocab_size, n_bins = int(spec.arch["vocab_size"]), int(spec.arch["n_bins"])
    ref, why = omics_reference(spec)
    if ref is not None:
        model_genes = read_vocab(os.path.join(ref, "vocab.tsv"))
        if len(model_genes) + 2 != vocab_size:
            ref, why = None, (f"{ref}/vocab.tsv now lists {len(model_genes) + 2} ids but the "
                              f"model has {vocab_size} (the folder changed since training)")
    if ref is None:
        if not trust_data:
            raise CompatError(f"model {spec.path}: its gene vocabulary and normalisation cannot "
                              f"be found ({why}); pass --trust-data to use data {data} "
                              "unchecked")
        if int(manifest["vocab_size"]) > vocab_size or int(manifest["n_bins"]) != n_bins:
            raise _differ(spec.path, data, f"data has {manifest['vocab_size']} gene ids and "
                                           f"{manifest['n_bins']} bins, the model "
                                           f"{vocab_size} and {n_bins}")
        return f"vocabulary and normalisation NOT checked ({why}; --trust-data)"
    hint = (f"; re-run data_prep.prepare_omics with --vocab {os.path.join(ref, 'vocab.tsv')}")
    diff = compare_vocab(model_genes, read_vocab(os.path.join(data, "vocab.tsv")))
    if diff:
        raise _differ(spec.path, data, diff + hint)
    model_stats = _model_stats(ref)
    bad, note = compare_normalisation(model_stats, read_stats(data), n_bins,
                                      int(manifest["n_bins"]))
    if bad:
        stats = model_stats["expression"]
        transform = stats.get("transform")
        how = (" --normalise per-input --expression-transform <your table's transform>"
               if transform == "per-input" else f" --expression-transform {transform}")
        raise _differ(spec.path, data, "normalisation: " + "; ".join(bad) + hint + how
                      + f" --clip {stats.get('clip')} --n-bins {n_bins}")
    return (f"vocabulary ({len(model_genes)} genes) and normalisation (transform "
            f"{model_stats['expression'].get('transform')}, {n_bins} bins) match {ref}; "
            f"{note}")


# ============================================================================ tiles ===========
def _as_list(value: Any) -> list:
    if value is None:
        return []
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]


def model_tiles(spec: ModelSpec) -> tuple[list[float], list[float], str]:
    """(training tile sides in px, training microns per pixel, note when unknown)."""
    if spec.kind == "export":
        prep = spec.prep
        note = "" if prep.get("tile_size_px") else "its export records no training tile manifest"
        return _as_list(prep.get("tile_size_px")), _as_list(prep.get("microns_per_pixel")), note
    tiles, _, note = data_manifests(spec.config.get("data", {}))
    return _as_list(tiles["tile_size_px"]), _as_list(tiles["microns_per_pixel"]), note or ""


def _fmt(values: list[float]) -> str:
    return "/".join(f"{v:g}" for v in values)


def check_tiles(spec: ModelSpec, shards: str, allow_mismatch: bool = False,
                override: str = "pass --allow-scale-mismatch") -> str:
    """Check tile shards against a ViT model (see the module doc); the summary line, or
    CompatError naming both. `allow_mismatch`: report a tile size / mpp mismatch instead;
    `override`: how the user does that, for the message."""
    arch = spec.arch
    if arch.get("family", "vit") != "vit":
        raise CompatError(f"model {spec.path} is an {arch.get('family')} model; tile shards "
                          "need a ViT (image) model")
    size, patch = int(arch["img_size"]), int(arch["patch"])
    if size % patch:
        raise CompatError(f"model {spec.path}: input size {size} px is not a multiple of its "
                          f"patch {patch}; its config.json is damaged")
    m_size, m_mpp, m_note = model_tiles(spec)
    d_tiles, _, d_note = data_manifests({"source": "shards", "path": shards})
    d_size, d_mpp = _as_list(d_tiles["tile_size_px"]), _as_list(d_tiles["microns_per_pixel"])
    bad, seen = [], []
    if m_size and d_size:
        seen.append(f"tile size {_fmt(d_size)} px")
        if set(d_size) - set(m_size):
            bad.append(f"tile size: model trained on {_fmt(m_size)} px tiles, shards hold "
                       f"{_fmt(d_size)} px (each is resized to the model's {size} px input, "
                       f"so it would see another scale)")
    if m_mpp and d_mpp:
        seen.append(f"{_fmt(d_mpp)} um/px")
        off = [d for d in d_mpp if min(abs(d - m) / m for m in m_mpp) > MPP_TOLERANCE]
        if off:
            bad.append(f"microns per pixel: model trained at {_fmt(m_mpp)}, shards at "
                       f"{_fmt(d_mpp)} (more than {MPP_TOLERANCE:.0%} apart)")
    if bad and not allow_mismatch:
        retile = ([f"--tile-size {int(m_size[0])}"] if m_size else []) + (
            [f"--mpp {m_mpp[0]:g}"] if m_mpp else [])
        raise _differ(spec.path, shards, "; ".join(bad) + "; re-tile the slides with "
                      f"data_prep.tile_wsi {' '.join(retile)}, or {override}")
    if bad:
        return "MISMATCH accepted: " + "; ".join(bad)
    unknown = "; ".join(n for n in (m_note and f"model: {m_note}",
                                    d_note and f"shards: {d_note}") if n)
    agreed = f"{', '.join(seen)} as in training" if seen else "tile size and mpp not compared"
    return agreed + (f" ({unknown})" if unknown and len(seen) < 2 else "")
