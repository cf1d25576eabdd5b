"""The documentation resolves in a clean clone: README.md and every page under docs/ (and the
READMEs of datasets/, tools/ and dev/) link only to files of the repository, name only
configs, tools, maintainer scripts and ``python -m d2seg....`` modules that exist, and point
to nothing outside the repository (a clone has no ``../shared/`` next to it).

Links are checked as GitHub renders them: a relative link is resolved against the folder of
the page that holds it, ``#anchor`` parts must name a heading of the target page (GitHub's
heading ids), and links inside fenced code blocks are not links. Paths in the text and in
commands (``configs/....yaml``, ``tools/....py``, ``dev/....py``) are resolved against the
repository root, as the commands are run from there; a path with a wildcard must match at
least one file. A path inside another repository is written with that repository's name
(``AdelaiDet/configs/...``) and is not checked. In a git checkout a target must also be
tracked by git: a file that exists only in this working tree is absent from a clone.
"""
import glob
import os
import re
import subprocess
from functools import lru_cache

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _doc_files():
    names = ["README.md", "datasets/README.md", "tools/README.md"]
    names += sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True))
    names += sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "dev", "**", "README.md"), recursive=True))
    return [n for n in names if os.path.isfile(os.path.join(REPO, n))]


DOCS = _doc_files()

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target "title") and ![alt](target); the target has no spaces (GitHub's rule)
MD_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_REF = re.compile(r"<(?:img|a)\b[^>]*?\b(?:src|href)=\"([^\"]+)\"", re.I)
# a repository path named in text or commands; not part of a longer path (d2seg/model_zoo/configs/...)
REPO_PATH = re.compile(r"(?<![\w./-])((?:configs|tools|dev)/[\w./*?-]*?\.(?:yaml|py))(?![\w/-])")
MODULE = re.compile(r"python3?\s+-m\s+(d2seg(?:\.\w+)+)")
OUTSIDE = re.compile(r"(?<![\w-])(?:\.\./)*shared/|/work/")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


@lru_cache(maxsize=None)
def _tracked():
    """Repository-relative paths of the files git tracks and of their folders; None outside
    a git checkout (then existing on disk is enough)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    paths = set()
    for f in out.decode().split("\0"):
        while f:
            paths.add(f)
            f = os.path.dirname(f)
    return paths


def in_repository(path):
    """``path`` (repository-relative, normalised) is a file or folder a clone has."""
    tracked = _tracked()
    return os.path.exists(os.path.join(REPO, path)) and (tracked is None or path.rstrip("/") in tracked)


def _read(name):
    with open(os.path.join(REPO, name), encoding="utf-8") as f:
        return f.read()


def github_slug(heading):
    """The id GitHub gives a heading: the rendered text (links and code reduced to their
    text), lower-cased, without punctuation, spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text)
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(name):
    """Every heading id of the markdown file ``name`` (repository-relative), with GitHub's
    -1, -2 ... suffixes for repeated headings."""
    seen, ids = {}, set()
    for m in HEADING.finditer(FENCE.sub("", _read(name))):
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        ids.add(slug if n == 0 else f"{slug}-{n}")
    return ids


def link_problems(name, text):
    """Problems of the relative links and images of the page ``name`` with ``text``."""
    prose = FENCE.sub("", text)
    targets = MD_LINK.findall(INLINE_CODE.sub("", prose)) + HTML_REF.findall(prose)
    problems = []
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        if path.startswith("/"):
            problems.append(f"{name}: {target}: an absolute path does not resolve on GitHub or in a clone")
            continue
        resolved = os.path.normpath(os.path.join(os.path.dirname(name), path)) if path else name
        if resolved.startswith(".."):
            problems.append(f"{name}: {target}: points outside the repository")
        elif not in_repository(resolved):
            problems.append(f"{name}: {target}: {resolved} is not a file of the repository")
        elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
            problems.append(f"{name}: {target}: no heading #{anchor} in {resolved}")
    return problems


def path_problems(name, text):
    """Problems of the configs, tools, dev scripts and modules the page names."""
    problems = []
    for path in sorted(set(REPO_PATH.findall(text))):
        if any(c in path for c in "*?"):
            if not glob.glob(os.path.join(REPO, path), recursive=True):
                problems.append(f"{name}: {path}: matches no file")
        elif not (os.path.isfile(os.path.join(REPO, path)) and in_repository(path)):
            problems.append(f"{name}: {path}: not a file of the repository")
    for module in sorted(set(MODULE.findall(text))):
        rel = os.path.join("projects", *module.split(".")[1:])
        if not (os.path.isfile(os.path.join(REPO, rel + ".py")) or os.path.isfile(os.path.join(REPO, rel, "__main__.py"))):
            problems.append(f"{name}: python -m {module}: no {rel}.py")
    return problems


def outside_problems(name, text):
    """Mentions of files outside the repository (../shared/, /work/...)."""
    problems = []
    for i, line in enumerate(text.splitlines(), 1):
        m = OUTSIDE.search(line)
        if m:
            problems.append(f"{name}:{i}: {m.group(0)!r} is outside the repository: {line.strip()[:120]}")
    return problems


def test_the_pages_exist():
    assert "README.md" in DOCS and "docs/architecture.md" in DOCS and "docs/results.md" in DOCS, DOCS
    assert len(DOCS) >= 15, DOCS


@pytest.mark.parametrize("name", DOCS)
def test_links_and_images_resolve(name):
    problems = link_problems(name, _read(name))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", DOCS)
def test_named_configs_tools_and_modules_exist(name):
    problems = path_problems(name, _read(name))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", DOCS)
def test_nothing_outside_the_repository(name):
    problems = outside_problems(name, _read(name))
    assert not problems, "\n".join(problems)


def test_every_script_is_listed_in_its_folders_readme():
    """Each script (or package) that git tracks directly in tools/ or in a folder of dev/ is
    named in that folder's README.md, as `name` (a package also as `name/`)."""
    tracked = _tracked()
    if tracked is None:
        pytest.skip("not a git checkout")
    folders = ["tools"] + sorted(os.path.dirname(p) for p in tracked if re.fullmatch(r"dev/[^/]+/README\.md", p))
    assert "dev/bench" in folders and "dev/reference" in folders
    missing = []
    for folder in folders:
        readme = _read(f"{folder}/README.md")
        for entry in sorted(p for p in tracked if os.path.dirname(p) == folder):
            name = os.path.basename(entry)
            listed = f"`{name}`" in readme or f"`{name}/`" in readme  # a package as `name/`
            if name != "README.md" and not name.startswith((".", "__")) and not listed:
                missing.append(f"{folder}/README.md does not list `{name}`")
    assert not missing, "\n".join(missing)


def test_the_checks_catch_what_they_should():
    """The checkers themselves: each kind of broken reference is reported, and the
    correct forms are not."""
    page = "docs/example.md"
    bad = link_problems(page, "[a](missing.md) ![b](../nowhere.png) [c](results.md#no-such-heading) "
                              "[d](../../outside.md) [e](/abs/path.md)")
    assert len(bad) == 5, bad
    good = link_problems(page, "[a](results.md) ![b](quickstart_demo.jpg) [c](results.md#the-table) "
                               "[d](#x) [e](https://example.com/x.md)\n```\n[f](missing.md)\n```\n"
                               "`[g](missing.md)`")
    # '#x' names no heading of the (absent) page itself: the only problem reported
    assert good == [f"{page}: #x: {page} is not a file of the repository"], good
    assert path_problems(page, "run tools/no_such_tool.py and dev/no/such.py with configs/No/such.yaml"
                               " and configs/**/no_such_*.yaml; python -m d2seg.no_such_module") == [
        f"{page}: configs/**/no_such_*.yaml: matches no file",
        f"{page}: configs/No/such.yaml: not a file of the repository",
        f"{page}: dev/no/such.py: not a file of the repository",
        f"{page}: tools/no_such_tool.py: not a file of the repository",
        f"{page}: python -m d2seg.no_such_module: no projects/no_such_module.py",
    ]
    assert path_problems(page, "tools/train_net.py --config-file configs/quick/mask_rcnn_shapes.yaml; "
                               "configs/**/*shapes*.yaml; d2seg/model_zoo/configs/x.yaml; "
                               "AdelaiDet/configs/SOLOv2/R50_3x.yaml; "
                               "python -m d2seg.collect_env") == []
    assert len(outside_problems(page, "see ../shared/papers/x.md\nand shared/MEASUREMENTS.md\n/work/main")) == 3
    assert outside_problems(page, "the shared cores; d2seg's shared towers") == []
    # a file that exists but that git does not track is not in a clone
    assert in_repository("README.md") and in_repository("docs")
    if _tracked() is not None and os.path.isfile(os.path.join(REPO, ".git", "HEAD")):
        assert not in_repository(".git/HEAD")
    assert github_slug("Speed at parity: each reference and d2seg (`tools/x.py`)") == \
        "speed-at-parity-each-reference-and-d2seg-toolsxpy"
