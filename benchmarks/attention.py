"""Attention alone, as a training step and as generation's prefill run it: transformers' ``sdpa``
(PyTorch's CPU flash attention) against its ``eager`` (explicit products, float32 softmax), by
length. What ``train.attention: auto`` and ``kpod.models.EAGER_ATTENTION_MAX_LENGTH`` rest on.

    .venv/bin/python benchmarks/attention.py
    .venv/bin/python benchmarks/attention.py --lengths 64 128 256 --batch 8 --rounds 6
    .venv/bin/python benchmarks/attention.py --dtype fp32     # as precision auto trains without fast bf16

One layer's attention of the offline student's shape (9 query heads sharing 3 key/value heads of
64), bf16 tensors as under autocast (``--dtype fp32``: float32, as the loop runs where ``precision:
auto`` resolves to fp32), batch 8 by default, through transformers' own functions
(``sdpa_attention_forward``, the Llama ``eager_attention_forward``) with the masks transformers
builds for a padded batch (a boolean mask for sdpa, an additive one for eager; ``sdpa-causal`` is
sdpa without a mask, its ``is_causal`` path, which transformers takes when no row is padded).
Per length: the median over ``--rounds`` rounds of the mean of 5 calls of forward and backward
("train") and of the forward alone without gradients ("forward"), the implementations alternated
in each round.

Results: results/attention.json (bf16), results/attention-fp32.json (fp32).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, cpu_times, provenance  # noqa: E402

from kpod.models import torch_dtype  # noqa: E402


class _Layer(torch.nn.Module):
    """What transformers' attention functions read from the attention module."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def implementations():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import eager_attention_forward

    def sdpa(layer, q, k, v, masks):
        return sdpa_attention_forward(layer, q, k, v, masks["bool"], scaling=q.shape[-1] ** -0.5)[0]

    def sdpa_causal(layer, q, k, v, masks):
        return sdpa_attention_forward(layer, q, k, v, None, scaling=q.shape[-1] ** -0.5)[0]

    def eager(layer, q, k, v, masks):
        return eager_attention_forward(layer, q, k, v, masks["additive"], scaling=q.shape[-1] ** -0.5)[0]

    return {"sdpa": sdpa, "sdpa-causal": sdpa_causal, "eager": eager}


def mean_ms(fn, calls: int = 5) -> float:
    """Milliseconds per call of ``fn`` over ``calls`` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1000


def measure(length: int, args, layer: _Layer, functions) -> dict:
    """One length's row: each implementation's median ms for forward+backward and forward alone."""
    b, d = args.batch, args.head_dim
    dtype = torch_dtype(args.dtype)
    q = torch.randn(b, args.heads, length, d, dtype=dtype, requires_grad=True)
    k = torch.randn(b, args.kv_heads, length, d, dtype=dtype, requires_grad=True)
    v = torch.randn(b, args.kv_heads, length, d, dtype=dtype, requires_grad=True)
    keep = torch.ones(length, length, dtype=torch.bool).tril()[None, None].repeat(b, 1, 1, 1)
    keep[0, :, :, length - length // 3 :] = False  # one row padded by a third, as in a padded batch
    keep[0, :, :, 0] = True
    additive = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, -torch.inf)
    masks = {"bool": keep, "additive": additive}
    grad = torch.randn(b, length, args.heads, d, dtype=dtype)  # the functions return (b, length, heads, d)

    def train_call(fn):
        fn(layer, q, k, v, masks).backward(grad)

    def forward_call(fn):
        with torch.no_grad():
            fn(layer, q, k, v, masks)

    times: dict[str, dict[str, list[float]]] = {name: {"train": [], "forward": []} for name in functions}
    for fn in functions.values():  # warm-up: oneDNN and the kernels' buffers for these shapes
        train_call(fn)
        forward_call(fn)
    for _ in range(args.rounds):
        for name, fn in functions.items():
            times[name]["train"].append(mean_ms(lambda fn=fn: train_call(fn)))
            times[name]["forward"].append(mean_ms(lambda fn=fn: forward_call(fn)))
    row = {"length": length}
    for name, parts in times.items():
        for part, values in parts.items():
            row[f"{name}_{part}_ms"] = round(statistics.median(values), 3)
    row["sdpa_over_eager_train"] = round(row["sdpa_train_ms"] / row["eager_train_ms"], 3)
    row["sdpa_over_eager_forward"] = round(row["sdpa_forward_ms"] / row["eager_forward_ms"], 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 100, 160, 224, 320])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--out", type=Path, help="default: results/attention.json, -fp32 for fp32")
    args = parser.parse_args()
    args.out = args.out or RESULTS / ("attention.json" if args.dtype == "bf16" else "attention-fp32.json")

    torch.manual_seed(0)
    layer, functions = _Layer(args.heads // args.kv_heads), implementations()
    rows = []
    steal0, all0 = cpu_times()
    for length in args.lengths:
        rows.append(measure(length, args, layer, functions))
        print(json.dumps(rows[-1]), flush=True)
    steal1, all1 = cpu_times()
    shape = {"batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim}
    result = {
        "what": "one layer's attention, ms per call (median of rounds of 5): forward+backward (train) and "
        "forward without gradients, sdpa (boolean mask), sdpa-causal (no mask) and eager (additive mask)",
        "shape": shape,
        "dtype": args.dtype,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "rows": rows,
        "steal_share": round((steal1 - steal0) / max(1, all1 - all0), 4),
        **provenance(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
