"""Per-token loss weights in TRL's ``SFTTrainer``, with kpod's loss from hidden states.

TRL 1.x deprecates ``compute_loss_func`` ("subclass SFTTrainer and override compute_loss"; its
function receives the model's outputs, so the full logits are computed anyway), so the weighted
loss is offered the way TRL asks: :class:`WeightedSFTTrainer` overrides ``compute_loss`` and reads
a ``token_weights`` column beside ``input_ids`` and ``labels``; the loss is Eq. 15's
``sum_j w_j * NLL_j / N`` (N: the labelled tokens of the whole accumulated batch, as TRL and our
loop count them), computed from the labelled positions' hidden states in chunks
(:func:`kpod.chunked_loss.weighted_linear_nll`). Weights of 1 give TRL's own loss.

    from kpod.trl import WeightedSFTTrainer, weighted_rows
    rows = weighted_rows(examples, tokenizer, weights)          # KPOD's weights.jsonl rows, or None
    trainer = WeightedSFTTrainer(model=model, args=SFTConfig(...), train_dataset=Dataset.from_list(rows),
                                 processing_class=tokenizer)
    trainer.train()

Rows are pre-tokenized (``input_ids``, ``labels`` with -100 on the prompt, ``token_weights``), so
the weights line up with the tokens; SFTTrainer then skips its own tokenization. Packing and
padding-free batches are not supported (they re-cut the sequences the weights are aligned to).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from trl import SFTTrainer

from kpod.chunked_loss import head_bypass_supported, kept_logit_buffers
from kpod.data.schema import Example
from kpod.distill.loss import IGNORE, sequence_nll
from kpod.distill.stages import build_stage_example
from kpod.prompt import PromptFormat
from kpod.weighting.weights import TokenWeights, rationale_key

WEIGHTS_COLUMN = "token_weights"


def weighted_rows(
    examples: Sequence[Example],
    tokenizer: Any,
    weights: Mapping[str, TokenWeights] | None = None,
    fmt: PromptFormat | None = None,
) -> list[dict[str, list]]:
    """Dataset rows for :class:`WeightedSFTTrainer`: each example rendered as kpod renders it,
    the prompt masked out of ``labels``, the rationale tokens weighted by ``weights`` (the rows
    of ``weights.jsonl`` by rationale key; ``None``: weight 1), the answer tokens weight 1."""
    rows = []
    for example in examples:
        row = weights.get(rationale_key(example)) if weights is not None else None
        built = build_stage_example(example, 0, tokenizer, weights_row=row, fmt=fmt)
        rows.append({"input_ids": built.input_ids, "labels": built.labels, WEIGHTS_COLUMN: built.weights})
    return rows


class _WeightsCollator:
    """SFTTrainer's collator with the ``token_weights`` column padded alongside (with 0)."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        weights = [torch.tensor(f[WEIGHTS_COLUMN], dtype=torch.float32) for f in features]
        batch = self.base([{k: v for k, v in f.items() if k != WEIGHTS_COLUMN} for f in features])
        width = batch["input_ids"].shape[1]
        padded = torch.zeros((len(weights), width), dtype=torch.float32)
        for i, w in enumerate(weights):
            padded[i, : min(len(w), width)] = w[:width]
        batch[WEIGHTS_COLUMN] = padded
        return batch


class WeightedSFTTrainer(SFTTrainer):
    """``SFTTrainer`` whose loss weighs each token by the ``token_weights`` column (module
    docstring). ``loss_chunk``: positions per chunk of the output projection."""

    def __init__(self, *args: Any, loss_chunk: int = 512, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if getattr(self.args, "packing", False) or getattr(self.args, "padding_free", False):
            from kpod.errors import ConfigError

            raise ConfigError("WeightedSFTTrainer: packing and padding_free re-cut the weighted sequences")
        self.data_collator = _WeightsCollator(self.data_collator)
        self.loss_chunk = loss_chunk

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``SFTTrainer.train`` with the loss's logit buffers kept from step to step on a CPU
        (:func:`kpod.chunked_loss.kept_logit_buffers`), as kpod's own loop keeps them."""
        with kept_logit_buffers():
            return super().train(*args, **kwargs)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if WEIGHTS_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, WEIGHTS_COLUMN]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D102
        labels = inputs["labels"]
        batch = {
            "input_ids": inputs["input_ids"],
            "attention_mask": inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])),
            "labels": labels,
            "weights": inputs[WEIGHTS_COLUMN].to(labels.device),
        }
        total = sequence_nll(
            model, batch, "causal", 0, 0, from_hidden=head_bypass_supported(model), chunk=self.loss_chunk
        )
        if num_items_in_batch is None:  # a per-batch mean: the Trainer divides by the accumulation
            self.loss_is_scaled_for_ga = False
            loss = total / (labels[:, 1:] != IGNORE).sum().clamp(min=1)
        else:  # normalised over the whole accumulated batch (and every process) already
            self.loss_is_scaled_for_ga = True
            loss = total / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss
