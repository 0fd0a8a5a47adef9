"""Run the stage notebooks in order with papermill, skipping stages that are already up to date.

    python -m fgaif_utils.pipeline params/tiny.yaml [--run NAME] [--stages 00-03] [--force] [--prune]

A stage is skipped when outputs/<run>/<stage>/manifest.json has the fingerprint the stage would have now
(see fgaif_utils.stage). Otherwise its notebook runs into outputs/<run>/.<stage>.partial/ and, once its
manifest is written, that folder replaces the final one in a single rename. A failed stage keeps its
executed notebook as outputs/<run>/<stage>.failed.ipynb and leaves the previous final folder untouched.
Exit status: 0 done (or stopped at a stage whose notebook is not written yet), 1 a stage failed,
2 bad params or arguments (before any work).
"""
import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

from fgaif_utils import params as P
from fgaif_utils import stage as S


def select_stages(spec=None):
    """Stage specs for "00-03", "01", "00,02,05", "03-" (03 to the end), "-02" (numbers or full names); None means
    all, in table order."""
    if spec is None:
        return list(S.STAGES)
    names = [s.name for s in S.STAGES]
    chosen = set()
    for part in str(spec).split(","):
        first, dash, last = (side.strip() for side in part.strip().partition("-"))
        if not first and not last:
            raise S.StageError(f"--stages {spec!r}: {part!r} names no stage")
        start = names.index(S.stage_spec(first).name) if first else 0
        stop = (names.index(S.stage_spec(last).name) if last else len(names) - 1) if dash else start
        if stop < start:
            raise S.StageError(f"--stages {spec!r}: range {part!r} runs backwards")
        chosen.update(names[start:stop + 1])
    return [s for s in S.STAGES if s.name in chosen]


@contextlib.contextmanager
def kernel_env(notebooks):
    """Environment the kernels inherit: where notebooks and outputs are, unbuffered output."""
    python_path = os.pathsep.join(p for p in (str(S.REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    settings = {"FGAIF_NOTEBOOKS": str(notebooks), "FGAIF_OUTPUTS": str(S.outputs_root()),
                "PYTHONPATH": python_path, "PYTHONUNBUFFERED": "1", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def execute(notebook, output, params_path, run, work_dir):
    import papermill   # imported here so that `--help` and params errors stay fast
    import zmq
    from traitlets.config import Config
    # CurveZMQ between runner and kernel where available: nothing travels in plain text
    encryption = "auto" if zmq.has("curve") else "disabled"
    encrypted = Config({"KernelManager": {"transport_encryption": encryption}})
    papermill.execute_notebook(
        str(notebook), str(output),
        parameters=dict(params_path=str(params_path), run=run, work_dir=str(work_dir)),
        kernel_name="python3", language="python", progress_bar=False, cwd=str(S.REPO_ROOT), config=encrypted)


def keep_rerunnable(executed, stage_name, params_path, run):
    """Rewrite the parameters papermill injected into an executed copy: the params path relative to the repository,
    and no work_dir (the runner's partial folder, gone after the run). The copy then re-runs from anywhere, as the
    notebook in notebooks/ does, instead of writing into a hidden folder of the machine that made it."""
    import nbformat
    notebook = nbformat.read(str(executed), as_version=4)
    for cell in notebook.cells:
        if "injected-parameters" in cell.metadata.get("tags", []):
            cell.source = (f"# The pipeline runner ran this copy with these params and run (in a work folder of its own,\n"
                           f"# now this stage's folder). To run the stage again, open notebooks/{stage_name}.ipynb\n"
                           f"# or run `python -m fgaif_utils.pipeline {S.shown_path(params_path)} --stages "
                           f"{stage_name[:2]}`.\n"
                           f"params_path = {S.shown_path(params_path)!r}\nrun = {run!r}\nwork_dir = None\n")
    papermill = notebook.metadata.get("papermill")
    if papermill is not None:   # papermill's record of the run names the machine's folders and the partial one
        papermill["input_path"] = S.shown_path(papermill["input_path"])
        papermill["output_path"] = S.shown_path(S.final_dir(run, stage_name) / executed.name)
        papermill["parameters"] = {"params_path": S.shown_path(params_path), "run": run, "work_dir": None}
    nbformat.write(notebook, str(executed))


def failure_message(name, err):
    from papermill.exceptions import PapermillExecutionError
    if isinstance(err, PapermillExecutionError):
        first_line = err.source.strip().splitlines()[0] if err.source.strip() else ""
        return (f"stage {name} failed in cell {err.exec_count}: {err.ename}: {err.evalue}\n"
                f"  cell [{err.exec_count}] starts: {first_line}")
    return f"stage {name} failed: {type(err).__name__}: {err}"


def reuse_problem(name, run, params, missing_ok=False):
    """Why `run` cannot read the reused stage `name` (its source has not run it, unless `missing_ok`, or made it from
    upstream artifacts that changed since), with the command that mends it; None when it can."""
    source = S.run_of(name, run, params)
    if S.read_manifest(S.final_dir(source, name)) is None:
        return None if missing_ok else (
            f"stage {name} is reused from run '{source}' (params key 'reuse_run'), which has not run it: run "
            f"`python -m fgaif_utils.pipeline PARAMS.yaml --run {source} --stages {name[:2]}` first")
    changed = S.stale_inputs(source, name)
    if changed:
        return (f"stage {name} is reused from run '{source}', whose {name} is stale ({', '.join(changed)} changed "
                f"since it ran): run `python -m fgaif_utils.pipeline <the params file of run '{source}'> --stages "
                f"{name[:2]}` again first")
    return None


def unselected_reuse_problems(params, run, selected):
    """The staleness of every reused stage that comes before the last selected stage without being selected itself:
    the selected stages read it all the same (`--stages 06` of a seed overlay reads the reused 05). A missing one
    is left to the stage that reads it, which names the run that must make it."""
    names = [spec.name for spec in S.STAGES]
    last = names.index(selected[-1].name)
    chosen = {spec.name for spec in selected}
    problems = [(name, reuse_problem(name, run, params, missing_ok=True)) for name in sorted(S.reused_stages(params))
                if names.index(name) < last and name not in chosen]
    return [(name, problem) for name, problem in problems if problem]


def run_stage(spec, params, params_path, shown_path, run, force, notebooks):
    """Run or skip one stage; returns its result dict (stage, status, wall_s, rows, error)."""
    name = spec.name
    t0 = time.monotonic()
    result = {"stage": name, "status": "fail", "wall_s": 0.0, "rows": {}, "error": None}

    def fail(message):
        result.update(error=message, wall_s=round(time.monotonic() - t0, 2))
        print(f"{name}: fail after {result['wall_s']:.1f} s", flush=True)
        print(message, file=sys.stderr, flush=True)
        return result

    if name in S.reused_stages(params):
        problem = reuse_problem(name, run, params)
        if problem:
            return fail(problem)
        source = S.run_of(name, run, params)
        manifest = S.read_manifest(S.final_dir(source, name))
        S.record_reuse(run, name, source)
        result.update(status="reused", rows=manifest.get("rows", {}), wall_s=round(time.monotonic() - t0, 2))
        print(f"{name}: reused from run '{source}'", flush=True)
        return result
    try:
        fingerprint = S.fingerprint(params, name, run, shown_path, notebooks)
    except S.StageError as err:
        return fail(str(err))
    final = S.final_dir(run, name)
    manifest = S.read_manifest(final)
    S.drop_reuse(run, name)   # made here now (skipped as up to date, or run): no longer read through a pointer
    if not force and manifest is not None and manifest.get("fingerprint") == fingerprint:
        result.update(status="skip", rows=manifest.get("rows", {}), wall_s=round(time.monotonic() - t0, 2))
        print(f"{name}: skip (up to date)", flush=True)
        changed = S.changed_versions(manifest)
        if changed:   # not in the fingerprint: an upgrade would redo every stage, and most upgrades change nothing
            print(f"{name}: note: made with other packages than this environment's ({changed}); "
                  f"--force --stages {name[:2]} makes it again with these", flush=True)
        return result

    partial = S.partial_dir(run, name)
    S.remove_path(partial)
    partial.mkdir(parents=True)
    executed = partial / f"{name}.ipynb"
    print(f"{name}: run ... (live notebook: {executed})", flush=True)
    try:
        execute(notebooks / f"{name}.ipynb", executed, params_path, run, partial)
    except Exception as err:   # a cell raised, or the kernel died or never started
        if executed.is_file():
            os.replace(executed, S.failed_notebook(run, name))
            return fail(failure_message(name, err) + f"\n  executed notebook: {S.failed_notebook(run, name)}")
        return fail(failure_message(name, err))
    keep_rerunnable(executed, name, params_path, run)
    manifest = S.read_manifest(partial)
    if manifest is None:
        return fail(f"stage {name} failed: the notebook did not call ctx.finish() (no {S.MANIFEST} in {partial})")
    if manifest.get("stage") != name:
        return fail(f"stage {name} failed: its notebook opened stage {manifest.get('stage')!r}")
    if manifest.get("fingerprint") != fingerprint:   # the manifest records what the kernel actually saw
        print(f"{name}: note: a module or notebook changed while it ran; its manifest records what it ran with",
              file=sys.stderr, flush=True)
    S.promote(partial, final)
    S.remove_path(S.failed_notebook(run, name))   # an earlier failure is history now
    result.update(status="run", rows=manifest.get("rows", {}), wall_s=round(time.monotonic() - t0, 2))
    print(f"{name}: run done in {result['wall_s']:.1f} s", flush=True)
    return result


def format_rows(rows, width=60):
    text = ", ".join(f"{name}={n}" for name, n in rows.items())
    return text if len(text) <= width else text[:width - 3] + "..."


def print_summary(results):
    print(f"\n{'stage':<22}{'status':<9}{'wall s':>8}  rows")
    for r in results:
        print(f"{r['stage']:<22}{r['status']:<9}{r['wall_s']:>8.1f}  {format_rows(r['rows'])}")
    sys.stdout.flush()


def folder_bytes(folder):
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def prune_caches(run, results):
    """Delete the checkpoint folders of other fingerprints from the cache of every stage that is now up to date
    (ran or skipped; not a reused, failed or missing one): each change of params or code leaves its stages' last
    checkpoints and kept records behind. Returns the bytes freed."""
    freed = 0
    for result in results:
        manifest = S.read_manifest(S.final_dir(run, result["stage"])) if result["status"] in ("run", "skip") else None
        if manifest is None:
            continue
        key = manifest.get("checkpoint_key", manifest["fingerprint"])   # manifests before 2026-12-07: the fingerprint
        for folder in S.stale_checkpoints(run, result["stage"], key):
            size = folder_bytes(folder)
            S.remove_path(folder)
            freed += size
            print(f"{result['stage']}: pruned {folder.relative_to(S.outputs_root())} ({size / 1e6:.1f} MB)", flush=True)
    print(f"pruned {freed / 1e6:.1f} MB of checkpoints of earlier fingerprints", flush=True)
    return freed


def record_available_reuses(params, run):
    """Point every reused stage that its source holds at that source, selected or not: a run that reuses a stage
    from a run that itself reused it must find it, even when that middle run was started with `--stages 01-03`."""
    for name in S.reused_stages(params):
        source = S.run_of(name, run, params)
        if S.read_manifest(S.final_dir(source, name)) is not None:
            S.record_reuse(run, name, source)


def note_out_of_date(params, shown_path, run, between, notebooks):
    """Say which of the stages `between` (not selected, not reused) were made with other params or code than these:
    the next selected stage reads them as they are. Asked just before that stage runs, so that a stage the same
    call has just made again (`--stages 00,05`) counts."""
    stale = []
    for spec in between:
        manifest = None if spec.name in S.reused_stages(params) else S.read_manifest(S.final_dir(run, spec.name))
        if manifest is None:
            continue   # reused, or missing: the stage that reads it says what to run
        try:
            if manifest.get("fingerprint") != S.fingerprint(params, spec.name, run, shown_path, notebooks):
                stale.append(spec.name)
        except S.StageError:
            continue
    if stale:
        print(f"note: not selected, and made with other params or code than these: {', '.join(stale)}; the selected "
              f"stages read its outputs as they are (--stages {stale[0][:2]}- remakes everything from there)",
              flush=True)


def run_pipeline(params_path, run=None, stages=None, force=False, notebooks_dir=None, prune=False):
    """Run the selected stages in order; returns one result dict per stage visited. `prune`: then delete the
    checkpoints of earlier fingerprints of the stages that are up to date (prune_caches).

    Raises ParamsError (bad params) or StageError (bad run name or stage selection) before any work.
    Stops at the first stage that fails or whose notebook does not exist yet.
    """
    path = P.resolve_params_path(params_path)
    params = P.load(path)
    run = S.check_run_name(run or params.run)
    if run in {params.reuse_run} and S.reused_stages(params):
        raise S.StageError(f"run '{run}' cannot reuse stages from itself (params key 'reuse_run')")
    selected = select_stages(stages)
    notebooks = Path(notebooks_dir or S.notebooks_dir()).resolve()
    print(f"pipeline: params {path}, run '{run}', outputs {S.outputs_root() / run}", flush=True)
    record_available_reuses(params, run)
    results = []
    for name, problem in unselected_reuse_problems(params, run, selected):
        print(f"{name}: refused (not selected, read by the selected stages)", flush=True)
        print(problem, file=sys.stderr, flush=True)
        results.append({"stage": name, "status": "fail", "wall_s": 0.0, "rows": {}, "error": problem})
    if results:
        print_summary(results)
        return results
    with kernel_env(notebooks):
        for previous, spec in zip([None] + selected[:-1], selected):
            between = S.STAGES[(S.STAGES.index(previous) + 1 if previous else 0):S.STAGES.index(spec)]
            note_out_of_date(params, str(params_path), run, between, notebooks)
            if not (notebooks / f"{spec.name}.ipynb").is_file():
                print(f"{spec.name}: not built yet (notebook {notebooks / spec.name}.ipynb missing); stopping here",
                      flush=True)
                results.append({"stage": spec.name, "status": "missing", "wall_s": 0.0, "rows": {}, "error": None})
                break
            result = run_stage(spec, params, path, str(params_path), run, force, notebooks)
            results.append(result)
            if result["status"] == "fail":
                break
    print_summary(results)
    if prune:
        prune_caches(run, results)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fgaif_utils.pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("params", help="params file, e.g. params/tiny.yaml")
    parser.add_argument("--run", help="run name (default: the params file's `run`)")
    parser.add_argument("--stages", help='which stages: "00-03", "01", "00,02,05", "04-" (04 to the end) (default: all)')
    parser.add_argument("--force", action="store_true", help="run the selected stages even when up to date")
    parser.add_argument("--prune", action="store_true",
                        help="then delete the selected stages' checkpoints of earlier params or code from "
                             "outputs/<run>/.cache/ (LLM, verifier and judge answers stay)")
    args = parser.parse_args(argv)
    try:
        results = run_pipeline(args.params, run=args.run, stages=args.stages, force=args.force, prune=args.prune)
    except (P.ParamsError, S.StageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 1 if any(r["status"] == "fail" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
