"""Simple task metrics for batch inference.

* Classification labels: exact-match accuracy and macro F1 over the reference label set, after
  AF1-style normalisation (strip, lower-case, trailing '.' dropped).
* Captions: a corpus BLEU-4-style n-gram overlap (clipped precisions, brevity penalty, add-one
  smoothing for n > 1; several references per item allowed). This is NOT CIDEr/SPICE (the
  captioning metrics AF1 reports): it is a quick sanity number, not comparable with papers.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Iterable, Sequence, Union

Ref = Union[str, Sequence[str]]


def normalize_label(text: str) -> str:
    t = (text or "").strip().lower()
    t = re.sub(r"\s+", " ", t)
    return t.rstrip(".").strip()


def accuracy(preds: Sequence[str], refs: Sequence[str]) -> float:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    if not refs:
        return float("nan")
    return sum(normalize_label(p) == normalize_label(r) for p, r in zip(preds, refs)) / len(refs)


def macro_f1(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Mean F1 over the classes present in the references (a prediction outside them is a miss)."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    p = [normalize_label(x) for x in preds]
    r = [normalize_label(x) for x in refs]
    classes = sorted(set(r))
    if not classes:
        return float("nan")
    f1s = []
    for c in classes:
        tp = sum(1 for a, b in zip(p, r) if a == c and b == c)
        fp = sum(1 for a, b in zip(p, r) if a == c and b != c)
        fn = sum(1 for a, b in zip(p, r) if a != c and b == c)
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s)


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", (text or "").lower())


def _ngrams(toks: list[str], n: int) -> Counter:
    return Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))


def bleu(preds: Sequence[str], refs: Sequence[Ref], max_n: int = 4) -> float:
    """Corpus BLEU-style score in [0, 1] (see module doc: not CIDEr)."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    if not preds:
        return float("nan")
    match = [0] * max_n
    total = [0] * max_n
    hyp_len = ref_len = 0
    for pred, ref in zip(preds, refs):
        ref_list = [ref] if isinstance(ref, str) else list(ref)
        h = _tokens(pred)
        rs = [_tokens(x) for x in ref_list]
        hyp_len += len(h)
        # Closest reference length (ties -> shorter), as in BLEU.
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1] if rs else 0
        for n in range(1, max_n + 1):
            hc = _ngrams(h, n)
            best = Counter()
            for r in rs:
                best |= _ngrams(r, n)
            match[n - 1] += sum(min(c, best[g]) for g, c in hc.items())
            total[n - 1] += max(len(h) - n + 1, 0)
    if hyp_len == 0:
        return 0.0
    logp = 0.0
    for n in range(max_n):
        m, t = match[n], total[n]
        if n > 0:  # add-one smoothing keeps short outputs from scoring exactly 0
            m, t = m + 1, t + 1
        if m == 0 or t == 0:
            return 0.0
        logp += math.log(m / t) / max_n
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return bp * math.exp(logp)


def summarize(records: Iterable[dict], labels: Sequence[str] | None = None) -> dict:
    """Metrics over prediction records that carry a reference (``output`` key).

    Items whose reference is one of ``labels`` (or, without ``labels``, items of a task whose name
    contains 'Classification') count as classification; the rest as captions/free text."""
    cls_p, cls_r, cap_p, cap_r = [], [], [], []
    label_set = {normalize_label(x) for x in labels} if labels else None
    n = failed = 0
    for rec in records:
        if "error" in rec:
            failed += 1
            continue
        ref = rec.get("output")
        if ref is None:
            continue
        n += 1
        is_cls = (normalize_label(ref) in label_set) if label_set is not None else (
            "classification" in str(rec.get("task", "")).lower())
        if is_cls:
            cls_p.append(rec.get("prediction", ""))
            cls_r.append(ref)
        else:
            cap_p.append(rec.get("prediction", ""))
            cap_r.append(ref)
    out: dict = {"n_with_reference": n, "n_failed": failed}
    if cls_r:
        out.update(n_classification=len(cls_r), accuracy=accuracy(cls_p, cls_r),
                   macro_f1=macro_f1(cls_p, cls_r))
    if cap_r:
        out.update(n_caption=len(cap_r), bleu4=bleu(cap_p, cap_r),
                   bleu_note="BLEU-style n-gram overlap, not CIDEr")
    return out
