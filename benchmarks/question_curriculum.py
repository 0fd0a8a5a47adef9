"""Which questions about position can a tiny LVLM learn, and in which order? Full fine-tuning of a stage-01 model.

    .venv/bin/python benchmarks/question_curriculum.py --model tiny-poscode/pretrained --curriculum half1:1000
    .venv/bin/python benchmarks/question_curriculum.py --model tiny-poscode/pretrained \\
        --curriculum where1:500,where:1500,rel:4000,relation:1000 --save /tmp/grounded

Each kind of question is trained alone (packed two per image, batch 32, AdamW with stage 01's warm-up and cosine per
kind, every weight trained), in the order given, on the sft split; after every 500 steps the eval split's questions
of that kind are answered greedily and scored. Kinds (`--curriculum kind:steps,...`):

    where1    "what is the circle on ?" -> left / right, scenes with one object      (a direct read-out of position)
    where     the same, any scene                                                    (+ finding the named shape)
    half1     "is the circle on the left ?" -> yes / no, one object                  (the answer is an XOR of the
    half      the same, any scene                                                     question's word and the image)
    rel       "what is the circle to the square ?" -> left / right / above / below   (comparing two positions)
    relation  stage 01's "is the circle left of the square ?" -> yes / no            (what the reward model judges)
    colour    stage 01's "is the circle red ?" -> yes / no                           (a control that learns at once)

Objects within 6 px of the vertical midline get no where / half question. `--save` writes the final model in the
llava-hf format (a `reward.backbone` folder). benchmarks/MEASUREMENTS.md "Relations: an XOR the gradient does not see". One process,
2 threads: run nothing else meanwhile.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fgaif_utils import language, models, tiny_train, world  # noqa: E402

MIDLINE, MIDLINE_MARGIN = 32.0, 6.0
KINDS = ("where1", "where", "half1", "half", "rel", "relation", "colour")
WORD_ANSWER_KINDS = ("where1", "where", "rel")


def side_of(obj):
    """'left' / 'right' of the canvas midline, or None within MIDLINE_MARGIN of it."""
    if abs(obj["cx"] - MIDLINE) < MIDLINE_MARGIN:
        return None
    return "left" if obj["cx"] < MIDLINE else "right"


def where_questions(scene, rng, n):
    questions = []
    for _ in range(n):
        obj = scene["objects"][rng.integers(len(scene["objects"]))]
        if side_of(obj) is not None:
            questions.append((f"what is the {obj['shape']} on ?", side_of(obj), "where"))
    return questions


def half_questions(scene, rng, n):
    questions = []
    for _ in range(n):
        obj = scene["objects"][rng.integers(len(scene["objects"]))]
        if side_of(obj) is None:
            continue
        asked, answer = (side_of(obj), "yes") if rng.random() < 0.5 else (language.OPPOSITE[side_of(obj)], "no")
        questions.append((f"is the {obj['shape']} on the {asked} ?", answer, "half"))
    return questions


def rel_questions(scene, rng, n):
    if not scene["relations"]:
        return []
    picks = [scene["relations"][rng.integers(len(scene["relations"]))] for _ in range(n)]
    return [(f"what is the {r['subject']} to the {r['object']} ?", r["relation"], "rel") for r in picks]


def questions_of(kind, scene, rng, n=2):
    """[(question, answer, type)] of one kind about one scene; [] where the kind does not apply."""
    base = kind.rstrip("1")
    if kind not in KINDS:
        raise ValueError(f"unknown question kind {kind!r}: one of {' '.join(KINDS)}")
    if kind.endswith("1") and len(scene["objects"]) != 1:
        return []
    if base == "where":
        return where_questions(scene, rng, n)
    if base == "half":
        return half_questions(scene, rng, n)
    if base == "rel":
        return rel_questions(scene, rng, n)
    return tiny_train.qa_pairs(scene, rng, per_type=n, types=(base,))


def batches(kind, builder, scenes, images, batch_size=32):
    """make_batch(rng) for tiny_train.train_phase, over the scenes the kind applies to."""
    rows_with = np.array([i for i, s in enumerate(scenes) if questions_of(kind, s, np.random.default_rng(i), n=4)])

    def make_batch(rng):
        sequences, rows = [], []
        while len(sequences) < batch_size:
            row = rows_with[rng.integers(len(rows_with))]
            questions = questions_of(kind, scenes[row], rng)
            if questions:
                sequences.append(builder.packed_qa(questions))
                rows.append(row)
        return builder.collate(sequences, images[np.array(rows)]), kind
    return make_batch


@torch.no_grad()
def first_words(model, processor, images, questions, batch_size=200):
    words = []
    for start in range(0, len(questions), batch_size):
        prompts = [models.chat_prompt(processor, q) for q in questions[start:start + batch_size]]
        _, texts = models.generate(model, processor, images[start:start + batch_size], prompts, max_new_tokens=2)
        words += [(text.split() or [""])[0] for text in texts]
    return words


def eval_accuracy(kind, model, processor, scenes, images, seed=123):
    """(accuracy, share of the commonest answer) on one question of `kind` per eval scene it applies to."""
    rng = np.random.default_rng(seed)
    rows = [(i, q, a) for i, scene in enumerate(scenes) for q, a, _ in questions_of(kind, scene, rng, n=1)]
    questions, truths = [q for _, q, _ in rows], [a for _, _, a in rows]
    answer_images = images[np.array([i for i, _, _ in rows])]
    if kind in WORD_ANSWER_KINDS:
        answers = first_words(model, processor, answer_images, questions)
    else:
        answers = tiny_train.answer_questions(model, processor, answer_images, questions, desc=f"eval {kind}")
    _, counts = np.unique(answers, return_counts=True)
    return float(np.mean([a == t for a, t in zip(answers, truths)])), float(counts.max() / len(answers)), len(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-poscode/pretrained", help="RUN/FOLDER of a finished stage 01, or a llava-hf folder")
    parser.add_argument("--data", default="tiny", help="run whose stage 00 supplies the sft and eval scenes")
    parser.add_argument("--curriculum", default="where1:500,where:1500,rel:2500,relation:1000")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", help="write the final model here (llava-hf format)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    data_dir = REPO / "outputs" / args.data / "00_data"
    sft_scenes = world.load_scenes(data_dir, "sft")
    sft_images = np.stack(world.load_images(data_dir, sft_scenes))
    eval_scenes = world.load_scenes(data_dir, "eval")
    eval_images = np.stack(world.load_images(data_dir, eval_scenes))
    folder = Path(args.model) if Path(args.model).is_dir() else REPO / "outputs" / args.model.replace("/", "/01_base_models/", 1)
    model, processor = models.load_lvlm(str(folder), device="cpu")
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    n_image_tokens = model.config.vision_config.image_size ** 2 // model.config.vision_config.patch_size ** 2
    builder = tiny_train.SequenceBuilder(processor, n_image_tokens)
    print(f"| {args.model} | kind | steps | seconds | eval accuracy | commonest answer | questions |")
    print("|---|---|---|---|---|---|---|")
    started = time.time()
    with tempfile.TemporaryDirectory() as checkpoints:
        for phase, spec in enumerate(args.curriculum.split(",")):
            kind, steps = spec.split(":")
            make_batch = batches(kind, builder, sft_scenes, sft_images)
            for chunk in range(int(steps) // 500):
                tiny_train.train_phase(model, make_batch, 500, args.lr, args.seed + 100 * phase + chunk,
                                       Path(checkpoints) / f"{phase}-{chunk}", f"{kind} {chunk}")
                accuracy, commonest, n = eval_accuracy(kind, model, processor, eval_scenes, eval_images)
                print(f"| | {kind} | {(chunk + 1) * 500} | {time.time() - started:.0f} | {accuracy:.3f} | "
                      f"{commonest:.2f} | {n} |", flush=True)
    if args.save:
        models.save_lvlm(model, processor, args.save)
        print(f"saved {args.save}")


if __name__ == "__main__":
    main()
