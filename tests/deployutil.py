"""What the images of docker-compose.yml are made of, read offline from the one multi-stage Dockerfile."""

from __future__ import annotations

import re

from tests.conftest import ROOT

_FROM = re.compile(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?\s*$", re.M | re.I)


def stages(path=ROOT / "Dockerfile") -> dict[str, tuple[str, str]]:
    """Stage name -> (the image or stage it builds on, its own lines)."""
    text = path.read_text()
    heads = list(_FROM.finditer(text))
    out = {}
    for i, m in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        out[m.group(2) or f"stage{i}"] = (m.group(1), text[m.start():end])
    return out


def image_text(svc: dict) -> str:
    """The Dockerfile lines that make a compose service's image: its target stage and every stage it builds
    on, base first ("" for a service with no build)."""
    build = svc.get("build")
    if not build:
        return ""
    st = stages(ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile"))
    name = build.get("target") or list(st)[-1]
    chain = []
    while name in st:
        parent, text = st[name]
        chain.append(text)
        name = parent
    return "".join(reversed(chain))


def last(pattern: str, text: str) -> str | None:
    """The last line matching ``pattern`` (a later stage's instruction wins, as in Docker)."""
    found = re.findall(pattern, text, re.M)
    return found[-1] if found else None
