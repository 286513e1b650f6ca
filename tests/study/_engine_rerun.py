"""Driver for test_study_engine: a run of the study engine repeated after other runs in between
must train exactly as the first time (reset restores the LLM, redraws the projector, and each stage
has a fresh optimizer). Own process: it builds the recipe's model (NeMo, parallel state).

Argument: the model's dtype, ``bfloat16`` (the study's runs, the default) or ``float32`` (the same
engine code with the recipe's CPU precision: on a CPU without AVX-512 BF16 / AMX PyTorch's bf16
GEMMs take a slow fallback, ~10x the float32 time; 866 s vs 88 s for this script on one AVX2 core)."""
import dataclasses
import json
import os
import sys

import torch

# the study's package `study` lives in research/ (not installed); this driver runs as a script
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "research"))

from nemo_basic.data.datamodule import SampleEncoder  # noqa: E402
from study import engine as E  # noqa: E402
from study.data import StudyData  # noqa: E402
from study.protocol import PRESETS, arm_basic  # noqa: E402

p = dataclasses.replace(PRESETS["quick"], image_size=112, seq_length=160, batch_size=2, train_scenes=8,
                        eval_scenes=2, lens_scenes=1, pictures=1).validate()
dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[sys.argv[1] if len(sys.argv) > 1 else "bfloat16"]
built = E.build(p.image_size, p.seq_length, dtype=dtype)
enc = {1: SampleEncoder(built.tokenizer, built.processor, template="plain", seq_length=p.seq_length,
                        img_seq_len=built.img_seq_len),
       2: SampleEncoder(built.tokenizer, built.processor, template="vicuna_v1", seq_length=p.seq_length,
                        img_seq_len=built.img_seq_len)}
data = StudyData(p, enc)


def run(arm, seed):
    E.set_basic(built, arm_basic(arm))
    E.reset(built, seed)
    torch.manual_seed(seed)
    curves = [E.train_stage(built, stage, data.batches(seed, stage, 2), 2, 1e-3, 1) for stage in (1, 2)]
    state = {k: v.detach().clone() for k, v in built.mcore.state_dict().items() if torch.is_tensor(v)}
    return [[{k: row[k] for k in ("lm", "das", "sds")} for row in c] for c in curves], state


first_curves, first_state = run("basic", 0)
run("const", 1)  # another arm and seed in between: moves the projector, the LLM and the RNG
again_curves, again_state = run("basic", 0)
moved = [k for k, v in first_state.items() if k in built.pretrained and not torch.equal(v, built.pretrained[k])]
json.dump({"dtypes": sorted({str(v.dtype) for v in first_state.values() if v.is_floating_point()}),
           "first": first_curves, "again": again_curves,
           "states_equal": first_state.keys() == again_state.keys()
           and all(torch.equal(first_state[k], again_state[k]) for k in first_state),
           "llm_tensors_moved_by_stage2": len(moved)}, sys.stdout)
