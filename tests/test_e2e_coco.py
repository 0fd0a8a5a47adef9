"""The paper profile end to end through papermill on the CPU: params/llava15_coco_check.yaml, llava15_coco.yaml in
miniature (the setup check a GPU user runs before the long run). Everything the real world needs is here in small: a
COCO-2014 folder (synthetic images, one grey-scale and one of another size, under COCO's file names and annotation
files), a Hugging Face cache that holds tiny llava-hf models under the profile's own hub ids (llava-hf/llava-1.5-7b-hf,
llava-hf/llava-1.5-13b-hf), and one local OpenAI-compatible server. That server extracts the facts, answers the vision
verifier's yes/no questions and judges MMHal-Bench and LLaVA-Bench. The overlay changes only the folders, the
endpoints, the threads and, for the yes/no judge, `openai-vision` instead of the profile's LLaVA verifier: an
untrained tiny LVLM answers neither yes nor no (a second run of stage 03 with the profile's LLaVA verifier checks that
the stage says so). Stage 05 runs under the profile's torchrun with 2 gloo ranks, and once more as the 13B ZeRO-3
profile runs it. So each of the real world's branches in the notebooks runs, with its successor reading what it
wrote."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from PIL import Image

from fgaif_utils import llm, models, params, stage, world
from openai_stub import Reply, StubServer, rules_answer

pytestmark = pytest.mark.e2e   # `pytest -m "not e2e"` runs the rest in a few minutes

REPO = params.REPO_ROOT
SECRET = "sk-coco-e2e-not-a-real-key"            # the stub endpoints' key, in COCO_STUB_KEY
OPENAI_SECRET = "sk-openai-e2e-never-to-the-stub"  # OPENAI_API_KEY, set too: it must reach no other server
CHECK_PROFILE = REPO / "params" / "llava15_coco_check.yaml"
CHECK = yaml.safe_load(CHECK_PROFILE.read_text())     # read as YAML: params.load would check its /data/coco2014
SIZES = {key: CHECK["data"][key] for key in ("n_feedback", "n_ppo", "n_validation", "n_eval")}
HUB_MODELS = {"llava-hf/llava-1.5-7b-hf": 0, "llava-hf/llava-1.5-13b-hf": 1}   # hub id -> seed of its tiny stand-in


def write_coco(world_dir, root):
    """COCO 2014's layout from a synthetic world: feedback + ppo images as train2014, validation + eval as val2014."""
    (root / "annotations").mkdir(parents=True)
    for source, splits in {"train2014": ["feedback", "ppo"], "val2014": ["validation", "eval"]}.items():
        (root / source).mkdir()
        images, instances, captions = [], [], []
        for split in splits:
            split_instances = json.loads((world_dir / "annotations" / f"instances_{split}.json").read_text())
            categories = split_instances["categories"]
            for index, image in enumerate(split_instances["images"]):
                name = f"COCO_{source}_{image['id']:012d}.jpg"
                with Image.open(world_dir / image["file_name"]) as picture:
                    if index == 0:    # COCO holds some grey-scale JPEGs
                        picture.convert("L").save(root / source / name, format="JPEG", quality=95)
                    elif index == 1:  # and every size: this batch's images do not stack
                        picture.resize((80, 60)).save(root / source / name, format="JPEG", quality=95)
                        image = {**image, "width": 80, "height": 60}
                    else:             # PNG bytes under COCO's name: PIL reads the content
                        shutil.copy(world_dir / image["file_name"], root / source / name)
                images.append({**image, "file_name": name})
            instances += split_instances["annotations"]
            captions += json.loads((world_dir / "annotations" / f"captions_{split}.json").read_text())["annotations"]
        (root / "annotations" / f"instances_{source}.json").write_text(
            json.dumps({"images": images, "annotations": instances, "categories": categories}))
        (root / "annotations" / f"captions_{source}.json").write_text(
            json.dumps({"images": images, "annotations": captions}))


def write_hub_cache(hub_dir):
    """A Hugging Face cache (HF_HOME/hub) holding a tiny llava-hf model under each hub id, as a download leaves it."""
    arch = params.TinyArchParams()
    tokenizer = models.build_tiny_tokenizer()
    processor = models.build_tiny_processor(tokenizer, 64, arch.patch_size)
    commit = "0123456789abcdef0123456789abcdef01234567"
    for repo, seed in HUB_MODELS.items():
        folder = hub_dir / ("models--" + repo.replace("/", "--"))
        models.save_lvlm(models.build_tiny_llava(arch, 64, tokenizer, seed=seed), processor,
                         str(folder / "snapshots" / commit))
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(commit)


def write_benchmarks(folder, image_file):
    """One MMHal-Bench item and one LLaVA-Bench question about the same image, in the files the user supplies."""
    (folder / "images").mkdir(parents=True)
    shutil.copy(image_file, folder / "images" / "a.png")
    (folder / "response_template.json").write_text(json.dumps([{
        "image_src": "https://example.org/a.png", "question_type": "attribute", "image_content": ["circle"],
        "question": "what colour is the circle ?", "gt_answer": "The circle is red."}]))
    (folder / "questions.jsonl").write_text(json.dumps({"question_id": 3, "image": "a.png",
                                                        "text": "describe this image in detail .",
                                                        "category": "detail"}) + "\n")
    (folder / "context.jsonl").write_text(json.dumps({"id": "a", "image": "a.png", "caption": "a red circle"}) + "\n")
    (folder / "answers_gpt4.jsonl").write_text(json.dumps({"question_id": 3, "text": "A red circle."}) + "\n")


def server_reply(body):
    """Facts by the rules parser; yes or no to a vision question by a hash of the question (both answers occur);
    a rating for MMHal-Bench's judge, a pair of scores for LLaVA-Bench's."""
    content = body["messages"][-1]["content"]
    if isinstance(content, list):
        question = next(part["text"] for part in content if part["type"] == "text")
        return Reply(content="Yes." if hashlib.sha256(question.encode()).digest()[0] % 3 else "No, there is not.")
    if llm.SUBSENTENCE_LABEL in content:
        return rules_answer(body)
    return Reply(content="Mostly right.\nRating: 4") if "Rating:" in json.dumps(body) else Reply(content="7 6\nFine.")


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("coco_e2e")
    data = params.DataParams(n_sft=0, n_eval_long=0, n_eval_ood=0, **SIZES)
    world.build_synthetic_world(data, 0, tmp / "world", splits=["feedback", "ppo", "validation", "eval"],
                                progress=False)
    write_coco(tmp / "world", tmp / "coco")
    write_hub_cache(tmp / "hf" / "hub")
    write_benchmarks(tmp / "bench", next((tmp / "coco" / "val2014").iterdir()))
    with StubServer(default=server_reply) as server:
        overlay = {   # the shipped setup check with what must differ here: the folders, the endpoints, one thread
            "extends": str(CHECK_PROFILE), "run": "coco-ci", "num_threads": 1,
            "data": {"coco_root": str(tmp / "coco")},
            "feedback": {"llm_base_url": server.url, "concurrency": 2, "verifier": "openai-vision",
                         "vision_model": "stub-vision", "vision_base_url": server.url,
                         "llm_api_key_env": "COCO_STUB_KEY", "vision_api_key_env": "COCO_STUB_KEY"},
            "evaluate": {"judge_base_url": server.url, "judge_api_key_env": "COCO_STUB_KEY",
                         "mmhal_path": str(tmp / "bench"),
                         "llava_bench_path": str(tmp / "bench")},
        }
        params_path = tmp / "coco_ci.yaml"
        params_path.write_text(json.dumps(overlay))      # JSON is YAML
        env = {**os.environ, "FGAIF_OUTPUTS": str(tmp / "outputs"), "HF_HOME": str(tmp / "hf"),
               "HF_HUB_OFFLINE": "1", "COCO_STUB_KEY": SECRET, "OPENAI_API_KEY": OPENAI_SECRET,
               "OMP_NUM_THREADS": "1"}
        result = subprocess.run([sys.executable, "-m", "fgaif_utils.pipeline", str(params_path)], cwd=REPO,
                                env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        # stage 03 again with the profile's own judge, LLaVA through models.verifier (the untrained 13B stand-in)
        hf_path = tmp / "coco_ci_hf.yaml"
        hf_path.write_text(json.dumps({"extends": params_path.name, "run": "coco-ci-hf", "reuse_run": "coco-ci",
                                       "reuse_stages": ["00_data", "01_base_models", "02_sample_responses"],
                                       "feedback": {"verifier": "hf"}}))
        result = subprocess.run([sys.executable, "-m", "fgaif_utils.pipeline", str(hf_path), "--stages", "03"],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        yield tmp, tmp / "outputs" / "coco-ci", server.requests, env


def _snapshot(tmp, repo):
    return str((tmp / "hf" / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots").resolve())


def test_every_stage_ran_on_the_coco_folder_and_the_cached_hub_models(coco_run):
    tmp, run, _, _ = coco_run
    for spec in stage.STAGES:
        assert (run / spec.name / "manifest.json").is_file() and (run / spec.name / f"{spec.name}.ipynb").is_file()
    feedback_scenes = world.load_scenes(run / "00_data", "feedback")
    eval_scenes = world.load_scenes(run / "00_data", "eval")
    assert len(feedback_scenes) == SIZES["n_feedback"] and len(eval_scenes) == SIZES["n_eval"]
    assert all("/coco/train2014/COCO_train2014_" in s["file_name"] for s in feedback_scenes)
    assert all("/coco/val2014/COCO_val2014_" in s["file_name"] for s in eval_scenes)
    checkpoints = json.loads((run / "01_base_models" / "checkpoints.json").read_text())
    assert checkpoints["policy"].startswith(_snapshot(tmp, "llava-hf/llava-1.5-7b-hf"))
    assert checkpoints["verifier"].startswith(_snapshot(tmp, "llava-hf/llava-1.5-13b-hf"))
    summary = json.loads((run / "05_ppo" / "summary.json").read_text())
    assert summary["policy_base"].startswith(_snapshot(tmp, "llava-hf/llava-1.5-7b-hf"))
    assert summary["reward_backbone"].startswith(_snapshot(tmp, "llava-hf/llava-1.5-13b-hf"))   # the paper's
    log = stage.read_jsonl(run / "05_ppo" / "log.jsonl")
    assert summary["world_size"] == 2 and (run / "05_ppo" / "launch.log").is_file()     # torchrun, as in the profile
    assert summary["iterations"] == CHECK["ppo"]["steps"] == 2
    assert [row["iteration"] for row in log if "reward_fine_grained" in row] == [1, 2]


def test_the_llm_extracts_the_facts_the_vision_model_judges_and_the_labels_have_both_classes(coco_run):
    _, run, requests, _ = coco_run
    responses = stage.read_jsonl(run / "02_sample_responses" / "responses.jsonl")
    assert len(responses) == SIZES["n_feedback"]       # one sample per image, as in the paper
    summary = json.loads((run / "03_ai_feedback" / "summary.json").read_text())
    usage = stage.read_manifest(run / "03_ai_feedback")["extra"]["llm_usage"]   # not hashed: a cached rerun's differs
    assert "llm_usage" not in summary
    assert usage["calls"] == summary["subsentences"] == sum(len(r["subsentences"]) for r in responses)
    facts = stage.read_jsonl(run / "03_ai_feedback" / "facts.jsonl")
    vision = [r for r in requests if isinstance(r["body"]["messages"][-1]["content"], list)]
    assert len(vision) == len({(f["image_id"], f["question"]) for f in facts}) > 0   # one call per distinct question
    assert summary["answers"]["yes"] > 0 and summary["answers"]["no"] > 0 and summary["answers"]["unknown"] == 0
    labels = [sub["labels"][0] for record in stage.read_jsonl(run / "03_ai_feedback" / "fg_labels.jsonl")
              for sub in record["subsentences"]]
    assert 0 in labels and 1 in labels      # object: correct and hallucinated sub-sentences
    metrics = json.loads((run / "04_reward_models" / "metrics.json").read_text())
    assert set(metrics["test"]) == {"object", "attribute", "relation"}
    assert all("ai" in scores and "gt" not in scores for scores in metrics["test"].values())   # no ground truth
    for fact_type in ("object", "attribute", "relation"):
        assert (run / "04_reward_models" / "reward_models" / fact_type).is_dir()
    for page in (run / "03_ai_feedback" / "labels_report.html", run / "04_reward_models" / "scored_examples.html"):
        assert '<img src="data:image/' in page.read_text()      # the COCO images, as a teacher needs to see them


def test_stage_06_reports_pope_chair_and_the_judged_benchmarks_for_both_policies(coco_run):
    _, run, _, _ = coco_run
    results = (run / "06_evaluate" / "results.md").read_text()
    for metric in ["chair_s", "chair_recall", "pope_random_f1", "pope_popular_f1", "pope_adversarial_f1",
                   "mmhal_score", "mmhal_halluc", "llava_bench_relative"]:
        row = next((line for line in results.splitlines() if line.startswith(f"| {metric} |")), None)
        assert row is not None and row.count("|") == 5, metric     # metric, base, fgaif, difference
    records = stage.read_jsonl(run / "06_evaluate" / "records.jsonl")
    assert {r["policy"] for r in records} == {"base", "fgaif"}
    assert {r["split"] for r in records} == {"eval", "mmhal", "llava_bench"}


def test_the_endpoint_key_reaches_the_server_the_openai_key_does_not_and_no_file_holds_either(coco_run):
    tmp, _, requests, _ = coco_run
    assert requests and all(r["headers"]["authorization"] == f"Bearer {SECRET}" for r in requests)
    leaks = [path for path in tmp.rglob("*") if path.is_file()
             and any(key.encode() in path.read_bytes() for key in (SECRET, OPENAI_SECRET))]
    assert leaks == [] and (tmp / "coco_ci.yaml").read_text().count("sk-") == 0


def test_the_profiles_llava_verifier_runs_from_the_hub_cache_and_stages_03_04_say_its_answers_are_unusable(coco_run):
    tmp, run, _, env = coco_run
    hf_run = run.parent / "coco-ci-hf" / "03_ai_feedback"
    summary = json.loads((hf_run / "summary.json").read_text())
    asked = summary["facts"]
    assert asked > 0 and summary["answers"]["unknown"] == asked      # an untrained tiny LVLM says no yes / no
    assert summary["warnings"][0].startswith(f"{asked} of {asked} verifier answers were neither yes nor no")
    notebook = (hf_run / "03_ai_feedback.ipynb").read_text()
    assert "verifier 'hf'" in notebook and "WARNING: " in notebook and "feedback.question_suffix" in notebook
    # stage 04 on these labels stops before any training, names the file, and stage 03's work stays
    result = subprocess.run([sys.executable, "-m", "fgaif_utils.pipeline", str(tmp / "coco_ci_hf.yaml"), "--stages",
                             "04"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "fg_labels.jsonl: no training sub-sentence is labelled correct or hallucinated for any type" in \
        result.stdout + result.stderr
    assert (hf_run / "fg_labels.jsonl").is_file() and not (run.parent / "coco-ci-hf" / "04_reward_models").exists()
    assert (run.parent / "coco-ci-hf" / "04_reward_models.failed.ipynb").is_file()


def test_stage_05_of_the_13b_zero3_profile_with_the_shipped_deepspeed_config(coco_run):
    # params/deepspeed/llava13b_zero3.yaml: the 13B policy, ZeRO-3 through params/deepspeed/zero3.json (here 2 ranks,
    # the bf16 bases partitioned, the adapters fp32), on the first run's data, feedback and reward models
    tmp, run, _, env = coco_run
    # read as YAML: params.load would check the profile's /data/coco2014
    profile = yaml.safe_load((REPO / "params" / "deepspeed" / "llava13b_zero3.yaml").read_text())
    overlay = tmp / "coco_ci_zero3.yaml"
    overlay.write_text(json.dumps({
        "extends": "coco_ci.yaml", "run": "coco-ci-zero3", "reuse_run": "coco-ci",
        "reuse_stages": ["00_data", "01_base_models", "02_sample_responses", "03_ai_feedback", "04_reward_models"],
        "models": {"policy": profile["models"]["policy"]},
        "ppo": {"deepspeed": profile["ppo"]["deepspeed"], "max_new_tokens": 16}}))   # every ZeRO-3 decode step gathers
    result = subprocess.run([sys.executable, "-m", "fgaif_utils.pipeline", str(overlay), "--stages", "05"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = run.parent / "coco-ci-zero3" / "05_ppo"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["iterations"] == 2
    assert summary["policy_base"].startswith(_snapshot(tmp, "llava-hf/llava-1.5-13b-hf"))
    assert "DeepSpeed config <code>params/deepspeed/zero3.json</code>" in (out / "05_ppo.ipynb").read_text()
    assert (out / "policy_adapter" / "adapter_model.safetensors").is_file()
