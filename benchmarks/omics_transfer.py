"""Transfer of the omics encoder to a cancer type it never saw (issue 17, item 6).

    python -m benchmarks.omics_transfer [--types blca,luad,kirc] [--steps 300]
        [--adapt-steps 0,100] [--sources tcga] [--out /tmp/cfm_transfer]

Leave one TCGA type out, in turn: for each held-out type T,
  1. prepare the other sources with data_prep.prepare_omics: `tcga` = the other two TCGA
     tables (signed_log1p, pooled z-scores, as configs/omics_mgm.py:tcga); `pan` = those two plus
     every ICB cohort, each source z-scored on its own (the pan preset's recipe);
  2. pretrain `--config` (configs/omics_mgm.py:tcga) on them for `--steps` steps (cfm.train);
  3. prepare T under the encoder's vocabulary (`--vocab`, `--drop-unknown-genes`, the encoder's
     transform, clip and bins; per-gene z-scores fitted on T's own training patients, as
     cfm.compat intends for a new cohort), coverage = T's genes the vocabulary knows;
  4. for each `--adapt-steps` A: A > 0 continues the pretraining on T's unlabelled training
     patients (cfm.train `--config.init_from`, lr `--adapt-lr`), then benchmarks.omics_eval
     hides 30% of each held-out patient's values (T's val + test splits, the same tokens for
     every method) and scores the masked-expression Pearson (per gene, averaged) of the
     encoder against kNN imputation and the per-gene mean, both fitted on T's training
     patients.
`--scratch-steps N` adds the same model trained on T's training patients alone for N steps:
what pretraining on the other types adds over T's own data.
The table says, per held-out type, whether the encoder beats T's own kNN, and after how many
steps of adaptation. Work folders stay under `--out` (each pretraining run is a normal
cfm.train workdir; a rerun reuses a finished one). The last line holds name=value pairs.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.federated import SHARED_DATA  # noqa: E402
from cfm import cli_help  # noqa: E402

TYPES = ("blca", "luad", "kirc")
ICB = ("Hugo", "Mariathasan", "Miao", "Padron", "Riaz", "Van_Allen")
CONFIG = "configs/omics_mgm.py:tcga"


def _tcga(data: str, t: str) -> str:
    return os.path.join(data, "tcga", f"tcga_{t}_multiomics.csv.gz")


def prepare_sources(data: str, held: str, sources: str, out: str) -> str:
    """The pretraining folder (every TCGA type but `held`, plus ICB for `pan`); reused if done."""
    from data_prep import prepare_omics
    if os.path.isfile(os.path.join(out, "manifest.json")):
        return out
    argv = ["--out", out, "--patient-column", "case_id"]
    for t in TYPES:
        if t != held:
            argv += ["--input", _tcga(data, t), "--expression-transform", "signed_log1p"]
    if sources == "pan":
        for c in ICB:
            argv += ["--input", os.path.join(data, "icb", f"{c}_expression.csv.gz"),
                     "--expression-transform", "none"]
        argv += ["--normalise", "per-input", "--source-ids"]
    if prepare_omics.main(argv) != 0:
        raise SystemExit(f"omics_transfer: cannot prepare the sources for held-out {held}")
    return out


def prepare_target(data: str, held: str, encoder_data: str, out: str) -> tuple[str, float]:
    """(T prepared under the encoder's vocabulary and normalisation, gene coverage)."""
    import pandas as pd

    from cfm.data.omics_source import read_vocab
    from data_prep import prepare_omics
    with open(os.path.join(encoder_data, "stats.json"), encoding="utf-8") as fh:
        stats = json.load(fh)
    e = stats["expression"]
    per_input = e.get("transform") == "per-input"
    if not os.path.isfile(os.path.join(out, "manifest.json")):
        argv = ["--input", _tcga(data, held), "--out", out, "--patient-column", "case_id",
                "--vocab", os.path.join(encoder_data, "vocab.tsv"), "--drop-unknown-genes",
                "--expression-transform", "signed_log1p", "--clip", str(e["clip"]),
                "--std-floor", str(e["std_floor"]), "--n-bins", str(stats["n_bins"])]
        argv += ["--normalise", "per-input"] if per_input else []
        if prepare_omics.main(argv) != 0:
            raise SystemExit(f"omics_transfer: cannot map {held} onto {encoder_data}/vocab.tsv")
    known = {s for s, _ in read_vocab(os.path.join(encoder_data, "vocab.tsv"))}
    cols = pd.read_csv(_tcga(data, held), nrows=0).columns
    genes = {c.rsplit("_", 1)[0] for c in cols if c.endswith("_rnaseq")}
    return out, len(genes & known) / max(1, len(genes))


def pretrain(data_path: str, workdir: str, steps: int, overrides: list[str],
             config: str = CONFIG) -> str:
    """cfm.train of `config` on `data_path` for `steps` steps into `workdir` (resumed if cut
    short, skipped if finished), in-training evaluators off; the learning-rate schedule (one
    warm-up epoch of nine, then cosine, as the tcga preset) is stretched to end at `steps`."""
    from cfm import checkpoint, config_loader, train
    try:
        if checkpoint.checkpoint_steps(workdir)[1][-1] >= steps:
            return workdir
    except (FileNotFoundError, IndexError, OSError, checkpoint.CheckpointError):
        pass
    cfg = config_loader.load_config(config, [
        "--config.data.source=prepared", f"--config.data.path={data_path}",
        f"--config.total_steps={steps}", f"--config.steps_per_epoch={-(-steps // 9)}",
        "--config.epochs=9", "--config.optim.warmup_epochs=1",
        f"--config.checkpoint_every={steps}", "--config.evals.mgm.every=0",
        "--config.evals.health.every=0", *overrides])
    train.train(cfg, workdir)
    return workdir


def evaluate(workdir: str, data_path: str) -> dict:
    from benchmarks import omics_eval
    r = omics_eval.evaluate(workdir, data_path, probes=False)
    out = {m: r["imputation"][m]["expression_pearson"] for m in ("cfm", "knn", "mean/mode")}
    return out | {"held_out": r["held_out_samples"], "train": r["train_samples"]}


def run(args) -> list[dict]:
    rows = []
    for held in args.types:
        t0 = time.perf_counter()
        base = os.path.join(args.out, f"{args.sources}_without_{held}")
        src = prepare_sources(args.data, held, args.sources, base + "_data")
        enc = pretrain(src, base + "_run", args.steps, [f"--config.seed={args.seed}"],
                       args.config)
        target, coverage = prepare_target(args.data, held, src,
                                          os.path.join(args.out, f"{held}_under_{args.sources}"))
        for a in args.adapt_steps:
            run_dir = enc if a == 0 else pretrain(
                target, f"{base}_adapt{a}", a,
                [f"--config.init_from={enc}", f"--config.optim.base_lr={args.adapt_lr}",
                 f"--config.seed={args.seed}"], args.config)
            r = evaluate(run_dir, target)
            row = {"held_out_type": held, "sources": args.sources, "pretrain_steps": args.steps,
                   "adapt_steps": a, "coverage": coverage, **r,
                   "seconds": round(time.perf_counter() - t0, 1)}
            print(f"omics_transfer: {json.dumps(row)}", flush=True)
            rows.append(row)
        if args.scratch_steps:  # the same model trained on the held-out type alone
            run_dir = pretrain(target, os.path.join(args.out, f"{held}_scratch"),
                               args.scratch_steps, [f"--config.seed={args.seed}"], args.config)
            row = {"held_out_type": held, "sources": "none (from scratch)", "pretrain_steps": 0,
                   "adapt_steps": args.scratch_steps, "coverage": coverage,
                   **evaluate(run_dir, target), "seconds": round(time.perf_counter() - t0, 1)}
            print(f"omics_transfer: {json.dumps(row)}", flush=True)
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| held-out type | pretrained on | steps on the type | gene coverage | encoder r | "
           "kNN r (own type) | mean r | encoder - kNN |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        src = r["sources"] + (f" ({r['pretrain_steps']} steps)" if r["pretrain_steps"] else "")
        out.append(f"| {r['held_out_type'].upper()} ({r['held_out']} held out) | {src} | "
                   f"{r['adapt_steps']} | {r['coverage']:.1%} | "
                   f"{r['cfm']:.3f} | {r['knn']:.3f} | {r['mean/mode']:.3f} | "
                   f"{r['cfm'] - r['knn']:+.3f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = cli_help.parser("benchmarks.omics_transfer", __doc__,
                        "python -m benchmarks.omics_transfer --types blca --steps 300")
    p.add_argument("--data", default=SHARED_DATA, help="the shared data folder (tcga/, icb/)")
    p.add_argument("--types", default=",".join(TYPES),
                   help="comma-separated TCGA types to hold out in turn (default: all three)")
    p.add_argument("--sources", default="tcga", choices=("tcga", "pan"),
                   help="pretraining corpus: the other TCGA types, or those plus every ICB "
                        "cohort normalised per source (default: tcga)")
    p.add_argument("--config", default=CONFIG,
                   help=f"the pretraining config and preset (default: {CONFIG})")
    p.add_argument("--steps", type=int, default=300, help="pretraining steps (default: 300)")
    p.add_argument("--adapt-steps", default="0,100",
                   help="comma-separated steps of adaptation on the held-out type's unlabelled "
                        "training patients, 0 = none (default: 0,100)")
    p.add_argument("--adapt-lr", type=float, default=3e-3,
                   help="peak learning rate of the adaptation; the tcga preset's own, which "
                        "beat 1e-3 on every held-out type (default: 3e-3)")
    p.add_argument("--scratch-steps", type=int, default=0,
                   help="also train the model from scratch on the held-out type's training "
                        "patients for this many steps, the reference for what pretraining on "
                        "the other types adds (default: 0, not run)")
    p.add_argument("--seed", type=int, default=0, help="seed of the runs (default: 0)")
    p.add_argument("--out", default="/tmp/cfm_transfer",
                   help="work folder; finished runs in it are reused (default: /tmp/cfm_transfer)")
    args = p.parse_args(argv)
    args.types = [t.strip().lower() for t in args.types.split(",") if t.strip()]
    bad = [t for t in args.types if t not in TYPES]
    if bad or not args.types:
        p.error(f"--types: choose from {','.join(TYPES)} (got {args.types})")
    try:
        args.adapt_steps = sorted({int(a) for a in args.adapt_steps.split(",")})
    except ValueError:
        p.error(f"--adapt-steps: comma-separated integers (got {args.adapt_steps!r})")
    if args.steps < 1 or min(args.adapt_steps) < 0 or args.scratch_steps < 0:
        p.error("--steps must be >= 1, --adapt-steps and --scratch-steps >= 0")
    for t in args.types:
        if not os.path.isfile(_tcga(args.data, t)):
            p.error(f"--data: {_tcga(args.data, t)} not found")
    os.makedirs(args.out, exist_ok=True)
    rows = run(args)
    print(table(rows))
    with open(os.path.join(args.out, f"transfer_{args.sources}.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    wins = sum(r["cfm"] > r["knn"] for r in rows)
    print(f"rows={len(rows)} encoder_beats_knn={wins} "
          + " ".join(f"{r['held_out_type']}_a{r['adapt_steps']}={r['cfm'] - r['knn']:+.3f}"
                     for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
