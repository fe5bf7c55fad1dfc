"""Shared helpers of the benchmark scripts: hardware string, peak memory, table and JSON output."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


def hardware(device: str | torch.device) -> str:
    """GPU name, or CPU model with the number of cores and torch threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class Peak:
    mb: float = float("nan")


@contextmanager
def peak_memory(device: torch.device) -> Iterator[Peak]:
    """Peak memory added inside the block, in MiB: CUDA max allocated minus allocated at entry; on
    CPU the peak RSS (VmHWM, reset at entry via /proc/self/clear_refs) minus the RSS at entry."""
    peak = Peak()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield peak
        torch.cuda.synchronize(device)
        peak.mb = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError as err:
        raise RuntimeError("CPU peak memory needs Linux's /proc/self/clear_refs") from err
    before = _status_kb("VmRSS")
    yield peak
    after = _status_kb("VmHWM")
    if before is not None and after is not None:
        peak.mb = (after - before) / 1024


def run_child(script: str, options: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``script`` in a fresh Python process with ``--key value`` options (underscores become
    dashes) and ``env`` added to the environment; return the JSON record it prints last."""
    cmd = [sys.executable, script]
    for key, value in options.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    out = subprocess.run(
        cmd, check=True, capture_output=True, text=True, env={**os.environ, **(env or {})}
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


PIPELINE_COLUMNS = [
    "stage",
    "pipeline",
    "workers",
    "width",
    "images_per_second",
    "vs_best_dataloader",
    "peak_memory_mb",
    "workers_private_mb",
]


def compare_pipelines(
    script: str, stages: list[str], workers: list[int], options: dict[str, Any]
) -> list[dict[str, Any]]:
    """For each stage, mkdt's pipeline and a DataLoader with each ``workers`` count, each measured
    in a fresh process of ``script`` (its ``--stage`` child mode, with ``options``). Each record
    gets ``vs_best_dataloader`` = images_per_second / the best DataLoader rate of its stage."""
    records = []
    for stage in stages:
        rows = []
        for pipeline, count in [("mkdt", 0)] + [("dataloader", w) for w in workers]:
            rows.append(
                run_child(script, {"stage": stage, "pipeline": pipeline, "child_workers": count, **options})
            )
            print(
                f"  {stage:10s} {pipeline:10s} workers={count}: {rows[-1]['images_per_second']:.0f} images/s",
                file=sys.stderr,
            )
        best = max(r["images_per_second"] for r in rows if r["pipeline"] == "dataloader")
        for r in rows:
            r["vs_best_dataloader"] = r["images_per_second"] / best
        records += rows
    return records


def report(
    records: list[dict[str, Any]], columns: list[str], footer: str | None, json_path: Path | None
) -> None:
    """Print ``records`` as a table of ``columns`` and the ``footer`` line; also write them as JSON
    to ``json_path`` when given."""
    print_table(records, columns)
    if footer:
        print(footer)
    if json_path:
        write_json(json_path, records)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "-" if value is None else str(value)


def print_table(records: list[dict[str, Any]], columns: list[str]) -> None:
    """A markdown table of ``columns`` of ``records``."""
    rows = [[_cell(r.get(c)) for c in columns] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |")


def write_json(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=2) + "\n")
