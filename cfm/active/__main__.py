"""Pick the next tiles (or slides) a pathologist should label, from embeddings and the labels
so far; every call closes one round and opens the next.

    python -m cfm.active --embeddings EMB --workdir LOOP --classes A,B,... [--unit tile|slide]
        [--shards TILES] [--strategy mix] [--batch 16] [--seed 0] [--labels FILE ...]

First call: a new loop in LOOP over the rows of EMB (a `cfm.embed --out` folder): round 1 is
picked (a cold start: no labels yet) and written to LOOP/round-001/ as Label Studio tasks
(tasks.json + label_config.xml), tile PNGs (with --shards, the tiles EMB was made from), QuPath
GeoJSON boxes per slide (qupath/<slide_id>.geojson) and batch.csv. Later calls: --labels with
the labels of the open round (Label Studio JSON / JSON-MIN export, QuPath GeoJSON export, or
CSV with cfm_id,label; several files allowed) close it, the probe is refitted, report.md is
updated and the next round is picked with --strategy. Labels that exist before any round go in
with the first call's --labels (round 0). The settings of the first call (embeddings, unit,
classes, shards) are kept in LOOP/state.json; --strategy, --batch and --seed may change from
round to round (each round records its own). See docs/active_learning.md.

Strategies (cfm/active/strategies.py, scikit-activeml): random, entropy, margin, coreset
(k-center greedy), mix (CLUE: uncertainty within diversity clusters), cold (TypiClust); every
strategy but random uses cold while fewer than two classes are labelled.

Exit status: 0 when the next round is written; 2 for a bad flag, folder or label file (one
line naming it, the row of a label file included; the loop is left as it was); 1 for a bug.
"""

from __future__ import annotations

import os
import sys

from cfm import cli_help, errors
from cfm.active import ActiveError, loop
from cfm.active.strategies import STRATEGIES


def _parser():
    ap = cli_help.parser("cfm.active", __doc__, "python -m cfm.active --embeddings /tmp/cfm_emb "
                         "--workdir /tmp/cfm_loop --classes tumour,stroma,immune,background")
    ap.add_argument("--workdir", required=True, help="the loop folder (new, or one to resume)")
    ap.add_argument("--embeddings", default="", help="a cfm.embed --out folder; required for a "
                    "new loop, else must match the loop's")
    ap.add_argument("--classes", default="", help="comma-separated class names; required for "
                    "a new loop, else must match the loop's")
    ap.add_argument("--unit", default="", choices=["", *loop.UNITS],
                    help="label tiles, or slides (mean-pooled tile embeddings); new loop: "
                    "default tile")
    ap.add_argument("--shards", default="", help="new loop: the tile shards EMB was made from, "
                    "for tile PNGs in the tasks (default: no PNGs)")
    ap.add_argument("--labels", action="append", default=[],
                    help="labels of the open round (repeatable): Label Studio JSON, QuPath "
                    "GeoJSON or CSV export (default: none)")
    ap.add_argument("--strategy", default="mix", choices=STRATEGIES, help="how to pick")
    ap.add_argument("--batch", type=int, default=16, help="rows to pick this round")
    ap.add_argument("--seed", type=int, default=0, help="seed (round r uses seed + r)")
    ap.add_argument("--image-url", default="/data/local-files/?d=", help="prefix of the tile "
                    "PNG paths in tasks.json (Label Studio local files, document root = LOOP)")
    ap.add_argument("--simulate", default="", help="a simulated annotator: label the open "
                    "round from this metadata column of the tiles (e.g. label, on "
                    "data_prep.synthetic_tme tiles; default: none)")
    return ap


def _run(args) -> str:
    errors.check_workdir(args.workdir)
    if args.batch < 1:
        raise ActiveError(f"--batch {args.batch}: must be at least 1")
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else []
    state = loop.load_state(args.workdir)
    if state is None:
        if not args.embeddings or not classes:
            raise ActiveError(f"--workdir {args.workdir} holds no loop yet: a new loop needs "
                              "--embeddings and --classes")
        state = loop.new_state(args.embeddings, args.unit or "tile", classes, args.shards)
    else:
        given = {"embeddings": os.path.abspath(args.embeddings) if args.embeddings else None,
                 "classes": classes or None, "unit": args.unit or None,
                 "shards": os.path.abspath(args.shards) if args.shards else None}
        for key, value in given.items():
            if value is not None and value != state[key]:
                raise ActiveError(f"--{key} {value}: the loop in {args.workdir} was started "
                                  f"with {state[key]}; leave it out to resume, or start a new "
                                  "--workdir")
    pool = loop.load_pool(state["embeddings"], state["unit"])
    os.makedirs(args.workdir, exist_ok=True)
    state = loop.step(args.workdir, state, pool, args.labels, args.strategy, args.batch,
                      args.seed, args.image_url, args.simulate)
    last = state["rounds"][-1]
    done = state["rounds"][-2].get("probe") if len(state["rounds"]) > 1 else None
    note = ""
    if done:
        cv = done.get("cv_accuracy")
        note = (f"; {done['n_labels']} labels so far"
                + (f", probe CV accuracy {cv:.3f}" if cv is not None else ""))
    return (f"round {last['round']}: {len(last['ids'])} {state['unit']}s picked by "
            f"{last['used']} in {args.workdir}/round-{last['round']:03d}{note}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    said: list[str] = []
    status = errors.run_cli("cfm.active", lambda: said.append(_run(args)),
                            {ActiveError: "", FileNotFoundError: ""})
    if status == 0:
        print(f"cfm.active: {said[0]}")
    return status


if __name__ == "__main__":
    sys.exit(main())
