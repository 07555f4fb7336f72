"""How much does the frozen answer predictor's loss depend on which rationale tokens are masked?

    .venv/bin/python benchmarks/weighting_masks.py --n 48 \\
        [--mask-embedding-from runs/bench-weighting/synthetic-budget0.5]

On synthetic arithmetic rationales (ground-truth keypoints), the answer NLL of the default
predictor (SmolLM2-135M-Instruct, frozen) with the full rationale prefix, for fixed discrete masks:
everything kept, everything masked, only keypoints kept, only the other tokens kept, a random half,
and no rationale at all. With --mask-embedding-from, also everything masked with a trained module's
mask embedding instead of the initial one (the mean token embedding). Writes
results/weighting-masks.json. This is the evidence behind the score-function estimator's default
(src/kpod/weighting/train.py).
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
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--mask-embedding-from", type=Path)
    args = parser.parse_args()
    started = provenance()

    import torch
    from safetensors.torch import load_file

    from kpod.data.synthetic import arithmetic_examples
    from kpod.weighting.evaluate import keypoint_labels
    from kpod.weighting.maths import apply_mask
    from kpod.weighting.train import AnswerPredictor, WeightingConfig, _encode, build_weighting_model

    torch.manual_seed(0)
    model, student = build_weighting_model(WeightingConfig())
    predictor = AnswerPredictor(student, model.weighter.shape.hidden_size)
    predictor.model.requires_grad_(False)
    predictor.model.eval()
    encoded = _encode(arithmetic_examples(args.n, seed=0), model.tokenizer, predictor.tokenizer, 256)
    initial = model.weighter.mask_embedding.detach().clone()
    generator = torch.Generator().manual_seed(0)

    def labels(b) -> torch.Tensor:
        return torch.tensor([float(x or 0) for x in keypoint_labels(b.example, b.offsets)])

    def mean_nll(keep_of, mask_embedding: torch.Tensor) -> float:
        total = 0.0
        with torch.no_grad():
            for b in encoded:
                ids = torch.tensor(b.rationale_ids, dtype=torch.long)
                keep = keep_of(b)
                rationale = apply_mask(model.weighter.embeddings(ids[: len(keep)]), keep, mask_embedding)
                total += predictor.answer_nll(
                    [b.question_ids], [rationale], [b.answer_ids], [b.n_scored]
                ).item()
        return round(total / len(encoded), 4)

    def n_of(b) -> int:
        return len(b.rationale_ids)

    nll = {
        "all_kept": mean_nll(lambda b: torch.ones(n_of(b)), initial),
        "all_masked": mean_nll(lambda b: torch.zeros(n_of(b)), initial),
        "keypoints_only": mean_nll(labels, initial),
        "others_only": mean_nll(lambda b: 1 - labels(b), initial),
        "random_half": mean_nll(lambda b: (torch.rand(n_of(b), generator=generator) < 0.5).float(), initial),
        "no_rationale": mean_nll(lambda b: torch.zeros(0), initial),
    }
    if args.mask_embedding_from:
        trained = load_file(str(args.mask_embedding_from / "weighter.safetensors"))["mask_embedding"]
        nll["all_masked_trained_mask_embedding"] = mean_nll(lambda b: torch.zeros(n_of(b)), trained)
    result = {"benchmark": "weighting-masks", **started, "n_rationales": len(encoded), "answer_nll": nll}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "weighting-masks.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
