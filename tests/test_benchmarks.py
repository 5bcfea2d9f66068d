"""CI runs both benchmark scripts with ``--quick``: they must complete and write their tables and plots. No
assertion is made on speed or on the quality figures (``benchmarks/README.md`` explains what they mean)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def run_quick(script: str, results_dir: Path, timeout: int = 900) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    finished = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick", "--results-dir", str(results_dir)],
                              env=env, capture_output=True, text=True, timeout=timeout)
    assert finished.returncode == 0, finished.stdout[-4000:] + finished.stderr[-4000:]
    return finished.stdout


def table_rows(report: str, section: str) -> list[list[str]]:
    """The body rows of the first markdown table under ``## {section}``."""
    body = report.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in body.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


@pytest.mark.slow
def test_speed_quick_writes_its_tables(tmp_path):
    run_quick("speed.py", tmp_path)
    report = (tmp_path / "speed-quick.md").read_text()
    assert "cores visible" in report
    throughput = {row[0]: row for row in table_rows(report, "Compressor throughput")}
    assert {"plain read", "paper literal"} <= {name.split(" (")[0] for name in throughput}
    assert len(table_rows(report, "Caching cost per (row, timestep)")) == 3
    latency = table_rows(report, "Query latency")
    assert [row[0] for row in latency] == ["1,000", "10,000"]
    for row in latency:  # recall@10 is a number in [0, 1]
        assert all(re.fullmatch(r"[0-9.,x%]+|-", cell) for cell in row[1:]), row
    assert (tmp_path / "query_latency-quick.png").stat().st_size > 0


@pytest.mark.slow
def test_quality_quick_writes_its_tables(tmp_path):
    run_quick("quality.py", tmp_path, timeout=1800)  # four settings: about 15 minutes in CI
    report = (tmp_path / "quality-quick.md").read_text()
    for mode in ("t2i-lora", "t2i", "digits", "dreambooth"):
        assert (tmp_path / f"quality-quick-{mode}.json").stat().st_size > 0
        detection = {row[0]: row[1:] for row in table_rows(report, f"Detection rate, {mode}")}
        baselines = ["random selection (expected)"] + {
            "t2i-lora": ["pixel similarity (cosine)", "latent similarity (cosine)"],
            "t2i": ["latent similarity (cosine)"], "digits": ["pixel similarity (cosine)"],
            "dreambooth": ["pixel similarity (cosine)", "latent similarity (cosine)"]}[mode]
        gradients = [f"paper recipe: {m}" for m in ("uncompressed, normalised", "uncompressed, no normalisation",
                                                     "DMin exact, K=2^10", "DMin exact, K=2^12", "DMin HNSW, K=2^10")]
        for method in baselines + gradients:
            assert method in detection, (mode, list(detection))
            rates = [float(cell.split()[0]) for cell in detection[method]]
            assert all(0.0 <= rate <= 1.0 for rate in rates), (mode, method, rates)
        assert "±" in detection["paper recipe: DMin exact, K=2^12"][0]  # a spread over the seeds
        grid = table_rows(report, f"Recipe grid, {mode}")
        assert [row[0] for row in grid] == ["paper", "squared-norm output"]
        assert [row[0] for row in table_rows(report, f"Compression fidelity, {mode}")] == ["2^10", "2^12"]
    self_retrieval = {row[0]: row[1:] for row in table_rows(report, "Self-retrieval, dreambooth")}
    for method in ("DMin exact, K=2^12", "DMin exact, K=2^12, kernel", "DMin HNSW, K=2^10"):
        assert 0.0 <= float(self_retrieval[method][0].split()[0]) <= 1.0, self_retrieval
    assert "Best-measured recipe" in report.split("## Choice of the default recipe", 1)[1]
    assert "positive in" in report.split("## Counterfactual", 1)[1]
    assert (tmp_path / "detection_rate-quick.png").stat().st_size > 0


@pytest.mark.slow
def test_preconditioner_cost_quick_writes_its_table(tmp_path):
    """``--quick`` at one small size (the full --quick, 1k and 10k rows, takes minutes): every option's row."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, str(BENCHMARKS / "preconditioner_cost.py"), "--quick", "--results-dir", str(tmp_path),
               "--sizes", "1000", "--queries", "5"]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout[-4000:] + finished.stderr[-4000:]
    report = (tmp_path / "preconditioner-cost-quick.md").read_text()
    assert "cores visible" in report
    rows = table_rows(report, "Fit, storage, latency and recall")
    assert [row[1] for row in rows] == ["none", "centered", "kernel", "centered-kernel"]
    for row in rows:
        assert row[0] == "1,000" and row[7].endswith("x") and row[9].endswith("x"), row
        recall = float(row[10].split(" ± ")[0])
        assert 0.0 <= recall <= 1.0, row
    assert rows[0][5] == "- (0)" and all("MiB" in row[5] for row in rows[1:])  # "none" has no file
