"""Start a new run from pretrained weights: `--config.init_from=PATH` (continued pretraining,
domain adaptation to a new cancer type).

PATH is a cfm.train workdir (its latest checkpoint, or `--config.init_from_step=N`; its
`checkpoints/` folder or a `checkpoints/N` step folder work too) or a `python -m cfm.export`
folder (orbax or safetensors). The fresh, sharded initial state from `setup.create_state` keeps
its optimiser state, step (0), centers and RNG; only the student `params` and the `teacher` are
filled, leaf by leaf where name and shape match:

  checkpoint  student <- the checkpoint's student, teacher <- its teacher (heads included)
  export      student and teacher backbones <- the exported (teacher) backbone; heads fresh

Rules, per parameter (names in the per-block layout, whatever `model.scan_layers` either side):
  * same name and shape: loaded.
  * `pos_embed` with another patch grid (img_size / patch differs), same width: resampled
    bicubically by the ViT's own `resample_pos_embed`; the CLS row is kept as is (registers have
    no position rows in cfm's ViT).
  * a head (dino_head, ibot_head) is loaded whole or not at all: one leaf of another shape
    (n_prototypes, hidden_dim, bottleneck_dim, n_layers) re-initialises the whole head; exports
    hold no heads.
  * anything else of another shape or absent from the source (reg_tokens for another
    num_registers, blocks beyond the source's depth, w12 for a SwiGLU target of a GELU source,
    LayerScale gammas, qkv_bias): re-initialised; source leaves nothing takes are reported unused.
  * errors: a backbone sharing no parameter with the target, or a patch embedding of another
    shape (another width or patch size: the loaded blocks would read random tokens; pick the
    source's model.variant).
Omics (masked gene modelling) backbones continue only on data prepared under the source's own
vocabulary and normalisation (`data_prep.prepare_omics --vocab SOURCE/vocab.tsv`, the transform,
clip and bins of its stats.json), checked by `cfm.compat.check_omics` before anything is built:
a gene id must mean the same gene on both sides. The gene embedding is their stem; the MGM head
loads whole from a checkpoint and starts fresh from an export.
Every process reads the whole source into host memory (numpy; any source mesh: checkpoints
through `cfm.checkpoint.read_trees`, exports through `cfm.pretrained.read_export`) and places its
own shards with each target leaf's sharding, so the result has exactly the input's shardings.
This module holds the path resolution, the name/shape matching, the placing and the report.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import textwrap
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from etils import epath

from cfm import checkpoint, compat, pretrained
from cfm.checkpoint import CheckpointError, flatten
from cfm.config_check import ConfigError
from cfm.models import omics, vit
from cfm.models.backbone import architecture
from cfm.pretrained import CONFIG_FILE

REPORT_FILE = "init_from.txt"
HEADS = ("dino_head", "ibot_head", "mgm_head")
STEM = "backbone.patch_embed.kernel"
STEMS = {"vit": STEM, "omics": "backbone.gene_embed.embedding"}
POS = "backbone.pos_embed"


class InitFromError(ConfigError):
    """`config.init_from` cannot initialise this run; the message starts with the PATH. (A
    ConfigError, so `python -m cfm.train` exits 2 with the message, no traceback.)"""


class Source(NamedTuple):
    kind: str  # "checkpoint" or "export"
    where: str  # the step folder or export folder read (absolute)
    step: int
    arch: dict  # cfm.models.backbone.architecture() of the source backbone
    student: dict[str, np.ndarray]  # flat per-block names: backbone.block_0.attn.qkv_kernel
    teacher: dict[str, np.ndarray]


# ============================================================================ report ==========
@dataclasses.dataclass
class InitReport:
    """What `apply_init_from` did, per parameter (student and teacher alike), as (name, detail)
    lists; `format()` is the table the trainer prints and writes to WORKDIR/init_from.txt."""

    source: str
    loaded: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    resampled: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    reinitialised: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    unused: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def format(self) -> str:
        sections = [("loaded", self.loaded), ("resampled", self.resampled),
                    ("re-initialised", self.reinitialised), ("unused source keys", self.unused)]
        lines = [textwrap.fill(f"init_from: {self.source}", 100, subsequent_indent="    "),
                 "  optimiser state, step, centers and RNG start fresh (a new run at step 0)",
                 "  " + " | ".join(f"{title} {len(items)}" for title, items in sections)
                 + "  (parameters, per block)"]
        for title, items in sections:
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines += [textwrap.fill(line, 100, initial_indent="  ", subsequent_indent="      ")
                          for line in _collapse(items)]
        return "\n".join(lines) + "\n"

    def write(self, workdir: str) -> str:
        """Write `format()` to WORKDIR/init_from.txt (a local or gs:// workdir); its path."""
        folder = epath.Path(workdir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / REPORT_FILE).write_text(self.format())
        return os.fspath(folder / REPORT_FILE)


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> "0..2,5"."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(f"{a}..{b}" if b > a else str(a) for a, b in runs)


def _collapse(items: list[tuple[str, str]]) -> list[str]:
    """One line per (prefix, block range, detail): "backbone.block_{0..11}: attn.qkv_kernel,
    ..."; names outside blocks group by their top-level part and detail."""
    blocks: dict[tuple[str, str, str], list[int]] = {}
    groups: dict[tuple[str, str], list[str]] = {}
    for name, detail in items:
        m = re.fullmatch(r"(.*?)block_(\d+)\.(.+)", name)
        if m:
            blocks.setdefault((m[1], m[3], detail), []).append(int(m[2]))
        else:
            top, _, rest = name.partition(".")
            groups.setdefault((top, detail), []).append(rest or top)
    for (prefix, rest, detail), idx in blocks.items():
        groups.setdefault((f"{prefix}block_{{{_ranges(idx)}}}", detail), []).append(rest)
    return [f"{head}: {', '.join(rests)}" + (f"  -- {detail}" if detail else "")
            for (head, detail), rests in sorted(groups.items())]


# ============================================================================ source ==========
def _err(path: str, msg: str) -> InitFromError:
    return InitFromError(f"config.init_from={path}: {msg}")


def resolve(path: str, step: int | None = None) -> tuple[str, str, int | None]:
    """("export", folder, None) or ("checkpoint", workdir, step or None for the latest); no
    weights read. InitFromError for a missing path or one that is neither."""
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(full):
        raise _err(path, f"{full} does not exist")
    if os.path.isfile(os.path.join(full, CONFIG_FILE)):
        if step is not None:
            raise _err(path, f"an export holds one step; init_from_step={step} applies to a "
                             "cfm.train workdir")
        return "export", full, None
    if os.path.isdir(os.path.join(full, "checkpoints")):
        return "checkpoint", full, step
    parent, base = os.path.split(full)
    if base == "checkpoints" and os.path.isdir(full):
        return "checkpoint", parent, step
    if base.isdigit() and os.path.basename(parent) == "checkpoints":
        if step is not None and step != int(base):
            raise _err(path, f"names step {base} but init_from_step={step}")
        return "checkpoint", os.path.dirname(parent), int(base)
    raise _err(path, f"{full} is neither a cfm.train workdir (no checkpoints/ folder) nor a "
                     f"cfm.export folder (no {CONFIG_FILE})")


def read_checkpoint_params(workdir: str, step: int | None = None
                           ) -> tuple[dict, dict, dict, int]:
    """(training config, student params, teacher params, step) of a cfm.train checkpoint, as
    numpy trees in the per-block layout (heads included; teacher {} for runs without one): a
    `cfm.checkpoint.read_trees` of `params` and `teacher` only (the optimiser state stays on
    disk), any mesh, on the host."""
    ckpt = checkpoint.read_config(workdir, step)
    trees = checkpoint.read_trees(ckpt, ("params", "teacher"))
    return ckpt.config, trees["params"], trees.get("teacher", {}), ckpt.step


def read_source(path: str, step: int | None = None) -> Source:
    """The student and teacher (flat, numpy) PATH offers; InitFromError naming PATH if not."""
    kind, where, step = resolve(path, step)
    try:
        if kind == "export":
            info, params = pretrained.read_export(where)
            flat = flatten({"backbone": params})
            return Source(kind, where, int(info.get("provenance", {}).get("step", -1)),
                          info["architecture"], flat, flat)
        config, student, teacher, step = read_checkpoint_params(where, step)
        return Source(kind, os.path.join(where, "checkpoints", str(step)), step,
                      architecture(config["model"]), flatten(student), flatten(teacher))
    except (CheckpointError, FileNotFoundError, OSError) as e:
        raise _err(path, str(e)) from None


# ============================================================================ matching ========
def per_block_shapes(flat: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Shapes under per-block names: backbone.blocks.X [depth, ...] -> backbone.block_i.X."""
    out = {}
    for name, shape in flat.items():
        if name.startswith("backbone.blocks."):
            for i in range(shape[0]):
                out[f"backbone.block_{i}.{name[16:]}"] = tuple(shape[1:])
        else:
            out[name] = tuple(shape)
    return out


def _grid(shape: tuple[int, ...]) -> int | None:
    """The patch grid side of a [1, 1 + g*g, D] position embedding, else None."""
    if len(shape) != 3 or shape[0] != 1 or shape[1] < 2:
        return None
    g = math.isqrt(shape[1] - 1)
    return g if g * g == shape[1] - 1 else None


def match(target: dict[str, tuple], source: dict[str, tuple], kind: str = "checkpoint"
          ) -> tuple[dict[str, tuple[str, str]], list[tuple[str, str]]]:
    """({target name: (action, detail)}, unused [(source name, detail)]) for per-block shape
    dicts; action is "load", "resample" or "reinit". Pure (no arrays), see the module doc."""
    plan: dict[str, tuple[str, str]] = {}
    used: set[str] = set()
    for head in HEADS:  # whole heads, or not at all
        t = {k: s for k, s in target.items() if k.startswith(head + ".")}
        s = {k: v for k, v in source.items() if k.startswith(head + ".")}
        if not t:
            continue
        if not s:
            why = "an export holds no heads" if kind == "export" else "not in the source"
        else:
            diff = [k for k in sorted(set(t) | set(s)) if t.get(k) != s.get(k)]
            why = "" if not diff else (f"head differs from the source's: {diff[0]} source "
                                       f"{s.get(diff[0])}, target {t.get(diff[0])}")
        for k in t:
            plan[k] = ("reinit", why) if why else ("load", "")
        used |= set(s) if not why else set()
    for name, shape in target.items():
        if name in plan:
            continue
        src = source.get(name)
        if src == shape:
            plan[name] = ("load", "")
        elif name == POS and src and _grid(src) and _grid(shape) and src[2] == shape[2]:
            plan[name] = ("resample", f"{src} -> {shape}: patch grid {_grid(src)}x{_grid(src)} "
                                      f"-> {_grid(shape)}x{_grid(shape)}, bicubic, CLS row kept")
        else:
            plan[name] = ("reinit", "not in the source" if src is None else
                          f"source {src}, target {shape}")
            continue
        used.add(name)
    unused = [(k, "not in the target" if k not in target else
               "head re-initialised" if k.split(".")[0] in HEADS else
               f"shape {s} does not fit {target[k]}") for k, s in source.items() if k not in used]
    return plan, unused


# ============================================================================ placing =========
def _resample_pos(pos: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """[1, 1 + g*g, D] -> `shape` with the ViT's bicubic resampler; row 0 (CLS) unchanged."""
    patches = vit.resample_pos_embed(jnp.asarray(pos[:, 1:], jnp.float32), _grid(shape))
    return np.concatenate([np.asarray(pos[:, :1], np.float32), np.asarray(patches)], axis=1)


def _place(value: np.ndarray, like: Any) -> Any:
    """`value` as a jax.Array with `like`'s shape, dtype and sharding (each process builds only
    its addressable shards, so this works on any mesh, multi-host included)."""
    value = np.asarray(value, like.dtype)
    if value.shape != like.shape:
        raise ValueError(f"internal: shape {value.shape} for a {like.shape} leaf")
    return jax.make_array_from_callback(like.shape, like.sharding, lambda idx: value[idx])


@functools.lru_cache(maxsize=None)
def _where(keep: tuple[bool, ...], sharding: Any) -> Any:
    """jit(rows where `keep`: the fresh leaf's, else the source's), laid out as `sharding`."""
    mask = np.array(keep)
    return jax.jit(lambda t, s: jnp.where(mask.reshape((-1,) + (1,) * (t.ndim - 1)), t, s),
                   out_shardings=sharding)


def _mix(leaf: Any, blocks: dict[int, np.ndarray]) -> Any:
    """A stacked (scan) leaf with the rows `blocks` names replaced, the rest kept fresh."""
    full = np.zeros(leaf.shape, leaf.dtype)
    for i, v in blocks.items():
        full[i] = v
    keep = tuple(i not in blocks for i in range(leaf.shape[0]))
    return _where(keep, leaf.sharding)(leaf, _place(full, leaf))


def _assemble(tree: Any, values: dict[str, np.ndarray]) -> Any:
    """`tree` (same containers and shardings) with the per-block `values` placed in."""
    def fill(path, leaf):
        name = ".".join(str(getattr(k, "key", k)) for k in path)
        if not name.startswith("backbone.blocks."):
            return _place(values[name], leaf) if name in values else leaf
        rest = name[len("backbone.blocks."):]
        got = {i: values[f"backbone.block_{i}.{rest}"] for i in range(leaf.shape[0])
               if f"backbone.block_{i}.{rest}" in values}
        if len(got) == leaf.shape[0]:
            return _place(np.stack([got[i] for i in range(leaf.shape[0])]), leaf)
        return _mix(leaf, got) if got else leaf

    return jax.tree_util.tree_map_with_path(fill, tree)


def check_family(source: dict, target: dict, path: str) -> None:
    """InitFromError unless the source backbone (architecture dict) can initialise the target:
    the same family; ViTs with the same patch size (another img_size is resampled). An omics
    source must also fit the run's data (`check_omics_data`)."""
    fam_s, fam_t = source.get("family", "vit"), target.get("family", "vit")
    if fam_s != fam_t:
        raise _err(path, f"its {fam_s} backbone ({source['variant']}) cannot initialise "
                         f"this {fam_t} run (model.variant={target['variant']}); pick a "
                         f"{fam_t} source")
    if fam_s not in STEMS:
        raise _err(path, f"init_from takes ViT or omics backbones, not a {fam_s} one "
                         f"({source['variant']})")
    if fam_s == "vit" and source["patch"] != target["patch"]:
        raise _err(path, f"patch {source['patch']} ({source['variant']}) but this run's "
                         f"model.variant={target['variant']} has patch {target['patch']}: the "
                         f"patch embedding cannot be mapped; set model.variant="
                         f"{source['variant']} to continue from it")


def check_omics_data(config: Any, path: str, step: int | None = None) -> str:
    """For an omics run from an omics source: `cfm.compat.check_omics`'s summary line when the
    run's data (`data.path`, a prepared folder) uses the source's gene ids and normalisation,
    else InitFromError with compat's reason and the prepare_omics flags that fix it."""
    kind, where, step = resolve(path, step)
    if config.data.get("source") != "prepared":
        raise _err(path, f"an omics backbone continues on prepared data (data.source="
                         f"'prepared', data.path=a data_prep.prepare_omics folder made with "
                         f"its vocab.tsv), not data.source={config.data.get('source')!r}")
    try:
        return compat.check_omics(compat.model_spec(where, step), config.data.path)
    except (compat.CompatError, CheckpointError, ValueError, OSError) as e:
        raise _err(path, str(e)) from None


# ============================================================================ entry points ====
def apply_init_from(state: Any, config: Any, path: str, step: int | None = None
                    ) -> tuple[Any, InitReport]:
    """(state with `params` and `teacher` filled from PATH, report). `state` is the fresh
    TrainState of `setup.create_state` on any mesh; the result keeps each leaf's sharding and
    dtype, and the optimiser state, step, centers and RNG of `state`. `step`: a checkpoint step
    (None or negative: the latest)."""
    step = None if step is None or step < 0 else int(step)
    src = read_source(path, step)
    check_family(src.arch, architecture(config.model.to_dict()), path)
    data_note = ("" if src.arch.get("family", "vit") == "vit" else
                 "; data: " + check_omics_data(config, path, step))
    flat = flatten(jax.tree.map(lambda x: tuple(x.shape), state.params,
                                           is_leaf=lambda x: hasattr(x, "shape")))
    target = per_block_shapes(flat)
    plan, unused = match(target, {k: tuple(v.shape) for k, v in src.student.items()}, src.kind)
    done = [k for k, (a, _) in plan.items() if k.startswith("backbone.") and a != "reinit"]
    a, m = src.arch, config.model
    vit_src = a.get("family", "vit") == "vit"
    desc = (f"{a['variant']}, width {a['width']}" + (f", patch {a['patch']}" if vit_src else
                                                     f", {a['vocab_size']} gene ids"))
    if not done:
        raise _err(path, f"its backbone ({desc}) shares no parameter with "
                         f"model.variant={m.variant}")
    stem = STEMS[a.get("family", "vit")]
    if plan.get(stem, ("",))[0] != "load":
        what = "patch embedding" if vit_src else "gene embedding"
        raise _err(path, f"its {what} ({desc}) does not fit model.variant={m.variant} "
                         f"({plan.get(stem, ('', 'absent'))[1]}); set model.variant="
                         f"{a['variant']} to continue from it")
    students, teachers = {}, {}
    for name, (action, _) in plan.items():
        if action == "load":
            students[name] = src.student[name]
            if state.teacher:  # objectives without a teacher (MGM) keep {}
                teachers[name] = src.teacher[name]
        elif action == "resample":
            students[name] = _resample_pos(src.student[name], target[name])
            teachers[name] = (students[name] if src.teacher is src.student else
                              _resample_pos(src.teacher[name], target[name]))
    mapping = ("student <- its student, teacher <- its teacher" if src.kind == "checkpoint" else
               "student and teacher backbones <- its (teacher) backbone")
    if not state.teacher:  # MGM: no teacher
        mapping = ("student <- its student" if src.kind == "checkpoint" else
                   "student backbone <- its backbone")
    shape = (f"{a['variant']}, img_size {a['img_size']}, {a['num_registers']} registers -> "
             f"{m.variant}, img_size {m.img_size}, {m.num_registers} registers" if vit_src else
             f"{a['variant']}, {a['vocab_size']} gene ids -> {m.variant}")
    report = InitReport(
        f"{src.kind} {src.where} (step {src.step}; {shape}); {mapping}{data_note}",
        loaded=[(k, d) for k, (x, d) in plan.items() if x == "load"],
        resampled=[(k, d) for k, (x, d) in plan.items() if x == "resample"],
        reinitialised=[(k, d) for k, (x, d) in plan.items() if x == "reinit"], unused=unused)
    return state.replace(params=_assemble(state.params, students),
                         teacher=_assemble(state.teacher, teachers)), report


def _has_checkpoint(workdir: str) -> bool:
    """Whether `workdir` (local or gs://) holds a checkpoint step folder to resume."""
    folder = epath.Path(checkpoint.checkpoint_dir(workdir))
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def check_path(config: Any, workdir: str) -> None:
    """For a new run (no checkpoint in `workdir` to resume) with `config.init_from` set:
    InitFromError now, before any model is built or anything written, if PATH is missing, is
    neither a cfm.train workdir nor a cfm.export folder, or lacks `config.init_from_step`.
    Reads no weights."""
    path = config.get("init_from", "") or ""
    if not path or _has_checkpoint(workdir):
        return
    step = config.get("init_from_step", -1)
    step = None if step is None or step < 0 else int(step)
    kind, where, step = resolve(path, step)
    if kind == "checkpoint":
        try:
            _, steps = checkpoint.checkpoint_steps(where)
        except FileNotFoundError as e:
            raise _err(path, str(e)) from None
        if step is not None and step not in steps:
            raise _err(path, f"config.init_from_step={step}: no such checkpoint; it holds steps "
                             f"{steps}")
    if config.model.variant in omics.VARIANTS:  # gene ids must mean the same genes both sides
        try:
            arch = compat.model_spec(where, step).arch
        except (CheckpointError, OSError, ValueError) as e:
            raise _err(path, str(e)) from None
        check_family(arch, {"family": "omics", "variant": config.model.variant}, path)
        check_omics_data(config, path, step)


def maybe_init_from(state: Any, config: Any, workdir: str, is_main: bool = True) -> Any:
    """The trainer's hook for a run that restored no checkpoint: `config.init_from` unset ->
    `state` unchanged; else `apply_init_from`, with the report printed and written to
    WORKDIR/init_from.txt on the main process."""
    path = config.get("init_from", "") or ""
    if not path:
        return state
    state, report = apply_init_from(state, config, path, config.get("init_from_step", -1))
    if is_main:
        text = report.format()
        where = report.write(workdir)
        print(f"cfm.train: {text.rstrip()}\ncfm.train: (this report is in {where})", flush=True)
    return state
