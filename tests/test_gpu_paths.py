"""What a GPU run depends on, checked on the CPU: collectives take tensors on the group's device, a step reads
nothing back to the host, a non-finite step is skipped on the device, fp16 skips are counted, errors keep their
cause."""

import math

import pytest
import torch
import torch.distributed as dist

from faceforge import distributed
from faceforge.config import config_from_dict
from faceforge.engine.parallel import Parallel
from faceforge.engine.step import build_parts, train_step
from faceforge.heads import HeadOutput
from host_syncs import HostSyncs

TINY = {"name": "tiny", "embedding_size": 16, "stem": 8, "widths": [8, 16, 16]}
COLLECTIVES = ("all_reduce", "all_gather", "broadcast", "all_gather_into_tensor", "reduce_scatter_tensor")


def _parts(head: dict, fused: bool = True, par: Parallel | None = None, num_classes: int = 50, **train):
    cfg = config_from_dict({"backbone": TINY, "head": head, "optim": {"fused": fused},
                            "train": {"device": "cpu", **train}})
    torch.manual_seed(0)
    return build_parts(cfg, num_classes, torch.device("cpu"), par)


def _batch(n: int = 8, num_classes: int = 50):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 112, 112, generator=g), torch.randint(0, num_classes, (n,), generator=g)


@pytest.fixture
def one_rank_group(tmp_path, monkeypatch):
    """A real one-process gloo group whose collectives record the device of every tensor they are given."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    seen: list[torch.device] = []
    for name in COLLECTIVES:
        real = getattr(dist, name)

        def recording(*args, _real=real, **kwargs):
            for a in args:
                for t in a if isinstance(a, (list, tuple)) else [a]:
                    if isinstance(t, torch.Tensor):
                        seen.append(t.device)
            return _real(*args, **kwargs)

        monkeypatch.setattr(dist, name, recording)
    yield Parallel(0, 1, 0, dist.group.WORLD, torch.device("cpu")), seen
    dist.destroy_process_group()


@pytest.mark.parametrize("fused", [True, False])
def test_step_collectives_use_the_group_device_not_the_default_one(one_rank_group, fused):
    """On a GPU box the default device (CPU) is not the group's (CUDA): a tensor made without naming its device
    reaches NCCL on the CPU and fails. Here the default device is `meta`, so such a tensor shows up as meta."""
    par, seen = one_rank_group
    parts = _parts({"name": "arcface", "s": 16.0, "m": 0.3}, fused=fused, par=par)
    x, y = _batch()
    with torch.device("meta"):
        result = train_step(parts, x, y)
    assert seen and set(seen) == {torch.device("cpu")}
    assert math.isfinite(result.read()["loss"])


def test_trainer_scalar_collectives_use_the_group_device(one_rank_group, tiny_config, monkeypatch):
    from faceforge.engine import trainer as trainer_module

    par, seen = one_rank_group
    monkeypatch.setattr(trainer_module, "init_from_env", lambda timeout: par)
    trainer = trainer_module.Trainer(tiny_config(data={"val_bins": []},
                                                 train={"max_steps": 2, "time_budget_s": 600.0}))
    with torch.device("meta"):
        assert trainer._slowest(3.5) == 3.5
    trainer.fit()
    assert seen and set(seen) == {torch.device("cpu")}


def test_all_reduce_scalars_returns_values_on_the_asked_device():
    out = distributed.all_reduce_scalars([1.5, 2.0], dist.ReduceOp.SUM, None, torch.device("cpu"))
    assert out.dtype == torch.float64 and out.tolist() == [1.5, 2.0]


@pytest.mark.parametrize("head", [{"name": "arcface"}, {"name": "cosface"}, {"name": "softmax"},
                                  {"name": "sphereface2"}])
def test_a_step_reads_nothing_back_and_its_result_one_transfer(head):
    parts = _parts(head)
    x, y = _batch()
    train_step(parts, x, y)  # the first step creates optimizer state
    with HostSyncs() as step:
        result = train_step(parts, x, y)
    with HostSyncs() as read:
        metrics = result.read()
    assert step.total == 0, step.counts
    assert read.total == 1, read.counts
    assert set(metrics) >= {"loss", "acc"}


@pytest.mark.parametrize("head, at_most", [
    ({"name": "arcface"}, 1),  # the non-fused optimizer needs the skip flag on the host
    ({"name": "arcface", "unpg": {"k": 1.5}}, 5),  # quartile ranks need the pair count; two mask reads
    ({"name": "arcface", "sample_rate": 0.3}, 3),  # PartialFC: the sample's size (two reads) and the skip flag
])
def test_host_syncs_of_the_other_paths_are_bounded(head, at_most):
    parts = _parts(head, fused=False)
    x, y = _batch()
    train_step(parts, x, y)
    with HostSyncs() as step:
        train_step(parts, x, y)
    assert 0 < step.total <= at_most, step.counts


def _nan_head(embeddings, labels):
    loss = embeddings.sum() * float("nan")
    return HeadOutput(loss=loss, per_sample_loss=loss.expand(len(labels)))


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_skip_on_the_device_leaves_weights_and_state_untouched(name):
    """A skipped first step (no optimizer state yet) and a skipped later one: the run then equals one that never
    saw them."""
    cfg = {"name": "arcface", "s": 16.0, "m": 0.3}
    parts, clean = _parts(cfg), _parts(cfg)
    for p in (parts, clean):
        if name == "adamw":
            p.optimizer = torch.optim.AdamW(p.optimizer.param_groups, lr=0.05, fused=True)
    x, y = _batch()
    for target, nan_steps in ((parts, [True, False, True, False]), (clean, [False, False])):
        for nan in nan_steps:
            if nan:
                target.head.forward = _nan_head  # an instance attribute over the class's forward
            result = train_step(target, x, y)
            if nan:
                del target.head.forward
            assert bool(result.skipped) == nan
            assert (result.read() is None) == nan
    for (key, a), b in zip(parts.head.state_dict().items(), clean.head.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)
    for a, b in zip(parts.backbone.parameters(), clean.backbone.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        for k, v in parts.optimizer.state[a].items():
            torch.testing.assert_close(v, clean.optimizer.state[b][k], rtol=0, atol=0)


def test_fp16_overflow_skips_are_counted(tiny_config):
    """fp16 with a GradScaler whose first scale (65536) overflows: each halving is a skipped step, and the run
    reports them."""
    from faceforge.engine.trainer import Trainer

    trainer = Trainer(tiny_config(train={"precision": "fp16", "max_steps": 8, "run_name": "fp16"},
                                  data={"val_bins": []}))
    summary = trainer.fit()
    halvings = round(math.log2(65536.0 / trainer.parts.scaler.get_scale()))
    assert halvings > 0
    assert summary["skipped_steps"] == trainer.state.skipped_steps == halvings


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x16 and 32x50)"),
])
def test_errors_under_torchrun_keep_their_type_and_cause(one_rank_group, tiny_config, monkeypatch, error):
    """An out-of-memory or a shape bug is reported as itself, with rank and step, not as a lost peer."""
    from faceforge.engine import trainer as trainer_module

    par, _ = one_rank_group
    monkeypatch.setattr(trainer_module, "init_from_env", lambda timeout: par)
    trainer = trainer_module.Trainer(tiny_config(data={"val_bins": []}, train={"max_steps": 3}))

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(trainer, "train_step", fail)
    with pytest.raises(type(error)) as info:
        trainer.fit()
    assert type(info.value) is type(error) and info.value.__cause__ is error
    assert "rank 0/1" in str(info.value) and "step 0" in str(info.value)
    assert "lost the other processes" not in str(info.value)



def test_evaluation_runs_in_the_precision_it_is_given():
    """Evaluation follows train.precision instead of always bf16: 'auto' and fp32 on the CPU are plain fp32,
    bf16 really runs the backbone under bf16 autocast (close to fp32, not equal)."""
    import numpy as np

    from faceforge.backbones import build_backbone
    from faceforge.eval.verification import embed_images
    from faceforge.runtime import autocast_dtype

    assert autocast_dtype("auto", torch.device("cpu")) is None
    torch.manual_seed(0)
    model = build_backbone(**TINY)
    images = np.random.default_rng(0).integers(0, 256, (4, 112, 112, 3), dtype=np.uint8)
    fp32, auto, bf16 = (embed_images(model, images, precision=p) for p in ("fp32", "auto", "bf16"))
    np.testing.assert_array_equal(fp32, auto)
    assert not np.array_equal(fp32, bf16)
    np.testing.assert_allclose(bf16, fp32, rtol=0.1, atol=0.1 * np.abs(fp32).max())
