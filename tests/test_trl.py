"""kpod.trl: per-token weights in TRL's SFTTrainer give our loop's loss."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("trl")


def test_weighted_sft_trainer_trains_with_our_loss(tiny_causal, tmp_path) -> None:
    import datasets
    from trl import SFTConfig

    from kpod.data.synthetic import arithmetic_examples
    from kpod.distill.batches import collate
    from kpod.distill.loss import count_targets, sequence_nll
    from kpod.distill.stages import build_stage_example
    from kpod.models import load_model
    from kpod.trl import WEIGHTS_COLUMN, WeightedSFTTrainer, weighted_rows
    from kpod.weighting.weights import TokenWeights, rationale_key

    loaded = load_model(str(tiny_causal))
    tok = loaded.tokenizer
    examples = arithmetic_examples(4, seed=3)
    weights = {}
    for e in examples:  # weights that differ at every token (a ramp), so a misalignment shows
        enc = tok(e.rationale, add_special_tokens=False, return_offsets_mapping=True)
        n = len(enc["input_ids"])
        weights[rationale_key(e)] = TokenWeights(
            rationale_key(e), e.qid, enc["offset_mapping"], [0.1 + 0.9 * i / max(1, n - 1) for i in range(n)]
        )
    rows = weighted_rows(examples, tok, weights)
    assert len(set(map(tuple, (r[WEIGHTS_COLUMN] for r in rows)))) == 4
    # Our loop's loss on the same four examples at the initial weights.
    built = [build_stage_example(e, 0, tok, weights_row=weights[rationale_key(e)]) for e in examples]
    batch = collate(built, tok.pad_token_id, "causal")
    with torch.no_grad():
        ours = sequence_nll(loaded.model, batch, "causal", 0, 0) / count_targets(batch["labels"], causal=True)
    # The weights matter: with weight 1 everywhere the first step's loss would have been another.
    unit = collate(
        [dataclasses.replace(b, weights=[1.0] * len(b.labels)) for b in built], tok.pad_token_id, "causal"
    )
    with torch.no_grad():
        plain = sequence_nll(loaded.model, unit, "causal", 0, 0) / count_targets(unit["labels"], causal=True)
    assert abs(plain.item() - ours.item()) > 0.05 * ours.item()
    config = SFTConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        max_length=None,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = WeightedSFTTrainer(
        model=loaded.model, args=config, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok
    )
    first = next(iter(trainer.get_train_dataloader()))
    assert WEIGHTS_COLUMN in first and first[WEIGHTS_COLUMN].shape == first["input_ids"].shape
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2
    assert losses[0] == pytest.approx(ours.item(), rel=1e-3)  # the first step: our loss, same weights
