"""Statistics of the A/B study: every arm against LLaVA (BASIC off), paired by seed.

Plain Python + numpy/scipy (no NeMo, no torch), so the report can be rebuilt anywhere from the
run files alone (the results contract: /tmp/helpers/study_schema.md, mirrored in ``summarize``).

Two levels of evidence, kept apart on purpose:

* seed level (:func:`paired_comparison`): one number per training run; seed ``s`` of two arms
  shares data order, projector initialisation and held-out set, so the runs pair by seed. This
  answers "would a new training run of this arm differ from LLaVA" -- the question the study is
  about -- but with 3 seeds it has little power, and the exact sign-flip test cannot go below
  2 / 2**n (0.25 at n = 3). That floor is reported, not hidden.
* item level (:func:`item_level_comparison`): per held-out item, on the same trained models.
  Many items give power, but they only tell whether *these* models differ on held-out items.

Only the seed-level paired t-test, Holm-adjusted within a metric family, decides a "win".
"""
from __future__ import annotations

import itertools
import math
from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy import stats as _st

# Held-out metrics: (name, path into run["metrics"], higher_is_better, item path or None, item kind).
# The lens layer k is read from the runs (its key is the layer number as a string).
LENS_FIELDS = (("grounded", True), ("grounded_top5", True), ("meaningful", True),
               # more distinct nearest tokens per image = less collapse onto one "hub" token
               ("distinct_per_image", True),
               # share of an image's patches on its most frequent token: 1.0 is full collapse
               ("top_token_share", False))
QA_CATEGORIES = ("color", "shape", "count", "position")
ARMS = ("llava", "basic", "das_only", "sds_only", "const", "dec", "equal")
BASELINE = "llava"
ALPHA = 0.05
# 2**n sign assignments are enumerated; 20 seeds = 1M rows, far beyond any study here.
_MAX_SIGNFLIP_N = 20


def _t_crit(n: int) -> float:
    return float(_st.t.ppf(0.975, n - 1))


def signflip_pvalue(diffs: Sequence[float]) -> float:
    """Exact two-sided sign-flip permutation p-value of the mean paired difference.

    Under H0 (no arm effect) each seed's difference is as likely positive as negative, so all
    2**n sign assignments are equally likely; p = share of them whose |mean| reaches the observed
    |mean| (the observed assignment included, so p >= 2 / 2**n for any nonzero data)."""
    d = np.asarray(diffs, dtype=np.float64)
    n = d.size
    if n == 0:
        raise ValueError("signflip_pvalue: no differences")
    if n > _MAX_SIGNFLIP_N:
        raise ValueError(f"signflip_pvalue: n={n} seeds exceeds {_MAX_SIGNFLIP_N} (2**n enumeration)")
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
    stat = np.abs(signs @ d) / n
    obs = abs(d.mean())
    # relative tolerance: flipped sums that equal the observed one in exact arithmetic must count
    tol = 1e-12 * max(1.0, float(np.abs(d).sum()))
    return float(np.mean(stat >= obs - tol))


def paired_comparison(baseline: List[float], arm: List[float], higher_is_better: bool) -> dict:
    """Seed-level paired comparison of one metric, ``arm - baseline`` per seed (same seed order).

    Returns diffs, mean_diff, std_diff (ddof 1), ci95 (t distribution, df n-1), p_ttest (two-sided
    ``scipy.stats.ttest_rel``), p_signflip (exact, 2**n assignments), signflip_floor (2 / 2**n,
    the smallest p it can give), mde (t_{0.975,n-1} sd / sqrt(n): the smallest |mean diff| that
    could reach p < 0.05 with this spread), better (mean diff in the good direction) and notes.
    With n = 1 there is no spread: std, CI, p_ttest and mde are None (noted); with zero spread
    (all seeds moved by the same amount) the t statistic is undefined and p_ttest is None too."""
    b = np.asarray(baseline, dtype=np.float64)
    a = np.asarray(arm, dtype=np.float64)
    if b.shape != a.shape or b.ndim != 1:
        raise ValueError(f"paired_comparison: baseline has {b.shape} values, arm {a.shape}; need one per seed each")
    n = b.size
    if n == 0:
        raise ValueError("paired_comparison: no seeds")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("paired_comparison: non-finite metric value")
    d = a - b
    mean = float(d.mean())
    out = {"n": n, "diffs": d.tolist(), "mean_diff": mean, "std_diff": None, "ci95": None, "p_ttest": None,
           "p_signflip": signflip_pvalue(d), "signflip_floor": 2.0 / 2 ** n, "mde": None,
           "higher_is_better": bool(higher_is_better),
           "better": bool(mean > 0 if higher_is_better else mean < 0), "notes": []}
    if n == 1:
        out["notes"].append("n=1 seed: no spread, so no t-test, CI or detectable-effect size")
        return out
    sd = float(d.std(ddof=1))
    half = _t_crit(n) * sd / math.sqrt(n)
    out.update(std_diff=sd, ci95=[mean - half, mean + half], mde=half)
    # spread at round-off level (e.g. 0.3 - 0.2 computed on three seeds) is no spread: a t-test on it
    # would return p ~ 0 for what is a constant shift, not evidence across seeds
    if sd <= 1e-12 * max(1e-300, float(np.abs(d).max())):
        out["notes"].append("zero spread of the differences: t statistic undefined, no t-test p")
    else:
        out["p_ttest"] = float(_st.ttest_rel(a, b).pvalue)
    if n <= 5:
        out["notes"].append(f"n={n} seeds: the exact sign-flip p cannot go below {2.0 / 2 ** n:.4g}")
    return out


def _items_matrix(items, name: str) -> np.ndarray:
    rows = [list(r) for r in items]
    if not rows:
        raise ValueError(f"item_level_comparison: {name} has no seeds")
    lens = {len(r) for r in rows}
    if len(lens) != 1:
        raise ValueError(f"item_level_comparison: {name} seeds have different item counts {sorted(lens)}")
    return np.asarray(rows, dtype=np.float64)


def item_level_comparison(baseline_items: List[List[float]], arm_items: List[List[float]], kind: str) -> dict:
    """Item-level paired comparison over the held-out items: ``[seed][item]`` lists, the same
    seeds and the same item order in both arms.

    The items share the seeds' models: this tests "on these trained models, do held-out items
    differ", not "does a new training run differ" (the seed-level :func:`paired_comparison`
    answers that). Its p-value is therefore much smaller than the seed-level one for the same
    effect and never decides a win.

    * ``continuous`` (caption cross-entropy): each item is averaged over the seeds, then a
      two-sided Wilcoxon signed-rank test over the items (zero differences dropped).
    * ``binary`` (QA exact match 0/1): exact McNemar test, i.e. a two-sided binomial test at 1/2
      on the discordant (seed, item) pairs pooled over the seeds (b: baseline right and arm
      wrong, c: the reverse). Pooling treats a question's seeds as separate pairs.

    Returns mean_diff (mean over items of the seed-averaged arm - baseline), p, n_items, n_seeds,
    test, and for binary the discordant counts b and c."""
    if kind not in ("continuous", "binary"):
        raise ValueError(f"item_level_comparison: kind must be 'continuous' or 'binary', got {kind!r}")
    B = _items_matrix(baseline_items, "baseline_items")
    A = _items_matrix(arm_items, "arm_items")
    if A.shape != B.shape:
        raise ValueError(f"item_level_comparison: baseline_items is {B.shape} (seeds, items), arm_items {A.shape}")
    n_seeds, n_items = A.shape
    if n_items == 0:
        raise ValueError("item_level_comparison: no items")
    d_item = A.mean(axis=0) - B.mean(axis=0)
    out = {"kind": kind, "n_items": int(n_items), "n_seeds": int(n_seeds), "mean_diff": float(d_item.mean()),
           "p": None, "notes": []}
    if kind == "continuous":
        out["test"] = "wilcoxon"
        if np.all(d_item == 0):
            out["p"] = 1.0
            out["notes"].append("all item differences are zero")
        else:
            out["p"] = float(_st.wilcoxon(d_item, zero_method="wilcox", alternative="two-sided").pvalue)
        return out
    if not np.all(np.isin(A, (0.0, 1.0)) & np.isin(B, (0.0, 1.0))):
        raise ValueError("item_level_comparison: binary items must be 0 or 1")
    b = int(np.sum((B == 1) & (A == 0)))
    c = int(np.sum((B == 0) & (A == 1)))
    out.update(test="mcnemar_exact", b=b, c=c)
    out["p"] = 1.0 if b + c == 0 else float(_st.binomtest(c, b + c, 0.5, alternative="two-sided").pvalue)
    if b + c == 0:
        out["notes"].append("no discordant pairs")
    return out


def holm(pvalues: Dict[str, Optional[float]]) -> Dict[str, Optional[float]]:
    """Holm-Bonferroni adjusted p-values over one family. ``None`` (no test possible) stays None
    and does not count towards the family size m. Sorted ascending, the i-th (0-based) adjusted
    value is max over j <= i of min(1, (m - j) p_(j)), which keeps the adjusted values monotone."""
    known = sorted(((p, k) for k, p in pvalues.items() if p is not None), key=lambda t: t[0])
    m = len(known)
    out: Dict[str, Optional[float]] = {k: None for k, p in pvalues.items() if p is None}
    running = 0.0
    for j, (p, k) in enumerate(known):
        if not 0.0 <= p <= 1.0 or math.isnan(p):
            raise ValueError(f"holm: p-value of {k!r} is {p}, not in [0, 1]")
        running = max(running, min(1.0, (m - j) * p))
        out[k] = running
    return {k: out[k] for k in pvalues}


# ---- summarize: the run files -> tables and comparisons ----------------------------------------

def _get(d, path):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def order_arms(arms) -> List[str]:
    """ARMS in their fixed order, then any other arm (e.g. lambda_sds_0.1) sorted by name."""
    arms = set(arms)
    return [a for a in ARMS if a in arms] + sorted(arms - set(ARMS))


def metric_specs(runs: List[dict]) -> List[dict]:
    """The held-out metrics as a list of {name, stage, path, higher_is_better, items, kind}. The lens
    layers are 0 and whatever other layer keys the runs carry (layer k)."""
    specs = []
    for stage in ("stage1", "stage2"):
        specs.append(dict(name=f"{stage}/caption_ce", stage=stage, path=("metrics", stage, "caption_ce"),
                          higher_is_better=False, items=("metrics", stage, "caption_ce_items"), kind="continuous"))
        specs.append(dict(name=f"{stage}/cos_v_vhat", stage=stage, path=("metrics", stage, "cos_v_vhat"),
                          higher_is_better=True, items=None, kind=None))
        layers = set()
        for r in runs:
            lens = _get(r, ("metrics", stage, "lens"))
            if isinstance(lens, dict):
                layers.update(lens)
        for layer in sorted(layers, key=lambda s: int(s) if str(s).isdigit() else 10 ** 9):
            for field, hib in LENS_FIELDS:
                specs.append(dict(name=f"{stage}/lens{layer}/{field}", stage=stage,
                                  path=("metrics", stage, "lens", layer, field),
                                  higher_is_better=hib, items=None, kind=None))
        if stage == "stage2":
            for qa in ("qa", "qa_key"):
                for cat in QA_CATEGORIES + ("all",):
                    specs.append(dict(name=f"stage2/{qa}/{cat}", stage=stage, path=("metrics", stage, qa, cat),
                                      higher_is_better=True, items=("metrics", stage, f"{qa}_items", cat),
                                      kind="binary"))
    return specs


def _items_of(run: dict, spec: dict):
    if spec["items"] is None:
        return None
    if spec["name"] in ("stage2/qa/all", "stage2/qa_key/all"):
        # "all" pools the four categories' questions (in category order, as every run stores them)
        qa = spec["name"].split("/")[1]
        parts = [_get(run, ("metrics", "stage2", f"{qa}_items", c)) for c in QA_CATEGORIES]
        return None if any(p is None for p in parts) else [x for p in parts for x in p]
    return _get(run, spec["items"])


def summarize(runs: List[dict], arms: Optional[Sequence[str]] = None, seeds: Optional[Sequence[int]] = None) -> dict:
    """Mean +- std per arm per held-out metric, and every arm against ``llava`` (seed level and item
    level), Holm-adjusted within each metric family (a family = all arms for one metric).

    ``arms`` / ``seeds``: the protocol's grid (defaults: those present in ``runs``); grid cells without
    a run are listed under ``missing``. A comparison pairs the seeds that both arms ran and whose
    metric is not None. ``win`` is True only when the Holm-adjusted seed-level t-test p < 0.05 and
    the mean difference is in the metric's good direction. JSON-serialisable."""
    by_key: Dict[tuple, dict] = {}
    for i, r in enumerate(runs):
        for key in ("arm", "seed"):
            if key not in r:
                raise ValueError(f"summarize: run #{i} has no {key!r} key")
        k = (r["arm"], int(r["seed"]))
        if k in by_key:
            raise ValueError(f"summarize: two runs for arm {k[0]!r} seed {k[1]}")
        by_key[k] = r
    arms = order_arms(set(arms or ()) | {a for a, _ in by_key})
    seeds = sorted(set(int(s) for s in (seeds or ())) | {s for _, s in by_key})
    missing = [{"arm": a, "seed": s} for a in arms for s in seeds if (a, s) not in by_key]
    specs = metric_specs(runs)

    metrics, comparisons = {}, {}
    for spec in specs:
        table = {}
        for a in arms:
            vals = {s: _get(by_key[(a, s)], spec["path"]) for s in seeds if (a, s) in by_key}
            vals = {s: float(v) for s, v in vals.items() if v is not None}
            x = np.array(list(vals.values()), dtype=np.float64)
            table[a] = {"n": int(x.size), "values": {str(s): v for s, v in vals.items()},
                        "mean": float(x.mean()) if x.size else None,
                        "std": float(x.std(ddof=1)) if x.size > 1 else None}
        metrics[spec["name"]] = {"stage": spec["stage"], "higher_is_better": spec["higher_is_better"], "arms": table}

        fam = {}
        for a in arms:
            if a == BASELINE:
                continue
            base_vals, arm_vals = table.get(BASELINE, {}).get("values", {}), table[a]["values"]
            paired = [s for s in seeds if str(s) in base_vals and str(s) in arm_vals]
            entry = {"seeds": paired, "seed_level": None, "item_level": None, "holm_p": None, "holm_p_item": None,
                     "win": False}
            if paired:
                try:
                    entry["seed_level"] = paired_comparison([base_vals[str(s)] for s in paired],
                                                            [arm_vals[str(s)] for s in paired],
                                                            spec["higher_is_better"])
                    bi = [_items_of(by_key[(BASELINE, s)], spec) for s in paired]
                    ai = [_items_of(by_key[(a, s)], spec) for s in paired]
                    if spec["kind"] and all(x is not None for x in bi + ai):
                        entry["item_level"] = item_level_comparison(bi, ai, spec["kind"])
                except ValueError as e:
                    # name the metric and arm: the low-level message only knows shapes
                    raise ValueError(f"summarize: {spec['name']} ({'.'.join(spec['path'])}), arm {a!r} vs "
                                     f"{BASELINE!r}, seeds {paired}: {e}") from e
            fam[a] = entry
        adj = holm({a: (e["seed_level"] or {}).get("p_ttest") for a, e in fam.items()})
        adj_item = holm({a: (e["item_level"] or {}).get("p") for a, e in fam.items()})
        for a, e in fam.items():
            e["holm_p"], e["holm_p_item"] = adj[a], adj_item[a]
            e["win"] = bool(e["holm_p"] is not None and e["holm_p"] < ALPHA and e["seed_level"]["better"])
        comparisons[spec["name"]] = fam
    return {"baseline": BASELINE, "alpha": ALPHA, "arms": arms, "seeds": seeds, "missing": missing,
            "metrics": metrics, "comparisons": comparisons}


__all__ = ["ALPHA", "ARMS", "BASELINE", "holm", "item_level_comparison", "metric_specs", "order_arms",
           "paired_comparison", "signflip_pvalue", "summarize"]
