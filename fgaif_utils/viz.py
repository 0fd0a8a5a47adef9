"""Figures a person looks at: matplotlib Figure objects (no pyplot state, nothing shown), saved by the notebooks.

Data stage: `scene_grid` (images with their scene graphs and a reference description) and `world_stats_figure`
(what the synthetic world contains, and the noise it injected, measured against the requested rates).
"""
import math
import textwrap

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
        ax.text(0.0, -0.03, _scene_text(scene), transform=ax.transAxes, va="top", ha="left", fontsize=6.5,
                family="monospace")
    fig.subplots_adjust(hspace=1.2, wspace=0.15, top=0.97, bottom=0.15)
    return fig


def _bars(ax, counts, title, colours=None):
    names = list(counts)
    ax.bar(names, [counts[k] for k in names], color=colours or "tab:blue", edgecolor="black", linewidth=0.5)
    ax.set_title(title, fontsize=10)
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
        ax.legend(fontsize=7)
    else:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no sft split: no noisy captions", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig
