"""Documentation checks: every ``>>>`` example in kspike's docstrings runs and shows its real
output, and the repository cites only documents a user can open (docs/, the code itself).

The examples are collected here with ``doctest`` (one pytest case per docstring) rather than
with pytest's ``--doctest-modules``, so that ``python -m pytest -q`` and ``pytest
tests/test_docs.py`` run them alike, under tests/conftest.py (seeded, CPU only, quiet, Agg
backend), with an explicit list of modules that are imported (never the command-line entry
point ``kspike/native/__main__.py``; importing ``kspike.native`` itself compiles nothing) and
an explicit list of known exceptions. Each docstring runs with its module's globals, as under
``--doctest-modules``; public examples still import what they use, as a reader copying them
would.
"""
import doctest
import importlib
import os
import pkgutil
import tempfile

import pytest

import kspike

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Command-line entry points, not library modules (``python -m kspike.native`` compiles the
# native loops on purpose).
_NOT_IMPORTED = {"kspike.native.__main__"}

# KNOWN EXCEPTION, to be dropped at merge time: these modules are being rewritten on other
# branches; their examples are collected and run but may fail (xfail, not strict).
KNOWN_FAILING_MODULES = set()

OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _module_names():
    names = ["kspike"]
    for info in pkgutil.walk_packages(kspike.__path__, "kspike."):
        if info.name not in _NOT_IMPORTED:
            names.append(info.name)
    return sorted(names)


def _collect():
    finder = doctest.DocTestFinder(exclude_empty=True)
    cases = []
    for name in _module_names():
        module = importlib.import_module(name)
        # Module globals, as `python -m pytest --doctest-modules` gives them: the examples of the
        # internal parts (e.g. kspike.training.checkpoints) use their module's own names; public
        # examples import what they use, so they also run when pasted elsewhere.
        for test in finder.find(module, name, globs=dict(vars(module))):
            if not test.examples:
                continue
            marks = []
            if name in KNOWN_FAILING_MODULES:
                marks.append(pytest.mark.xfail(
                    reason=f"{name} is being rewritten; its examples are fixed there",
                    strict=False))
            cases.append(pytest.param(test, id=test.name, marks=marks))
    return cases


DOCTESTS = _collect()


def test_examples_are_collected():
    names = {case.values[0].name for case in DOCTESTS}
    # A few docstrings that must always carry an example (a collection bug would drop them).
    for expected in ("kspike.cells.ALIF", "kspike.surrogates", "kspike.learning.eprop.EProp",
                     "kspike.rewiring.DeepR", "kspike.export.saved_model"):
        assert expected in names


@pytest.mark.parametrize("test", DOCTESTS)
def test_docstring_example(test, tmp_path, monkeypatch):
    # Examples that write files use tempfile; keep them inside pytest's temporary directory.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    report = []
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    result = runner.run(test, out=report.append)
    assert result.failed == 0, "".join(report)


# Built from pieces so that this file does not match its own search.
FORBIDDEN = ("REFERENCE" + ".md", "API" + ".md", "../" + "shared")
SEARCHED = ("kspike", "bin", "tests", "docs", "README.md")
TEXT_SUFFIXES = (".py", ".md", ".cc", ".h", ".txt", ".toml", ".cfg", ".ini", ".json", ".yaml",
                 ".yml", ".rst")


def _text_files():
    for entry in SEARCHED:
        path = os.path.join(ROOT, entry)
        if os.path.isfile(path):
            yield path
            continue
        for folder, subfolders, files in os.walk(path):
            subfolders[:] = [d for d in subfolders if d != "__pycache__"]
            for name in files:
                if name.endswith(TEXT_SUFFIXES):
                    yield os.path.join(folder, name)


def test_no_citation_of_documents_outside_the_repository():
    offending = []
    for path in _text_files():
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                for word in FORBIDDEN:
                    if word in line:
                        offending.append(f"{os.path.relpath(path, ROOT)}:{number}: {word}")
    assert not offending, "cite docs/ instead:\n" + "\n".join(offending)


def test_docs_pages_cited_in_the_code_exist():
    # Every "docs/<page>.md" named in the package, scripts or tests is a page of docs/.
    import re
    missing = set()
    for path in _text_files():
        if os.path.relpath(path, ROOT).startswith("docs"):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for page in re.findall(r"docs/([A-Za-z0-9_]+\.md)", f.read()):
                if not os.path.isfile(os.path.join(ROOT, "docs", page)):
                    missing.add(f"{os.path.relpath(path, ROOT)}: docs/{page}")
    assert not missing, "\n".join(sorted(missing))
