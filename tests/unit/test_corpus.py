import ast

from training.toy import corpus


def test_split_is_deterministic_disjoint_and_covers_everything():
    sources = [corpus.SourceFile(f"pkg/mod{i}.py", "x = 1\n") for i in range(2000)]
    train, heldout = corpus.split_sources(sources, heldout_every=20)
    assert len(train) + len(heldout) == len(sources)
    assert not {s.relpath for s in train} & {s.relpath for s in heldout}
    # 1 in 20 held out: binomial(2000, 0.05) has sd ~9.7, so 100 +- 40 fails with p < 1e-4.
    assert 60 <= len(heldout) <= 140
    assert corpus.split_sources(sources, 20) == (train, heldout)
    # membership depends on the file's own path only, not on which other files exist
    assert corpus.split_sources(sources[:500], 20)[1] == [s for s in heldout if s in sources[:500]]


def test_read_sources_skips_site_packages_and_non_utf8(tmp_path):
    (tmp_path / "a.py").write_text("import os\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text("x = 'é'\n", encoding="utf-8")
    (tmp_path / "latin.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "c.py").write_text("y = 2\n")
    (tmp_path / "empty.py").write_text("\n")
    found = [s.relpath for s in corpus.read_sources(tmp_path)]
    assert found == ["a.py", "sub/b.py"]


def test_fingerprint_changes_with_content():
    a = [corpus.SourceFile("a.py", "x = 1\n")]
    b = [corpus.SourceFile("a.py", "x = 2\n")]
    assert corpus.fingerprint(a) == corpus.fingerprint(list(a))
    assert corpus.fingerprint(a) != corpus.fingerprint(b)


SOURCE = '''
class Stack:
    def push(self, item):
        """Push an item on top of the stack and return it."""
        self.items.append(item)
        return item

    def pop(self):
        """short"""
        return self.items.pop()

def undocumented():
    return 1
'''


def test_docstring_examples_are_dedented_parseable_functions():
    examples = list(corpus.docstring_examples(SOURCE))
    assert len(examples) == 1  # `pop` has a docstring under 20 characters; `undocumented` none
    doc, code = examples[0]
    assert doc == "Push an item on top of the stack and return it."
    assert code.startswith("def push(self, item):")
    assert isinstance(ast.parse(code).body[0], ast.FunctionDef)
    assert list(corpus.docstring_examples("def broken(:\n")) == []


def test_the_stdlib_corpus_is_present_and_large():
    sources = corpus.read_sources()
    assert len(sources) > 500
    assert sum(len(s.text) for s in sources) > 5_000_000
