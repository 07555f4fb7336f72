"""Does token weighting find keypoints, and how long does it take?

    .venv/bin/python benchmarks/weighting.py --data synthetic --n 400
    .venv/bin/python benchmarks/weighting.py --data gsm8k --n 1000

synthetic: our arithmetic problems with ground-truth keypoints -> ROC-AUC of w (keypoint vs other
tokens) and class means; results/weighting-synthetic.json.
gsm8k: the first N rationales of ../shared/data/gsm8k/train.jsonl -> mean w of digit/operator
tokens vs the 50 most frequent words, and the training time; results/weighting-gsm8k.json.
Extra options are passed to WeightingConfig (e.g. --alpha 0.7 --epochs 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, provenance  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", choices=("synthetic", "gsm8k"), required=True)
    parser.add_argument("--n", type=int, default=400)
    # Options left out take WeightingConfig's defaults.
    parser.add_argument("--alpha", type=float)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--normalize-mask-loss", action=argparse.BooleanOptionalAction)
    parser.add_argument(
        "--kept-budget", type=float, help="hinge L_m: penalise only the kept share above this"
    )
    parser.add_argument("--estimator", choices=("straight-through", "score-function"))
    parser.add_argument("--samples", type=int, help="masks per rationale (score-function)")
    parser.add_argument("--prefix-sum", action=argparse.BooleanOptionalAction)
    parser.add_argument("--optimizer", choices=("adamw", "sgd"))
    parser.add_argument("--lr", type=float)
    parser.add_argument(
        "--ablate-answer-loss",
        action="store_true",
        help="control run: multiply L_p by 0, so only the sparsity term trains the module",
    )
    parser.add_argument("--predictor-mode", choices=("frozen", "lora", "full"))
    parser.add_argument("--max-steps", type=int, help="stop after this many steps")
    parser.add_argument(
        "--eval-every", type=int, default=0, help="synthetic data: also measure the AUC every N steps"
    )
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-weighting")
    args = parser.parse_args()
    started = provenance()  # the commit and time the run started from

    from kpod.data.loaders import load_examples
    from kpod.data.synthetic import arithmetic_examples
    from kpod.weighting.evaluate import keypoint_metrics, token_class_metrics
    from kpod.weighting.train import WeightingConfig, train_weighting
    from kpod.weighting.weights import load_weights

    if args.data == "synthetic":
        examples = arithmetic_examples(args.n, seed=0)
    else:
        examples, _ = load_examples(ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl")
        examples = examples[: args.n]
    names = ["alpha", "epochs", "normalize_mask_loss", "kept_budget", "estimator", "samples", "prefix_sum"]
    names += ["optimizer", "lr", "predictor_mode", "max_steps"]
    config = WeightingConfig(**{k: getattr(args, k) for k in names if getattr(args, k) is not None})
    if args.ablate_answer_loss:
        from kpod.weighting import train as weighting_train

        full_answer_nll = weighting_train.AnswerPredictor.answer_nll
        weighting_train.AnswerPredictor.answer_nll = lambda self, *a: full_answer_nll(self, *a) * 0.0
    out_dir = args.out / f"{args.data}{args.tag}"
    trajectory: list[dict] = []

    def measure(step: int, model) -> None:
        if args.data == "synthetic" and args.eval_every and step % args.eval_every == 0:
            metrics = keypoint_metrics(examples, {r.key: r for r in model.weigh(examples)})
            trajectory.append({"step": step, **metrics})
            print(f"step {step}: {json.dumps(metrics)}", flush=True)

    start = time.perf_counter()
    _, history = train_weighting(examples, config, out_dir=out_dir, on_step=measure)
    seconds = time.perf_counter() - start
    rows = load_weights(out_dir)
    result = {
        "benchmark": f"weighting-{args.data}",
        **started,
        "n_rationales": len(examples),
        "train_seconds_total": round(seconds, 1),
        "config": asdict(config),
        "ablate_answer_loss": args.ablate_answer_loss,
        "first_step": history[0],
        "last_step": history[-1],
        **token_class_metrics(examples, rows),
    }
    if trajectory:
        result["trajectory"] = trajectory
    if args.data == "synthetic":
        result.update(keypoint_metrics(examples, rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"weighting-{args.data}{args.tag}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
