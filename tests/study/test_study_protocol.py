"""The study's protocol, data and answer scoring (cheap: no model is built)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from nemo_basic.data import embedded as D
from study import data as SD
from study.evaluate import key_answer, normalise
from study.protocol import ARMS, PRESETS, arm_basic


def test_arms_are_the_papers_table4_settings():
    assert not arm_basic("llava").active
    b = arm_basic("basic")
    assert (b.das, b.sds, b.weighting, b.degree, b.lambda_das, b.lambda_sds) == (True, True, "inc", "attention", 1.0, 0.01)
    assert (arm_basic("das_only").sds, arm_basic("sds_only").das) == (False, False)
    assert arm_basic("const").weighting == "const" and arm_basic("dec").weighting == "dec"
    assert arm_basic("equal").degree == "equal"
    assert arm_basic("lambda_sds_0.1").lambda_sds == 0.1
    from study.protocol import NOISE_ARMS

    assert set(ARMS) - set(NOISE_ARMS) <= set(PRESETS["ablations"].arms)
    with pytest.raises(ValueError, match="unknown arm 'bogus'"):
        arm_basic("bogus")


@pytest.mark.parametrize("change, message", [
    (dict(arms=["basic"]), "baseline 'llava'"),
    (dict(seeds=[0, 0]), "distinct"),
    (dict(image_size=200), "patch is 14"),
    (dict(object_side=(0.4, 0.3)), "object_side"),
    (dict(pictures=9), "pictures <= lens_scenes"),
])
def test_protocol_errors_name_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(PRESETS["full"], **change).validate()


def test_presets_keep_the_native_resolution_and_three_seeds():
    full = PRESETS["full"].validate()
    assert full.image_size == 224 and len(full.seeds) == 3 and full.arms[:2] == ["llava", "basic"]
    quick = PRESETS["quick"].validate()
    assert len(quick.seeds) == 1 and len(quick.arms) == 2


def test_objects_cover_more_than_seven_percent_of_the_patches():
    """On average (13 %); the smallest objects, triangles at the shortest side, cover about 6 %."""
    p = PRESETS["full"]
    scenes = SD.make_scenes(60, [0, 1301], p.image_size, p.object_side, p.max_objects)
    shares = []
    for s in scenes:
        lab = np.asarray(s.scene["patch_labels"])
        assert lab.shape == (16, 16)
        shares += [float((lab == k).mean()) for k in range(1, len(s.scene["objects"]) + 1)]
    assert np.mean(shares) > 0.11 and min(shares) > 0.05, (np.mean(shares), min(shares))


def test_held_out_questions_are_worded_as_the_training_questions():
    p = PRESETS["full"]
    for s in SD.make_scenes(30, [0, 1304], p.image_size, p.object_side, p.max_objects):
        training = set()
        for seed in range(200):  # _questions samples 2-3 of the scene's questions; collect them all
            training.update(D._questions(np.random.default_rng(seed), s.scene))
        for kind, qa in SD.held_out_questions(s).items():
            assert qa in training, (kind, qa)


def test_data_order_depends_on_the_seed_only():
    p = dataclasses.replace(PRESETS["quick"], train_scenes=10, eval_scenes=2)
    d = SD.StudyData(p, encoders={})
    assert d.order(0, 1, 5) == SD.StudyData(p, encoders={}).order(0, 1, 5)
    assert d.order(0, 1, 5) != d.order(1, 1, 5)
    order = d.order(0, 1, 5)  # 20 samples over 10 scenes: two full passes
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:]) == list(range(10))


@pytest.mark.parametrize("kind, text, key", [
    ("count", "There are two shapes.", "two"),
    ("count", " 2 shapes", "two"),
    ("color", "The circle is a circle.", None),
    ("color", "It is red, not blue.", "red"),
    ("shape", "The blue shape is a triangle.", "triangle"),
    ("position", "at the top-right corner", "top right"),
    ("position", "The red square is at the top of the image.", "top"),
    ("position", "on the left side of the image", "left"),
])
def test_key_answer(kind, text, key):
    assert key_answer(kind, text) == key


def test_exact_match_normalisation():
    assert normalise("  The circle  is\nred. ") == normalise("the circle is red.")
    assert normalise("The circle is red") != normalise("The circle is red.")


def test_a_results_folder_takes_runs_of_equal_settings_only(tmp_path):
    """The full preset's llava/basic runs are runs of the ablations preset (same settings, other
    name and arms); a folder written under other settings is refused, naming the setting."""
    import json

    from study.run import check_protocol

    full, ablations = PRESETS["full"], PRESETS["ablations"]
    (tmp_path / "protocol.json").write_text(json.dumps(dict(full.to_dict(), measured={"k": 15})))
    check_protocol(str(tmp_path), ablations)  # accepted: only name and arms differ
    with pytest.raises(SystemExit, match="differs in stage1_steps"):
        check_protocol(str(tmp_path), dataclasses.replace(ablations, stage1_steps=full.stage1_steps + 1))
    with pytest.raises(SystemExit, match="differs in eval_scenes, train_scenes"):
        check_protocol(str(tmp_path), dataclasses.replace(ablations, train_scenes=64, eval_scenes=8))


def test_noise_arms_equal_llava_in_exact_arithmetic():
    """The noise floor's arms: null runs BASIC's capture and losses at a weight whose gradient is far
    below float32 resolution; llava_jitter is llava with a perturbed initial draw. The noise preset
    runs under the full preset's settings, so the full preset's llava runs are its baseline."""
    from study.protocol import NOISE_ARMS, arm_init_jitter

    null = arm_basic("null")
    assert null.active and (null.das, null.sds, null.weighting, null.degree) == (True, True, "inc", "attention")
    assert null.lambda_das == null.lambda_sds == 1e-30
    assert not arm_basic("llava_jitter").active
    assert arm_init_jitter("llava_jitter") == 1e-3
    assert all(arm_init_jitter(a) == 0.0 for a in list(ARMS) + ["lambda_sds_0.1"] if a != "llava_jitter")
    noise = PRESETS["noise"].validate()
    assert noise.arms == ["llava", *NOISE_ARMS] and noise.seeds == PRESETS["full"].seeds
    full = PRESETS["full"].to_dict()
    assert {k for k, v in noise.to_dict().items() if full[k] != v} == {"name", "arms"}


def test_init_jitter_moves_some_weights_one_bf16_step():
    import torch

    from study.engine import jitter_

    w = torch.empty(100_000).normal_(0.0, 0.02, generator=torch.Generator().manual_seed(0))
    z = torch.empty(100_000).normal_(0.0, 1.0, generator=torch.Generator().manual_seed(7))
    out = jitter_(w.clone(), 1e-3, torch.Generator().manual_seed(7))
    # float64 reference of w (1 + 1e-3 z), equal up to float32 round-off
    ref = w.double() * (1.0 + 1e-3 * z.double())
    torch.testing.assert_close(out.double(), ref, rtol=3e-7, atol=0.0)
    a, b = w.to(torch.bfloat16), out.to(torch.bfloat16)
    steps = (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()  # same sign: bit distance = steps
    assert steps.max() == 1
    assert 0.10 < (steps == 1).float().mean() < 0.20  # 15 %: a near-null, yet real, change of the draw
