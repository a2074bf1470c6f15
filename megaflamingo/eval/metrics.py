"""Task metrics from the libraries papers use, not re-implementations.

* Captioning: pycocoevalcap (the MS-COCO caption evaluation code AF1 and the audio-captioning
  literature report): PTB tokenisation (Stanford CoreNLP jar), BLEU-1..4, METEOR 1.5 (jar),
  ROUGE-L, CIDEr-D, every clip scored against all of its references. The jars need a Java runtime;
  without one, BLEU/ROUGE-L/CIDEr fall back to a Python tokeniser that drops the same punctuation
  (recorded as ``tokenizer: "simple"`` in the result, so such numbers are never mistaken for
  comparable ones) and METEOR is reported as unavailable. SPICE (and so SPIDEr) needs Stanford
  models downloaded at first use and is not offered.
* Classification / multi-label: scikit-learn (accuracy, macro-F1, per-clip and micro/macro F1,
  average precision).

Inputs are plain lists; references may be one string or a list of strings per item.
"""
from __future__ import annotations

import functools
import re
import shutil
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np

Ref = Union[str, Sequence[str]]
# pycocoevalcap's PTBTokenizer drops these tokens after tokenising.
_PTB_PUNCT = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
              "...", ";"}


class MetricUnavailable(RuntimeError):
    """A metric's library or runtime is missing (message says what to install)."""


def _require_coco():
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        raise MetricUnavailable("captioning metrics need pycocoevalcap: pip install pycocoevalcap") from None


def java_available() -> bool:
    return shutil.which("java") is not None


def _as_lists(refs: Sequence[Ref]) -> list[list[str]]:
    out = []
    for r in refs:
        lst = [r] if isinstance(r, str) else [str(x) for x in r]
        if not lst:
            raise ValueError("an item has no reference")
        out.append(lst)
    return out


def _simple_tokenize(text: str) -> str:
    # Approximates the PTB tokeniser for the no-Java fallback: lower-case, split punctuation off, drop it.
    t = (text or "").replace("\n", " ").lower()
    # PTB splits clitics off their word: "someone's" -> "someone 's", "don't" -> "do n't".
    t = re.sub(r"([a-z])n't\b", r"\1 n't", t)
    t = re.sub(r"([a-z0-9])'(s|re|ve|ll|d|m)\b", r"\1 '\2", t)
    toks = re.findall(r"n't|'[a-z]+|[a-z0-9]+|[^\sa-z0-9]", t)
    return " ".join(t for t in toks if t not in _PTB_PUNCT)


def tokenize_captions(captions: dict, tokenizer: str = "auto") -> tuple[dict, str]:
    """``{key: [caption, ...]}`` -> (tokenised, tokenizer used) as pycocoevalcap scorers expect.

    ``tokenizer``: ``auto`` (PTB when Java is present, else ``simple``), ``ptb``, ``simple``, or
    ``none`` (captions are tokenised already: whitespace-separated tokens, case kept)."""
    if tokenizer not in ("auto", "ptb", "simple", "none"):
        raise ValueError(f"tokenizer must be auto, ptb, simple or none, got {tokenizer!r}")
    if tokenizer == "none":
        return {k: [" ".join(c.split()) for c in v] for k, v in captions.items()}, "none"
    if tokenizer == "ptb" and not java_available():
        raise MetricUnavailable("the PTB tokenizer needs a Java runtime (apt-get install default-jre-headless)")
    if tokenizer == "ptb" or (tokenizer == "auto" and java_available()):
        return ptb_tokenize(captions), "ptb"
    return {k: [_simple_tokenize(c) for c in v] for k, v in captions.items()}, "simple"


def ptb_tokenize(captions: dict) -> dict:
    """pycocoevalcap's ``PTBTokenizer`` (its Stanford CoreNLP jar, flags and punctuation list), with
    the sentence file in the system temp dir: the library writes that file beside its own jar, which
    fails on a read-only install (a cluster's shared site-packages). Same output as the library."""
    import os
    import subprocess
    import tempfile

    _require_coco()
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    jar = os.path.join(os.path.dirname(os.path.abspath(ptb.__file__)), ptb.STANFORD_CORENLP_3_4_1_JAR)
    keys = [k for k, v in captions.items() for _ in v]
    sentences = "\n".join(c.replace("\n", " ") for v in captions.values() for c in v)
    fd, name = tempfile.mkstemp(prefix="ptb-", suffix=".txt")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(sentences.encode())
        proc = subprocess.run(["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                               "-lowerCase", name], capture_output=True, check=False)
    finally:
        os.remove(name)
    if proc.returncode != 0:
        raise MetricUnavailable(f"the PTB tokenizer (java -cp {jar}) failed: {proc.stderr.decode()[-500:]}")
    out: dict = {}
    for k, line in zip(keys, proc.stdout.decode().split("\n")):
        out.setdefault(k, []).append(" ".join(w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS))
    return out


CAPTION_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")


def caption_scores(preds: Sequence[str], refs: Sequence[Ref], metrics: Sequence[str] = ("cider", "bleu4", "meteor",
                   "rouge_l"), tokenizer: str = "auto") -> dict:
    """Corpus scores of ``preds`` against ``refs`` (several references per item allowed).

    Returns ``{metric: value}`` plus ``tokenizer`` ("ptb" or "simple") and, for a metric that could
    not run, ``{metric: None}`` with the reason under ``unavailable``."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    unknown = [m for m in metrics if m not in CAPTION_METRICS]
    if unknown:
        raise ValueError(f"unknown caption metric {unknown[0]!r} (known: {', '.join(CAPTION_METRICS)})")
    if not preds:
        return {m: float("nan") for m in metrics} | {"tokenizer": None}
    _require_coco()
    ref_lists = _as_lists(refs)
    keys = [str(i) for i in range(len(preds))]
    both = {f"r{k}": r for k, r in zip(keys, ref_lists)}
    both.update({f"p{k}": [p or ""] for k, p in zip(keys, preds)})
    tok, tok_name = tokenize_captions(both, tokenizer)  # one tokeniser process for everything
    gts = {k: tok[f"r{k}"] for k in keys}
    # An empty hypothesis makes the METEOR jar answer nothing (the pipe would block): score it as the
    # empty string everywhere except METEOR, which gets a token that matches no reference.
    res = {k: [tok[f"p{k}"][0]] for k in keys}
    out: dict = {"tokenizer": tok_name}
    unavailable: dict[str, str] = {}
    if any(m.startswith("bleu") for m in metrics):
        from pycocoevalcap.bleu.bleu import Bleu

        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        for n in range(1, 5):
            if f"bleu{n}" in metrics:
                out[f"bleu{n}"] = float(bleu[n - 1])
    if "rouge_l" in metrics:
        from pycocoevalcap.rouge.rouge import Rouge

        out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    if "cider" in metrics:
        from pycocoevalcap.cider.cider import Cider

        out["cider"] = float(Cider().compute_score(gts, res)[0])
    if "meteor" in metrics:
        if not java_available():
            out["meteor"] = None
            unavailable["meteor"] = "needs a Java runtime (apt-get install default-jre-headless)"
        else:
            from pycocoevalcap.meteor.meteor import Meteor

            m_res = {k: [v[0] if v[0].strip() else "<empty>"] for k, v in res.items()}
            scorer = Meteor()
            try:
                out["meteor"] = float(scorer.compute_score(gts, m_res)[0])
            finally:
                _close_meteor(scorer)
    if unavailable:
        out["unavailable"] = unavailable
    return {k: out[k] for k in [*metrics, "tokenizer", "unavailable"] if k in out}


def _close_meteor(scorer) -> None:
    # pycocoevalcap kills its jar only in __del__; end it now so no java process outlives the call.
    p = getattr(scorer, "meteor_p", None)
    if p is not None and p.poll() is None:
        try:
            p.stdin.close()
        except OSError:
            pass
        p.kill()
        p.wait()
    scorer.meteor_p = _Closed()


class _Closed:
    """Stands in for the killed jar so pycocoevalcap's __del__ has nothing left to do."""

    stdin = type("S", (), {"close": staticmethod(lambda: None)})()

    def kill(self):
        pass

    def wait(self):
        return 0


def bleu4(preds: Sequence[str], refs: Sequence[Ref]) -> float:
    """Corpus BLEU-4 as the captioning papers compute it (pycocoevalcap, PTB-tokenised when Java is
    present)."""
    return float(caption_scores(preds, refs, ("bleu4",))["bleu4"])


# ------------------------------------------------------------------------- classification


def accuracy(preds: Sequence[str], refs: Sequence[str]) -> float:
    from sklearn.metrics import accuracy_score

    _same_len(preds, refs)
    return float(accuracy_score(list(refs), list(preds))) if refs else float("nan")


def macro_f1(preds: Sequence[str], refs: Sequence[str], average: str = "macro") -> float:
    """F1 over the classes present in the references; a prediction outside them counts as a miss of
    its reference class (it is no class of its own), as in AF1's label-set scoring."""
    from sklearn.metrics import f1_score

    _same_len(preds, refs)
    if not refs:
        return float("nan")
    labels = sorted(set(refs))
    return float(f1_score(list(refs), list(preds), labels=labels, average=average, zero_division=0))


def accuracy_any(preds: Sequence[str], refs: Sequence[Ref]) -> float:
    """An answer is right when it equals any of the item's references (Clotho-AQA non-binary)."""
    ref_lists = _as_lists(refs)
    _same_len(preds, ref_lists)
    if not preds:
        return float("nan")
    return float(np.mean([p in set(r) for p, r in zip(preds, ref_lists)]))


def multilabel_scores(preds: Sequence[Sequence[str]], refs: Sequence[Sequence[str]],
                      metrics: Sequence[str] = ("samples_f1", "micro_f1", "macro_f1", "map_hard")) -> dict:
    """Label-set scores. Predicted labels outside every reference set count as false positives in
    the per-clip and micro scores; macro scores and mAP run over the reference classes. ``map_hard``
    is average precision of the 0/1 decisions (generated text has no scores to rank by)."""
    from sklearn.metrics import average_precision_score, f1_score
    from sklearn.preprocessing import MultiLabelBinarizer

    _same_len(preds, refs)
    if not refs:
        return {m: float("nan") for m in metrics}
    ref_classes = sorted({x for r in refs for x in r})
    classes = ref_classes + sorted({x for p in preds for x in p} - set(ref_classes))
    mlb = MultiLabelBinarizer(classes=classes)
    yt, yp = mlb.fit_transform([set(r) for r in refs]), mlb.transform([set(p) for p in preds])
    k = len(ref_classes)
    out = {}
    if "samples_f1" in metrics:
        out["samples_f1"] = float(f1_score(yt, yp, average="samples", zero_division=0))
    if "micro_f1" in metrics:
        out["micro_f1"] = float(f1_score(yt, yp, average="micro", zero_division=0))
    if "macro_f1" in metrics:
        out["macro_f1"] = float(f1_score(yt[:, :k], yp[:, :k], average="macro", zero_division=0))
    if "map_hard" in metrics:
        present = yt[:, :k].sum(axis=0) > 0
        out["map_hard"] = float(average_precision_score(yt[:, :k][:, present], yp[:, :k][:, present],
                                                        average="macro"))
    return out


def _same_len(a, b) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions for {len(b)} references")


# ------------------------------------------------------------------------- per benchmark


def score(benchmark, records: Sequence[dict]) -> dict:
    """Metrics of one benchmark over prediction records ``{prediction, references, ...}``.
    Records with ``error`` are counted (``n_failed``) and left out."""
    from .normalize import normalizer, split_labels

    good = [r for r in records if "error" not in r]
    norm: Callable[[str], str] = normalizer(benchmark.normalize)
    out: dict = {"n": len(good), "n_failed": len(records) - len(good)}
    wanted = list(benchmark.metrics)
    if benchmark.type == "caption":
        vals = caption_scores([r["prediction"] for r in good], [r["references"] for r in good], wanted)
        out.update(vals)
    elif benchmark.type in ("classification", "aqa"):
        preds = [norm(r["prediction"]) for r in good]
        refs = [[norm(x) for x in r["references"]] for r in good]
        if "accuracy_any" in wanted:
            out["accuracy_any"] = accuracy_any(preds, refs)
        first = [r[0] for r in refs]
        if "accuracy" in wanted:
            # Exact match with THE reference (a single-reference or unanimous item).
            out["accuracy"] = accuracy(preds, first)
        if "macro_f1" in wanted:
            out["macro_f1"] = macro_f1(preds, first)
        if "weighted_f1" in wanted:
            out["weighted_f1"] = macro_f1(preds, first, average="weighted")
    elif benchmark.type == "multilabel":
        preds = [[norm(x) for x in split_labels(r["prediction"])] for r in good]
        refs = [[norm(x) for x in split_labels(r["references"][0])] for r in good]
        out.update(multilabel_scores(preds, refs, wanted))
    else:  # pragma: no cover - the registry validates types
        raise ValueError(f"unknown benchmark type {benchmark.type!r}")
    return out


@functools.lru_cache(maxsize=1)
def library_versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("pycocoevalcap", "scikit-learn"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


# ------------------------------------------------------------------------- batch inference


def summarize_batch(records: Iterable[dict], labels: Optional[Sequence[str]] = None) -> dict:
    """Metrics of ``megaflamingo-infer --manifest`` predictions (records with a reference under
    ``output``), through the same library metrics as the benchmarks. An item counts as classification
    when its reference is one of ``labels`` (without ``labels``: when its task's name contains
    'Classification'), else as a caption (CIDEr, BLEU-4; one reference each). Answers are compared
    after AF1's normalisation."""
    from .normalize import normalizer

    norm = normalizer(["af1"])
    label_set = {norm(x) for x in labels} if labels else None
    cls_p, cls_r, cap_p, cap_r = [], [], [], []
    n = failed = 0
    for rec in records:
        if "error" in rec:
            failed += 1
            continue
        ref = rec.get("output")
        if ref is None:
            continue
        n += 1
        pred = rec.get("prediction", "")
        if (norm(ref) in label_set) if label_set is not None else "classification" in str(rec.get("task", "")).lower():
            cls_p.append(norm(pred))
            cls_r.append(norm(ref))
        else:
            cap_p.append(pred)
            cap_r.append(ref)
    out: dict = {"n_with_reference": n, "n_failed": failed}
    if cls_r:
        out.update(n_classification=len(cls_r), accuracy=accuracy(cls_p, cls_r), macro_f1=macro_f1(cls_p, cls_r))
    if cap_r:
        out.update(n_caption=len(cap_r), **caption_scores(cap_p, cap_r, ("cider", "bleu4")))
    return out
