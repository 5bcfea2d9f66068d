"""The README's main job, shortened: it must train, index, generate, attribute and report a match rate."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

QUICKSTART = Path(__file__).parent.parent / "examples" / "quickstart.py"


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path):
    command = [sys.executable, str(QUICKSTART), "--quick", "--num_train_rows", "60", "--num_images", "2",
               "--num_inference_steps", "20", "--top_k", "5", "--output_dir", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for _ in range(2):  # a second run over the same output directory must work too
        finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert finished.returncode == 0, finished.stdout + finished.stderr
    output = finished.stdout
    rate = re.search(r"top-5 label match rate[^0-9]*([0-9.]+)%", output)
    assert rate, output
    assert 0.0 <= float(rate.group(1)) <= 100.0
    assert (tmp_path / "generated.png").exists()
    assert (tmp_path / "attribution-0.png").exists() and (tmp_path / "attribution-1.png").exists()
    assert (tmp_path / "attribution-index" / "knn.bin").exists()
