"""The teaching view of stage 04: reward-model learning curves, per-type metrics against the AI labels and the
ground truth, confusion matrices, and scored responses as a self-contained HTML page.

`evaluation` is what reward.evaluate returns: {type: {"ai", "baseline_ai", "gt", "baseline_gt"}}: reward.label_metrics
and reward.constant_baselines dicts ("gt" entries only in the synthetic world). Labels are -1 n/a, 0 correct,
1 hallucinated. Every string in the HTML that comes from a model or a record is escaped.
"""
import html

import numpy as np
from matplotlib.figure import Figure

from fgaif_utils import report

LABELS = (-1, 0, 1)
LABEL_NAMES = {-1: "n/a", 0: "correct", 1: "halluc.", None: "no label"}
SOURCE_NAMES = {"ai": "AI labels", "gt": "ground truth"}
TYPE_LETTERS = {"object": "O", "attribute": "A", "relation": "R"}


def _fmt(value, digits=3):
    return "–" if value is None else f"{value:.{digits}f}"


def learning_curves(histories, window=20):
    """Per type: training loss (moving average) against steps, and dev macro-F1 (which picks the kept epoch, marked)
    and hallucination-class F1 after each epoch (right axis)."""
    fig = Figure(figsize=(4.3 * len(histories), 3.2))
    axes = fig.subplots(1, len(histories), squeeze=False)[0]
    for ax, (fact_type, history) in zip(axes, histories.items()):
        steps = np.array([s for s, _ in history["loss"]])
        losses = np.array([v for _, v in history["loss"]])
        if len(losses) >= window:
            ax.plot(steps[window - 1:], np.convolve(losses, np.ones(window) / window, mode="valid"), label="train loss")
        elif len(losses):
            ax.plot(steps, losses, label="train loss")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy")
        right = ax.twinx()
        right.plot([d["step"] for d in history["dev"]], [d["macro_f1"] for d in history["dev"]], "o-", color="tab:orange",
                   markersize=3, label="dev macro-F1")
        halluc = [(d["step"], d["halluc_f1"]) for d in history["dev"] if d.get("halluc_f1") is not None]
        if halluc:   # histories written before the field existed have none
            right.plot(*zip(*halluc), "s--", color="tab:red", markersize=3, linewidth=1, label="dev hallucination F1")
        best = [d for d in history["dev"] if d["epoch"] == history["best_epoch"]]
        if best:
            right.axvline(best[0]["step"], color="grey", linestyle=":", linewidth=1)
        right.set_ylim(0, 1)
        right.set_ylabel("dev F1 (AI labels)")
        stop = "early stop" if history["stopped_early"] else "all epochs"
        ax.set_title(f"{fact_type}: best epoch {history['best_epoch']} ({stop})", fontsize=9)
        lines = ax.get_legend_handles_labels()
        more = right.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="center right")
    fig.tight_layout()
    return fig


def metrics_table(evaluation):
    """Markdown: per type and reference (AI labels, ground truth), the reward model's accuracy and macro-F1 over
    all held-out sub-sentences, and over those the reference judges (not n/a) the accuracy and the
    hallucination-class precision / recall / F1, beside the constant baselines' (majority-class accuracy,
    always-hallucinated F1); last, the share of the reference's n/a sub-sentences the model calls hallucinated
    (left out of the F1; in PPO each is a -1)."""
    lines = ["| type | against | sub-sentences (judged / halluc.) | accuracy | macro-F1 | accuracy where judged "
             "| halluc. precision | halluc. recall | halluc. F1 | majority-class accuracy "
             "| always-halluc. F1 | n/a called halluc. |", "|" + "---|" * 12]
    for fact_type, entry in evaluation.items():
        for source in ("ai", "gt"):
            if source not in entry:
                continue
            m, b = entry[source], entry[f"baseline_{source}"]
            lines.append(f"| {fact_type} | {SOURCE_NAMES[source]} | {m['n']} ({m['n_applicable']} / {m['n_hallucinated']}) "
                         f"| {_fmt(m['accuracy'])} | {_fmt(m['macro_f1'])} | {_fmt(m['applicable_accuracy'])} "
                         f"| {_fmt(m['precision'])} | {_fmt(m['recall'])} | **{_fmt(m['f1'])}** "
                         f"| {_fmt(b['majority_accuracy'])} | {_fmt(b['always_hallucinated_f1'])} "
                         f"| {_fmt(m['na_called_hallucinated'])} |")
    return "\n".join(lines)


def below_baselines(evaluation):
    """One line per type and reference where the reward model does not beat a constant guess: its hallucination
    F1 at most the always-hallucinated F1, or its accuracy where judged at most the majority class's. PPO still
    uses such a model's reward (its weight is a param); the line says that reward carries no signal."""
    lines = []
    for fact_type, entry in evaluation.items():
        for source in ("ai", "gt"):
            if source not in entry:
                continue
            m, b = entry[source], entry[f"baseline_{source}"]
            failed = [f"{label} {_fmt(mine)} <= {_fmt(theirs)} ({baseline})" for label, mine, theirs, baseline in (
                ("halluc. F1", m["f1"], b["always_hallucinated_f1"], "always hallucinated"),
                ("accuracy where judged", m["applicable_accuracy"], b["majority_accuracy"], "majority class"))
                if mine is not None and theirs is not None and mine <= theirs and theirs > 0]   # 0: nothing to beat
            if failed:
                lines.append(f"the {fact_type} reward model does not beat a constant guess against the "
                             f"{SOURCE_NAMES[source]}: {'; '.join(failed)}")
    return lines


def metrics_figure(evaluation):
    """Bars per type: macro-F1 and hallucination precision / recall / F1, one panel per reference; the best
    constant guess's hallucination F1 (always hallucinated) as a black tick."""
    sources = [s for s in ("ai", "gt") if all(s in e for e in evaluation.values())]
    keys = [("macro_f1", "macro-F1"), ("precision", "halluc. precision"), ("recall", "halluc. recall"),
            ("f1", "halluc. F1")]
    fig = Figure(figsize=(5.5 * len(sources), 3.3))
    axes = fig.subplots(1, len(sources), squeeze=False)[0]
    types = list(evaluation)
    width = 0.8 / len(keys)
    xs = np.arange(len(types))
    for ax, source in zip(axes, sources):
        for j, (key, name) in enumerate(keys):
            ax.bar(xs + (j + 0.5) * width - 0.4, [evaluation[t][source][key] or 0.0 for t in types], width, label=name)
        f1_x = xs + (len(keys) - 0.5) * width - 0.4
        ax.scatter(f1_x, [evaluation[t][f"baseline_{source}"]["always_hallucinated_f1"] or 0.0 for t in types],
                   marker="_", s=300, color="black", label="always-halluc. F1", zorder=3)
        ax.set_xticks(xs, types)
        ax.set_ylim(0, 1)
        ax.set_ylabel("score on held-out responses")
        ax.set_title(f"held-out, against {SOURCE_NAMES[source]}", fontsize=10)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def confusion_figure(evaluation):
    """3x3 confusion matrices (rows: reference, columns: reward model), one per type and reference."""
    sources = [s for s in ("ai", "gt") if all(s in e for e in evaluation.values())]
    fig = Figure(figsize=(3.6 * len(evaluation), 3.4 * len(sources)))
    axes = fig.subplots(len(sources), len(evaluation), squeeze=False)
    names = [LABEL_NAMES[v] for v in LABELS]
    for row, source in enumerate(sources):
        for ax, (fact_type, entry) in zip(axes[row], evaluation.items()):
            counts = np.array(entry[source]["confusion"])
            ax.imshow(counts, cmap="Blues")
            for i in range(3):
                for j in range(3):
                    dark = counts[i, j] > counts.max() / 2
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", color="white" if dark else "black")
            ax.set_xticks(range(3), names)
            ax.set_yticks(range(3), names)
            ax.set_xlabel("reward model")
            ax.set_ylabel(SOURCE_NAMES[source])
            ax.set_title(f"{fact_type} vs {SOURCE_NAMES[source]}", fontsize=9)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------- HTML

# The labels report's page style, plus a mark for a reward-model class that misses the reference label.
CSS = report.CSS + ".badge.wrong { border: 2px solid #c00; font-weight: bold; }\n"


def _badge(fact_type, predicted, prob, ai, gt):
    """One type's reward-model class and p(halluc.), with the AI label and the truth; a red border when the
    prediction misses the truth (or the AI label where there is no truth)."""
    reference = ai if gt is None else gt
    text = f"{TYPE_LETTERS.get(fact_type, fact_type)} {LABEL_NAMES[predicted]} p={prob:.2f} · AI {LABEL_NAMES[ai]}"
    if gt is not None:
        text += f" · truth {LABEL_NAMES[gt]}"
    wrong = " wrong" if reference is not None and predicted != reference else ""
    return f'<span class="badge l{predicted}{wrong}" title="{html.escape(fact_type)}">{html.escape(text)}</span>'


def scored_examples_html(records, scores, types, image_loader=None, title="Reward models", max_records=40):
    """Held-out responses scored by the reward models: each sub-sentence coloured by the predicted classes
    (red: a predicted hallucination of some type, green: checked and correct, grey: nothing to check) with, per
    type, the predicted class, p(hallucinated), the AI label and the truth. scores: RewardModels.score output,
    parallel to records; image_loader(record) -> uint8 (H, W, 3) or None."""
    parts = []
    for record, score in list(zip(records, scores))[:max_records]:
        subs = []
        for k, sub in enumerate(record["subsentences"]):
            predicted = [int(v) for v in score["labels"][k]]
            css = "halluc" if 1 in predicted else "correct" if 0 in predicted else "na"
            gt = sub.get("gt_labels")
            badges = "".join(_badge(t, predicted[i], float(score["probs"][k, i, 2]), sub["labels"][i],
                                    None if gt is None else gt[i]) for i, t in enumerate(types))
            subs.append(f'<div class="sub"><span class="ss {css}">{html.escape(sub["text"])}</span>{badges}</div>')
        meta = f"response {record['response_id']} · image {record['image_id']}"
        image = report._image_html(record, image_loader)
        parts.append(f'<div class="response">{image}<div><div class="meta">{html.escape(meta)}</div>'
                     f'{"".join(subs)}</div></div>')
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n<h1>{html.escape(title)}</h1>\n"
            f"<p>Badges: type letter, the reward model's class and p(hallucinated), the AI label, the truth. "
            f"A red border marks a prediction that misses the truth.</p>\n{''.join(parts)}\n</body></html>\n")


def word_swap_markdown(probes, types=("object", "attribute")):
    """A Markdown table of reward.word_swap_probe rows ({kind: rows}): per written value, each type's mean
    P(hallucinated) as written -> with the word swapped, and the share of swaps that raised it."""
    lines = ["| word kind | written | sub-sentences | " + " | ".join(
                 f"{t} P(halluc.) written -> swapped | {t}: swaps that raise it" for t in types) + " |",
             "|---|---|---|" + "---|---|" * len(types)]
    for kind, rows in probes.items():
        for row in rows:
            cells = " | ".join(f"{row[t]['p_written']:.3f} -> {row[t]['p_swapped']:.3f} | {row[t]['rises']:.2f}"
                               for t in types)
            lines.append(f"| {html.escape(kind)} | {html.escape(str(row['said']))} | {row['n']} | {cells} |")
    return "\n".join(lines)
