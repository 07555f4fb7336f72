"""Does token weighting find keypoints, and how long does it take?

    .venv/bin/python benchmarks/weighting.py --data synthetic --n 400
    .venv/bin/python benchmarks/weighting.py --data gsm8k --n 1000

synthetic: our arithmetic problems with ground-truth keypoints -> ROC-AUC of w (keypoint vs other
tokens), class means and their difference (contrast); results/weighting-synthetic.json.
gsm8k / asdiv: the first N rationales of ../shared/data/gsm8k/train.jsonl or
../shared/data/asdiv-gpt35/train.json -> mean w of digit/operator tokens vs the 50 most frequent
words, their difference (contrast), and the training time; results/weighting-<data>.json.
Every option of `kpod weights train` (WeightingConfig's fields) is accepted, e.g. --alpha 0.7
--target-keep 0.5.
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
    parser.add_argument("--data", choices=("synthetic", "gsm8k", "asdiv"), required=True)
    parser.add_argument("--n", type=int, default=400)
    # Every WeightingConfig field is an option (kpod weights train's own); left out: its default.
    from kpod.config import add_config_options, config_from_args
    from kpod.weighting.config import READ_SETTINGS, WeightingConfig

    add_config_options(parser, WeightingConfig, "weighting", skip=READ_SETTINGS + ("student",))
    parser.add_argument(
        "--ablate-answer-loss",
        action="store_true",
        help="control run: multiply L_p by 0, so only the sparsity term trains the module",
    )
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
    from kpod.weighting.train import train_weighting
    from kpod.weighting.weights import load_weights

    if args.data == "synthetic":
        examples = arithmetic_examples(args.n, seed=0)
    else:
        shared = ROOT.parent / "shared" / "data"
        if args.data == "gsm8k":
            examples, _ = load_examples(shared / "gsm8k" / "train.jsonl")
        else:  # rationales without steps have no tokens to weigh
            examples, _ = load_examples(shared / "asdiv-gpt35" / "train.json")
            examples = [e for e in examples if e.steps]
        examples = examples[: args.n]
    config = config_from_args(WeightingConfig, args, "weighting")
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
