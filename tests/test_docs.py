"""The documentation site (mkdocs.yml, docs/): it builds with warnings as errors, its API reference covers
every public name, and a broken cross-reference in a docstring fails the build.

The site is built once per session into a temporary folder (``mkdocs build --strict``, a subprocess of this
interpreter); the build needs no network and imports nothing from dpmjax (griffe reads the source).
"""
import os
import subprocess
import sys
import textwrap
import zlib

import pytest

for _module in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python", "material", "mkdocs_jupyter", "griffe"):
    pytest.importorskip(_module, reason="the docs extra: pip install -e '.[docs]'")

import griffe  # noqa: E402
import yaml  # noqa: E402  (a dependency of mkdocs)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "mkdocs.yml")
# Packages whose public names the API reference must cover (their __all__; dpmjax's re-exports otherwise).
PACKAGES = ("dpmjax", "dpmjax.samplers", "dpmjax.nn", "dpmjax.train", "dpmjax.metrics", "dpmjax.methods",
            "dpmjax.data", "dpmjax.search", "dpmjax.adjoint", "dpmjax.serve")


def mkdocs_build(config_file: str, site_dir: str, cwd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")  # mkdocs-material's banner about MkDocs 2
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", config_file,
                           "--site-dir", site_dir], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site_dir = str(tmp_path_factory.mktemp("site"))
    result = mkdocs_build(CONFIG, site_dir, ROOT)
    return result, site_dir


def read_inventory(path: str) -> set:
    """Object names in a Sphinx v2 ``objects.inv`` (what mkdocstrings writes): four header lines, then
    zlib-compressed lines ``name domain:role priority uri display``."""
    with open(path, "rb") as f:
        data = f.read()
    header_end = 0
    for _ in range(4):
        header_end = data.index(b"\n", header_end) + 1
    assert data.startswith(b"# Sphinx inventory version 2"), data[:60]
    lines = zlib.decompress(data[header_end:]).decode("utf-8").splitlines()
    return {line.split(" ", 1)[0] for line in lines if line.strip()}


def test_site_builds_strict(site):
    result, site_dir = site
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    for page in ("index.html", "getting-started/index.html", "concepts/index.html", "api/samplers/index.html",
                 "benchmarks/index.html", "notebooks/index.html", "guides/add-solver/index.html"):
        assert os.path.isfile(os.path.join(site_dir, page)), page


def test_benchmarks_and_notebooks_are_pulled_in(site):
    """Every ``##`` section of BENCHMARKS.md is a page linked from the summary; every notebook is rendered."""
    result, site_dir = site
    assert result.returncode == 0, result.stderr
    with open(os.path.join(ROOT, "BENCHMARKS.md"), encoding="utf-8") as f:
        headings = [line[3:].strip() for line in f if line.startswith("## ")]
    with open(os.path.join(site_dir, "benchmarks", "index.html"), encoding="utf-8") as f:
        summary = f.read()
    sections = [h for h in headings if not h.lower().startswith("summary")]
    assert sections
    linked = [name for name in os.listdir(os.path.join(site_dir, "benchmarks"))
              if os.path.isfile(os.path.join(site_dir, "benchmarks", name, "index.html"))]
    assert len(linked) == len(sections), (linked, sections)
    for name in linked:
        assert f'href="{name}/"' in summary, name
    notebooks = sorted(n for n in os.listdir(os.path.join(ROOT, "notebooks"))
                       if n.endswith(".ipynb")) if os.path.isdir(os.path.join(ROOT, "notebooks")) else []
    for name in notebooks:
        stem = os.path.splitext(name)[0]
        assert os.path.isfile(os.path.join(site_dir, "notebooks", stem, "index.html")), name
        assert os.path.isfile(os.path.join(site_dir, "notebooks", stem, name)), name  # the download link's file


def public_targets(package) -> dict:
    """name -> the documented object's path(s): ``__all__`` when the package defines it, else its re-exports
    (aliases, as dpmjax/__init__.py's). A re-exported name is documented where it is defined."""
    names = package.exports
    if names is None:
        names = [n for n, m in package.members.items() if m.is_alias and not n.startswith("_")]
    targets = {}
    for name in names:
        name = str(name)
        member = package.get_member(name)
        paths = {f"{package.path}.{name}"}
        if member.is_alias:
            try:
                paths.add(member.final_target.path)
            except griffe.AliasResolutionError:
                pass
        targets[name] = paths
    return targets


def test_api_reference_covers_every_public_name(site):
    result, site_dir = site
    assert result.returncode == 0, result.stderr
    inventory = read_inventory(os.path.join(site_dir, "objects.inv"))
    dpmjax = griffe.load("dpmjax", search_paths=[ROOT], resolve_aliases=True, resolve_external=False)
    missing, checked = [], 0
    for path in PACKAGES:
        try:
            package = dpmjax if path == "dpmjax" else dpmjax[path.split(".", 1)[1]]
        except KeyError:  # an optional package not in this checkout (dpmjax.serve)
            continue
        for name, paths in public_targets(package).items():
            checked += 1
            if not paths & inventory:
                missing.append(f"{path}.{name} (looked for {sorted(paths)})")
    assert checked > 50, checked
    assert not missing, "public names absent from the API reference (add them to a docs/api page):\n" + \
        "\n".join(missing)


def tiny_project(root, docstring: str) -> str:
    """A one-page mkdocs project documenting a module with ``docstring``, built with the mkdocstrings options
    of the real mkdocs.yml (so this test fails if those options stop reporting broken references)."""
    with open(CONFIG, encoding="utf-8") as f:
        real = yaml.load(f, Loader=yaml.SafeLoader)
    plugins = [p for p in real["plugins"] if isinstance(p, dict) and "mkdocstrings" in p]
    assert plugins, "mkdocs.yml has no mkdocstrings plugin"
    plugin = plugins[0]
    plugin["mkdocstrings"]["handlers"]["python"]["paths"] = ["src"]
    config = {"site_name": "tiny", "strict": True, "theme": {"name": "material", "font": False},
              "plugins": ["autorefs", plugin], "nav": ["index.md"]}
    os.makedirs(os.path.join(root, "docs"))
    os.makedirs(os.path.join(root, "src"))
    with open(os.path.join(root, "mkdocs.yml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f)
    with open(os.path.join(root, "docs", "index.md"), "w", encoding="utf-8") as f:
        f.write("# tiny\n\n::: tinymod\n")
    with open(os.path.join(root, "src", "tinymod.py"), "w", encoding="utf-8") as f:
        f.write(textwrap.dedent(f'''\
            """A module."""


            def documented(x):
                """{docstring}"""
                return x
            '''))
    return os.path.join(root, "mkdocs.yml")


def test_broken_docstring_reference_fails_the_strict_build(tmp_path):
    good = tiny_project(str(tmp_path / "good"), "Twice [`documented`][tinymod.documented], or see ``x``.")
    result = mkdocs_build(good, str(tmp_path / "good_site"), str(tmp_path / "good"))
    assert result.returncode == 0, f"the control project should build:\n{result.stdout}\n{result.stderr}"

    bad = tiny_project(str(tmp_path / "bad"), "See [`nowhere`][tinymod.does_not_exist].")
    result = mkdocs_build(bad, str(tmp_path / "bad_site"), str(tmp_path / "bad"))
    assert result.returncode != 0, f"a broken reference must fail the strict build:\n{result.stderr}"
    assert "tinymod.does_not_exist" in result.stderr, result.stderr
