"""Training the token weighting module (Eqs. 4-7) and writing the per-token weights.

For each rationale: ``w = weighter(r)``, a hard mask ``m ~ w`` (Eq. 4), the masked rationale
``r[m]`` in embedding space, and an answer predictor that must produce the answer from the question
and *prefixes* of ``r[m]`` (Eq. 5; the full rationale is always one of the prefixes, the others are
drawn at random, so the predictor cannot rely on the last step repeating results). The objective is
``L_k = L_p + alpha * L_m`` (Eqs. 6-7), averaged over the rationales of a batch.

How the answer loss reaches ``w`` is ``estimator``:

* ``score-function`` (default, a deviation from the paper): ``samples`` exact Bernoulli(w) masks per
  rationale (Eq. 4's hard samples), each scored by the predictor, and the REINFORCE gradient with a
  leave-one-out baseline. It follows the loss of the *discrete* masks, which tells keypoints from
  the rest (BENCHMARKS.md, token weighting: the answer NLL under each kind of mask).
* ``straight-through``: the paper's Gumbel-softmax relaxation. Its gradient is the first-order
  effect of sliding each embedding towards the mask embedding, which with a frozen predictor points
  towards "mask more" for almost every token (and trains the mask embedding into a soft prompt), so
  the weights separate briefly and then collapse towards 0, with or without the sparsity term
  (BENCHMARKS.md, token weighting).

The answer predictor (paper: FlanT5-Large) defaults to the student's own pretrained model: it
shares the student's tokenizer and embeddings, so no projection is needed, and it works offline.
Another model can be named; rationale embeddings then go through a learned linear projection into
its hidden size (question and answer are tokenized with its own tokenizer).

Which predictor parts train is ``predictor_mode``: ``frozen`` (default), ``lora`` or ``full``.
Frozen is the default because a trainable predictor can learn to answer from the question alone
(a shortcut that makes every rationale token look useless and collapses ``w`` to 0), and because
it keeps the module cheap: only the attention layer and the MLP train (under the score function
the predictor runs without gradients).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from kpod.batching import pad_embeddings, pad_ids
from kpod.chunked_loss import bypassed_head, compute_dtype, head_bypass_supported
from kpod.data.answers import ANSWER_PHRASE
from kpod.data.schema import Example
from kpod.errors import ConfigError
from kpod.io import write_json, write_jsonl
from kpod.lock import holds_lock
from kpod.models import (
    LoraSettings,
    autocast,
    cache_keyword,
    cast_once,
    frozen_linears_for,
    gqa_attention_on_cpu,
    last_positions,
    load_model,
    norm_casts_shared,
)
from kpod.precision import compute_precision
from kpod.prompt import answer_text, render_prompt
from kpod.weighting.config import WeightingConfig
from kpod.weighting.maths import (
    apply_mask,
    bernoulli_log_prob,
    binary_gumbel_mask,
    keypoint_objective,
    mask_ratio_loss,
    score_function_surrogate,
)
from kpod.weighting.module import KeypointWeighter, WeighterShape
from kpod.weighting.weights import WEIGHTS_FILE, TokenWeights, rationale_key, save_weights

log = logging.getLogger(__name__)
IGNORE_INDEX = -100


@dataclass
class _Encoded:
    example: Example
    rationale_ids: list[int]
    offsets: list[tuple[int, int]]
    question_ids: list[int]
    answer_ids: list[int]  # " Therefore, the answer is" + " <answer>"
    n_scored: int  # the last n_scored answer ids (the answer itself) carry the loss


class AnswerPredictor(nn.Module):
    """Eq. (5): answer NLL from the question and a (masked) rationale prefix, per sequence."""

    def __init__(self, loaded: Any, student_hidden: int) -> None:
        super().__init__()
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.kind = loaded.kind
        hidden = self.model.get_input_embeddings().weight.shape[1]
        self.proj: nn.Module = (
            nn.Identity() if hidden == student_hidden else nn.Linear(student_hidden, hidden)
        )

    def embed(self, ids: list[int]) -> torch.Tensor:
        emb = self.model.get_input_embeddings()
        return emb(torch.tensor(ids, dtype=torch.long, device=emb.weight.device))

    def answer_nll(
        self,
        questions: list[list[int]],
        rationales: list[torch.Tensor],
        answers: list[list[int]],
        scored: list[int],
    ) -> torch.Tensor:
        """Summed NLL of the last ``scored[i]`` tokens of each answer segment, shape ``[n_sequences]``.

        Eq. (5) scores the answer y; the template phrase before it is context, not target.
        """
        if self.kind == "seq2seq":
            return self._seq2seq_nll(questions, rationales, answers, scored)
        seqs = [
            torch.cat([self.embed(q), self.proj(r), self.embed(a)])
            for q, r, a in zip(questions, rationales, answers, strict=True)
        ]
        # Left padding: every answer ends at the last position, so only the last logits are needed.
        batch, mask = pad_embeddings(seqs, left=True)
        # Only the scored tail of each answer is labelled, so only the last logits are needed.
        targets = [a[len(a) - k :] for a, k in zip(answers, scored, strict=True)]
        labels = pad_ids(targets, IGNORE_INDEX, left=True)[0].to(batch.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            inputs_embeds=batch,
            attention_mask=mask,
            position_ids=positions,
            logits_to_keep=last_positions(batch.shape[1], labels.shape[1] + 1, batch.device),
            use_cache=False,
        )
        return _summed_nll(out.logits[:, :-1, :], labels)  # position t predicts token t + 1

    def shares_questions(self) -> bool:
        """Whether :meth:`shared_question_nll` can stand in for :meth:`answer_nll` here: a causal
        predictor whose output projection can be bypassed, with no gradient wanted (the default
        score-function estimator with a frozen predictor; the paths that train through the
        predictor keep one sequence per row)."""
        return self.kind == "causal" and not torch.is_grad_enabled() and head_bypass_supported(self.model)

    def shared_question_nll(
        self,
        questions: list[list[int]],
        owner: list[int],
        rationales: list[torch.Tensor],
        answers: list[list[int]],
        scored: list[int],
    ) -> torch.Tensor:
        """:meth:`answer_nll` of sequences that share questions, each question read once: sequence
        ``j`` is ``questions[owner[j]]`` followed by ``rationales[j]`` and ``answers[j]``.

        The questions run first (left-padded) into a key/value cache, which is copied to every
        sequence that continues them; the continuations (right-padded) run on it. Each question is
        read by ``samples x n_prefixes`` sequences (8 by default) and is most of a sequence's
        tokens on short rationales (BENCHMARKS.md, "Issue #21, session 26"). Same losses as
        :meth:`answer_nll` up to float rounding (tested)."""
        from transformers import DynamicCache

        device = self.model.get_input_embeddings().weight.device
        qbatch, qmask = pad_embeddings([self.embed(q) for q in questions], left=True)
        cache = DynamicCache(config=self.model.config)
        keyword = cache_keyword(self.model)
        with bypassed_head(self.model):  # only the cache is wanted: no projection onto the vocabulary
            self.model(
                inputs_embeds=qbatch,
                attention_mask=qmask,
                position_ids=(qmask.cumsum(-1) - 1).clamp(min=0),
                use_cache=True,
                **{keyword: cache},
                logits_to_keep=last_positions(qbatch.shape[1], 1, device),
            )
        rows = torch.tensor(owner, device=device)
        cache.batch_select_indices(rows)  # one copy of its question's keys and values per sequence
        conts = [torch.cat([self.proj(r), self.embed(a)]) for r, a in zip(rationales, answers, strict=True)]
        cbatch, cmask = pad_embeddings(conts)
        positions = qmask.sum(-1)[rows, None] + torch.arange(cbatch.shape[1], device=device)
        with bypassed_head(self.model) as projection:
            hidden = self.model(
                inputs_embeds=cbatch,
                attention_mask=torch.cat([qmask[rows], cmask], dim=1),
                position_ids=positions,
                use_cache=True,
                **{keyword: cache},
            ).logits
        # The scored answer tokens of sequence j end its continuation; position t predicts t + 1.
        pick_row, pick_pos, targets = [], [], []
        for j, (c, a, k) in enumerate(zip(conts, answers, scored, strict=True)):
            n = c.shape[0]
            pick_row += [j] * k
            pick_pos += range(n - k - 1, n - 1)
            targets += a[len(a) - k :]
        sequence = torch.tensor(pick_row, device=device)
        h = hidden[sequence, torch.tensor(pick_pos, device=device)]
        nll = nn.functional.cross_entropy(
            # The projection cast once for all passes (kpod.models.cast_once): autocast would cast
            # the tied weight to the same bf16 values at every call.
            nn.functional.linear(h, cast_once(projection, compute_dtype(h))).float(),
            torch.tensor(targets, device=device),
            reduction="none",
        )
        return torch.zeros(len(conts), device=device).index_add(0, sequence, nll)

    def _seq2seq_nll(self, questions, rationales, answers, scored) -> torch.Tensor:
        # The encoder reads question, rationale and the template phrase; the decoder writes the answer.
        seqs = [
            torch.cat([self.embed(q), self.proj(r), self.embed(a[: len(a) - k])])
            for q, r, a, k in zip(questions, rationales, answers, scored, strict=True)
        ]
        batch, mask = pad_embeddings(seqs)
        targets = [a[len(a) - k :] for a, k in zip(answers, scored, strict=True)]
        labels = pad_ids(targets, IGNORE_INDEX)[0].to(batch.device)
        logits = self.model(inputs_embeds=batch, attention_mask=mask, labels=labels).logits
        return _summed_nll(logits, labels)


def _summed_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence summed NLL of the labelled positions (``logits`` aligned with ``labels``)."""
    nll = nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return nll.view(labels.shape).sum(-1)


def _encode(
    examples: Sequence[Example], student_tok: Any, predictor_tok: Any, max_tokens: int
) -> list[_Encoded]:
    out = []
    template = list(predictor_tok(" " + ANSWER_PHRASE, add_special_tokens=False)["input_ids"])
    for e in examples:
        if not e.steps:
            continue
        enc = student_tok(e.rationale, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])[:max_tokens]
        offsets = [tuple(o) for o in enc["offset_mapping"]][:max_tokens]
        question = predictor_tok(render_prompt(e.question), add_special_tokens=True)["input_ids"]
        value = predictor_tok(" " + answer_text(e), add_special_tokens=False)["input_ids"]
        out.append(
            _Encoded(e, ids, offsets, list(question), template + list(value), len(value))  # type: ignore[arg-type]
        )
    return out


def _pad(batch: list[_Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_ids([b.rationale_ids for b in batch], 0)


@dataclass
class WeightingModel:
    """A trained (or freshly built) weighter with the student tokenizer it weighs tokens of."""

    weighter: KeypointWeighter
    tokenizer: Any
    config: WeightingConfig

    @torch.no_grad()
    def weigh(self, examples: Sequence[Example], batch_size: int = 32) -> list[TokenWeights]:
        """Per-token weights of every rationale, with the tokens' character offsets."""
        self.weighter.eval()
        encoded = _encode(examples, self.tokenizer, self.tokenizer, self.config.max_rationale_tokens)
        rows = []
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start : start + batch_size]
            ids, mask = _pad(batch)
            w = self.weighter(
                ids.to(self.config.device), mask.to(self.config.device), self.config.target_keep
            )
            w = w.float().cpu()
            for i, b in enumerate(batch):
                n = len(b.rationale_ids)
                rows.append(
                    TokenWeights(
                        key=rationale_key(b.example),
                        qid=b.example.qid,
                        offsets=[tuple(o) for o in b.offsets],
                        weights=[round(float(x), 5) for x in w[i, :n]],
                    )
                )
        return rows


def build_weighting_model(config: WeightingConfig) -> tuple[WeightingModel, Any]:
    """The weighter (embedding copied from the student) and the loaded student."""
    student = load_model(config.student, trainable=False)
    emb = student.model.get_input_embeddings().weight
    shape = WeighterShape(
        vocab_size=emb.shape[0],
        hidden_size=emb.shape[1],
        num_heads=config.num_heads,
        mlp_hidden=config.mlp_hidden,
    )
    torch.manual_seed(config.seed)
    weighter = KeypointWeighter(shape, emb).to(config.device)
    return WeightingModel(weighter, student.tokenizer, config), student


def _prefix_lengths(n: int, rng: random.Random, config: WeightingConfig) -> list[tuple[int, float]]:
    """(length, scale) of the rationale prefixes one example is scored on (Eq. 5): the full
    rationale, then ``n_prefixes - 1`` random shorter ones. With ``prefix_sum`` the shorter ones
    stand for all n prefixes (an unbiased estimate of Eq. 5's sum over every prefix)."""
    shorter = [rng.randrange(0, n) for _ in range(config.experimental.n_prefixes - 1)]
    factor = n / len(shorter) if config.experimental.prefix_sum and shorter else 1.0
    return [(n, 1.0)] + [(k, factor) for k in shorter]


def _answer_losses(
    predictor: AnswerPredictor,
    batch: list[_Encoded],
    masked: list[torch.Tensor],
    prefixes: list[list[tuple[int, float]]],
    chunk: int | None = None,
    share_questions: bool = True,
) -> torch.Tensor:
    """L_p (Eq. 5) of every example for each masked version of the batch, shape ``[len(masked), batch]``.

    The sequences of all versions and prefixes go through the predictor sorted by length, ``chunk``
    at a time (default 16), so a short prefix is not padded to the longest full rationale (half the
    time on 1000 GSM8K rationales with 4 masks x 2 prefixes; the losses are the same up to float
    rounding). With ``share_questions`` where the predictor allows it
    (:meth:`AnswerPredictor.shares_questions`), the sequences go by example instead, about ``chunk``
    at a time (default 32: each call's question pass is short, so fewer, larger calls; chosen by a
    rough timing of 16, 32 and 64), each example's question read once for all its sequences
    (:meth:`AnswerPredictor.shared_question_nll`)."""
    if share_questions and predictor.shares_questions():
        return _shared_question_losses(predictor, batch, masked, prefixes, chunk or 32)
    chunk = chunk or 16
    questions, rationales, answers, scored, owner, scale = [], [], [], [], [], []
    for v, version in enumerate(masked):
        for i, b in enumerate(batch):
            for k, f in prefixes[i]:
                questions.append(b.question_ids)
                rationales.append(version[i, :k])
                answers.append(b.answer_ids)
                scored.append(b.n_scored)
                owner.append(v * len(batch) + i)
                scale.append(f)
    lengths = [len(q) + len(r) + len(a) for q, r, a in zip(questions, rationales, answers, strict=True)]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    parts = []
    for start in range(0, len(order), chunk):
        idx = order[start : start + chunk]
        parts.append(
            predictor.answer_nll(
                [questions[i] for i in idx],
                [rationales[i] for i in idx],
                [answers[i] for i in idx],
                [scored[i] for i in idx],
            ).float()
        )
    # The losses come in sorted order: scale and sum them by their owners in that order.
    nll = torch.cat(parts) * torch.tensor([scale[i] for i in order], device=parts[0].device)
    out = torch.zeros(len(masked) * len(batch), device=nll.device).index_add(
        0, torch.tensor([owner[i] for i in order], device=nll.device), nll
    )
    return out.view(len(masked), len(batch))


def _shared_question_losses(
    predictor: AnswerPredictor,
    batch: list[_Encoded],
    masked: list[torch.Tensor],
    prefixes: list[list[tuple[int, float]]],
    chunk: int,
) -> torch.Tensor:
    """:func:`_answer_losses` with each example's question read once: examples sorted by question
    length, as many per predictor call as keep the call near ``chunk`` sequences."""
    per_example = len(masked) * max(len(p) for p in prefixes)
    group = max(1, chunk // per_example)
    order = sorted(range(len(batch)), key=lambda i: len(batch[i].question_ids))
    out = torch.zeros(len(masked) * len(batch), device=masked[0].device)
    for start in range(0, len(order), group):
        examples = order[start : start + group]
        question, rationales, answers, scored, slot, scale = [], [], [], [], [], []
        for q, i in enumerate(examples):
            b = batch[i]
            for v, version in enumerate(masked):
                for k, f in prefixes[i]:
                    question.append(q)
                    rationales.append(version[i, :k])
                    answers.append(b.answer_ids)
                    scored.append(b.n_scored)
                    slot.append(v * len(batch) + i)  # as in _answer_losses
                    scale.append(f)
        nll = predictor.shared_question_nll(
            [batch[i].question_ids for i in examples], question, rationales, answers, scored
        ).float()
        nll = nll * torch.tensor(scale, device=nll.device)
        out.index_add_(0, torch.tensor(slot, device=out.device), nll.to(out.device))
    return out.view(len(masked), len(batch))


@holds_lock("out_dir", directory=True)
def train_weighting(
    examples: Sequence[Example],
    config: WeightingConfig,
    out_dir: Path | None = None,
    progress: bool = True,
    on_step: Callable[[int, WeightingModel], None] | None = None,
) -> tuple[WeightingModel, list[dict[str, float]]]:
    """Train the module on ``examples``; with ``out_dir``, save checkpoint, history and weights.

    ``on_step(step, model)`` is called after every optimiser step (``step`` counts from 1), e.g. to
    measure the weights along the way; the module is put back in train mode after it."""
    rng = random.Random(config.seed)
    x = config.experimental  # the objective's experiment knobs
    model, student = build_weighting_model(config)
    if config.predictor is None:
        predictor_loaded = student
        if config.predictor_mode != "frozen":
            predictor_loaded = load_model(
                config.student, lora=LoraSettings() if config.predictor_mode == "lora" else None
            )
    else:
        predictor_loaded = load_model(
            config.predictor,
            lora=LoraSettings() if config.predictor_mode == "lora" else None,
            trainable=config.predictor_mode != "frozen",
        )
    predictor = AnswerPredictor(predictor_loaded, model.weighter.shape.hidden_size).to(config.device)
    if config.predictor_mode == "frozen":
        predictor.model.requires_grad_(False)
    predictor.model.train(config.predictor_mode != "frozen")
    encoded = _encode(examples, model.tokenizer, predictor.tokenizer, config.max_rationale_tokens)
    if not encoded:
        raise ConfigError("token weighting needs examples with rationales")
    groups = [
        {"params": [p for p in model.weighter.parameters() if p.requires_grad], "lr": config.lr},
        {"params": list(predictor.proj.parameters()), "lr": config.lr},
    ]
    predictor_params = [p for p in predictor.model.parameters() if p.requires_grad]
    if predictor_params:
        groups.append({"params": predictor_params, "lr": config.predictor_lr})
    groups = [g for g in groups if g["params"]]
    predictor_trains = any(p.requires_grad for p in predictor.parameters())
    if x.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    n_steps = config.epochs * math.ceil(len(encoded) / config.batch_size)
    if config.max_steps is not None:
        n_steps = min(n_steps, config.max_steps)
    history: list[dict[str, float]] = []
    step = 0
    sparsity = 0.0 if config.target_keep is not None else config.alpha  # L_m is constant under a budget
    bar = tqdm(total=n_steps, desc="token weighting", unit="step", disable=not progress)
    start_time = time.perf_counter()
    model.weighter.train()
    # The frozen predictor's weights in bf16 for the loop under bf16 on a CPU: autocast would cast
    # them again at every forward pass (the same rounding; kpod.models.frozen_linears_for); and
    # its norms' outputs cast once, not once per projection (kpod.models.norm_casts_shared); its
    # attention reads grouped key/value heads in place (kpod.models.gqa_attention_on_cpu).
    device_type = config.device.split(":")[0]
    precision = compute_precision(config.precision, device_type)  # auto: bf16 where its products are fast
    with (
        frozen_linears_for(predictor.model, precision, device_type),
        norm_casts_shared(predictor.model, torch.bfloat16),
        gqa_attention_on_cpu(),
    ):
        for epoch in range(config.epochs):
            order = list(range(len(encoded)))
            rng.shuffle(order)
            for start in range(0, len(order), config.batch_size):
                if step >= n_steps:
                    break
                batch = [encoded[i] for i in order[start : start + config.batch_size]]
                tau = x.tau
                if x.tau_final is not None and n_steps > 1:
                    tau = x.tau + (x.tau_final - x.tau) * step / (n_steps - 1)
                ids, mask = _pad(batch)
                ids, mask = ids.to(config.device), mask.to(config.device)
                valid = mask.float()
                # The prefix lengths of each rationale (the full one first), shared by all its samples.
                prefixes = [_prefix_lengths(len(b.rationale_ids), rng, config) for b in batch]
                with autocast(device_type, precision):
                    w = model.weighter(ids, mask, config.target_keep)
                    embedded = model.weighter.embeddings(ids)
                    if x.estimator == "straight-through":
                        keep = binary_gumbel_mask(w.float(), tau=tau, hard=True) * mask
                        masked = apply_mask(embedded, keep, model.weighter.mask_embedding)
                        answer_loss = _answer_losses(predictor, batch, [masked], prefixes)[0]
                        answer_term = answer_loss
                        mask_loss = mask_ratio_loss(keep, valid, x.normalize_mask_loss, x.kept_budget)
                    else:
                        # K exact Bernoulli(w) masks (Eq. 4's hard samples), scored without a gradient path
                        # through the embeddings; the mask embedding stays fixed (a trained one turns
                        # into a soft prompt that makes masking look free).
                        probs = w.detach().float()
                        draws = [binary_gumbel_mask(probs, tau=tau, hard=False) for _ in range(x.samples)]
                        keeps = [(draw > 0.5).float() * valid for draw in draws]
                        mask_emb = model.weighter.mask_embedding.detach()
                        with torch.set_grad_enabled(predictor_trains):
                            losses = _answer_losses(
                                predictor, batch, [apply_mask(embedded, k, mask_emb) for k in keeps], prefixes
                            )
                        log_probs = torch.stack([bernoulli_log_prob(k, w.float(), valid) for k in keeps])
                        answer_term = score_function_surrogate(losses, log_probs)
                        if predictor_trains:  # a trainable predictor learns from the masked rationales
                            answer_term = answer_term + losses.mean(dim=0)
                        answer_loss = losses.detach().mean(dim=0)
                        # E_m[L_m] = L_m(w): exact for Eq. 6 (linear in m), the usual relaxation for
                        # the hinge.
                        mask_loss = mask_ratio_loss(w.float(), valid, x.normalize_mask_loss, x.kept_budget)
                loss = keypoint_objective(answer_term, mask_loss, sparsity).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                kept_ratio = float((w.detach().float() * valid).sum() / valid.sum())
                history.append(
                    {
                        "step": step,
                        "epoch": epoch,
                        "loss": float(loss.detach()),
                        "answer_loss": float(answer_loss.detach().mean()),
                        "mask_loss": float(mask_loss.detach().mean()),
                        "kept_ratio": kept_ratio,
                        "sparsity": sparsity,
                        "tau": tau,
                    }
                )
                step += 1
                if on_step is not None:
                    on_step(step, model)
                    model.weighter.train()
                bar.update(1)
                bar.set_postfix(loss=f"{history[-1]['loss']:.2f}", kept=f"{kept_ratio:.2f}")
    bar.close()
    warning = collapse_warning(history[-1]["kept_ratio"], config)
    if warning is not None:
        log.warning(warning)
    if out_dir is not None:
        save_weighting(model, examples, out_dir, history, time.perf_counter() - start_time)
    return model, history


def collapse_warning(final_kept: float, config: WeightingConfig) -> str | None:
    """What to say when the trained weights ended near all-masked (mean w < 0.05) or all-kept
    (> 0.95), with advice that fits ``config`` (``None`` when they did not). Near all-kept the
    weighted loss is almost std-cot's; near all-masked it hardly trains the student."""
    if config.target_keep is not None or 0.05 <= final_kept <= 0.95:
        return None  # under a budget the mean weight is the budget by construction
    kept = final_kept > 0.95
    advice = ["a larger alpha" if kept else "a smaller alpha"]
    if not config.experimental.normalize_mask_loss:
        advice.append("experimental.normalize_mask_loss: true")
    if kept and config.rescale == "none":
        advice.append(f"rescale: minmax (each rationale's weights spread onto [{config.rescale_floor:g}, 1])")
    if not kept and config.experimental.kept_budget is None:
        advice.append("experimental.kept_budget (penalise only the kept tokens beyond a share)")
    side = "kept" if kept else "masked"
    tries = " or ".join(advice)
    return f"token weights collapsed towards all-{side} (mean w = {final_kept:.3f}): try {tries}"


def save_weighting(
    model: WeightingModel,
    examples: Sequence[Example],
    out_dir: Path,
    history: list[dict[str, float]],
    seconds: float,
) -> None:
    """Write the module checkpoint, its config, the training history and ``weights.jsonl``."""
    out_dir = Path(out_dir)
    model.weighter.save(out_dir)
    write_json(out_dir / "config.json", model.config.settings())  # flat, as before the sub-section
    write_jsonl(out_dir / "history.jsonl", history)
    rows = model.weigh(examples)
    save_weights(out_dir / WEIGHTS_FILE, rows)
    write_json(
        out_dir / "summary.json",
        {
            "train_seconds": round(seconds, 1),
            "rationales": len(rows),
            "final": history[-1] if history else {},
        },
    )


def load_weighting_model(directory: Path) -> WeightingModel:
    """A trained module from its directory (the student is loaded for its embeddings)."""
    directory = Path(directory)
    config = WeightingConfig.from_settings(json.loads((directory / "config.json").read_text()))
    student = load_model(config.student, trainable=False)
    weighter = KeypointWeighter.load(directory, student.model.get_input_embeddings().weight).to(config.device)
    return WeightingModel(weighter, student.tokenizer, config)
