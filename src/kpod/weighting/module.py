"""The rationale token weighting module (paper section 3.3, Eqs. 2-3).

``e = Att(Emb(r))`` then ``w_j = sigmoid(f_w(e_j))``:

* ``Emb`` is a frozen copy of the student's pretrained input embedding layer (Appendix A: "for
  the consistency of tokenizer"), so weights are per student token;
* ``Att`` is one multi-head self-attention layer with a residual connection and layer norm
  (freshly initialised; the paper does not say). It has no positional encoding: whether a token is
  a keypoint is mostly lexical plus its context, and the answer predictor sees positions anyway;
* ``f_w`` is a two-layer MLP (hidden size ``mlp_hidden``, GELU). Its output bias starts at +1
  (``w`` about 0.73), so training begins from "mostly kept" and learns what to drop.

The module also owns the learned mask embedding that replaces masked tokens (Eq. 4).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from kpod.weighting.maths import budget_weights


@dataclass(frozen=True)
class WeighterShape:
    vocab_size: int
    hidden_size: int
    num_heads: int = 4
    mlp_hidden: int = 256
    dropout: float = 0.0


class KeypointWeighter(nn.Module):
    """Maps rationale token ids to keep-probabilities ``w`` (Eqs. 2-3)."""

    def __init__(self, shape: WeighterShape, embedding_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        if shape.hidden_size % shape.num_heads:
            raise ValueError(f"hidden size {shape.hidden_size} is not divisible by {shape.num_heads} heads")
        self.shape = shape
        self.embed = nn.Embedding(shape.vocab_size, shape.hidden_size)
        if embedding_weight is not None:
            self.embed.weight.data.copy_(embedding_weight.detach().float())
        self.embed.weight.requires_grad_(False)
        self.attention = nn.MultiheadAttention(
            shape.hidden_size, shape.num_heads, dropout=shape.dropout, batch_first=True
        )
        self.norm = nn.LayerNorm(shape.hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(shape.hidden_size, shape.mlp_hidden), nn.GELU(), nn.Linear(shape.mlp_hidden, 1)
        )
        nn.init.constant_(self.mlp[2].bias, 1.0)
        # A neutral starting point for the mask embedding: the mean token embedding.
        self.mask_embedding = nn.Parameter(self.embed.weight.data.mean(dim=0).clone())

    def embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``Emb(r)``: the student's frozen input embeddings."""
        return self.embed(input_ids)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The keep logits s (``w = sigmoid(s)``), ``[batch, length]``, in fp32 whatever the
        autocast: bf16 quantises w near 1 in steps of about 0.004, the size of the contrast the
        weights are meant to carry."""
        e = self.embeddings(input_ids)
        attended, _ = self.attention(e, e, e, key_padding_mask=attention_mask == 0, need_weights=False)
        h = self.norm(e + attended)
        with torch.autocast(device_type=h.device.type, enabled=False):
            return self.mlp(h.float()).squeeze(-1)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_keep: float | None = None
    ) -> torch.Tensor:
        """``w`` of shape ``[batch, length]`` in fp32; padding positions are 0. With ``target_keep``
        each rationale's weights are shifted to that mean (:func:`kpod.weighting.maths.budget_weights`)."""
        s = self.logits(input_ids, attention_mask)
        if target_keep is not None:
            return budget_weights(s, attention_mask.float(), target_keep)
        w = torch.sigmoid(s)
        return w * attention_mask.to(w.dtype)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen embedding (which is the student's and is saved with it)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("embed.")}

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        from kpod.io import write_json

        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / ".weighter.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in self.trainable_state().items()}, str(tmp))
        tmp.replace(directory / "weighter.safetensors")
        write_json(directory / "weighter.json", asdict(self.shape))

    @classmethod
    def load(cls, directory: Path, embedding_weight: torch.Tensor) -> KeypointWeighter:
        import json

        from safetensors.torch import load_file

        shape = WeighterShape(**json.loads((directory / "weighter.json").read_text()))
        module = cls(shape, embedding_weight)
        missing, unexpected = module.load_state_dict(
            load_file(str(directory / "weighter.safetensors")), strict=False
        )
        if unexpected or any(not k.startswith("embed.") for k in missing):
            raise ValueError(
                f"checkpoint does not match the module: missing {missing}, unexpected {unexpected}"
            )
        return module
