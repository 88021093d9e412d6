"""sharpflow as a Snakemake module of another project's workflow.

A host project in a temporary directory (its own working directory, config and results directory)
declares ``module sharpflow`` with the repository's Snakefile, takes every rule under an ``sf_`` prefix,
overrides the resources of one of them with ``use rule … with:``, and adds a rule of its own that reads
a sharpflow table. The host's Snakefile itself asserts that its config comes back unchanged: the
embedded default config (config/config.yaml) must not leak into it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def sharpflow_config() -> dict:
    """One run (checkpoints 0 and 40, a spectrum and a project analysis at each), one figure, the claims."""
    return {
        "results": "sf_results",  # relative to the host's working directory
        "datasets": {"tiny": {"source": "mnist1d", "mnist1d_samples": 500, "valid_size": 80, "hessian_subset": 64}},
        "defaults": {"dataset": "tiny", "model": {"name": "mlp", "kwargs": {"hidden": [12]}},
                     "optimizer": {"lr": 0.1, "batch_size": 20}, "steps": 40, "seed": 0,
                     "checkpoints": {"zoom_every": 0, "every_epochs": None}, "device": "cpu"},
        "studies": {"tiny": {}},
        "spectrum": {"k": 2},
        "project": {"k": 1, "alignment_batches": 2, "grad_batches": 2, "subset": 64, "random_directions": 1,
                    "cross_directions": [1], "cross_ks": [0, -1], "width_thresholds": [1.1], "multipliers": [1]},
        "resources": {stage: {"threads": 1, "mem_mb": 500, "runtime": 5, "gpu": 0}
                      for stage in ("train", "spectrum", "project")},
        "figures": {"tiny_grid": {"kind": "grid", "studies": ["tiny"]}},
    }


HOST_CONFIG = {"host_label": "a project that uses sharpflow", "sharpflow": sharpflow_config()}

HOST_SNAKEFILE = """\
import json

configfile: "host.yaml"

EXPECTED = json.loads({expected!r})


module sharpflow:
    snakefile:
        {snakefile!r}
    config:
        config["sharpflow"]


use rule * from sharpflow as sf_*


# A host's own resources for sharpflow's training job of the run "tiny" (rule train_<run>). `with:`
# replaces the rule's whole resources mapping, so it restates every entry the host wants.
use rule train_tiny from sharpflow as sf_train_tiny with:
    resources:
        mem_mb=1234,
        runtime=17,
        gpu=0,


rule summary:
    input:
        "sf_results/runs/tiny/spectrum.parquet",
    output:
        "summary.txt",
    run:
        import pandas as pd

        spectrum = pd.read_parquet(input[0])
        with open(output[0], "w") as fh:
            fh.write(f"{{len(spectrum)}} eigenpairs, lambda1 max {{spectrum.eigenvalue.max():.6g}}\\n")


rule all:
    input:
        rules.summary.output,
        rules.sf_cost.output,
    default_target: True


# The module parsed its config and the embedded default did not leak into the host's.
assert config == EXPECTED, config
"""


def write_host(host: Path) -> None:
    host.mkdir()
    (host / "host.yaml").write_text(yaml.safe_dump(HOST_CONFIG))
    (host / "Snakefile").write_text(HOST_SNAKEFILE.format(expected=json.dumps(HOST_CONFIG),
                                                          snakefile=str(ROOT / "Snakefile")))


def run_host(host: Path, *args: str, timeout: float = 600) -> str:
    # No --workflow-profile: a host project has none of sharpflow's; --cores as a host would give it.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([str(BIN / "snakemake"), "--cores", "2", *args], cwd=host, env=env,
                          capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def job_block(out: str, rule: str) -> str:
    """The dry-run or run log's description of the one job of ``rule``."""
    blocks = re.findall(rf"^(?:local)?rule {rule}:\n((?:[ \t]+.*\n)+)", out, re.M)
    assert len(blocks) == 1, (rule, out[-4000:])
    return blocks[0]


def resources(block: str) -> dict[str, str]:
    line = next(s for s in block.splitlines() if s.strip().startswith("resources:"))
    return dict(item.split("=", 1) for item in line.split(":", 1)[1].strip().split(", "))


def test_sharpflow_as_a_module_with_its_own_config_results_and_a_resource_override(tmp_path):
    host = tmp_path / "host"
    write_host(host)

    out = run_host(host, "-n")
    for rule in ("sf_prepare", "sf_train_tiny", "sf_analyse_tiny", "sf_figure", "sf_claims", "sf_cost", "summary"):
        job_block(out, rule)
    train = resources(job_block(out, "sf_train_tiny"))
    assert (train["mem_mb"], train["runtime"], train["gpu"]) == ("1234", "17", "0"), train
    # the other rules keep what sharpflow derives from the module's config
    analyse = resources(job_block(out, "sf_analyse_tiny"))
    assert (analyse["mem_mb"], analyse["runtime"], analyse["gpu"]) == ("500", "20", "0"), analyse

    out = run_host(host)
    assert resources(job_block(out, "sf_train_tiny"))["mem_mb"] == "1234"
    results = host / "sf_results"
    spectrum = pd.read_parquet(results / "runs" / "tiny" / "spectrum.parquet")
    assert sorted(spectrum.step.unique()) == [0, 40] and spectrum.converged.all()
    assert (results / "figures" / "tiny_grid.png").read_bytes()[:4] == b"\x89PNG"
    assert (results / "tables" / "claims.md").exists() and (results / "tables" / "cost.md").exists()
    assert (host / "summary.txt").read_text().startswith("4 eigenpairs")
    assert not (host / "results").exists()  # the embedded default's results directory
    assert (results / "logs" / "train" / "tiny.log").exists()

    # The report finds the module's captions from another working directory.
    report = host / "report.html"
    run_host(host, "--report", str(report))
    html = report.read_text()
    entries = json.loads(re.search(r"var results = (\{.*?\});\n", html, re.S).group(1)).values()
    captions = {e["filename"]: e["caption"] for e in entries}
    assert set(captions) == {"tiny_grid.png", "claims.csv", "cost.csv"}
    first_words = " ".join((ROOT / "workflow" / "report" / "grid.rst").read_text().split()[:6])
    assert first_words in captions["tiny_grid.png"], captions["tiny_grid.png"]
    assert all(c.strip() and "problematic" not in c for c in captions.values())
