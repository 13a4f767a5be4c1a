"""Per-task BLEU-4 / METEOR scoring and a paper-style (Table 1) markdown table.

``evaluate`` is imported lazily, so importing this module is cheap.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

__all__ = [
    "CAPTION_METRICS_PATH",
    "load_caption_metrics",
    "score_by_task",
    "format_markdown_table",
]

#: Path of the ``evaluate`` metric module shipped inside the package.
CAPTION_METRICS_PATH = Path(__file__).resolve().parent / "caption_metrics" / "caption_metrics.py"


def load_caption_metrics(**load_kwargs: Any):
    """Load the BLEU/METEOR metric with ``evaluate.load(<path of the module file>)``.

    Works offline (``HF_HUB_OFFLINE=1``, ``HF_EVALUATE_OFFLINE=1``): nothing is
    fetched from the Hub.  ``keep_in_memory=True`` is the default (no Arrow cache
    files are written); pass ``keep_in_memory=False`` together with
    ``num_process``/``process_id`` for distributed evaluation.
    """
    import evaluate

    load_kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(CAPTION_METRICS_PATH), **load_kwargs)


def mean_or_nan(values: Sequence[float]) -> float:
    """The mean, or NaN for no values (shown as "-" in tables)."""
    return sum(values) / len(values) if values else float("nan")


def score_by_task(
    records: Iterable[Mapping[str, Any]],
    tokenizer: Any = "char",
    *,
    metric: Any = None,
    smooth: bool = False,
    lowercase: bool = False,
) -> Dict[str, Any]:
    """Score predictions grouped by task.

    Args:
        records: dicts with ``"task"`` (hashable, e.g. a task name),
            ``"prediction"`` (str) and ``"references"`` (list of str, or one str).
        tokenizer: ``"char"`` (default), ``"jieba"`` or a callable, see
            :func:`qilin_med_vl.evaluation.tokenization.tokenize_zh`.
        metric: an already loaded metric (``load_caption_metrics()``); loaded
            when ``None``.
        smooth, lowercase: forwarded to the metric (BLEU options).

    Returns:
        ``{"per_task": {task: {"bleu_4", "meteor", "count"}},
        "average": {"bleu_4", "meteor"},  # unweighted mean over tasks
        "overall": {"bleu_4", "meteor", "count"}}``  # all records as one corpus
        Scores are in [0, 100]; BLEU is corpus-level within each group, METEOR
        the mean of sentence scores.  Tasks keep the order of first appearance.
    """
    groups: Dict[Any, Dict[str, List[Any]]] = {}
    all_preds: List[str] = []
    all_refs: List[List[str]] = []
    for index, record in enumerate(records):
        try:
            task, prediction, references = record["task"], record["prediction"], record["references"]
        except KeyError as err:
            raise KeyError(f"record {index} lacks the key {err.args[0]!r}") from None
        if isinstance(references, str):
            references = [references]
        references = list(references)
        if not references:
            raise ValueError(f"record {index} (task {task!r}) has no references")
        prediction = "" if prediction is None else prediction
        group = groups.setdefault(task, {"predictions": [], "references": []})
        group["predictions"].append(prediction)
        group["references"].append(references)
        all_preds.append(prediction)
        all_refs.append(references)
    if not groups:
        raise ValueError("score_by_task needs at least one record")

    if metric is None:
        metric = load_caption_metrics()
    options = {"tokenizer": tokenizer, "smooth": smooth, "lowercase": lowercase}

    per_task: Dict[Any, Dict[str, Any]] = {}
    for task, group in groups.items():
        out = metric.compute(predictions=group["predictions"], references=group["references"], **options)
        per_task[task] = {"bleu_4": out["bleu_4"], "meteor": out["meteor"], "count": len(group["predictions"])}

    out = metric.compute(predictions=all_preds, references=all_refs, **options)
    return {
        "per_task": per_task,
        "average": {
            "bleu_4": mean_or_nan([s["bleu_4"] for s in per_task.values()]),
            "meteor": mean_or_nan([s["meteor"] for s in per_task.values()]),
        },
        "overall": {"bleu_4": out["bleu_4"], "meteor": out["meteor"], "count": len(all_preds)},
    }


def format_markdown_table(
    result: Mapping[str, Any],
    task_order: Optional[Sequence[Any]] = None,
    name: Optional[str] = None,
) -> str:
    """Render scores as a markdown table shaped like the paper's Table 1.

    Columns: ``<task> B4 | <task> M`` for each task, then ``AVG``, the mean of
    all per-task B4 and M numbers of the row (i.e. the mean of 2 x #tasks
    numbers, computed from unrounded scores).  Scores have one decimal.

    Args:
        result: the output of :func:`score_by_task`, or a mapping
            ``{row_name: score_by_task output}`` for one row per model.
        task_order: tasks (columns) to show, in this order; default: tasks in
            the order of the first row, then tasks only found in later rows.
        name: row label for a single ``result``; with several rows (or when
            given) a first ``Model`` column is added.  A task missing from a
            row shows ``-`` and is left out of that row's AVG.
    """
    return format_results_table(result, task_order, name)


# ----------------------------------------------------------------------------------------------------------------
# Tables: BLEU-4/METEOR tasks and VQA tasks side by side
# ----------------------------------------------------------------------------------------------------------------

#: Metric keys a table shows, in this order within a task, and their column names.
METRIC_COLUMNS = {"bleu_4": "B4", "meteor": "M", "accuracy": "Acc", "recall": "Recall"}


def _format_number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.1f}"


def format_results_table(result: Mapping[str, Any], task_order: Sequence[Any] | None = None,
                         name: str | None = None) -> str:
    """The results table, for any metric of `METRIC_COLUMNS`: one column per task and metric (`<task> B4`,
    `<task> M`, `<task> Acc`, `<task> Recall`), then AVG, the mean of the row's numbers. `result` is one result (a
    `per_task` mapping) or `{row name: result}`; see `combine_results` to put several results of one model in one
    row. BLEU-4/METEOR results give `format_markdown_table`'s table."""
    if "per_task" in result:
        rows, labelled = [(name, result)], name is not None
    else:
        rows, labelled = list(result.items()), True
    if not rows:
        raise ValueError("nothing to format")
    if task_order is None:
        task_order = []
        for _, row in rows:
            task_order.extend(task for task in row["per_task"] if task not in task_order)
    metrics_of_task = {}
    for task in task_order:
        scores = next((row["per_task"][task] for _, row in rows if task in row["per_task"]), {})
        metrics_of_task[task] = [metric for metric in METRIC_COLUMNS if metric in scores]
    header = (["Model"] if labelled else []) + [f"{task} {METRIC_COLUMNS[metric]}" for task in task_order
                                                for metric in metrics_of_task[task]] + ["AVG"]
    align = ([":---"] if labelled else []) + ["---:"] * (len(header) - (1 if labelled else 0))
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    for label, row in rows:
        cells, numbers = ([str(label)] if labelled else []), []
        for task in task_order:
            scores = row["per_task"].get(task)
            for metric in metrics_of_task[task]:
                value = None if scores is None else scores.get(metric)
                if value is not None:
                    numbers.append(value)
                cells.append(_format_number(value))
        cells.append(_format_number(mean_or_nan(numbers)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def combine_results(*results: Mapping[str, Any]) -> dict:
    """One model's results of several evaluations (BLEU-4/METEOR per task, VQA benchmarks) as one result:
    `per_task` merged (a task in two results is an error), `average` recomputed per metric over all tasks.
    `overall` is left out: corpus-level BLEU of different test sets does not add up."""
    per_task: dict = {}
    for result in results:
        for task, scores in result["per_task"].items():
            if task in per_task:
                raise ValueError(f"task {task!r} is in two results")
            per_task[task] = scores
    average = {metric: mean_or_nan([scores[metric] for scores in per_task.values() if metric in scores])
               for metric in METRIC_COLUMNS if any(metric in scores for scores in per_task.values())}
    return {"per_task": per_task, "average": average}
