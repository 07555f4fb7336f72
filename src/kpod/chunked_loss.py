"""Token NLL from hidden states: the output projection applied by us, a chunk of positions at a
time, to the labelled positions only.

A causal LM's forward projects every position onto the whole vocabulary and the usual loss casts
those logits to fp32, although only the labelled positions matter: for a 135M student with a
49,152-word vocabulary the logits outweigh the rest of the activations. Here the model runs with
its output projection bypassed (:func:`bypassed_head`: its "logits" are then the states the
projection would read, after the final norm and any scaling), the labelled positions are
gathered, and :func:`weighted_linear_nll` projects them ``chunk`` at a time, computing the
gradients in the same pass, so no more than one chunk's logits exist at once. Used by the
distillation loss and by step difficulty's scoring; any model whose logits are a bias-free linear
map of those states qualifies (:func:`head_bypass_supported`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from kpod.models import cast_once, inner_model


class LogitBuffers:
    """Where one chunk's logits are written on a CPU: a buffer in the products' dtype and, when that
    is not fp32, one in fp32 for the log-probabilities, each ``[rows, vocab]``, reused for every
    chunk of a call and, inside :func:`kept_logit_buffers`, from call to call.

    Why: a chunk of 512 positions of a 49,152-word vocabulary is 50 MB of bf16 logits and 100 MB
    of fp32 log-probabilities. Allocated afresh, they were four blocks per chunk (the logits, the
    fp32 copy ``log_softmax(..., dtype=float32)`` makes of them, its output and the bf16 copy of
    the gradient), all above glibc's and jemalloc's limits for reusing freed memory, so every
    training step faulted their pages in again, zero-filled: about 71,000 page faults and a fifth
    of the loss's time per micro-batch (BENCHMARKS.md, "Issue #21, session 41"). Here the fp32
    buffer takes a copy of the logits and the log-softmax in place, and the gradient's bf16 copy
    goes back into the logits' buffer: the same kernels on the same values (equal bit for bit), in
    two blocks instead of four. On a GPU PyTorch's caching allocator reuses freed blocks and the
    fused ``log_softmax(..., dtype=float32)`` is kept (its kernel for bf16 input may sum in
    another order), so the buffers serve CPUs only."""

    def __init__(self) -> None:
        self.kept: dict[torch.dtype, torch.Tensor] | None = None  # set inside kept_logit_buffers

    def get(self, size: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat CPU tensor of ``size`` elements of ``dtype`` (its values arbitrary), from the kept
        buffer of that dtype, grown when too small, or new outside :func:`kept_logit_buffers`."""
        if self.kept is None:
            return torch.empty(size, dtype=dtype)
        buffer = self.kept.get(dtype)
        if buffer is None or buffer.numel() < size:
            self.kept.pop(dtype, None)  # freed before its larger successor is allocated
            buffer = self.kept[dtype] = torch.empty(size, dtype=dtype)
        return buffer[:size]


LOGIT_BUFFERS = LogitBuffers()


@contextlib.contextmanager
def kept_logit_buffers() -> Iterator[None]:
    """Within the block the chunked losses on a CPU reuse one set of logit buffers from call to
    call (:class:`LogitBuffers`: about 150 MB for a 49,152-word vocabulary, held until the block
    ends) instead of allocating them per call. For a training loop or a scoring pass: one thread
    at a time (the buffers are shared). Nested blocks share the outermost's."""
    if LOGIT_BUFFERS.kept is not None:
        yield
        return
    LOGIT_BUFFERS.kept = {}
    try:
        yield
    finally:
        LOGIT_BUFFERS.kept = None


def _chunk_logprobs(h: torch.Tensor, w: torch.Tensor, buffers: tuple[torch.Tensor, ...] | None):
    """fp32 ``log softmax(h w^T)`` of one chunk ``[rows, d]`` and the products' buffer it leaves
    free (``None`` off a CPU, or when the products are fp32: then the log-probabilities are
    written over them). ``buffers``: ``(products' dtype, fp32)`` flat buffers of at least
    ``rows * vocab`` elements on a CPU (:class:`LogitBuffers`), ``None`` elsewhere."""
    if buffers is None:
        return torch.log_softmax(h @ w.T, dim=-1, dtype=torch.float32), None
    rows, vocab = h.shape[0], w.shape[0]
    logits = buffers[0][: rows * vocab].view(rows, vocab)
    torch.mm(h, w.T, out=logits)
    if logits.dtype == torch.float32:
        return torch.log_softmax(logits, dim=-1, out=logits), None
    # what log_softmax(..., dtype=float32) does, its fp32 copy and output in one kept buffer
    logp = buffers[1][: rows * vocab].view(rows, vocab).copy_(logits)
    return torch.log_softmax(logp, dim=-1, out=logp), logits


def _buffers(rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> tuple | None:
    """The flat logit buffers for chunks of up to ``rows`` positions on a CPU, else ``None``."""
    if device.type != "cpu":
        return None
    first = LOGIT_BUFFERS.get(rows * vocab, dtype)
    second = LOGIT_BUFFERS.get(rows * vocab, torch.float32) if dtype != torch.float32 else first
    return first, second


class _WeightedLinearNLL(torch.autograd.Function):
    """``sum_j w_j * -log softmax(h_j W^T)[y_j]`` computed chunk by chunk; the gradients with
    respect to ``h`` (and ``W`` when it trains) are computed in the forward, chunk by chunk, so
    neither pass holds more than one chunk's logits. The matrix products run in ``dtype`` (the
    autocast dtype, as the model's own projection would), the softmax in fp32; on a CPU a chunk's
    logits live in :class:`LogitBuffers`."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, token_weights, chunk, dtype):  # noqa: D102
        with torch.autocast(hidden.device.type, enabled=False):
            w = cast_once(weight, dtype)
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            buffers = _buffers(min(chunk, hidden.shape[0]), w.shape[0], dtype, hidden.device)
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start : start + chunk].to(dtype)
                y = labels[start : start + chunk]
                tw = token_weights[start : start + chunk].float()
                # One fused pass from the logits to fp32 log-probabilities (logsumexp, then a
                # subtraction, cost four passes over the chunk's logits and a temporary).
                logp, free = _chunk_logprobs(h, w, buffers)
                nll = -logp.gather(1, y[:, None]).squeeze(1)
                total += (nll * tw).sum()
                if need_h or need_w:
                    # d(nll_j)/d(logits_j) = softmax - onehot(y_j), in place; the token weights
                    # scale the rows of the products' d-wide operands and results, not the
                    # vocabulary-wide g (one pass over the chunk's logits fewer).
                    g = logp.exp_()
                    g[torch.arange(len(y), device=g.device), y] -= 1
                    g = g.to(dtype) if free is None else free.copy_(g)
                    if need_h:
                        grad_h[start : start + chunk] = (g @ w).to(hidden.dtype) * tw[:, None]
                    if need_w:
                        grad_w += (g.T @ (h * tw[:, None].to(dtype))).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):  # noqa: D102
        grad_h, grad_w = ctx.saved_tensors
        out_h = grad_h * grad_total.to(grad_h.dtype) if grad_h is not None else None
        out_w = (grad_w * grad_total).to(ctx.weight_dtype) if grad_w is not None else None
        return out_h, out_w, None, None, None, None


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the model's own projection would run in here: autocast's, else the states'."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def weighted_linear_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    token_weights: torch.Tensor,
    chunk: int = 512,
) -> torch.Tensor:
    """``sum_j w_j * NLL_j`` (Eq. 15's numerator) from the hidden states ``[n, d]`` of the labelled
    positions, the output projection ``weight`` ``[vocab, d]``, their labels ``[n]`` and token
    weights ``[n]``, ``chunk`` positions at a time: equal to :func:`weighted_token_nll` of
    ``hidden @ weight.T`` times its normaliser, without holding ``[n, vocab]`` logits."""
    return _WeightedLinearNLL.apply(
        hidden, weight, labels, token_weights, max(1, chunk), compute_dtype(hidden)
    )


@torch.no_grad()
def linear_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = 512
) -> torch.Tensor:
    """``log softmax(h_j W^T)[y_j]`` for each of the ``[n, d]`` hidden states, ``chunk`` positions
    at a time (no gradient: step difficulty's scoring), in the autocast dtype as the model's own
    projection would run."""
    device = hidden.device.type
    dtype = compute_dtype(hidden)
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    chunk = max(1, chunk)
    with torch.autocast(device, enabled=False):
        w = cast_once(weight, dtype)
        buffers = _buffers(min(chunk, hidden.shape[0]), w.shape[0], dtype, hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            logp, _ = _chunk_logprobs(hidden[start : start + chunk].to(dtype), w, buffers)
            out[start : start + chunk] = logp.gather(1, labels[start : start + chunk, None]).squeeze(1)
    return out


def head_bypass_supported(model: Any) -> bool:
    """Whether the model's logits are exactly its output projection of the states fed to it (a
    bias-free ``nn.Linear``, no logit soft-capping or scaling after it), so that bypassing the
    projection and applying it ourselves gives the same numbers."""
    inner = inner_model(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    config = getattr(inner, "config", None)
    after = [getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")]
    return type(head) is torch.nn.Linear and head.bias is None and all(v in (None, 1, 1.0) for v in after)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@contextlib.contextmanager
def bypassed_head(model: Any) -> Iterator[torch.Tensor]:
    """Within the block the model's "logits" are the hidden states its output projection would
    read (final norm and any scaling applied); yields the projection's weight."""
    head = inner_model(model).get_output_embeddings()
    head.forward = _identity
    try:
        yield head.weight
    finally:
        del head.forward
