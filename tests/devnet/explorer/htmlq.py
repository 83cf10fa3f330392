"""Tiny HTML queries for page tests (stdlib html.parser): an element's text and class by id, links by class."""

from __future__ import annotations

from html.parser import HTMLParser

VOID = {"br", "hr", "img", "input", "meta", "link", "circle", "rect", "line", "path"}


class _Doc(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, list[dict]]] = []
        self.by_id: dict[str, dict] = {}  # id -> {"tag", "class", "text"}
        self.links: list[dict] = []  # {"href", "class", "text"}
        self._open: list[dict] = []  # elements with an id (or links) collecting text

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        entries = []
        if "id" in a:
            entries.append(self.by_id.setdefault(a["id"], {"tag": tag, "class": a.get("class") or "", "text": ""}))
        if tag == "a":
            self.links.append({"href": a.get("href", ""), "class": a.get("class") or "", "text": ""})
            entries.append(self.links[-1])
        if tag not in VOID:
            self._open.extend(entries)
            self.stack.append((tag, entries))

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        while self.stack:
            t, entries = self.stack.pop()
            self._open = [e for e in self._open if not any(e is x for x in entries)]
            if t == tag:
                break

    def handle_data(self, data):
        for e in self._open:
            e["text"] += data


def parse(html: str) -> _Doc:
    doc = _Doc()
    doc.feed(html)
    return doc


def text_of(html: str, element_id: str) -> str:
    """Whitespace-normalised text inside the element with this id (KeyError when absent)."""
    return " ".join(parse(html).by_id[element_id]["text"].split())


def class_of(html: str, element_id: str) -> set[str]:
    return set(parse(html).by_id[element_id]["class"].split())


def links(html: str, cls: str | None = None) -> list[tuple[str, str]]:
    """(href, text) of every <a>, or of those having class `cls`."""
    return [
        (a["href"], " ".join(a["text"].split())) for a in parse(html).links if cls is None or cls in a["class"].split()
    ]
