"""Synthetic sources with exact answers: documents of symbols whose law is known exactly.

At CPU scale, models of real text learn little beyond unigram statistics, so no comparison of
methods can be decided on it. A source with known law can: the bound gap (bound minus the exact
-log p of the same row), the exact NLL of generated samples and the fraction that are impossible,
and the generated length law against the true one are all computable exactly.

Every source is a finite probabilistic automaton A = (init, trans, stop) over V symbols: in
state s it emits symbol o and moves to s' with probability trans[s, o, s'], or stops with
probability stop[s]; a document is the emitted symbols. The law used everywhere is A's law
CONDITIONED on min_length <= length <= max_length, so that data preparation never truncates or
drops a document (which would change the law). The conditioning is exact, by an h-transform
on (state, symbols so far): h[n, s] = P(A stops with a length in range | state s after n
symbols), and the conditioned automaton moves with trans[s, o, s'] h[n+1, s'] / h[n, s]. So
sampling needs no rejection, and log p, the length law, the entropy and the law of a window of
the stream of documents joined by EOS (the fixed layout) are exact.

Two sources (SOURCES):
* `hmm`: a sparse hidden Markov model with an end state. Each state emits from a few symbols
  shared with its neighbours, so the state, and with it the next symbol, depends on the whole
  history, not on the last token; only some states may stop, so the length law has structure.
  Its entropy has no closed form: Monte Carlo with a stated standard error.
* `dyck`: bounded-depth Dyck words with several bracket types and filler symbols whose law
  depends on the innermost open bracket. Why it tests what the paper claims: (1) a closing
  bracket must match an opening one any distance back, a long-range dependency; (2) validity is
  exact and binary, and bracket pairs placed in parallel without coordination (a masked model
  unmasking many positions per step) produce mismatches, so the invalid fraction at few
  sampling steps measures the factorisation error of parallel decoding; (3) every Dyck word is
  built by inserting matched pairs and fillers anywhere, the operation an insertion model
  performs, while a left-to-right model must carry a stack. The automaton is deterministic
  (the document determines the path), so the entropy is exact.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from harness.core.errors import UserError

#: the corpus name under which data.corpus selects a synthetic source
CORPUS = "synthetic"


@dataclass
class Source:
    """A finite automaton conditioned on its length range (see the module docstring).

    init [K], trans [K, V, K], stop [K] with trans.sum((1, 2)) + stop == 1 per state.
    `deterministic`: init is one-hot and (state, symbol) fixes the next state.
    """

    name: str
    symbols: list[str]
    init: np.ndarray
    trans: np.ndarray
    stop: np.ndarray
    min_length: int
    max_length: int
    deterministic: bool = False
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        self.init = np.asarray(self.init, np.float64)
        self.trans = np.asarray(self.trans, np.float64)
        self.stop = np.asarray(self.stop, np.float64)
        k, v, k2 = self.trans.shape
        if k != k2 or self.init.shape != (k,) or self.stop.shape != (k,) or v != len(self.symbols):
            raise ValueError("inconsistent automaton shapes")
        if not np.allclose(self.trans.sum((1, 2)) + self.stop, 1.0) or not np.isclose(self.init.sum(), 1.0):
            raise ValueError("automaton probabilities do not sum to one")
        if not 0 <= self.min_length <= self.max_length:
            raise UserError(f"synthetic source {self.name!r}: need 0 <= min_length <= max_length, "
                            f"got {self.min_length}, {self.max_length}")
        self.n_states, self.n_symbols = k, v
        self.eos = v  # the stream's document separator, in the source's own alphabet
        hi = self.max_length
        self.stop_ok = np.zeros(hi + 2)
        self.stop_ok[self.min_length : hi + 1] = 1.0
        self.step_matrix = self.trans.sum(1)  # [K, K]: emit anything
        h = np.zeros((hi + 2, k))
        for n in range(hi, -1, -1):
            h[n] = self.stop * self.stop_ok[n] + self.step_matrix @ h[n + 1]
        self.h = h
        self.z = float(self.init @ h[0])
        if self.z <= 0:
            raise UserError(f"synthetic source {self.name!r}: no document has a length in "
                            f"[{self.min_length}, {self.max_length}]")
        self.init_c = self.init * h[0] / self.z
        with np.errstate(divide="ignore", invalid="ignore"):
            self.inv_h = np.where(h > 0, 1.0 / h, 0.0)

    # --- documents ------------------------------------------------------------------------
    def sample(self, n: int, rng: np.random.Generator) -> list[np.ndarray]:
        """`n` documents (symbol ids) of the conditioned law, drawn in parallel."""
        k, v = self.n_states, self.n_symbols
        state = rng.choice(k, size=n, p=self.init_c)
        alive = np.ones(n, bool)
        out = np.zeros((n, self.max_length), np.int64)
        lengths = np.zeros(n, np.int64)
        for step in range(self.max_length + 1):
            idx = np.flatnonzero(alive)
            if idx.size == 0:
                break
            s = state[idx]
            emit = (self.trans[s] * self.h[step + 1][None, None, :]).reshape(idx.size, v * k)
            weights = np.concatenate([emit, (self.stop[s] * self.stop_ok[step])[:, None]], axis=1)
            cdf = np.cumsum(weights, axis=1)
            u = rng.random(idx.size) * cdf[:, -1]
            choice = np.minimum((cdf < u[:, None]).sum(1), v * k)
            stopped = choice == v * k
            alive[idx[stopped]] = False
            go = idx[~stopped]
            if go.size == 0:
                break
            sym, nxt = np.divmod(choice[~stopped], k)
            out[go, step] = sym
            state[go] = nxt
            lengths[go] += 1
        return [out[i, : lengths[i]].copy() for i in range(n)]

    def log_prob(self, doc) -> float:
        """Exact log p(doc) under the conditioned law; -inf when impossible (any id >= V too)."""
        doc = np.asarray(doc, np.int64)
        if not self.min_length <= doc.size <= self.max_length:
            return -math.inf
        if doc.size and (doc.min() < 0 or doc.max() >= self.n_symbols):
            return -math.inf
        alpha, log_scale = self.init.copy(), 0.0
        for o in doc:
            alpha = alpha @ self.trans[:, o, :]
            c = alpha.sum()
            if c <= 0:
                return -math.inf
            alpha /= c
            log_scale += math.log(c)
        end = float(alpha @ self.stop)
        return log_scale + math.log(end) - math.log(self.z) if end > 0 else -math.inf

    def length_pmf(self) -> np.ndarray:
        """P(length = n) for n = 0..max_length (zero outside [min_length, max_length])."""
        pmf = np.zeros(self.max_length + 1)
        a = self.init.copy()
        for n in range(self.max_length + 1):
            pmf[n] = (a @ self.stop) * self.stop_ok[n]
            a = a @ self.step_matrix
        return pmf / self.z

    def entropy(self, n_mc: int = 4000, seed: int = 0) -> dict:
        """Entropy per document (nats): exact for a deterministic automaton, else Monte Carlo.

        {"nats_per_document", "stderr" (0 when exact), "method", "mean_length"}.
        """
        mean_length = float(np.arange(self.max_length + 1) @ self.length_pmf())
        if self.deterministic:
            return {"nats_per_document": self._exact_entropy(), "stderr": 0.0, "method": "exact",
                    "mean_length": mean_length}
        docs = self.sample(n_mc, np.random.default_rng(seed))
        nll = -np.array([self.log_prob(d) for d in docs])
        return {"nats_per_document": float(nll.mean()), "stderr": float(nll.std(ddof=1) / math.sqrt(n_mc)),
                "method": f"monte carlo, {n_mc} documents", "mean_length": mean_length}

    def _exact_entropy(self) -> float:
        """sum over (count, state) of expected visits x entropy of the conditioned choice there."""
        k, v = self.n_states, self.n_symbols
        visits = self.init_c.copy()
        total = -float(np.sum(self.init_c[self.init_c > 0] * np.log(self.init_c[self.init_c > 0])))
        for n in range(self.max_length + 1):
            emit = self.trans * (self.h[n + 1][None, None, :] * self.inv_h[n][:, None, None])
            q = np.concatenate([emit.reshape(k, v * k), (self.stop * self.stop_ok[n] * self.inv_h[n])[:, None]], 1)
            with np.errstate(divide="ignore", invalid="ignore"):
                local = -np.where(q > 0, q * np.log(q), 0.0).sum(1)
            total += float(visits @ local)
            visits = visits @ emit.sum(1)
        return total

    # --- the stream of documents joined by EOS (the fixed layout) ---------------------------
    def _stream_step(self, alpha: np.ndarray, tokens: np.ndarray | None) -> np.ndarray:
        """One stream position for a batch of (count, state) distributions alpha [R, N+1, K].

        tokens [R] (source ids; EOS = V; anything else impossible) -> unnormalised alpha';
        tokens None -> the marginal step (every token summed over).
        """
        beta = alpha * self.inv_h[None, : self.max_length + 1]
        ended = (beta * (self.stop[None, None, :] * self.stop_ok[None, : self.max_length + 1, None])).sum((1, 2))
        out = np.zeros_like(alpha)
        if tokens is None:
            out[:, 1:] = np.einsum("rns,st->rnt", beta[:, :-1], self.step_matrix) * self.h[None, 1 : self.max_length + 1]
            out[:, 0] = ended[:, None] * self.init_c[None]
            return out
        sym = (tokens >= 0) & (tokens < self.n_symbols)
        if sym.any():
            m = self.trans[:, np.clip(tokens[sym], 0, self.n_symbols - 1), :].transpose(1, 0, 2)  # [r, K, K]
            out[sym, 1:] = np.einsum("rns,rst->rnt", beta[sym, :-1], m) * self.h[None, 1 : self.max_length + 1]
        eos = tokens == self.eos
        out[eos, 0] = ended[eos, None] * self.init_c[None]
        return out

    def stream_start(self, positions) -> np.ndarray:
        """The exact (count, state) distribution at each stream position (the stream starts at 0)."""
        positions = [int(p) for p in positions]
        where: dict[int, list[int]] = {}
        for i, p in enumerate(positions):
            where.setdefault(p, []).append(i)
        out = np.zeros((len(positions), self.max_length + 1, self.n_states))
        alpha = np.zeros((1, self.max_length + 1, self.n_states))
        alpha[0, 0] = self.init_c
        for p in range(max(positions, default=-1) + 1):
            for i in where.get(p, ()):
                out[i] = alpha[0]
            alpha = self._stream_step(alpha, None)
            alpha /= alpha.sum()
        return out

    def stationary(self, tol: float = 1e-12, max_iter: int = 200_000) -> np.ndarray:
        """The stationary (count, state) distribution of the stream (lazy power iteration)."""
        alpha = np.zeros((1, self.max_length + 1, self.n_states))
        alpha[0, 0] = self.init_c
        for _ in range(max_iter):
            nxt = 0.5 * (alpha + self._stream_step(alpha, None))
            nxt /= nxt.sum()
            if np.abs(nxt - alpha).sum() < tol:
                return nxt[0]
            alpha = nxt
        return alpha[0]

    def stream_log_prob(self, windows: np.ndarray, start: np.ndarray) -> np.ndarray:
        """Exact log p of stream windows [R, W] (source ids, EOS = V) from start distributions
        [R, N+1, K] (or one [N+1, K] for all); -inf where impossible."""
        windows = np.asarray(windows, np.int64)
        r = windows.shape[0]
        alpha = np.broadcast_to(start, (r,) + start.shape[-2:]).copy()
        logp = np.zeros(r)
        for j in range(windows.shape[1]):
            alpha = self._stream_step(alpha, windows[:, j])
            c = alpha.sum((1, 2))
            ok = c > 0
            logp[~ok] = -math.inf
            alpha[ok] /= c[ok, None, None]
            logp[ok] += np.log(c[ok])
        return logp

    def describe(self) -> dict:
        return {"source": self.name, "symbols": list(self.symbols), "states": self.n_states,
                "min_length": self.min_length, "max_length": self.max_length,
                "deterministic": self.deterministic, "options": dict(self.options)}


# ============================================================================================
# The sources
# ============================================================================================
def hmm_source(states: int = 8, symbols: int = 12, emit_support: int = 3, stop: float = 0.08,
               min_length: int = 1, max_length: int = 63, seed: int = 0) -> Source:
    """Sparse HMM: state s mostly moves to s+1 (else stays or jumps), emits from `emit_support`
    symbols starting at its own (overlapping with its neighbours'); only even states may stop."""
    if states < 2 or symbols < 2 or not 1 <= emit_support <= symbols or not 0 < stop < 1:
        raise UserError("synthetic hmm: need states >= 2, symbols >= 2, 1 <= emit_support <= symbols, 0 < stop < 1")
    rng = np.random.default_rng(seed)
    a = np.zeros((states, states))
    for s in range(states):
        jump = int(rng.integers(states))
        w = rng.dirichlet([4.0, 1.5, 1.0])
        a[s, (s + 1) % states] += w[0]
        a[s, s] += w[1]
        a[s, jump] += w[2]
    b = np.zeros((states, symbols))
    for s in range(states):
        cols = [(s * symbols // states + j) % symbols for j in range(emit_support)]
        b[s, cols] = rng.dirichlet(np.full(emit_support, 2.0))
    end = np.where(np.arange(states) % 2 == 0, stop, 0.0)
    trans = (1 - end)[:, None, None] * b[:, :, None] * a[:, None, :]
    init = np.zeros(states)
    init[0] = 1.0
    names = [chr(ord("a") + i) if i < 26 else f"s{i}" for i in range(symbols)]
    opts = {"states": states, "symbols": symbols, "emit_support": emit_support, "stop": stop, "seed": seed}
    return Source("hmm", names, init, trans, end, min_length, max_length, deterministic=False, options=opts)


BRACKETS = ["()", "[]", "{}", "<>"]


def dyck_source(types: int = 2, depth: int = 3, fillers: int = 4, p_open: float = 0.3, p_close: float = 0.35,
                p_stop: float = 0.15, min_length: int = 2, max_length: int = 63, seed: int = 0) -> Source:
    """Dyck words of `types` bracket kinds nested at most `depth` deep, with `fillers` symbols
    whose law depends on the innermost open bracket (one Dirichlet draw per bracket kind)."""
    if not 1 <= types <= len(BRACKETS) or depth < 1 or not 1 <= fillers <= 20:
        raise UserError(f"synthetic dyck: need 1 <= types <= {len(BRACKETS)}, depth >= 1, 1 <= fillers <= 20")
    if min(p_open, p_close, p_stop) <= 0 or p_open + p_close >= 1:
        raise UserError("synthetic dyck: need p_open, p_close, p_stop > 0 and p_open + p_close < 1")
    rng = np.random.default_rng(seed)
    filler_law = rng.dirichlet(np.full(fillers, 0.7), size=types + 1)  # row `types` = top level
    stacks = [()] + [s for d in range(1, depth + 1) for s in itertools.product(range(types), repeat=d)]
    index = {s: i for i, s in enumerate(stacks)}
    symbols = [BRACKETS[t][0] for t in range(types)] + [BRACKETS[t][1] for t in range(types)]
    symbols += [chr(ord("a") + f) for f in range(fillers)]
    k, v = len(stacks), len(symbols)
    trans, stop = np.zeros((k, v, k)), np.zeros(k)
    for s, stack in enumerate(stacks):
        top = stack[-1] if stack else types
        choices = []  # (weight, symbol, next state) with stop as symbol None
        if len(stack) < depth:
            choices += [(p_open / types, t, index[stack + (t,)]) for t in range(types)]
        if stack:
            choices.append((p_close, types + stack[-1], index[stack[:-1]]))
        else:
            choices.append((p_stop, None, None))
        p_fill = 1.0 - p_open - p_close
        choices += [(p_fill * filler_law[top, f], 2 * types + f, s) for f in range(fillers)]
        total = sum(w for w, _, _ in choices)
        for w, sym, nxt in choices:
            if sym is None:
                stop[s] = w / total
            else:
                trans[s, sym, nxt] += w / total
    init = np.zeros(k)
    init[0] = 1.0
    opts = {"types": types, "depth": depth, "fillers": fillers, "p_open": p_open, "p_close": p_close,
            "p_stop": p_stop, "seed": seed}
    return Source("dyck", symbols, init, trans, stop, min_length, max_length, deterministic=True, options=opts)


SOURCES = {"hmm": hmm_source, "dyck": dyck_source}
#: the corpus spec keys that are not options of the source itself
CORPUS_KEYS = ("name", "source", "documents")


def source_from_spec(spec: dict) -> Source:
    """The source named by a `data.corpus` mapping {name: synthetic, source, documents, **options}."""
    spec = dict(spec)
    name = spec.get("source")
    if name not in SOURCES:
        raise UserError(f"synthetic corpus: unknown source {name!r} (known: {', '.join(SOURCES)})")
    options = {k: v for k, v in spec.items() if k not in CORPUS_KEYS and v is not None}  # None: the default
    try:
        return SOURCES[name](**options)
    except TypeError as e:
        raise UserError(f"synthetic source {name!r}: bad options ({e})") from None


def is_synthetic(corpus_spec) -> bool:
    return isinstance(corpus_spec, dict) and corpus_spec.get("name") == CORPUS


def sample_documents(spec: dict) -> tuple[Source, list[np.ndarray]]:
    """The corpus of a synthetic spec: `documents` iid documents drawn with the source's seed."""
    source = source_from_spec(spec)
    n = spec.get("documents", 20000)
    if not isinstance(n, int) or n < 3:
        raise UserError(f"synthetic corpus: documents must be an integer >= 3, got {n!r}")
    seed = int(source.options.get("seed", 0))
    return source, source.sample(n, np.random.default_rng([seed, 1]))
