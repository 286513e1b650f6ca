"""The A/B study's report: OUT/protocol.json + OUT/runs/*.json -> OUT/report.md, OUT/figures/*.png
and OUT/stats.json (the full :func:`study.stats.summarize` output, for re-use).

Every arm is shown in every table (never only the best), runs that the protocol asked for but
that are absent are listed as missing, and the significance sentence is generated from the
numbers, so the text cannot claim more than the tests give.

CLI, from the repository root: ``PYTHONPATH=research python -m study.report OUT [--noise NOISE_OUT]``.
Plain Python + numpy/scipy/matplotlib.
"""
from __future__ import annotations

import glob
import json
import math
import os
import sys
from typing import Dict, List, Optional

import numpy as np

from study import stats as S
from study.protocol import NOISE_ARMS

CURVE_KEYS = ("lm", "das", "sds")
STAGES = ("stage1", "stage2")


def load_results(out_dir: str):
    """(protocol dict, list of run dicts) from OUT; errors name the file and the key."""
    proto_path = os.path.join(out_dir, "protocol.json")
    if not os.path.isfile(proto_path):
        raise FileNotFoundError(f"write_report: {proto_path} not found (the runner writes it first)")
    with open(proto_path) as f:
        protocol = json.load(f)
    runs = []
    for path in sorted(glob.glob(os.path.join(out_dir, "runs", "*.json"))):
        with open(path) as f:
            try:
                r = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"write_report: {path} is not valid JSON: {e}") from e
        for key in ("arm", "seed"):
            if key not in r:
                raise ValueError(f"write_report: {path} has no {key!r} key")
        r["_file"] = os.path.relpath(path, out_dir)
        runs.append(r)
    return protocol, runs


def _protocol_grid(protocol: dict):
    """Arms and seeds the protocol asked for ('seeds' may be a list or a count)."""
    arms = protocol.get("arms") or []
    if isinstance(arms, dict):
        arms = list(arms)
    seeds = protocol.get("seeds") or []
    if isinstance(seeds, int):
        seeds = list(range(seeds))
    return [str(a) for a in arms], [int(s) for s in seeds]


# ---- formatting ---------------------------------------------------------------------------------

def _f(x, digits=4):
    if x is None:
        return "-"
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    return f"{x:.{digits}g}"


def _p(p):
    if p is None:
        return "-"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def _label(name: str) -> str:
    return name.split("/", 1)[1] if "/" in name else name


# ---- figures ------------------------------------------------------------------------------------

def _new_figure(nrows, ncols, w, h):
    # the object API (no pyplot): no global backend or figure state, safe in tests and headless runs
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w * ncols, h * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _curve_band(runs: List[dict], stage: str, key: str):
    """steps, mean, min, max over the seeds' curves (each step over the seeds that logged it)."""
    per_step: Dict[int, List[float]] = {}
    for r in runs:
        for row in (r.get("curves") or {}).get(stage) or []:
            v = row.get(key)
            if v is not None and "step" in row and math.isfinite(float(v)):
                per_step.setdefault(int(row["step"]), []).append(float(v))
    steps = sorted(per_step)
    if not steps:
        return None
    vals = [np.array(per_step[s]) for s in steps]
    return (np.array(steps), np.array([v.mean() for v in vals]), np.array([v.min() for v in vals]),
            np.array([v.max() for v in vals]))


def plot_curves(by_arm: Dict[str, List[dict]], stage: str, path: str) -> None:
    fig, axes = _new_figure(1, len(CURVE_KEYS), 4.5, 3.4)
    # one colour per arm across the panels (llava has no das / sds line, so cycling would shift them)
    colors = {a: f"C{i % 10}" for i, a in enumerate(by_arm)}
    for ax, key in zip(axes[0], CURVE_KEYS):
        drawn = 0
        for arm, runs in by_arm.items():
            if not runs:
                continue
            band = _curve_band(runs, stage, key)
            if band is None:
                continue  # e.g. das / sds of the llava arm (BASIC off): nothing logged
            steps, mean, lo, hi = band
            ax.plot(steps, mean, label=f"{arm} (n={len(runs)})", lw=1.2, color=colors[arm])
            ax.fill_between(steps, lo, hi, color=colors[arm], alpha=0.2, lw=0)
            drawn += 1
        ax.set_title(f"{stage} {key} (mean, min-max over seeds)", fontsize=9)
        ax.set_xlabel("step")
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged by any arm", ha="center", va="center", transform=ax.transAxes)
    # fixed margins, not tight_layout: its extra draw passes cost seconds on a loaded CPU
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.15, top=0.9, wspace=0.25)
    fig.savefig(path, dpi=80)


def plot_metric_bars(summary: dict, stage: str, path: str) -> bool:
    names = [n for n, m in summary["metrics"].items() if m["stage"] == stage
             and any(a["n"] for a in m["arms"].values())]
    if not names:
        return False
    ncols = min(4, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = _new_figure(nrows, ncols, 3.6, 2.8)
    arms = summary["arms"]
    for i, name in enumerate(names):
        ax = axes[i // ncols][i % ncols]
        table = summary["metrics"][name]["arms"]
        means = [table[a]["mean"] if table[a]["mean"] is not None else np.nan for a in arms]
        x = np.arange(len(arms))
        ax.bar(x, means, color="#9ecae1", edgecolor="#3182bd")
        xs, ys = [], []
        for j, a in enumerate(arms):
            v = list(table[a]["values"].values())
            # small fixed jitter so the seeds' dots do not hide each other
            xs += list(j + np.linspace(-0.15, 0.15, len(v))) if len(v) > 1 else [j] * len(v)
            ys += v
        ax.plot(xs, ys, "o", ms=3, color="black", zorder=3)  # one artist per panel: cheaper to draw
        ax.set_xticks(x)
        ax.set_xticklabels(arms, rotation=45, ha="right", fontsize=7)
        arrow = "higher better" if summary["metrics"][name]["higher_is_better"] else "lower better"
        ax.set_title(f"{_label(name)} ({arrow})", fontsize=8)
    for k in range(len(names), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.12 / nrows ** 0.5, top=1 - 0.08 / nrows ** 0.5,
                        wspace=0.3, hspace=0.9)
    fig.savefig(path, dpi=80)
    return True


# ---- markdown -----------------------------------------------------------------------------------

def _protocol_md(protocol: dict) -> List[str]:
    lines = ["## Protocol", "", "| key | value |", "|---|---|"]
    for k, v in protocol.items():
        if isinstance(v, (dict, list)):
            v = json.dumps(v, sort_keys=True)
        v = str(v).replace("|", "\\|")
        lines.append(f"| {k} | {v if len(v) < 300 else v[:297] + '...'} |")
    return lines + [""]


def _stage_table(summary: dict, stage: str, expected_n: int) -> List[str]:
    arms = summary["arms"]
    lines = [f"## Held-out metrics, {stage} (mean ± std over seeds)", "",
             "| metric | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for name, m in summary["metrics"].items():
        if m["stage"] != stage:
            continue
        cells = []
        for a in arms:
            t = m["arms"][a]
            if t["n"] == 0:
                cells.append("missing")
                continue
            cell = _f(t["mean"]) + (f" ± {_f(t['std'], 3)}" if t["std"] is not None else "")
            if t["n"] != expected_n:
                cell += f" (n={t['n']})"
            cells.append(cell)
        arrow = "↑" if m["higher_is_better"] else "↓"
        lines.append(f"| {_label(name)} {arrow} | " + " | ".join(cells) + " |")
    return lines + [""]


def _comparisons_md(summary: dict) -> List[str]:
    lines = [f"## Comparisons against {summary['baseline']} (arm − {summary['baseline']}, paired by seed)", "",
             "p (t): two-sided paired t-test over seeds; p (sign-flip): exact permutation over seeds (floor "
             "2/2^n); p (item): Wilcoxon over held-out captions / exact McNemar over QA items, on the same "
             "trained models; Holm p: the t-test p Holm-adjusted over the arms of one metric; MDE: "
             "t(0.975, n−1)·sd/√n, the smallest |diff| that could reach p < 0.05 with this spread; "
             "win: Holm p < 0.05 and the difference in the good direction.", "",
             "| metric | arm | n | diff | 95% CI | p (t) | p (sign-flip) | p (item) | Holm p | MDE | win? |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, fam in summary["comparisons"].items():
        for a, e in fam.items():
            sl, il = e["seed_level"], e["item_level"]
            if sl is None:
                lines.append(f"| {name} | {a} | 0 | - | - | - | - | - | - | - | no (no paired runs) |")
                continue
            ci = "-" if sl["ci95"] is None else f"[{_f(sl['ci95'][0], 3)}, {_f(sl['ci95'][1], 3)}]"
            item = "-" if il is None else f"{_p(il['p'])} ({il['test']}, {il['n_items']} items)"
            lines.append(f"| {name} | {a} | {sl['n']} | {_f(sl['mean_diff'])} | {ci} | {_p(sl['p_ttest'])} | "
                         f"{_p(sl['p_signflip'])} | {item} | {_p(e['holm_p'])} | {_f(sl['mde'], 3)} | "
                         f"{'**yes**' if e['win'] else 'no'} |")
    return lines + [""]


# the metrics whose per-seed differences the report lists (the primary endpoints first)
SEED_DIFF_METRICS = ("stage2/caption_ce", "stage2/qa_key/all", "stage1/caption_ce", "stage1/cos_v_vhat")


def noise_floor(summary: dict, noise_summary: Optional[dict] = None) -> Dict[str, dict]:
    """Per metric: the largest same-seed |arm - llava| of the noise arms (runs that equal llava in
    exact arithmetic, protocol.NOISE_ARMS), taken from ``noise_summary`` (another results folder
    with the same llava runs) or else from ``summary``, and for every other arm of ``summary`` how
    many of its paired seeds lie beyond it. Empty when no noise arm has a paired run. Descriptive:
    it decides no win."""
    source = summary if noise_summary is None else noise_summary
    out = {}
    for name in SEED_DIFF_METRICS:
        nfam = source["comparisons"].get(name, {})
        present = [a for a in NOISE_ARMS if (nfam.get(a) or {}).get("seed_level")]
        noise = [abs(d) for a in present for d in nfam[a]["seed_level"]["diffs"]]
        if not noise:
            continue
        floor = max(noise)
        beyond = {a: [sum(abs(d) > floor for d in e["seed_level"]["diffs"]), e["seed_level"]["n"]]
                  for a, e in summary["comparisons"].get(name, {}).items()
                  if a not in NOISE_ARMS and e["seed_level"]}
        out[name] = {"floor": floor, "noise_n": len(noise), "noise_arms": present, "beyond": beyond}
    return out


def _seed_diffs_md(summary: dict, noise_summary: Optional[dict] = None, noise_src: str = "") -> List[str]:
    base = summary["baseline"]
    lines = [f"## Same-seed differences from {base} (arm − {base}, per seed)", "",
             "Runs with the same seed share the data order, the projector's initial draw and the held-out "
             "set, so these are the differences that pairing by seed leaves.", "",
             "| metric | arm | " + " | ".join(f"seed {s}" for s in summary["seeds"]) + " |",
             "|---|---|" + "---|" * len(summary["seeds"])]
    for name in SEED_DIFF_METRICS:
        for a, e in summary["comparisons"].get(name, {}).items():
            if not e["seed_level"]:
                continue
            by_seed = dict(zip(e["seeds"], e["seed_level"]["diffs"]))
            cells = [_f(by_seed[s], 3) if s in by_seed else "-" for s in summary["seeds"]]
            lines.append(f"| {name} | {a} | " + " | ".join(cells) + " |")
    lines.append("")
    floors = noise_floor(summary, noise_summary=noise_summary)
    if floors:
        noise = sorted({a for f in floors.values() for a in f["noise_arms"]})
        src = f", runs of {noise_src}" if noise_src else ""
        lines += ["Noise floor: the largest same-seed |difference| of the runs that equal "
                  f"{base} in exact arithmetic (arms {', '.join(noise)}{src}), and how many seeds of each other "
                  "arm lie beyond it:", ""]
        for name, f in floors.items():
            arms = ", ".join(f"{a} {k}/{n}" for a, (k, n) in f["beyond"].items())
            lines.append(f"- {name}: floor {_f(f['floor'], 3)} (from {f['noise_n']} runs); beyond it: {arms or '-'}")
        lines.append("")
    return lines


def significance_statement(summary: dict) -> str:
    """Plain-language result, generated from the numbers only."""
    base, alpha = summary["baseline"], summary["alpha"]
    wins, losses, item_only = [], [], []
    for name, fam in summary["comparisons"].items():
        for a, e in fam.items():
            if e["holm_p"] is not None and e["holm_p"] < alpha:
                (wins if e["win"] else losses).append((a, name, e))
            elif e["holm_p_item"] is not None and e["holm_p_item"] < alpha:
                item_only.append((a, name, e))
    ns = sorted({e["seed_level"]["n"] for fam in summary["comparisons"].values() for e in fam.values()
                 if e["seed_level"]})
    out = []
    if not any(e["seed_level"] for fam in summary["comparisons"].values() for e in fam.values()):
        return f"No arm has a run paired with a {base} run of the same seed, so nothing can be compared."
    if not wins and not losses:
        out.append(f"No arm differs from {'LLaVA' if base == 'llava' else base} at the {alpha:.0%} level "
                   f"after Holm correction on any held-out metric (seed-level paired t-test).")
    for label, group in (("better than", wins), ("worse than", losses)):
        for a, name, e in group:
            sl = e["seed_level"]
            out.append(f"{a} is {label} {base} on {name}: diff {_f(sl['mean_diff'])} "
                       f"(95% CI [{_f(sl['ci95'][0], 3)}, {_f(sl['ci95'][1], 3)}]), Holm p {_p(e['holm_p'])}, "
                       f"n={sl['n']} seeds.")
    # the detectable effect of the headline metric, caption CE, per stage
    for stage in STAGES:
        fam = summary["comparisons"].get(f"{stage}/caption_ce", {})
        mdes = [e["seed_level"]["mde"] for e in fam.values() if e["seed_level"] and e["seed_level"]["mde"] is not None]
        if mdes:
            n_txt = str(ns[0]) if len(ns) == 1 else f"{ns[0]} to {ns[-1]} (by arm)"
            rng = _f(min(mdes), 3) if len(mdes) == 1 or min(mdes) == max(mdes) else \
                f"{_f(min(mdes), 3)} to {_f(max(mdes), 3)} nats (by arm)"
            out.append(f"With {n_txt} seeds the smallest detectable difference in {stage} caption CE is {rng}"
                       f"{'' if ' nats' in rng else ' nats'} (t·sd/√n at the observed spread).")
    floors = sorted({e["seed_level"]["signflip_floor"] for fam in summary["comparisons"].values()
                     for e in fam.values() if e["seed_level"]})
    if floors and floors[0] >= alpha:
        out.append(f"The exact sign-flip test cannot reach {alpha:.0%} with these few seeds (its smallest "
                   f"possible p is {_f(floors[0], 3)}).")
    if item_only:
        def direction(name, e):  # the item-level difference's sign, read with the metric's direction
            higher = summary["metrics"][name]["higher_is_better"]
            return "better" if (e["item_level"]["mean_diff"] > 0) == higher else "worse"

        txt = ", ".join(f"{a} {direction(name, e)} on {name} (Holm item p {_p(e['holm_p_item'])})"
                        for a, name, e in item_only)
        out.append(f"At the item level only (held-out items of these same trained models, not new training "
                   f"runs): {txt}.")
    return " ".join(out)


def _pictures_md(runs_by_arm: Dict[str, List[dict]]) -> List[str]:
    lines = ["## Lens pictures", ""]
    for arm, runs in runs_by_arm.items():
        lines.append(f"### {arm}")
        any_pic = False
        for r in sorted(runs, key=lambda r: int(r["seed"])):
            for stage in STAGES:
                pics = (r.get("lens_pictures") or {}).get(stage) or []
                if pics:
                    any_pic = True
                    links = " ".join(f"![{arm} seed{r['seed']} {stage}]({p})" for p in pics)
                    lines.append(f"- seed {r['seed']} {stage}: {links}")
        if not any_pic:
            lines.append("- none")
        lines.append("")
    return lines


def load_noise(noise_dir: str, runs: List[dict]) -> dict:
    """The summary of NOISE_DIR's noise-arm runs against its llava runs, which must be the llava
    runs of ``runs`` (same held-out metrics per seed), or the floor would measure another baseline."""
    _, noise_runs = load_results(noise_dir)
    mine = {int(r["seed"]): r for r in runs if r["arm"] == S.BASELINE}
    keep = []
    for r in noise_runs:
        if r["arm"] == S.BASELINE:
            seed = int(r["seed"])
            if seed in mine and mine[seed].get("metrics") != r.get("metrics"):
                raise ValueError(f"write_report: {os.path.join(noise_dir, r['_file'])} is not the llava run of "
                                 f"seed {seed} that this folder has ({mine[seed]['_file']}): the noise floor "
                                 f"needs the same baseline runs")
            keep.append(r)
        elif r["arm"] in NOISE_ARMS:
            keep.append(r)
    return S.summarize(keep)


def write_report(out_dir: str, noise_dir: Optional[str] = None) -> str:
    """Read OUT/protocol.json and OUT/runs/*.json; write OUT/report.md, OUT/figures/*.png and
    OUT/stats.json. Returns the path of report.md. ``noise_dir``: a results folder with the noise
    arms (protocol preset ``noise``) over the same llava runs, whose floor the report then uses."""
    protocol, runs = load_results(out_dir)
    noise_summary = load_noise(noise_dir, runs) if noise_dir else None
    p_arms, p_seeds = _protocol_grid(protocol)
    summary = S.summarize(runs, arms=p_arms, seeds=p_seeds)
    arms = summary["arms"]
    by_arm = {a: [r for r in runs if r["arm"] == a] for a in arms}

    fig_dir = os.path.join(out_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    figures = []
    for stage in STAGES:
        rel = f"figures/curves_{stage}.png"
        plot_curves(by_arm, stage, os.path.join(out_dir, rel))
        figures.append((f"Training curves, {stage}", rel))
    for stage in STAGES:
        rel = f"figures/metrics_{stage}.png"
        if plot_metric_bars(summary, stage, os.path.join(out_dir, rel)):
            figures.append((f"Held-out metrics, {stage} (bars: mean; dots: seeds)", rel))

    expected_n = len(summary["seeds"])
    lines = ["# A/B study report: BASIC vs LLaVA", "", "## Result", "", significance_statement(summary), ""]
    lines += _protocol_md(protocol)
    lines += ["## Runs", ""]
    for a in arms:
        have = sorted(int(r["seed"]) for r in by_arm[a])
        lines.append(f"- {a}: seeds {have if have else 'none'}")
    if summary["missing"]:
        lines += ["", "Missing runs (in the protocol, no run file): "
                  + ", ".join(f"{m['arm']} seed {m['seed']}" for m in summary["missing"])]
    else:
        lines += ["", "Missing runs: none."]
    lines.append("")
    for stage in STAGES:
        lines += _stage_table(summary, stage, expected_n)
    lines += _comparisons_md(summary)
    lines += _seed_diffs_md(summary, noise_summary,
                            os.path.relpath(noise_dir, out_dir) if noise_dir else "")
    lines += ["## Figures", ""] + [f"### {t}\n\n![{t}]({rel})\n" for t, rel in figures]
    lines += _pictures_md(by_arm)

    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "stats.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return path


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m study.report",
                                 description="Write OUT/report.md, OUT/stats.json and OUT/figures from OUT's runs.")
    ap.add_argument("out", help="results folder")
    ap.add_argument("--noise", default=None, help="a results folder of the noise preset over the same llava runs: "
                                                   "its noise floor is used in the per-seed table")
    args = ap.parse_args(argv)
    try:
        print(write_report(args.out, args.noise))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
