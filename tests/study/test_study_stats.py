"""The study's statistics and report: each test checks numbers against an independent
computation (the t formula in numpy, a hand enumeration, scipy's binomial test, a hand-worked Holm
table), and the report on a synthetic results folder made here. Cheap: no model, no torch use."""
import itertools
import json
import math
import os

import numpy as np
import pytest
from scipy import stats as st

from study import stats as S
from study.report import significance_statement, write_report


# ---- paired_comparison ---------------------------------------------------------------------------

def test_paired_comparison_matches_t_formula():
    base = [1.30, 1.25, 1.41]
    arm = [1.21, 1.22, 1.30]
    out = S.paired_comparison(base, arm, higher_is_better=False)
    d = np.array(arm) - np.array(base)  # -0.09, -0.03, -0.11
    n = 3
    mean, sd = d.sum() / n, math.sqrt(((d - d.mean()) ** 2).sum() / (n - 1))
    t = mean / (sd / math.sqrt(n))
    # two-sided p from the t distribution's survival function, df = n - 1
    p = 1 - abs(t) / math.sqrt(2 + t * t)  # 2 * (1 - F(|t|)) for df = 2
    # df = 2 has a closed-form CDF, F(t) = 1/2 + t / (2 sqrt(2 + t^2)); F(tc) = 0.975 gives
    # tc^2 = 2 * 0.95^2 / (1 - 0.95^2) -- independent of scipy's quantile routine
    tc = math.sqrt(2 * 0.95 ** 2 / (1 - 0.95 ** 2))
    np.testing.assert_allclose(out["diffs"], [-0.09, -0.03, -0.11], atol=1e-12)
    assert out["mean_diff"] == pytest.approx(-0.23 / 3, rel=1e-12)
    assert out["std_diff"] == pytest.approx(sd, rel=1e-12)
    assert out["p_ttest"] == pytest.approx(p, rel=1e-9)
    assert out["ci95"] == pytest.approx([mean - tc * sd / math.sqrt(n), mean + tc * sd / math.sqrt(n)], rel=1e-12)
    assert out["mde"] == pytest.approx(tc * sd / math.sqrt(n), rel=1e-12)
    assert out["better"] is True  # lower caption CE is better, and the arm is lower on every seed
    # all three differences negative: only the observed and the all-flipped assignment reach |mean|
    assert out["p_signflip"] == pytest.approx(0.25, abs=0)
    assert out["signflip_floor"] == 0.25


def test_signflip_matches_hand_enumeration():
    d = [0.5, -0.2, 0.9, 0.1]
    obs = abs(sum(d)) / 4
    hits = sum(abs(sum(s * x for s, x in zip(signs, d))) / 4 >= obs - 1e-12
               for signs in itertools.product((1, -1), repeat=4))
    assert S.signflip_pvalue(d) == hits / 16
    # all positive, n = 3: the honest floor 2/8
    assert S.signflip_pvalue([0.1, 0.2, 0.3]) == 0.25
    # the higher-is-better direction flag follows the sign of the mean
    assert S.paired_comparison([0.1, 0.2, 0.3], [0.2, 0.4, 0.5], True)["better"] is True
    assert S.paired_comparison([0.1, 0.2, 0.3], [0.2, 0.4, 0.5], False)["better"] is False


def test_paired_comparison_one_seed_has_no_p():
    out = S.paired_comparison([1.0], [0.8], higher_is_better=False)
    assert out["n"] == 1 and out["mean_diff"] == pytest.approx(-0.2)
    assert out["p_ttest"] is None and out["ci95"] is None and out["std_diff"] is None and out["mde"] is None
    assert out["p_signflip"] == 1.0  # both assignments reach |mean|
    assert any("n=1" in n for n in out["notes"])
    with pytest.raises(ValueError, match="one per seed"):
        S.paired_comparison([1.0, 2.0], [1.0], True)


# ---- item level ----------------------------------------------------------------------------------

def test_mcnemar_exact_matches_binomtest_on_discordant_counts():
    rng = np.random.default_rng(0)
    base = (rng.random((3, 40)) < 0.4).astype(int)
    arm = base.copy()
    flip = rng.random((3, 40)) < 0.3
    arm[flip] = 1 - arm[flip]
    arm[:, :6] = 1  # a few extra right answers for the arm
    out = S.item_level_comparison(base.tolist(), arm.tolist(), "binary")
    b = int(((base == 1) & (arm == 0)).sum())
    c = int(((base == 0) & (arm == 1)).sum())
    assert (out["b"], out["c"]) == (b, c)
    assert out["p"] == pytest.approx(st.binomtest(c, b + c, 0.5).pvalue, rel=1e-12)
    # independent check of binomtest itself: two-sided exact p = sum of outcomes no likelier than c
    pmf = np.array([math.comb(b + c, k) for k in range(b + c + 1)], dtype=float) / 2.0 ** (b + c)
    assert out["p"] == pytest.approx(min(1.0, pmf[pmf <= pmf[c] * (1 + 1e-7)].sum()), rel=1e-9)
    assert out["n_items"] == 40 and out["n_seeds"] == 3
    assert out["mean_diff"] == pytest.approx((arm.mean(axis=0) - base.mean(axis=0)).mean(), rel=1e-12)
    with pytest.raises(ValueError, match="0 or 1"):
        S.item_level_comparison([[0, 2]], [[1, 1]], "binary")


def test_wilcoxon_continuous_items_averaged_over_seeds():
    rng = np.random.default_rng(1)
    base = rng.normal(2.0, 0.3, (3, 25))
    arm = base - 0.05 + rng.normal(0, 0.05, (3, 25))
    out = S.item_level_comparison(base.tolist(), arm.tolist(), "continuous")
    d = arm.mean(axis=0) - base.mean(axis=0)
    assert out["mean_diff"] == pytest.approx(d.mean(), rel=1e-12)
    assert out["p"] == pytest.approx(st.wilcoxon(d).pvalue, rel=1e-12)
    assert out["n_items"] == 25


# ---- Holm ----------------------------------------------------------------------------------------

def test_holm_hand_worked():
    # sorted: 0.01 (x4) = 0.04; 0.02 (x3) = 0.06; 0.03 (x2) = 0.06; 0.04 (x1) = 0.04 -> max 0.06
    p = {"a": 0.03, "b": 0.01, "c": 0.04, "d": 0.02, "e": None}
    assert S.holm(p) == pytest.approx({"a": 0.06, "b": 0.04, "c": 0.06, "d": 0.06, "e": None})
    assert S.holm({"x": 0.6, "y": 0.5}) == {"x": 1.0, "y": 1.0}  # capped at 1
    assert S.holm({}) == {}


# ---- summarize + write_report on a synthetic results folder --------------------------------------

def _run(arm, seed, ce_shift, qa_shift, rng):
    def stage(with_qa):
        items = (1.5 + 0.1 * seed + ce_shift + rng.normal(0, 0.05, 12)).tolist()
        m = {"caption_ce": float(np.mean(items)), "caption_ce_items": items, "cos_v_vhat": 0.2 + 0.1 * (arm == "basic"),
             "lens": {k: {"grounded": 0.1 + 0.01 * seed, "grounded_top5": 0.3, "meaningful": 0.4,
                          "distinct_per_image": 4.0 + seed, "top_token_share": 0.5} for k in ("0", "15")}}
        if with_qa:
            qa_items = {c: (rng.random(10) < 0.4 + qa_shift).astype(int).tolist() for c in S.QA_CATEGORIES}
            m["qa"] = {c: float(np.mean(v)) for c, v in qa_items.items()}
            m["qa"]["all"] = float(np.mean([x for v in qa_items.values() for x in v]))
            m["qa_items"] = qa_items
            m["qa_key"], m["qa_key_items"] = dict(m["qa"]), {c: list(v) for c, v in qa_items.items()}
        return m
    basic_on = arm != "llava"
    curve = [{"step": s, "lm": 6.0 - 0.1 * s - 0.01 * seed, "das": (2.0 - 0.05 * s) if basic_on else None,
              "sds": (10.0 - 0.2 * s) if basic_on else None, "grad_norm": 0.3, "seconds": 1.0} for s in range(1, 6)]
    return {"arm": arm, "seed": seed, "seconds": 10.0, "curves": {"stage1": curve, "stage2": curve},
            "metrics": {"stage1": stage(False), "stage2": stage(True)},
            "lens_pictures": {"stage1": [f"pictures/{arm}-seed{seed}-stage1-scene0.png"],
                              "stage2": [f"pictures/{arm}-seed{seed}-stage2-scene0.png"]}}


def test_write_report_synthetic_folder(tmp_path):
    rng = np.random.default_rng(2)
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    # the protocol asks for 4 arms x 3 seeds; sds_only seed 2 never finished and dec never ran at all
    json.dump({"name": "synthetic", "arms": ["llava", "basic", "sds_only", "dec"], "seeds": [0, 1, 2], "steps": 5},
              open(out / "protocol.json", "w"))
    runs = []
    for arm, shift in (("llava", 0.0), ("basic", -0.2), ("sds_only", 0.0)):
        for seed in (0, 1, 2):
            if (arm, seed) == ("sds_only", 2):
                continue
            r = _run(arm, seed, shift, 0.1 * (arm == "basic"), rng)
            runs.append(r)
            json.dump(r, open(out / "runs" / f"{arm}-seed{seed}.json", "w"))

    path = write_report(str(out))
    assert path == str(out / "report.md")
    text = open(path).read()
    for arm in ("llava", "basic", "sds_only"):
        assert f"| {arm} " in text or f" {arm} |" in text, arm
        assert f"### {arm}" in text  # lens pictures section per arm
    assert "sds_only seed 2, dec seed 0, dec seed 1, dec seed 2" in text  # the missing runs
    assert "| caption_ce ↓ |" in text and text.count(" | missing |") == 12 + 22  # dec: every stage-1 and stage-2 metric row
    assert "| stage2/caption_ce | dec | 0 |" in text  # the arm without runs still has its comparison row
    assert "![basic seed0 stage1](pictures/basic-seed0-stage1-scene0.png)" in text
    for name in ("curves_stage1", "curves_stage2", "metrics_stage1", "metrics_stage2"):
        png = out / "figures" / f"{name}.png"
        assert png.is_file() and png.stat().st_size > 1000, name
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
        assert f"(figures/{name}.png)" in text

    # the report's numbers are summarize's, and summarize's are the independent per-seed computation
    summ = json.load(open(out / "stats.json"))
    assert summ["missing"] == [{"arm": "sds_only", "seed": 2}] + [{"arm": "dec", "seed": s} for s in (0, 1, 2)]
    by = {(r["arm"], r["seed"]): r for r in runs}
    base = [by[("llava", s)]["metrics"]["stage2"]["caption_ce"] for s in (0, 1, 2)]
    arm = [by[("basic", s)]["metrics"]["stage2"]["caption_ce"] for s in (0, 1, 2)]
    e = summ["comparisons"]["stage2/caption_ce"]["basic"]
    d = np.array(arm) - np.array(base)
    assert e["seed_level"]["mean_diff"] == pytest.approx(d.mean(), rel=1e-12)
    assert e["seed_level"]["p_ttest"] == pytest.approx(st.ttest_rel(arm, base).pvalue, rel=1e-12)
    # family of two arms: Holm multiplies the smaller p by 2, then keeps the order monotone
    fam = summ["comparisons"]["stage2/caption_ce"]
    assert fam["sds_only"]["seed_level"]["n"] == 2  # paired only on seeds 0 and 1
    ps = {a: fam[a]["seed_level"]["p_ttest"] for a in ("basic", "sds_only")}
    assert e["holm_p"] == pytest.approx(S.holm(ps)["basic"], rel=1e-12)
    # the synthetic basic arm is 0.2 nats lower on every seed with a small spread: a real win
    assert e["win"] is True and e["holm_p"] < 0.05 and d.mean() < 0
    assert not fam["sds_only"]["win"]
    mean_basic = summ["metrics"]["stage2/caption_ce"]["arms"]["basic"]
    assert mean_basic["mean"] == pytest.approx(np.mean(arm), rel=1e-12)
    assert mean_basic["std"] == pytest.approx(np.std(arm, ddof=1), rel=1e-12)
    assert f"{np.mean(arm):.4g} ± {np.std(arm, ddof=1):.3g}" in text
    # the statement names the result the numbers give
    statement = significance_statement(summ)
    assert "basic is better than llava on stage2/caption_ce" in statement
    assert "smallest detectable difference in stage2 caption CE" in statement
    assert statement in text


def test_zero_spread_and_wilcoxon_statistic():
    # a constant shift computed in floating point (0.3 - 0.2 on every seed) is no spread, not p ~ 0
    out = S.paired_comparison([0.2, 0.2, 0.2], [0.3, 0.3, 0.3], True)
    assert out["p_ttest"] is None and out["p_signflip"] == 0.25 and any("zero spread" in n for n in out["notes"])
    # the Wilcoxon statistic by hand: the smaller rank sum of the nonzero item differences
    base = [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]
    arm = [[1.5, 1.75, 2.0, 4.0, 6.0, 4.0]]  # binary fractions: the tie |-1| = |+1| is exact
    d = np.array(arm[0]) - np.array(base[0])  # 0.5, -0.25, -1, 0 (dropped), 1, -2
    nz = d[d != 0]
    ranks = st.rankdata(np.abs(nz))
    w = min(ranks[nz > 0].sum(), ranks[nz < 0].sum())
    assert w == 5.5  # positive ranks 2 + 3.5, negative 1 + 3.5 + 5
    res = st.wilcoxon(nz)
    assert res.statistic == w
    assert S.item_level_comparison(base, arm, "continuous")["p"] == pytest.approx(res.pvalue, rel=1e-12)


def test_summarize_without_effect_claims_nothing():
    rng = np.random.default_rng(3)
    runs = [_run(arm, seed, 0.0, 0.0, rng) for arm in ("llava", "dec", "basic") for seed in (0, 1, 2)]
    summ = S.summarize(runs)
    assert summ["arms"] == ["llava", "basic", "dec"]  # the fixed table order, not the input order
    assert summ["missing"] == []
    assert not any(e["win"] for fam in summ["comparisons"].values() for e in fam.values())
    text = significance_statement(summ)
    assert text.startswith("No arm differs from LLaVA at the 5% level after Holm correction")
    # MDE = t(0.975, 2) sd / sqrt(3) of the per-seed differences, as in the statement
    e = summ["comparisons"]["stage2/caption_ce"]["dec"]["seed_level"]
    tc = math.sqrt(2 * 0.95 ** 2 / (1 - 0.95 ** 2))
    assert e["mde"] == pytest.approx(tc * np.std(e["diffs"], ddof=1) / math.sqrt(3), rel=1e-12)


def test_summarize_names_the_metric_of_a_bad_item_list():
    rng = np.random.default_rng(4)
    runs = [_run(arm, 0, 0.0, 0.0, rng) for arm in ("llava", "basic")]
    runs[1]["metrics"]["stage1"]["caption_ce_items"].pop()  # one held-out caption short
    with pytest.raises(ValueError, match=r"stage1/caption_ce \(metrics.stage1.caption_ce\), arm 'basic'.*item"):
        S.summarize(runs)
    with pytest.raises(ValueError, match="run #0 has no 'seed' key"):
        S.summarize([{"arm": "llava"}])


def test_item_level_statement_says_which_way():
    """One seed per arm (no seed-level test): the item-level findings name their direction, read
    with the metric's (caption CE: lower is better)."""
    rng = np.random.default_rng(5)
    runs = [_run("llava", 0, 0.0, 0.0, rng), _run("basic", 0, -0.5, 0.0, rng), _run("dec", 0, +0.5, 0.0, rng)]
    summ = S.summarize(runs)
    for arm, word in (("basic", "better"), ("dec", "worse")):
        e = summ["comparisons"]["stage1/caption_ce"][arm]
        assert e["holm_p"] is None and e["holm_p_item"] < 0.05
        assert (e["item_level"]["mean_diff"] < 0) == (word == "better")
    text = significance_statement(summ)
    assert "basic better on stage1/caption_ce (Holm item p" in text
    assert "dec worse on stage1/caption_ce (Holm item p" in text


def test_noise_floor_and_per_seed_differences():
    """The noise floor is the largest same-seed |diff| of the noise arms; each other arm counts the
    seeds beyond it. Values set by hand here, so the expected numbers are arithmetic on them."""
    from study.report import _seed_diffs_md, noise_floor

    rng = np.random.default_rng(9)
    ce = {("llava", 0): 2.0, ("llava", 1): 2.5, ("llava", 2): 1.8,
          ("null", 0): 2.1, ("null", 1): 2.2, ("null", 2): 1.8,            # |diff| 0.1, 0.3, 0
          ("llava_jitter", 0): 2.4, ("llava_jitter", 1): 2.5,             # |diff| 0.4, 0 (seed 2 missing)
          ("sds_only", 0): 3.3, ("sds_only", 1): 2.6, ("sds_only", 2): 1.3}  # |diff| 1.3, 0.1, 0.5
    runs = []
    for (arm, seed), v in ce.items():
        r = _run(arm, seed, 0.0, 0.0, rng)
        r["metrics"]["stage2"]["caption_ce"] = v
        runs.append(r)
    summ = S.summarize(runs)
    f = noise_floor(summ)["stage2/caption_ce"]
    assert f["floor"] == pytest.approx(0.4) and f["noise_n"] == 5
    assert f["noise_arms"] == ["null", "llava_jitter"] and f["beyond"] == {"sds_only": [2, 3]}
    text = "\n".join(_seed_diffs_md(summ))
    assert "| stage2/caption_ce | sds_only | 1.3 | 0.1 | -0.5 |" in text
    assert "| stage2/caption_ce | llava_jitter | 0.4 | 0 | - |" in text
    assert "- stage2/caption_ce: floor 0.4 (from 5 runs); beyond it: sds_only 2/3" in text
    # without noise arms there is no floor, only the per-seed table
    summ2 = S.summarize([r for r in runs if r["arm"] in ("llava", "sds_only")])
    assert noise_floor(summ2) == {} and "Noise floor" not in "\n".join(_seed_diffs_md(summ2))


def test_noise_floor_from_another_folder(tmp_path):
    """The ablations' report takes its floor from the noise preset's folder, whose llava runs must be
    the same runs; a different llava run is refused with both file names."""
    from study.report import main as report_main

    rng = np.random.default_rng(11)
    ce = {"abl": {("llava", 0): 2.0, ("llava", 1): 2.5, ("sds_only", 0): 3.3, ("sds_only", 1): 2.6},
          "noise": {("llava", 0): 2.0, ("llava", 1): 2.5, ("null", 0): 2.3, ("llava_jitter", 1): 2.3}}
    llava = {s: _run("llava", s, 0.0, 0.0, rng) for s in (0, 1)}
    for folder, values in ce.items():
        (tmp_path / folder / "runs").mkdir(parents=True)
        json.dump({"name": folder, "arms": sorted({a for a, _ in values}), "seeds": [0, 1]},
                  open(tmp_path / folder / "protocol.json", "w"))
        for (arm, seed), v in values.items():
            r = json.loads(json.dumps(llava[seed])) if arm == "llava" else _run(arm, seed, 0.0, 0.0, rng)
            r["metrics"]["stage2"]["caption_ce"] = v
            json.dump(r, open(tmp_path / folder / "runs" / f"{arm}-seed{seed}.json", "w"))
    assert report_main([str(tmp_path / "abl"), "--noise", str(tmp_path / "noise")]) == 0
    text = open(tmp_path / "abl" / "report.md").read()
    # floor max(|2.3-2.0|, |2.3-2.5|) = 0.3; sds_only's |diffs| 1.3 and 0.1: one beyond it
    assert "(arms llava_jitter, null, runs of ../noise)" in text
    assert "- stage2/caption_ce: floor 0.3 (from 2 runs); beyond it: sds_only 1/2" in text
    # a noise folder over another llava run is refused, naming both files
    r = json.load(open(tmp_path / "noise" / "runs" / "llava-seed1.json"))
    r["metrics"]["stage1"]["caption_ce"] += 1e-9
    json.dump(r, open(tmp_path / "noise" / "runs" / "llava-seed1.json", "w"))
    with pytest.raises(ValueError, match=r"llava-seed1.json is not the llava run of seed 1 .*runs/llava-seed1.json"):
        from study.report import write_report as wr
        wr(str(tmp_path / "abl"), str(tmp_path / "noise"))
