"""The teaching view of stage 05: PPO curves from log.jsonl, and images described before and after PPO with the
ground-truth scorer's highlights. Every string from a model is escaped (scorer.highlight_html)."""
import html

import numpy as np
from matplotlib.figure import Figure

from . import scorer

CURVES = [
    ("reward-model reward / response", ["reward_fine_grained", "reward_object", "reward_attribute", "reward_relation",
                                        "reward_holistic"]),
    ("KL to reference (nats / response)", ["kl"]),
    ("response length (tokens)", ["response_length"]),
    ("sub-sentences / response", ["subsentences"]),
    ("entropy (nats / token)", ["entropy"]),
    ("approx KL old -> new", ["approx_kl"]),
    ("clip fraction", ["clip_fraction"]),
    ("value loss", ["value_loss"]),
    ("explained variance", ["explained_variance"]),
    ("advantage: hallucinated − correct", ["advantage_contrast"]),
]


# reward_fine_grained is what PPO paid per response: the types' +1 / -1 times their weights, plus the claim bonus,
# nothing for repeated sub-sentences (ppo.reward_repeats: false), scaled; the per-type curves are the plain +1 / -1.
CURVE_LABELS = {"reward_fine_grained": "paid (weights, bonus, repeats)"}


def _smooth(values, window):
    values = np.asarray(values, dtype=float)
    if len(values) < window or window < 2:
        return values
    kernel = np.ones(window) / window
    return np.concatenate([values[:window - 1], np.convolve(values, kernel, mode="valid")])


def training_curves(log, window=5):
    """One panel per diagnostic over PPO iterations (thin: raw, thick: moving average)."""
    rows = [r for r in log if r.get("iteration", 0) > 0 and "reward_total" in r]
    fig = Figure(figsize=(17, 6.5))
    axes = fig.subplots(2, 5).flatten()
    its = [r["iteration"] for r in rows]
    for ax, (title, keys) in zip(axes, CURVES):
        for key in keys:
            values = [r.get(key) for r in rows]
            if not values or any(v is None for v in values):
                continue
            line, = ax.plot(its, values, lw=0.6, alpha=0.5)
            ax.plot(its, _smooth(values, window), lw=1.8, color=line.get_color(), label=CURVE_LABELS.get(
                key, key.replace("reward_", "")))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration", fontsize=8)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(f"PPO diagnostics per iteration (thin: as logged; thick: moving average of {window})", fontsize=11)
    fig.tight_layout()
    return fig


VALIDATION_CURVES = [
    ("validation: ground-truth hallucination rate (greedy)",
     ["val_gt_object_error_rate", "val_gt_attribute_error_rate", "val_gt_relation_error_rate"]),
    ("validation: coverage (ground truth)", ["val_gt_coverage"]),
    ("validation: sentences, repeated-sentence rate", ["val_gt_mean_sentences", "val_gt_duplicate_sentence_rate"]),
    ("validation: reward-model reward / response", ["val_reward_object", "val_reward_attribute",
                                                    "val_reward_relation", "val_reward_holistic"]),
]


def validation_curves(log):
    """The validation split (never eval) over iterations: what the truth says, and what the reward models say."""
    rows = [r for r in log if any(k.startswith("val_") for k in r)]
    fig = Figure(figsize=(17, 3.4))
    axes = fig.subplots(1, len(VALIDATION_CURVES))
    for ax, (title, keys) in zip(axes, VALIDATION_CURVES):
        for key in keys:
            points = [(r["iteration"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, label=key.replace("val_gt_", "").replace("val_", ""))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration", fontsize=8)
        if ax.lines:
            ax.legend(fontsize=7)
        else:   # the real world has no ground-truth scorer
            ax.text(0.5, 0.5, "not measured in this world", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def describe_before_and_after(policy, processor, images, seed, prompt, max_new_tokens):
    """Greedy descriptions of `images` by the base policy (the PPO adapter disabled) and by the PPO policy (a peft
    model with the adapter): (before, after) lists of texts."""
    from . import tiny_train

    def describe():
        return tiny_train.describe_images(policy, processor, images, False, seed, prompt=prompt,
                                          max_new_tokens=max_new_tokens)[1]
    with policy.disable_adapter():
        before = describe()
    return before, describe()


def before_after_html(scenes, before_texts, after_texts, images=None):
    """A table: per image (uint8 arrays, optional), the truth, and the greedy descriptions before and after PPO with
    every fact coloured by the ground-truth scorer (green correct, red hallucinated, grey not judged)."""
    from .report import image_tag
    rows = ["<table style='font-family:sans-serif;font-size:13px;border-collapse:collapse'>"
            "<tr><th>image</th><th>truth</th><th>before PPO</th><th>after PPO</th></tr>"]
    for k, (scene, before, after) in enumerate(zip(scenes, before_texts, after_texts)):
        truth = ", ".join(f"{o['size']} {o['colour']} {o['shape']}" for o in scene["objects"])
        cells = [scorer.highlight_html(t, scorer.score_description(t, scene)["facts"]) for t in (before, after)]
        picture = (image_tag(images[k], alt=f"image {scene['image_id']}") if images is not None
                   else html.escape(str(scene["image_id"])))
        rows.append(f"<tr style='border-top:1px solid #ccc;vertical-align:top'><td>{picture}</td>"
                    f"<td>{html.escape(truth)}</td><td>{cells[0]}</td><td>{cells[1]}</td></tr>")
    rows.append("</table>")
    return "\n".join(rows)


def before_after_table(before, after):
    """Markdown: ground-truth metrics of greedy descriptions before and after PPO (scorer.aggregate dicts)."""
    keys = [("object_error_rate", "object halluc."), ("attribute_error_rate", "attribute halluc."),
            ("relation_error_rate", "relation halluc."), ("chair_s", "CHAIR_s"), ("coverage", "coverage"),
            ("mean_sentences", "sentences / desc."), ("mean_words", "words / desc.")]
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["| | " + " | ".join(name for _, name in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for label, summary in (("before PPO", before), ("after PPO", after)):
        lines.append(f"| {label} | " + " | ".join(fmt(summary.get(k)) for k, _ in keys) + " |")
    return "\n".join(lines)


def validation_table(rows):
    """Markdown: the validation metrics (keys val_*) of the given log rows, one row per iteration."""
    keys = sorted({k for r in rows for k in r if k.startswith("val_")})
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["| iteration | " + " | ".join(k[4:] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {r['iteration']} | " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
