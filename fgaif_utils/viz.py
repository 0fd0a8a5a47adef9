"""Figures a person looks at: matplotlib Figure objects (no pyplot state, nothing shown), saved by the notebooks.

Data stage: `scene_grid` (images with their scene graphs and a reference description) and `world_stats_figure`
(what the synthetic world contains, and the noise it injected, measured against the requested rates).
"""
import html
import math
import textwrap

import numpy as np

from matplotlib.figure import Figure

from fgaif_utils.language import COLOURS
from fgaif_utils.world import COLOUR_RGB, load_image


def _scene_text(scene, width=38):
    """Objects (with colour and size when known), stated relations and the first description, wrapped."""
    objects = [" ".join(str(v) for v in (o.get("size"), o.get("colour"), o["shape"]) if v) for o in scene["objects"]]
    lines = textwrap.wrap("objects: " + ", ".join(objects), width)
    shown = set()
    relations = []
    for r in scene.get("relations", []):
        pair = frozenset((r["subject"], r["object"]))
        if pair not in shown:  # one direction per pair is enough to read
            shown.add(pair)
            relations.append(f"{r['subject']} {r['relation']} {r['object']}")
    if relations:
        lines += textwrap.wrap("relations: " + ", ".join(relations), width)
    if scene.get("captions"):
        lines += textwrap.wrap('"' + scene["captions"][0] + '"', width)
    return "\n".join(lines)


def scene_grid(data_dir, scenes, n=12, cols=4):
    """The first n scenes: each image with its scene graph and first reference description in small text."""
    scenes = list(scenes)[:n]
    rows = max(1, math.ceil(len(scenes) / cols))
    fig = Figure(figsize=(3.4 * cols, 5.6 * rows))
    for k, scene in enumerate(scenes):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(load_image(data_dir, scene))
        ax.set_title(f"{scene['split']} {scene['image_id']}" + (" (fog)" if scene.get("fog") else ""), fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        # parse_math off: a COCO caption's "$" would be read as mathtext ("$\\foo$" raised, "$1 and $2" garbled)
        ax.text(0.0, -0.03, _scene_text(scene), transform=ax.transAxes, va="top", ha="left", fontsize=6.5,
                family="monospace", parse_math=False)
    fig.subplots_adjust(hspace=1.2, wspace=0.15, top=0.97, bottom=0.15)
    return fig


def _bars(ax, counts, title, colours=None):
    names = list(counts)
    ax.bar(names, [counts[k] for k in names], color=colours or "tab:blue", edgecolor="black", linewidth=0.5)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("count", fontsize=8)
    ax.tick_params(axis="x", labelrotation=45, labelsize=8)


def world_stats_figure(stats):
    """Bar plots of build_synthetic_world's stats: categories, colours, sizes, relations, objects per image
    per split, and injected noise rates (measured over applicable captions vs requested)."""
    fig = Figure(figsize=(15, 8))
    axes = fig.subplots(2, 3)
    _bars(axes[0, 0], stats["categories"], "objects per shape")
    rgb = [tuple(c / 255 for c in COLOUR_RGB[name]) for name in COLOURS]
    _bars(axes[0, 1], {c: stats["colours"][c] for c in COLOURS},
          f"objects per colour (typical: {stats['typical_colour_share']:.2f})", rgb)
    _bars(axes[0, 2], stats["sizes"], "objects per size")
    _bars(axes[1, 0], stats["relations"], "stated relations (ordered pairs)")

    ax = axes[1, 1]
    splits = list(stats["objects_per_image"])
    counts = sorted({int(k) for per in stats["objects_per_image"].values() for k in per})
    width = 0.8 / max(len(splits), 1)
    for i, split in enumerate(splits):
        per = {int(k): v for k, v in stats["objects_per_image"][split].items()}
        total = max(sum(per.values()), 1)
        ax.bar([c + (i - (len(splits) - 1) / 2) * width for c in counts], [per.get(c, 0) / total for c in counts],
               width=width, label=split)
    ax.set_xticks(counts)
    ax.set_title("objects per image (share of split)", fontsize=10)
    ax.set_ylabel("share of the split's images", fontsize=8)
    ax.legend(fontsize=7)

    ax = axes[1, 2]
    noise = stats.get("noise")
    if noise:
        kinds = ["object", "colour", "relation", "sys_colour"]
        measured = [noise[k]["per_object"] if k == "sys_colour" else noise[k]["applicable"] for k in kinds]
        requested = [noise[k]["requested"] for k in kinds]
        xs = range(len(kinds))
        ax.bar([x - 0.2 for x in xs], requested, width=0.4, label="requested", color="lightgray", edgecolor="black")
        ax.bar([x + 0.2 for x in xs], measured, width=0.4, label="measured", color="tab:red")
        ax.bar([x + 0.2 for x in xs], [noise[k]["all"] for k in kinds], width=0.4, label="share of all captions",
               fill=False, hatch="//", edgecolor="black")
        ax.set_xticks(list(xs), ["object", "colour", "relation", "sys colour\n(per object)"], fontsize=8)
        ax.set_title(f"noise injections (clean captions: {noise['clean']:.2f})", fontsize=10)
        ax.set_ylabel("share of captions (or of objects)", fontsize=8)
        ax.legend(fontsize=7)
    else:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no sft split: no noisy captions", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------- stage 01

def _fmt(value, digits=3):
    return "–" if value is None else f"{value:.{digits}f}"


def learning_curves(logs, window=50):
    """Loss per training phase (moving average over `window` steps), one line per batch kind."""
    fig = Figure(figsize=(4.2 * len(logs), 3.2))
    axes = fig.subplots(1, len(logs), squeeze=False)
    for ax, (phase, log) in zip(axes[0], logs.items()):
        kinds = sorted({kind for _, kind, _ in log})
        for kind in kinds:
            steps = np.array([s for s, k, _ in log if k == kind])
            losses = np.array([v for _, k, v in log if k == kind])
            if len(losses) >= window:
                smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
                ax.plot(steps[window - 1:], smooth, label=kind)
            elif len(losses):
                ax.plot(steps, losses, label=kind)
        ax.set_title(phase)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


PROFILE_COLUMNS = [("object", "object_error_rate"), ("CHAIR_i per shape", "chair_i"), ("CHAIR_s", "chair_s"),
                   ("attribute", "attribute_error_rate"), ("colour", "colour_error_rate"),
                   ("size", "size_error_rate"), ("relation", "relation_error_rate"), ("coverage", "coverage"),
                   ("sentences", "mean_sentences")]


def profile_table(profiles):
    """Markdown table of hallucination profiles: {row name: scorer.aggregate(...)}."""
    header = "| | " + " | ".join(name for name, _ in PROFILE_COLUMNS) + " | n claims (obj / att / rel) |"
    lines = [header, "|" + "---|" * (len(PROFILE_COLUMNS) + 2)]
    for name, agg in profiles.items():
        cells = [_fmt(agg.get(key), 2 if key == "mean_sentences" else 3) for _, key in PROFILE_COLUMNS]
        counts = f"{agg['n_object_judged']} / {agg['n_attribute_judged']} / {agg['n_relation_judged']}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {counts} |")
    return "\n".join(lines)


def profile_figure(profiles):
    """Bar plot: per-type hallucination rate and coverage, one group per profile."""
    keys = [("object", "object_error_rate"), ("colour", "colour_error_rate"), ("size", "size_error_rate"),
            ("relation", "relation_error_rate"), ("coverage", "coverage")]
    fig = Figure(figsize=(7, 3.2))
    ax = fig.subplots()
    width = 0.8 / max(1, len(profiles))
    for i, (name, agg) in enumerate(profiles.items()):
        values = [agg.get(key) or 0.0 for _, key in keys]
        ax.bar(np.arange(len(keys)) + i * width, values, width, label=name)
    ax.set_xticks(np.arange(len(keys)) + width * (len(profiles) - 1) / 2)
    ax.set_xticklabels([name for name, _ in keys])
    ax.set_ylim(0, 1)
    ax.set_ylabel("share")
    ax.set_title("base policy on eval: hallucination rates per type (lower is better), coverage (higher)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def examples_html(rows):
    """rows: [(scene, text, score)] -> HTML: each description with its facts coloured (scorer.highlight_html)
    beside the true objects. Everything from the model is escaped."""
    from . import scorer
    parts = ["<div style='font-family:sans-serif;font-size:13px'>"]
    for scene, text, score in rows:
        truth = ", ".join(f"{o['size']} {o['colour']} {o['shape']}" for o in scene["objects"])
        parts.append(f"<p><b>image {int(scene['image_id'])}</b> — truth: {html.escape(truth)}<br>"
                     f"{scorer.highlight_html(text, score['facts'])}</p>")
    parts.append("</div>")
    return "\n".join(parts)


def accuracy_table(accuracy):
    """Markdown: yes/no accuracy per question type for each judge ({judge: tiny_train.accuracy_by_type(...)})."""
    types = ["object", "colour", "size", "relation", "all"]
    lines = ["| judge | " + " | ".join(types) + " | yes-ratio (object) |", "|" + "---|" * (len(types) + 2)]
    for judge, table in accuracy.items():
        cells = [_fmt(table[t]["accuracy"]) if t in table else "–" for t in types]
        yes = _fmt(table["object"]["yes_ratio"]) if "object" in table else "–"
        lines.append(f"| {judge} | " + " | ".join(cells) + f" | {yes} |")
    return "\n".join(lines)


def accuracy_figure(accuracy):
    types = ["object", "colour", "size", "relation"]
    fig = Figure(figsize=(7, 3.2))
    ax = fig.subplots()
    width = 0.8 / max(1, len(accuracy))
    for i, (judge, table) in enumerate(accuracy.items()):
        ax.bar(np.arange(len(types)) + i * width, [table.get(t, {}).get("accuracy", 0.0) for t in types], width,
               label=judge)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(np.arange(len(types)) + width * (len(accuracy) - 1) / 2)
    ax.set_xticklabels(types)
    ax.set_ylim(0, 1)
    ax.set_ylabel("yes/no accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------- stages 02-03

def length_histograms(lengths, n_subsentences):
    """Histograms of response length (tokens) and sub-sentences per response."""
    fig = Figure(figsize=(8, 2.8))
    left, right = fig.subplots(1, 2)
    left.hist(lengths, bins=30)
    left.set_xlabel("tokens per response")
    left.set_ylabel("responses")
    right.hist(n_subsentences, bins=np.arange(0, max(n_subsentences, default=0) + 2) - 0.5)
    right.set_xlabel("sub-sentences per response")
    right.set_ylabel("responses")
    fig.tight_layout()
    return fig


def subsentence_html(records, tokenizer):
    """Responses with a bar after each sub-sentence and its closing token (from the sampled ids) in brackets."""
    parts = ["<div style='font-family:monospace;font-size:12px'>"]
    for record in records:
        pieces, cursor = [], 0
        for sub in record["subsentences"]:
            start, end = sub["span"]
            token = tokenizer.convert_ids_to_tokens(record["token_ids"][sub["last_token"]])
            pieces.append(html.escape(record["text"][cursor:end]))
            pieces.append(f"<b style='color:#c33'> | [{html.escape(str(token))}@{int(sub['last_token'])}]</b>")
            cursor = end
        pieces.append(html.escape(record["text"][cursor:]))
        parts.append(f"<p>{html.escape(str(record['response_id']))}: {''.join(pieces)}</p>")
    parts.append("</div>")
    return "\n".join(parts)


def agreement_table(agreement, fact_agreement):
    """Markdown: AI labels vs ground truth per type (report.label_agreement / report.fact_agreement)."""
    lines = ["| type | sub-sentences (both apply) | accuracy | majority baseline | halluc. precision | halluc. recall "
             "| halluc. F1 | fact verdict accuracy | unknown answers |", "|" + "---|" * 9]
    for fact_type, entry in agreement.items():
        facts = fact_agreement.get(fact_type, {})
        lines.append(f"| {fact_type} | {entry['n']} | {_fmt(entry['accuracy'])} | {_fmt(entry['majority_accuracy'])} | "
                     f"{_fmt(entry['precision'])} | {_fmt(entry['recall'])} | {_fmt(entry['f1'])} | "
                     f"{_fmt(facts.get('accuracy'))} | {_fmt(facts.get('unknown_share'))} |")
    return "\n".join(lines)
