"""Which of reasoning-gym's gsm_symbolic templates the multi-step suite (issue #23) draws from.

    .venv/bin/python benchmarks/gsm_symbolic_templates.py     # -> results/gsm-symbolic-templates.json

For each of the 100 templates (one GSM8K problem each, turned into a generator), ten problems: the
number of solution steps (kpod's step splitter; constant within a template), the mean question and
solution length in the default student's tokens, and whether the generator failed. Candidates:
3 to 5 steps, both means at most 100 tokens (so a run of 320 questions x 8 epochs fits in about an
hour on 2 cores), no failures. The candidates, in id order, go alternately to training and to the
out-of-distribution test set (``MULTISTEP_TEMPLATES`` / ``OOD_TEMPLATES`` in accuracy.py).
"""

from __future__ import annotations

import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, provenance  # noqa: E402

MIN_STEPS, MAX_STEPS, MAX_TOKENS, PROBLEMS = 3, 5, 100, 10


def survey() -> list[dict]:
    import reasoning_gym

    from kpod.data.steps import split_steps
    from kpod.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=1, seed=0)
    rows = []
    for template, generator in sorted(dataset.generators.items()):
        steps, questions, solutions, failures = [], [], [], 0
        for i in range(PROBLEMS):
            try:
                item = generator(random.Random(f"survey-{i}"), 1.0)
            except ValueError:  # the generator found no valid numbers for this draw
                failures += 1
                continue
            solution = item["metadata"]["answer_cot"].split("####")[0].strip()
            steps.append(len(split_steps(solution)))
            questions.append(len(tokenizer(item["question"]).input_ids))
            solutions.append(len(tokenizer(solution).input_ids))
        row = {"template": template, "failures": failures}
        if steps:
            row |= {
                "steps": sorted(set(steps)),
                "question_tokens": round(statistics.mean(questions), 1),
                "solution_tokens": round(statistics.mean(solutions), 1),
            }
        row["candidate"] = bool(
            steps
            and not failures
            and MIN_STEPS <= min(steps)
            and max(steps) <= MAX_STEPS
            and row["question_tokens"] <= MAX_TOKENS
            and row["solution_tokens"] <= MAX_TOKENS
        )
        rows.append(row)
    return rows


def main() -> None:
    rows = survey()
    candidates = [r["template"] for r in rows if r["candidate"]]
    result = {
        **provenance(),
        "rule": f"{MIN_STEPS}-{MAX_STEPS} steps, mean question and solution <= {MAX_TOKENS} tokens, "
        "no failures",
        "candidates": candidates,
        "train": candidates[0::2],
        "ood": candidates[1::2],
        "templates": rows,
    }
    path = RESULTS / "gsm-symbolic-templates.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{len(candidates)} candidates\ntrain {result['train']}\nood   {result['ood']}\n-> {path}")


if __name__ == "__main__":
    main()
