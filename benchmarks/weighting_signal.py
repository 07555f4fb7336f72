"""Diagnostic: how well does the straight-through answer-loss gradient dL_p/dkeep_j tell keypoint
tokens from filler, before any training? (ROC-AUC of -dL_p/dkeep against ground-truth keypoints.)

    .venv/bin/python benchmarks/weighting_signal.py --n 24

Writes benchmarks/results/weighting-signal.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, provenance  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=24)
    args = parser.parse_args()
    started = provenance()
    import torch
    from sklearn.metrics import roc_auc_score

    from kpod.data.synthetic import arithmetic_examples
    from kpod.weighting.evaluate import keypoint_labels
    from kpod.weighting.maths import apply_mask
    from kpod.weighting.train import AnswerPredictor, WeightingConfig, _encode, build_weighting_model

    model, student = build_weighting_model(WeightingConfig())
    predictor = AnswerPredictor(student, model.weighter.shape.hidden_size)
    encoded = _encode(arithmetic_examples(args.n, seed=11), model.tokenizer, predictor.tokenizer, 256)
    result = {"benchmark": "weighting-signal", **started, "n_rationales": args.n, "auc_by_kept_share": {}}
    for share in (1.0, 0.5):
        labels, signal = [], []
        g = torch.Generator().manual_seed(0)
        for b in encoded:
            ids = torch.tensor(b.rationale_ids)
            keep = (torch.rand(len(ids), generator=g) < share).float().requires_grad_(True)
            masked = apply_mask(model.weighter.embeddings(ids), keep, model.weighter.mask_embedding)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                nll = predictor.answer_nll([b.question_ids], [masked], [b.answer_ids], [b.n_scored])
            nll.sum().backward()
            for label, grad in zip(keypoint_labels(b.example, b.offsets), keep.grad.tolist(), strict=True):
                if label is not None:
                    labels.append(label)
                    signal.append(-grad)
        result["auc_by_kept_share"][str(share)] = round(float(roc_auc_score(labels, signal)), 4)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "weighting-signal.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
