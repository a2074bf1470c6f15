"""A benchmark's items: its Arrow split read through the data pipeline, prompted as training did.

Each item is one generation request (prompt text up to ``<SEP>`` + the window embeddings of every
``<audio>``) and its references. Rendering follows the model's training config
(``TrainingForm``): a task in the model's blend is rendered from the row's own prompt exactly as
training rendered it (augmentations as validation draws them, prefix where training showed it);
a task the model never trained on is prompted as AF1's zero-shot evaluation did: the registry's
prompt (or the row's) with AF1's option list, plus the task prefix. A retrieval-ICL split
(``interleaved_knn-<split>``) puts the kNN manifest's train-split neighbours first, in the
manifest's order, rendered as training renders context shots (no option lists).

With ``group_references`` the rows sharing (audio file, raw prompt) become one item whose
references are all their outputs (AF1's de-duplication of captioning sets: every Clotho caption
of a clip is a reference of one prediction).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .registry import Benchmark


@dataclass
class EvalItem:
    id: str
    path: str
    prompt: str  # the query's rendered prompt (what the model was asked)
    text: str  # the full generation prompt, up to and including <SEP>
    audios: list[np.ndarray]
    references: list[str]
    rows: list[int] = field(default_factory=list)


def task_in_blend(blend, flamingo_task: str) -> bool:
    """Whether the model's training blend has this task (any split, plain or interleaved), as the
    data loader looks training settings up."""
    return any(str(name).split("/")[0] == flamingo_task for name in (blend or {}))


def with_options(prompt: str, labels) -> str:
    # AF1's provide_all_labels format: sorted labels, one per line, each ending in '.'.
    return prompt + "\nOPTIONS:\n - {}.".format(".\n - ".join(sorted(labels)))


def render_shot(form, task: str, path: str, prompt: str, output: str, options=None,
                context: bool = False) -> tuple[str, str, str]:
    """(prefix, prompt with answer suffix, reference) of one shot in its trained form.

    ``options`` (zero-shot only) are appended after the training normalisation, exactly where and in
    the case AF1's provide_all_labels put them (``\nOPTIONS:\n - a.\n - b.`` before the suffix)."""
    prefix, p, ref = form.render(task, path, prompt, output, no_options=context)
    if options:
        suffix = form.registry.suffix
        body = p[: -len(suffix)] if suffix and p.endswith(suffix) else p
        p = with_options(body, options) + suffix
    return prefix, p, ref


def build_items(bench: Benchmark, data_root: str | Path, tokenizer, form, limit: Optional[int] = None,
                allow_outside_root: bool = False) -> tuple[list[EvalItem], dict]:
    """(items in a fixed order, rendering info). ``form``: ``prompts.TrainingForm`` of the model (its
    template registry carries the answer suffix)."""
    from megaflamingo.data.sources import Source
    from megaflamingo.inference.prompts import Example, fewshot_prompt, single_prompt

    from .subsets import subset_filter

    src = Source(data_root, bench.split, allow_outside_root=allow_outside_root)
    task = src.flamingo_task
    trained = task_in_blend(form.blend, task)
    options = None
    if not trained and bench.options is not None:
        options = form.registry.option_labels(task) if bench.options == "templates" else list(bench.options)
        if not options:
            raise ValueError(f"benchmark {bench.name}: options: templates, but the template registry has no "
                             f"label set for {task} (list the labels in the registry entry)")
    keep = subset_filter(bench.subset) if bench.subset else None
    ds = src.ds

    def raw(row_prompt: str) -> str:
        return row_prompt if trained or not bench.prompt else bench.prompt

    # 1. rows -> groups (one group per item)
    groups: dict[tuple, dict] = {}
    order: list[tuple] = []
    for j in range(len(src)):
        it = src.item(j)
        q = it.shots[-1]
        row = int(src.knn.index[j]) if src.knn is not None else j
        key = (q.path, q.prompt) if bench.group_references else (j,)
        g = groups.get(key)
        if g is None:
            g = groups[key] = {"j": j, "row": row, "item": it, "outputs": [], "rows": []}
            order.append(key)
        g["outputs"].append(q.output)
        g["rows"].append(row)

    items: list[EvalItem] = []
    seen_ids: set[str] = set()
    for key in order:
        g = groups[key]
        it = g["item"]
        q = it.shots[-1]
        if keep is not None and not keep(q.prompt or "", g["outputs"]):
            continue
        prefix, prompt, _ = render_shot(form, task, q.path, raw(q.prompt), g["outputs"][0], options)
        refs = [form.render(task, q.path, raw(q.prompt), o)[2] for o in g["outputs"]]
        # Context shots: never an option list (AF1's training did not show one there).
        if src.knn is None:
            text = single_prompt(tokenizer, prompt, prefix, rendered=True)
        else:
            shots = [Example(*render_shot(form, task, s.path, raw(s.prompt), s.output, None, context=True)[1:],
                             rendered=True) for s in it.shots[:-1]]
            text = fewshot_prompt(tokenizer, shots, prompt, prefix, mode=it.interleaved or "similar", rendered=True)
        iid = str(ds.text(g["row"], "id"))
        if iid in seen_ids:  # a query listed twice in a kNN manifest
            iid = f"{iid}#{g['j']}"
        seen_ids.add(iid)
        items.append(EvalItem(id=iid, path=q.path, prompt=prompt, text=text,
                              audios=[s.windows for s in it.shots], references=refs, rows=g["rows"]))
        if limit is not None and len(items) >= limit:
            break
    info = {"flamingo_task": task, "rendering": "trained-form" if trained else "zero-shot (prompt as given + prefix)",
            "options_listed": options is not None, "rows": len(src), "items_total": len(order)}
    return items, info
