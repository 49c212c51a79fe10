"""MkDocs hook of the dpmjax site: pages made at build time from files that live outside ``docs/``.

- ``notebooks/*.ipynb`` (top level of the repository) become ``notebooks/NAME.ipynb`` pages, rendered by
  mkdocs-jupyter without executing them, plus ``notebooks/index.md`` listing them. The nav entry
  ``Notebooks: notebooks/index.md`` is expanded to whatever set of notebooks exists at build time.
- ``BENCHMARKS.md`` is split at its ``##`` headings into ``benchmarks/SLUG.md`` pages (headings one level up,
  code fences respected); ``benchmarks/index.md`` holds its introduction, its own summary table and a table
  linking every section. The nav entry ``Benchmarks: benchmarks/index.md`` is expanded the same way.
- ``api/methods.md`` documents every module in ``dpmjax/methods/`` (a new method file appears by itself);
  ``api/serve.md`` is added when ``dpmjax/serve/`` exists.

Nothing is written into ``docs/``: the pages are virtual files (``File.generated``), so the working tree stays
clean and a notebook added or removed needs no change here.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.dpmjax_docs")

NOTEBOOKS_INDEX = "notebooks/index.md"
BENCHMARKS_INDEX = "benchmarks/index.md"
METHODS_API = "api/methods.md"
SERVE_API = "api/serve.md"
API_INDEX = "api/index.md"


def _root(config) -> str:
    return os.path.dirname(os.path.abspath(config.config_file_path))


# ------------------------------------------------------------------------------------------------ notebooks

def _notebooks(root: str) -> list[str]:
    return sorted(glob.glob(os.path.join(root, "notebooks", "*.ipynb")))


def _notebook_title(path: str) -> tuple[str, str]:
    """(title, one-line summary) from the notebook's first markdown cell; the file name if it has none."""
    name = os.path.splitext(os.path.basename(path))[0]
    try:
        with open(path, encoding="utf-8") as f:
            nb = json.load(f)
    except (OSError, ValueError) as e:
        log.warning("notebooks/%s is not a readable notebook: %s", os.path.basename(path), e)
        return name, ""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "markdown":
            continue
        source = cell.get("source", "")
        raw = [ln.strip() for ln in ("".join(source) if isinstance(source, list) else source).splitlines()]
        title, summary = name, ""
        for i, line in enumerate(raw):
            if line.startswith("# "):
                title = line[2:].strip()
                paragraph: list[str] = []
                for ln in raw[i + 1:]:  # the first paragraph of prose after the title (badges, headings skipped)
                    if not ln:
                        if paragraph:
                            break
                        continue
                    if ln.startswith(("#", "[", "<", "!", "|", "-", "*", "```")) and not paragraph:
                        continue
                    paragraph.append(ln)
                summary = _first_sentence(" ".join(paragraph))
                break
        return title, summary
    return name, ""


def _first_sentence(text: str, limit: int = 240) -> str:
    match = re.match(r"(.+?[.?!])(\s|$)", text)
    sentence = match.group(1) if match else text
    return sentence if len(sentence) <= limit else sentence[:limit].rsplit(" ", 1)[0] + " ..."


def _notebooks_index(root: str) -> str:
    paths = _notebooks(root)
    out = ["# Notebooks", "",
           "The notebooks in the repository's `notebooks/` folder, rendered as they are stored (not executed by "
           "the documentation build; `tests/test_notebooks.py` runs them). Run one locally with "
           "`pip install -e . jupyter && jupyter lab notebooks/`.", ""]
    if not paths:
        out.append("There are no notebooks in `notebooks/` in this checkout.")
        return "\n".join(out) + "\n"
    out += ["| notebook | what it shows | file |", "|---|---|---|"]
    for path in paths:
        base = os.path.basename(path)
        stem = os.path.splitext(base)[0]
        title, summary = _notebook_title(path)
        # mkdocs-jupyter (include_source) copies the .ipynb beside its page; a raw <a> because the copy is not
        # a documentation file that Markdown links may name.
        download = f'<a href="{stem}/{base}" download>{base}</a>'
        out.append(f"| [{_cell(title)}]({base}) | {_cell(summary)} | {download} |")
    return "\n".join(out) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


# ----------------------------------------------------------------------------------------------- benchmarks

def _slug(title: str) -> str:
    head = re.split(r"[:(]", title, maxsplit=1)[0]
    slug = re.sub(r"[^a-z0-9]+", "-", head.lower()).strip("-")
    return slug or "section"


def _short_title(title: str) -> str:
    head = re.split(r"[:(]", title, maxsplit=1)[0].strip().rstrip(",;")
    return head.replace("`", "") or title


def _split_benchmarks(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(introduction, [(heading, body)]) of BENCHMARKS.md split at ``## `` lines outside code fences."""
    intro: list[str] = []
    sections: list[tuple[str, list[str]]] = []
    fence = None
    for line in text.splitlines():
        stripped = line.lstrip()
        if fence is None and stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
        elif fence is not None and stripped.startswith(fence):
            fence = None
        elif fence is None and line.startswith("## "):
            sections.append((line[3:].strip(), []))
            continue
        if sections:
            sections[-1][1].append(line)
        elif not line.startswith("# "):
            intro.append(line)
    return "\n".join(intro).strip(), [(h, "\n".join(body).strip()) for h, body in sections]


def _promote_headings(body: str) -> str:
    """``### x`` -> ``## x`` (a section's subsections under the page title), outside code fences."""
    out, fence = [], None
    for line in body.splitlines():
        stripped = line.lstrip()
        if fence is None and stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
        elif fence is not None and stripped.startswith(fence):
            fence = None
        elif fence is None and re.match(r"#{3,6} ", line):
            line = line[1:]
        out.append(line)
    return "\n".join(out)


def _benchmark_pages(root: str) -> tuple[str, list[tuple[str, str, str]]]:
    """(index page, [(src_uri, nav title, page)]) from BENCHMARKS.md."""
    path = os.path.join(root, "BENCHMARKS.md")
    with open(path, encoding="utf-8") as f:
        intro, sections = _split_benchmarks(f.read())
    summary = ""
    pages, used = [], set()
    for heading, body in sections:
        if heading.lower().startswith("summary"):
            summary = body
            continue
        slug = _slug(heading)
        while slug in used:
            slug += "-2"
        used.add(slug)
        page = (f"# {heading}\n\n"
                f"*Section of `BENCHMARKS.md` (the repository's record of every measured number), shown here "
                f"as one page; see the [summary](index.md).*\n\n{_promote_headings(body)}\n")
        pages.append((f"benchmarks/{slug}.md", _short_title(heading), page))
    index = ["# Benchmarks", "",
             intro, "",
             "*These pages are built from `BENCHMARKS.md` at the repository root, split at its `##` headings "
             "(the file is the source: edit it, not these pages).*", "", "## Sections", "", "| section | what was measured, and how |", "|---|---|"]
    for (uri, title, _), (heading, _) in zip(pages, [s for s in sections if not s[0].lower().startswith("summary")]):
        detail = heading[len(title):].strip(" :") if heading.startswith(title) else heading
        index.append(f"| [{_cell(title)}]({os.path.basename(uri)}) | {_cell(detail)} |")
    if summary:
        index += ["", "## Headlines", "", "The summary table of `BENCHMARKS.md`: one line per section.", "", summary]
    return "\n".join(index) + "\n", pages


# ------------------------------------------------------------------------------------------------------ API

def _method_modules(root: str) -> list[str]:
    names = [os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(root, "dpmjax", "methods", "*.py"))]
    core = ["base", "loop"]
    rest = sorted(n for n in names if n not in core and n != "__init__")
    return [n for n in core if n in names] + rest


def _methods_api(root: str) -> str:
    out = ["# dpmjax.methods", "",
           "Finetuning, distillation and adaptation methods: the registry, the `Program` / `Method` contract "
           "(`base`), the finetune loop (`loop`) and one module per method or shared core (every `.py` file in "
           "`dpmjax/methods/`, listed at build time). The guide: [How to add a method](../guides/add-method.md).",
           "", "::: dpmjax.methods", "    options:",
           "      members: [METHOD_MODULES, METHODS, get_method, finetune, load_student]", ""]
    for name in _method_modules(root):
        out += [f"::: dpmjax.methods.{name}", ""]
    return "\n".join(out)


def _serve_api(root: str) -> str | None:
    package = os.path.join(root, "dpmjax", "serve")
    if not os.path.isfile(os.path.join(package, "__init__.py")):
        return None
    out = ["# dpmjax.serve", "", "The co-serving HTTP server behind `dpmjax serve` (every module of "
           "`dpmjax/serve/`, listed at build time).", "", "::: dpmjax.serve", ""]
    for path in sorted(glob.glob(os.path.join(package, "*.py"))):
        name = os.path.splitext(os.path.basename(path))[0]
        if name != "__init__" and not name.startswith("_"):
            out += [f"::: dpmjax.serve.{name}", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- hooks

def _expand_nav(nav, root: str):
    """Replace the entries that point at a generated index by a section: the index, then its pages."""
    out = []
    for item in nav:
        if isinstance(item, dict) and len(item) == 1:
            (title, value), = item.items()
            if value == NOTEBOOKS_INDEX:
                children = [NOTEBOOKS_INDEX]
                for path in _notebooks(root):
                    children.append({_notebook_title(path)[0]: f"notebooks/{os.path.basename(path)}"})
                item = {title: children}
            elif value == BENCHMARKS_INDEX:
                _, pages = _benchmark_pages(root)
                item = {title: [BENCHMARKS_INDEX] + [{t: uri} for uri, t, _ in pages]}
            elif isinstance(value, list):
                children = _expand_nav(value, root)
                if API_INDEX in value and _serve_api(root) is not None:
                    children.append({"serve": SERVE_API})
                item = {title: children}
        out.append(item)
    return out


def on_config(config):
    config.nav = _expand_nav(config.nav or [], _root(config))
    return config


@event_priority(100)  # before mkdocs-jupyter's on_files, which must see the notebook files
def on_files(files, config):
    root = _root(config)
    generated = {NOTEBOOKS_INDEX: _notebooks_index(root), METHODS_API: _methods_api(root)}
    index, pages = _benchmark_pages(root)
    generated[BENCHMARKS_INDEX] = index
    generated.update({uri: page for uri, _, page in pages})
    serve = _serve_api(root)
    if serve is not None:
        generated[SERVE_API] = serve
    for uri, content in generated.items():
        if files.get_file_from_path(uri) is not None:
            log.warning("docs/%s exists but is generated by docs/_hooks/dpmjax_docs.py; remove it", uri)
            continue
        files.append(File.generated(config, uri, content=content))
    # A notebook is a File whose source folder is the repository root: its src_uri "notebooks/NAME.ipynb" places it
    # in the site, and mkdocs-jupyter (which reads abs_src_path = ROOT/notebooks/NAME.ipynb) renders it.
    # (File.generated(abs_src_path=...) would not do: mkdocs-jupyter's wrapper recomputes abs_src_path from
    # src_dir, which a generated file lacks.)
    for path in _notebooks(root):
        files.append(File(f"notebooks/{os.path.basename(path)}", src_dir=root, dest_dir=config.site_dir,
                          use_directory_urls=config.use_directory_urls))
    return files
