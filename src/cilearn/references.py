"""The shipped reference configs (``configs/*.yaml``): each reproduces a paper's protocol and
says in its header comment what the paper reports (``# Paper's number: ...``). ``cilearn list
--configs`` shows them; each runs with ``cilearn run --config FILE --data-dir DIR``."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

PAPER = re.compile(r"Paper's numbers?\s*(?:\((?P<source>[^)]*)\))?\s*:\s*")
NUMBER = re.compile(r"\d+\.\d+")


@dataclass(frozen=True)
class Reference:
    path: Path
    method: str
    protocol: str          # "cifar100 B50-Inc10, 20 exemplars per class"
    title: str             # the header's first line
    paper: str             # the header's "Paper's number" sentence ("" when the header has none)
    source: str            # where that number is quoted from ("" when not said)
    number: float | None   # its first figure; None: not known / not quoted


def header(text: str) -> str:
    """The leading ``#`` comment lines of a YAML file, joined into one line."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(lines)


def first_sentence(text: str) -> str:
    """Up to the first full stop outside parentheses that ends a sentence (not ``et al.``, not a
    decimal point)."""
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if ch == "." and depth <= 0 and (i + 1 == len(text) or text[i + 1].isspace()) \
                and not text[:i].endswith(" al"):
            return text[:i]
    return text


def paper_claim(head: str) -> tuple[str, str, float | None]:
    """(sentence, source, first figure) of a header's ``Paper's number`` statement."""
    m = PAPER.search(head)
    if m is None:
        return "", "", None
    sentence = first_sentence(head[m.end():]).strip()
    num = NUMBER.search(sentence)
    return sentence, (m.group("source") or "").strip(), float(num.group()) if num else None


# image-folder data sets, named by the config file's name
FOLDERS = {"imagenet-subset": "ImageNet-subset", "food101": "Food-101", "ilsvrc-small": "iILSVRC-small",
           "imagenet-b": "ImageNet-1000"}


def protocol(d: dict[str, Any], name: str = "") -> str:
    """A config dict's data set, scenario and memory budget, in the README's notation; ``name``
    (the file's) names an image folder (``imagenet-subset``, ``food101``)."""
    data, sc, mem = d.get("data") or {}, d.get("scenario") or {}, d.get("memory") or {}
    dataset = data.get("dataset", "digits")
    if dataset == "imagefolder":
        dataset = next((v for k, v in FOLDERS.items() if k in name), dataset)
    text = f"{dataset} B{sc.get('base', 0)}-Inc{sc.get('increment', 2)}"
    unit = "exemplars" if mem.get("compressor") in (None, "none") else f"image units ({mem['compressor']})"
    if mem.get("per_class") is not None:
        text += f", {mem['per_class']} {unit} per class"
    elif mem.get("total") is not None:
        text += f", {mem['total']} {unit}"
    return text


def configs_dir() -> Path:
    """``configs/`` of the source checkout this package runs from, else of the working directory."""
    for d in (Path(__file__).resolve().parents[2] / "configs", Path.cwd() / "configs"):
        if d.is_dir():
            return d
    raise ConfigError("--configs: no configs/ directory found next to the cilearn sources or in the working "
                      "directory; give one: cilearn list --configs DIR")


def load_references(directory: str | Path | None = None) -> list[Reference]:
    import yaml

    d = Path(directory) if directory is not None else configs_dir()
    if not d.is_dir():
        raise ConfigError(f"--configs {d}: no such directory")
    refs = []
    for path in sorted(d.glob("*.yaml")):
        text = path.read_text()
        try:
            cfg = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
        head = header(text)
        sentence, source, number = paper_claim(head)
        refs.append(Reference(path, str(cfg.get("method", "icarl")), protocol(cfg, path.stem), first_sentence(head), sentence,
                              source, number))
    return refs


def shown_path(p: Path) -> str:
    """Relative to the working directory when below it (as ``cilearn run --config`` takes it)."""
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def references_text(refs: list[Reference]) -> str:
    """``cilearn list --configs``: one block per config."""
    out = []
    for r in refs:
        claim = r.paper or "no paper's number in the header (see the file)"
        out.append(f"{shown_path(r.path)}\n    {r.method}, {r.protocol}\n    paper: {claim}"
                   + (f" [{r.source}]" if r.source else ""))
    out.append("run one with: cilearn run --config FILE --data-dir DIR")
    return "\n".join(out)


def references_markdown(refs: list[Reference]) -> str:
    """``cilearn list --configs --markdown``: the README's "Reproducing the papers" columns."""
    lines = ["| method | protocol | paper's number | command |", "|---|---|---|---|"]
    for r in refs:
        claim = (r.paper + (f" ({r.source})" if r.source else "")) if r.paper else "-"
        lines.append(f"| `{r.method}` | {r.protocol} | {claim} | `cilearn run --config {shown_path(r.path)} --data-dir DIR` |")
    return "\n".join(lines)
