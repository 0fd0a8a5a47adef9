"""benchmarks/ppo_step.py, reward_step.py and threads.py run end to end on the tiny LLaVA on the CPU (the 7B shape
runs on a GPU machine)."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_ppo_step_benchmark_runs_tiny_on_the_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ppo_step.py"), "--tiny", "--device", "cpu"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| generate |" in done.stdout and "| static |" in done.stdout
    results = json.loads((tmp_path / "ppo_step.json").read_text())
    assert [r["engine"] for r in results["rows"]] == ["generate", "static"]
    for row in results["rows"]:
        phases = [row[k] for k in ("rollout_s", "scoring_s", "reference_s", "update_s")]
        assert all(p > 0 for p in phases) and sum(phases) <= row["total_s"] + 0.01
        assert 0 < row["mean_response_tokens"] <= results["info"]["settings"]["max_new_tokens"]
        assert row["peak_GB"] is None   # CPU: no GPU peak


def test_reward_step_benchmark_trains_the_same_with_pixels_and_cached_features(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "reward_step.py"), "--steps", "6", "--batch", "4",
                           "--images", "10", "--dev", "8", "--threads", "1", "--repeats", "2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| tower features (FeatureCache) |" in done.stdout
    results = json.loads((tmp_path / "reward_step.json").read_text())
    assert set(results["results"]) == {"pixels", "features"}
    assert all(len(r["seconds"]) == 2 and min(r["seconds"]) > 0 for r in results["results"].values())
    assert results["loss_gap"] < 1e-4   # the same training trajectory either way


def test_threads_benchmark_times_a_training_step_at_each_count(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "threads.py"), "--threads", "1", "--steps", "12",
                           "--warmup", "1", "--batch", "8", "--repeats", "1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| 1 |" in done.stdout
    [row] = json.loads((tmp_path / "threads.json").read_text())
    assert row["threads"] == 1 and len(row["seconds_per_step"]) == 1 and row["median"] > 0
    assert len(row["losses"]) == 13 and row["losses"][-1] < row["losses"][0]   # a training step: the loss falls


def test_review_gpu_check_runs_its_reduction_checks_under_gloo_on_the_cpu():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "review_gpu_check.py"), "--backend", "gloo"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert sum(line.startswith("ok ") for line in lines) == 3 and not any(line.startswith("FAIL") for line in lines)
    assert any(line.startswith("skip  4-bit") for line in lines)   # no CUDA here
