"""GIF head: loss against its formula, pull-only gradient, size independent of N, decoding, joint mode, training."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from faceforge.engine.trainer import Trainer
from faceforge.errors import ConfigError
from faceforge.eval.identify import CodeTrie, brute_force_identify, gif_decode
from faceforge.heads import GIF, build_head
from faceforge.tokenizer import Codebook, build_codes, load_codes, save_codes
from faceforge.engine.tokenize import tokenize_dataset


def _digits(n: int, v: int, length: int) -> torch.Tensor:
    """Codes that spell 0..n-1 in base v: unique whatever the prototypes."""
    ids = torch.arange(n)
    return torch.stack([(ids // v ** (length - 1 - j)) % v for j in range(length)], dim=1)


def _head(n=40, dim=8, v=4, **kw):
    g = torch.Generator().manual_seed(0)
    vectors = F.normalize(torch.randn(n, dim, generator=g), dim=1)
    return GIF(dim, build_codes(vectors, v), vectors, **{"head_dim": 6, **kw})


def test_loss_matches_direct_formula_and_gradient():
    torch.manual_seed(0)
    head = _head(s=4.0, m=0.3, gamma=0.7, margin="cosface").double()
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, 3, 17, 39])
    out = head(x, y)
    z = x.detach() / x.detach().norm(dim=1, keepdim=True)
    expected = torch.zeros(5, dtype=torch.float64)
    for j in range(head.length):
        p = z @ head.project[j].weight.detach().t()
        w = head.tokens[j].weight.detach()
        cos = (p / p.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).t()
        target = head.codes[y, j].long()
        logits = 4.0 * (cos - 0.3 * F.one_hot(target, head.v))
        expected += torch.logsumexp(logits, 1) - logits.gather(1, target[:, None]).squeeze(1)
    h = head.code_vectors[y]
    expected += 0.7 * 0.5 * ((z * h).sum(1) - 1) ** 2
    torch.testing.assert_close(out.per_sample_loss, expected)
    torch.testing.assert_close(out.loss, expected.mean())
    assert torch.autograd.gradcheck(lambda e: head(e, y).loss, (x,))
    assert set(out.metrics) >= {"code_acc", "tok0_acc", "token_ce", "pull"}


def test_losses_stay_fp32_under_autocast():
    head = _head()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(torch.randn(4, 8).bfloat16(), torch.tensor([0, 1, 2, 3]))
        logits = head.token_logits(torch.randn(4, 8).bfloat16())
    assert out.per_sample_loss.dtype == logits.dtype == torch.float32


def test_pull_loss_gives_no_gradient_to_other_identities():
    """In training only the batch's rows are computed on (a block, no [N, D] gradient); in evaluation the dense
    gradient is zero off them."""
    head = _head(joint=True, uniformity=0.0)
    y = torch.tensor([2, 5, 5])
    x = torch.randn(3, 8)
    head(x, y).loss.backward()
    index, block = head.sampled_blocks()["code_vectors"]
    assert head.code_vectors.grad is None and index.tolist() == [2, 5] and bool((block.grad != 0).any(dim=1).all())
    head.eval()
    head(x, y).loss.backward()
    moved = head.code_vectors.grad.abs().sum(dim=1) > 0
    assert moved.nonzero().squeeze(1).tolist() == [2, 5]
    fixed = _head()
    assert "code_vectors" not in dict(fixed.named_parameters()) and "code_vectors" in fixed.state_dict()


def test_parameter_count_does_not_depend_on_identities():
    def count(n):
        codes = _digits(n, 16, 3)
        return sum(p.numel() for p in GIF(32, codes, torch.randn(n, 32), head_dim=24, v=16).parameters())

    assert count(300) == count(4000) == 3 * (24 * 32 + 16 * 24)


def test_decoding_finds_the_identity_on_separable_data():
    torch.manual_seed(0)
    n, v, length = 64, 4, 3
    codes = _digits(n, v, length)
    # Block j of an identity's embedding is the one-hot of its token j: every position is linearly separable.
    prototypes = F.normalize(F.one_hot(codes, v).flatten(1).float(), dim=1)
    head = GIF(v * length, codes, prototypes, head_dim=8, s=16.0, m=0.2)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(60):
        y = torch.randint(0, n, (64,))
        loss = head(prototypes[y] + 0.05 * torch.randn(64, v * length), y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    y = torch.arange(n).repeat(3)
    queries = prototypes[y] + 0.05 * torch.randn(len(y), v * length)
    decoded, scores = gif_decode(head, queries, beam=4)
    brute, _ = brute_force_identify(queries, head.code_vectors)
    assert (decoded == y).float().mean() > 0.95 and (brute == y).float().mean() > 0.95
    assert (decoded == brute).float().mean() > 0.95 and bool((scores <= 0).all())
    greedy, _ = gif_decode(head, queries, beam=1, trie=CodeTrie(head.codes, head.v))
    assert (greedy == y).float().mean() > 0.9


def test_decoding_only_returns_valid_codes():
    codes = torch.tensor([[0, 1], [2, 2]])  # most codes of the 3x3 grid belong to nobody
    head = GIF(4, codes, None, head_dim=4, v=3, s=8.0)
    ids, _ = gif_decode(head, torch.randn(50, 4), beam=2)
    assert set(ids.tolist()) <= {0, 1}


def test_recode_resets_only_centres_whose_members_changed():
    vectors = F.normalize(torch.randn(40, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    codes = build_codes(vectors, 4, seed=0)  # l = 3
    head = GIF(8, codes, vectors, head_dim=6, joint=True, recode_every=1.0, seed=0)
    before = [t.weight.detach().clone() for t in head.tokens]
    assert head.recode() == 0 and torch.equal(head.codes.long(), codes)

    a = 0
    b = next(i for i in range(1, 40) if torch.equal(codes[i, :2], codes[a, :2]))
    stale = codes.clone()
    stale[[a, b], 2] = codes[[b, a], 2]
    head = GIF(8, stale, vectors, head_dim=6, joint=True, recode_every=1.0, seed=0)
    before = [t.weight.detach().clone() for t in head.tokens]
    head.set_progress(0.1, epoch=0.5)
    assert int(head.recodes) == 0 and torch.equal(head.codes.long(), stale)
    head.set_progress(0.3, epoch=1.2)
    assert int(head.recodes) == 1 and torch.equal(head.codes.long(), codes)
    swapped = {int(codes[a, 2]), int(codes[b, 2])}
    for j, token in enumerate(head.tokens):
        for c in range(4):
            same = torch.equal(token.weight[c], before[j][c])
            assert same == (j != 2 or c not in swapped)


def test_config_errors_name_the_file(tmp_path):
    path = tmp_path / "codes.safetensors"
    save_codes(path, Codebook(build_codes(torch.randn(8, 16), 3), torch.randn(8, 16), 3))
    with pytest.raises(ConfigError, match="missing.safetensors not found"):
        build_head("gif", 16, 8, codes=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ConfigError, match=r"codes.safetensors: codes for 8 identities, the data has 9"):
        build_head("gif", 16, 9, codes=str(path))
    with pytest.raises(ConfigError, match="code vectors are 16-d, the backbone embeds 32-d"):
        build_head("gif", 32, 8, codes=str(path))
    with pytest.raises(ConfigError, match="head.margin"):
        build_head("gif", 16, 8, codes=str(path), margin="sphereface")
    with pytest.raises(ConfigError, match="codes"):
        build_head("gif", 16, 8)
    assert build_head("gif", 16, 8, codes=str(path), head_dim=4).length == 2


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_with_fixed_and_joint_codes(tiny_config, tiny_data, tmp_path):
    path = tmp_path / "codes.safetensors"
    vectors = F.normalize(torch.randn(8, 16), dim=1)
    save_codes(path, Codebook(build_codes(vectors, 3), vectors, 3, {"seed": "0"}))
    head = {"name": "gif", "codes": str(path), "head_dim": 16, "s": 16.0, "m": 0.2}
    fixed = Trainer(tiny_config(head=head, train={"run_name": "gif"})).fit()
    lines = [r for r in _metrics(Path(fixed["run_dir"])) if "event" not in r]
    assert fixed["steps"] == 6 and all("code_acc" in r and "tok1_acc" in r for r in lines)
    assert fixed["eval"]["val"]["num_pairs"] == 20

    joint = Trainer(tiny_config(head={**head, "joint": True, "recode_every": 1.0},
                                train={"run_name": "joint", "max_steps": 8}))
    joint.fit()
    assert int(joint.head.recodes) == 1 and joint.head.code_vectors.requires_grad
    assert not torch.allclose(F.normalize(joint.head.code_vectors.detach(), dim=1), vectors)

    out = tmp_path / "from_run.safetensors"
    tokenize_dataset(tiny_data, fixed["run_dir"], v=3, out=out, epochs=2, progress=False, device="cpu")
    assert load_codes(out).code_vectors.shape == (8, 16)
