"""GIF (Ebrahimi et al., CVPR 2025): identity tokenization instead of an N-way classifier.

Each identity y has a fixed code c^y of l tokens < v and a unit code vector h_y (from `faceforge tokenize`).
Position j has a projection followed by a margin softmax over v centres; the loss per sample is
Σ_j CE_j + γ·½(zᵀh_y − 1)², z the normalised embedding. The head's parameters are l·(head_dim·D + v·head_dim),
whatever the number of identities. In joint mode the code vectors train too, kept apart by the uniformity
loss, and `recode_every` epochs the codes are re-derived from them. A training step computes on a detached copy of
just the rows it uses (the batch's identities and the uniformity subset), so the [N, D] code vectors get no dense
gradient and the step updates only those rows (sampled_blocks, engine/sampled_rows.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from faceforge import distributed
from faceforge.errors import ConfigError
from faceforge.heads.base import Head, HeadOutput
from faceforge.heads.centres import SampledBlock
from faceforge.heads.margin import ArcFace, CosFace
from faceforge.runtime import at_least_fp32, fp32_only
from faceforge.registry import HEADS
from faceforge.tokenizer.codebook import Codebook, load_codes
from faceforge.tokenizer.kmeans import build_codes
from faceforge.tokenizer.spreading import gaussian_potential

MARGINS = {"arcface": ArcFace, "cosface": CosFace}
_RECODE_ROWS = 1 << 16  # identities projected at once when re-initialising token centres


class GIF(Head):
    """l parallel token heads plus the pull-only regression towards the identity's code vector.

    `codes` is a codes file (`head: {name: gif, codes: PATH}`; it must cover exactly `num_classes` identities
    and carries v and the seed) or a tensor [N, l] of integers < v, with `code_vectors` [N, D] or None (then the
    γ term is left out, as when only the codes fit in memory). Codes are stored as uint8 when v <= 256.
    """

    def __init__(
        self,
        embedding_size: int,
        codes: str | Path | torch.Tensor,
        code_vectors: torch.Tensor | None = None,
        head_dim: int = 512,
        margin: str = "cosface",
        s: float = 64.0,
        m: float = 0.4,
        gamma: float = 1.0,
        margin_warmup: float = 0.0,
        joint: bool = False,
        recode_every: float = 0.0,
        uniformity: float = 1.0,
        t: float = 2.0,
        subset: int = 2048,
        v: int | None = None,
        seed: int = 0,
        num_classes: int | None = None,
    ) -> None:
        if isinstance(codes, (str, Path)):
            book = _read_codes(codes, num_classes, embedding_size)
            codes, code_vectors, v, seed = book.codes, book.code_vectors, book.v, book.seed
        if codes.ndim != 2 or codes.shape[1] < 1 or codes.is_floating_point():
            raise ConfigError(f"GIF codes must be an integer [N, l] matrix, got {codes.dtype} {list(codes.shape)}")
        if num_classes is not None and num_classes != len(codes):
            raise ConfigError(f"GIF codes cover {len(codes)} identities, the data has {num_classes}")
        super().__init__(embedding_size, codes.shape[0])
        self.v = int(codes.max()) + 1 if v is None else int(v)
        if self.v < 2:
            raise ConfigError(f"GIF vocabulary size v must be >= 2, got {self.v}")
        if int(codes.min()) < 0 or int(codes.max()) >= self.v:
            raise ConfigError(f"GIF codes must lie in [0, {self.v}), found {int(codes.min())}..{int(codes.max())}")
        if margin not in MARGINS:
            raise ConfigError(f"head.margin must be one of {', '.join(MARGINS)}, got {margin!r}")
        if code_vectors is not None and tuple(code_vectors.shape) != (self.num_classes, embedding_size):
            raise ConfigError(
                f"GIF code vectors are {list(code_vectors.shape)}, expected [{self.num_classes}, {embedding_size}] "
                "(the code vectors must have the backbone's embedding size)"
            )
        if joint and code_vectors is None:
            raise ConfigError("head.joint needs code vectors to train")
        if recode_every < 0 or (recode_every and not joint):
            raise ConfigError("head.recode_every is a positive number of epochs, and only for joint: true")
        self.length = codes.shape[1]
        self.gamma, self.uniformity, self.t, self.subset = float(gamma), float(uniformity), float(t), int(subset)
        self.joint, self.recode_every, self.seed = bool(joint), float(recode_every), int(seed)
        # Joint mode rewrites the codes in place, so it must not share the caller's tensor.
        self.register_buffer("codes", codes.to(torch.uint8 if self.v <= 256 else torch.int32, copy=self.joint))
        vectors = None if code_vectors is None else F.normalize(code_vectors.detach().float(), dim=1)
        if self.joint:
            self.code_vectors = nn.Parameter(vectors)
        else:
            self.register_buffer("code_vectors", vectors)
        self.register_buffer("recodes", torch.zeros((), dtype=torch.long))
        self.project = nn.ModuleList(nn.Linear(embedding_size, head_dim, bias=False) for _ in range(self.length))
        self.tokens = nn.ModuleList(
            MARGINS[margin](head_dim, self.v, s=s, m=m, margin_warmup=margin_warmup) for _ in range(self.length)
        )
        self._sampled: SampledBlock | None = None

    def no_weight_decay(self) -> list[str]:
        return ["code_vectors"] if self.joint else []

    def sampled_blocks(self) -> dict[str, SampledBlock]:
        return {} if self._sampled is None else {"code_vectors": self._sampled}

    def set_progress(self, progress: float, epoch: float = 0.0) -> None:
        super().set_progress(progress, epoch)
        for head in self.tokens:
            head.set_progress(progress, epoch)
        if self.recode_every and self.training and int(epoch // self.recode_every) > int(self.recodes):
            self.recode()
            self.recodes.fill_(int(epoch // self.recode_every))

    def token_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """s·cos θ [l, B, v] of every position's centres, without margin: what decoding and accuracy read."""
        with fp32_only(embeddings.device):
            z = F.normalize(at_least_fp32(embeddings), dim=1)
            return torch.stack([head.s * head.cosines(proj(z)) for proj, head in zip(self.project, self.tokens)])

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        self.check_input(embeddings, labels)
        metrics: dict[str, torch.Tensor] = {}
        with fp32_only(embeddings.device):
            z = F.normalize(at_least_fp32(embeddings), dim=1)
            target = self.codes[labels].long()
            token_loss = z.new_zeros(len(z))
            hits = []
            for j, (proj, head) in enumerate(zip(self.project, self.tokens)):
                cos = head.cosines(proj(z))
                logits = head.s * head.margined_cosines(cos, target[:, j])
                token_loss = token_loss + F.cross_entropy(logits, target[:, j], reduction="none")
                hits.append(cos.detach().argmax(dim=1) == target[:, j])
            hit = torch.stack(hits)
            metrics.update({f"tok{j}_acc": a for j, a in enumerate(hit.float().mean(dim=1))})
            metrics["code_acc"] = hit.all(dim=0).float().mean()
            per_sample = token_loss
            metrics["token_ce"] = token_loss.detach().mean()
            vectors, rows = self._step_vectors(labels)
            if vectors is not None and self.gamma > 0:
                h = vectors[rows]
                if self.joint:
                    # Each vector takes its own identity's pull summed over the batch (as the authors' prior
                    # code reduces it), so it moves at the optimizer's lr whatever the batch size. Under torchrun
                    # this replicated head sees its rank's share of the global batch, and the step divides its
                    # loss by the world size: the global batch's size keeps the sum.
                    h = h.detach() + len(labels) * distributed.world_size() * (h - h.detach())
                h = F.normalize(at_least_fp32(h), dim=1)
                pull = 0.5 * ((z * h).sum(dim=1) - 1.0).square()
                per_sample = per_sample + self.gamma * pull
                metrics["pull"] = pull.detach().mean()
            if self.joint and self.uniformity > 0 and self.training:
                potential = self._potential(vectors)
                # Added to every sample so that losses reweighted per sample (SDE) keep it too.
                per_sample = per_sample + self.uniformity * potential
                metrics["uniformity"] = potential.detach()
        return HeadOutput(loss=per_sample.mean(), per_sample_loss=per_sample, metrics=metrics)

    def _step_vectors(self, labels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """This step's code vectors and each label's row in them: all of them, or in joint training a detached leaf
        block of the rows the loss uses, the batch's identities plus (uniformity) `subset` random others drawn from
        the CPU RNG (resumable), sorted. The block is remembered for sampled_blocks: `code_vectors` itself then
        gets no gradient, so the optimizer skips it and the step updates only those rows."""
        self._sampled = None  # before gathering: the last step's block is freed first
        if not (self.joint and self.training and (self.gamma > 0 or self.uniformity > 0)):
            return self.code_vectors, labels
        ids = labels
        if self.uniformity > 0:
            ids = torch.cat([labels, torch.randint(self.num_classes, (self.subset,)).to(labels.device)])
        index = torch.unique(ids)
        block = self.code_vectors.detach().index_select(0, index).requires_grad_()
        self._sampled = SampledBlock(index, block)
        return block, torch.searchsorted(index, labels)

    def _potential(self, block: torch.Tensor) -> torch.Tensor:
        """Gaussian potential of this step's block of code vectors (_step_vectors: the batch's and the subset's)."""
        if len(block) < 2:
            return block.sum() * 0.0
        return gaussian_potential(F.normalize(at_least_fp32(block), dim=1), self.t)

    @torch.no_grad()
    def recode(self) -> int:
        """Re-derive the codes from the current code vectors; a token centre whose set of identities changed is
        re-initialised at the normalised mean projection of its new identities' vectors. Returns how many."""
        h = F.normalize(self.code_vectors.detach().float(), dim=1)
        new = build_codes(h, self.v, self.seed, self.length).to(self.codes.device)
        old = self.codes.long()
        reset = 0
        for j, (proj, head) in enumerate(zip(self.project, self.tokens)):
            moved = old[:, j] != new[:, j]
            changed = torch.zeros(self.v, dtype=torch.bool, device=new.device)
            changed[old[moved, j]] = True
            changed[new[moved, j]] = True
            if not changed.any():
                continue
            sums = torch.zeros(self.v, head.weight.shape[1], device=h.device)
            for start in range(0, len(h), _RECODE_ROWS):
                rows = slice(start, start + _RECODE_ROWS)
                sums.index_add_(0, new[rows, j], F.normalize(proj(h[rows]), dim=1))
            has_members = sums.norm(dim=1) > 0
            fresh = changed & has_members
            head.weight[fresh] = F.normalize(sums[fresh], dim=1).to(head.weight.dtype)
            reset += int(changed.sum())
        self.codes.copy_(new.to(self.codes.dtype))
        return reset

    def extra_repr(self) -> str:
        return f"identities={self.num_classes}, v={self.v}, l={self.length}, gamma={self.gamma}, joint={self.joint}"


def _read_codes(path: str | Path, num_classes: int | None, embedding_size: int) -> Codebook:
    """A codes file checked against the data's identity count and the backbone's embedding size."""
    book = load_codes(path)
    if num_classes is not None and len(book.codes) != num_classes:
        raise ConfigError(f"head.codes={path}: codes for {len(book.codes)} identities, the data has {num_classes}")
    if book.code_vectors.shape[1] != embedding_size:
        raise ConfigError(
            f"head.codes={path}: code vectors are {book.code_vectors.shape[1]}-d, the backbone embeds "
            f"{embedding_size}-d (tokenize with a matching --dim or source)"
        )
    return book


HEADS.register("gif")(GIF)
