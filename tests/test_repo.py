"""The repository's promises: README commands, CI script, ignore rules, registry consistency."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Set up and run.*?```bash\n(.*?)```", text, re.S)
    assert block, "README.md lost its set-up block"
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_readme_has_exactly_two_setup_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2
    assert cmds[0].endswith("snakemake --cores all")
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _readme_commands()[1] in ci


def test_results_is_ignored_but_documented():
    ignore = (ROOT / ".gitignore").read_text().splitlines()
    assert "/results/*" in ignore and "!/results/README.md" in ignore
    assert (ROOT / "results" / "README.md").exists()


def test_model_registry_matches_config():
    from sharpflow.config import MODEL_NAMES
    from sharpflow.models import REGISTRY

    assert tuple(REGISTRY) == MODEL_NAMES


def test_every_cli_stage_has_help():
    from sharpflow.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sp in sub.choices.items():
        assert sp.format_help().strip(), name
        assert sub._choices_actions, name
    assert {"prepare", "train", "spectrum", "project", "aggregate", "figure", "table", "check", "schema"} <= set(
        sub.choices
    )


def test_gpu_check_exits_cleanly_without_cuda():
    """bench/gpu.py on a CPU-only machine says so and exits 0, measuring nothing."""
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: bench/gpu.py would measure it")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device here" in proc.stdout
    assert "ResNet-32" not in proc.stdout
