"""Closed-set identification: GIF decoding (beam search over the valid codes) and brute-force cosine search."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from faceforge.config import load_config
from faceforge.errors import ConfigError
from faceforge.fileio import load_into, load_weights, resolve_weights, split_state
from faceforge.heads.gif import GIF
from faceforge.models import run_config
from faceforge.tokenizer.codebook import code_keys

_SCORE_ELEMENTS = 1 << 25  # bounds one [queries, centres] block of brute-force scores (128 MB in fp32)


class CodeTrie:
    """The valid codes as sorted base-v keys: a prefix of depth j is valid iff some key falls in its range,
    found by binary search, so no tree of N nodes has to be built."""

    def __init__(self, codes: torch.Tensor, v: int) -> None:
        self.v, self.length = v, codes.shape[1]
        self.keys, self.identity = torch.sort(code_keys(codes.long(), v))

    def valid(self, prefixes: torch.Tensor, depth: int) -> torch.Tensor:
        """Whether each prefix key (tokens 0..depth-1 as a base-v integer) starts at least one valid code."""
        span = self.v ** (self.length - depth)
        low = torch.searchsorted(self.keys, (prefixes * span).reshape(-1))
        high = torch.searchsorted(self.keys, ((prefixes + 1) * span).reshape(-1))
        return (high > low).view(prefixes.shape)

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """The identity of each full code key (which must be valid)."""
        return self.identity[torch.searchsorted(self.keys, keys.contiguous())]


@torch.no_grad()
def gif_decode(
    head: GIF, embeddings: torch.Tensor, beam: int = 8, trie: CodeTrie | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Identity [B] and log-probability [B] of the most likely valid code for each embedding.

    Beam search over positions: each step scores beam·v extensions with the position's token log-softmax and
    keeps the best `beam` valid prefixes, so the work per query is O(l·v·beam) scores plus binary searches in
    the sorted codes; it does not grow with the number of identities the way a scan of N centres does.
    """
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    trie = trie or CodeTrie(head.codes.to(embeddings.device), head.v)
    log_probs = F.log_softmax(head.token_logits(embeddings), dim=2)  # [l, B, v]
    tokens = torch.arange(head.v, device=embeddings.device)
    prefixes = torch.zeros(len(embeddings), 1, dtype=torch.long, device=embeddings.device)
    scores = torch.zeros(len(embeddings), 1, device=embeddings.device)
    for j in range(head.length):
        candidates = prefixes[:, :, None] * head.v + tokens  # [B, K, v]
        total = scores[:, :, None] + log_probs[j][:, None, :]
        total = total.masked_fill(~trie.valid(candidates, j + 1), float("-inf")).flatten(1)
        scores, best = total.topk(min(beam, total.shape[1]), dim=1)
        prefixes = candidates.flatten(1).gather(1, best)
    return trie.lookup(prefixes[:, 0]), scores[:, 0]


@torch.no_grad()
def brute_force_identify(embeddings: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Identity [B] and cosine [B] of the nearest of N class centres [N, D], a block of centres at a time."""
    x = F.normalize(embeddings.float(), dim=1)
    best = torch.full((len(x),), float("-inf"), device=x.device)
    ids = torch.zeros(len(x), dtype=torch.long, device=x.device)
    step = max(1, _SCORE_ELEMENTS // max(len(x), 1))
    for start in range(0, len(centres), step):
        block = F.normalize(centres[start : start + step].to(x.device).float(), dim=1)
        score, index = (x @ block.t()).max(dim=1)
        better = score > best
        best = torch.where(better, score, best)
        ids = torch.where(better, index + start, ids)
    return ids, best


def load_gif_head(weights: str | Path, s: float | None = None) -> GIF:
    """The GIF head saved in a checkpoint (run folder, .safetensors or torch file): codes, code vectors and token
    heads from its head.* tensors, margin and scale from the run's config.yaml when there is one (`s` overrides)."""
    path = resolve_weights(weights)
    state = split_state(load_weights(path), "head")
    if "codes" not in state or "project.0.weight" not in state:
        raise ConfigError(f"{path} holds no GIF head (no head.codes / head.project.0.weight)")
    params = {}
    cfg_path = run_config(path)
    if cfg_path is not None:
        head_cfg = load_config(cfg_path).head
        params = {k: head_cfg[k] for k in ("margin", "s", "m", "gamma") if k in head_cfg}
    if s is not None:
        params["s"] = s
    head_dim, dim = state["project.0.weight"].shape
    head = GIF(dim, state["codes"].long(), state.get("code_vectors"), head_dim=head_dim,
               v=state["tokens.0.weight"].shape[0], **params)
    load_into(head, state, str(path))
    return head
