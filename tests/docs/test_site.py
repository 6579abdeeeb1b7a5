"""The documentation site, built once and read in a real browser (headless Chromium).

The site is built from this checkout into a temporary folder (without the API pages, and
with the tiny notebook of ``tests/docs/fixtures``, copied to a folder outside the repository,
in place of ``demos/``) and opened from
there (file://, no server, no network) in Chromium, driven over its DevTools pipe
(``tests/docs/browser.py``): every derivation, the index, the label table and the notebook,
each read once MathJax has finished, and a sample of code links followed to their lines. No
page may fail to load a file, try the network or throw an uncaught script error, also with
MathJax's accessibility Explorer switched on in its menu (a setting the browser remembers).
Links and anchors are also checked in the built HTML, every one of them.

Screenshots of the index and of a derivation are kept in ``runs/docs/``.
"""

import functools
import html
import importlib.util
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.docs.browser import Browser, BrowserError, find_chromium
from tests.labels import ROOT

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ARTEFACTS = ROOT / "runs" / "docs"
CHROMIUM = find_chromium()
MISSING = [
    m
    for m in ("mkdocs", "material", "mkdocstrings", "mathjax", "jupytext", "nbclient")
    if not importlib.util.find_spec(m)
]

pytestmark = [
    pytest.mark.skipif(
        bool(MISSING), reason=f"the docs extra is not installed ({', '.join(MISSING)}); `make test` installs it"
    ),
    pytest.mark.xdist_group("site"),  # one worker builds the site once (`make test` runs --dist loadgroup)
]
NO_BROWSER = "chromium is not installed; `make test` (and `make docs`) install Debian's chromium"

PROOF = "proofs/layernorm.html"
HREF = re.compile(r'<a\b[^>]*\bhref="([^"]+)"')


def builder():
    sys.path.insert(0, str(ROOT / "proofs" / "site"))
    try:
        import build
    finally:
        sys.path.remove(str(ROOT / "proofs" / "site"))
    return build


def test_the_site_reads_the_scan_the_meta_test_reads():
    import tests.labels
    import tests.test_derivations

    assert builder().scan is tests.labels.scan
    assert tests.test_derivations.scan is tests.labels.scan
    assert tests.test_derivations.defined_labels is tests.labels.defined_labels


@pytest.fixture(scope="module")
def site():
    build = builder()
    with tempfile.TemporaryDirectory(prefix="npformer-site-") as tmp:
        out, docs, notebooks = Path(tmp) / "site", Path(tmp) / "docs", Path(tmp) / "notebooks"
        shutil.copytree(FIXTURES, notebooks)  # notebooks outside the repository (build.py --notebooks DIR)
        stats = build.build(out, docs, notebooks, docs / "cache", api=False, log=print, strict=True)
        print(f"\nsite built in {stats['seconds']} s: {stats['labels_linked']} of {stats['labels']} labels linked")
        yield out, stats


def read(root, page):
    return (root / page).read_text()


def resolve(root, page, href):
    """The page (relative to the site root) and fragment a relative link on ``page`` points to."""
    parts = urlsplit(html.unescape(href))
    target = (root / page).parent / parts.path if parts.path else root / page
    return target.resolve().relative_to(root.resolve()).as_posix(), parts.fragment


@functools.lru_cache(maxsize=None)
def ids(path):
    return set(re.findall(r'\bid="([^"]+)"', Path(path).read_text()))


def line_text(path, anchor):
    """The text of the source line whose span carries ``id=anchor``."""
    text = Path(path).read_text()
    m = re.search(
        r'<span class="line[^"]*" id="' + re.escape(anchor) + r'">(.*?)(?=<span class="line|</code>)', text, re.S
    )
    assert m, f"{path}: no line {anchor}"
    return html.unescape(re.sub(r"<[^>]+>", "", m.group(1)))


def label_links(root):
    """(page, label, href) for every code and test link of the label table and beside the equations."""
    found = []
    table = read(root, "labels.html")
    for row in re.findall(r"<tr>(.*?)</tr>", table, re.S):
        cells = re.findall(r"<td>(.*?)</td>", row, re.S)
        if not cells:
            continue
        label = re.search(r'href="[^"#]*#([^"]+)"', cells[0]).group(1)
        found += [("labels.html", label, href) for cell in cells for href in HREF.findall(cell)]
    for doc in sorted((root / "proofs").glob("*.html")):
        page = doc.relative_to(root).as_posix()
        # each refs paragraph follows the anchors of its equation
        for anchors, refs in re.findall(
            r'((?:<span class="eq-anchor" id="[^"]+"></span>)+)(.*?)(?=<span class="eq-anchor"|</article>)',
            doc.read_text(),
            re.S,
        ):
            labels = re.findall(r'id="([^"]+)"', anchors)
            for paragraph in re.findall(r'<p class="eq-refs">(.*?)</p>', refs, re.S):
                found += [(page, labels, href) for href in HREF.findall(paragraph)]
    return found


# --------------------------------------------------------------------------- in the built HTML


def test_every_label_is_an_anchor_on_its_document(site):
    root, stats = site
    found = stats["scan"]
    assert stats["labels"] == len(found.definitions) > 0
    missing = [d.label for d in found.definitions if d.label not in ids(root / d.document.with_suffix(".html"))]
    assert not missing, f"labels with no anchor: {missing}"


def test_the_label_table_is_the_scan(site):
    """One row per defined label; each row's code and test links are exactly the scan's citations and markers."""
    root, stats = site
    found = stats["scan"]
    table = read(root, "labels.html")
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", table, re.S):
        cells = re.findall(r"<td>(.*?)</td>", row, re.S)
        if cells:
            label = re.search(r'href="[^"#]*#([^"]+)"', cells[0]).group(1)
            rows[label] = (
                sorted(re.findall(r'#L-(\d+)"', cells[2])),
                sorted(re.findall(r'#L-(\d+)"', cells[3])),
            )
    assert sorted(rows) == sorted(d.label for d in found.definitions)
    for label, (code, tests) in rows.items():
        assert code == sorted(str(c.line) for c in found.citations if c.label == label), label
        assert tests == sorted(str(m.line) for m in found.markers if m.label == label), label


def test_every_label_link_resolves_and_code_links_land_on_the_cited_line(site):
    root, _ = site
    links = label_links(root)
    assert len(links) > 500
    wrong = []
    for page, labels, href in links:
        labels = [labels] if isinstance(labels, str) else labels
        target, fragment = resolve(root, page, href)
        if not (root / target).is_file() or (fragment and fragment not in ids(root / target)):
            wrong.append(f"{page}: {href} does not resolve")
        elif fragment.startswith("L-") and not any(label in line_text(root / target, fragment) for label in labels):
            wrong.append(f"{page}: {href} lands on a line without {labels}: {line_text(root / target, fragment)!r}")
    assert not wrong, "\n".join(wrong[:20])


def test_label_mentions_in_prose_link_to_their_equations(site):
    """``(LN.4)`` in a derivation, the README or a notebook is a link to the equation's anchor."""
    root, _ = site
    mentions = 0
    for doc in sorted(root.rglob("*.html")):
        page = doc.relative_to(root).as_posix()
        for href, label in re.findall(r'<a class="eq-ref" href="([^"]+)">\(([^)]+)\)</a>', doc.read_text()):
            mentions += 1
            target, fragment = resolve(root, page, href)
            assert fragment == label and label in ids(root / target), f"{page}: ({label}) -> {href}"
    assert mentions > 100


def test_source_lines_link_their_labels_back(site):
    """On every source page, each cited label links to its equation."""
    root, _ = site
    backlinks = 0
    for doc in sorted((root / "code").rglob("*.html")):
        page = doc.relative_to(root).as_posix()
        for href, label in re.findall(r'<a class="label-link" href="([^"]+)">([^<]+)</a>', doc.read_text()):
            backlinks += 1
            target, fragment = resolve(root, page, href)
            assert fragment == label and label in ids(root / target), f"{page}: {label} -> {href}"
    assert backlinks > 500


def test_nothing_is_fetched_from_the_network(site):
    root, _ = site
    remote = re.compile(r'<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)="(?:https?:)?//', re.I)
    offenders = [p.relative_to(root).as_posix() for p in root.rglob("*.html") if remote.search(p.read_text())]
    assert not offenders, f"pages that load from the network: {offenders[:10]}"
    assert (root / "assets" / "mathjax" / "tex-chtml.js").is_file()
    assert list((root / "assets" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))
    css = "".join(p.read_text() for p in (root / "assets").rglob("*.css"))
    assert "fonts.googleapis" not in css and "fonts.gstatic" not in css


def test_the_notebook_is_rendered_with_its_outputs(site):
    root, stats = site
    assert list(stats["notebooks"]) == ["demos/01_tiny.md"]
    text = read(root, "demos/01_tiny.html")
    assert "sum of the softmax: 1.000000" in text
    assert f"kernel python: {sys.executable}" in html.unescape(text)  # the kernel runs the builder's Python
    assert "BLAS threads: 1 1" in text  # the kernel runs on one BLAS thread, as tests/test_notebooks.py runs them
    images = re.findall(r'<img[^>]*src="(01_tiny_\d+\.png)"', text)
    assert images and (root / "demos" / images[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (root / "demos" / "01_tiny.ipynb").is_file()


# --------------------------------------------------------------------------- in the browser

TYPESET = "document.documentElement.getAttribute('data-mathjax') === 'done'"
INSPECT = r"""(() => {
  const math = [...document.querySelectorAll(".arithmatex")];
  const raw = [];
  const skip = "pre, code, script, style, mjx-container, textarea";
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT, {acceptNode: n =>
    n.parentElement.closest(skip) ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT});
  while (walker.nextNode()) {
    const t = walker.currentNode.nodeValue;
    if (/\$\$|\\tag|\\\[|\\\(/.test(t)) raw.push(t.slice(0, 120));
  }
  return {
    math: math.length,
    typeset: math.filter(m => m.querySelector("mjx-container")).length,
    display: document.querySelectorAll("div.arithmatex > mjx-container[display='true']").length,
    errors: document.querySelectorAll("mjx-merror, [data-mjx-error]").length,
    raw: raw,
    anchors: [...document.querySelectorAll(".eq-anchor")].map(e => e.id),
  };
})()"""
JUMP = """(() => {
  const target = document.querySelector(":target");
  return {target: target ? target.id : null, text: target ? target.textContent : "",
          top: target ? target.getBoundingClientRect().top : null, height: window.innerHeight};
})()"""


@pytest.fixture(scope="module")
def browser(site):
    """What Chromium saw on every derivation, the index, the label table and the notebook, and after code links."""
    if CHROMIUM is None:
        pytest.skip(NO_BROWSER)
    root, _ = site
    pages = sorted(p.relative_to(root).as_posix() for p in (root / "proofs").glob("*.html"))
    pages += ["index.html", "labels.html", "demos/01_tiny.html"]
    links = [(labels, href) for page, labels, href in label_links(root) if page == "labels.html" and "#L-" in href]
    jumps = links[:: max(1, len(links) // 10)]
    seen, landed, problems = {}, [], {}
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    with Browser() as chromium:
        for page in pages:
            chromium.open((root / page).as_uri(), TYPESET)
            seen[page] = chromium.evaluate(INSPECT)
            problems[page] = chromium.problems()
            if page in SCREENSHOTS:
                chromium.screenshot(ARTEFACTS / SCREENSHOTS[page])
        for labels, href in jumps:
            path, _, fragment = href.partition("#")
            url = (root / path).as_uri() + "#" + fragment
            chromium.open(url, TYPESET)
            landed.append(dict(chromium.evaluate(JUMP), url=url, fragment=fragment, labels=labels))
            problems[url] = chromium.problems()
        # the reader switches on the Explorer in MathJax's menu; the browser keeps it for every page of the site
        chromium.evaluate(f"localStorage.setItem('MathJax-Menu-Settings', {json.dumps(json.dumps(EXPLORER))})")
        for page in EXPLORED:
            try:
                chromium.open((root / page).as_uri(), TYPESET, timeout=20)
                seen["explorer:" + page] = dict(chromium.evaluate(INSPECT), menu=chromium.evaluate(MENU))
            except BrowserError as err:  # kept with the page's failed loads and errors, which say why
                seen["explorer:" + page] = {"error": str(err)}
            problems["explorer:" + page] = chromium.problems()
        chromium.evaluate("localStorage.removeItem('MathJax-Menu-Settings')")
    return seen, landed, pages, problems


EXPLORER = {"explorer": True, "collapsible": True, "assistiveMml": True}
MENU = """(() => {
  const menu = MathJax.startup.document.menu;
  return {saved: JSON.parse(localStorage.getItem("MathJax-Menu-Settings")), explorer: menu.settings.explorer,
          disabled: ["Activate", "Collapsible", "AutoCollapse"].map(
            id => menu.menu.findID("Accessibility", id).disabled)};
})()"""
EXPLORED = [PROOF, "demos/01_tiny.html"]


SCREENSHOTS = {"index.html": "index.png", PROOF: "proof-layernorm.png"}


def test_no_page_fails_a_load_or_throws(browser):
    """Nothing missing, nothing from the network, no uncaught error, on any page opened (with the Explorer too)."""
    _, _, pages, problems = browser
    assert set(pages) < set(problems) and len(problems) >= len(pages) + 10 + len(EXPLORED)
    wrong = {page: found for page, found in problems.items() if found}
    assert not wrong, "\n".join(f"{page}: {found}" for page, found in wrong.items())


def test_a_saved_explorer_setting_neither_stops_the_math_nor_stays_on(browser):
    """The Explorer needs data a page from the folder cannot read: a saved setting is switched off, items disabled."""
    seen, _, _, problems = browser
    for page in EXPLORED:
        found = dict(seen["explorer:" + page])
        assert "error" not in found, f"{page}: {found['error']}; {problems['explorer:' + page]}"
        menu = found.pop("menu")
        assert found == seen[page], f"{page}: typeset differently once the Explorer was switched on: {found}"
        assert found["math"] > 0 and found["typeset"] == found["math"] and found["errors"] == 0, f"{page}: {found}"
        assert menu["explorer"] is False and menu["disabled"] == [True, True, True], menu
        assert menu["saved"]["explorer"] is False and menu["saved"]["collapsible"] is False, menu
        assert menu["saved"]["assistiveMml"] is True, menu  # the reader's other settings are kept


def test_the_site_has_no_search_that_cannot_work_offline(site):
    """Material's search needs a worker that a page opened from the folder cannot start without the network."""
    root, _ = site
    assert not (root / "search").exists()
    for page in ("index.html", PROOF, "labels.html"):
        text = read(root, page)
        assert 'data-md-component="search"' not in text and "iframe-worker" not in text and "unpkg.com" not in text


def test_mathjax_typesets_every_equation(browser):
    seen, _, pages, _ = browser
    seen = {page: found for page, found in seen.items() if not page.startswith("explorer:")}
    assert sorted(seen) == sorted(pages)
    for page, found in seen.items():
        assert (
            found["typeset"] == found["math"]
        ), f"{page}: {found['math'] - found['typeset']} of {found['math']} not typeset"
        assert found["errors"] == 0, f"{page}: {found['errors']} TeX errors"
        assert not found["raw"], f"{page}: raw TeX left in the page: {found['raw'][:3]}"
    for page in pages:
        if page.startswith("proofs/") and page != "proofs/index.html":
            source = (ROOT / page).with_suffix(".md").read_text()
            blocks = len(re.findall(r"^\$\$", source, re.M))
            found = seen[page]
            assert (
                found["display"] == blocks > 0
            ), f"{page}: {found['display']} displayed equations, {blocks} in the source"
            assert found["math"] >= blocks
    notebook = seen["demos/01_tiny.html"]
    assert notebook["display"] == 1 and notebook["typeset"] == notebook["math"] == 2  # one inline, one displayed


def test_every_equation_anchor_is_in_the_rendered_page(site, browser):
    seen, _, _, _ = browser
    for d in site[1]["scan"].definitions:
        page = d.document.with_suffix(".html").as_posix()
        assert d.label in seen[page]["anchors"], f"{page}: no anchor {d.label}"


def test_code_links_scroll_to_the_cited_line(browser):
    _, landed, _, _ = browser
    assert len(landed) >= 10
    for jump in landed:
        labels = [jump["labels"]] if isinstance(jump["labels"], str) else jump["labels"]
        assert jump["target"] == jump["fragment"], jump
        assert any(label in jump["text"] for label in labels), jump
        assert 0 <= jump["top"] < jump["height"], f"the cited line is not in view after the jump: {jump}"


def test_screenshots_of_the_index_and_a_derivation(browser):
    for name in SCREENSHOTS.values():
        path = ARTEFACTS / name
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, f"{path}: not a screenshot"
        print(f"screenshot: {path}")
