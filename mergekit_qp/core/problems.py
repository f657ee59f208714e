"""One tensor's merge problem, assembled from the base, the experts and their statistics, and
solved (pure torch; the mergekit method in plugin/method.py is a thin adapter over this).

- linear maps: W (and its bias, jointly, in homogeneous coordinates x → [x, 1]), GPT-2's
  Conv1D solved on the transpose of its stored (in × out) weight; with expert-output
  statistics (sequential merging) the task vectors are replaced by drift-corrected ones;
- norm scales and biases: per feature, from E[x̃²] and E[x̃];
- embeddings: token-frequency-weighted rows;
- the fallback of tensors without statistics.
Everything is computed in float64 and returned in the model's dtype.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from . import qp, svc, tied_embedding
from .svc import DEFAULT_RULE as DEFAULT_SVC_RULE  # the dataclass field `svc` shadows the module there
from .objective import FullSystem, Objective, full_update_by_rows, full_update_with_objective, objective, \
    solve_by_rows
from .statistics import EmbeddingStats, LinearStats, NormStats

__all__ = ["Basis", "LinearSolution", "ProblemMismatch", "SharedSystems", "SolveSettings", "augmented_gram", "fallback_update",
           "solve_embedding", "solve_linear", "solve_norm", "svc_in_model_precision"]

FALLBACKS = ("linear", "task_arithmetic", "base")


class ProblemMismatch(Exception):
    """Statistics exist but do not fit this tensor: the caller falls back rather than guess."""


@dataclass(frozen=True)
class Basis:
    kind: str  # full | diagonal | task | rank
    rank: Optional[int] = None

    @staticmethod
    def parse(text: str) -> "Basis":
        value = str(text).strip().lower()
        if value in ("full", "diagonal", "task"):
            return Basis(value)
        match = re.fullmatch(r"rank-(\d+)", value)
        if match and int(match.group(1)) >= 1:
            return Basis("rank", int(match.group(1)))
        raise ValueError(
            f"output_qp: invalid basis {text!r}; valid: full, diagonal, task, rank-N (N ≥ 1, e.g. rank-16)"
        )


@dataclass(frozen=True)
class SolveSettings:
    """The settings a solve depends on (what must agree between a weight and its bias)."""

    basis: Basis = Basis("full")
    ridge: float = 1e-4
    nonneg: bool = False
    sum_to_one: bool = False
    svc: bool = False
    svc_alpha: Optional[float] = None
    svc_rule: str = DEFAULT_SVC_RULE


def augmented_gram(gram: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The Gram of [x, 1] (homogeneous coordinates) from E[x xᵀ] and E[x]."""
    d = gram.shape[0]
    # At least float32: a mean rounded to a bfloat16 Gram's precision would move the bias.
    out = gram.new_ones((d + 1, d + 1), dtype=torch.promote_types(gram.dtype, torch.float32))
    out[:d, :d] = gram
    out[:d, d] = mean
    out[d, :d] = mean
    return out


def solve_update(deltas, grams, weights, settings: SolveSettings) -> torch.Tensor:
    """The update Δ of the chosen basis (float64)."""
    basis, ridge = settings.basis, float(settings.ridge)
    if basis.kind == "full":
        return qp.full_update(deltas, grams, weights, ridge).double()
    if basis.kind == "diagonal":
        return qp.diagonal_update(deltas, [torch.diagonal(g) for g in grams], weights, ridge).double()
    if basis.kind == "task":
        update, _ = qp.task_update(deltas, grams, weights, ridge, nonneg=settings.nonneg,
                                   sum_to_one=settings.sum_to_one)
        return update.double()
    return qp.low_rank_update(deltas, grams, weights, ridge, basis.rank).double()


def svc_in_model_precision(update: torch.Tensor, deltas, alpha, model_dtype: torch.dtype,
                           rule: str = svc.DEFAULT_RULE) -> torch.Tensor:
    """`svc.calibrate` of a float64 update, worked in float32 (float64 for float64 models) as
    `<method>_svc` does on the same model: the rule's presence floor is relative to the working
    precision, so the precision is part of the rule."""
    work = torch.float64 if model_dtype == torch.float64 else torch.float32
    return svc.calibrate(update.to(work), [d.to(work) for d in deltas], alpha, rule).update.double()


@dataclass
class LinearSolution:
    weight: torch.Tensor  # stored layout, model dtype
    bias: Optional[torch.Tensor]
    objective: Objective  # of the joint (weight, bias) update, unreachable energy included


ROW_BLOCK_BYTES = 1 << 25  # one float64 buffer of a block of output rows (32 MB)


class SharedSystems:
    """The factorised full-basis system of the last shared input, so that projections reading
    one Gram (q/k/v, gate/up) factorise it once, not three times. One system is held at a
    time, and none once the solves move on to another layer (`enter`), so it never sits
    beside a wider solve of the next layer. Thread-safe; a merge holds one (MergeState)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._layer: Optional[str] = None
        self._key = self._system = None

    def enter(self, layer: str) -> None:
        """Solves of `layer` follow: drop a system of another layer."""
        with self._lock:
            if layer != self._layer:
                self._layer, self._key, self._system = layer, None, None

    def get(self, key, build) -> FullSystem:
        with self._lock:
            if key == self._key:
                return self._system
        system = build()
        with self._lock:
            self._key, self._system = key, system
        return system


def solve_linear(base_weight: torch.Tensor, expert_weights: Sequence[torch.Tensor], stats: Sequence[LinearStats],
                 weights: Sequence[float], settings: SolveSettings, base_bias: Optional[torch.Tensor] = None,
                 expert_biases: Optional[Sequence[torch.Tensor]] = None,
                 systems: Optional[SharedSystems] = None) -> LinearSolution:
    """The merged weight (and bias) of one linear map. `systems`: where the statistics say
    the input is shared (LinearStats.shared_input), a full-basis factorisation is reused."""
    transposed = stats[0].transposed  # GPT-2 Conv1D: solve on the transpose, return the stored layout
    device = base_weight.device
    d = base_weight.shape[0] if transposed else base_weight.shape[1]
    # Statistics stay in their stored precision here: the solver converts one task's Gram at a
    # time to float64 (K float64 copies of a 14336-wide Gram would be 1.6 GB each).
    grams = [s.gram.to(device) for s in stats]
    if any(g.shape != (d, d) for g in grams):
        raise ProblemMismatch(f"statistics of width {grams[0].shape[0]} for a weight of width {d}")
    with_bias = base_bias is not None
    expert_output = stats[0].cross is not None

    def as_solved(w: torch.Tensor) -> torch.Tensor:
        return w.double().T if transposed else w.double()

    if with_bias:
        grams = [augmented_gram(g, s.mean.to(device)) for g, s in zip(grams, stats)]
    m = base_weight.shape[1] if transposed else base_weight.shape[0]
    system = None
    if settings.basis.kind == "full" and not settings.svc and not expert_output:
        def build():
            return FullSystem(grams, weights, float(settings.ridge))
        shared = [s.shared_input for s in stats]
        if systems is not None and all(shared):
            key = (tuple(shared), tuple(float(w) for w in weights), float(settings.ridge), with_bias, str(device))
            system = systems.get(key, build)
        else:
            system = build()
        block_rows = solve_by_rows(m, grams[0].shape[0], len(expert_weights), ROW_BLOCK_BYTES)
        if block_rows:
            return _solve_linear_by_rows(base_weight, expert_weights, system, base_bias, expert_biases, transposed,
                                         block_rows)
    w0 = as_solved(base_weight)
    if with_bias:
        w0 = torch.cat([w0, base_bias.double()[:, None]], 1)
    # The experts' float64 weights are kept only where the expert-output target needs them:
    # each is a full m × d copy.
    experts_w, deltas = [], []
    for k, w in enumerate(expert_weights):
        wk = as_solved(w)
        if with_bias:
            wk = torch.cat([wk, expert_biases[k].double()[:, None]], 1)
        deltas.append(wk - w0)
        if expert_output:
            experts_w.append(wk)
        del wk
    weight_deltas = [dk[:, :d] for dk in deltas]  # the experts' own updates of W (SVC measures overlap)
    unreachable = None
    if expert_output:
        deltas, unreachable = expert_output_task_vectors(w0, experts_w, deltas, grams, stats, with_bias)
    solved = None
    if system is not None:
        # The report's terms from the solve's own products (≈ one d-wide product, not 2K).
        update, solved = full_update_with_objective(deltas, grams, weights, float(settings.ridge), system)
        update = update.double()
    else:
        update = solve_update(deltas, grams, weights, settings)
    if settings.svc:
        update = update.clone()
        update[:, :d] = svc_in_model_precision(update[:, :d], weight_deltas, settings.svc_alpha, base_weight.dtype,
                                                  settings.svc_rule)
    new_w = w0[:, :d] + update[:, :d]
    new_w = (new_w.T if transposed else new_w).to(base_weight.dtype)
    new_b = None if not with_bias else (base_bias.double() + update[:, d]).to(base_bias.dtype)
    return LinearSolution(new_w, new_b, _objective(update, deltas, grams, weights, unreachable, solved))


def _solve_linear_by_rows(base_weight, expert_weights, system: FullSystem, base_bias, expert_biases,
                          transposed: bool, block_rows: int) -> LinearSolution:
    """solve_linear's full-basis solve in blocks of output rows (objective.full_update_by_rows):
    the experts' float64 rows are made per block, the merged rows written straight into the
    output, so an output head's m × d float64 copies are never whole."""
    m, d = (base_weight.shape[1], base_weight.shape[0]) if transposed else tuple(base_weight.shape)

    def solved_rows(w: torch.Tensor, bias: Optional[torch.Tensor], rows: slice) -> torch.Tensor:
        out = w[:, rows].double().T if transposed else w[rows].double()
        return out if bias is None else torch.cat([out, bias[rows].double()[:, None]], 1)

    def rows_of(rows: slice):
        w0 = solved_rows(base_weight, base_bias, rows)
        return [solved_rows(w, None if expert_biases is None else expert_biases[k], rows) - w0
                for k, w in enumerate(expert_weights)]

    new_w = torch.empty((m, d), dtype=base_weight.dtype, device=base_weight.device)
    new_b = None if base_bias is None else torch.empty_like(base_bias)

    def write(rows: slice, update: torch.Tensor) -> None:
        update = update.double()
        new_w[rows] = (solved_rows(base_weight, None, rows) + update[:, :d]).to(new_w.dtype)
        if new_b is not None:
            new_b[rows] = (base_bias[rows].double() + update[:, d]).to(new_b.dtype)

    solved = full_update_by_rows(rows_of, m, system, write, block_rows)
    return LinearSolution(new_w.T if transposed else new_w, new_b, solved)


def _objective(update, deltas, grams, weights, unreachable, solved: Optional[Objective] = None) -> Objective:
    result = solved if solved is not None else objective(update, deltas, grams, weights)
    if unreachable is None:
        return result
    # Energy no weight of this layer can reach (drift of the inputs): counted in both J and E,
    # so that ρ is the share of the experts' true output change kept.
    per = tuple(j + u for j, u in zip(result.per_task, unreachable))
    energy = tuple(e + u for e, u in zip(result.energy_per_task, unreachable))
    return Objective(per, energy, sum(w * j for w, j in zip(weights, per)),
                     sum(w * e for w, e in zip(weights, energy)))


def expert_output_task_vectors(w0, experts_w, deltas, grams, stats, with_bias: bool) -> Tuple[List, List[float]]:
    """Equivalent task vectors for the expert-output target (qp.drift_corrected_task_vector) and,
    per task, the output energy that no update of this weight can reach."""
    device = w0.device
    new_deltas, unreachable = [], []
    for wk, dk, gk, s in zip(experts_w, deltas, grams, stats):
        gk = gk.to(device, torch.float64)
        ck = s.cross.to(device, torch.float64)
        ek = s.expert_gram.to(device, torch.float64)
        if with_bias:
            mean, expert_mean = s.mean.to(device, torch.float64), s.expert_mean.to(device, torch.float64)
            ck = torch.cat([torch.cat([ck, expert_mean[:, None]], 1), torch.cat([mean, mean.new_ones(1)])[None]], 0)
            ek = augmented_gram(ek, expert_mean)
        if ck.shape != gk.shape:
            raise ProblemMismatch(f"cross statistics of shape {tuple(ck.shape)} for a Gram of shape {tuple(gk.shape)}")
        corrected = qp.drift_corrected_task_vector(dk, wk, ck, gk)
        # ‖Xk Wkᵀ − X̂ W0ᵀ‖²/n, and the part of it the equivalent problem sees.
        true_energy = float(((wk @ ek) * wk).sum() - 2 * ((wk @ ck) * w0).sum() + ((w0 @ gk) * w0).sum())
        seen = float(((corrected @ gk) * corrected).sum())
        new_deltas.append(corrected)
        unreachable.append(max(0.0, true_energy - seen))
    return new_deltas, unreachable


def solve_norm(base_scale: torch.Tensor, expert_scales: Sequence[torch.Tensor], stats: Sequence[NormStats],
               weights: Sequence[float], ridge: float, base_bias: Optional[torch.Tensor] = None,
               expert_biases: Optional[Sequence[torch.Tensor]] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The merged scale (and bias) of a norm layer, in the model's dtype."""
    if any(s.m2.shape != base_scale.shape for s in stats):
        raise ProblemMismatch(f"statistics of width {stats[0].m2.shape[0]} for a norm of width {base_scale.shape[0]}")
    dev = base_scale.device
    scale_deltas = [e.double() - base_scale.double() for e in expert_scales]
    bias_deltas = None if base_bias is None else [e.double() - base_bias.double() for e in expert_biases]
    m2 = [s.m2.to(dev, torch.float64) for s in stats]
    m1 = [s.m1.to(dev, torch.float64) for s in stats]
    if stats[0].cross is not None:
        scale_deltas, bias_deltas = _expert_output_norm(expert_scales, expert_biases, scale_deltas, bias_deltas,
                                                        stats, m2, m1)
    scale, bias = qp.featurewise_affine_update(scale_deltas, bias_deltas, m2, m1, weights, float(ridge))
    new_scale = (base_scale.double() + scale.to(dev).double()).to(base_scale.dtype)
    new_bias = None if base_bias is None else (base_bias.double() + bias.to(dev).double()).to(base_bias.dtype)
    return new_scale, new_bias


def _expert_output_norm(expert_scales, expert_biases, scale_deltas, bias_deltas, stats, m2, m1):
    """The expert-output target for a norm layer: per feature, the same correction as for a
    linear map on [x̃, 1] (a 1×1 or 2×2 system per feature)."""
    out_scale, out_bias = [], []
    for k, s in enumerate(stats):
        dev = m2[k].device
        cross = s.cross.to(dev, torch.float64)
        gamma = expert_scales[k].double()
        if expert_biases is None:
            v, w = scale_deltas[k][:, None, None], gamma[:, None, None]
            c, g = cross[:, None, None], m2[k][:, None, None]
        else:
            beta = expert_biases[k].double()
            expert_m1 = s.expert_m1.to(dev, torch.float64)
            one = torch.ones_like(gamma)
            v = torch.stack([scale_deltas[k], bias_deltas[k]], -1)[:, None, :]
            w = torch.stack([gamma, beta], -1)[:, None, :]
            c = torch.stack([torch.stack([cross, expert_m1], -1), torch.stack([m1[k], one], -1)], -2)
            g = torch.stack([torch.stack([m2[k], m1[k]], -1), torch.stack([m1[k], one], -1)], -2)
        corrected = qp.drift_corrected_task_vector(v, w, c, g)[:, 0, :]
        out_scale.append(corrected[:, 0])
        if expert_biases is not None:
            out_bias.append(corrected[:, 1])
    return out_scale, (out_bias if expert_biases is not None else None)


def solve_embedding(base: torch.Tensor, experts: Sequence[torch.Tensor], stats: Sequence[EmbeddingStats],
                    weights: Sequence[float], ridge: float) -> torch.Tensor:
    """Each row the token-frequency-weighted average of the experts' rows (model dtype)."""
    if any(s.freq.shape[0] != base.shape[0] for s in stats):
        raise ProblemMismatch(f"token statistics for {stats[0].freq.shape[0]} rows, embedding has {base.shape[0]}")
    counts = [s.freq.to(base.device, torch.float64) for s in stats]
    lam = qp.rowwise_ridge(counts, weights, float(ridge))
    out = torch.empty_like(base)
    # Rows are independent given λ: blocks of rows keep the float64 copies small (a 128k-token
    # vocabulary's m × d float64 buffers are 4 GB each at width 4096).
    block = max(1, ROW_BLOCK_BYTES // (8 * base.shape[1]))
    for start in range(0, base.shape[0], block):
        rows = slice(start, start + block)
        deltas = [e[rows].double() - base[rows].double() for e in experts]
        update = qp.rowwise_update(deltas, [c[rows] for c in counts], weights, float(ridge), lam=lam)
        out[rows] = (base[rows].double() + update.to(base.device).double()).to(base.dtype)
    return out


def solve_tied_embedding(base: torch.Tensor, experts: Sequence[torch.Tensor], stats: Sequence[EmbeddingStats],
                         head: Sequence[LinearStats], weights: Sequence[float], ridge: float) -> torch.Tensor:
    """A tied embedding (the input embedding that is also the output head): each row solved for
    both roles, token frequencies as input and the output head's input Gram
    (tied_embedding.tied_rowwise_update), in blocks of rows on the Grams' one eigendecomposition (model dtype)."""
    if any(s.freq.shape[0] != base.shape[0] for s in stats):
        raise ProblemMismatch(f"token statistics for {stats[0].freq.shape[0]} rows, embedding has {base.shape[0]}")
    if any(h.gram.shape[-1] != base.shape[1] for h in head):
        raise ProblemMismatch(f"output head statistics of width {head[0].gram.shape[-1]}, embedding has {base.shape[1]}")
    system = tied_embedding.TiedEmbeddingSystem([h.gram for h in head], weights, float(ridge), device=base.device)
    counts = [s.freq.to(base.device, torch.float64) for s in stats]
    out = torch.empty_like(base)
    block = max(1, ROW_BLOCK_BYTES // (8 * base.shape[1]))
    for start in range(0, base.shape[0], block):
        rows = slice(start, start + block)
        deltas = [e[rows].double() - base[rows].double() for e in experts]
        update = tied_embedding.tied_rowwise_update(deltas, [c[rows] for c in counts], system)
        out[rows] = (base[rows].double() + update.to(base.device).double()).to(base.dtype)
    return out


def fallback_update(base: torch.Tensor, experts: Sequence[torch.Tensor], weights: Sequence[float], method: str,
                    svc_alpha: Optional[float] = None, calibrate: bool = False,
                    svc_rule: str = svc.DEFAULT_RULE) -> torch.Tensor:
    """A tensor without statistics: `linear` (weighted average), `task_arithmetic` (base + Σ ωΔ)
    or `base`; with `calibrate`, singular value calibration of the update (2-D weights)."""
    if method not in FALLBACKS:
        raise ValueError(f"output_qp: invalid fallback {method!r}; valid: {', '.join(FALLBACKS)}")
    if method == "base" or not base.is_floating_point():
        return base
    deltas = [e.double() - base.double() for e in experts]
    total = sum(w * d for w, d in zip(weights, deltas))
    if method == "linear":
        total = total / sum(weights)
    if calibrate:
        total = svc_in_model_precision(total, deltas, svc_alpha, base.dtype, svc_rule)
    return (base.double() + total).to(base.dtype)
