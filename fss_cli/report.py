"""The summary table printed at the end of ``fss demo`` / ``fss run``."""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from fss_core.config import PipelineConfig
from tasks.tracking import tracking_uri
from tasks.workspace import workspace_of


# Stage results that are counts, printed as one line saying what they count.
_COUNTS = {
    "extracted": "images embedded in this run (0: all cached)",
    "evaluated_results": "results (method x fold x shots) scored in this run (0: all cached or no labels)",
}


def _as_dict(value: Any) -> dict:
    if is_dataclass(value):
        return asdict(value)
    return dict(value) if isinstance(value, dict) else {"value": value}


def _models_table(title: str, models: list) -> Table:
    table = Table(title=title, show_header=True)
    for column in ("method", "fold", "cached", "best epoch", "bundle"):
        table.add_column(column)
    for m in models:
        table.add_row(m.method, str(m.fold), str(m.trained.cached), str(m.trained.best_epoch), m.trained.bundle)
    return table


def print_summary(cfg: PipelineConfig, results: dict[str, Any]) -> None:
    """One table per stage result (a line for a count), then how to open the UIs."""
    console = Console()
    for stage, value in results.items():
        if hasattr(value, "table"):  # the evaluation's comparison table
            console.print(f"[bold]{stage}[/bold] (mIoU %, mean ± std over seeds)")
            console.print(value.table, markup=False, highlight=False, soft_wrap=True)
            continue
        if isinstance(value, list):  # the comparison models, one line each
            console.print(_models_table(stage, value))
            continue
        if stage in _COUNTS or isinstance(value, (int, float, str)):
            console.print(f"[bold]{stage}[/bold]: {value} {_COUNTS.get(stage, '')}".rstrip())
            continue
        if stage == "pseudo_quality" and getattr(value, "num_images", None) == 0:
            console.print("[bold]pseudo_quality[/bold]: not measured (no labelled training image to compare with)")
            continue
        table = Table(title=stage, show_header=True)
        table.add_column("field")
        table.add_column("value")
        for key, item in _as_dict(value).items():
            table.add_row(str(key), f"{item:.4g}" if isinstance(item, float) else str(item))
        console.print(table)
    ws = workspace_of(cfg)
    console.print(f"workspace: {ws.root}")
    console.print(f"MLflow UI:  mlflow ui --backend-store-uri {tracking_uri(cfg)} --host 127.0.0.1 --port 5000")
    console.print("Prefect UI: prefect server start --host 127.0.0.1 --port 4200")
