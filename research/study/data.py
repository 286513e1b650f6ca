"""The study's data: synthetic scenes with exact per-patch labels (the embedded-data generator),
as stage-1 captions, stage-2 questions, and a held-out set with one question of each kind.

Seed streams (numpy ``default_rng`` keys): training scenes ``[0, 1301]`` (one fixed set for every
arm and seed), their order and stage-2 question choice ``[seed, 1302]`` / ``[seed, 1303]``, held-out
scenes ``[0, 1304]``. None of them is used by the embedded default or the lens's probe scenes."""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np

from nemo_basic.data import embedded as D

QA_KINDS = ("color", "shape", "count", "position")


@dataclass
class Scene:
    image: object          # PIL image
    scene: dict            # objects, background, patch_labels
    png: bytes

    @property
    def caption(self) -> str:
        cap = D._caption(self.scene)
        return cap[0].upper() + cap[1:]


def make_scenes(n: int, key: List[int], size: int, side, max_objects: int) -> List[Scene]:
    rng = np.random.default_rng(key)
    out = []
    for _ in range(n):
        img, scene = D.make_scene(rng, size, 14, side=side, max_objects=max_objects)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(Scene(img, scene, buf.getvalue()))
    return out


def patch_labels(s: Scene) -> list:
    """Per patch ``[colour, shape]`` or ``[background colour, "background"]`` (the lens's labels)."""
    from nemo_basic.analysis.scenes import scene_patch_labels

    return scene_patch_labels(s.scene)


def caption_record(s: Scene, i: int) -> dict:
    return {"meta": {"id": f"cap-{i}", "conversations": D._conv([("Describe the image.", s.caption)], True)},
            "images": [s.png]}


def qa_record(s: Scene, i: int, rng: np.random.Generator) -> dict:
    return {"meta": {"id": f"qa-{i}", "conversations": D._conv(D._questions(rng, s.scene), True)},
            "images": [s.png]}


def held_out_questions(s: Scene) -> Dict[str, tuple]:
    """One (question, reference answer) per kind, worded as the training questions
    (``embedded._questions``); a kind is absent when the scene makes it ambiguous."""
    objs = s.scene["objects"]
    n = len(objs)
    out = {"count": ("How many shapes are in the image?",
                     f"There {'is' if n == 1 else 'are'} {D.NUMBER_WORDS[n]} shape{'s' if n != 1 else ''}.")}
    o = objs[0]
    if sum(p["shape"] == o["shape"] for p in objs) == 1:
        out["color"] = (f"What color is the {o['shape']}?", f"The {o['shape']} is {o['color']}.")
    if sum(p["color"] == o["color"] for p in objs) == 1:
        out["shape"] = (f"Which shape is {o['color']}?", f"The {o['color']} shape is {D._a(o['shape'])} {o['shape']}.")
    name = f"{o['color']} {o['shape']}"
    out["position"] = (f"Where is the {name}?", f"The {name} is {D._where(o['position'])}.")
    return out


class StudyData:
    """Everything a run sees, identical across arms for a seed."""

    def __init__(self, protocol, encoders: Dict[int, object]):
        p = protocol
        self.protocol = p
        self.train = make_scenes(p.train_scenes, [0, 1301], p.image_size, p.object_side, p.max_objects)
        self.held_out = make_scenes(p.eval_scenes, [0, 1304], p.image_size, p.object_side, p.max_objects)
        self.encoders = encoders  # stage -> SampleEncoder (plain for 1, vicuna_v1 for 2)
        self._cache: Dict[tuple, dict] = {}

    def order(self, seed: int, stage: int, steps: int) -> List[int]:
        """Scene indices of every sample of the stage, epoch after epoch in a per-seed order."""
        need = steps * self.protocol.batch_size
        rng = np.random.default_rng([seed, 1302, stage])
        idx: List[int] = []
        while len(idx) < need:
            idx += rng.permutation(len(self.train)).tolist()
        return idx[:need]

    def batches(self, seed: int, stage: int, steps: int) -> Callable[[int], dict]:
        from nemo_basic.data.datamodule import collate_batch

        order = self.order(seed, stage, steps)
        b = self.protocol.batch_size
        qa_rng = np.random.default_rng([seed, 1303])
        qa_plan = {}  # sample position -> its questions, drawn in order (same for every arm)
        for pos, i in enumerate(order):
            qa_plan[pos] = qa_record(self.train[i], i, qa_rng) if stage == 2 else caption_record(self.train[i], i)
        encoder = self.encoders[stage]

        def get(step: int) -> dict:
            recs = [encoder(qa_plan[pos]) for pos in range(step * b, (step + 1) * b)]
            return collate_batch(recs, image_shape=encoder.image_shape)

        return get

    def eval_items(self) -> List[dict]:
        return [{"scene": s, "labels": patch_labels(s), "questions": held_out_questions(s)} for s in self.held_out]

    def object_patch_share(self) -> float:
        """Mean share of an image's patches covered by one object (the protocol asks for > 7 %)."""
        shares = []
        for s in self.train:
            lab = np.asarray(s.scene["patch_labels"])
            for k in range(1, len(s.scene["objects"]) + 1):
                shares.append(float((lab == k).mean()))
        return float(np.mean(shares)) if shares else 0.0
