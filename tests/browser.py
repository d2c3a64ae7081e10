"""Headless Chromium for the tests of finetune's HTML pages, and a parser for the DOM it dumps."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(*flags: str, page: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """Runs Debian's chromium headless on a local file, offline, with a throwaway profile."""
    if not CHROMIUM:
        pytest.skip("chromium is not installed (.ci/run installs it: apt-get install chromium)")
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               "--enable-logging=stderr", "--v=0", *flags, page.resolve().as_uri()]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


class Dom(HTMLParser):
    """The parts of the dumped DOM the tests read: elements with their attributes, and text by enclosing tag."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict, tuple[str, ...]]] = []  # (tag, attributes, ancestors' ids+classes)
        self.stack: list[tuple[str, dict]] = []
        self.texts: list[tuple[str, str, tuple]] = []  # (text, tag, ancestors)

    def _context(self) -> tuple[str, ...]:
        return tuple(f"{t}#{a.get('id', '')}.{a.get('class', '')}" for t, a in self.stack)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.elements.append((tag, attributes, self._context()))
        if tag not in ("img", "meta", "br", "rect", "line", "circle", "polyline"):
            self.stack.append((tag, attributes))

    def handle_startendtag(self, tag, attrs):
        self.elements.append((tag, dict(attrs), self._context()))

    def handle_endtag(self, tag):
        for depth in range(len(self.stack) - 1, -1, -1):
            if self.stack[depth][0] == tag:
                del self.stack[depth:]
                break

    def handle_data(self, data):
        if self.stack:
            self.texts.append((data, self.stack[-1][0], self._context()))

    def within(self, marker: str):
        return [e for e in self.elements if any(marker in c for c in e[2])]
