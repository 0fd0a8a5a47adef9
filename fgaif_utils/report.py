"""The teaching view of stage 03's AI feedback: how well the AI labels agree with the synthetic world's truth,
figures of it, and one self-contained HTML page a teacher opens in a browser.

Inputs are the records of `fg_labels.jsonl` (one per response, its sub-sentences with AI labels and, in the
synthetic world, ground-truth labels) and `facts.jsonl` (one per atomic fact: the verifier's question, answer,
verdict and, in the synthetic world, the truth). Labels per sub-sentence are [object, attribute, relation], each
1 (hallucination), 0 (correct) or -1 (not applicable).

Every string in the HTML that comes from a model, an LLM, a file or a record goes through html.escape: model
output is untrusted.
"""
import base64
import html
import io
import re
from collections import Counter
from html.parser import HTMLParser

import numpy as np
from matplotlib.figure import Figure
from matplotlib.image import imsave

from fgaif_utils.facts import FACT_TYPES, describe_fact

THUMBNAIL_SIDE = 320   # pixels: the longest side of an image embedded in a report

LABELS = (-1, 0, 1)
LABEL_NAMES = {-1: "n/a", 0: "correct", 1: "halluc.", None: "no label"}   # None: not judged (failure)
TYPE_LETTERS = {"object": "O", "attribute": "A", "relation": "R"}


# ---------------------------------------------------------------------------------------------- checks

# Markdown's own syntax in untrusted text: a pipe splits a table cell, "![x](url)" fetches an image when the cell
# renders, "[x](javascript:...)" is a live link, "$x$" goes to MathJax. Backslash-escaped, each is a plain character.
_MARKDOWN_SYNTAX = re.compile(r"([\\`*_\[\](){}!$#~|])")


def markdown_cell(text):
    """Untrusted text (model output, user data, paths from params) as one cell of a Markdown table or a line of
    Markdown: runs of whitespace, line breaks too, become one space (a newline would end the row), Markdown's
    syntax characters are backslash-escaped and HTML is escaped."""
    return html.escape(_MARKDOWN_SYNTAX.sub(r"\\\1", " ".join(str(text).split())))


def markdown_code(text):
    """Untrusted text in monospace inside Markdown: a backtick code span would end at a backtick of the text."""
    return f"<code>{markdown_cell(text)}</code>"


def _check_labels(labels, where, allowed=LABELS):
    if not isinstance(labels, (list, tuple)) or len(labels) != len(FACT_TYPES) or any(
            label not in allowed for label in labels):
        raise ValueError(f"{where}: labels must be {len(FACT_TYPES)} values in {allowed} "
                         f"(object, attribute, relation), got {labels!r}")


def _check_record(record):
    """Raise ValueError naming the response when a fg_labels record lacks a key or has bad labels."""
    for key in ("response_id", "text", "subsentences"):
        if key not in record:
            raise ValueError(f"fg_labels record without {key!r}: response_id={record.get('response_id')!r}")
    for k, sub in enumerate(record["subsentences"]):
        where = f"fg_labels record {record['response_id']!r}, sub-sentence {k}"
        for key in ("text", "labels", "fact_ids"):
            if key not in sub:
                raise ValueError(f"{where}: no {key!r}")
        _check_labels(sub["labels"], where + " labels", LABELS + (None,))   # None: a failure left it unlabelled
        if sub.get("gt_labels") is not None:
            _check_labels(sub["gt_labels"], where + " gt_labels")
    return record


def _check_fact_record(fact):
    """Raise ValueError naming the fact when a facts.jsonl record lacks a key or has an unknown type."""
    for key in ("fact_id", "fact", "answer", "verdict", "truth"):
        if key not in fact:
            raise ValueError(f"facts record without {key!r}: fact_id={fact.get('fact_id')!r}")
    if fact["fact"].get("type") not in FACT_TYPES:
        raise ValueError(f"facts record {fact['fact_id']!r}: fact type must be one of {FACT_TYPES}, "
                         f"got {fact['fact'].get('type')!r}")
    return fact


def _subsentences(records):
    for record in records:
        yield from _check_record(record)["subsentences"]


# ---------------------------------------------------------------------------------------------- metrics

def _ratio(numerator, denominator):
    return numerator / denominator if denominator else None


def _type_agreement(pairs):
    """Metrics of one fact type from (truth, ai) label pairs of the sub-sentences that have ground truth."""
    confusion = [[0] * 3 for _ in LABELS]          # rows = truth, cols = AI, both in order -1, 0, 1
    for truth, ai in pairs:
        confusion[truth + 1][ai + 1] += 1
    applicable = [(truth, ai) for truth, ai in pairs if truth != -1 and ai != -1]
    n = len(applicable)
    tp = sum(truth == 1 and ai == 1 for truth, ai in applicable)
    fp = sum(truth == 0 and ai == 1 for truth, ai in applicable)
    fn = sum(truth == 1 and ai == 0 for truth, ai in applicable)
    truth_counts = Counter(truth for truth, _ in applicable)
    majority_class = max((0, 1), key=lambda label: truth_counts[label]) if n else None
    return {
        "n_truth": len(pairs),
        "n": n,
        "accuracy": _ratio(sum(truth == ai for truth, ai in applicable), n),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),      # = harmonic mean of precision and recall where both exist
        "majority_class": majority_class,
        "majority_accuracy": _ratio(truth_counts[majority_class], n) if n else None,
        "confusion": confusion if pairs else None,
    }


def label_agreement(records):
    """Per fact type, AI labels vs ground-truth labels of the sub-sentences that have gt_labels and AI labels:
    n / accuracy / precision / recall / F1 of the hallucination class (1) / majority-class baseline accuracy over
    the sub-sentences where both labels are applicable (!= -1); `confusion` (3x3, rows = truth, cols = AI, order
    -1, 0, 1) over all sub-sentences with gt_labels. Undefined values (nothing to divide by) are None."""
    pairs = {fact_type: [] for fact_type in FACT_TYPES}
    for sub in _subsentences(records):
        if sub.get("gt_labels") is None or None in sub["labels"]:
            continue
        for i, fact_type in enumerate(FACT_TYPES):
            pairs[fact_type].append((sub["gt_labels"][i], sub["labels"][i]))
    return {fact_type: _type_agreement(pairs[fact_type]) for fact_type in FACT_TYPES}


def fact_agreement(facts):
    """Per fact type: n facts, n judged (verdict and truth both not null), accuracy of verdict vs truth over
    the judged ones, and the share of all facts the verifier answered "unknown"."""
    by_type = {fact_type: [] for fact_type in FACT_TYPES}
    for fact in facts:
        by_type[_check_fact_record(fact)["fact"]["type"]].append(fact)
    result = {}
    for fact_type, group in by_type.items():
        judged = [f for f in group if f["verdict"] is not None and f["truth"] is not None]
        result[fact_type] = {
            "n_facts": len(group),
            "n_judged": len(judged),
            "accuracy": _ratio(sum(f["verdict"] == f["truth"] for f in judged), len(judged)),
            "unknown_share": _ratio(sum(f["answer"] == "unknown" for f in group), len(group)),
        }
    return result


def label_distribution(records):
    """Per fact type: {"ai": {-1: n, 0: n, 1: n}, "gt": same or None when no sub-sentence has gt_labels}, both over
    the sub-sentences with an AI label (a failed call leaves none; its truth is still known, and left out too)."""
    subs = list(_subsentences(records))
    with_truth = [sub for sub in subs if sub.get("gt_labels") is not None]
    dist = {}
    for i, fact_type in enumerate(FACT_TYPES):
        ai = Counter(sub["labels"][i] for sub in subs)
        gt = Counter(sub["gt_labels"][i] for sub in with_truth if sub["labels"][i] is not None)
        dist[fact_type] = {"ai": {label: ai[label] for label in LABELS},
                           "gt": {label: gt[label] for label in LABELS} if with_truth else None}
    return dist


# ---------------------------------------------------------------------------------------------- figures

def _fmt(value, digits=2):
    return "–" if value is None else f"{value:.{digits}f}"


def _confusion_axes(ax, fact_type, metrics):
    tick_names = [LABEL_NAMES[label] for label in LABELS]
    if metrics["confusion"] is None:
        ax.set_axis_off()
        ax.text(0.5, 0.5, f"{fact_type}: no ground truth", ha="center", va="center", transform=ax.transAxes)
        return
    counts = np.array(metrics["confusion"])
    ax.imshow(counts, cmap="Blues")
    for row in range(3):
        for col in range(3):
            dark = counts[row, col] > counts.max() / 2
            ax.text(col, row, str(counts[row, col]), ha="center", va="center",
                    color="white" if dark else "black", fontsize=10)
    ax.set_xticks(range(3), tick_names)
    ax.set_yticks(range(3), tick_names)
    ax.set_xlabel("AI label")
    ax.set_ylabel("ground truth")
    ax.set_title(f"{fact_type}\nacc {_fmt(metrics['accuracy'])} (majority {_fmt(metrics['majority_accuracy'])}), "
                 f"F1 {_fmt(metrics['f1'])}", fontsize=9)


def agreement_figure(agreement):
    """The three confusion matrices of label_agreement(...), counts written in the cells."""
    fig = Figure(figsize=(12, 4))
    for ax, fact_type in zip(fig.subplots(1, len(FACT_TYPES)), FACT_TYPES):
        _confusion_axes(ax, fact_type, agreement[fact_type])
    fig.tight_layout()
    return fig


LABEL_COLOURS = {-1: "lightgray", 0: "tab:green", 1: "tab:red"}


def distribution_figure(dist):
    """Grouped bars of label_distribution(...): per fact type, the count of each label, AI solid, GT hatched."""
    fig = Figure(figsize=(8, 3.5))
    ax = fig.subplots()
    sources = ["ai"] + (["gt"] if any(dist[t]["gt"] is not None for t in FACT_TYPES) else [])
    width = 0.8 / (len(LABELS) * len(sources))
    xs = np.arange(len(FACT_TYPES))
    for j, label in enumerate(LABELS):
        for s, source in enumerate(sources):
            offset = (j * len(sources) + s + 0.5) * width - 0.4
            counts = [(dist[t][source] or {}).get(label, 0) for t in FACT_TYPES]
            ax.bar(xs + offset, counts, width, color=LABEL_COLOURS[label], edgecolor="black", linewidth=0.5,
                   hatch="//" if source == "gt" else None, label=f"{LABEL_NAMES[label]} ({source.upper()})")
    ax.set_xticks(xs, FACT_TYPES)
    ax.set_ylabel("sub-sentences")
    ax.set_title("labels per fact type")
    ax.legend(fontsize=7, ncol=len(LABELS))
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------- HTML

CSS = """
body { font-family: sans-serif; font-size: 14px; margin: 20px; color: #222; }
table.metrics { border-collapse: collapse; margin: 6px 0 16px; }
table.metrics td, table.metrics th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
.response { border: 1px solid #ccc; border-radius: 6px; padding: 10px; margin: 12px 0; display: flex; gap: 14px; }
.response.disagrees { border-color: #c00; border-width: 2px; }
.response img { width: 128px; height: auto; image-rendering: pixelated; flex: none; align-self: flex-start; }
.meta { color: #666; font-size: 12px; margin-bottom: 6px; }
.sub { margin: 4px 0 8px; }
.ss { padding: 1px 3px; border-radius: 3px; }
.ss.halluc { background: #f8c4c4; } .ss.correct { background: #c8ecc8; } .ss.na { background: #e4e4e4; }
.badge { font-size: 11px; font-family: monospace; border-radius: 3px; padding: 0 4px; margin-left: 3px;
         border: 1px solid #999; }
.badge.l1 { background: #f8c4c4; } .badge.l0 { background: #c8ecc8; } .badge.l-1 { background: #eee; color: #888; }
.badge.mismatch { border: 2px solid #c00; font-weight: bold; }
ul.facts { margin: 2px 0 0 18px; padding: 0; font-size: 12px; color: #444; }
.wrong { color: #c00; font-weight: bold; }
"""


def _sub_class(labels):
    """CSS class of a sub-sentence: halluc. if any type is 1, correct if some are 0 (none 1), n/a otherwise."""
    if 1 in labels:
        return "halluc"
    return "correct" if 0 in labels else "na"


def _verdict_wrong(fact):
    return fact["verdict"] is not None and fact["truth"] is not None and fact["verdict"] != fact["truth"]


def _label_mismatch(sub):
    """An AI label that differs from the truth (a failed call's missing label is no disagreement)."""
    gt = sub.get("gt_labels")
    return gt is not None and any(label is not None and label != truth for label, truth in zip(sub["labels"], gt))


def _record_facts(record, facts_by_id):
    """The fact records of each sub-sentence of a record (lists parallel to record["subsentences"])."""
    per_sub = []
    for k, sub in enumerate(record["subsentences"]):
        missing = [fid for fid in sub["fact_ids"] if fid not in facts_by_id]
        if missing:
            raise ValueError(f"fg_labels record {record['response_id']!r}, sub-sentence {k}: fact ids {missing} "
                             f"are not in the facts records")
        per_sub.append([facts_by_id[fid] for fid in sub["fact_ids"]])
    return per_sub


def _disagrees(record, facts_by_id):
    return any(_label_mismatch(sub) or any(_verdict_wrong(facts_by_id[fid]) for fid in sub["fact_ids"])
               for sub in record["subsentences"])


def _metrics_tables(records, facts):
    """Header tables: label distribution, sub-sentence label agreement, fact verdict agreement."""
    dist, agreement, fact_agree = label_distribution(records), label_agreement(records), fact_agreement(facts)
    rows = []
    for t in FACT_TYPES:
        ai = " / ".join(str(dist[t]["ai"][label]) for label in LABELS)
        gt = " / ".join(str(dist[t]["gt"][label]) for label in LABELS) if dist[t]["gt"] else "–"
        rows.append(f"<tr><th>{t}</th><td>{ai}</td><td>{gt}</td></tr>")
    parts = ["<h2>Label distribution (n/a / correct / halluc.)</h2><table class='metrics'>"
             "<tr><th></th><th>AI</th><th>ground truth</th></tr>" + "".join(rows) + "</table>"]
    rows = [f"<tr><th>{t}</th><td>{a['n']}</td><td>{_fmt(a['accuracy'])}</td><td>{_fmt(a['majority_accuracy'])}</td>"
            f"<td>{_fmt(a['precision'])}</td><td>{_fmt(a['recall'])}</td><td>{_fmt(a['f1'])}</td></tr>"
            for t, a in agreement.items()]
    parts.append("<h2>AI labels vs ground truth (sub-sentences where both apply)</h2><table class='metrics'>"
                 "<tr><th></th><th>n</th><th>accuracy</th><th>majority baseline</th><th>precision (halluc.)</th>"
                 "<th>recall (halluc.)</th><th>F1 (halluc.)</th></tr>" + "".join(rows) + "</table>")
    rows = [f"<tr><th>{t}</th><td>{a['n_facts']}</td><td>{a['n_judged']}</td><td>{_fmt(a['accuracy'])}</td>"
            f"<td>{_fmt(a['unknown_share'])}</td></tr>" for t, a in fact_agree.items()]
    parts.append("<h2>Verifier verdicts vs truth (facts)</h2><table class='metrics'>"
                 "<tr><th></th><th>facts</th><th>judged</th><th>accuracy</th><th>answered unknown</th></tr>"
                 + "".join(rows) + "</table>")
    return "\n".join(parts)


def _image_html(record, image_loader):
    """An <img> with the image as an inline base64 PNG, or "" when there is no loader or it returns None."""
    image = image_loader(record) if image_loader else None
    if image is None:
        return ""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image_loader returned {image.dtype} {image.shape} for response "
                         f"{record['response_id']!r}; expected uint8 (H, W, 3)")
    return image_tag(image, alt=f"image {record.get('image_id')}")


def image_tag(image, alt=None, style=None):
    """An <img> holding a uint8 (H, W, 3) image inline (image_data_url); alt and style escaped when given."""
    attributes = "".join(f' {name}="{html.escape(value, quote=True)}"'
                         for name, value in (("alt", alt), ("style", style)) if value is not None)
    return f'<img src="{image_data_url(np.asarray(image))}"{attributes}>'


def image_data_url(image, max_side=THUMBNAIL_SIDE):
    """An inline image for a self-contained page: a PNG of small images (the synthetic world's, pixel for pixel), a
    JPEG thumbnail of at most `max_side` pixels of larger ones (a 640 x 480 COCO PNG is about 0.5 MB; pages show 150)."""
    buffer = io.BytesIO()
    if max(image.shape[:2]) <= max_side:
        imsave(buffer, image, format="png")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    from PIL import Image
    thumbnail = Image.fromarray(np.ascontiguousarray(image))
    thumbnail.thumbnail((max_side, max_side))
    thumbnail.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _badges(sub):
    """O/A/R badges with each AI label; where the truth differs, a mismatch marker that shows the truth."""
    gt = sub.get("gt_labels")
    badges = []
    for i, fact_type in enumerate(FACT_TYPES):
        label = sub["labels"][i]
        text = f"{TYPE_LETTERS[fact_type]} {LABEL_NAMES[label]}"
        classes = f"badge l{label}"
        if gt is not None and label is not None and gt[i] != label:
            text += f" ✗ truth: {LABEL_NAMES[gt[i]]}"
            classes += " mismatch"
        badges.append(f'<span class="{classes}" title="{fact_type}">{html.escape(text)}</span>')
    return "".join(badges)


def _truth_text(value):
    return {True: "true", False: "false", None: "–"}[value]


def _fact_line(fact):
    """One fact as plain (unescaped) text: reading, question, answer, verdict, truth."""
    return (f"[{fact['fact']['type']}] {describe_fact(fact['fact'])} — Q: {fact.get('question', '')} "
            f"— A: {fact['answer']} — verdict {_truth_text(fact['verdict'])}, truth {_truth_text(fact['truth'])}"
            + (f" — not counted: {fact['gated_by']} judged absent" if fact.get("gated_by") else ""))


def _fact_items(sub_facts):
    items = []
    for fact in sub_facts:
        mark = ' <span class="wrong">✗ verdict ≠ truth</span>' if _verdict_wrong(fact) else ""
        items.append(f"<li>{html.escape(_fact_line(fact))}{mark}</li>")
    return f'<ul class="facts">{"".join(items)}</ul>' if items else ""


def _subsentence_html(sub, sub_facts):
    hover = "\n".join(_fact_line(fact) for fact in sub_facts) or "no facts"
    return (f'<div class="sub"><span class="ss {_sub_class(sub["labels"])}" title="{html.escape(hover)}">'
            f'{html.escape(sub["text"])}</span>{_badges(sub)}{_fact_items(sub_facts)}</div>')


def _record_html(record, facts_by_id, image_loader):
    per_sub = _record_facts(record, facts_by_id)
    disagrees = " disagrees" if _disagrees(record, facts_by_id) else ""
    meta = (f"response {record['response_id']} · image {record.get('image_id')} · {record.get('file_name', '')}"
            + (" · disagreement" if disagrees else ""))
    subs = "".join(_subsentence_html(sub, sub_facts) for sub, sub_facts in zip(record["subsentences"], per_sub))
    return (f'<div class="response{disagrees}">{_image_html(record, image_loader)}'
            f'<div><div class="meta">{html.escape(meta)}</div>{subs}</div></div>')


def labels_report_html(records, facts, image_loader=None, title="AI feedback", max_records=200,
                       disagreements_first=True):
    """One self-contained HTML page (inline CSS, inline images, no scripts): metrics tables for all records, then
    up to max_records responses (those where a label or a verdict disagrees with the truth first, if asked),
    each sub-sentence coloured by its AI labels with O/A/R badges and its facts listed beneath and on hover.
    image_loader(record) -> uint8 (H, W, 3) array or None."""
    records = [_check_record(record) for record in records]
    facts = [_check_fact_record(fact) for fact in facts]
    facts_by_id = {fact["fact_id"]: fact for fact in facts}
    for record in records:
        _record_facts(record, facts_by_id)       # fail early, naming the record, on a dangling fact id
    shown = sorted(records, key=lambda r: not _disagrees(r, facts_by_id)) if disagreements_first else records
    shown = shown[:max_records]
    n_subs = sum(len(record["subsentences"]) for record in records)
    summary = (f"{len(records)} responses, {n_subs} sub-sentences, {len(facts)} facts; showing {len(shown)}"
               + (", disagreements first" if disagreements_first else ""))
    body = "\n".join(_record_html(record, facts_by_id, image_loader) for record in shown)
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n<h1>{html.escape(title)}</h1><p>{html.escape(summary)}</p>\n"
            f"{_metrics_tables(records, facts)}\n<h2>Responses</h2>\n{body}\n</body></html>\n")


# ---------------------------------------------------------------------------------------------- in a notebook

VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


def _css_rules(css):
    """[(selector as [(tag or None, {classes})], declarations)] of a style sheet of simple selectors: an optional
    tag and classes, combined by descendance (`table.metrics td`), comma lists split."""
    rules = []
    for selectors, declarations in re.findall(r"([^{}]+)\{([^{}]*)\}", re.sub(r"/\*.*?\*/", "", css, flags=re.S)):
        declarations = " ".join(declarations.split()).strip().rstrip(";")
        for selector in selectors.split(","):
            compounds = []
            for compound in selector.split():
                tag, *classes = compound.split(".")
                compounds.append((tag or None, set(classes)))
            rules.append((compounds, declarations))
    return rules


def _matches(compound, element):
    tag, classes = compound
    return (tag is None or tag == element[0]) and classes <= element[1]


def _selects(compounds, element, ancestors):
    """Does a descendant selector pick `element` (tag, classes) under `ancestors` (outermost first)?"""
    if not _matches(compounds[-1], element):
        return False
    wanted = list(compounds[:-1])
    for ancestor in reversed(ancestors):
        if wanted and _matches(wanted[-1], ancestor):
            wanted.pop()
    return not wanted


class _StyleInliner(HTMLParser):
    """Re-writes a page's body with every style rule copied into the style attributes of the elements it selects;
    text and attribute values are escaped again on the way out."""

    def __init__(self, rules):
        super().__init__(convert_charrefs=True)
        self.rules, self.out, self.ancestors, self.in_body = rules, [], [], False

    def handle_starttag(self, tag, attrs):
        if tag == "body" or not self.in_body:
            self.in_body = self.in_body or tag == "body"
            return
        attrs = dict(attrs)
        element = (tag, set((attrs.get("class") or "").split()))
        styles = [d for compounds, d in self.rules if d and _selects(compounds, element, self.ancestors)]
        if attrs.get("style"):
            styles.append(attrs["style"].strip().rstrip(";"))   # its own style comes last: it wins
        if styles:
            attrs["style"] = "; ".join(styles)
        text = "".join(f' {name}="{html.escape(value or "", quote=True)}"' for name, value in attrs.items())
        self.out.append(f"<{tag}{text}>")
        if tag not in VOID_TAGS:
            self.ancestors.append(element)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID_TAGS:
            self.handle_endtag(tag)

    def handle_endtag(self, tag):
        if tag == "body":
            self.in_body = False
        if not self.in_body or tag in VOID_TAGS:
            return
        if self.ancestors:
            self.ancestors.pop()
        self.out.append(f"</{tag}>")

    def handle_data(self, data):
        if self.in_body:
            self.out.append(html.escape(data, quote=False))


def notebook_view(page):
    """One of this project's self-contained pages as a fragment for a notebook's output: its <style> rules copied
    into style attributes, <head> dropped. JupyterLab removes <style> blocks from a notebook it does not trust (an
    executed copy opened later: the colours were gone) and applies them to the whole application in one it does
    (a `body` rule restyled JupyterLab); style attributes work in both. The `body` rules style a wrapping <div>."""
    css = "\n".join(re.findall(r"<style[^>]*>(.*?)</style>", page, flags=re.S | re.I))
    rules = _css_rules(css)
    wrapper = "; ".join(d for compounds, d in rules if compounds == [("body", set())] and d)
    inliner = _StyleInliner([(c, d) for c, d in rules if c != [("body", set())]])
    inliner.feed(page if re.search(r"<body[\s>]", page, flags=re.I) else f"<body>{page}</body>")
    inliner.close()
    return f'<div style="{html.escape(wrapper, quote=True)}">{"".join(inliner.out)}</div>'

