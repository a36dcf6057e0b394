"""Find the curriculum for your own model and data: EfficientTrain's Algorithm 1, as a command (issue 17).

    python -m mae_curriculum.curriculum.search --config CONFIG.yaml --stages N --sizes 96,128,160,192,224 \\
        --mode accuracy|compute [--tolerance T] [--seeds 0,1] [--budgets 0.8,0.67,0.5] --out DIR \\
        [--probe-config LINPROBE.yaml] [key=value ...]

**Accuracy mode** (EfficientTrain, Algorithm 1). Training is split into N stages of equal image budgets
(``accounting: epochs``). a0 is the accuracy with the final size throughout. Starting from every stage at the final
size, for i = N-1 down to 1 it sets stages 1..i to one common size B and finds the smallest candidate B whose
trained model still reaches the threshold (linear search, walking down from stage i+1's size and stopping at the
first size that fails); stage i keeps it and the next round searches below it. At most 1 + (N - 1) +
(number of sizes - 1) trainings per seed. The compute saving comes from the smaller sizes.

**Compute mode** (EfficientTrain++). Stages of equal *compute* (``accounting: compute``: a low-resolution stage
sees more images for the same FLOPs). Phase 1 is the same greedy staircase search at the config's budget;
phase 2 keeps that staircase and shrinks the budget (``train.epochs`` times each of ``--budgets``, largest first)
while the threshold still holds. The result minimises compute subject to accuracy >= threshold.

**Noise.** Every candidate is trained with every seed of ``--seeds``; its score is the mean top-1. A candidate is
accepted when ``mean >= a0_mean - a0_se - tolerance`` (a0_se = standard error of the baseline over the seeds,
0 with one seed): within one standard error of the baseline, minus the tolerance you allow. Ties go to the
smaller size; a round ends at the first rejected size (a smaller one is not tried: the search assumes accuracy
does not rise again as B falls, which is also what keeps it at "N + a few" runs).

**Proxy accuracy.** The config decides: a pre-training config (no top-level ``mode``) runs MAE pre-training
(``python -m mae_curriculum.cli.pretrain``) and then a linear probe of its exported encoder
(``python -m mae_curriculum.cli.finetune --config PROBE`` in ``mode=linprobe``, on the pre-training config's
shards); a ``mode: supervised`` config runs ``finetune.py`` and uses its top-1. Every proxy run is a real run in
its own folder ``OUT/runs/<candidate>_s<seed>/``; a run whose folder holds ``final.json`` is finished and never
repeated, an unfinished one resumes from its checkpoint (``--resume auto``), so the search can be stopped
(Ctrl-C / SIGTERM: the running proxies save and exit 75, the search exits 75) and started again: the decisions
replay from the finished runs.

Outputs: ``OUT/schedule.yaml`` (the ``curriculum`` section, ``schedule: custom``, to paste into your config, and
in compute mode the ``train.epochs`` to use), ``OUT/search.json`` and ``OUT/search.md`` (every candidate tried:
sizes, budget, per-seed top-1, mean, standard error, PFLOPs, wall and CPU seconds, accepted or not) and
``OUT/search.png`` (the chosen staircase next to the built-in ET / ET++ ones, and accuracy against compute of
every candidate).

Sizes are given for a 224-pixel final size and scaled like the built-in schedules
(:func:`mae_curriculum.curriculum.schedule.scale_size`) when the model's final size differs; every candidate is a
multiple of the patch size. This module launches runs as processes; it imports no engine code.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from mae_curriculum.curriculum.processes import Children, child_env
from mae_curriculum.curriculum.schedule import build_schedule, ramp_magnitudes, scale_size

__all__ = ["Candidate", "Score", "threshold", "staircase_search", "budget_search", "search", "candidate_sizes",
           "main"]

MAX_CONFIG_BYTES = 1 << 20
EXIT_USAGE, EXIT_FAILED, EXIT_STOPPED = 2, 1, 75
DEFAULT_MAX_MAGNITUDE = 9.0  # CurriculumConfig.max_magnitude (this module imports no config code)


# ----------------------------------------------------------------------------------------------------------------
# the search itself: pure functions of an evaluate(candidate) -> Score callback (tested without training)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A staircase: one size per stage (stage 1 first), trained for ``budget`` x the config's ``train.epochs``."""

    sizes: tuple[int, ...]
    budget: float = 1.0

    @property
    def name(self) -> str:
        return f"b{self.budget:g}_" + "-".join(str(s) for s in self.sizes)


@dataclass
class Score:
    """Mean top-1 over seeds and its standard error (None with one seed); cost of the runs (means over seeds)."""

    mean: float
    se: float | None = None
    top1: list[float] = field(default_factory=list)
    pflops: float | None = None
    wall_s: float | None = None
    cpu_s: float | None = None


def mean_se(values: Sequence[float]) -> tuple[float, float | None]:
    if not values:
        raise ValueError("no values")
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None)


def threshold(baseline: Score, tolerance: float) -> float:
    """The accuracy a candidate must reach: baseline mean - one standard error - tolerance."""
    return baseline.mean - (baseline.se or 0.0) - tolerance


def staircase_search(n_stages: int, sizes: Sequence[int], evaluate: Callable[[Candidate], Score], bar: float,
                     budget: float = 1.0, log: Callable[[str], None] = lambda s: None) -> tuple[int, ...]:
    """Algorithm 1 of EfficientTrain: the staircase of the smallest sizes that still reach ``bar``.

    ``sizes``: the candidates, the largest one being the final size. Stage N always stays at the final size.
    For i = N-1 .. 1, stages 1..i are set to one common B and B walks down the candidates below stage i+1's
    size (largest first); the round keeps the last B that reaches ``bar`` and ends at the first that does not
    (accuracy is taken not to rise again as B falls further). If even the first fails, stages 1..i keep stage
    i+1's size: that staircase was accepted in the round before (or is the baseline), so it needs no run.
    Since every round starts where the one before stopped, a search costs at most
    (N - 1) rejected + (len(sizes) - 1) accepted runs after the baseline: "N + a few" trainings.
    """
    sizes = sorted(set(sizes))
    if n_stages < 1:
        raise ValueError(f"stages must be >= 1, got {n_stages}")
    final = sizes[-1]
    stair = [final] * n_stages
    for i in range(n_stages - 1, 0, -1):
        upper = stair[i]
        stair[:i] = [upper] * i
        for b in sorted((s for s in sizes if s < upper), reverse=True):
            cand = Candidate(tuple([b] * i + stair[i:]), budget)
            score = evaluate(cand)
            ok = score.mean >= bar
            log(f"stages 1-{i} at {b}: top-1 {score.mean:.2f} {'>=' if ok else '<'} {bar:.2f} -> "
                f"{'accepted' if ok else 'rejected'}")
            if not ok:
                break
            stair = list(cand.sizes)
        log(f"stage {i} fixed at {stair[i - 1]}")
    return tuple(stair)


def budget_search(stair: tuple[int, ...], budgets: Sequence[float], evaluate: Callable[[Candidate], Score],
                  bar: float, log: Callable[[str], None] = lambda s: None) -> float:
    """The smallest budget fraction (of ``budgets``, tried largest first, stopping at the first that fails) at
    which ``stair`` still reaches ``bar``; 1.0 if none below 1 does."""
    best = 1.0
    for b in sorted({float(x) for x in budgets if 0 < x < 1}, reverse=True):
        score = evaluate(Candidate(stair, b))
        ok = score.mean >= bar
        log(f"budget x{b:g}: top-1 {score.mean:.2f} {'>=' if ok else '<'} {bar:.2f} -> "
            f"{'accepted' if ok else 'rejected'}")
        if not ok:
            break
        best = b
    return best


def search(mode: str, n_stages: int, sizes: Sequence[int], evaluate: Callable[[Candidate], Score],
           tolerance: float = 0.0, budgets: Sequence[float] = (), log: Callable[[str], None] = lambda s: None
           ) -> dict[str, Any]:
    """The whole search: baseline, staircase, (compute mode) budget. Returns the decisions."""
    if mode not in ("accuracy", "compute"):
        raise ValueError(f"mode must be accuracy or compute, got {mode!r}")
    final = max(sizes)
    base = evaluate(Candidate((final,) * n_stages, 1.0))
    bar = threshold(base, tolerance)
    se = f" +- {base.se:.2f}" if base.se is not None else ""
    log(f"baseline (final size {final} throughout): top-1 {base.mean:.2f}{se}; threshold {bar:.2f}")
    stair = staircase_search(n_stages, sizes, evaluate, bar, 1.0, log)
    budget = budget_search(stair, budgets, evaluate, bar, log) if mode == "compute" else 1.0
    return {"baseline": base, "threshold": bar, "sizes": stair, "budget": budget}


def candidate_sizes(sizes_224: Sequence[int], final_size: int, patch_size: int) -> list[int]:
    """The candidate sizes for a model: given for a 224 final size, scaled (as the built-in schedules) to
    ``final_size`` and rounded to the patch; the final size itself is always a candidate."""
    if not sizes_224 or any(s <= 0 for s in sizes_224):
        raise ValueError(f"--sizes: positive sizes expected, got {list(sizes_224)}")
    if final_size == 224:
        bad = [s for s in sizes_224 if s % patch_size]
        if bad:
            raise ValueError(f"--sizes {bad} are not multiples of the patch size {patch_size}")
        scaled = list(sizes_224)
    else:
        scaled = [scale_size(s, final_size, patch_size) for s in sizes_224]
    return sorted({s for s in scaled if s <= final_size} | {final_size})


# ----------------------------------------------------------------------------------------------------------------
# proxy runs: real, separately resumable processes
# ----------------------------------------------------------------------------------------------------------------


class SearchError(Exception):
    """A problem the user can act on: one line, exit status 2."""


def read_config(path: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """The few keys the search needs (mode, model.img_size / patch_size, data shards) from the YAML and the
    ``key=value`` overrides. The runs themselves validate the whole config. Bounded, plain YAML only."""
    if not path.is_file():
        raise SearchError(f"config file not found: {path}")
    raw = path.read_bytes()[: MAX_CONFIG_BYTES + 1]
    if len(raw) > MAX_CONFIG_BYTES:
        raise SearchError(f"config file {path}: larger than 1 MiB; is it a config?")
    try:
        text = raw.decode("utf-8")
        if any(isinstance(t, yaml.AliasToken) for t in yaml.scan(text)):
            raise SearchError(f"{path}: YAML aliases are not accepted here")
        data = yaml.safe_load(text) or {}
    except (UnicodeDecodeError, yaml.YAMLError):
        raise SearchError(f"{path}: not valid UTF-8 YAML") from None
    if not isinstance(data, dict):
        raise SearchError(f"{path}: top level must be a mapping of sections")
    for o in overrides:
        key, sep, value = o.partition("=")
        if not sep:
            raise SearchError(f"unexpected argument {o!r}: overrides look like key=value")
        node = data
        *parents, last = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            try:
                node[last] = yaml.safe_load(value) if value.strip() else ""
            except yaml.YAMLError:
                node[last] = value
    return data


def _get(data: dict, dotted: str, default: Any = None) -> Any:
    node: Any = data
    for p in dotted.split("."):
        if not isinstance(node, dict) or p not in node:
            return default
        node = node[p]
    return node


def _stage_entries(sizes: Sequence[int], accounting: str, max_magnitude: float) -> list[str]:
    """``curriculum.stages`` entries of a staircase: equal fractions, and the RandAugment magnitude ramp of the
    schedule family being searched (``ramp_magnitudes``: EfficientTrain's in accuracy mode, EfficientTrain++'s in
    compute mode), so that a candidate differs from the published schedules only in its sizes."""
    n = len(sizes)
    mags = ramp_magnitudes(n, max_magnitude, accounting)
    return [f"{{size: {s}, fraction: {1 / n!r}, magnitude: {m!r}}}" for s, m in zip(sizes, mags)]


def _stages_value(c: Candidate, accounting: str, max_magnitude: float) -> str:
    """``curriculum.stages`` as a YAML flow list."""
    return "[" + ", ".join(_stage_entries(c.sizes, accounting, max_magnitude)) + "]"


_ENCODER_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
PROBE_OVERRIDES = ("mode=linprobe", "model.global_pool=token", "model.drop_path=0", "augment.crop=center",
                   "linprobe.cache_features=true", "optim.name=lars", "optim.weight_decay=0", "optim.layer_decay=1.0",
                   "optim.min_lr=0", "eval.every_epochs=1000", "checkpoint.every_epochs=0",
                   "checkpoint.every_minutes=0")


@dataclass
class Proxy:
    """Builds and runs the proxy trainings of one search."""

    config: Path
    data: dict[str, Any]
    overrides: list[str]
    accounting: str
    out: Path
    probe_config: Path | None = None
    probe_overrides: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    jobs: int = 1
    threads: int = 0
    say: Callable[[str], None] = print
    children: Children = field(default_factory=Children)
    cache: dict[str, Score] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)

    @property
    def supervised(self) -> bool:
        return self.data.get("mode") is not None

    @property
    def epochs(self) -> float:
        return float(_get(self.data, "train.epochs", 0) or 0)

    @property
    def max_magnitude(self) -> float:
        return max_magnitude(self.data)

    def train_cmd(self, c: Candidate, seed: int, out: Path) -> list[str]:
        module = "finetune" if self.supervised else "pretrain"
        over = [f"output_dir={out}", "curriculum.schedule=custom", f"curriculum.accounting={self.accounting}",
                f"curriculum.stages={_stages_value(c, self.accounting, self.max_magnitude)}", f"train.seed={seed}",
                "log.progress_bar=false"]
        if c.budget != 1.0:
            over.append(f"train.epochs={self.epochs * c.budget!r}")
        return [sys.executable, "-m", f"mae_curriculum.cli.{module}", "--config", str(self.config),
                *self.overrides, *over]

    def probe_cmd(self, seed: int, encoder: Path, out: Path) -> list[str]:
        assert self.probe_config is not None
        model = [f"model.{k}={_get(self.data, 'model.' + k)}" for k in _ENCODER_KEYS
                 if _get(self.data, "model." + k) is not None]
        shards = [f"data.{k}={_get(self.data, 'data.' + k)}" for k in ("train_shards", "val_shards")
                  if _get(self.data, "data." + k)]
        return [sys.executable, "-m", "mae_curriculum.cli.finetune", "--config", str(self.probe_config),
                *PROBE_OVERRIDES, *model, *shards, f"finetune.pretrained={encoder}", f"output_dir={out}",
                f"train.seed={seed}", "log.progress_bar=false", *self.probe_overrides]

    def run(self, cmd: list[str], out: Path, log_file: Path) -> dict[str, Any]:
        """Run ``cmd`` unless ``out/final.json`` exists; returns final.json plus the process costs."""
        cost_file = out.parent / f"{out.name}.cost.json"
        if (out / "final.json").is_file():
            costs = json.loads(cost_file.read_text()) if cost_file.is_file() else {}
            return {**json.loads((out / "final.json").read_text()), **costs}
        if self.children.stop.is_set():
            raise _Stopped()
        out.parent.mkdir(parents=True, exist_ok=True)
        rc, wall, cpu = self.children.run(cmd, log_file, child_env(self.threads))
        prev = json.loads(cost_file.read_text()) if cost_file.is_file() else {"process_s": 0.0, "cpu_s": 0.0}
        costs = {"process_s": prev["process_s"] + wall, "cpu_s": prev["cpu_s"] + cpu}
        cost_file.write_text(json.dumps(costs))
        if rc == EXIT_STOPPED or self.children.stop.is_set():
            raise _Stopped()
        if rc != 0 or not (out / "final.json").is_file():
            last = _last_error(log_file)
            if rc == EXIT_USAGE:
                raise SearchError(f"a proxy run refused its config: {last} (log: {log_file})")
            raise RuntimeError(f"proxy run failed with exit status {rc}: {last} (log: {log_file})")
        return {**json.loads((out / "final.json").read_text()), **costs}

    def one_seed(self, c: Candidate, seed: int) -> dict[str, Any]:
        d = self.out / "runs" / f"{c.name}_s{seed}"
        train = self.run(self.train_cmd(c, seed, d / "train"), d / "train", d / "train.log")
        rec = {"seed": seed, "pflops": train.get("flops", 0.0) / 1e15, "wall_s": train["process_s"],
               "cpu_s": train["cpu_s"]}
        if self.supervised:
            rec["top1"] = float(train["top1"])
        else:
            probe = self.run(self.probe_cmd(seed, d / "train" / "export", d / "probe"), d / "probe", d / "probe.log")
            rec["top1"] = float(probe["top1"])
        return rec

    def evaluate(self, c: Candidate) -> Score:
        if c.name in self.cache:
            return self.cache[c.name]
        self.say(f"[{len(self.cache) + 1}] {c.name}: training {len(self.seeds)} seed(s) ...")
        with ThreadPoolExecutor(max_workers=max(1, min(self.jobs, len(self.seeds)))) as pool:
            recs = list(pool.map(lambda s: self.one_seed(c, s), self.seeds))
        m, se = mean_se([r["top1"] for r in recs])
        score = Score(m, se, [r["top1"] for r in recs], statistics.fmean(r["pflops"] for r in recs),
                      statistics.fmean(r["wall_s"] for r in recs), statistics.fmean(r["cpu_s"] for r in recs))
        self.cache[c.name] = score
        self.records.append({"candidate": c.name, "sizes": list(c.sizes), "budget": c.budget,
                             "epochs": self.epochs * c.budget, "seeds": [r["seed"] for r in recs],
                             "top1": score.top1, "mean": m, "se": se, "pflops": score.pflops,
                             "wall_s": score.wall_s, "cpu_s": score.cpu_s})
        return score

    def terminate(self) -> None:
        self.children.terminate()


class _Stopped(Exception):
    pass


def _last_error(log_file: Path) -> str:
    try:
        lines = [ln for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    errs = [ln for ln in lines if "error" in ln.lower()]
    return (errs or lines or ["no output"])[-1].strip()[:300]


# ----------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------


def max_magnitude(data: dict[str, Any]) -> float:
    """The config's ``curriculum.max_magnitude`` (the config default when absent)."""
    return float(_get(data, "curriculum.max_magnitude", DEFAULT_MAX_MAGNITUDE))


def schedule_yaml(result: dict[str, Any], accounting: str, epochs: float, max_mag: float) -> str:
    lines = ["# found by python -m mae_curriculum.curriculum.search; paste into your config", "curriculum:",
             "  schedule: custom", f"  accounting: {accounting}", f"  max_magnitude: {max_mag!r}", "  stages:"]
    lines += [f"    - {e}" for e in _stage_entries(result["sizes"], accounting, max_mag)]
    if accounting == "compute":
        lines += ["train:", f"  epochs: {epochs * result['budget']!r}  # x{result['budget']:g} of the searched config's budget"]
    return "\n".join(lines) + "\n"


def report_md(summary: dict[str, Any]) -> str:
    rows = ["| candidate (stage sizes) | budget | seeds | top-1 per seed | mean | SE | PFLOPs | wall s | CPU s | accepted |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    bar = summary["threshold"]
    for r in summary["candidates"]:
        f = (lambda v, p=2: "-" if v is None else f"{v:.{p}f}")
        rows.append(f"| {' '.join(map(str, r['sizes']))} | x{r['budget']:g} | {len(r['seeds'])} | "
                    f"{', '.join(f'{t:.2f}' for t in r['top1'])} | {r['mean']:.2f} | {f(r['se'])} | "
                    f"{f(r['pflops'], 5)} | {f(r['wall_s'], 0)} | {f(r['cpu_s'], 0)} | "
                    f"{'baseline' if r['baseline'] else ('yes' if r['mean'] >= bar else 'no')} |")
    res = summary["result"]
    head = [f"# Curriculum search ({summary['mode']} mode, {summary['stages']} stages)", "",
            f"Config `{summary['config']}`; candidate sizes {summary['sizes']}; seeds {summary['seeds']}; "
            f"threshold {bar:.2f} (baseline {summary['baseline']['mean']:.2f} - SE - tolerance "
            f"{summary['tolerance']:g}).", "",
            f"**Result**: stage sizes {res['sizes']}, budget x{res['budget']:g} ({res['epochs']:g} epochs), "
            f"top-1 {res['mean']:.2f}, {res['compute_ratio']:.2f}x less compute than the baseline.", ""]
    return "\n".join(head + rows) + "\n"


def plot(summary: dict[str, Any], final: int, patch: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    n = summary["stages"]
    found = summary["result"]["sizes"]
    ax1.step([i / n for i in range(n + 1)], [found[0], *found], where="pre", lw=2.5, label="searched")
    for name in ("efficienttrain", "efficienttrain++"):
        sch = build_schedule(name, final, patch)
        ax1.step([sch.stages[0].start] + [s.end for s in sch.stages], [sch.stages[0].size] + sch.sizes(),
                 where="pre", ls="--", label=f"{name} ({sch.accounting})")
    ax1.set_xlabel(f"training progress ({summary['accounting']} accounting for the searched one)")
    ax1.set_ylabel("input size B")
    ax1.set_title("the chosen staircase")
    ax1.legend()
    for r in summary["candidates"]:
        if r["pflops"] is not None:
            ax2.errorbar(r["pflops"], r["mean"], yerr=r["se"] or 0, fmt="o",
                         color="k" if r["baseline"] else ("tab:green" if r["mean"] >= summary["threshold"] else "tab:red"))
    ax2.axhline(summary["threshold"], ls="--", color="gray", label="threshold")
    ax2.set_xlabel("PFLOPs (training)")
    ax2.set_ylabel("top-1 (%)")
    ax2.set_title("candidates (green accepted, red rejected, black baseline)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mae_curriculum.curriculum.search", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path, help="pre-training or mode: supervised fine-tune config")
    p.add_argument("--stages", type=int, default=5, help="N equal stages (default 5)")
    p.add_argument("--sizes", default="96,128,160,192,224", help="candidate sizes for a 224 final size")
    p.add_argument("--mode", choices=("accuracy", "compute"), default="accuracy")
    p.add_argument("--tolerance", type=float, default=0.0, help="top-1 points below the baseline allowed")
    p.add_argument("--seeds", default="0", help="comma-separated seeds of every candidate")
    p.add_argument("--budgets", default="0.8,0.67,0.5", help="compute mode: budget fractions tried in phase 2")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--probe-config", type=Path, default=None,
                   help="MAE only: the linear-probe config (e.g. configs/linprobe_vit_b.yaml)")
    p.add_argument("--probe-override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--jobs", type=int, default=1, help="seeds of a candidate trained at once")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of every run (0: leave it)")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 stages, the first seed, the smallest size and the final one, one budget")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every proxy training")
    return p.parse_args(argv)


def _ints(s: str, what: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise SearchError(f"{what}: comma-separated integers expected, got {s!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        return _main(a)
    except SearchError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except _Stopped:
        print("stopped: the running proxies saved a checkpoint; run the same command again to continue", flush=True)
        return EXIT_STOPPED
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_FAILED


def _main(a: argparse.Namespace) -> int:
    data = read_config(a.config, a.overrides)
    final, patch = _get(data, "model.img_size"), _get(data, "model.patch_size")
    if not isinstance(final, int) or not isinstance(patch, int) or final <= 0 or patch <= 0:
        raise SearchError(f"{a.config}: model.img_size and model.patch_size must be positive integers")
    if data.get("mode") not in (None, "supervised"):
        raise SearchError(f"{a.config}: mode {data.get('mode')!r}: search a pre-training or a mode: supervised config")
    if data.get("mode") is None and a.probe_config is None:
        raise SearchError("an MAE pre-training config needs --probe-config (the linear probe that scores it)")
    if a.probe_config is not None and not a.probe_config.is_file():
        raise SearchError(f"--probe-config {a.probe_config}: no such file")
    if a.stages < 1:
        raise SearchError(f"--stages must be >= 1, got {a.stages}")
    try:
        sizes = candidate_sizes(_ints(a.sizes, "--sizes"), final, patch)
        budgets = [float(x) for x in a.budgets.split(",") if x.strip()]
    except ValueError as e:
        raise SearchError(str(e)) from None
    seeds = _ints(a.seeds, "--seeds")
    stages = a.stages
    if a.quick:
        stages, seeds, sizes, budgets = 2, seeds[:1], [*[s for s in sizes if s < final][:1], final], budgets[:1]
    if not seeds:
        raise SearchError("--seeds: at least one seed")
    accounting = "epochs" if a.mode == "accuracy" else "compute"
    if a.mode == "compute" and not float(_get(data, "train.epochs", 0) or 0) > 0:
        raise SearchError(f"{a.config}: compute mode needs train.epochs > 0")
    a.out.mkdir(parents=True, exist_ok=True)
    proxy = Proxy(a.config, data, list(a.overrides), accounting, a.out, a.probe_config, list(a.probe_override),
                  seeds, a.jobs, a.threads)
    print(f"# curriculum search, {a.mode} mode: {stages} stages, final size {final} (patch {patch}), candidate "
          f"sizes {sizes}, seeds {seeds}, proxy = {'supervised top-1' if proxy.supervised else 'MAE + linear probe'}",
          flush=True)
    previous = {sig: signal.signal(sig, lambda signum, frame: proxy.terminate()) for sig in (signal.SIGTERM, signal.SIGINT)}
    t0 = time.time()
    try:
        res = search(a.mode, stages, sizes, proxy.evaluate, a.tolerance, budgets, log=lambda s: print(s, flush=True))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # the chosen staircase was always evaluated: a round that keeps no smaller size repeats the one before
    base, chosen = res["baseline"], proxy.cache[Candidate(res["sizes"], res["budget"]).name]
    epochs = proxy.epochs
    base_name = Candidate((final,) * stages, 1.0).name
    summary = {"mode": a.mode, "config": str(a.config), "overrides": a.overrides, "stages": stages, "sizes": sizes,
               "seeds": seeds, "tolerance": a.tolerance, "accounting": accounting,
               "baseline": {"mean": base.mean, "se": base.se, "pflops": base.pflops}, "threshold": res["threshold"],
               "candidates": [{**r, "baseline": r["candidate"] == base_name} for r in proxy.records],
               "result": {"sizes": list(res["sizes"]), "budget": res["budget"], "epochs": epochs * res["budget"],
                          "mean": chosen.mean, "se": chosen.se, "pflops": chosen.pflops,
                          "compute_ratio": (base.pflops / chosen.pflops) if base.pflops and chosen.pflops else 1.0},
               "search_s": round(time.time() - t0, 1), "runs": len(proxy.records) * len(seeds)}
    (a.out / "search.json").write_text(json.dumps(summary, indent=1) + "\n")
    (a.out / "schedule.yaml").write_text(schedule_yaml(summary["result"], accounting, epochs, max_magnitude(data)))
    (a.out / "search.md").write_text(report_md(summary))
    plot(summary, final, patch, a.out / "search.png")
    print(report_md(summary), flush=True)
    print(f"wrote {a.out / 'schedule.yaml'}, search.json, search.md, search.png ({summary['runs']} proxy runs, "
          f"{summary['search_s']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
