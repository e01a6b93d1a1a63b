"""The HTML report renders without missing images: every <img> is an inline PNG that decodes (no chromium)."""
from __future__ import annotations

import base64
import io
from html.parser import HTMLParser

from matplotlib.image import imread

from harness.report.render import report
from tests.harness.records import record, store, zeroshot


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict] = []
        self.svgs = 0
        self.h2: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        if tag in ("link", "script", "iframe") or (tag == "img" and not dict(attrs).get("src", "").startswith("data:")):
            raise AssertionError(f"external resource <{tag}>: the page must be self-contained")
        if tag == "img":
            self.images.append(dict(attrs))
        elif tag == "svg":
            self.svgs += 1
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        if self._in_h2:
            self.h2.append(data)
            self._in_h2 = False


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    return page


def decoded(img: dict):
    prefix = "data:image/png;base64,"
    assert img["src"].startswith(prefix) and img.get("alt")
    return imread(io.BytesIO(base64.b64decode(img["src"][len(prefix):], validate=True)), format="png")


def test_page_images_decode_and_are_not_empty(tmp_path):
    records = [record("llama-2-7b", "fp", "W16A16", ppl={"wikitext2": 5.5, "c4": 7.0}, zeroshot=zeroshot(0.6)),
               record("llama-2-7b", "qllm", "W4A4", ppl={"wikitext2": 12.0, "c4": 13.0}, zeroshot=zeroshot(0.5)),
               record("llama-2-7b", "qllm", "W6A6", ppl={"wikitext2": 6.0, "c4": 7.5}, zeroshot=zeroshot(0.58))]
    text = report(store(tmp_path, records), "html", reference="paper")
    page = parse(text)
    assert text.startswith("<!doctype html>") and text.rstrip().endswith("</html>")
    assert len(page.images) == 3 and page.svgs == 0  # perplexity, zero-shot, cost
    for img in page.images:
        pixels = decoded(img)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels.std() > 0.01  # not blank
    first = page.h2.index("Results")  # after the pivot tables, one per metric
    assert page.h2[:first] == [f"{m} by method and bit spec" for m in ("ppl_wikitext2", "ppl_c4", "zeroshot_avg_pct")]
    assert page.h2[first:first + 3] == ["Results", "Ours vs published (the LLaMA-1 and LLaMA-2 weight-activation tables of QLLM, arXiv 2310.08041)", "Training cost vs published"]


def test_a_plot_without_data_is_a_sentence_not_a_broken_image(tmp_path):
    text = report(store(tmp_path, [record("m", "fp", "W16A16", ppl={"brown": 40.0}),
                                   record("m", "rtn", "W4A4", ppl={"brown": 90.0})]), "html")
    page = parse(text)
    assert len(page.images) == 2 and all(decoded(img).size for img in page.images)
    assert "No zero-shot results in this directory." in text
