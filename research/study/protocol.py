"""The study's protocol as data: arms, seeds, budgets, data sizes and metrics (docs/ab_study.md).

A preset is fixed before a study runs and written beside its results (``protocol.json``); the
runner refuses to continue a results folder under a different protocol."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from nemo_basic.models.basic_config import BasicConfig

# arm -> the BasicConfig fields it changes from the paper's BASIC (L_das + L_sds, inc, attention)
ARMS: Dict[str, dict] = {
    "llava": {"enabled": False},
    "basic": {},
    "das_only": {"sds": False},
    "sds_only": {"das": False},
    "const": {"weighting": "const"},
    "dec": {"weighting": "dec"},
    "equal": {"degree": "equal"},
    # The noise floor (docs/ab_study.md, "Noise floor"): two arms that equal llava in exact
    # arithmetic, so their same-seed distance from llava is what chance alone does to a run.
    # null: BASIC's capture path runs (hooks, attention capture, both losses computed) with
    # lambda = 1e-30: the auxiliary gradient (~1e-32) is far below float32 resolution of the LM
    # gradient it is added to, so only the capture path's own round-off can move the run.
    "null": {"lambda_das": 1e-30, "lambda_sds": 1e-30},
    # llava_jitter: llava, with the projector's initial weights moved by a relative 1e-3 before
    # they are rounded to bf16 (INIT_JITTER): 15 % of them land one bf16 step away, none further
    # (tests/study/test_study_protocol.py).
    "llava_jitter": {"enabled": False},
}
ABLATIONS = ("das_only", "sds_only", "const", "dec", "equal")
NOISE_ARMS = ("null", "llava_jitter")
# arm -> relative perturbation of the projector's float32 initial draw (engine.reset)
INIT_JITTER: Dict[str, float] = {"llava_jitter": 1e-3}


def arm_init_jitter(arm: str) -> float:
    return INIT_JITTER.get(arm, 0.0)


def arm_basic(arm: str) -> BasicConfig:
    """The arm's BASIC settings; ``lambda_sds_<x>`` / ``lambda_das_<x>`` arms scale one weight."""
    if arm in ARMS:
        return BasicConfig(**ARMS[arm])
    for key in ("lambda_sds", "lambda_das"):
        if arm.startswith(key + "_"):
            try:
                return BasicConfig(**{key: float(arm[len(key) + 1:])})
            except ValueError:
                break
    raise ValueError(f"unknown arm {arm!r}: choose from {sorted(ARMS)} or lambda_sds_<x> / lambda_das_<x>")


@dataclass
class Protocol:
    name: str
    arms: List[str]
    seeds: List[int]
    image_size: int = 224             # DINOv2-small's native size: 16 x 16 = 256 patches
    seq_length: int = 320
    object_side: Tuple[float, float] = (0.38, 0.48)  # object side / image side: an object covers 13 % of the patches on average
    max_objects: int = 2
    train_scenes: int = 400           # fixed set (data seed 0), seen in a per-seed order
    eval_scenes: int = 32             # held-out scenes (own seed stream), the same in every run
    stage1_steps: int = 30
    stage2_steps: int = 8
    batch_size: int = 8
    stage1_lr: float = 1e-3           # the recipes' (paper: 1e-3 stage 1, 2e-5 stage 2)
    stage2_lr: float = 2e-5
    warmup_ratio: float = 0.03
    lens_scenes: int = 4              # of the held-out scenes: lens metrics of layers 0 and k, and pictures
    pictures: int = 2                 # lens pictures per run and stage
    qa_max_new_tokens: int = 20

    def validate(self) -> "Protocol":
        for arm in self.arms:
            arm_basic(arm)
        if "llava" not in self.arms:
            raise ValueError("protocol.arms must contain the baseline 'llava'")
        if len(set(self.seeds)) != len(self.seeds) or not self.seeds:
            raise ValueError(f"protocol.seeds must be distinct and non-empty, got {self.seeds}")
        if self.image_size % 14:
            raise ValueError(f"protocol.image_size = {self.image_size}: DINOv2's patch is 14 px")
        lo, hi = self.object_side
        if not 0.1 <= lo <= hi <= 0.5:
            raise ValueError(f"protocol.object_side = {self.object_side}: need 0.1 <= lo <= hi <= 0.5")
        if self.lens_scenes > self.eval_scenes or self.pictures > self.lens_scenes:
            raise ValueError("protocol: need pictures <= lens_scenes <= eval_scenes")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["object_side"] = list(self.object_side)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Protocol":
        d = dict(d)
        d["object_side"] = tuple(d["object_side"])
        return cls(**d).validate()


PRESETS: Dict[str, Protocol] = {
    # <= 10 minutes on 2 cores: the pipeline end to end, one seed, the two main arms.
    "quick": Protocol(name="quick", arms=["llava", "basic"], seeds=[0], train_scenes=64, eval_scenes=8,
                      stage1_steps=4, stage2_steps=2, batch_size=4, lens_scenes=2, pictures=1,
                      qa_max_new_tokens=12),
    # The run quoted in the README (about an hour on 2 idle cores): the main comparison.
    "full": Protocol(name="full", arms=["llava", "basic"], seeds=[0, 1, 2], train_scenes=320, eval_scenes=24,
                     stage1_steps=24, stage2_steps=6),
}
# The next two run under the full preset's settings by construction, so its llava runs are theirs.
# The whole protocol: the main comparison and every table-4 ablation, 3 seeds (about 3 hours on
# 2 CPU cores; run in two parts, docs/ab_study_results/2026-12-02-ablations).
# lambda_sds_0.0003: the rule of docs/ab_study.md ("Loss weights"): our L_sds/L_lm gradient ratio
# at the projector is 33x the 7B-shaped proxy's (scripts/grad_ratio.py), so one arm takes the
# lambda_2 that restores the proxy's ratio.
PRESETS["ablations"] = dataclasses.replace(PRESETS["full"], name="ablations", seeds=list(PRESETS["full"].seeds),
                                           arms=["llava", "basic", *ABLATIONS, "lambda_sds_0.0003"])
# The noise floor: how far a run with the same seed lands from llava when nothing but round-off
# differs (about 45 min on 2 cores).
PRESETS["noise"] = dataclasses.replace(PRESETS["full"], name="noise", seeds=list(PRESETS["full"].seeds),
                                       arms=["llava", *NOISE_ARMS])
