"""When is a match the same person? A score threshold at a chosen precision, and a probability.

A ReID model ranks; it does not say where "same person" ends. Calibration measures, on labelled
data the model did not train on, how genuine pairs (same identity, other camera) and impostor
pairs score, and turns that into (a) the lowest cosine-similarity threshold whose matches reach
a requested precision, with the recall there, and (b) P(same | score), a logistic fit. The
population is the evaluation protocol's: every query x gallery pair except same-identity pairs
from the query's own camera and gallery junk (pid -1). Scores are binned (BINS bins over
[-1, 1]), so any data set size fits in a fixed, small record.

A precision measured on one population holds on another only as far as the share of genuine
pairs is alike (a gallery with many more people lowers it); `measure` checks a calibration on
held-out data.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from strongreid.errors import StrongReIDError
from strongreid.evaluation.distance import as_features, l2_normalize

BINS = 20_000
FORMAT = 1


@dataclass(frozen=True)
class Calibration:
    """Binned genuine / impostor score counts, their logistic fit and where they came from."""

    genuine: tuple[int, ...]
    impostor: tuple[int, ...]
    slope: float
    intercept: float
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def edges(self) -> np.ndarray:
        """Lower edge of each bin (bin k holds scores in [edge_k, edge_k+1))."""
        return np.linspace(-1.0, 1.0, len(self.genuine), endpoint=False)

    def probability(self, scores: Any) -> np.ndarray:
        """P(same person | cosine score), as fitted on the calibration pairs."""
        s = np.asarray(scores, np.float64)
        return 1.0 / (1.0 + np.exp(-(self.slope * s + self.intercept)))

    def operating_point(self, precision: float) -> dict[str, float]:
        """The lowest threshold whose matches (score >= threshold) reach `precision`:
        {threshold, precision, recall} on the calibration pairs."""
        if not 0.0 < precision < 1.0:
            raise StrongReIDError(f"precision must be between 0 and 1 (exclusive), got {precision!r}")
        gen = np.cumsum(np.asarray(self.genuine, np.float64)[::-1])[::-1]
        imp = np.cumsum(np.asarray(self.impostor, np.float64)[::-1])[::-1]
        kept = gen + imp
        prec = np.divide(gen, kept, out=np.zeros_like(gen), where=kept > 0)
        ok = np.nonzero(prec >= precision)[0]
        if ok.size == 0:
            raise StrongReIDError(
                f"no score threshold reaches precision {precision:g} on the calibration data "
                f"(best {prec.max():.3f}): ask for a lower precision, or calibrate a better model"
            )
        k = int(ok[0])
        return {"threshold": float(self.edges[k]), "precision": float(prec[k]),
                "recall": float(gen[k] / gen[0])}

    def threshold(self, precision: float) -> float:
        return self.operating_point(precision)["threshold"]

    def same_person(self, scores: Any, precision: float = 0.95) -> np.ndarray:
        """True where a cosine score passes the threshold of `precision`."""
        return np.asarray(scores) >= self.threshold(precision)

    def save(self, path: str | os.PathLike) -> None:
        """Write the calibration as JSON (sparse bins), atomically."""
        g, i = np.asarray(self.genuine), np.asarray(self.impostor)
        record = {
            "format": FORMAT, "bins": len(g), "score": "cosine",
            "genuine": {str(k): int(g[k]) for k in np.nonzero(g)[0]},
            "impostor": {str(k): int(i[k]) for k in np.nonzero(i)[0]},
            "logistic": {"slope": self.slope, "intercept": self.intercept},
            "source": self.source,
        }
        target = Path(path)
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, target)

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
            return cls(tuple(genuine.tolist()), tuple(impostor.tolist()), float(logistic["slope"]),
                       float(logistic["intercept"]), dict(record.get("source", {})))
        except FileNotFoundError:
            raise StrongReIDError(f"calibration file {path} does not exist: run `strongreid calibrate` "
                                  "first") from None
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise StrongReIDError(f"{path} is not a readable calibration file ({exc}); "
                                  "write it again with `strongreid calibrate`") from None


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
        k = ((scores.clamp(-1.0, 1.0 - 1e-7) + 1.0) * (bins / 2)).long().clamp_(0, bins - 1)
        genuine += torch.bincount(k[same & ~junk], minlength=bins)
        impostor += torch.bincount(k[~same & ~junk], minlength=bins)
    return genuine.numpy(), impostor.numpy()


def _fit_logistic(centres: np.ndarray, genuine: np.ndarray, impostor: np.ndarray) -> tuple[float, float]:
    """Maximum-likelihood (slope, intercept) of P(genuine | s) = sigmoid(slope s + intercept)."""
    used = (genuine + impostor) > 0
    s, g, n = centres[used], genuine[used].astype(np.float64), (genuine + impostor)[used].astype(np.float64)
    a, b = 10.0, -5.0
    for _ in range(100):  # Newton's method on two parameters, with a tiny ridge
        p = 1.0 / (1.0 + np.exp(-(a * s + b)))
        w = n * p * (1.0 - p)
        grad = np.array([(s * (g - n * p)).sum(), (g - n * p).sum()])
        hess = np.array([[(w * s * s).sum(), (w * s).sum()], [(w * s).sum(), w.sum()]]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        a, b = a + step[0], b + step[1]
        if abs(step).max() < 1e-10:
            break
    return float(a), float(b)


def calibrate(
    q_feats: Any, g_feats: Any, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any,
    *, source: dict[str, Any] | None = None, bins: int = BINS,
) -> Calibration:
    """A Calibration from labelled features that the model did not train on."""
    genuine, impostor = pair_histograms(q_feats, g_feats, q_pids, g_pids, q_camids, g_camids, bins)
    if genuine.sum() == 0 or impostor.sum() == 0:
        raise StrongReIDError(
            f"calibration needs both matching and non-matching pairs; got {int(genuine.sum())} "
            f"genuine and {int(impostor.sum())} impostor pairs (labelled data with at least two "
            "identities, each seen by two cameras)"
        )
    centres = np.linspace(-1.0, 1.0, bins, endpoint=False) + 1.0 / bins
    slope, intercept = _fit_logistic(centres, genuine, impostor)
    info = {"genuine_pairs": int(genuine.sum()), "impostor_pairs": int(impostor.sum()), **(source or {})}
    return Calibration(tuple(genuine.tolist()), tuple(impostor.tolist()), slope, intercept, info)


def measure(
    calibration: Calibration, precision: float,
    q_feats: Any, g_feats: Any, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any,
) -> dict[str, float]:
    """The calibration's threshold for `precision`, applied to other labelled data:
    {requested, threshold, measured (precision there), recall}."""
    threshold = calibration.threshold(precision)
    bins = len(calibration.genuine)
    genuine, impostor = pair_histograms(q_feats, g_feats, q_pids, g_pids, q_camids, g_camids, bins)
    k = int(math.floor((threshold + 1.0) * bins / 2 + 0.5))
    tp, fp = float(genuine[k:].sum()), float(impostor[k:].sum())
    return {"requested": float(precision), "threshold": threshold,
            "measured": tp / (tp + fp) if tp + fp else float("nan"),
            "recall": tp / float(genuine.sum()) if genuine.sum() else float("nan")}


__all__ = ["BINS", "Calibration", "calibrate", "measure", "pair_histograms"]
