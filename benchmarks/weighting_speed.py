"""How long the token weighting's answer losses take, before and after session 26's two changes.

The score-function estimator scores ``samples x n_prefixes`` masked versions of every rationale
(8 by default), each after its question. Since session 26 ``train_weighting`` (a) holds the
frozen predictor's weights in bf16 for its loop (``kpod.models.frozen_linears_in``; autocast cast
them at every forward pass) and (b) reads each question once into a key/value cache that its
versions continue (``_answer_losses``; ``share_questions=False`` is the former path, one padded
row per sequence). Rows, timed on the same batches, alternated: ``before`` (neither), ``bf16``
(a only), ``shared`` (b only), ``today`` (a and b); on the quickstart's training rationales
(`configs/quickstart.yaml`'s data step, generated offline), with the frozen offline student as the
answer predictor under the weighting's defaults (bf16 autocast, batch 8, 4 masks drawn at w = 0.5,
the full rationale and one shorter prefix). Also records whether ``bf16``'s losses equal
``before``'s (they should, bit for bit) and how far today's are from before's (bf16 rounding).

Session 30 added (c): the predictor's norms' outputs cast to bf16 once instead of once per
projection that reads them (since session 39 ``kpod.models.norm_casts_shared``, the trainer's; session
30's ``norm_outputs_in`` handed the cast output on itself); ``today`` has it, the row ``session29`` is
today's path without it (``session29_over_today``; the losses should be the same bit for bit:
``norm_cast_losses_equal``). ``--threads 1`` times it as `make demo`'s main stream
runs it (one thread).

    .venv/bin/python benchmarks/weighting_speed.py              # 6 batches x 3 rounds
    .venv/bin/python benchmarks/weighting_speed.py --threads 1 --batches 4 --rounds 3

Results: results/weighting-speed.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, cpu_times, provenance  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=RESULTS / "weighting-speed.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from kpod.data.loaders import load_examples
    from kpod.models import autocast, frozen_linears_in, load_model, norm_casts_shared
    from kpod.pipeline import data_step, load_pipeline_config
    from kpod.precision import compute_precision
    from kpod.weighting.maths import apply_mask
    from kpod.weighting.train import AnswerPredictor, _answer_losses, _encode, _prefix_lengths

    started = provenance()
    config = load_pipeline_config(ROOT / "configs" / "quickstart.yaml")
    wcfg = config.weighting
    precision = compute_precision(wcfg.precision, "cpu")  # auto: what the weighting would run in
    with tempfile.TemporaryDirectory() as tmp:
        data_step(config.data, Path(tmp))
        examples = load_examples(Path(tmp) / "train.jsonl", "kpod")[0]
    loaded = load_model(wcfg.student, trainable=False)
    loaded.model.requires_grad_(False).eval()
    predictor = AnswerPredictor(loaded, loaded.model.get_input_embeddings().weight.shape[1])
    encoded = _encode(examples, loaded.tokenizer, loaded.tokenizer, wcfg.max_rationale_tokens)
    rng = random.Random(0)
    torch.manual_seed(0)
    emb = loaded.model.get_input_embeddings()
    size = wcfg.batch_size
    batches = []
    for b in range(args.batches):
        batch = encoded[b * size : (b + 1) * size]
        longest = max(len(e.rationale_ids) for e in batch)
        ids = torch.zeros(len(batch), longest, dtype=torch.long)
        for i, e in enumerate(batch):
            ids[i, : len(e.rationale_ids)] = torch.tensor(e.rationale_ids)
        embedded = emb(ids)
        mask_emb = torch.zeros_like(embedded[0, 0])
        versions = []
        for _ in range(wcfg.experimental.samples):
            versions.append(apply_mask(embedded, (torch.rand(ids.shape) < 0.5).float(), mask_emb))
        prefixes = [_prefix_lengths(len(e.rationale_ids), rng, wcfg) for e in batch]
        batches.append((batch, versions, prefixes))

    # (frozen weights in bf16, questions read once, norms' outputs cast once)
    variants = {
        "before": (False, False, False),
        "bf16": (True, False, False),
        "shared": (False, True, False),
        "session29": (True, True, False),
        "today": (True, True, True),
    }

    def run(bf16_weights: bool, share: bool, norms: bool) -> tuple[float, list[torch.Tensor]]:
        start = time.perf_counter()
        out = []
        dtype = torch.bfloat16 if bf16_weights else torch.float32  # fp32: nothing converted
        with (
            torch.no_grad(),
            autocast("cpu", precision),
            frozen_linears_in(predictor.model, dtype),
            norm_casts_shared(predictor.model, torch.bfloat16) if norms else contextlib.nullcontext(),
        ):
            for batch, versions, prefixes in batches:
                out.append(_answer_losses(predictor, batch, versions, prefixes, share_questions=share))
        return time.perf_counter() - start, out

    for setting in variants.values():  # warm-up: oneDNN builds its kernels per shape
        run(*setting)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    losses: dict[str, list[torch.Tensor]] = {}
    steal0, all0 = cpu_times()
    for _ in range(args.rounds):
        for name, setting in variants.items():
            s, losses[name] = run(*setting)
            seconds[name].append(round(s, 2))
        print(seconds, flush=True)
    steal1, all1 = cpu_times()
    pairs = zip(losses["today"], losses["before"], strict=True)
    diff = max(float((a - b).abs().max()) for a, b in pairs)
    same_bf16 = all(torch.equal(a, b) for a, b in zip(losses["bf16"], losses["before"], strict=True))
    same_norms = all(torch.equal(a, b) for a, b in zip(losses["today"], losses["session29"], strict=True))
    mean = sum(float(b.mean()) for b in losses["before"]) / len(losses["before"])
    tokens_q = sum(len(e.question_ids) for e in encoded[: args.batches * size])
    result = {
        **started,
        "batches": args.batches,
        "batch_size": size,
        "sequences_per_example": wcfg.experimental.samples * wcfg.experimental.n_prefixes,
        "precision": precision,
        "seconds_per_batch": {k: round(sum(v) / len(v) / args.batches, 2) for k, v in seconds.items()},
        "seconds_by_round": seconds,
        "before_over_today": round(sum(seconds["before"]) / sum(seconds["today"]), 3),
        "before_over_bf16": round(sum(seconds["before"]) / sum(seconds["bf16"]), 3),
        "before_over_shared": round(sum(seconds["before"]) / sum(seconds["shared"]), 3),
        "session29_over_today": round(sum(seconds["session29"]) / sum(seconds["today"]), 3),
        "bf16_losses_equal_before": same_bf16,
        "norm_cast_losses_equal": same_norms,
        "threads": torch.get_num_threads(),
        "max_abs_loss_difference_today_before": round(diff, 4),
        "mean_answer_loss": round(mean, 4),
        "question_tokens_per_example": round(tokens_q / (args.batches * size), 1),
        "steal_share": round((steal1 - steal0) / max(1, all1 - all0), 3),
    }
    print(result)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
