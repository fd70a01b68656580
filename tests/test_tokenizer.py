"""GIF tokenizer: unique in-range codes, shared prefixes for similar prototypes, spreading, codes file, pipeline."""

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from faceforge.cli import main
from faceforge.data.record_dataset import RecordDataset
from faceforge.errors import ConfigError, DataError
from faceforge.tokenizer import (
    Codebook, build_codes, code_length, gaussian_potential, load_codes, neighbour_overlap, save_codes, spread,
)
from faceforge.engine.tokenize import tokenize_dataset
from faceforge.models import load_model
from faceforge.engine.prototypes import mean_embeddings, model_encoder


def _assert_valid(codes, n, v):
    assert codes.dtype == torch.long and codes.shape == (n, code_length(n, v))
    assert int(codes.min()) >= 0 and int(codes.max()) < v
    assert len({tuple(row) for row in codes.tolist()}) == n


def _clustered(groups, per_group, dim, spread_within, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(groups, dim, generator=g), dim=1)
    points = centres[:, None, :] + spread_within * torch.randn(groups, per_group, dim, generator=g)
    return points.reshape(-1, dim), torch.arange(groups).repeat_interleave(per_group)


@pytest.mark.parametrize("n, v", [(1, 2), (2, 2), (3, 2), (7, 7), (8, 7), (50, 4), (257, 16), (777, 5)])
def test_codes_unique_and_in_range_for_random_prototypes(n, v):
    codes = build_codes(torch.randn(n, 24, generator=torch.Generator().manual_seed(n)), v)
    _assert_valid(codes, n, v)


def test_codes_unique_for_clustered_and_duplicate_prototypes():
    points, _ = _clustered(5, 200, 16, 0.01)  # clusters far bigger than one subtree at the second level
    _assert_valid(build_codes(points, 4), 1000, 4)
    _assert_valid(build_codes(torch.ones(300, 8), 3), 300, 3)  # all identical: the caps alone separate them


def test_explicit_length_and_bad_input():
    codes = build_codes(torch.randn(30, 8), 4, length=5)
    assert codes.shape == (30, 5) and len({tuple(r) for r in codes.tolist()}) == 30
    with pytest.raises(ConfigError, match="fewer than 30 identities"):
        build_codes(torch.randn(30, 8), 4, length=2)
    with pytest.raises(ConfigError, match="v must be an integer >= 2"):
        build_codes(torch.randn(30, 8), 1)


def test_codes_are_seeded():
    x = torch.randn(500, 16)
    assert torch.equal(build_codes(x, 8, seed=3), build_codes(x, 8, seed=3))


def test_similar_prototypes_share_prefixes():
    points, group = _clustered(16, 16, 32, 0.02)
    codes = build_codes(points, 16)  # l = 2: each tight group of 16 fills exactly one first-level subtree
    for g in range(16):
        assert len(set(codes[group == g, 0].tolist())) == 1
    assert len(set(codes[:, 0].tolist())) == 16

    base = F.normalize(torch.randn(400, 32, generator=torch.Generator().manual_seed(1)), dim=1)
    twins = torch.cat([base, base + 1e-3 * torch.randn(400, 32, generator=torch.Generator().manual_seed(2))])
    codes = build_codes(twins, 8)  # l = 4: twins must part at the last token, and only there
    prefix = codes[:, :3]
    shared = (prefix[:400] == prefix[400:]).all(dim=1).float().mean().item()
    strangers = (prefix[:400] == prefix[400:].roll(1, 0)).all(dim=1).float().mean().item()
    assert shared > 0.95 and strangers < 0.05


def test_gaussian_potential_matches_direct_formula_and_gradient():
    h = F.normalize(torch.randn(7, 5, dtype=torch.float64), dim=1).requires_grad_()
    rows = h.detach().numpy()
    pairs = [(i, j) for i in range(7) for j in range(7) if i != j]
    direct = np.log(np.mean([np.exp(-2.0 * ((rows[i] - rows[j]) ** 2).sum()) for i, j in pairs]))
    assert gaussian_potential(h, 2.0).item() == pytest.approx(direct, rel=1e-12)
    assert torch.autograd.gradcheck(lambda x: gaussian_potential(F.normalize(x, dim=1), 2.0), (h,))


def test_spread_lowers_potential_and_stays_on_sphere():
    x, _ = _clustered(4, 64, 8, 0.05)
    before = gaussian_potential(F.normalize(x, dim=1)).item()
    out = spread(x, epochs=30, subset=64, seed=0)
    assert torch.allclose(out.norm(dim=1), torch.ones(len(out)), atol=1e-5)
    assert gaussian_potential(out).item() < before - 0.1
    assert torch.allclose(spread(x, epochs=0), F.normalize(x, dim=1))
    assert neighbour_overlap(x, x) == 1.0


def test_codes_file_round_trip_and_errors(tmp_path):
    codes = build_codes(torch.randn(40, 6), 4)
    path = tmp_path / "codes.safetensors"
    save_codes(path, Codebook(codes, torch.randn(40, 6), 4, {"seed": "5", "source": "random"}))
    book = load_codes(path)
    assert torch.equal(book.codes, codes) and book.v == 4 and book.seed == 5 and book.meta["l"] == str(codes.shape[1])
    with pytest.raises(ConfigError, match="not found"):
        load_codes(tmp_path / "missing.safetensors")
    twin = codes.clone()
    twin[1] = twin[0]
    save_codes(tmp_path / "dup.safetensors", Codebook(twin, torch.randn(40, 6), 4))
    with pytest.raises(DataError, match="dup.safetensors: 1 of 40 identities share a code"):
        load_codes(tmp_path / "dup.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="junk.safetensors"):
        load_codes(tmp_path / "junk.safetensors")


def test_tokenize_random_source(tiny_data, tmp_path):
    out = tmp_path / "codes.safetensors"
    summary = tokenize_dataset(tiny_data, "random", v=3, out=out, epochs=5, dim=16, progress=False)
    assert summary["identities"] == 8 and summary["l"] == 2 and summary["potential_after"] <= summary["potential_before"]
    book = load_codes(out)
    assert book.codes.shape == (8, 2) and book.code_vectors.shape == (8, 16)
    assert book.meta["source"] == "random" and book.meta["epochs"] == "5"
    with pytest.raises(ConfigError, match="model not found: model.pt"):
        tokenize_dataset(tiny_data, "model.pt", v=3, out=out, progress=False)


def test_tokenize_command_writes_codes_and_reports_bad_input(tiny_data, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    common = ["tokenize", "--data", str(tiny_data), "--source", "random", "--dim", "16", "--epochs", "2",
              "--no-progress", "--device", "cpu"]
    assert main(common + ["--v", "3", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["l"] == 2 and load_codes(out).codes.shape == (8, 2)
    assert main(common + ["--v", "1", "--out", str(tmp_path / "bad.safetensors")]) != 0
    assert "--v must be >= 2" in capsys.readouterr().err and not (tmp_path / "bad.safetensors").exists()


def _mean_colour(images):
    return torch.from_numpy(images.reshape(len(images), -1, 3).mean(axis=1).astype(np.float32) - 127.5)


def test_mean_embeddings_average_each_identity(tiny_data):
    ds = RecordDataset(tiny_data)
    protos, missing = mean_embeddings(ds, 9, _mean_colour, batch_size=5)
    assert missing == 1 and protos.shape == (9, 3)
    for c in range(8):
        images = np.stack([ds[i][0] for i in np.flatnonzero(ds.labels == c)])
        expected = F.normalize(F.normalize(_mean_colour(images), dim=1).mean(0), dim=0)
        assert torch.allclose(protos[c], expected, atol=1e-5)
    two, _ = mean_embeddings(ds, 8, _mean_colour, per_identity=2)
    assert not torch.allclose(two, protos[:8])


def test_onnx_source_resizes_and_normalises(tiny_data, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(12, 6))
    path = tmp_path / "encoder.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), str(path), input_names=["pixels"],
                          dynamic_axes={"pixels": {0: "batch"}}, dynamo=False)
    assert ort.InferenceSession(str(path)).get_inputs()[0].shape[2:] == [64, 64]
    images = np.stack([RecordDataset(tiny_data)[i][0] for i in range(4)])
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        expected = model(x).numpy()
    encoder = model_encoder(load_model(path, pixel_mean=mean, pixel_std=std).module, torch.device("cpu"), 4)
    np.testing.assert_allclose(encoder(images), expected, rtol=1e-4, atol=1e-5)
