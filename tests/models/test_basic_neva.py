"""BASIC inside NeVA: exactness against an independent float64 recomputation, gradient routing,
BASIC-off == NeVA, and TP/PP parity with the single-process run (real gloo processes)."""
import math

import pytest
import torch

import basic_workers as W
from nemo_basic.testing import run_distributed
from nemo_basic.testing.tiny import IMG_SEQ_LEN


# -- an independent reference, written the naive way in float64 -----------------------------------

def expected_masks(input_ids, text_lengths, max_len):
    """Image/text positions of the combined sequence, by walking the tokens (placeholder → 16)."""
    batch = input_ids.shape[0]
    image = torch.zeros(batch, max_len, dtype=torch.bool)
    text = torch.zeros(batch, max_len, dtype=torch.bool)
    for b in range(batch):
        pos = 0
        for t, token in enumerate(input_ids[b].tolist()):
            span = IMG_SEQ_LEN if token == -200 else 1
            for p in range(pos, min(pos + span, max_len)):
                if token == -200:
                    image[b, p] = True
                elif text_lengths is None or t < text_lengths[b]:
                    text[b, p] = True
            pos += span
    return image, text


def reference_losses(r, k, degree="attention"):
    """L_das and L_sds per METHOD.md, from the captured internals, in float64."""
    image, text = r["image_mask"], r["text_mask"]
    weights = torch.tensor([l * l for l in range(1, k + 1)], dtype=torch.float64)
    weights /= weights.sum()
    x = r["input"].double().transpose(0, 1)                           # [B, S, d]
    target = sum(weights[l - 1] * r["hidden"][l].double().transpose(0, 1) for l in range(1, k + 1))
    E = r["embedding"].double()
    das, sds, n = 0.0, 0.0, 0
    for b in range(x.shape[0]):
        img = image[b].nonzero().squeeze(1)
        if img.numel() == 0:
            continue
        n += 1
        if degree == "equal":
            a = torch.full((img.numel(),), 1.0 / img.numel(), dtype=torch.float64)
        else:
            mass = torch.zeros(img.numel(), dtype=torch.float64)
            for l in range(1, k + 1):
                q = r["q"][l][:, b].double().transpose(0, 1)          # [H, S, D]
                kk = r["k"][l][:, b].double().transpose(0, 1)
                scores = q @ kk.transpose(1, 2) * r["scale"]
                S = scores.shape[-1]
                scores = scores.masked_fill(torch.ones(S, S).triu(1).bool(), float("-inf"))
                A = scores.softmax(-1).mean(0)                        # head average [S, S]
                mass += A[text[b]][:, img].sum(0)
            a = mass / mass.sum()
        v, v_hat = x[b, img], target[b, img]
        das += (a * ((v / v.norm(dim=-1, keepdim=True) - v_hat / v_hat.norm(dim=-1, keepdim=True)) ** 2).sum(-1)).sum()
        logp = (v_hat @ E.T).log_softmax(-1)
        logq = (v @ E.T).log_softmax(-1)
        sds += (a * (logp.exp() * (logp - logq)).sum(-1)).sum()
    return das / n, sds / n


@pytest.mark.parametrize("kind,k,degree", [("simple", 3, "attention"), ("mixed", 2, "attention"),
                                           ("simple", 2, "equal")])
def test_losses_equal_float64_recomputation(spawn, kind, k, degree):
    (r,) = spawn(W.capture_internals, 1, k, kind, degree)
    image, text = expected_masks(r["input_ids"], r["text_lengths"], r["image_mask"].shape[1])
    assert torch.equal(r["image_mask"], image) and torch.equal(r["text_mask"], text)
    das, sds = reference_losses(r, k, degree)
    assert r["logs"]["das"].item() == pytest.approx(das.item(), rel=1e-5)
    assert r["logs"]["sds"].item() == pytest.approx(sds.item(), rel=1e-5)
    assert das > 0 and sds > 0


def test_disabled_is_exactly_neva(spawn):
    (r,) = spawn(W.disabled_equals_plain, 1)
    assert r == {"loss_equal": True, "names_equal": True, "grads_equal": True}


def test_aux_gradients_reach_only_the_projector(spawn):
    (r,) = spawn(W.grads_with_zero_lm_mask, 1)
    assert r["logs"] and r["logs"][0]["das"] > 0
    assert r["nonzero"], "the aux losses produced no gradient"
    assert all(n.startswith("vision_projection.") for n in r["nonzero"]), r["nonzero"]
    projector = [n for n in r["trainable"] if n.startswith("vision_projection.")]
    assert set(r["nonzero"]) == set(projector)


_REFERENCES = {}


@pytest.fixture
def reference(tmp_path_factory, spawn):
    """Single-process runs, computed once per (batch kind, k) for the whole module."""
    def get(kind, k):
        if (kind, k) not in _REFERENCES:
            path = str(tmp_path_factory.mktemp(f"{kind}{k}") / "ref.pt")
            (res,) = spawn(W.run_schedule, 1, 1, 1, k, kind, None, path)
            _REFERENCES[kind, k] = (path, res)
        return _REFERENCES[kind, k]
    return get


def _assert_same(run, ref, rel=1e-5):
    for name, g in run["projector_grads"].items():
        r = ref["projector_grads"][name]
        assert (g - r).abs().max() <= rel * r.abs().max(), name
    for a, b in zip(run["logs"], ref["logs"], strict=True):
        for key in ("das", "sds"):
            assert a[key] == pytest.approx(b[key], rel=rel), key


@pytest.mark.parametrize("kind", ["simple", "mixed", "textonly"])
def test_tensor_parallel_2_matches_single_process(spawn, reference, kind):
    path, ref = reference(kind, 2)
    ranks = spawn(W.run_schedule, 2, 2, 1, 2, kind, path, None)
    for run in ranks:
        assert run["lm"] == pytest.approx(ref["lm"], rel=1e-5)
        _assert_same(run, ref)


@pytest.mark.parametrize("kind,k", [("simple", 2), ("mixed", 2), ("simple", 3), ("mixed", 4), ("textonly", 3)])
def test_pipeline_parallel_2_matches_single_process(spawn, reference, kind, k):
    """k=2: layers 1..k on the first stage; k=3, 4: they span both stages, the supervision rides
    in the activation tensor and the losses are computed on the second stage. `textonly` starts
    with a micro-batch without any image: no stage may wait for supervision that never comes."""
    path, ref = reference(kind, k)
    if kind == "textonly":  # the image-free micro-batch logs no BASIC loss; the mixed one does
        assert len(ref["logs"]) == 1 and len(ref["lm"]) == 2
    first, last = spawn(W.run_schedule, 2, 1, 2, k, kind, path, None)
    assert last["lm"] == pytest.approx(ref["lm"], rel=1e-5)
    where, elsewhere = (first, last) if k <= 2 else (last, first)
    assert "logs" not in elsewhere
    _assert_same(dict(where, projector_grads=first["projector_grads"]), ref)


@pytest.mark.parametrize("recompute,pp", [("full", 1), ("selective", 1), ("full", 2)])
def test_activation_recomputation_counts_once(spawn, reference, recompute, pp):
    """Recomputed layers re-run their forward inside backward (under 1F1B after the next
    micro-batch started): the losses and projector gradients must not change."""
    path, ref = reference("simple", 3)
    ranks = spawn(W.run_schedule, pp, 1, pp, 3, "simple", path, None, recompute)
    first, last = ranks[0], ranks[-1]
    assert last["lm"] == pytest.approx(ref["lm"], rel=1e-5)
    _assert_same(dict(last, projector_grads=first["projector_grads"]), ref)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,k", [(2, 1, 2), (1, 2, 3)])
def test_nemo_training_logs_three_losses(tp, pp, k):
    """NeMo's own loop; under PP=2 with k=3 the supervision spans both stages."""
    ranks = run_distributed(W.nemo_train_logs, 2, tp, pp, 3, k, init_group=False)
    history = ranks[0]["history"]
    assert len(history) == 3
    for step in history:
        for key in ("lm loss", "basic das loss", "basic sds loss"):
            assert key in step and math.isfinite(step[key]) and step[key] > 0, (key, sorted(step))


def test_host_syncs_per_micro_batch_are_a_small_constant(spawn):
    """BASIC adds one host synchronisation per micro-batch (the row counts read by RowLayout),
    whatever k and the batch size: no per-layer or per-sample `nonzero`, `.item()`, boolean
    gather or `tolist()` (on a GPU each of those stalls the host)."""
    (results,) = spawn(W.host_syncs, 1, [(1, 1), (3, 2), (3, 4)])
    for r in results:
        assert r["logged"], r
        assert sum(r["added"].values()) <= 1, r
        assert all(v >= 0 for v in r["added"].values()), r
    assert len({sum(r["added"].values()) for r in results}) == 1, results


def test_study_arm_switch_equals_a_model_built_per_arm(spawn):
    """The A/B study builds one model (BASIC on) and switches arms on it (study.engine):
    each arm must train exactly as a model built with that arm's settings; 'llava' exactly as BASIC off."""
    (r,) = spawn(W.study_arm_switch, 1)
    for arm, res in r.items():
        assert res["loss_equal"] and res["grad_names_equal"], (arm, res)
        assert res["max_grad_diff"] <= 1e-6, (arm, res)
        assert res["logs"].keys() == res["want_logs"].keys(), (arm, res)
        for name, value in res["want_logs"].items():
            assert res["logs"][name] == pytest.approx(value, rel=1e-6), (arm, name)
    assert r["llava"]["logs"] == {} and set(r["sds_only"]["logs"]) == {"sds"} and set(r["basic"]["logs"]) == {"das", "sds"}
