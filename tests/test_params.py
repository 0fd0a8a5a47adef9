"""The params schema: every shipped profile validates, bad files fail with the key and the file named."""
import dataclasses
import re
import typing
from pathlib import Path

import pytest

from fgaif_utils import params as P

PROFILES = sorted(P.REPO_ROOT.glob("params/*.yaml")) + sorted(P.REPO_ROOT.glob("params/*/*.yaml"))


@pytest.mark.parametrize("path", PROFILES, ids=[p.relative_to(P.REPO_ROOT).as_posix() for p in PROFILES])
def test_shipped_profiles_validate(path):
    params = P.load(path, check_paths=False)   # keys and types; COCO and weights live on another machine
    assert isinstance(params, P.Params) and params.run
    if params.data.world == "synthetic":        # the embedded world needs nothing outside the repo
        P.load(path)


def write(folder, name, text):
    path = Path(folder) / name
    path.write_text(text)
    return path


def test_unknown_key_names_key_path_and_file(tmp_path):
    path = write(tmp_path, "bad.yaml", "data:\n  noise:\n    p_objekt: 0.1\n")
    with pytest.raises(P.ParamsError) as err:
        P.load(path)
    message = str(err.value)
    assert "data.noise.p_objekt" in message
    assert str(path) in message
    assert "data.noise.p_object" in message   # the close-match suggestion


@pytest.mark.parametrize("name", ["../x", "a|b", ".hidden"])
def test_a_compared_run_must_be_a_plain_run_name(tmp_path, name):
    path = write(tmp_path, "bad.yaml", f"evaluate:\n  compare_runs: [tiny-sparse, '{name}']\n")
    with pytest.raises(P.ParamsError, match=r"evaluate.compare_runs.*" + re.escape(repr(name))):
        P.load(path)


def test_unknown_top_level_key(tmp_path):
    path = write(tmp_path, "bad.yaml", "sead: 3\n")
    with pytest.raises(P.ParamsError, match=r"unknown key 'sead'.*did you mean 'seed'"):
        P.load(path)


@pytest.mark.parametrize("text, key", [
    ("seed: three\n", "seed"),
    ("seed: 1.5\n", "seed"),
    ("seed: true\n", "seed"),                       # a bool is not an integer
    ("data:\n  n_eval: '5'\n", "data.n_eval"),
    ("data:\n  noise:\n    p_object: high\n", "data.noise.p_object"),
    ("models:\n  load_in_4bit: 1\n", "models.load_in_4bit"),
    ("models:\n  policy: 7\n", "models.policy"),
    ("data: 5\n", "data"),                          # a section must be a mapping
    ("data:\n  world_params:\n    long_splits: [ppo, evl]\n", "data.world_params.long_splits[1]"),
])
def test_wrong_type_names_key_and_file(tmp_path, text, key):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(P.ParamsError) as err:
        P.load(path)
    assert f"'{key}'" in str(err.value) and str(path) in str(err.value)


def test_int_accepted_where_float_expected(tmp_path):
    params = P.load(write(tmp_path, "ok.yaml", "data:\n  noise:\n    p_object: 1\n"))
    assert params.data.noise.p_object == 1.0 and isinstance(params.data.noise.p_object, float)


@pytest.mark.parametrize("text, key", [
    ("data:\n  world: mars\n", "data.world"),
    ("models:\n  dtype: float64\n", "models.dtype"),
    ("feedback:\n  verifier: oracle\n", "feedback.verifier"),
])
def test_wrong_literal_choice_lists_choices(tmp_path, text, key):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(P.ParamsError) as err:
        P.load(path)
    assert f"'{key}' must be one of" in str(err.value) and str(path) in str(err.value)


def test_missing_extends_target(tmp_path):
    path = write(tmp_path, "child.yaml", "extends: nowhere.yaml\nseed: 1\n")
    with pytest.raises(P.ParamsError, match=r"child\.yaml: key 'extends' names 'nowhere\.yaml', which does not exist"):
        P.load(path)


def test_extends_chain_overrides_key_by_key(tmp_path):
    write(tmp_path, "base.yaml", "run: base\nseed: 1\ndata:\n  n_eval: 10\n  n_ppo: 300\n  noise:\n    p_object: 0.5\n")
    write(tmp_path, "middle.yaml", "extends: base.yaml\nrun: middle\ndata:\n  n_eval: 11\n")
    leaf = write(tmp_path, "leaf.yaml", "extends: middle.yaml\ndata:\n  noise:\n    p_colour: 0.1\n")
    params = P.load(leaf)
    assert params.run == "middle"                    # from middle, overriding base
    assert params.seed == 1                          # from base
    assert params.data.n_eval == 11                  # middle overrides base inside a section
    assert params.data.n_ppo == 300                  # base value kept beside the override
    assert params.data.noise.p_object == 0.5         # nested: base kept ...
    assert params.data.noise.p_colour == 0.1         # ... next to the leaf's override
    assert params.data.noise.p_relation == P.NoiseParams().p_relation   # default where nobody set it


def test_error_in_extended_file_names_the_chain(tmp_path):
    write(tmp_path, "base.yaml", "seed: x\n")
    leaf = write(tmp_path, "leaf.yaml", "extends: base.yaml\n")
    with pytest.raises(P.ParamsError, match=r"leaf\.yaml <- .*base\.yaml: key 'seed'"):
        P.load(leaf)


def test_extends_loop(tmp_path):
    write(tmp_path, "a.yaml", "extends: b.yaml\n")
    b = write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(P.ParamsError, match="loops back"):
        P.load(b)


def test_missing_local_model_folder(tmp_path):
    missing = tmp_path / "no_such_model"
    path = write(tmp_path, "bad.yaml", f"models:\n  verifier: {missing}\n")
    with pytest.raises(P.ParamsError) as err:
        P.load(path)
    assert "'models.verifier'" in str(err.value) and str(missing) in str(err.value) and str(path) in str(err.value)
    (missing).mkdir()
    assert P.load(path).models.verifier == str(missing)   # the same file is fine once the folder exists


def test_missing_coco_root(tmp_path):
    path = write(tmp_path, "bad.yaml", COCO.replace("coco_root: /x", f"coco_root: {tmp_path / 'coco'}"))
    with pytest.raises(P.ParamsError, match=r"'data.coco_root'.*not a folder"):
        P.load(path)


def test_a_key_given_twice_is_an_error_naming_the_key_line_and_file(tmp_path):
    path = write(tmp_path, "twice.yaml", "feedback:\n  existence_gate: false\nseed: 1\nfeedback:\n  size_twins: false\n")
    with pytest.raises(P.ParamsError) as err:
        P.load(path)
    assert "'feedback' (line 4) is given twice" in str(err.value) and str(path) in str(err.value)
    nested = write(tmp_path, "nested.yaml", "ppo:\n  beta: 0.1\n  beta: 0.3\n")
    with pytest.raises(P.ParamsError, match=r"'beta' \(line 3\) is given twice"):
        P.load(nested)


@pytest.mark.parametrize("key, needed", [("pope_files", ["coco_pope_random.json", "coco_pope_popular.json",
                                                         "coco_pope_adversarial.json"]),
                                         ("mmhal_path", ["response_template.json"]),
                                         ("llava_bench_path", ["questions.jsonl", "context.jsonl", "answers_gpt4.jsonl"])])
def test_evaluation_data_folders_are_checked_before_any_stage_runs(tmp_path, key, needed):
    folder = tmp_path / "data"
    path = write(tmp_path, "eval.yaml", f"evaluate:\n  {key}: {folder}\n")
    with pytest.raises(P.ParamsError, match=rf"'evaluate.{key}'.*not a folder"):
        P.load(path)
    folder.mkdir()
    with pytest.raises(P.ParamsError) as err:
        P.load(path)
    assert f"'evaluate.{key}'" in str(err.value) and needed[-1] in str(err.value) and str(path) in str(err.value)
    for name in needed:
        (folder / name).write_text("")
    assert getattr(P.load(path).evaluate, key) == str(folder)


def test_missing_params_file(tmp_path):
    with pytest.raises(P.ParamsError, match="not found"):
        P.load(tmp_path / "absent.yaml")


def reachable_dataclasses(cls, seen=None):
    seen = [] if seen is None else seen
    if cls not in seen:
        seen.append(cls)
        for tp in typing.get_type_hints(cls).values():
            for candidate in (tp, *typing.get_args(tp)):
                if dataclasses.is_dataclass(candidate):
                    reachable_dataclasses(candidate, seen)
    return seen


def test_every_schema_field_is_documented():
    classes = reachable_dataclasses(P.Params)
    assert {P.DataParams, P.ModelParams, P.NoiseParams, P.WorldParams} <= set(classes)
    undocumented = [f"{cls.__name__}.{f.name}" for cls in classes for f in dataclasses.fields(cls)
                    if not P._field_docs(cls).get(f.name, "").strip()]
    assert undocumented == []


def test_describe_lists_every_leaf_key():
    lines = P.describe()
    assert any(line.startswith("data.noise.p_object (float >= 0 and <= 1, default 0.2): ") for line in lines)
    assert any(line.startswith("ppo.top_p (float > 0 and <= 1, default 1.0): ") for line in lines)
    assert any(line.startswith("models.dtype ('float32' | 'bfloat16' | 'float16', default 'float32')") for line in lines)


def test_type_epochs_override_one_reward_model_only(tmp_path):
    path = write(tmp_path, "epochs.yaml", "reward:\n  epochs: 3\n  type_epochs:\n    attribute: 5\n    relation: 1\n")
    reward = P.load(path).reward
    assert [reward.epochs_of(t) for t in ("object", "attribute", "relation", "holistic")] == [3, 5, 1, 3]
    misspelt = write(tmp_path, "misspelt.yaml", "reward:\n  type_epochs:\n    atribute: 5\n")
    with pytest.raises(P.ParamsError, match=r"'reward\.type_epochs\.atribute'.*'reward\.type_epochs\.attribute'"):
        P.load(misspelt)
    negative = write(tmp_path, "negative.yaml", "reward:\n  type_epochs:\n    relation: -1\n")
    with pytest.raises(P.ParamsError, match=r"negative\.yaml: key 'reward\.type_epochs\.relation' must be >= 0, got -1"):
        P.load(negative)


@pytest.mark.parametrize("text, key, bound", [
    ("seed: -1\n", "seed", ">= 0"),
    ("reward:\n  epochs: 0\n", "reward.epochs", ">= 1"),
    ("ppo:\n  steps: -5\n", "ppo.steps", ">= 1"),
    ("ppo:\n  lr: 0\n", "ppo.lr", "> 0"),
    ("ppo:\n  gamma: 1.5\n", "ppo.gamma", ">= 0 and <= 1"),
    ("ppo:\n  top_p: 0.0\n", "ppo.top_p", "> 0 and <= 1"),
    ("ppo:\n  weights:\n    attribute: -1\n", "ppo.weights.attribute", ">= 0"),
    ("reward:\n  lora_dropout: 1.0\n", "reward.lora_dropout", ">= 0 and < 1"),
    ("evaluate:\n  confidence: 95\n", "evaluate.confidence", "> 0 and < 1"),
    ("data:\n  noise:\n    p_colour: 1.2\n", "data.noise.p_colour", ">= 0 and <= 1"),
])
def test_number_outside_its_bounds_names_key_bound_and_file(tmp_path, text, key, bound):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(P.ParamsError) as err:
        P.load(path)
    assert f"{path}: key '{key}' must be {bound}, got " in str(err.value)


def test_bounds_admit_their_limits(tmp_path):
    path = write(tmp_path, "edge.yaml", "seed: 0\nppo:\n  gamma: 1\n  lam: 0\n  top_p: 1.0\n  beta: 0\n"
                                       "  weights:\n    object: 0\nreward:\n  epochs: 1\n  lora_dropout: 0\n")
    params = P.load(path)
    assert (params.ppo.gamma, params.ppo.lam, params.ppo.beta, params.reward.epochs) == (1.0, 0.0, 0.0, 1)
    assert isinstance(params.ppo.gamma, float)


def test_held_out_fractions_leave_training_images(tmp_path):
    path = write(tmp_path, "split.yaml", "reward:\n  dev_fraction: 0.5\n  test_fraction: 0.5\n")
    with pytest.raises(P.ParamsError, match=r"split\.yaml: keys 'reward\.dev_fraction' \+ 'reward\.test_fraction' = 1 "):
        P.load(path)


def test_rollout_batch_fits_the_prompt_images_and_the_ranks(tmp_path):
    uneven = write(tmp_path, "uneven.yaml", "ppo:\n  rollout_batch: 10\n  samples_per_image: 4\n")
    with pytest.raises(P.ParamsError, match=r"uneven\.yaml: key 'ppo\.rollout_batch' \(10\) must be a multiple of "
                                           r"'ppo\.samples_per_image' \(4\)"):
        P.load(uneven)
    too_many = write(tmp_path, "many.yaml", "data:\n  n_ppo: 30\nppo:\n  rollout_batch: 64\n  samples_per_image: 2\n")
    with pytest.raises(P.ParamsError, match=r"many\.yaml: key 'ppo\.rollout_batch' asks for 32 .* the 30 of 'data\.n_ppo'"):
        P.load(too_many)
    exact = write(tmp_path, "exact.yaml", "data:\n  n_ppo: 32\nppo:\n  rollout_batch: 64\n  samples_per_image: 2\n")
    assert P.load(exact).ppo.rollout_batch == 64
    ranks = write(tmp_path, "ranks.yaml", "ppo:\n  rollout_batch: 64\n  launcher: torchrun\n  nproc: 3\n")
    with pytest.raises(P.ParamsError, match=r"ranks\.yaml: key 'ppo\.rollout_batch' \(64\) must be a multiple of "
                                           r"'ppo\.nproc' \(3\)"):
        P.load(ranks)
    in_kernel = write(tmp_path, "kernel.yaml", "ppo:\n  rollout_batch: 64\n  nproc: 3\n")   # launcher none: one process
    assert P.load(in_kernel).ppo.nproc == 3
    minibatch = write(tmp_path, "minibatch.yaml", "ppo:\n  rollout_batch: 64\n  minibatch_size: 6\n  launcher: torchrun\n"
                                                  "  nproc: 4\n")
    with pytest.raises(P.ParamsError, match=r"minibatch\.yaml: key 'ppo\.minibatch_size' \(6\) must be a multiple of "
                                           r"'ppo\.nproc' \(4\)"):
        P.load(minibatch)


COCO = "data:\n  world: coco\n  coco_root: /x\nmodels:\n  policy: llava-hf/llava-1.5-7b-hf\n  verifier: v\n" \
       "feedback:\n  verifier: hf\nreward:\n  backbone: llava-hf/llava-1.5-13b-hf\n"


@pytest.mark.parametrize("text, message", [
    (COCO.replace("policy: llava-hf/llava-1.5-7b-hf", "policy: tiny"),
     "key 'models.policy' ('tiny') needs data.world 'synthetic'"),
    (COCO.replace("verifier: hf", "verifier: detector"), "key 'feedback.verifier' ('detector') needs data.world"),
    (COCO.replace("backbone: llava-hf/llava-1.5-13b-hf", "backbone: pretrained"),
     "key 'reward.backbone' ('pretrained') needs data.world 'synthetic'"),
    (COCO.replace("backbone: llava-hf/llava-1.5-13b-hf", "backbone: policy"),
     "key 'reward.backbone' ('policy') needs data.world 'synthetic' (on COCO, name the model"),
    ("models:\n  train_lvlm_verifier: false\nreward:\n  backbone: verifier_lvlm\n",
     "key 'reward.backbone' ('verifier_lvlm') needs models.train_lvlm_verifier: true"),
    ("models:\n  train_lvlm_verifier: false\nfeedback:\n  verifier: hf\n",
     "key 'feedback.verifier' ('hf') needs models.train_lvlm_verifier: true"),
    ("feedback:\n  question_suffix: ' Answer yes or no.'\n", "key 'feedback.question_suffix' (' Answer yes or no.') needs"),
])
def test_models_only_the_synthetic_world_trains_are_refused_elsewhere(tmp_path, text, message):
    """Each of these failed only at the stage that loads the model, after the stages before had run."""
    path = write(tmp_path, "models.yaml", text)
    with pytest.raises(P.ParamsError) as err:
        P.load(path, check_paths=False)
    assert f"{path}: {message}" in str(err.value)
    assert P.load(write(tmp_path, "fine.yaml", COCO), check_paths=False).data.world == "coco"


@pytest.mark.parametrize("text, message", [
    ("data:\n  world_params:\n    min_objects: 3\n    max_objects: 2\n",
     "key 'data.world_params.min_objects' (3) must be at most 'data.world_params.max_objects' (2)"),
    ("data:\n  world_params:\n    long_min_objects: 6\n",
     "key 'data.world_params.long_min_objects' (6) must be at most 'data.world_params.long_max_objects' (5)"),
    ("data:\n  world_params:\n    long_max_objects: 7\n",     # six shapes, each at most once: stage 00 failed
     "key 'data.world_params.long_max_objects' must be >= 1 and <= 6, got 7"),
    ("data:\n  captions_per_image: 11\n",            # caption ids image id x 10 + k would collide
     "key 'data.captions_per_image' must be >= 1 and <= 10, got 11"),
    ("data:\n  world_params:\n    radius_small: 14\n",
     "key 'data.world_params.radius_small' (14.0) must be below 'data.world_params.radius_large' (14.0)"),
    ("data:\n  world_params:\n    long_splits: [ppo]\n",
     "key 'data.world_params.long_splits' (['ppo']) must include 'eval_long'"),
])
def test_world_keys_that_must_agree(tmp_path, text, message):
    path = write(tmp_path, "world.yaml", text)
    with pytest.raises(P.ParamsError) as err:
        P.load(path)
    assert f"{path}: {message}" in str(err.value)
    equal = write(tmp_path, "equal.yaml", "data:\n  world_params:\n    min_objects: 2\n    max_objects: 2\n")
    assert P.load(equal).data.world_params.min_objects == 2


def test_size_twins_need_the_synthetic_world_and_twin_share_needs_them(tmp_path):
    orphan = write(tmp_path, "orphan.yaml", "reward:\n  twin_share: 0.3\n")
    with pytest.raises(P.ParamsError, match=r"orphan\.yaml: key 'reward\.twin_share' \(0\.3\) .* 'feedback\.size_twins: true'"):
        P.load(orphan)
    coco = write(tmp_path, "coco.yaml", "data:\n  world: coco\n  coco_root: /x\nfeedback:\n  size_twins: true\n")
    with pytest.raises(P.ParamsError, match=r"coco\.yaml: key 'feedback\.size_twins' needs data\.world 'synthetic'"):
        P.load(coco, check_paths=False)
    whole = write(tmp_path, "whole.yaml", "feedback:\n  size_twins: true\nreward:\n  twin_share: 1\n")
    with pytest.raises(P.ParamsError, match=r"reward\.twin_share"):
        P.load(whole)
    both = write(tmp_path, "both.yaml", "feedback:\n  size_twins: true\nreward:\n  twin_share: 0.5\n")
    assert P.load(both).reward.twin_share == 0.5


@pytest.mark.parametrize("text, message", [
    ("ppo:\n  deepspeed: params/deepspeed/zero3.json\n",
     "key 'ppo.deepspeed' ('params/deepspeed/zero3.json') needs ppo.launcher 'torchrun' or 'accelerate'"),
    ("ppo:\n  launcher: torchrun\n  rollout_engine: graph\n  deepspeed: params/deepspeed/zero3.json\n",
     "needs ppo.rollout_engine 'auto' or 'generate'"),
    ("models:\n  load_in_4bit: true\nppo:\n  launcher: torchrun\n  deepspeed: params/deepspeed/zero3.json\n",
     "needs models.load_in_4bit: false"),
    ("ppo:\n  launcher: torchrun\n  deepspeed: nowhere/zero3.json\n",
     "key 'ppo.deepspeed' names 'nowhere/zero3.json', which is not a file"),
    ("ppo:\n  launcher: torchrun\n  deepspeed: {dir}/broken.json\n", "which is not JSON"),
    ("ppo:\n  launcher: torchrun\n  deepspeed: {dir}/stageless.json\n", "'zero_optimization.stage' must be 0, 1, 2 or 3"),
])
def test_deepspeed_config_errors_name_the_key_and_the_file(tmp_path, text, message):
    (tmp_path / "broken.json").write_text('{"zero_optimization": {"stage": 3,}')
    (tmp_path / "stageless.json").write_text('{"zero_optimization": {"offload_param": {}}}')
    path = write(tmp_path, "ds.yaml", text.format(dir=tmp_path))
    with pytest.raises(P.ParamsError) as err:
        P.load(path)
    assert f"{path}: " in str(err.value) and message in str(err.value)
    good = write(tmp_path, "good.yaml", "ppo:\n  launcher: torchrun\n  deepspeed: params/deepspeed/zero3.json\n")
    assert P.deepspeed_config(P.load(good).ppo.deepspeed)["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize("key", ["feedback.llm_api_key_env", "feedback.vision_api_key_env",
                                 "evaluate.judge_api_key_env"])
def test_an_api_key_env_names_a_variable_and_never_holds_a_key(tmp_path, key):
    section, name = key.split(".")
    ok = write(tmp_path, "ok.yaml", f"{section}:\n  {name}: VLLM_KEY_2\n")
    assert getattr(getattr(P.load(ok), section), name) == "VLLM_KEY_2"
    for pasted_key in ("sk-proj-abc123", "hf_AbCdEf0123", "gsk_4f9c2b"):   # OpenAI, Hugging Face, Groq keys
        pasted = write(tmp_path, "pasted.yaml", f"{section}:\n  {name}: {pasted_key}\n")
        with pytest.raises(P.ParamsError, match=rf"pasted\.yaml: key '{key}' must name an environment variable .*not "
                                                "hold a key"):
            P.load(pasted)


@pytest.mark.parametrize("key", ["feedback.llm_base_url", "feedback.vision_base_url", "evaluate.judge_base_url"])
def test_an_endpoint_url_never_carries_a_key(tmp_path, key):
    """A base URL goes into every manifest with its section: credentials in it are refused, without repeating them."""
    section, name = key.split(".")
    for fine in ("http://localhost:8000/v1", "https://host.example/v1?api-version=2024-06-01"):
        ok = write(tmp_path, "ok.yaml", f"{section}:\n  {name}: '{fine}'\n")
        assert getattr(getattr(P.load(ok), section), name) == fine
    for secret in ("https://me:SECRET-42@host.example/v1", "https://host.example/v1?api-key=SECRET-42",
                   "https://host.example/v1?access_token=SECRET-42"):
        leaky = write(tmp_path, "leaky.yaml", f"{section}:\n  {name}: '{secret}'\n")
        with pytest.raises(P.ParamsError) as err:
            P.load(leaky)
        assert f"key '{key}' holds a user name, password or key in the URL" in str(err.value)
        assert "SECRET-42" not in str(err.value) and name.replace("base_url", "api_key_env") in str(err.value)


def test_a_naming_head_needs_two_claim_words(tmp_path):
    one = write(tmp_path, "one.yaml", "reward:\n  claim_words:\n    relation: [[left]]\n")
    with pytest.raises(P.ParamsError, match=r"one\.yaml: key 'reward.claim_words.relation' names one value"):
        P.load(one)
    two = write(tmp_path, "two.yaml", "reward:\n  claim_words:\n    relation: [[left], [right, rightwards]]\n")
    assert P.load(two).reward.claim_words.relation == [["left"], ["right", "rightwards"]]
