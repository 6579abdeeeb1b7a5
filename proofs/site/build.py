"""Build the documentation site: derivations, code and tests linked label by label.

    python proofs/site/build.py                       # -> site/ (sources generated in build/docs/)
    python proofs/site/build.py --site /tmp/site --notebooks tests/docs/fixtures

Pages come from README.md, proofs/*.md, demos/README.md (and the study reports it links),
one API page per module of npformer/ and kernels/ (mkdocstrings), one rendered source page
per Python file of npformer/ and kernels/ and per test file that cites or carries a label,
and the notebooks ``demos/[0-9][0-9]_*.py`` (Jupytext percent scripts), executed with
nbclient (on one BLAS thread) and shown with their outputs (an executed notebook is kept in
``build/docs-cache/`` until the script, or any Python file of npformer/ and kernels/ it may
run, changes).

Every equation tagged ``\\tag*{(LN.4)}`` gets the anchor ``#LN.4`` and, beside it, the code
lines that cite it and the tests that carry its marker, from the scan the meta-test reads
(``tests/labels.py``); ``labels.md`` tables them all. Math is typeset in the browser by a
MathJax copied from the ``django-static-mathjax`` package into the site: nothing is fetched
from the network when the site is built or read (the site has no search box: Material's search
reads its index through a worker, which a page opened from the folder may not start without a
shim fetched from the network).
"""

import argparse
import hashlib
import html
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from tests.labels import LABEL, MENTION, python_files, scan  # noqa: E402

NOTEBOOK = re.compile(r"^[0-9][0-9]_.*\.py$")
TAG = re.compile(r"\\tag\*\{\((" + LABEL + r")\)\}")
IMAGE_SUFFIXES = {".png", ".svg", ".jpg", ".jpeg", ".gif"}
# tex-chtml.js and what it loads on demand: the menu (ui/) and the assistive MathML (a11y/). The Explorer and
# collapsible math would need the speech rule engine's maps, which a page opened from the folder cannot read
# (file:// answers no request for data): mathjax-config.js keeps them off, and their menu items disabled.
MATHJAX_PARTS = ("tex-chtml.js", "input/tex", "output/chtml", "ui", "a11y")
ONE_THREAD = {name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
CODE_PACKAGES = ("npformer", "kernels")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def line_id(line):
    """The anchor of line ``line`` on a rendered source page."""
    return f"L-{line}"


# --------------------------------------------------------------------------- where pages go


class Site:
    """Which repository file becomes which page, and relative links between pages."""

    def __init__(self, root, found, notebooks):
        self.root = root
        self.found = found
        self.pages = {
            "README.md": "index.md",
            "proofs/README.md": "proofs/index.md",
            "demos/README.md": "demos/index.md",
        }
        for doc in sorted((root / "proofs").glob("*.md")):
            if doc.name != "README.md":
                self.pages[f"proofs/{doc.name}"] = f"proofs/{doc.name}"
        results = root / "demos" / "results"
        for md in sorted(results.rglob("*.md")) if results.is_dir() else ():
            rel = md.relative_to(root).as_posix()
            self.pages[rel] = rel
        self.notebooks = {}
        for nb in notebooks:
            self.notebooks[nb] = f"demos/{nb.stem}.md"
        self.sources = {}  # repository path -> source page
        cited = {c.path.as_posix() for c in found.citations + found.test_citations}
        cited |= {m.path.as_posix() for m in found.markers}
        paths = [p.relative_to(root).as_posix() for pkg in CODE_PACKAGES for p in python_files(root, pkg)]
        paths += sorted(p for p in cited if p.startswith("tests/"))
        demos = root / "demos"  # the demo scripts that are not notebooks (those get pages of their own)
        paths += [p.relative_to(root).as_posix() for p in sorted(demos.glob("*.py")) if not NOTEBOOK.match(p.name)]
        for rel in paths:
            self.sources[rel] = f"code/{rel}.md"
        self.document_of = {d.label: d.document.as_posix() for d in found.definitions}

    def page_for(self, rel):
        """The page showing repository file ``rel`` (a posix path), or None."""
        if rel in self.pages:
            return self.pages[rel]
        for nb, page in self.notebooks.items():
            if nb.resolve() == (self.root / rel).resolve():
                return page
        return self.sources.get(rel)

    @staticmethod
    def link(from_page, to_page, fragment=""):
        """A relative link from one page to another (both paths inside the docs folder)."""
        target = posixpath.relpath(to_page, posixpath.dirname(from_page) or ".")
        return target + (f"#{fragment}" if fragment else "")

    def label_link(self, from_page, label):
        return self.link(from_page, self.pages[self.document_of[label]], label)

    def html_label_link(self, from_page, label):
        """The same link written for raw HTML, which MkDocs leaves alone: straight to the built page."""
        page = self.pages[self.document_of[label]]
        return self.link(from_page, page[: -len(".md")] + ".html", label)

    def code_link(self, from_page, path, line):
        return self.link(from_page, self.sources[path.as_posix()], line_id(line))


# --------------------------------------------------------------------------- markdown rewriting

SEGMENT = re.compile(
    r"(?P<fence>^(?P<ticks>```+|~~~+)[^\n]*\n.*?^(?P=ticks)[ \t]*$)"
    r"|(?P<display>\$\$.*?\$\$)"
    r"|(?P<code>`+)(?:.*?)(?P=code)"
    r"|(?P<inline>(?<![\\$])\$(?!\$)(?:[^$\\\n]|\\.)+?\$)",
    re.M | re.S,
)
LINK = re.compile(r"(?P<bang>!?)\[(?P<text>[^\]\n]*)\]\((?P<target>[^)\s]+)(?P<title>\s+\"[^\"]*\")?\)")


BLOCKS = re.compile(SEGMENT.pattern.split("|(?P<code>")[0], re.M | re.S)  # fences and displayed math only


def segments(text, pattern=SEGMENT):
    """Split markdown into (kind, piece): kind is 'text', 'fence', 'display', 'code' or 'inline'."""
    out, last = [], 0
    for m in pattern.finditer(text):
        if m.start() > last:
            out.append(("text", text[last : m.start()]))
        kind = next(k for k in ("fence", "display", "code", "inline") if m.groupdict().get(k) is not None)
        out.append((kind, m.group(0)))
        last = m.end()
    out.append(("text", text[last:]))
    return out


class Writer:
    def __init__(self, site, src, assets):
        self.site = site
        self.src = src
        self.assets = assets  # repository files copied beside the pages (images)

    def rewrite_links(self, text, repo_rel, page):
        """Point each relative link of a repository markdown file at its page on the site.

        A link to a published page or a source page follows it; an image is copied beside the
        pages; a link to anything else (a folder, a data file) keeps only its text.
        """
        base = posixpath.dirname(repo_rel)

        def one(m):
            target = m.group("target")
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                return m.group(0)
            path, _, fragment = target.partition("#")
            rel = posixpath.normpath(posixpath.join(base, path))
            to_page = self.site.page_for(rel)
            if to_page is not None:
                if to_page.startswith("code/") and re.fullmatch(r"L\d+", fragment or ""):
                    fragment = line_id(fragment[1:])
                new = self.site.link(page, to_page, fragment)
                return f"{m.group('bang')}[{m.group('text')}]({new}{m.group('title') or ''})"
            source = self.site.root / rel
            if source.is_file() and source.suffix.lower() in IMAGE_SUFFIXES:
                self.assets.add(rel)
                new = self.site.link(page, rel, fragment)
                return f"{m.group('bang')}[{m.group('text')}]({new}{m.group('title') or ''})"
            return m.group("text") if not m.group("bang") else ""

        # a link's text may hold code (`proofs/`): only fences and displayed math are left out here
        return "".join(LINK.sub(one, piece) if kind == "text" else piece for kind, piece in segments(text, BLOCKS))

    def write(self, page, text):
        path = self.src / page
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def copy_markdown(self, repo_rel):
        page = self.site.pages[repo_rel]
        text = (self.site.root / repo_rel).read_text()
        self.write(page, self.link_labels(self.rewrite_links(text, repo_rel, page), page))

    def link_labels(self, text, page):
        """Every ``(LN.4)`` outside math and code becomes a link to its equation."""
        return "".join(
            link_mentions(self.site, page, piece, page) if kind == "text" else piece for kind, piece in segments(text)
        )


# --------------------------------------------------------------------------- proofs


def refs_markdown(site, page, label, by_label):
    """The lines under an equation: the code citing ``label`` and the tests carrying its marker."""
    code, tests, checked = (
        by_label["code"].get(label, []),
        by_label["tests"].get(label, []),
        by_label["checked"].get(label, []),
    )
    parts = []
    if code:
        links = [f"[{c.path.as_posix()}:{c.line}]({site.code_link(page, c.path, c.line)})" for c in code]
        parts.append("**code** " + " · ".join(links))
    if tests:
        links = [f'[`{m.test}`]({site.code_link(page, m.path, m.line)} "{m.path.as_posix()}:{m.line}")' for m in tests]
        parts.append("**tests** " + " · ".join(links))
    if checked:
        links = [f"[{c.path.as_posix()}:{c.line}]({site.code_link(page, c.path, c.line)})" for c in checked]
        parts.append("**evaluated in** " + " · ".join(links))
    if not parts:
        parts.append("*no code cites this label*")
    return " <br>\n".join(parts) + "\n{: .eq-refs }"


def link_mentions(site, page, text, doc_label_page):
    """Turn ``(LN.4)`` in prose into a link to the equation (math and code are left alone)."""

    def one(m):
        label = m.group(1)
        if label not in site.document_of:
            return m.group(0)
        target = f"#{label}" if site.pages[site.document_of[label]] == doc_label_page else site.label_link(page, label)
        return f"[({label})]({target}){{: .eq-ref }}"

    # a label inside an existing link (its text or its target) stays as it is
    out, last = [], 0
    for m in LINK.finditer(text):
        out += [MENTION.sub(one, text[last : m.start()]), m.group(0)]
        last = m.end()
    return "".join(out + [MENTION.sub(one, text[last:])])


def render_proof(writer, repo_rel, by_label):
    site = writer.site
    page = site.pages[repo_rel]
    text = (site.root / repo_rel).read_text()
    text = writer.rewrite_links(text, repo_rel, page)
    out = []
    for kind, piece in segments(text):
        if kind == "text":
            out.append(link_mentions(site, page, piece, page))
        elif kind == "display" and TAG.search(piece):
            labels = TAG.findall(piece)
            anchors = "".join(f'<span class="eq-anchor" id="{label}"></span>' for label in labels)
            refs = "\n\n".join(refs_markdown(site, page, label, by_label) for label in labels)
            out.append(f"{anchors}\n\n{piece}\n\n{refs}\n")
        else:
            out.append(piece)
    writer.write(page, "".join(out))


def group(found):
    by_label = {"code": defaultdict(list), "tests": defaultdict(list), "checked": defaultdict(list)}
    for c in found.citations:
        by_label["code"][c.label].append(c)
    for m in found.markers:
        by_label["tests"][m.label].append(m)
    for c in found.test_citations:
        by_label["checked"][c.label].append(c)
    return by_label


def labels_page(writer, by_label):
    site, found = writer.site, writer.site.found
    page = "labels.md"
    rows = [
        "---",
        "hide:",
        "  - navigation",
        "  - toc",
        "---",
        "",
        "# Every label",
        "",
        "Each equation label of the derivations, the document that defines it, the lines of code that",
        'cite it, and the tests that carry its marker `@pytest.mark.derivation("...")`. The meta-test',
        "`tests/test_derivations.py` reads the same scan (`tests/labels.py`).",
        "",
        f"{len(found.definitions)} labels, {len(found.citations)} citations in code, "
        f"{len(found.markers)} test markers.",
        "",
        "| label | document | code | tests |",
        "|---|---|---|---|",
    ]
    for d in found.definitions:
        doc_page = site.pages[d.document.as_posix()]
        code = "<br>".join(
            f"[{c.path.as_posix()}:{c.line}]({site.code_link(page, c.path, c.line)})"
            for c in by_label["code"].get(d.label, [])
        )
        tests = "<br>".join(
            f'[{m.test}]({site.code_link(page, m.path, m.line)} "{m.path.as_posix()}:{m.line}")'
            for m in by_label["tests"].get(d.label, [])
        )
        label_link = f"[({d.label})]({site.link(page, doc_page, d.label)}){{: .label-link }}"
        doc_link = f"[{d.document.name}]({site.link(page, doc_page)})"
        rows.append(f"| {label_link} | {doc_link} | {code} | {tests} |")
    writer.write(page, "\n".join(rows) + "\n")


# --------------------------------------------------------------------------- source pages


def render_sources(writer, listings, api=True):
    """One page per Python file: highlighted, every line anchored ``#L-n``, cited labels linked back."""
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import PythonLexer

    site, found = writer.site, writer.site.found
    labels_on = defaultdict(lambda: defaultdict(set))  # path -> line -> labels
    for c in found.citations + found.test_citations:
        labels_on[c.path.as_posix()][c.line].add(c.label)
    for m in found.markers:
        labels_on[m.path.as_posix()][m.line].add(m.label)
    lexer = PythonLexer(stripnl=False, ensurenl=True)
    formatter = HtmlFormatter(nowrap=True)
    for rel, page in site.sources.items():
        code = (site.root / rel).read_text()
        lines = highlight(code, lexer, formatter).split("\n")[: len(code.splitlines())]
        rows = []
        for number, body in enumerate(lines, 1):
            labels = labels_on[rel].get(number, ())
            # a label no document defines stays plain text (tests/test_derivations.py reports it)
            for label in sorted((x for x in labels if x in site.document_of), key=len, reverse=True):
                href = html.escape(site.html_label_link(page, label))
                body = re.sub(
                    r"(?<![\w.>])" + re.escape(label) + r"(?![\w])",
                    f'<a class="label-link" href="{href}">{label}</a>',
                    body,
                )
            cls, anchor = ("line cited" if labels else "line"), line_id(number)
            rows.append(f'<span class="{cls}" id="{anchor}"><a class="ln" href="#{anchor}">{number}</a>{body}</span>')
        listing = listings / (page + ".html")
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text(
            '<div class="highlight source-listing"><pre><code>' + "\n".join(rows) + "</code></pre></div>\n"
        )
        cited = {label for labels in labels_on[rel].values() for label in labels if label in site.document_of}
        cited = sorted(cited, key=natural)
        # the listing takes the page's whole width
        header = ["---", "hide:", "  - navigation", "  - toc", "---", "", f"# {rel}", ""]
        if cited:
            header += [
                "Labels here: " + ", ".join(f"[({label})]({site.label_link(page, label)})" for label in cited),
                "",
            ]
        api_page = api_page_for(rel) if api else None
        if api_page:
            header += [f"API: [{module_name(rel)}]({site.link(page, api_page)})", ""]
        header += ["<!-- source-listing -->", ""]
        writer.write(page, "\n".join(header))
    index = ["# Source", "", "Every file, highlighted, with a link to each line.", ""]
    for rel, page in site.sources.items():
        index.append(f"- [{rel}]({site.link('code/index.md', page)})")
    writer.write("code/index.md", "\n".join(index) + "\n")


def natural(label):
    prefix, _, number = label.partition(".")
    digits = re.match(r"\d+", number)
    return (prefix, int(digits.group(0)) if digits else 0, number)


# --------------------------------------------------------------------------- API pages


def module_name(rel):
    parts = rel[: -len(".py")].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def api_page_for(rel):
    if not rel.startswith(("npformer/", "kernels/")) or not rel.endswith(".py") or "/__main__" in rel:
        return None
    return f"api/{module_name(rel)}.md"


def render_api(writer):
    site = writer.site
    pages = []
    for rel, source_page in site.sources.items():
        page = api_page_for(rel)
        if page is None:
            continue
        name = module_name(rel)
        writer.write(
            page,
            f"# {name}\n\nSource: [{rel}]({site.link(page, source_page)})\n\n::: {name}\n",
        )
        pages.append((name, page))
    index = ["# API", "", "One page per module, from the docstrings.", ""]
    index += [f"- [{name}]({site.link('api/index.md', page)})" for name, page in pages]
    writer.write("api/index.md", "\n".join(index) + "\n")
    return pages


# --------------------------------------------------------------------------- notebooks


def notebook_key(path, root=ROOT):
    """A digest of the script at ``path`` and of every Python file of npformer/ and kernels/ under ``root``.

    The executed notebook is cached under it: a change to the script or to the code it may run
    executes it again.
    """
    digest = hashlib.sha256()
    for name, data in [("script", path.read_bytes())] + [
        (p.relative_to(root).as_posix(), p.read_bytes()) for pkg in CODE_PACKAGES for p in python_files(root, pkg)
    ]:
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()[:16]


def execute_notebook(path, cache, timeout):
    """The notebook of a percent script, executed (or read from the cache while it and the code are unchanged)."""
    import jupytext
    import nbformat
    from nbclient import NotebookClient

    digest = notebook_key(path)
    cached = cache / f"{path.stem}.{digest}.ipynb"
    if cached.exists():
        return nbformat.read(cached, as_version=4), 0.0
    nb = jupytext.read(path)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    start = time.perf_counter()
    client = NotebookClient(
        nb, timeout=timeout, kernel_name=kernel_here(cache), resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()
    seconds = time.perf_counter() - start
    cache.mkdir(parents=True, exist_ok=True)
    for old in cache.glob(f"{path.stem}.*.ipynb"):
        old.unlink()
    nbformat.write(nb, cached)
    return nb, seconds


def kernel_here(folder):
    """A kernel spec that runs this Python (the one with npformer installed), not whichever ``python`` is on PATH.

    The kernel runs on one BLAS thread, as the notebooks do under tests/test_notebooks.py (several
    OpenBLAS threads make the small products of the notebooks several times slower).
    """
    name = "npformer-docs"
    spec = folder / "kernels" / name
    spec.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "npformer", "language": "python", "env": ONE_THREAD}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    paths = os.environ.get("JUPYTER_PATH", "")
    if str(folder) not in paths.split(os.pathsep):
        os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (str(folder), paths) if p)
    return name


def fenced(text, lang="text"):
    text = ANSI.sub("", text).rstrip("\n")
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return f"{ticks}{lang}\n{text}\n{ticks}"


def notebook_markdown(nb, stem, out_dir, markdown=lambda text: text):
    """Markdown cells through ``markdown`` (label links), code cells fenced, outputs as text blocks and images."""
    import base64

    parts, images = [], 0
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            parts.append(markdown(cell.source))
        elif cell.cell_type == "code":
            if cell.source.strip():
                parts.append(fenced(cell.source, "python"))
            for output in cell.get("outputs", []):
                kind = output.get("output_type")
                if kind == "stream":
                    parts.append(fenced(output.get("text", "")) + "\n{: .nb-output }")
                elif kind == "error":
                    parts.append(fenced("\n".join(output.get("traceback", []))) + "\n{: .nb-output .nb-error }")
                elif kind in ("execute_result", "display_data"):
                    data = output.get("data", {})
                    if "image/png" in data:
                        images += 1
                        name = f"{stem}_{images}.png"
                        (out_dir / name).write_bytes(base64.b64decode(data["image/png"]))
                        parts.append(f"![output {images}]({name}){{: .nb-image }}")
                    elif "image/svg+xml" in data:
                        images += 1
                        name = f"{stem}_{images}.svg"
                        (out_dir / name).write_text(data["image/svg+xml"])
                        parts.append(f"![output {images}]({name}){{: .nb-image }}")
                    elif "text/markdown" in data:
                        parts.append(data["text/markdown"])
                    elif "text/plain" in data:
                        parts.append(fenced(data["text/plain"]) + "\n{: .nb-output }")
    return "\n\n".join(parts) + "\n"


def notebook_place(path, root=ROOT):
    """Where a notebook's relative links are read from: its place in the repository, or demos/ for one outside it."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:  # a folder elsewhere (--notebooks): its links are read as those of the notebooks in demos/
        return f"demos/{path.name}"


def render_notebooks(writer, notebooks, cache, timeout, log):
    site = writer.site
    done = []
    for path in notebooks:
        page = site.notebooks[path]
        nb, seconds = execute_notebook(path, cache, timeout)
        log(f"notebook {path.name}: " + (f"executed in {seconds:.1f} s" if seconds else "unchanged, from the cache"))
        out_dir = (writer.src / page).parent
        out_dir.mkdir(parents=True, exist_ok=True)
        import nbformat

        nbformat.write(nb, out_dir / f"{path.stem}.ipynb")
        shutil.copyfile(path, out_dir / f"{path.stem}.py")
        repo_rel = notebook_place(path)

        def markdown(text):  # links and labels as on every page
            return writer.link_labels(writer.rewrite_links(text, repo_rel, page), page)

        body = notebook_markdown(nb, path.stem, out_dir, markdown)
        head = f"[Download the notebook]({path.stem}.ipynb) · [the script]({path.stem}.py)\n{{: .nb-download }}\n\n"
        lines = body.split("\n")
        if lines and lines[0].startswith("# "):  # keep the notebook's own title first
            text = lines[0] + "\n\n" + head + "\n".join(lines[1:])
        else:
            text = f"# {path.stem}\n\n" + head + body
        writer.write(page, text)
        title = lines[0][2:].strip() if lines and lines[0].startswith("# ") else path.stem
        done.append((title, page, seconds))
    return done


# --------------------------------------------------------------------------- mkdocs


def copy_mathjax(dest):
    import mathjax

    es5 = Path(mathjax.__file__).resolve().parent / "static" / "mathjax" / "es5"
    if not (es5 / "tex-chtml.js").is_file():
        raise SystemExit(
            f"build.py: MathJax not found under {es5} (install the docs extra and the test extra, whose packages "
            "the notebooks use: make docs-deps, or pip install -e '.[test,docs]')"
        )
    for part in MATHJAX_PARTS:
        source = es5 / part
        if source.is_dir():
            shutil.copytree(source, dest / part, dirs_exist_ok=True)
        else:
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest / part)


def write_config(docs, src, site_dir, listings, nav, api):
    import yaml

    config = yaml.safe_load((HERE / "mkdocs.yml").read_text())
    config["docs_dir"] = str(src)
    config["site_dir"] = str(site_dir)
    config["hooks"] = [str(HERE / "hooks.py")]
    config.setdefault("extra", {})["source_listings"] = str(listings)
    config["nav"] = nav
    if not api:
        config["plugins"] = [p for p in config["plugins"] if not (isinstance(p, dict) and "mkdocstrings" in p)]
    else:
        for p in config["plugins"]:
            if isinstance(p, dict) and "mkdocstrings" in p:
                p["mkdocstrings"]["handlers"]["python"]["paths"] = [str(ROOT)]
    path = docs / "mkdocs.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def build(site_dir, docs, notebooks_dir, cache, api=True, timeout=1200, log=print, quiet=False, strict=False):
    start = time.perf_counter()
    found = scan(ROOT)
    notebooks = (
        sorted(p for p in notebooks_dir.glob("*.py") if NOTEBOOK.match(p.name)) if notebooks_dir.is_dir() else []
    )
    site = Site(ROOT, found, notebooks)
    src, listings = docs / "src", docs / "listings"
    for folder in (src, listings):
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    writer = Writer(site, src, set())
    by_label = group(found)

    for repo_rel in site.pages:
        if repo_rel.startswith("proofs/") and repo_rel != "proofs/README.md":
            render_proof(writer, repo_rel, by_label)
        else:
            writer.copy_markdown(repo_rel)
    labels_page(writer, by_label)
    render_sources(writer, listings, api)
    api_pages = render_api(writer) if api else []
    log(f"pages written in {time.perf_counter() - start:.1f} s")
    ran = render_notebooks(writer, notebooks, cache, timeout, log)
    for rel in sorted(writer.assets):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / rel, src / rel)
    copy_mathjax(src / "assets" / "mathjax")
    (src / "assets" / "site").mkdir(parents=True, exist_ok=True)
    for name in ("site.css", "mathjax-config.js"):
        shutil.copyfile(HERE / name, src / "assets" / "site" / name)

    docs_titles = []
    for repo_rel, page in site.pages.items():
        if repo_rel.startswith("proofs/") and repo_rel != "proofs/README.md":
            first = (ROOT / repo_rel).read_text().split("\n", 1)[0]
            docs_titles.append({first.lstrip("# ").strip() or page: page})
    nav = [
        {"Home": "index.md"},
        {"Derivations": [{"Index": "proofs/index.md"}] + docs_titles},
        {"Every label": "labels.md"},
        {"Notebooks": [{"Demos and studies": "demos/index.md"}] + [{title: page} for title, page, _ in ran]},
        {"Source": "code/index.md"},
    ]
    if api_pages:
        nav.append({"API": [{"Index": "api/index.md"}] + [{name: page} for name, page in api_pages]})
    config = write_config(docs, src, site_dir, listings, nav, bool(api_pages))
    prepared = time.perf_counter() - start
    log(f"sources ready in {prepared:.1f} s; running mkdocs")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    command = [sys.executable, "-m", "mkdocs", "build", "--clean", "-f", str(config)]
    command += (["--quiet"] if quiet else []) + (["--strict"] if strict else [])  # strict: a warning fails
    subprocess.run(command, check=True, env=env)
    total = time.perf_counter() - start
    linked = sum(1 for d in found.definitions if by_label["code"].get(d.label) or by_label["tests"].get(d.label))
    stats = {
        "seconds": round(total, 1),
        "seconds_preparing": round(prepared, 1),
        "labels": len(found.definitions),
        "labels_linked": linked,
        "citations": len(found.citations),
        "test_citations": len(found.test_citations),
        "markers": len(found.markers),
        "source_pages": len(site.sources),
        "api_pages": len(api_pages),
        "notebooks": {page: round(seconds, 1) for _, page, seconds in ran},
    }
    (site_dir / "build.json").write_text(json.dumps(stats, indent=1) + "\n")
    stats["scan"] = found
    return stats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", type=Path, default=ROOT / "site", help="output folder (default: site/)")
    parser.add_argument(
        "--docs", type=Path, default=ROOT / "build" / "docs", help="generated sources (default: build/docs/)"
    )
    parser.add_argument("--notebooks", type=Path, default=ROOT / "demos", help="folder of NN_*.py percent scripts")
    parser.add_argument("--cache", type=Path, default=ROOT / "build" / "docs-cache", help="executed notebooks")
    parser.add_argument("--no-api", action="store_true", help="skip the per-module API pages (faster)")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds a notebook cell may run")
    parser.add_argument("--strict", action="store_true", help="fail on any MkDocs warning (a broken link)")
    args = parser.parse_args(argv)
    stats = build(
        args.site.resolve(),
        args.docs.resolve(),
        args.notebooks.resolve(),
        args.cache.resolve(),
        not args.no_api,
        args.timeout,
        strict=args.strict,
    )
    print(
        f"site: {args.site} in {stats['seconds']} s; "
        f"{stats['labels_linked']} of {stats['labels']} labels linked to code or tests; "
        f"{stats['source_pages']} source pages, {stats['api_pages']} API pages, {len(stats['notebooks'])} notebooks"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
