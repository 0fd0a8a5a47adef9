"""The AI-feedback report on hand-built records: every metric computed by hand, the HTML escapes everything it
got from a record, embeds the image and marks disagreements, the figures draw what they are given."""
import base64
import io
import re

import numpy as np
import pytest
from matplotlib.image import imread

from fgaif_utils import report
from fgaif_utils.report import (agreement_figure, distribution_figure, fact_agreement, label_agreement,
                                label_distribution, labels_report_html, notebook_view)

# (truth, AI) label pairs per type, one pair per sub-sentence; the types are zipped into sub-sentences below.
OBJECT_PAIRS = ([(1, 1)] * 2 + [(0, 1)] + [(1, 0)] * 2 + [(0, 0)] * 4     # applicable: tp 2, fp 1, fn 2, tn 4
                + [(0, -1), (-1, 1), (-1, -1), (-1, -1)])                 # n/a on one side or both
ATTRIBUTE_PAIRS = [(0, 1), (0, 0), (0, 0)] + [(-1, -1)] * 10              # tp 0, fp 1, tn 2
RELATION_PAIRS = [(-1, 1), (1, -1)] + [(-1, -1)] * 11                     # nothing applicable on both sides


def subsentence(truth, ai, text="a heart .", fact_ids=()):
    return {"text": text, "span": [0, len(text)], "last_token": 0, "labels": list(ai), "gt_labels": truth,
            "fact_ids": list(fact_ids)}


def record(response_id, subsentences, text=None):
    text = text if text is not None else " ".join(sub["text"] for sub in subsentences)
    return {"response_id": response_id, "image_id": int(response_id.split("-")[0]),
            "file_name": f"images/feedback/{response_id}.png", "text": text, "token_ids": [],
            "subsentences": subsentences}


def metrics_records():
    subs = [subsentence([o[0], a[0], r[0]], [o[1], a[1], r[1]])
            for o, a, r in zip(OBJECT_PAIRS, ATTRIBUTE_PAIRS, RELATION_PAIRS)]
    no_truth = subsentence(None, [1, 1, 1])          # no gt: left out of every agreement number
    return [record("1-0", subs[:7]), record("2-0", subs[7:] + [no_truth])]


def fact(fact_id, fact_dict, answer, verdict, truth, question="is there a heart?"):
    return {"fact_id": fact_id, "response_id": fact_id.rsplit("-", 2)[0], "image_id": int(fact_id.split("-")[0]),
            "subsentence": int(fact_id.split("-")[2]), "fact": fact_dict, "question": question, "answer": answer,
            "verdict": verdict, "truth": truth}


HEART = {"type": "object", "subject": "heart", "negated": False}
RED_HEART = {"type": "attribute", "subject": "heart", "kind": "colour", "value": "red"}
HEART_LEFT_OF_STAR = {"type": "relation", "subject": "heart", "relation": "left", "object": "star"}


def test_untrusted_text_stays_in_its_markdown_cell():
    assert report.markdown_cell("is there a dog\nin the image? a|b c\\d <b>") == \
        "is there a dog in the image? a\\|b c\\\\d &lt;b&gt;"
    # Markdown's own syntax stays text: no remote image fetched on render, no live link, no MathJax
    assert report.markdown_cell("![t](https://x.example/p.png) [x](javascript:alert(1)) $x^2$ `c` *e* #") == \
        "\\!\\[t\\]\\(https://x.example/p.png\\) \\[x\\]\\(javascript:alert\\(1\\)\\) \\$x^2\\$ " \
        "\\`c\\` \\*e\\* \\#"
    assert report.markdown_code("a`b<img src=x onerror=alert(1)>") == \
        "<code>a\\`b&lt;img src=x onerror=alert\\(1\\)&gt;</code>"


def test_label_agreement_by_hand():
    agreement = label_agreement(metrics_records())
    obj = agreement["object"]
    assert obj["n_truth"] == 13 and obj["n"] == 9
    assert obj["accuracy"] == pytest.approx(6 / 9)            # tp 2 + tn 4
    assert obj["precision"] == pytest.approx(2 / 3)           # 2 / (2 + 1)
    assert obj["recall"] == pytest.approx(2 / 4)              # 2 / (2 + 2)
    assert obj["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert obj["majority_class"] == 0 and obj["majority_accuracy"] == pytest.approx(5 / 9)
    assert obj["confusion"] == [[2, 0, 1],                    # truth n/a:     AI n/a, correct, halluc.
                                [1, 4, 1],                    # truth correct
                                [0, 2, 2]]                    # truth halluc.

    att = agreement["attribute"]
    assert att["n"] == 3 and att["accuracy"] == pytest.approx(2 / 3)
    assert att["precision"] == 0.0 and att["recall"] is None  # no true hallucination: recall undefined
    assert att["f1"] == 0.0
    assert att["majority_accuracy"] == 1.0                    # always "correct" beats the AI here
    assert att["confusion"] == [[10, 0, 0], [0, 2, 1], [0, 0, 0]]

    rel = agreement["relation"]
    assert rel["n"] == 0
    assert all(rel[key] is None for key in ("accuracy", "precision", "recall", "f1", "majority_class",
                                            "majority_accuracy"))
    assert rel["confusion"] == [[11, 0, 1], [0, 0, 0], [1, 0, 0]]


def test_label_agreement_all_correct_and_without_truth():
    agreement = label_agreement([record("3-0", [subsentence([0, -1, -1], [0, -1, -1])] * 2)])
    assert agreement["object"]["accuracy"] == 1.0
    assert (agreement["object"]["precision"], agreement["object"]["recall"], agreement["object"]["f1"]) == \
        (None, None, None)
    no_truth = label_agreement([record("4-0", [subsentence(None, [1, 0, -1])])])
    for fact_type in ("object", "attribute", "relation"):
        assert no_truth[fact_type]["n_truth"] == 0 and no_truth[fact_type]["confusion"] is None
        assert no_truth[fact_type]["accuracy"] is None


def test_label_distribution_by_hand():
    records = [record("5-0", [subsentence([1, -1, -1], [1, 0, -1]), subsentence([0, -1, 1], [0, -1, -1])]),
               record("6-0", [subsentence(None, [1, 1, -1])])]
    dist = label_distribution(records)
    assert dist["object"] == {"ai": {-1: 0, 0: 1, 1: 2}, "gt": {-1: 0, 0: 1, 1: 1}}
    assert dist["attribute"] == {"ai": {-1: 1, 0: 1, 1: 1}, "gt": {-1: 2, 0: 0, 1: 0}}
    assert dist["relation"] == {"ai": {-1: 3, 0: 0, 1: 0}, "gt": {-1: 1, 0: 0, 1: 1}}
    assert label_distribution([records[1]])["object"]["gt"] is None


def test_fact_agreement_by_hand():
    facts = [fact("1-0-0-0", HEART, "yes", True, True),
             fact("1-0-0-1", HEART, "no", False, True),          # verifier wrong
             fact("1-0-0-2", HEART, "unknown", None, True),      # not judged, unknown answer
             fact("1-0-0-3", HEART, "yes", True, None),          # no truth (real world)
             fact("1-0-0-4", RED_HEART, "no", False, False)]
    agreement = fact_agreement(facts)
    assert agreement["object"] == {"n_facts": 4, "n_judged": 2, "accuracy": 0.5, "unknown_share": 0.25}
    assert agreement["attribute"] == {"n_facts": 1, "n_judged": 1, "accuracy": 1.0, "unknown_share": 0.0}
    assert agreement["relation"] == {"n_facts": 0, "n_judged": 0, "accuracy": None, "unknown_share": None}


def test_bad_records_name_the_culprit():
    with pytest.raises(ValueError, match="'7-0'.*sub-sentence 0"):
        label_agreement([record("7-0", [subsentence([0, 0, 0], [0, 2, 0])])])
    with pytest.raises(ValueError, match="'7-0'.*gt_labels"):
        label_agreement([record("7-0", [subsentence([0, 0], [0, 0, 0])])])
    with pytest.raises(ValueError, match="9-0-0-0"):
        fact_agreement([fact("9-0-0-0", {"type": "colour"}, "yes", True, True)])


# ---------------------------------------------------------------------------------------------- HTML

EVIL_TEXT = "<script>alert(1)</script> a heart ."
EVIL_SUBJECT = '"><img src=x>'


def html_case():
    """An agreeing response, then one with an injected text, a label mismatch and a wrong verdict."""
    clean = record("10-0", [subsentence([0, -1, -1], [0, -1, -1], "a blue heart .", ["10-0-0-0"])])
    evil = record("11-0", [subsentence([1, 0, -1], [0, 0, -1], EVIL_TEXT, ["11-0-0-0", "11-0-0-1"]),
                           subsentence([-1, -1, 0], [-1, -1, 0], "left of a star .", ["11-0-1-0"])])
    evil["file_name"] = "images/<b>evil</b>.png"
    facts = [fact("10-0-0-0", HEART, "yes", True, True),
             fact("11-0-0-0", dict(HEART, subject=EVIL_SUBJECT), "yes", True, False, question="is there <i>?"),
             fact("11-0-0-1", RED_HEART, "yes", True, True),
             fact("11-0-1-0", HEART_LEFT_OF_STAR, "yes", True, True)]
    return [clean, evil], facts


def test_html_escapes_everything_from_records():
    records, facts = html_case()
    page = labels_report_html(records, facts, title="<u>feedback</u>")
    assert "<script" not in page.lower()                       # neither the injected one nor any of our own
    assert "&lt;script&gt;alert(1)&lt;/script&gt; a heart ." in page
    assert "<img src=x" not in page and '"><img' not in page
    assert "&quot;&gt;&lt;img src=x&gt; exists" in page       # describe_fact of the evil subject, escaped
    assert "is there &lt;i&gt;?" in page and "<i>" not in page
    assert "images/&lt;b&gt;evil&lt;/b&gt;.png" in page and "<b>evil" not in page
    assert "&lt;u&gt;feedback&lt;/u&gt;" in page and "<u>" not in page
    assert "a blue heart ." in page and "left of a star ." in page


def test_notebook_view_moves_the_style_sheet_into_style_attributes_and_stays_escaped():
    """JupyterLab drops <style> in an untrusted notebook and applies it to the whole app in a trusted one."""
    records, facts = html_case()
    view = notebook_view(labels_report_html(records, facts, title="<u>feedback</u>"))
    assert "<style" not in view and "<title" not in view and "<head" not in view and "<body" not in view
    assert view.startswith('<div style="font-family: sans-serif; font-size: 14px; margin: 20px; color: #222">')
    # the response with the label mismatch: its box red (.response then .response.disagrees, in the sheet's order)
    assert re.search(r'<div class="response disagrees" style="[^"]*border: 1px solid #ccc[^"]*'
                     r'border-color: #c00; border-width: 2px"', view)
    # the injected text stays text, on a green sub-sentence (AI labels say correct)
    assert re.search(r'<span class="ss correct" title="[^"]*" style="padding: 1px 3px; border-radius: 3px; '
                     r'background: #c8ecc8">&lt;script&gt;alert\(1\)&lt;/script&gt; a heart \.</span>', view)
    assert "<script" not in view.lower() and "<u>" not in view and "&lt;u&gt;feedback&lt;/u&gt;" in view
    # a descendant rule reaches the cells of the metrics tables only
    assert re.search(r'<td style="border: 1px solid #ccc; padding: 2px 8px; text-align: right">', view)
    assert view.count("<td") == view.count('<td style="border: 1px solid #ccc')


def test_notebook_view_keeps_an_elements_own_style_last_and_handles_void_tags():
    page = ("<html><head><style>.a { color: red } span.a.b { color: blue } p img { width: 5px }</style></head><body>"
            "<p><img src='x?a=1&amp;b=2'><span class='a b' style='color: green'>x &amp; y</span><br/>"
            "<span class='a'>z</span></p></body></html>")
    assert notebook_view(page) == ('<div style=""><p><img src="x?a=1&amp;b=2" style="width: 5px">'
                                   '<span class="a b" style="color: red; color: blue; color: green">x &amp; y</span>'
                                   '<br><span class="a" style="color: red">z</span></p></div>')


def test_html_marks_disagreements_first():
    records, facts = html_case()
    page = labels_report_html(records, facts)
    # the evil record disagrees (object label 0 vs truth 1, and a verdict true vs truth false), so it comes first
    assert page.index("response 11-0") < page.index("response 10-0")
    assert page.count('class="badge l0 mismatch"') == 1 and "O correct ✗ truth: halluc." in page
    assert page.count("✗ verdict ≠ truth") == 1
    assert page.count('class="response disagrees"') == 1
    in_order = labels_report_html(records, facts, disagreements_first=False)
    assert in_order.index("response 10-0") < in_order.index("response 11-0")
    only_first = labels_report_html(records, facts, max_records=1)
    assert "response 11-0" in only_first and "response 10-0" not in only_first
    # the header counts every record, not only those shown
    assert "2 responses, 3 sub-sentences, 4 facts; showing 1" in only_first


def test_html_facts_on_hover_and_beneath():
    records, facts = html_case()
    page = labels_report_html(records, facts)
    line = "[relation] heart left of star — Q: is there a heart? — A: yes — verdict true, truth true"
    assert f'title="{line}"' in page                           # the only fact of that sub-sentence: the hover text
    assert f"<li>{line}</li>" in page


def test_html_embeds_the_image():
    pixels = np.zeros((4, 6, 3), np.uint8)
    pixels[1, 2] = (255, 0, 0)
    records, facts = html_case()
    page = labels_report_html(records, facts, image_loader=lambda r: pixels if r["response_id"] == "10-0" else None)
    encoded = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(encoded) == 1
    decoded = imread(io.BytesIO(base64.b64decode(encoded[0])), format="png")
    assert np.array_equal((decoded[..., :3] * 255).round().astype(np.uint8), pixels)
    assert "image-rendering: pixelated" in page
    with pytest.raises(ValueError, match="11-0"):   # shown first: it disagrees
        labels_report_html(records, facts, image_loader=lambda r: np.zeros((4, 4), np.float32))


def test_html_dangling_fact_id_is_an_error():
    records, facts = html_case()
    with pytest.raises(ValueError, match="'11-0'.*11-0-1-0"):
        labels_report_html(records, facts[:-1])


# ---------------------------------------------------------------------------------------------- figures

def test_figures_draw_the_numbers():
    agreement = label_agreement(metrics_records())
    fig = agreement_figure(agreement)
    for ax, fact_type in zip(fig.axes, ("object", "attribute", "relation")):
        assert [int(t.get_text()) for t in ax.texts] == sum(agreement[fact_type]["confusion"], [])
        assert ax.get_xlabel() == "AI label" and ax.get_ylabel() == "ground truth"
        assert [t.get_text() for t in ax.get_xticklabels()] == ["n/a", "correct", "halluc."]
    fig.savefig(io.BytesIO(), format="png")

    no_truth = agreement_figure(label_agreement([record("4-0", [subsentence(None, [1, 0, -1])])]))
    no_truth.savefig(io.BytesIO(), format="png")

    dist = label_distribution(metrics_records())
    fig = distribution_figure(dist)
    heights = sorted(int(p.get_height()) for p in fig.axes[0].patches)
    expected = sorted(n for t in dist.values() for source in ("ai", "gt") for n in t[source].values())
    assert heights == expected
    fig.savefig(io.BytesIO(), format="png")


def test_small_images_embed_as_lossless_png_and_large_ones_as_jpeg_thumbnails():
    from PIL import Image
    from fgaif_utils.report import THUMBNAIL_SIDE, image_data_url
    small = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    url = image_data_url(small)
    assert url.startswith("data:image/png;base64,")
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
    np.testing.assert_array_equal(decoded, small)
    coco_sized = np.zeros((480, 640, 3), np.uint8)
    coco_sized[:, :320] = (200, 30, 30)                   # left half red
    url = image_data_url(coco_sized)
    assert url.startswith("data:image/jpeg;base64,")
    thumbnail = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    assert thumbnail.shape == (THUMBNAIL_SIDE * 3 // 4, THUMBNAIL_SIDE, 3)
    assert abs(int(thumbnail[100, 40, 0]) - 200) < 8 and thumbnail[100, 280].max() < 8


def test_unlabelled_sub_sentences_are_shown_and_left_out_of_the_agreement():
    """A failure leaves a sub-sentence with labels [None] * 3 (feedback.label_records): the report shows it as
    "no label" and never as a disagreement, the agreement and the distribution leave it out (its truth too), and the
    reward models' page measures the reward model against the truth there."""
    from fgaif_utils import reward_viz
    # stage 03 still writes the truth of a failed sub-sentence (the scene is known): n/a here
    failed = dict(subsentence([-1, -1, -1], [None, None, None]), label_error="fact extraction failed: bad JSON")
    records = [record("7-0", [subsentence([1, -1, -1], [1, -1, -1]), failed])]
    assert label_agreement(records)["object"]["n_truth"] == 1
    assert label_distribution(records)["object"] == {"ai": {-1: 0, 0: 0, 1: 1}, "gt": {-1: 0, 0: 0, 1: 1}}
    page = labels_report_html(records, [])
    assert "no label" in page
    assert " mismatch\"" not in page and "response disagrees" not in page   # a missing label is no disagreement
    scores = [{"labels": np.array([[1, -1, -1], [1, -1, -1]]), "probs": np.full((2, 3, 3), 1 / 3)}]
    scored = reward_viz.scored_examples_html(records, scores, ["object", "attribute", "relation"])
    # against the truth the reward model's object "hallucinated" on the failed one (truth n/a) is the one miss
    assert "AI no label" in scored and scored.count(" wrong") == 1


def test_reward_models_that_do_not_beat_a_constant_guess_are_named():
    from fgaif_utils import reward_viz

    def entry(f1, accuracy, always_f1, majority):
        return {"f1": f1, "applicable_accuracy": accuracy}, {"always_hallucinated_f1": always_f1,
                                                             "majority_accuracy": majority}
    evaluation = {}
    for fact_type, ai, gt in (("object", entry(0.78, 0.80, 0.64, 0.53), entry(0.70, 0.73, 0.62, 0.55)),
                              ("relation", entry(0.56, 0.60, 0.69, 0.52), entry(0.56, 0.47, 0.69, 0.53)),
                              ("attribute", entry(None, None, None, None), entry(0.50, 0.70, 0.50, 0.65))):
        evaluation[fact_type] = {"ai": ai[0], "baseline_ai": ai[1], "gt": gt[0], "baseline_gt": gt[1]}
    assert reward_viz.below_baselines(evaluation) == [
        "the relation reward model does not beat a constant guess against the AI labels: "
        "halluc. F1 0.560 <= 0.690 (always hallucinated)",
        "the relation reward model does not beat a constant guess against the ground truth: "
        "halluc. F1 0.560 <= 0.690 (always hallucinated); accuracy where judged 0.470 <= 0.530 (majority class)",
        "the attribute reward model does not beat a constant guess against the ground truth: "
        "halluc. F1 0.500 <= 0.500 (always hallucinated)"]
    # a reference with nothing hallucinated: no F1 can beat the constant's 0, so no alarm on F1 (accuracy still counts)
    nothing = entry(0.0, 0.90, 0.0, 0.95)
    assert reward_viz.below_baselines({"object": {"ai": nothing[0], "baseline_ai": nothing[1]}}) == [
        "the object reward model does not beat a constant guess against the AI labels: "
        "accuracy where judged 0.900 <= 0.950 (majority class)"]


def test_before_after_page_embeds_the_images_and_escapes_the_descriptions():
    from fgaif_utils import ppo_viz
    scene = {"image_id": 5, "objects": [{"shape": "circle", "colour": "red", "size": "large", "cx": 10, "cy": 10}],
             "relations": []}
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    page = ppo_viz.before_after_html([scene], ["a large red circle . <script>x</script>"], ["a large red circle ."],
                                     [image])
    assert page.count('<img src="data:image/png;base64,') == 1 and 'alt="image 5"' in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "large red circle" in page and "<td>large red circle</td>" in page    # the truth column
    assert ppo_viz.before_after_html([scene], ["a ."], ["a ."]).count("<img") == 0   # no images: the id
