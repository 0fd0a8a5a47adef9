"""The stage contract and the papermill runner, on throwaway notebooks in a temporary folder.

Each kernel start costs a second or two, so the scenario tests walk several steps on one workspace.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest

from fgaif_utils import params as P
from fgaif_utils import pipeline
from fgaif_utils import stage as S

PARAMS_TEXT = "run: t\ndescription: first\ndata:\n  n_eval: 3\n"

STAGE_00 = """
ctx.write_jsonl("eval.jsonl", [{"i": i} for i in range(ctx.params.data.n_eval)])
if os.environ.get("FGAIF_TEST_KILL"):   # die like a killed runner: half an artifact, runner gone, kernel gone
    ctx.write_json("half.json", {})
    os.kill(os.getppid(), signal.SIGKILL)
    os._exit(1)
"""
STAGE_01 = """
rows = stage.read_jsonl(ctx.input_dir("00") / "eval.jsonl")
ctx.write_json("summary.json", {"n": len(rows), "dtype": ctx.params.models.dtype})
"""


def make_notebook(stage_name, body, outputs=None):
    parameters = nbformat.v4.new_code_cell('params_path = "params/tiny.yaml"\nrun = None\nwork_dir = None')
    parameters.metadata["tags"] = ["parameters"]
    opening = nbformat.v4.new_code_cell("import os, signal\nfrom fgaif_utils import stage\n"
                                        f'ctx = stage.open_stage("{stage_name}", params_path, run, work_dir)')
    work = nbformat.v4.new_code_cell(body.strip())
    if outputs:
        work.outputs, work.execution_count = outputs, 7
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_markdown_cell(f"# {stage_name}"), parameters, opening, work,
                      nbformat.v4.new_code_cell("ctx.finish()")]
    return notebook


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A workspace: notebooks folder, outputs root (via FGAIF_OUTPUTS) and one params file."""
    monkeypatch.setenv("FGAIF_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.setenv("FGAIF_NOTEBOOKS", str(tmp_path / "notebooks"))
    monkeypatch.delenv("FGAIF_TEST_KILL", raising=False)
    (tmp_path / "notebooks").mkdir()
    w = SimpleNamespace(root=tmp_path, notebooks=tmp_path / "notebooks", outputs=tmp_path / "outputs",
                        params=tmp_path / "p.yaml")

    def notebook(stage_name, body, **kw):
        nbformat.write(make_notebook(stage_name, body, **kw), w.notebooks / f"{stage_name}.ipynb")

    def run(**kw):
        results = pipeline.run_pipeline(w.params, notebooks_dir=w.notebooks, **kw)
        return [r["status"] for r in results]

    w.notebook, w.run = notebook, run
    w.final = lambda name: w.outputs / "t" / name
    w.manifest = lambda name: json.loads((w.final(name) / "manifest.json").read_text())
    w.params.write_text(PARAMS_TEXT)
    return w


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fgaif_utils.pipeline", *map(str, args)], cwd=S.REPO_ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120)


# ---- the runner on real kernels ----------------------------------------------------------------------

def test_runs_skips_and_reruns_what_changed(ws):
    ws.notebook("00_data", STAGE_00)
    ws.notebook("01_base_models", STAGE_01)

    assert ws.run() == ["run", "run", "missing"]          # 02 has no notebook: a clean stop
    m00, m01 = ws.manifest("00_data"), ws.manifest("01_base_models")
    eval_file = ws.final("00_data") / "eval.jsonl"
    assert eval_file.read_text() == '{"i": 0}\n{"i": 1}\n{"i": 2}\n'
    assert m00["artifacts"] == {"eval.jsonl": sha256(eval_file)}   # executed notebook and manifest left out
    assert m00["artifacts_hash"] == hashlib.sha256(
        json.dumps(m00["artifacts"], sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert m00["rows"] == {"eval.jsonl": 3} and m00["params"]["data"]["n_eval"] == 3
    assert set(m00["params"]) == {"seed", "data"} and "models" in m01["params"]
    assert m01["inputs"] == {"00_data": m00["artifacts_hash"]}
    assert (ws.final("00_data") / "00_data.ipynb").is_file()
    assert not (ws.outputs / "t" / ".00_data.partial").exists()
    # the executed copy re-runs by hand: no runner's work folder in its parameters (it would write to a hidden one)
    executed = nbformat.read(ws.final("00_data") / "00_data.ipynb", as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    # papermill's own record of the run says the same: the final copy, not the partial folder it ran in
    assert executed.metadata.papermill["parameters"] == {"params_path": str(ws.params), "run": "t", "work_dir": None}
    assert executed.metadata.papermill["output_path"] == str(ws.final("00_data") / "00_data.ipynb")
    assert executed.metadata.papermill["input_path"] == str(ws.notebooks / "00_data.ipynb")
    assert len(injected) == 1 and "work_dir = None" in injected[0].source and "run = 't'" in injected[0].source
    assert f"params_path = {str(ws.params)!r}" in injected[0].source and ".partial" not in injected[0].source
    assert m00["params_path"] == str(ws.params)                       # outside the repository: as it is

    def no_kernel(*args, **kwargs):
        raise AssertionError("a stage that is up to date started a notebook")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "execute", no_kernel)
        assert ws.run() == ["skip", "skip", "missing"]

    ws.params.write_text(PARAMS_TEXT.replace("n_eval: 3", "n_eval: 5"))   # 00's section and its artifact change
    assert ws.run(stages="00-01") == ["run", "run"]
    assert json.loads((ws.final("01_base_models") / "summary.json").read_text()) == {"n": 5, "dtype": "float32"}

    ws.notebook("00_data", STAGE_00 + "# a comment")     # 00 reruns, writes the same artifact: 01 stays
    assert ws.run(stages="00-01") == ["run", "skip"]

    ws.params.write_text(PARAMS_TEXT.replace("n_eval: 3", "n_eval: 5") + "models:\n  dtype: bfloat16\n")
    assert ws.run(stages="00-01") == ["skip", "run"]

    ws.params.write_text(ws.params.read_text().replace("first", "second"))   # no stage reads `description`
    assert ws.run(stages="00-01") == ["skip", "skip"]

    before = ws.manifest("00_data")["finished"]
    assert ws.run(stages="01", force=True) == ["run"]
    assert ws.manifest("00_data")["finished"] == before


CHECKPOINTING = """
ctx.checkpoint_dir.mkdir(parents=True, exist_ok=True)
(ctx.checkpoint_dir / "checkpoint.bin").write_bytes(b"x" * 1000)
(ctx.cache_dir / "llm").mkdir(exist_ok=True)                  # a cache every fingerprint shares
(ctx.cache_dir / "llm" / f"{ctx.fingerprint[:8]}.json").write_text("{}")
"""


def test_prune_deletes_checkpoints_of_earlier_fingerprints_of_the_selected_stages_only(ws, capsys):
    ws.notebook("00_data", STAGE_00 + CHECKPOINTING)
    ws.notebook("01_base_models", STAGE_01 + CHECKPOINTING)
    assert ws.run(stages="00-01") == ["run", "run"]
    ws.params.write_text(PARAMS_TEXT.replace("n_eval: 3", "n_eval: 5"))    # both stages get new fingerprints
    assert ws.run(stages="00-01") == ["run", "run"]
    cache = ws.outputs / "t" / ".cache"
    current = {name: ws.manifest(name)["checkpoint_key"][:16] for name in ("00_data", "01_base_models")}
    assert all(len([p for p in (cache / name).iterdir() if p.name != "llm"]) == 2 for name in current)

    assert ws.run(stages="01", prune=True) == ["skip"]                      # up to date: only pruned
    assert sorted(p.name for p in (cache / "01_base_models").iterdir()) == sorted([current["01_base_models"], "llm"])
    assert len(list((cache / "01_base_models" / "llm").iterdir())) == 2     # the shared cache keeps every entry
    assert len(list((cache / "00_data").iterdir())) == 3                    # not selected: untouched
    assert "01_base_models: pruned t/.cache/01_base_models/" in capsys.readouterr().out
    assert ws.run(stages="00-01", prune=True) == ["skip", "skip"]
    assert sorted(p.name for p in (cache / "00_data").iterdir()) == sorted([current["00_data"], "llm"])
    assert (cache / "00_data" / current["00_data"] / "checkpoint.bin").is_file()


def test_a_prose_edit_reruns_a_stage_from_its_checkpoints(ws):
    """The checkpoint key leaves out markdown: the stage runs again (its notebook changed) and finds its checkpoint."""
    body = STAGE_00 + 'ctx.write_json("resumed.json", (ctx.checkpoint_dir / "checkpoint.bin").is_file())\n' + CHECKPOINTING
    ws.notebook("00_data", body)
    assert ws.run(stages="00") == ["run"]
    assert json.loads((ws.final("00_data") / "resumed.json").read_text()) is False
    notebook = make_notebook("00_data", body)
    notebook.cells[0].source = "# 00 data\n\nWhat this stage does, told better."
    nbformat.write(notebook, ws.notebooks / "00_data.ipynb")
    assert ws.run(stages="00") == ["run"]
    assert json.loads((ws.final("00_data") / "resumed.json").read_text()) is True
    ws.notebook("00_data", body + "# a code edit")
    assert ws.run(stages="00") == ["run"]
    assert json.loads((ws.final("00_data") / "resumed.json").read_text()) is False


def test_checkpoint_key_leaves_out_markdown_display_only_params_and_view_modules_only(ws, monkeypatch):
    names = [spec.name for spec in S.STAGES]
    for name in names[:names.index("05_ppo")]:
        S.write_text(ws.outputs / "t" / name / "manifest.json", json.dumps({"artifacts_hash": name, "inputs": {}}))

    def keys(text=PARAMS_TEXT):
        ws.params.write_text(text)
        params = P.load(ws.params)
        return S.fingerprint(params, "05_ppo"), S.fingerprint(params, "05_ppo", for_checkpoints=True)
    ws.notebook("05_ppo", "pass")
    fingerprint, key = keys()
    assert fingerprint != key
    notebook = make_notebook("05_ppo", "pass")
    notebook.cells[0].source = "# PPO, retold"
    nbformat.write(notebook, ws.notebooks / "05_ppo.ipynb")
    assert keys() == (keys()[0], key) and keys()[0] != fingerprint
    shown = PARAMS_TEXT + "ppo:\n  checkpoint_every: 3\n  report_images: 2\nreward:\n  report_records: 5\n"
    assert keys(shown)[1] == key and keys(shown)[0] != keys()[0]
    assert keys(PARAMS_TEXT + "ppo:\n  beta: 0.3\n")[1] != key                # what it trains
    assert keys(PARAMS_TEXT + "reward:\n  checkpoint_every: 7\n  lr: 0.5\n")[1] != key
    ws.notebook("05_ppo", "pass\n# a code edit")
    assert keys()[1] != key
    ws.notebook("05_ppo", "pass")
    real_sources = S.module_sources
    for module, trains in (("ppo_viz", False), ("reward_viz", False), ("ppo", True), ("reward", True)):
        monkeypatch.setattr(S, "module_sources", lambda modules, edited=module: {   # noqa: E731
            name: "edited" if name == edited else source for name, source in real_sources(modules).items()})
        edited_fingerprint, edited_key = keys()
        assert edited_fingerprint != fingerprint and (edited_key != key) == trains, module   # a plot: no training
    monkeypatch.setattr(S, "module_sources", real_sources)
    ws.notebook("03_ai_feedback", "pass")               # where a key comes from is not what stage 03 computes

    def key_03(text):
        ws.params.write_text(text)
        return S.fingerprint(P.load(ws.params), "03_ai_feedback", for_checkpoints=True)
    assert key_03(PARAMS_TEXT + "feedback:\n  llm_api_key_env: MY_KEY\n  vision_api_key_env: MY_KEY\n") == \
        key_03(PARAMS_TEXT) != key_03(PARAMS_TEXT + "feedback:\n  llm_model: another\n")


def test_checkpoint_key_follows_the_computing_packages_and_leaves_out_the_compare_runs(ws, monkeypatch):
    """`--force` after an upgrade trains again (a finished checkpoint of other numerics is not reloaded); a new
    compare run re-runs stage 06 but keeps its records folder (each policy's records are keyed by its adapter)."""
    names = [spec.name for spec in S.STAGES]
    for name in names[:-1]:
        S.write_text(ws.final(name) / "manifest.json", json.dumps({"artifacts_hash": name, "inputs": {}}))
    ws.notebook("04_reward_models", "pass")
    ws.notebook("06_evaluate", "pass")
    ws.params.write_text(PARAMS_TEXT + "evaluate:\n  compare_runs: [other]\n")
    params = P.load(ws.params)
    keys = lambda name: (S.fingerprint(params, name), S.fingerprint(params, name, for_checkpoints=True))  # noqa: E731
    reward_keys, evaluate_keys = keys("04_reward_models"), keys("06_evaluate")
    S.write_text(ws.outputs / "other" / "05_ppo" / "manifest.json", json.dumps({"artifacts_hash": "x", "inputs": {}}))
    assert keys("06_evaluate")[0] != evaluate_keys[0] and keys("06_evaluate")[1] == evaluate_keys[1]
    versions = S.package_versions()
    monkeypatch.setattr(S, "package_versions", lambda: {**versions, "papermill": "0.1"})
    assert keys("04_reward_models") == reward_keys
    monkeypatch.setattr(S, "package_versions", lambda: {**versions, "torch": "9.9.9"})
    assert keys("04_reward_models")[0] == reward_keys[0] and keys("04_reward_models")[1] != reward_keys[1]


def test_failing_cell_names_stage_and_cell_and_keeps_final(ws, capsys):
    ws.notebook("00_data", STAGE_00)
    assert ws.run(stages="00") == ["run"]
    final_before = {p.name: p.read_bytes() for p in ws.final("00_data").iterdir()}

    ws.notebook("00_data", 'raise ValueError("boom 42")')
    assert pipeline.main([str(ws.params), "--stages", "00-01"]) == 1
    err = capsys.readouterr().err
    # cells run: parameters [1], injected parameters [2], open_stage [3], the failing one [4]
    assert "stage 00_data failed in cell 4: ValueError: boom 42" in err
    failed = ws.outputs / "t" / "00_data.failed.ipynb"
    assert str(failed) in err and "boom 42" in failed.read_text()
    assert {p.name: p.read_bytes() for p in ws.final("00_data").iterdir()} == final_before

    ws.notebook("00_data", STAGE_00 + "# fixed")
    assert ws.run(stages="00") == ["run"]
    assert not failed.exists()


def test_notebook_without_finish_is_a_failure(ws):
    ws.notebook("00_data", "x = 1")
    nb = nbformat.read(ws.notebooks / "00_data.ipynb", 4)
    nb.cells = nb.cells[:-1]                      # drop the ctx.finish() cell
    nbformat.write(nb, ws.notebooks / "00_data.ipynb")
    results = pipeline.run_pipeline(ws.params, notebooks_dir=ws.notebooks)
    assert [r["status"] for r in results] == ["fail"]
    assert "did not call ctx.finish()" in results[0]["error"]
    assert not ws.final("00_data").exists()


def test_killed_runner_leaves_no_final_dir_and_cli_run_completes(ws):
    ws.notebook("00_data", STAGE_00)
    killed = cli(ws.params, "--stages", "00", env={"FGAIF_TEST_KILL": "1"})
    assert killed.returncode == -9, killed.stderr
    partial = ws.outputs / "t" / ".00_data.partial"
    assert (partial / "half.json").is_file()
    assert not ws.final("00_data").exists()

    done = cli(ws.params, "--stages", "00-02")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in ws.final("00_data").iterdir()) == ["00_data.ipynb", "eval.jsonl", "manifest.json"]
    assert not partial.exists()
    assert "01_base_models: not built yet" in done.stdout   # a clean stop, exit 0
    assert "02_sample_responses" not in done.stdout          # nothing after the first missing notebook
    summary = done.stdout[done.stdout.index("\nstage "):]
    assert "00_data" in summary and " run " in summary and "eval.jsonl=3" in summary


# ---- the runner before any kernel starts -------------------------------------------------------------

def test_params_error_exits_2_before_any_work(ws, capsys):
    ws.notebook("00_data", STAGE_00)
    ws.params.write_text("data:\n  n_evl: 3\n")
    assert pipeline.main([str(ws.params)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'data.n_evl'" in err and str(ws.params) in err
    assert not ws.outputs.exists()


def test_bad_stage_selection_exits_2(ws, capsys):
    assert pipeline.main([str(ws.params), "--stages", "03-01"]) == 2
    assert "runs backwards" in capsys.readouterr().err
    assert pipeline.main([str(ws.params), "--stages", "9"]) == 2
    assert not ws.outputs.exists()


def test_missing_upstream_names_what_to_run(ws, capsys):
    ws.notebook("01_base_models", STAGE_01)
    assert pipeline.main([str(ws.params), "--stages", "01"]) == 1
    assert (f"stage 01_base_models needs 00_data of run 't': run "
            f"`python -m fgaif_utils.pipeline {ws.params} --stages 00` first") in capsys.readouterr().err
    assert pipeline.main([str(ws.params), "--stages", "01", "--run", "other"]) == 1
    assert "needs 00_data of run 'other'" in capsys.readouterr().err


def test_a_missing_reused_upstream_names_the_run_that_must_make_it(ws, tmp_path, capsys):
    ws.notebook("00_data", STAGE_00)
    ws.notebook("01_base_models", STAGE_01)
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(f"extends: {ws.params}\nrun: t2\nreuse_run: t\nreuse_stages: [00_data]\n")
    assert pipeline.main([str(overlay), "--stages", "01"]) == 1
    assert ("stage 01_base_models of run 't2' reuses 00_data from run 't' (params key 'reuse_run'), which has "
            "neither run nor reused it: run `python -m fgaif_utils.pipeline <the params file of run 't'> "
            "--stages 00` first") in capsys.readouterr().err


def test_select_stages():
    names = lambda spec: [s.name for s in pipeline.select_stages(spec)]
    assert names("00-03") == ["00_data", "01_base_models", "02_sample_responses", "03_ai_feedback"]
    assert names("01") == ["01_base_models"]
    assert names("05,00,02") == ["00_data", "02_sample_responses", "05_ppo"]
    assert names("01_base_models-02") == ["01_base_models", "02_sample_responses"]
    assert names(None) == [s.name for s in S.STAGES]
    assert names("04-") == ["04_reward_models", "05_ppo", "06_evaluate"]     # open ranges, not just stage 04
    assert names("-01") == ["00_data", "01_base_models"]
    with pytest.raises(S.StageError):
        pipeline.select_stages("07")
    with pytest.raises(S.StageError, match="names no stage"):
        pipeline.select_stages("01,-")


# ---- the stage contract without the runner -----------------------------------------------------------

def test_open_stage_by_hand_promotes_on_finish(ws, monkeypatch):
    monkeypatch.setenv("FGAIF_SECRET_FOR_TEST", "sk-do-not-write-me")
    ws.notebook("00_data", STAGE_00)
    stale = ws.outputs / "t" / ".00_data.partial" / "stale.txt"
    stale.parent.mkdir(parents=True)
    stale.write_text("from an interrupted attempt")
    cached = ws.outputs / "t" / ".cache" / "00_data" / "item.json"
    cached.parent.mkdir(parents=True)
    cached.write_text("{}")

    ctx = S.open_stage("00", ws.params)
    assert (ctx.stage, ctx.run) == ("00_data", "t")
    assert ctx.work_dir == ws.outputs / "t" / ".00_data.partial" and not stale.exists()
    assert ctx.cache_dir == cached.parent and cached.is_file()   # the cache survives a new attempt
    ctx.write_jsonl("a.jsonl", [{"x": 1}, {"x": "é"}])
    ctx.write_json("sub/b.json", {"y": 2})
    ctx.count("images", 12)
    ctx.finish(extra={"note": "hi"})

    final = ws.final("00_data")
    assert ctx.work_dir == final and not (ws.outputs / "t" / ".00_data.partial").exists()
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["artifacts"] == {"a.jsonl": sha256(final / "a.jsonl"), "sub/b.json": sha256(final / "sub/b.json")}
    assert manifest["rows"] == {"a.jsonl": 2, "images": 12}
    assert manifest["extra"] == {"note": "hi"}
    assert manifest["fingerprint"] == S.fingerprint(P.load(ws.params), "00_data", notebooks=ws.notebooks)
    assert manifest["versions"]["python"] and "numpy" in manifest["versions"]
    assert "sk-do-not-write-me" not in (final / "manifest.json").read_text()
    assert S.read_jsonl(final / "a.jsonl") == [{"x": 1}, {"x": "é"}]
    with pytest.raises(S.StageError, match="already called"):
        ctx.finish()

    ctx = S.open_stage("00_data", ws.params)          # a second attempt replaces the final folder whole
    ctx.write_json("only.json", [])
    ctx.finish()
    assert sorted(p.name for p in final.iterdir()) == ["manifest.json", "only.json"]


def test_fingerprint_follows_source_params_and_upstream(ws):
    ws.notebook("00_data", STAGE_00)
    params = P.load(ws.params)
    base = S.fingerprint(params, "00_data")

    ws.notebook("00_data", STAGE_00, outputs=[nbformat.v4.new_output("stream", name="stdout", text="noise\n")])
    assert S.fingerprint(params, "00_data") == base                     # outputs are not source
    ws.notebook("00_data", STAGE_00 + "\n# edited")
    assert S.fingerprint(params, "00_data") != base
    ws.notebook("00_data", STAGE_00)

    ws.params.write_text(PARAMS_TEXT + "models:\n  dtype: float16\nnum_threads: 1\n")
    assert S.fingerprint(P.load(ws.params), "00_data") == base          # 00 reads neither models nor threads
    ws.params.write_text(PARAMS_TEXT + "seed: 1\n")
    assert S.fingerprint(P.load(ws.params), "00_data") != base

    ws.notebook("01_base_models", STAGE_01)
    with pytest.raises(S.StageError, match="needs 00_data of run 't'"):
        S.fingerprint(params, "01_base_models")
    fingerprints = []
    for artifacts_hash in ("aaa", "bbb"):
        S.write_text(ws.final("00_data") / "manifest.json", json.dumps({"artifacts_hash": artifacts_hash}))
        fingerprints.append(S.fingerprint(params, "01_base_models"))
    assert fingerprints[0] != fingerprints[1]                            # upstream artifacts feed downstream


def test_the_description_prompt_is_in_the_fingerprints_of_the_stages_that_read_it(ws):
    """Stages 04-06 build their sequences around sampling.prompt, a key of stage 02's section: a new prompt must
    make them (and their checkpoints) again."""
    names = [spec.name for spec in S.STAGES]
    for name in names[:-1]:
        S.write_text(ws.final(name) / "manifest.json", json.dumps({"artifacts_hash": name, "inputs": {}}))
    for name in names:
        ws.notebook(name, "pass")

    def fingerprints(text):
        ws.params.write_text(text)
        params = P.load(ws.params)
        return {name: (S.fingerprint(params, name), S.fingerprint(params, name, for_checkpoints=True)) for name in names}
    before = fingerprints(PARAMS_TEXT)
    after = fingerprints(PARAMS_TEXT + "sampling:\n  prompt: Describe the shapes.\n")
    changed = [name for name in names if before[name][0] != after[name][0]]
    assert changed == ["02_sample_responses", "04_reward_models", "05_ppo", "06_evaluate"]
    assert all(before[name][1] != after[name][1] for name in changed)


def _fgaif_imports(source, anywhere):
    """fgaif_utils modules a source imports: at its top level (a module; a function's lazy import is left out), or
    anywhere (a notebook's cells)."""
    import ast
    tree = ast.parse(source)
    nodes = ast.walk(tree) if anywhere else tree.body
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("fgaif_utils", ""):
            inside = (node.module or "").split(".")[1:] if node.module and node.module.startswith("fgaif_utils") \
                else ([node.module] if node.module else [])
            found |= set(inside[:1]) if inside else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("fgaif_utils.")}
    return {name for name in found if (S.PACKAGE_DIR / f"{name}.py").is_file()}


@pytest.mark.parametrize("spec", S.STAGES, ids=lambda spec: spec.name)
def test_a_stage_hashes_every_module_its_notebook_reaches(spec):
    """Else editing such a module leaves the stage "up to date" with what the old code made (ppo_viz for stage
    05's plots and segment, which the scorer imports, for stage 01's profile were missing)."""
    notebook = nbformat.read(S.REPO_ROOT / "notebooks" / f"{spec.name}.ipynb", as_version=4)
    todo = _fgaif_imports("\n".join(c.source for c in notebook.cells if c.cell_type == "code"), anywhere=True)
    reached = set()
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo |= _fgaif_imports((S.PACKAGE_DIR / f"{name}.py").read_text(), anywhere=False)
    assert reached and reached - set(spec.modules) - set(S.NOT_HASHED) == set()


def test_input_dir_only_reads_finished_earlier_stages(ws):
    ws.notebook("00_data", STAGE_00)
    ws.notebook("01_base_models", STAGE_01)
    with pytest.raises(S.StageError, match="needs 00_data"):
        S.open_stage("01_base_models", ws.params)
    S.open_stage("00_data", ws.params).finish()
    ctx = S.open_stage("01_base_models", ws.params)
    assert ctx.input_dir("00") == ws.final("00_data")
    with pytest.raises(S.StageError, match="only read earlier stages"):
        ctx.input_dir("02")


def test_atomic_path_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "a.json"
    S.write_text(target, "old")
    with pytest.raises(RuntimeError):
        with S.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    with S.atomic_path(tmp_path / "folder") as tmp:   # folders too (adapter directories)
        tmp.mkdir()
        (tmp / "w.bin").write_bytes(b"1")
    assert (tmp_path / "folder" / "w.bin").read_bytes() == b"1"


def _checkpoint_set(folder, step):
    """A two-file checkpoint whose every file says which step wrote it."""
    S.write_checkpoint(folder, {"weights.bin": lambda path: path.write_text(f"weights {step}"),
                                "optimizer.pt": lambda path: path.write_text(f"optimizer {step}")}, {"step": step})


def _read_set(folder):
    state, files = S.read_checkpoint(folder, ("weights.bin", "optimizer.pt"))
    return state["step"], {name: path.read_text() for name, path in files.items()}


def test_a_checkpoint_interrupted_at_any_rename_reads_back_as_one_whole_set(tmp_path, monkeypatch):
    """A kill between any two renames of a save leaves the old set or the new one, never new weights beside an old
    state (the old three-rename writes could); a later save removes what the cut-short one left."""
    real_replace = os.replace
    renames_per_save = 3   # two files, then state.json
    for interrupted in range(renames_per_save):
        folder = tmp_path / f"cut{interrupted}"
        _checkpoint_set(folder, 1)
        calls = []

        def replace(src, dst):
            calls.append(dst)
            if len(calls) == interrupted + 1:
                raise KeyboardInterrupt
            real_replace(src, dst)
        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(KeyboardInterrupt):
            _checkpoint_set(folder, 2)
        monkeypatch.setattr(os, "replace", real_replace)
        assert _read_set(folder) == (1, {"weights.bin": "weights 1", "optimizer.pt": "optimizer 1"})
        _checkpoint_set(folder, 3)
        assert _read_set(folder) == (3, {"weights.bin": "weights 3", "optimizer.pt": "optimizer 3"})
        assert len(list(folder.iterdir())) == 3, sorted(p.name for p in folder.iterdir())   # no orphans


def test_read_checkpoint_without_one_an_old_style_set_and_a_missing_file(tmp_path):
    assert S.read_checkpoint(tmp_path / "none", ("weights.bin",)) is None
    old = tmp_path / "old"                      # written before the sets had names: plain file names
    old.mkdir()
    (old / "weights.bin").write_text("w")
    (old / "state.json").write_text(json.dumps({"step": 4}))
    state, files = S.read_checkpoint(old, ("weights.bin", "optimizer.pt"))
    assert state == {"step": 4} and files == {"weights.bin": old / "weights.bin"}
    new = tmp_path / "new"
    _checkpoint_set(new, 5)
    _, files = S.read_checkpoint(new, ("weights.bin", "optimizer.pt"))
    files["optimizer.pt"].unlink()
    with pytest.raises(S.StageError, match=r"state\.json names optimizer-[0-9a-f]{8}\.pt"):
        S.read_checkpoint(new, ("weights.bin", "optimizer.pt"))


def test_savefig_is_atomic_png(ws):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ws.notebook("00_data", STAGE_00)
    ctx = S.open_stage("00_data", ws.params)
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = ctx.savefig(fig, "plots/line.png")
    plt.close(fig)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["line.png"]


def test_run_name_must_be_a_plain_folder_name(ws):
    for bad in ("../up", "a/b", ".hidden", ""):
        with pytest.raises(S.StageError, match="run name"):
            S.check_run_name(bad)
    assert S.check_run_name("tiny-2.b_c") == "tiny-2.b_c"


def test_hashing_a_folder_of_many_small_files(tmp_path):
    for i in range(300):
        (tmp_path / f"{i:05d}.png").write_bytes(os.urandom(600))
    hashes = S.artifact_hashes(tmp_path)
    assert len(hashes) == 300 and all(hashes[p.name] == sha256(p) for p in tmp_path.iterdir())


def _reuse_chain(ws, tmp_path, last_reuses):
    """Run t with stage 00 done; overlays t2 (reuses 00 from t) and t3 (reuses `last_reuses` from t2)."""
    ws.notebook("00_data", STAGE_00)
    ws.notebook("01_base_models", STAGE_01)
    assert ws.run(stages="00") == ["run"]
    middle, last = tmp_path / "middle.yaml", tmp_path / "last.yaml"
    middle.write_text(f"extends: {ws.params}\nrun: t2\nreuse_run: t\nreuse_stages: [00_data]\n")
    last.write_text(f"extends: {ws.params}\nrun: t3\nreuse_run: t2\nreuse_stages: [{last_reuses}]\n")
    return middle, last


def test_reuse_follows_a_run_that_reused_the_stage_itself(ws, tmp_path):
    middle, last = _reuse_chain(ws, tmp_path, "00_data")
    results = pipeline.run_pipeline(last, notebooks_dir=ws.notebooks, stages="00-01")
    assert [r["status"] for r in results] == ["fail"]           # t2 has neither run nor reused 00 yet
    assert "reused from run 't2'" in results[0]["error"]
    assert [r["status"] for r in pipeline.run_pipeline(middle, notebooks_dir=ws.notebooks, stages="00")] == ["reused"]
    assert (ws.outputs / "t2" / ".00_data.reused").read_text() == "t\n"
    results = pipeline.run_pipeline(last, notebooks_dir=ws.notebooks, stages="00-01")
    assert [r["status"] for r in results] == ["reused", "run"]
    m01 = json.loads((ws.outputs / "t3" / "01_base_models" / "manifest.json").read_text())
    assert m01["inputs"] == {"00_data": ws.manifest("00_data")["artifacts_hash"]}
    assert (ws.outputs / "t3" / ".00_data.reused").read_text() == "t\n"


def test_a_middle_run_records_its_reuse_even_when_the_reused_stage_is_not_selected(ws, tmp_path):
    middle, last = _reuse_chain(ws, tmp_path, "00_data, 01_base_models")
    assert [r["status"] for r in pipeline.run_pipeline(middle, notebooks_dir=ws.notebooks, stages="01")] == ["run"]
    assert (ws.outputs / "t2" / ".00_data.reused").read_text() == "t\n"
    assert [r["status"] for r in pipeline.run_pipeline(last, notebooks_dir=ws.notebooks, stages="00-01")] == \
        ["reused", "reused"]
    assert (ws.outputs / "t3" / ".00_data.reused").read_text() == "t\n"
    assert (ws.outputs / "t3" / ".01_base_models.reused").read_text() == "t2\n"


def test_a_run_that_made_a_stage_and_now_reuses_it_reads_the_reused_one(ws, tmp_path):
    ws.notebook("00_data", STAGE_00)
    ws.notebook("01_base_models", STAGE_01)
    assert ws.run(stages="00") == ["run"]
    own = tmp_path / "own.yaml"
    own.write_text(f"extends: {ws.params}\nrun: t2\ndata:\n  n_eval: 4\n")
    assert [r["status"] for r in pipeline.run_pipeline(own, notebooks_dir=ws.notebooks, stages="00-01")] == \
        ["run", "run"]                                                      # t2 makes its own 00 (4 rows)
    reusing = tmp_path / "reusing.yaml"
    reusing.write_text(f"extends: {own}\nreuse_run: t\nreuse_stages: [00_data]\n")
    assert [r["status"] for r in pipeline.run_pipeline(reusing, notebooks_dir=ws.notebooks, stages="00-01")] == \
        ["reused", "run"]                                                   # now 01 reads t's 00 (3 rows)
    assert (ws.outputs / "t2" / "00_data" / "eval.jsonl").is_file()         # t2's old 00 is still there ...
    assert S.source_run("t2", "00_data") == "t" and S.stale_inputs("t2", "01_base_models") == []   # ... unread
    third = tmp_path / "third.yaml"                                         # nor read by a run reusing t2's 01
    third.write_text(f"extends: {ws.params}\nrun: t3\nreuse_run: t2\nreuse_stages: [00_data, 01_base_models]\n")
    assert pipeline.reuse_problem("01_base_models", "t3", P.load(third)) is None
    assert [r["status"] for r in pipeline.run_pipeline(own, notebooks_dir=ws.notebooks, stages="00")] == ["skip"]
    assert not (ws.outputs / "t2" / ".00_data.reused").exists()             # t2 makes 00 itself again: its own
    assert S.source_run("t2", "00_data") == "t2" and S.stale_inputs("t2", "01_base_models") == ["00_data"]


def test_by_hand_a_reused_stage_is_refused_and_a_stage_made_here_drops_the_pointer(ws, tmp_path):
    ws.notebook("00_data", STAGE_00)
    assert ws.run(stages="00") == ["run"]
    reusing = tmp_path / "reusing.yaml"
    reusing.write_text(f"extends: {ws.params}\nrun: t2\nreuse_run: t\nreuse_stages: [00_data]\n")
    assert [r["status"] for r in pipeline.run_pipeline(reusing, notebooks_dir=ws.notebooks, stages="00")] == \
        ["reused"]
    with pytest.raises(S.StageError, match="stage 00_data is not made by run 't2': .*reuses it from run 't'"):
        S.open_stage("00_data", reusing)                      # in JupyterLab: what it made would never be read
    own = tmp_path / "own.yaml"
    own.write_text(f"extends: {ws.params}\nrun: t2\n")
    ctx = S.open_stage("00_data", own)
    ctx.write_jsonl("eval.jsonl", [{"i": 0}])
    ctx.finish()
    assert not (ws.outputs / "t2" / ".00_data.reused").exists() and S.source_run("t2", "00_data") == "t2"


def test_a_run_reuses_stages_of_another_run(ws, tmp_path):
    ws.notebook("00_data", STAGE_00)
    ws.notebook("01_base_models", STAGE_01)
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(f"extends: {ws.params}\nrun: t2\nreuse_run: t\nreuse_stages: [00_data]\n")
    results = pipeline.run_pipeline(overlay, notebooks_dir=ws.notebooks, stages="00-01")
    assert [r["status"] for r in results] == ["fail"]                       # t has not run 00 yet
    assert "reused from run 't'" in results[0]["error"] and "--run t" in results[0]["error"]
    assert ws.run(stages="00") == ["run"]
    results = pipeline.run_pipeline(overlay, notebooks_dir=ws.notebooks, stages="00-01")
    assert [r["status"] for r in results] == ["reused", "run"]
    assert not (ws.outputs / "t2" / "00_data").exists()                     # read from t, not copied
    m01 = json.loads((ws.outputs / "t2" / "01_base_models" / "manifest.json").read_text())
    assert m01["inputs"] == {"00_data": ws.manifest("00_data")["artifacts_hash"]}
    assert [r["status"] for r in pipeline.run_pipeline(overlay, notebooks_dir=ws.notebooks, stages="00-01")] == \
        ["reused", "skip"]
    overlay.write_text(f"extends: {ws.params}\nrun: t2\nreuse_stages: [00_data]\n")
    with pytest.raises(S.StageError, match="reuse_run"):
        pipeline.run_pipeline(overlay, notebooks_dir=ws.notebooks, stages="00-01")


def test_a_reused_stage_that_is_stale_in_its_own_run_is_refused(ws, tmp_path):
    ws.notebook("00_data", STAGE_00)
    ws.notebook("01_base_models", STAGE_01)
    assert ws.run(stages="00-01") == ["run", "run"]
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(f"extends: {ws.params}\nrun: t2\nreuse_run: t\nreuse_stages: [00_data, 01_base_models]\n")
    statuses = lambda: [r["status"] for r in pipeline.run_pipeline(overlay, notebooks_dir=ws.notebooks,  # noqa: E731
                                                                   stages="00-01")]
    assert statuses() == ["reused", "reused"]
    ws.params.write_text(PARAMS_TEXT.replace("n_eval: 3", "n_eval: 4"))
    assert ws.run(stages="00") == ["run"]                     # t's 01 was made from the old 00: stale now
    assert S.stale_inputs("t", "01_base_models") == ["00_data"] and S.stale_inputs("t", "00_data") == []
    results = pipeline.run_pipeline(overlay, notebooks_dir=ws.notebooks, stages="00-01")
    assert [r["status"] for r in results] == ["reused", "fail"]
    assert "01_base_models is stale (00_data changed" in results[1]["error"]
    # not selected, the stale stage is still what the selected one reads: refused before anything runs
    ws.notebook("02_sample_responses", 'stage.write_text(ctx.path("n.json"), (ctx.input_dir("01") / "summary.json").read_text())')
    results = pipeline.run_pipeline(overlay, notebooks_dir=ws.notebooks, stages="02")
    assert [(r["stage"], r["status"]) for r in results] == [("01_base_models", "fail")]
    assert "01_base_models is stale (00_data changed" in results[0]["error"]
    assert not (ws.outputs / "t2" / "02_sample_responses").exists()
    assert ws.run(stages="01") == ["run"]
    assert statuses() == ["reused", "reused"]
    assert [r["status"] for r in pipeline.run_pipeline(overlay, notebooks_dir=ws.notebooks, stages="02")] == ["run"]


def test_stage_06_follows_its_compare_runs_and_leaves_out_stale_ones_and_other_bases(ws):
    """A compare run's policy is evaluated in stage 06 too: its stage 05's artifacts are in 06's fingerprint, and
    one made from upstream artifacts that changed since, or on another base policy, is left out with a note."""
    from fgaif_utils import evaluate
    names = [spec.name for spec in S.STAGES]
    upstream = names[:names.index("06_evaluate")]

    def manifest(run, name, artifacts_hash, inputs=None):
        S.write_text(ws.outputs / run / name / "manifest.json",
                     json.dumps({"artifacts_hash": artifacts_hash, "inputs": inputs or {}}))

    for name in upstream:
        manifest("t", name, f"{name}-t")
    inputs = {name: f"{name}-t" for name in upstream}
    for name in upstream[:-1]:                                # run c reuses t's 00-04 and trains its own policy
        S.record_reuse("c", name, "t")
    ws.notebook("06_evaluate", "pass")
    ws.params.write_text(PARAMS_TEXT + "evaluate:\n  compare_runs: [c]\n")
    params = P.load(ws.params)
    without = S.fingerprint(params, "06_evaluate")
    made_from_t = {name: f"{name}-t" for name in upstream[:-1]}
    manifest("c", "05_ppo", "c-1", made_from_t)
    first = S.fingerprint(params, "06_evaluate")
    manifest("c", "05_ppo", "c-2", made_from_t)
    assert len({without, first, S.fingerprint(params, "06_evaluate")}) == 3

    adapter = ws.outputs / "c" / "05_ppo" / "policy_adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    sources = lambda: evaluate.policy_sources(ws.final("05_ppo") / "policy_adapter", ["c"], S.final_dir,  # noqa: E731
                                              lambda run: S.compare_run_problem(run, inputs))
    assert S.compare_run_problem("c", inputs) is None and "c" in sources()[0]
    manifest("t", "04_reward_models", "04-retrained")        # t's reward models changed: c's policy is stale
    assert "stale (04_reward_models changed" in S.compare_run_problem("c", inputs)
    chosen, notes = sources()
    assert "c" not in chosen and any(note.startswith("c: its stage 05_ppo is stale") for note in notes)
    manifest("t", "04_reward_models", "04_reward_models-t")
    manifest("c", "05_ppo", "c-3", dict(made_from_t, **{"01_base_models": "another-base"}))
    S.remove_path(ws.outputs / "c" / ".01_base_models.reused")       # c trained its own base policy
    manifest("c", "01_base_models", "another-base")
    assert "another base policy" in S.compare_run_problem("c", inputs)


def test_stage_05_follows_the_deepspeed_file_and_the_validation_batch_size(ws, tmp_path):
    names = [spec.name for spec in S.STAGES]
    for name in names[:names.index("05_ppo")]:
        S.write_text(ws.outputs / "t" / name / "manifest.json", json.dumps({"artifacts_hash": name, "inputs": {}}))
    ws.notebook("05_ppo", "pass")
    config = tmp_path / "zero3.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    text = PARAMS_TEXT + f"ppo:\n  launcher: torchrun\n  nproc: 2\n  deepspeed: {config}\n"
    ws.params.write_text(text)
    first = S.fingerprint(P.load(ws.params), "05_ppo")
    config.write_text(json.dumps({"zero_optimization": {"stage": 3, "overlap_comm": True}}))   # same path
    second = S.fingerprint(P.load(ws.params), "05_ppo")
    ws.params.write_text(text + "evaluate:\n  batch_size: 7\n")
    assert len({first, second, S.fingerprint(P.load(ws.params), "05_ppo")}) == 3


def test_shown_path_is_repository_relative_inside_it_and_leaves_hub_ids_and_outside_paths_alone(tmp_path):
    assert S.shown_path(S.REPO_ROOT / "params" / "tiny.yaml") == "params/tiny.yaml"
    assert S.shown_path(S.REPO_ROOT / "outputs" / "tiny" / ".." / "tiny" / "05_ppo") == "outputs/tiny/05_ppo"
    assert S.shown_path(tmp_path / "p.yaml") == str(tmp_path / "p.yaml")
    # a model named by its hub id is no folder here; resolving it against the working folder would invent one
    assert S.shown_path("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"


def test_running_a_later_stage_alone_says_when_an_earlier_one_is_out_of_date(ws, capsys):
    ws.notebook("00_data", STAGE_00)
    ws.notebook("01_base_models", STAGE_01)
    assert ws.run(stages="00-01") == ["run", "run"]
    capsys.readouterr()
    assert ws.run(stages="01") == ["skip"]
    assert "note:" not in capsys.readouterr().out
    ws.params.write_text(PARAMS_TEXT.replace("n_eval: 3", "n_eval: 5"))   # 00's params change; only 01 selected
    assert ws.run(stages="01") == ["run"]       # its fingerprint holds `data` too, but it reads 00's old rows
    printed = capsys.readouterr().out
    assert "note: not selected, and made with other params or code than these: 00_data;" in printed
    assert "--stages 00-" in printed
    assert json.loads((ws.final("01_base_models") / "summary.json").read_text())["n"] == 3
    # 00 made again in the same call, 01 between it and the selected 02: said before 02 runs
    ws.notebook("02_sample_responses", 'stage.write_text(ctx.path("n.json"), (ctx.input_dir("01") / "summary.json").read_text())')
    assert ws.run(stages="00-01") == ["run", "run"]
    assert ws.run(stages="02") == ["run"]
    ws.notebook("00_data", STAGE_00 + 'ctx.write_json("more.json", 1)\n')   # 01 is out of date only once 00 re-ran
    capsys.readouterr()
    assert ws.run(stages="00,02") == ["run", "run"]
    printed = capsys.readouterr().out
    assert "note: not selected, and made with other params or code than these: 01_base_models;" in printed
    assert printed.index("01_base_models;") > printed.index("00_data: run done")


def test_a_stage_made_with_other_packages_is_kept_and_says_so(ws, capsys):
    ws.notebook("00_data", STAGE_00)
    assert ws.run(stages="00") == ["run"]
    manifest_path = ws.final("00_data") / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["versions"] == S.package_versions() and S.changed_versions(manifest) == ""
    capsys.readouterr()
    manifest["versions"] = {**manifest["versions"], "torch": "1.0.0", "gone": "0.1"}
    manifest_path.write_text(json.dumps(manifest))
    assert ws.run(stages="00") == ["skip"]                 # versions are not in the fingerprint
    printed = capsys.readouterr().out
    assert f"torch 1.0.0 -> {S.package_versions()['torch']}" in printed and "gone 0.1 -> absent" in printed
    assert "--force --stages 00" in printed
