"""MkDocs hooks of the site: a source page receives its pre-rendered listing.

build.py writes each listing (highlighted lines, anchored ``#L-n``) to a file of its own
beside the generated sources; the page's markdown holds a placeholder, so thousands of
lines of HTML never pass through the markdown parser.
"""

from pathlib import Path

PLACEHOLDER = "<!-- source-listing -->"


def on_page_content(html, page, config, files):
    if not page.file.src_uri.startswith("code/") or page.file.src_uri == "code/index.md":
        return html
    listing = Path(config["extra"]["source_listings"]) / (page.file.src_uri + ".html")
    if not listing.is_file():
        return html
    body = listing.read_text()
    if PLACEHOLDER in html:
        return html.replace(PLACEHOLDER, body)
    return html + body
