"""Every existing stage end to end on params/smoke.yaml through papermill: a stage that breaks its successor
fails here. Then a re-run skips everything, and the artifacts are checked against what each stage promises."""
import json
import shutil
import subprocess
import sys

import pytest

from fgaif_utils import params, stage

REPO = params.REPO_ROOT

pytestmark = pytest.mark.e2e   # `pytest -m "not e2e"` runs the rest in a few minutes


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    outputs = tmp_path_factory.mktemp("outputs")
    env = {**__import__("os").environ, "FGAIF_OUTPUTS": str(outputs), "OMP_NUM_THREADS": "1"}
    first = subprocess.run([sys.executable, "-m", "fgaif_utils.pipeline", "params/smoke.yaml", "--run", "ci"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    second = subprocess.run([sys.executable, "-m", "fgaif_utils.pipeline", "params/smoke.yaml", "--run", "ci"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return outputs / "ci", first, second


STAGE_NAMES = [s.name for s in stage.STAGES]


def test_every_stage_has_its_notebook():
    assert STAGE_NAMES == ["00_data", "01_base_models", "02_sample_responses", "03_ai_feedback", "04_reward_models",
                           "05_ppo", "06_evaluate"]
    assert [name for name in STAGE_NAMES if not (REPO / "notebooks" / f"{name}.ipynb").exists()] == []


def test_every_stage_ran_and_wrote_its_manifest_and_notebook(smoke_run):
    run_dir, first, _ = smoke_run
    for name in STAGE_NAMES:
        manifest = json.loads((run_dir / name / "manifest.json").read_text())
        assert manifest["stage"] == name and manifest["artifacts"], name
        assert (run_dir / name / f"{name}.ipynb").exists(), name
        assert not (run_dir / f".{name}.partial").exists()
    assert "failed" not in first.stdout.lower()


def test_second_run_skips_every_stage(smoke_run):
    _, _, second = smoke_run
    assert second.returncode == 0, second.stdout + second.stderr
    for name in STAGE_NAMES:
        line = next(l for l in second.stdout.splitlines() if name in l and "skip" in l.lower())
        assert line


def test_data_stage_artifacts(smoke_run):
    run_dir, _, _ = smoke_run
    smoke = params.load(REPO / "params" / "smoke.yaml")
    data = run_dir / "00_data"
    for split, n in [("sft", smoke.data.n_sft), ("eval", smoke.data.n_eval), ("eval_ood", smoke.data.n_eval_ood)]:
        lines = (data / f"scenes_{split}.jsonl").read_text().splitlines()
        assert len(lines) == n
        assert len(json.loads((data / "annotations" / f"instances_{split}.json").read_text())["images"]) == n
    assert (data / "stats.png").exists()


def test_base_models_stage_artifacts_load_through_the_real_loader(smoke_run):
    run_dir, _, _ = smoke_run
    from fgaif_utils import detector, models
    folder = run_dir / "01_base_models"
    for name in ("policy", "pretrained", "verifier_lvlm"):
        model, processor = models.load_lvlm(str(folder / name), device="cpu")
        assert processor.tokenizer.image_token == "<image>"
    detector.load_detector(folder / "verifier_detector")
    profile = json.loads((folder / "base_profile.json").read_text())
    assert set(profile["policy"]) == {"greedy", "sampled"}
    assert {"base policy", "LVLM verifier", "detector verifier"} <= set(profile["qa_accuracy"])
    assert profile["policy"]["greedy"]["n_descriptions"] == params.load(REPO / "params" / "smoke.yaml").models.tiny_train.eval_images


def test_feedback_stage_labels_size_twins_that_the_reward_stage_trains_on(smoke_run):
    run_dir, _, _ = smoke_run
    responses = {r["response_id"]: r for r in stage.read_jsonl(run_dir / "03_ai_feedback" / "fg_labels.jsonl")}
    twins = stage.read_jsonl(run_dir / "03_ai_feedback" / "fg_labels_twins.jsonl")
    assert twins and all(t["response_id"] == t["twin_of"] + "~sizes" for t in twins)
    for twin in twins:
        original = responses[twin["twin_of"]]
        assert len(twin["token_ids"]) == len(original["token_ids"]) and twin["token_ids"] != original["token_ids"]
        # object labels do not depend on a size word (the verifier answers the same existence questions)
        assert [s["labels"][0] for s in twin["subsentences"]] == [s["labels"][0] for s in original["subsentences"]]
    summary = json.loads((run_dir / "03_ai_feedback" / "summary.json").read_text())
    assert summary["twins"]["responses"] == len(twins)
    executed = (run_dir / "04_reward_models" / "04_reward_models.ipynb").read_text()
    assert "have a size-flipped twin, used with probability 0.5" in executed


def test_a_notebook_runs_by_itself_from_the_notebooks_folder(tmp_path, monkeypatch):
    """As in JupyterLab: kernel started in notebooks/, default work_dir (None), only params_path changed."""
    import papermill
    monkeypatch.setenv("FGAIF_OUTPUTS", str(tmp_path))   # the kernel inherits it
    papermill.execute_notebook(str(REPO / "notebooks" / "00_data.ipynb"), str(tmp_path / "out.ipynb"),
                               parameters={"params_path": "params/smoke.yaml", "run": "by-hand"},
                               kernel_name="python3", progress_bar=False, cwd=str(REPO / "notebooks"))
    manifest = json.loads((tmp_path / "by-hand" / "00_data" / "manifest.json").read_text())
    assert manifest["run"] == "by-hand" and not (tmp_path / "by-hand" / ".00_data.partial").exists()


def test_the_ppo_notebook_runs_by_hand_from_the_notebooks_folder(smoke_run, tmp_path, monkeypatch):
    """As in JupyterLab, on the smoke run's stages 00-04: stage 05 loads the base policy by the repository-relative
    path its summary.json records, from a kernel started in notebooks/ (it once looked for it there)."""
    import os
    import papermill
    run_dir, _, _ = smoke_run
    # the outputs must lie inside the repository (as outputs/ does) for the recorded path to be relative
    outputs = REPO / "outputs" / f".test-by-hand-{os.getpid()}"
    for name in STAGE_NAMES[:5]:
        shutil.copytree(run_dir / name, outputs / "ci" / name)
    overlay = _overlay(tmp_path, "by-hand-05", "reuse_stages: [00_data, 01_base_models, 02_sample_responses, "
                                               "03_ai_feedback, 04_reward_models]\n")
    monkeypatch.setenv("FGAIF_OUTPUTS", str(outputs))
    try:
        papermill.execute_notebook(str(REPO / "notebooks" / "05_ppo.ipynb"), str(tmp_path / "out.ipynb"),
                                   parameters={"params_path": str(overlay)}, kernel_name="python3",
                                   progress_bar=False, cwd=str(REPO / "notebooks"))
        final = outputs / "ci-by-hand-05" / "05_ppo"
        summary = json.loads((final / "summary.json").read_text())
        assert not summary["policy_base"].startswith("/") and (REPO / summary["policy_base"]).is_dir()
        assert (final / "before_after.html").is_file() and (final / "manifest.json").is_file()
    finally:
        shutil.rmtree(outputs, ignore_errors=True)


def _overlay(tmp_path, name, body):
    """An ablation overlay on smoke.yaml, written as params/ablations/*.yaml are written on tiny.yaml."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"extends: {REPO / 'params' / 'smoke.yaml'}\nrun: ci-{name}\nreuse_run: ci\n{body}")
    return path


def test_ppo_stage_artifacts_and_ablation_overlays_reusing_the_run(smoke_run, tmp_path):
    run_dir, _, _ = smoke_run
    smoke = params.load(REPO / "params" / "smoke.yaml")
    log = [json.loads(line) for line in (run_dir / "05_ppo" / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == list(range(smoke.ppo.steps + 1))
    assert (run_dir / "05_ppo" / "policy_adapter" / "adapter_model.safetensors").exists()
    env = {**__import__("os").environ, "FGAIF_OUTPUTS": str(run_dir.parent), "OMP_NUM_THREADS": "1"}
    sparse = _overlay(tmp_path, "sparse", "reuse_stages: [00_data, 01_base_models, 02_sample_responses, 03_ai_feedback, 04_reward_models]\nppo:\n  sparse: true\n")
    holistic = _overlay(tmp_path, "holistic", "reuse_stages: [00_data, 01_base_models, 02_sample_responses, 03_ai_feedback]\nreward:\n  holistic: true\n")
    for path, stages in ((sparse, "00-05"), (holistic, "00-05")):
        done = subprocess.run([sys.executable, "-m", "fgaif_utils.pipeline", str(path), "--stages", stages],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        assert done.stdout.count("reused from run 'ci'") == (5 if path == sparse else 4)
    assert not (run_dir.parent / "ci-sparse" / "00_data").exists()          # reused, not copied or re-run
    sparse_log = [json.loads(l) for l in (run_dir.parent / "ci-sparse" / "05_ppo" / "log.jsonl").read_text().splitlines()]
    assert len(sparse_log) == smoke.ppo.steps + 1
    manifests = [json.loads((run_dir.parent / run / "05_ppo" / "manifest.json").read_text())
                 for run in ("ci", "ci-sparse")]
    assert [m["params"]["ppo"]["sparse"] for m in manifests] == [False, True]
    # iteration 1 of both runs: the same policy (policy == reference: KL 0), images, sampling seed and reward models,
    # so the same responses and labels, the same fine-grained total. The sparse total sits on each response's last
    # action instead of where the sub-sentences close: other advantages, so another update. (The value head starts
    # at zero: explained variance is 0 in both; and smoke's labels leave advantage_contrast None.)
    dense_1, sparse_1 = log[1], sparse_log[1]
    assert dense_1["iteration"] == sparse_1["iteration"] == 1 and dense_1["reward_fine_grained"] != 0
    for key in ("reward_fine_grained", "kl", "entropy", "response_length", "subsentences"):
        assert sparse_1[key] == pytest.approx(dense_1[key], abs=1e-6), key
    # a rerun of the dense job repeats both bit for bit; here sparse moved them by 2.4e-4 and 7.5e-3
    for key in ("policy_loss", "grad_norm"):
        assert sparse_1[key] != pytest.approx(dense_1[key], abs=1e-4), key
    holistic_summary = json.loads((run_dir.parent / "ci-holistic" / "05_ppo" / "summary.json").read_text())
    assert holistic_summary["reward_types"] == ["holistic"]
    assert (run_dir.parent / "ci-holistic" / "04_reward_models" / "reward_models" / "holistic").is_dir()


def test_ppo_job_under_torchrun_with_two_processes_plain_and_zero3(smoke_run, tmp_path):
    run_dir, _, _ = smoke_run
    from fgaif_utils import launch
    argv = launch.command("torchrun", 2, REPO / "params" / "smoke.yaml", "ci", run_dir / "00_data",
                          run_dir / "01_base_models", run_dir / "04_reward_models", tmp_path / "out",
                          tmp_path / "checkpoints", master_port=29533)
    launch.run(argv, tmp_path / "launch.log", cwd=REPO, env={"OMP_NUM_THREADS": "1"},
               finished=tmp_path / "out" / launch.FINISHED)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["iterations"] == params.load(REPO / "params" / "smoke.yaml").ppo.steps
    assert (tmp_path / "out" / "policy_adapter" / "adapter_config.json").exists()
    # the same job with DeepSpeed ZeRO-3, every parameter partitioned: the same trajectory, validation included
    (tmp_path / "zero3.json").write_text('{"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}')
    zero3 = _overlay(tmp_path, "zero3", f"ppo:\n  launcher: torchrun\n  nproc: 2\n  deepspeed: {tmp_path / 'zero3.json'}\n")
    argv = launch.command("torchrun", 2, zero3, "ci", run_dir / "00_data", run_dir / "01_base_models",
                          run_dir / "04_reward_models", tmp_path / "out-zero3", tmp_path / "checkpoints-zero3",
                          master_port=29534)
    launch.run(argv, tmp_path / "launch-zero3.log", cwd=REPO, env={"OMP_NUM_THREADS": "1"},
               finished=tmp_path / "out-zero3" / launch.FINISHED)
    plain, partitioned = ([json.loads(line) for line in (tmp_path / out / "log.jsonl").read_text().splitlines()]
                          for out in ("out", "out-zero3"))
    assert [row["iteration"] for row in partitioned] == [row["iteration"] for row in plain]
    for row, other in zip(plain, partitioned):
        for key, value in row.items():
            if isinstance(value, float) and not key.endswith("_s"):
                assert other[key] == pytest.approx(value, abs=1e-4), (row["iteration"], key)
    assert sorted(p.name for p in (tmp_path / "checkpoints-zero3" / "deepspeed").iterdir() if p.is_dir()) == \
        [f"policy-{summary['iterations']}", f"value-{summary['iterations']}"]
    assert (tmp_path / "out-zero3" / "policy_adapter" / "adapter_model.safetensors").exists()


def test_teaching_tables_of_stages_04_and_06(smoke_run):
    run_dir, _, _ = smoke_run
    probe = json.loads((run_dir / "04_reward_models" / "word_swap_probe.json").read_text())
    assert set(probe) == {"size", "colour"}
    assert all(row["n"] > 0 and {"object", "attribute", "relation"} <= set(row) for rows in probe.values() for row in rows)
    words = (run_dir / "06_evaluate" / "attribute_words.md").read_text()
    assert [line for line in words.splitlines() if line.startswith("## ")] == ["## eval", "## eval_long", "## eval_ood"]
    assert words.count("| base |") == 3 and words.count("| fgaif |") == 3


def test_executed_notebooks_show_no_nested_bar_codes_or_warnings_about_code_not_ours(smoke_run):
    """What a researcher sees in JupyterLab: one text bar at a time (a bar inside another writes cursor-up codes),
    and no warnings from tqdm.auto's missing ipywidgets, peft's use of a deprecated transformers property,
    bitsandbytes' optional CPU kernels (fgaif_utils/__init__.py) or a CLIP image processor that asks for torchvision
    (which breaks it here: requirements.txt)."""
    run_dir, _, _ = smoke_run
    for name in STAGE_NAMES:
        notebook = json.loads((run_dir / name / f"{name}.ipynb").read_text())
        streams = "".join("".join(output.get("text", "")) for cell in notebook["cells"]
                          for output in cell.get("outputs", []))
        assert "\x1b[A" not in streams, name
        assert "IProgress not found" not in streams, name
        assert "is_gradient_checkpointing" not in streams, name
        assert "kernels-community" not in streams, name
        assert "requires torchvision" not in streams, name
        assert "Setting accelerator to CPU" not in streams, name          # DeepSpeed, imported by transformers
        # the copy re-runs from anywhere: the params path as given, no runner's work folder
        injected = [cell for cell in notebook["cells"] if "injected-parameters" in cell["metadata"].get("tags", [])]
        source = "".join(injected[0]["source"])
        assert "params_path = 'params/smoke.yaml'" in source and "work_dir = None" in source, name
        assert str(REPO) not in source and ".partial" not in source, name


def test_no_artifact_names_the_machine_s_repository_folder(smoke_run):
    """Executed notebooks (papermill's record of the run included), manifests, summaries, peft adapter configs and
    reports name the repository's files relative to it: outputs copied to another machine or shared with students
    carry no one's home folder."""
    run_dir, _, _ = smoke_run
    texts = [path for path in run_dir.rglob("*") if path.is_file() and ".cache" not in path.parts
             and path.suffix in {".ipynb", ".json", ".jsonl", ".md", ".html", ".csv", ".txt"}]
    assert len(texts) > 30 and any(p.name == "adapter_config.json" for p in texts)
    assert [str(p.relative_to(run_dir)) for p in texts if str(REPO) in p.read_text(errors="replace")] == []


def test_evaluation_rerun_keeps_finished_policies_and_gives_the_same_records(smoke_run):
    """As after an interruption during the second policy: the base policy's kept records are read back, fgaif's
    (removed) are evaluated again, and records.jsonl is byte-identical to the uninterrupted run's."""
    run_dir, _, _ = smoke_run
    before = (run_dir / "06_evaluate" / "records.jsonl").read_bytes()
    kept = list((run_dir / ".cache" / "06_evaluate").glob("*/records/*.jsonl"))
    assert sorted(p.name.split(".")[0] for p in kept) == ["base", "fgaif"]
    next(p for p in kept if p.name.startswith("fgaif.")).unlink()
    env = {**__import__("os").environ, "FGAIF_OUTPUTS": str(run_dir.parent), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "fgaif_utils.pipeline", "params/smoke.yaml", "--run", "ci",
                           "--stages", "06", "--force"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert (run_dir / "06_evaluate" / "records.jsonl").read_bytes() == before
    notebook = json.loads((run_dir / "06_evaluate" / "06_evaluate.ipynb").read_text())
    printed = "".join("".join(output.get("text", "")) for cell in notebook["cells"] for output in cell.get("outputs", []))
    kept_lines = [line for line in printed.splitlines() if "records kept from an earlier run" in line]
    assert len(kept_lines) == 1 and kept_lines[0].startswith("base: ")


def test_a_forced_rerun_from_checkpoints_writes_the_same_artifacts_and_leaves_later_stages_up_to_date(smoke_run):
    """Wall times live in the manifest, never in a hashed artifact: a stage made again from the same inputs (its
    checkpoints, for stage 04) hashes as before, so the stages after it stay up to date (stats.json of stage 00 and
    training.json / metrics.json of stage 04 held seconds, and every re-run made everything after them stale)."""
    run_dir, _, _ = smoke_run      # in place (a copy elsewhere would record its backbone under another path)
    env = {**__import__("os").environ, "FGAIF_OUTPUTS": str(run_dir.parent), "OMP_NUM_THREADS": "1"}
    before = {name: json.loads((run_dir / name / "manifest.json").read_text())["artifacts"] for name in STAGE_NAMES}
    forced = subprocess.run([sys.executable, "-m", "fgaif_utils.pipeline", "params/smoke.yaml", "--run", "ci",
                             "--stages", "00,04", "--force"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert forced.returncode == 0, forced.stdout[-3000:] + forced.stderr[-3000:]
    for name in ("00_data", "04_reward_models"):
        manifest = json.loads((run_dir / name / "manifest.json").read_text())
        changed = sorted(path for path in before[name].keys() | manifest["artifacts"].keys()
                         if before[name].get(path) != manifest["artifacts"].get(path))
        assert changed == [], name
    assert "train_seconds" in manifest["extra"] and "score_seconds" in manifest["extra"]
    later = subprocess.run([sys.executable, "-m", "fgaif_utils.pipeline", "params/smoke.yaml", "--run", "ci",
                            "--stages", "01-06"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert later.returncode == 0 and later.stdout.count("skip (up to date)") == 6, later.stdout + later.stderr
