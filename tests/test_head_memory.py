"""The head memory plan (engine/head_memory.py) against what a real step holds: the live-tensor peak of one
train_step of the trainer (the head on a learnable [B, D] backbone, after a first step that creates the
optimizer state). Within 10% for every head, PartialFC, UNPG and GIF included; a plan missing a term is not."""

import pytest
import torch

from faceforge.engine import head_memory
from faceforge.engine.head_memory import (
    _LiveBytes, head_step_parts, logits_bytes_per_element, plan_head_memory, random_gif_codes, track_step,
)
from faceforge.engine.step import train_step
from faceforge.errors import ConfigError

N, B, D = 20_000, 64, 64
GIF = {"v": 16, "subset": 256}  # a small uniformity subset: the plan then probes fewer identities than N
CENTRE_HEADS = [("arcface", {}), ("cosface", {}), ("softmax", {}), ("sphereface2", {}),
                ("arcface", {"unpg": {"k": 1.5}})]


def _tracked_step(head: str, optimizer: str, params: dict, sample_rate: float = 1.0, batch: int = B):
    """(peak bytes of a real step's live tensors, its parts): the second of two steps, labels distinct."""
    torch.manual_seed(0)
    build = {**params, "sample_rate": sample_rate}
    if head == "gif":
        codes, vectors = random_gif_codes(N, params["v"], D)
        build = {**params, "codes": codes, "code_vectors": vectors}
    parts = head_step_parts(head, N, batch, D, optimizer, torch.device("cpu"), build)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    images = torch.zeros(batch, 1)
    train_step(parts, images, perm[:batch])
    return track_step(parts, images, perm[batch:2 * batch]).peak, parts


def _ratio(plan: dict, tracked: int) -> float:
    return plan["total_bytes"] / tracked


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("sample_rate", [1.0, 0.1])
@pytest.mark.parametrize("head,params", CENTRE_HEADS, ids=["arcface", "cosface", "softmax", "sphereface2", "unpg"])
def test_plan_matches_the_tracked_peak_of_a_centre_head(head, params, sample_rate, optimizer):
    tracked, parts = _tracked_step(head, optimizer, params, sample_rate)
    plan = plan_head_memory(N, 1, B, D, optimizer, sample_rate, head, head_params=params)
    assert 0.9 <= _ratio(plan, tracked) <= 1.1, (plan, tracked)
    blocks = parts.head.sampled_blocks()
    assert plan["sampled_columns"] == (N if not blocks else len(next(iter(blocks.values())).index))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("joint", [False, True])
def test_plan_matches_the_tracked_peak_of_gif(joint, optimizer):
    params = {**GIF, "joint": joint}
    tracked, _ = _tracked_step("gif", optimizer, params)
    plan = plan_head_memory(N, 1, B, D, optimizer, 1.0, "gif", head_params=params)
    assert 0.9 <= _ratio(plan, tracked) <= 1.1, (plan, tracked)
    # Joint training updates only the step's rows: the [N, D] vectors and their optimizer state, no dense gradient.
    state = {"sgd": 1, "adamw": 2}[optimizer] if joint else 0
    assert plan["code_length"] == 4 and plan["code_vectors_fp32_copies"] == 1 + state


def _without(sizes, term):
    """A size-class table that leaves `term` out: its tensors then count as fixed, unscaled from the probe."""
    def dropped(*args):
        table = sizes(*args)
        table.pop(term)
        return table
    return dropped


@pytest.mark.parametrize("head,params,sample_rate,optimizer,sizes,term,batch", [
    ("arcface", {}, 1.0, "sgd", "_centre_sizes", "logits", 512),  # 4 bytes per logit: a batch where they matter
    ("arcface", {}, 1.0, "sgd", "_centre_sizes", "class_rows", B),
    ("softmax", {}, 0.5, "adamw", "_centre_sizes", "sampled_rows", B),  # rows large enough to matter
    ("sphereface2", {}, 0.1, "sgd", "_centre_sizes", "class_rows", B),
    ("gif", {**GIF, "joint": True}, 1.0, "adamw", "_gif_sizes", "code_vectors", B),
])
def test_a_plan_missing_a_term_is_off(monkeypatch, head, params, sample_rate, optimizer, sizes, term, batch):
    tracked, _ = _tracked_step(head, optimizer, params, sample_rate, batch)
    monkeypatch.setattr(head_memory, sizes, _without(getattr(head_memory, sizes), term))
    plan = plan_head_memory(N, 1, batch, D, optimizer, sample_rate, head, head_params=params)
    assert not 0.9 <= _ratio(plan, tracked) <= 1.1, (term, plan, tracked)


def test_tracker_counts_what_it_adopts_and_what_is_freed():
    held = torch.zeros(1000)
    with _LiveBytes() as tracker:
        tracker.adopt([held, held.view(10, 100)])  # one storage, counted once
        a = torch.ones(2000)
        del a
        b = torch.ones(500)
    assert tracker.held == {"fixed": 4000} and tracker.peak == 4000 + 8000 and tracker.live["fixed"] == 6000
    del held, b
    assert tracker.live["fixed"] == 0


def test_bytes_per_logit_are_measured_and_a_given_figure_is_planned_for():
    measured = logits_bytes_per_element("arcface")
    assert 4 <= measured < 100
    plan = plan_head_memory(N, 1, B, D, "sgd", 1.0, "arcface")
    halved = plan_head_memory(N, 1, B, D, "sgd", 1.0, "arcface", per_logit=measured / 2)
    assert plan["logit_bytes_per_element"] == pytest.approx(measured, abs=0.01)
    assert halved["logit_bytes_per_element"] == pytest.approx(measured / 2, abs=0.01)
    assert halved["total_bytes"] < plan["total_bytes"]
    with pytest.raises(ConfigError, match="no \\[batch, classes\\] logits"):
        logits_bytes_per_element("gif", head_params=GIF)
