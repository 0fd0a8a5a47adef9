"""The stage contract: where a stage writes, what its manifest records, and when it is up to date.

A stage is a numbered notebook in notebooks/. It calls `open_stage(...)` first and `ctx.finish()` last,
and writes every artifact through the context into `ctx.work_dir` (atomically: temp name, then rename).
`finish()` writes manifest.json; the folder then becomes outputs/<run>/<stage>/ in one rename, so a final
folder is never half written. A stage's fingerprint hashes everything its result depends on: its params
sections, its notebook's source, the library modules it uses, and the artifacts of every earlier stage.
The pipeline runner (`fgaif_utils.pipeline`) skips a stage whose final manifest has the same fingerprint.

Environment: FGAIF_OUTPUTS overrides the outputs root (default <repo>/outputs), FGAIF_NOTEBOOKS the
notebooks folder (default <repo>/notebooks). Nothing from the environment is ever written to a manifest.
"""
import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from fgaif_utils import params as P

REPO_ROOT = P.REPO_ROOT
PACKAGE_DIR = Path(__file__).resolve().parent
MANIFEST = "manifest.json"
VERSIONED_PACKAGES = ("torch", "transformers", "peft", "papermill", "numpy")
COMPUTING_PACKAGES = ("python", "torch", "transformers", "peft", "numpy")   # in the checkpoint key, not papermill


class StageError(RuntimeError):
    """A stage cannot open or finish: the message says which stage, which run, and what to run first."""


# ---- the stage table: edit here when a stage gains a params section or a library module -------------

@dataclass(frozen=True)
class StageSpec:
    name: str
    sections: tuple   # top-level params keys the stage reads (missing ones are skipped at hash time)
    modules: tuple    # fgaif_utils module names whose source is hashed; ("*",) = every module


# params.py is not hashed: what it means for a stage is already in the hashed params values (defaults included),
# so adding a field for a later stage does not re-run the earlier ones.
DATA_MODULES = ("language", "world", "coco", "viz")
BASE_MODULES = DATA_MODULES + ("models", "tiny_train", "scorer", "facts", "segment", "detector")
SAMPLE_MODULES = BASE_MODULES + ("feedback", "rollout")
FEEDBACK_MODULES = SAMPLE_MODULES + ("llm", "report")
REWARD_MODULES = FEEDBACK_MODULES + ("reward", "reward_viz")
PPO_MODULES = REWARD_MODULES + ("ppo", "ppo_viz", "launch")
EVALUATE_MODULES = PPO_MODULES + ("evaluate", "coco_synonyms")
ALL_MODULES = ("*",)
# Modules that only draw figures and pages from what a stage computed: in its fingerprint (a plot edit re-runs the
# stage) but not in its checkpoint key (it re-runs from its checkpoints instead of training again).
VIEW_MODULES = ("viz", "report", "reward_viz", "ppo_viz")
BASE_STAGE, POLICY_STAGE, COMPARING_STAGE = "01_base_models", "05_ppo", "06_evaluate"
PROMPT_READERS = ("04_reward_models", "05_ppo", "06_evaluate")   # read sampling.prompt, not their section
LATER = ("seed", "num_threads", "data", "models")

# Explicit module lists (not "*"): a new module for a later stage must not invalidate the earlier ones.
STAGES = [
    StageSpec("00_data", ("seed", "data"), DATA_MODULES),
    StageSpec("01_base_models", ("seed", "num_threads", "data", "models"), BASE_MODULES),
    StageSpec("02_sample_responses", LATER + ("sampling",), SAMPLE_MODULES),
    StageSpec("03_ai_feedback", LATER + ("feedback",), FEEDBACK_MODULES),
    StageSpec("04_reward_models", LATER + ("reward",), REWARD_MODULES),
    StageSpec("05_ppo", LATER + ("reward", "ppo"), PPO_MODULES),
    StageSpec("06_evaluate", LATER + ("reward", "ppo", "evaluate"), EVALUATE_MODULES),
]
# Orchestration only: editing them never changes what a stage computes, so "*" leaves them out.
NOT_HASHED = ("__init__", "stage", "pipeline", "params")
# Params that change what a stage shows, how often it checkpoints or where a key comes from, never what it trains or
# evaluates: left out of the checkpoint key (a resumed run repeats an unbroken one whatever the checkpoint schedule;
# tests say so), so that renaming a key's variable does not evaluate every kept policy again.
DISPLAY_ONLY = {"feedback": ("llm_api_key_env", "vision_api_key_env", "report_records"),
                "reward": ("checkpoint_every", "report_records"), "ppo": ("checkpoint_every", "report_images"),
                "evaluate": ("report_images", "judge_api_key_env")}


def stage_spec(name):
    """The spec of a stage given as "01_base_models" or just "01"."""
    for spec in STAGES:
        if name in (spec.name, spec.name[:2]):
            return spec
    raise StageError(f"unknown stage {name!r}; stages are {[s.name for s in STAGES]}")


def upstream(name):
    """Every stage before this one, in order (each stage depends on all earlier ones)."""
    names = [s.name for s in STAGES]
    return names[:names.index(stage_spec(name).name)]


# ---- locations ---------------------------------------------------------------------------------------

def outputs_root():
    return Path(os.environ.get("FGAIF_OUTPUTS") or REPO_ROOT / "outputs").resolve()


def notebooks_dir():
    return Path(os.environ.get("FGAIF_NOTEBOOKS") or REPO_ROOT / "notebooks").resolve()


def check_run_name(run):
    """A run name becomes a folder that the runner wipes parts of, so it must be a plain name."""
    if not isinstance(run, str) or not P.RUN_NAME.fullmatch(run):
        raise StageError(f"run name {run!r} must be letters, digits, '_', '-' or '.', not starting with '.'")
    return run


def final_dir(run, stage):
    return outputs_root() / run / stage_spec(stage).name


def reused_stages(params):
    """The stage names a run of `params` reads from `params.reuse_run` instead of running them itself."""
    if not params.reuse_stages:
        return set()
    if not params.reuse_run:
        raise StageError("params key 'reuse_stages' is set but 'reuse_run' names no run to read them from")
    check_run_name(params.reuse_run)
    return {stage_spec(s).name for s in params.reuse_stages}


def run_of(stage, run, params=None):
    """The run whose outputs hold `stage` for `run`: for the reused stages params.reuse_run or where its reuse
    pointers lead (`pointed_run`), else `run`."""
    if params is None or stage_spec(stage).name not in reused_stages(params):
        return run
    return pointed_run(params.reuse_run, stage)


def reuse_pointer(run, stage):
    """outputs/<run>/.<stage>.reused: the run `run` read `stage` from, so that a run reusing it from `run` finds it."""
    return outputs_root() / run / f".{stage_spec(stage).name}.reused"


def record_reuse(run, stage, source):
    pointer = reuse_pointer(run, stage)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    write_text(pointer, source + "\n")


def drop_reuse(run, stage):
    """`run` makes `stage` itself (its params do not reuse it): it no longer reads it through a reuse pointer."""
    remove_path(reuse_pointer(run, stage))


def partial_dir(run, stage):
    return outputs_root() / run / f".{stage_spec(stage).name}.partial"


def cache_dir(run, stage):
    return outputs_root() / run / ".cache" / stage_spec(stage).name


def stale_checkpoints(run, stage, key):
    """Folders in the stage's cache that are named by a checkpoint key (its first 16 hex digits) other than
    `key`: checkpoints and kept records of earlier params, code or inputs. The caches that serve every
    fingerprint (LLM and verifier answers, judge replies, vision features) are named otherwise and never listed."""
    folder = cache_dir(run, stage)
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if path.is_dir() and path.name != key[:16]
                  and len(path.name) == 16 and all(c in "0123456789abcdef" for c in path.name))


def failed_notebook(run, stage):
    return outputs_root() / run / f"{stage_spec(stage).name}.failed.ipynb"


def read_manifest(folder):
    """The manifest of a stage folder, or None when it has none."""
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


# ---- hashing -----------------------------------------------------------------------------------------

def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def sha256_text(text):
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def notebook_source(path):
    """The code and markdown cells of a notebook, without outputs or metadata."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"notebook not found: {path}")
    cells = json.loads(path.read_text())["cells"]
    return [[c["cell_type"], "".join(c["source"])] for c in cells if c["cell_type"] in ("code", "markdown")]


def module_sources(modules):
    """{module name: sha256 of its source} for the listed fgaif_utils modules; "missing" for absent ones."""
    if modules == ALL_MODULES:
        modules = sorted(p.stem for p in PACKAGE_DIR.glob("*.py") if p.stem not in NOT_HASHED)
    hashes = {}
    for name in modules:
        path = PACKAGE_DIR / f"{name}.py"
        hashes[name] = sha256_file(path) if path.is_file() else "missing"
    return hashes


def params_subset(params, stage):
    """The params sections a stage depends on, as plain data."""
    everything = P.to_dict(params)
    return {key: everything[key] for key in stage_spec(stage).sections if key in everything}


def missing_stage_error(stage, needed, run, params_path=None, params_run=None, reused_by=None):
    """What to run when `needed` of run `run` is missing; `reused_by`: the run that reads it from `run` (reuse_run),
    whose params file is then not the one to run it with."""
    if reused_by is not None and reused_by != run:
        return StageError(f"stage {stage_spec(stage).name} of run '{reused_by}' reuses {needed} from run '{run}' "
                          f"(params key 'reuse_run'), which has neither run nor reused it: run `python -m "
                          f"fgaif_utils.pipeline <the params file of run '{run}'> --stages {needed[:2]}` first")
    command = f"python -m fgaif_utils.pipeline {params_path or 'PARAMS.yaml'} --stages {needed[:2]}"
    if run != params_run:
        command += f" --run {run}"
    return StageError(f"stage {stage_spec(stage).name} needs {needed} of run '{run}': run `{command}` first")


def upstream_hashes(stage, run, params_path=None, params_run=None, params=None):
    """{upstream stage: its artifacts_hash}; a clear error naming what to run when one is missing."""
    hashes = {}
    for name in upstream(stage):
        source = run_of(name, run, params)
        manifest = read_manifest(final_dir(source, name))
        if manifest is None:
            raise missing_stage_error(stage, name, source, params_path, params_run, reused_by=run)
        hashes[name] = manifest["artifacts_hash"]
    return hashes


def fingerprint_parts(params, stage, run=None, params_path=None, notebooks=None):
    """What a stage's result depends on: its params sections, notebook source, module sources and upstream
    artifacts; for stages 04-06 also the description prompt, for stage 05 the validation batch size and the
    DeepSpeed config file's contents, for stage 06 the artifacts of the compare runs' stage 05 (their policies are
    evaluated too)."""
    spec = stage_spec(stage)
    run = run or params.run
    parts = {
        "params": params_subset(params, spec.name),
        "notebook": notebook_source(Path(notebooks or notebooks_dir()) / f"{spec.name}.ipynb"),
        "modules": module_sources(spec.modules),
        "inputs": upstream_hashes(spec.name, run, params_path, params.run, params),
    }
    if spec.name in PROMPT_READERS:   # stage 02's description prompt: the reward models' and the policy's input
        parts["also"] = {"sampling.prompt": params.sampling.prompt}
    if spec.name == POLICY_STAGE:   # what stage 05 reads besides its sections
        deepspeed = P.deepspeed_config(params.ppo.deepspeed) if params.ppo.deepspeed else None
        parts.setdefault("also", {}).update({"evaluate.batch_size": params.evaluate.batch_size,   # validation batches
                                             "deepspeed": deepspeed})
    if spec.name == COMPARING_STAGE:
        parts["compare"] = {other: (read_manifest(final_dir(other, POLICY_STAGE)) or {}).get("artifacts_hash")
                            for other in params.evaluate.compare_runs}
    return parts


def checkpoint_parts(parts):
    """The parts that key a stage's training checkpoints and kept records: without what cannot change them
    (markdown cells, DISPLAY_ONLY params, VIEW_MODULES), so that editing a notebook's prose, a report size or a plot
    re-runs the stage from its last checkpoint; without the compare runs' policies (stage 06 keeps each policy's
    records under a hash of its own adapter, evaluate.policy_cache_name: a new ablation run leaves the others'
    records kept); with the versions of the packages that compute, which the fingerprint leaves out (a checkpoint
    is resumed only by the numerics that made it, and `--force` after an upgrade trains again instead of reloading
    the finished result)."""
    sections = {name: {key: value for key, value in values.items() if key not in DISPLAY_ONLY.get(name, ())}
                if isinstance(values, dict) else values for name, values in parts["params"].items()}
    kept = {name: value for name, value in parts.items() if name != "compare"}
    versions = {name: version for name, version in package_versions().items() if name in COMPUTING_PACKAGES}
    modules = {name: source for name, source in parts["modules"].items() if name not in VIEW_MODULES}
    return dict(kept, params=sections, notebook=[cell for cell in parts["notebook"] if cell[0] == "code"],
                modules=modules, versions=versions)


def fingerprint(params, stage, run=None, params_path=None, notebooks=None, for_checkpoints=False):
    """sha256 of fingerprint_parts; with `for_checkpoints`, of checkpoint_parts (the checkpoint key)."""
    parts = fingerprint_parts(params, stage, run, params_path, notebooks)
    return sha256_text(canonical_json(checkpoint_parts(parts) if for_checkpoints else parts))


def pointed_run(run, stage):
    """Where `run`'s reuse pointers for `stage` lead, else `run`. A pointer wins over a final folder of the run's own:
    a run that once made a stage and now reuses it reads the reused one (a run that makes a stage drops its
    pointer, `drop_reuse`)."""
    name, seen = stage_spec(stage).name, set()
    while reuse_pointer(run, name).is_file() and run not in seen:
        seen.add(run)
        run = check_run_name(reuse_pointer(run, name).read_text().strip())
    return run


def source_run(run, stage):
    """The run whose outputs hold `stage` as `run` sees it (`pointed_run`); None when that holds no finished stage."""
    run = pointed_run(run, stage)
    return run if read_manifest(final_dir(run, stage)) is not None else None


def stale_inputs(run, stage):
    """The upstream stages whose artifacts changed since `stage` of `run` (its own outputs) was made: those whose
    hash in its manifest's inputs differs from what `run` reads now. An upstream stage that cannot be found is not
    counted (nothing to compare with)."""
    manifest = read_manifest(final_dir(run, stage))
    stale = []
    for name, recorded in (manifest or {}).get("inputs", {}).items():
        source = source_run(run, name)
        if source is not None and read_manifest(final_dir(source, name))["artifacts_hash"] != recorded:
            stale.append(name)
    return stale


def compare_run_problem(run, inputs):
    """Why the policy of compare run `run` cannot stand beside a stage 06 whose upstream artifacts are `inputs`,
    or None: its stage 05 was made from upstream artifacts that changed since, or on another base policy."""
    manifest = read_manifest(final_dir(run, POLICY_STAGE))
    if manifest is None:
        return None     # no policy to compare: evaluate.policy_sources notes that
    stale = stale_inputs(run, POLICY_STAGE)
    if stale:
        return (f"its stage {POLICY_STAGE} is stale ({', '.join(stale)} changed since it ran): run it again with "
                f"its params file")
    if manifest["inputs"].get(BASE_STAGE) != inputs.get(BASE_STAGE):
        return f"it trained another base policy ({BASE_STAGE} differs from this run's)"
    return None


def artifact_hashes(folder, skip=()):
    """{relative path: sha256} of every file under `folder`, except the top-level names in `skip`."""
    folder = Path(folder)
    hashes = {}
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            relative = path.relative_to(folder).as_posix()
            if relative not in skip:
                hashes[relative] = sha256_file(path)
    return hashes


# ---- atomic writes -----------------------------------------------------------------------------------

def shown_path(path):
    """A path as printed and recorded: relative to the repository when inside it (no machine's folders in the
    outputs someone else opens), absolute otherwise. A relative name that is no file here (a model hub id) is
    returned as it is."""
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        return str(path)
    path = path.resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def remove_path(path):
    """Delete a file, link or folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path` (same extension); on success rename it onto `path`.

    Works for files and folders (e.g. a PEFT adapter folder); on error the temporary is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp{os.getpid()}.{path.name}")
    remove_path(tmp)
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)   # os.replace cannot overwrite a non-empty folder
        os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


def write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


# ---- checkpoints: a whole set or none -------------------------------------------------------------------

CHECKPOINT_STATE = "state.json"
_CHECKPOINT_TOKEN = re.compile(r"-[0-9a-f]{8}$")


def write_checkpoint(folder, writers, state):
    """Write a training checkpoint so that a kill at any moment leaves one whole set behind: every file of
    `writers` ({name: function(path) that writes it}) under a name no earlier set used, then state.json naming them
    (replaced in one rename: that is the commit), then the files of earlier or cut-short sets are deleted."""
    folder = Path(folder)
    token = secrets.token_hex(4)
    files = {}
    for name, write in writers.items():
        stem, dot, suffix = name.partition(".")
        files[name] = f"{stem}-{token}{dot}{suffix}"
        with atomic_path(folder / files[name]) as tmp:
            write(tmp)
    write_text(folder / CHECKPOINT_STATE, json.dumps(dict(state, checkpoint_files=files)))
    kept = set(files.values())
    for path in folder.iterdir():
        stem, dot, suffix = path.name.partition(".")
        if path.is_file() and path.name not in kept and _CHECKPOINT_TOKEN.search(stem) \
                and f"{_CHECKPOINT_TOKEN.sub('', stem)}{dot}{suffix}" in files:
            path.unlink()


def read_checkpoint(folder, names):
    """(state, {name: path}) of the checkpoint set in `folder` (None when it has none); `names`: the file names
    the writer may have written, of which the set holds those it wrote. A set written before 2026-12-07 (no
    names in its state.json) holds the files of those names that exist."""
    folder = Path(folder)
    state_path = folder / CHECKPOINT_STATE
    if not state_path.is_file():
        return None
    state = json.loads(state_path.read_text())
    files = state.pop("checkpoint_files", None)
    if files is None:
        return state, {name: folder / name for name in names if (folder / name).is_file()}
    missing = [files[name] for name in names if name in files and not (folder / files[name]).is_file()]
    if missing:
        raise StageError(f"{state_path} names {', '.join(missing)}, which {folder} does not hold: delete the folder "
                         f"to train from the start")
    return state, {name: folder / files[name] for name in names if name in files}


def read_jsonl(path):
    """The records of a JSONL file; a bad line is an error naming the file and the line number."""
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}: line {number} is not valid JSON: {err}") from None
    return records


def promote(partial, final):
    """Make `partial` the final folder: old final aside, partial in, old deleted (never half a folder)."""
    partial, final = Path(partial), Path(final)
    old = final.with_name(f".{final.name}.old")
    remove_path(old)
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    remove_path(old)


def package_versions():
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def changed_versions(manifest):
    """'torch 2.12.0 -> 2.13.0, ...' for the packages whose version differs between a manifest and this environment
    ('' when none does, or the manifest records none)."""
    made_with, now = manifest.get("versions") or {}, package_versions()
    return ", ".join(f"{name} {made_with[name]} -> {now.get(name, 'absent')}" for name in sorted(made_with)
                     if made_with[name] != now.get(name, "absent"))


def _now():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---- the context a notebook holds --------------------------------------------------------------------

class StageContext:
    """One execution of one stage: its params, its folders, its artifact writers and its manifest."""

    def __init__(self, stage, params_path, run=None, work_dir=None):
        self.params_path = P.resolve_params_path(params_path)
        self.params = P.load(self.params_path)
        self.stage = stage_spec(stage).name
        self.run = check_run_name(run or self.params.run)
        if self.stage in reused_stages(self.params):   # what it made here would never be read: the pointer wins
            source = final_dir(run_of(self.stage, self.run, self.params), self.stage)
            raise StageError(f"stage {self.stage} is not made by run '{self.run}': {shown_path(self.params_path)} "
                             f"reuses it from run '{self.params.reuse_run}' (reuse_stages). Open it with the params "
                             f"of run '{self.params.reuse_run}' to make it there, or read that run's executed "
                             f"notebook, {shown_path(source)}")
        self.inputs = upstream_hashes(self.stage, self.run, params_path, self.params.run, self.params)   # fails early
        parts = fingerprint_parts(self.params, self.stage, self.run, params_path)
        self.fingerprint = sha256_text(canonical_json(parts))
        self.checkpoint_key = sha256_text(canonical_json(checkpoint_parts(parts)))
        self.final_dir = final_dir(self.run, self.stage)
        self.by_hand = work_dir is None
        if self.by_hand:   # run in JupyterLab: start a fresh partial folder, promote it in finish()
            self.work_dir = partial_dir(self.run, self.stage)
            remove_path(self.work_dir)
        else:              # under the runner, which wiped it and will promote it
            self.work_dir = Path(work_dir).resolve()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.cache_dir = cache_dir(self.run, self.stage)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_dir = self.cache_dir / self.checkpoint_key[:16]   # training checkpoints, kept records
        self.rows = {}
        self.started = _now()
        self._t0 = time.monotonic()
        self._finished = False

    def __repr__(self):
        return f"StageContext({self.stage!r}, run={self.run!r}, work_dir={str(self.work_dir)!r})"

    def input_dir(self, stage):
        """The final folder of an earlier stage of this run."""
        name = stage_spec(stage).name
        if name not in upstream(self.stage):
            raise StageError(f"stage {self.stage} may only read earlier stages, not {name}")
        source = run_of(name, self.run, self.params)
        folder = final_dir(source, name)
        if read_manifest(folder) is None:
            raise missing_stage_error(self.stage, name, source, self.params_path, self.params.run, self.run)
        return folder

    def path(self, name):
        """Where artifact `name` (may contain folders) goes in the work folder; parent folders are created."""
        path = self.work_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def count(self, name, n):
        """Record a row count for the manifest."""
        self.rows[name] = int(n)

    def write_jsonl(self, name, records):
        """Write records one JSON object per line (atomically); their number is counted under `name`."""
        lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in records]
        write_text(self.path(name), "".join(lines))
        self.count(name, len(lines))
        return self.path(name)

    def write_json(self, name, obj):
        return write_text(self.path(name), json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    def savefig(self, fig, name, **kwargs):
        """Save a matplotlib figure atomically (format from the extension; default dpi 120, tight box)."""
        kwargs = {"dpi": 120, "bbox_inches": "tight", **kwargs}
        with atomic_path(self.path(name)) as tmp:
            fig.savefig(tmp, format=Path(name).suffix[1:] or "png", **kwargs)
        return self.path(name)

    def finish(self, extra=None):
        """Write manifest.json; when run by hand, also make the work folder the final folder (see read_manifest)."""
        if self._finished:
            raise StageError(f"stage {self.stage}: finish() was already called")
        artifacts = artifact_hashes(self.work_dir, skip=(MANIFEST, f"{self.stage}.ipynb"))
        manifest = {
            "stage": self.stage,
            "run": self.run,
            "params_path": shown_path(self.params_path),
            "params": params_subset(self.params, self.stage),
            "fingerprint": self.fingerprint,
            "checkpoint_key": self.checkpoint_key,
            "inputs": self.inputs,
            "artifacts": artifacts,
            "artifacts_hash": sha256_text(canonical_json(artifacts)),
            "rows": self.rows,
            "wall_s": round(time.monotonic() - self._t0, 3),
            "started": self.started,
            "finished": _now(),
            "versions": package_versions(),
            "extra": extra or {},
        }
        write_text(self.work_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        self._finished = True
        if self.by_hand:
            promote(self.work_dir, self.final_dir)
            drop_reuse(self.run, self.stage)
            self.work_dir = self.final_dir
        rows = ", ".join(f"{k}={v}" for k, v in self.rows.items()) or "no row counts"
        print(f"{self.stage} finished in {manifest['wall_s']:.1f} s: {len(artifacts)} artifacts ({rows})")


def open_stage(stage, params_path, run=None, work_dir=None):
    """Start a stage: load and check params, prepare folders, check that earlier stages are done."""
    return StageContext(stage, params_path, run, work_dir)
