"""When is a match the same person? A score threshold at a chosen precision, and a probability.

A ReID model ranks; it does not say where "same person" ends. Calibration measures, on labelled
data the model did not train on, how genuine pairs (same identity, other camera) and impostor
pairs score, and turns that into (a) the lowest cosine-similarity threshold whose matches reach
a requested precision, with the recall there, and (b) P(same | score), a logistic fit. The
population is the evaluation protocol's: every query x gallery pair except same-identity pairs
from the query's own camera and gallery junk (pid -1). Scores are binned (BINS bins over
[-1, 1]), so any data set size fits in a fixed, small record. Decisions compare bin indices
(`score_bins`), the same function that filled the bins, so what a threshold does on the
calibration pairs is exactly what `counted` reports, whatever the float rounding.

Why a logistic fit (Platt scaling) and not isotonic regression: the probability is shown next
to every search hit, so it must rise with the score everywhere (a logistic with a positive
slope does by construction; a fit whose slope is not positive is refused) and must not jump
between neighbouring scores where genuine pairs are few, which is exactly the high-score tail
a user looks at; isotonic regression is a staircase there.

Where the threshold of a precision comes from (`rule`):
- "logistic": the lowest threshold at which the fit's expected precision of the accepted pairs,
  sum over accepted pairs of P(same | score) / their number, reaches the requested one. Labels
  enter through two fitted numbers, the scores through every pair, so the threshold moves
  smoothly with the data. What `strongreid calibrate` writes.
- "counts": the lowest threshold at which the counted precision of the calibration pairs
  reaches it, exact on those pairs. On a few hundred people that curve is ragged in the
  high-score tail (a couple of look-alike people make most of the high-scoring impostors), and
  its lowest crossing is picked where the noise happens to help: on the held-out people of the
  same data it missed 0.95 by more than 0.03 on three splits in four, against one in two for
  "logistic", whose own threshold moves less from split to split (docs/adaptation.md).

Precision depends on the population, not only on the model: among the pairs of a gallery of N
people about one in N shows the query's person, so at one threshold the impostors above it grow
with N while the genuine pairs do not, and a threshold calibrated on 50 people promises far more
than it gives on 200. The logistic fit is made at the calibration data's own share of genuine
pairs; `for_people(n)` re-targets a calibration to a population of n people (the prior-odds
shift of a Platt fit: the impostor side is weighed by (n - 1) / (m - 1), m the calibration's own
people), which moves the probability, the precisions and so the thresholds. `measure` checks a
calibration on held-out labelled data, re-targeted to that data's own number of people.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from strongreid.errors import StrongReIDError
from strongreid.evaluation.distance import as_features, l2_normalize
from strongreid.paths import atomic_write_text

BINS = 20_000
FORMAT = 1
RULES = ("logistic", "counts")
SUFFIX = ".calibration.json"


def calibration_path(model: str | os.PathLike) -> Path:
    """Where a model's calibration lives: runs/x/best.pt -> runs/x/best.calibration.json."""
    path = Path(model)
    return path.with_name(path.stem + SUFFIX) if path.suffix else path.with_name(path.name + SUFFIX)


def score_bins(scores: Any, bins: int) -> np.ndarray:
    """Bin index of each cosine score: bin k holds [-1 + 2k/bins, -1 + 2(k+1)/bins); 1 is in the last."""
    s = np.clip(np.asarray(scores, np.float64), -1.0, 1.0)
    return np.clip(np.floor((s + 1.0) * (bins / 2)), 0, bins - 1).astype(np.int64)


def _torch_bins(scores: torch.Tensor, bins: int) -> torch.Tensor:
    """`score_bins` on a tensor, operation for operation (float64), so both agree on every score."""
    s = scores.double().clamp(-1.0, 1.0)
    return torch.floor((s + 1.0) * (bins / 2)).clamp_(0, bins - 1).long()


@dataclass(frozen=True)
class Calibration:
    """Binned genuine / impostor score counts, their logistic fit and where they came from."""

    genuine: tuple[int, ...]
    impostor: tuple[int, ...]
    slope: float
    intercept: float
    source: dict[str, Any] = field(default_factory=dict)
    rule: str = "counts"
    # The population (people) the probability and thresholds are for; None: the calibration
    # data's own (`own_people`).
    people: int | None = None

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise StrongReIDError(f"calibration rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        if self.people is not None:
            check_people(self.people, "people")

    @property
    def own_people(self) -> int | None:
        """How many people (or clusters) the calibration pairs came from, when recorded."""
        n = self.source.get("people")
        return int(n) if isinstance(n, numbers.Integral) and n >= 2 else None

    def for_people(self, people: int | None) -> Calibration:
        """This calibration for a population of `people` (None: the calibration data's own)."""
        if people is not None:
            check_people(people, "people")
            if self.own_people is None:
                raise StrongReIDError("this calibration does not record how many people it came "
                                      "from, so it cannot be re-targeted to another population: "
                                      "write it again with `strongreid calibrate`")
        return Calibration(self.genuine, self.impostor, self.slope, self.intercept, self.source,
                           self.rule, people)

    @property
    def impostor_weight(self) -> float:
        """How much more an impostor pair weighs in the target population than in the
        calibration data: (people - 1) / (own people - 1), 1 for the calibration's own."""
        if self.people is None or self.own_people is None:
            return 1.0
        return (self.people - 1) / (self.own_people - 1)

    @property
    def edges(self) -> np.ndarray:
        """Lower edge of each bin (bin k holds scores in [edge_k, edge_k+1))."""
        return np.linspace(-1.0, 1.0, len(self.genuine), endpoint=False)

    def probability(self, scores: Any) -> np.ndarray:
        """P(same person | cosine score), as fitted on the calibration pairs, for the target
        population (`people`)."""
        s = np.asarray(scores, np.float64)
        return _sigmoid(self.slope * s + self.intercept - math.log(self.impostor_weight))

    def _fitted(self, scores: Any) -> np.ndarray:
        """P(same | score) at the calibration data's own share of genuine pairs (the fit itself)."""
        return _sigmoid(self.slope * np.asarray(scores, np.float64) + self.intercept)

    @property
    def bins(self) -> int:
        return len(self.genuine)

    def _operating_bin(self, precision: float) -> tuple[int, float, float]:
        """(first bin kept, precision, recall) of the lowest threshold reaching `precision`."""
        if isinstance(precision, bool) or not isinstance(precision, numbers.Real) \
                or not 0.0 < precision < 1.0:
            raise StrongReIDError(f"precision must be between 0 and 1 (exclusive), got {precision!r}")
        prec = self.fitted_precision() if self.rule == "logistic" else self.counted_precision()
        ok = np.nonzero(prec >= precision)[0]
        if ok.size == 0:
            how = "the fitted" if self.rule == "logistic" else "the counted"
            raise StrongReIDError(
                f"no score threshold reaches precision {precision:g} on the calibration data "
                f"({how} precision is at most {prec.max():.3f}): ask for a lower precision, or "
                "calibrate a better model"
            )
        k = int(ok[0])
        gen = _tail(self.genuine)
        return k, float(prec[k]), float(gen[k] / gen[0])

    def max_precision(self) -> float:
        """The highest precision any threshold reaches under this calibration's rule (for its
        target population): a request above it has no threshold."""
        prec = self.fitted_precision() if self.rule == "logistic" else self.counted_precision()
        return float(prec.max())

    def counted_precision(self) -> np.ndarray:
        """Per bin k: the share of genuine pairs among the calibration pairs scoring in bin k or
        above (0 where there are none)."""
        gen, imp = _tail(self.genuine), _tail(self.impostor) * self.impostor_weight
        kept = gen + imp
        return np.divide(gen, kept, out=np.zeros_like(gen), where=kept > 0)

    def fitted_precision(self) -> np.ndarray:
        """Per bin k: the fitted share of genuine pairs among the calibration pairs scoring in
        bin k or above (each pair at its bin's centre, as in the fit; for the calibration's own
        people the mean fitted P(same) of those pairs), for the target population; 0 above the
        last pair: no threshold is put where there are no data."""
        n = np.asarray(self.genuine, np.float64) + np.asarray(self.impostor, np.float64)
        p = self._fitted(self.edges + 1.0 / self.bins)
        if self.impostor_weight == 1.0:  # the sums as ever: its own thresholds stay bit for bit
            kept, gen = _tail(n), _tail(n * p)
        else:
            gen = _tail(n * p)
            kept = gen + _tail(n * (1.0 - p)) * self.impostor_weight
        return np.divide(gen, kept, out=np.zeros_like(kept), where=_tail(n) > 0)

    def counted(self, threshold: float) -> dict[str, float]:
        """What a threshold does on the calibration pairs themselves: {precision, recall,
        genuine, impostor} (the last two: pairs scoring at or above it)."""
        k = int(score_bins(threshold, self.bins))
        gen, imp = _tail(self.genuine), _tail(self.impostor)
        kept = gen[k] + imp[k] * self.impostor_weight
        return {"precision": float(gen[k] / kept) if kept else float("nan"),
                "recall": float(gen[k] / gen[0]), "genuine": int(gen[k]), "impostor": int(imp[k])}

    def operating_point(self, precision: float) -> dict[str, float]:
        """The lowest threshold whose matches (score >= threshold) reach `precision`:
        {threshold, precision, recall} on the calibration pairs."""
        k, prec, recall = self._operating_bin(precision)
        return {"threshold": self._edge(k), "precision": prec, "recall": recall}

    def _edge(self, k: int) -> float:
        """The lowest score in bin k (the float edge itself can round into bin k - 1)."""
        t = float(self.edges[k])
        while score_bins(t, self.bins) < k:
            t = float(np.nextafter(t, 2.0))
        return t

    def threshold(self, precision: float) -> float:
        return self.operating_point(precision)["threshold"]

    def same_person(self, scores: Any, precision: float = 0.95) -> np.ndarray:
        """True where a cosine score passes the threshold of `precision`."""
        k = self._operating_bin(precision)[0]
        return score_bins(scores, self.bins) >= k

    @classmethod
    def from_counts(cls, genuine: Any, impostor: Any, source: dict[str, Any] | None = None,
                    rule: str = "counts") -> Calibration:
        """A Calibration from binned genuine / impostor counts (the logistic is fitted here)."""
        g = np.asarray(genuine, np.int64)
        i = np.asarray(impostor, np.int64)
        if g.shape != i.shape or g.ndim != 1 or g.size < 2:
            raise StrongReIDError(f"genuine and impostor counts must be two equal 1-D lists of at "
                                  f"least 2 bins, got shapes {g.shape} and {i.shape}")
        if g.sum() == 0 or i.sum() == 0:
            raise StrongReIDError(
                f"calibration needs both matching and non-matching pairs; got {int(g.sum())} "
                f"genuine and {int(i.sum())} impostor pairs (labelled data with at least two "
                "identities, each seen by two cameras)"
            )
        centres = np.linspace(-1.0, 1.0, g.size, endpoint=False) + 1.0 / g.size
        slope, intercept = _fit_logistic(centres, g, i)
        if not (math.isfinite(slope) and math.isfinite(intercept)) or slope <= 0:
            raise StrongReIDError(
                "matching pairs do not score higher than non-matching ones on this data "
                f"(logistic slope {slope:.3g}): the model cannot tell these people apart, so no "
                "threshold means 'same person'; calibrate a trained model on data of its domain"
            )
        info = {"genuine_pairs": int(g.sum()), "impostor_pairs": int(i.sum()), **(source or {})}
        return cls(tuple(g.tolist()), tuple(i.tolist()), slope, intercept, info, rule)

    @classmethod
    def from_scores(cls, scores: Any, same: Any, *, bins: int = BINS,
                    source: dict[str, Any] | None = None, rule: str = "counts") -> Calibration:
        """A Calibration from the cosine scores of pairs and whether each pair is the same person."""
        s = np.asarray(scores, np.float64).ravel()
        m = np.asarray(same, bool).ravel()
        if s.shape != m.shape:
            raise StrongReIDError(f"{s.size} scores but {m.size} same/different labels")
        k = score_bins(s, bins)
        return cls.from_counts(np.bincount(k[m], minlength=bins),
                               np.bincount(k[~m], minlength=bins), source, rule)

    def save(self, path: str | os.PathLike) -> None:
        """Write the calibration as JSON (sparse bins), atomically."""
        g, i = np.asarray(self.genuine), np.asarray(self.impostor)
        record = {
            "format": FORMAT, "bins": len(g), "score": "cosine",
            "genuine": {str(k): int(g[k]) for k in np.nonzero(g)[0]},
            "impostor": {str(k): int(i[k]) for k in np.nonzero(i)[0]},
            "logistic": {"slope": self.slope, "intercept": self.intercept},
            "rule": self.rule, "source": self.source,
        }
        if self.people is not None:
            record["people"] = int(self.people)
        atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        try:
            record = json.loads(Path(path).read_text(encoding="utf-8"))
            bins = int(record["bins"])
            if record.get("format") != FORMAT or record.get("score") != "cosine" or bins < 2:
                raise ValueError("not a strongreid calibration of this version")
            genuine, impostor = np.zeros(bins, np.int64), np.zeros(bins, np.int64)
            for target, counts in ((genuine, record["genuine"]), (impostor, record["impostor"])):
                for k, v in counts.items():
                    target[int(k)] = int(v)
            logistic = record["logistic"]
            slope, intercept = float(logistic["slope"]), float(logistic["intercept"])
            if (genuine < 0).any() or (impostor < 0).any() or not genuine.any() \
                    or not impostor.any():
                raise ValueError("pair counts must be non-negative, with some of each kind")
            if not (math.isfinite(slope) and math.isfinite(intercept) and slope > 0):
                raise ValueError(f"the logistic slope must be a positive number, got {slope}")
            # Files written before the rule was recorded used the counts.
            rule = record.get("rule", "counts")
            if rule not in RULES:
                raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
            people = record.get("people")
            if people is not None and (isinstance(people, bool) or not isinstance(people, int)
                                       or people < 2):
                raise ValueError(f"people must be a whole number of at least 2, got {people!r}")
            calibration = cls(tuple(genuine.tolist()), tuple(impostor.tolist()), slope,
                              intercept, dict(record.get("source", {})), rule)
            return calibration.for_people(people)
        except FileNotFoundError:
            raise StrongReIDError(f"calibration file {path} does not exist: run `strongreid calibrate` "
                                  "first") from None
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise StrongReIDError(f"{path} is not a readable calibration file ({exc}); "
                                  "write it again with `strongreid calibrate`") from None


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # Far below the fit's range exp(-z) overflows to inf and the probability is exactly 0,
    # which is right: the warning numpy would print says nothing to a user.
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-z))


def check_people(people: Any, name: str) -> None:
    """A population of people a calibration is re-targeted to: a whole number, at least 2."""
    if isinstance(people, bool) or not isinstance(people, numbers.Integral) or people < 2:
        raise StrongReIDError(f"{name} must be a whole number of people, at least 2, got {people!r}")


def pair_histograms(
    q_feats: Any, g_feats: Any, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any,
    bins: int = BINS, chunk: int = 512,
) -> tuple[np.ndarray, np.ndarray]:
    """Counts of genuine and impostor cosine scores per bin over the protocol's pairs."""
    q = l2_normalize(as_features(q_feats, "q_feats", torch.device("cpu")))
    g = l2_normalize(as_features(g_feats, "g_feats", torch.device("cpu")))
    if q.shape[1] != g.shape[1]:
        raise StrongReIDError(f"query features have dimension {q.shape[1]} but gallery features "
                              f"{g.shape[1]}; extract both with the same model")
    qp, gp, qc, gc = (torch.as_tensor(np.asarray(a), dtype=torch.int64)
                      for a in (q_pids, g_pids, q_camids, g_camids))
    for name, labels, feats in (("q", qp, q), ("g", gp, g)):
        if labels.shape != (feats.shape[0],):
            raise StrongReIDError(f"{name}_pids must give one identity per {name} image "
                                  f"({feats.shape[0]}), got shape {tuple(labels.shape)}")
    genuine = torch.zeros(bins, dtype=torch.int64)
    impostor = torch.zeros(bins, dtype=torch.int64)
    real = gp >= 0
    for s in range(0, q.shape[0], chunk):
        scores = q[s : s + chunk] @ g.t()
        same = qp[s : s + chunk, None] == gp[None, :]
        junk = (same & (qc[s : s + chunk, None] == gc[None, :])) | ~real[None, :]
        k = _torch_bins(scores, bins)
        genuine += torch.bincount(k[same & ~junk], minlength=bins)
        impostor += torch.bincount(k[~same & ~junk], minlength=bins)
    return genuine.numpy(), impostor.numpy()


def _tail(counts: Any) -> np.ndarray:
    """Per bin k: the sum of bins k and above."""
    return np.cumsum(np.asarray(counts, np.float64)[::-1])[::-1]


def _fit_logistic(centres: np.ndarray, genuine: np.ndarray, impostor: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) of P(genuine | s) = sigmoid(slope s + intercept).

    The maximum-likelihood fit when it exists, i.e. when genuine and impostor bins overlap
    (then the expected genuine count equals the observed one). When the bins separate the
    two kinds (common on small sets) the likelihood has no maximum: the slope would grow
    without end, claiming certainty from a few dozen pairs. Then Platt's targets replace 1
    and 0 by (N+ + 1) / (N+ + 2) and 1 / (N- + 2), which gives a finite slope. Newton's
    method with step halving on the cross-entropy; two parameters, so the bins are the data.
    """
    used = (genuine + impostor) > 0
    s = centres[used]
    g, i = genuine[used].astype(np.float64), impostor[used].astype(np.float64)
    n = g + i
    gb, ib = np.flatnonzero(g > 0), np.flatnonzero(i > 0)
    separated = gb.min() >= ib.max() or gb.max() <= ib.min()
    hi = (g.sum() + 1.0) / (g.sum() + 2.0) if separated else 1.0
    lo = 1.0 / (i.sum() + 2.0) if separated else 0.0
    t = g * hi + i * lo  # the target mass of "genuine" in each bin

    def loss(a: float, b: float) -> float:
        z = a * s + b
        # n log(1 + e^z) - t z, written to stay finite for large |z|.
        return float((n * np.logaddexp(0.0, z) - t * z).sum())

    a, b = 1.0, 0.0
    current = loss(a, b)
    for _ in range(200):
        p = _sigmoid(a * s + b)
        w = n * p * (1.0 - p)
        grad = np.array([(s * (t - n * p)).sum(), (t - n * p).sum()])
        hess = np.array([[(w * s * s).sum(), (w * s).sum()], [(w * s).sum(), w.sum()]]) + 1e-12 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        scale = 1.0
        while scale > 1e-10:
            candidate = loss(a + scale * step[0], b + scale * step[1])
            if candidate <= current:
                break
            scale /= 2
        a, b, current = a + scale * step[0], b + scale * step[1], candidate
        if abs(scale * step).max() < 1e-12:
            break
    return float(a), float(b)


def calibrate(
    q_feats: Any, g_feats: Any, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any,
    *, source: dict[str, Any] | None = None, bins: int = BINS, rule: str = "counts",
) -> Calibration:
    """A Calibration from labelled features that the model did not train on."""
    genuine, impostor = pair_histograms(q_feats, g_feats, q_pids, g_pids, q_camids, g_camids, bins)
    return Calibration.from_counts(genuine, impostor, source, rule)


def measure(
    calibration: Calibration, precision: float,
    q_feats: Any, g_feats: Any, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any,
) -> dict[str, float]:
    """The calibration's threshold for `precision` for a population of as many people as the
    labelled data's queries show, applied to that data: {requested, people, threshold, measured
    (precision there), recall, genuine_pairs, genuine_accepted, impostor_accepted}."""
    people = int(np.unique(np.asarray(q_pids)).size)
    own = calibration.own_people
    if own is not None and people >= 2:
        calibration = calibration.for_people(people)
    try:
        k = calibration._operating_bin(precision)[0]
    except StrongReIDError as exc:
        if calibration.people is None or calibration.people == own:
            raise
        raise StrongReIDError(f"among the {people} people measured on (the calibration's pairs came "
                              f"from {own}): {exc}") from None
    threshold = calibration._edge(k)
    bins = calibration.bins
    genuine, impostor = pair_histograms(q_feats, g_feats, q_pids, g_pids, q_camids, g_camids, bins)
    tp, fp = float(genuine[k:].sum()), float(impostor[k:].sum())
    return {"requested": float(precision), "people": calibration.people, "threshold": threshold,
            "measured": tp / (tp + fp) if tp + fp else float("nan"),
            "recall": tp / float(genuine.sum()) if genuine.sum() else float("nan"),
            "genuine_pairs": int(genuine.sum()), "genuine_accepted": int(tp),
            "impostor_accepted": int(fp)}


__all__ = ["BINS", "RULES", "SUFFIX", "Calibration", "calibrate", "calibration_path", "measure",
           "pair_histograms", "score_bins"]
