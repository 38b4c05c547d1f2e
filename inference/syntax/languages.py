"""The languages the syntax rules know, in one table: how to lex each one, its tree-sitter grammar, and the LSP
language ids and file extensions that name it. Everything language-specific in the rules is read from here; a
language not in the table gets the text rules (the lexer alone, with C-like or `#` comments).

Grammars come from the per-language `tree-sitter-<name>` wheels pinned in pyproject.toml (about 1.2 MB for all
eight; tree-sitter-language-pack would bring hundreds of languages at ~50x the size). They are imported on
first use, so a server that only sees Python never loads the others.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from inference.syntax.lexer import Lexicon

if TYPE_CHECKING:  # tree-sitter loads on first parse: the LSP process reads this table without it
    import tree_sitter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Language:
    """One language as the syntax rules see it."""

    name: str  # the table's key ("tsx" for TypeScript with JSX); an unknown LSP id for the text rules
    lexicon: Lexicon
    grammar: tuple[str, str] | None = None  # (module, function) of the wheel that gives tree-sitter its grammar
    compound: frozenset[str] = frozenset()  # node types whose header ends in the block opener (indented blocks)
    error_continues: bool = False  # a line tree-sitter can only parse as an error still continues the node
    confirmed: frozenset[str] = frozenset()  # clause words that continue the node only if tree-sitter agrees

    @property
    def rules(self) -> str:
        """Which rules the table gives (without loading the grammar: the LSP process reads it too; a wheel that
        fails to load is logged by the engine, which then uses the text rules)."""
        return f"{self.name} (tree-sitter)" if self.grammar else f"{self.name} (text rules)"


_C_COMMENTS = (("//",), ("/*", "*/"))
# `{` on its own line (Allman style) continues a statement too, but may also open a block of its own: tree-sitter
# confirms it. `else`, `catch` and `finally` always continue.
_BRACE_CLAUSES = frozenset({"else", "catch", "finally", "{"})
_BRACE_CONFIRMED = frozenset({"{"})
DECORATED_WORDS = frozenset({"def", "class", "async", "@"})  # what may follow a Python decorator at its indentation

PYTHON = Lexicon(("#",), None, ('"""', "'''", '"', "'"), frozenset({'"""', "'''"}),
                 frozenset({"elif", "else", "except", "finally"}), ":")
JAVASCRIPT = Lexicon(*_C_COMMENTS, ('"', "'", "`"), frozenset({"`"}), _BRACE_CLAUSES, "{")  # `${}` stays in the string
GO = Lexicon(*_C_COMMENTS, ('"', "'", "`"), frozenset({"`"}), _BRACE_CLAUSES, "{", raw_quotes=frozenset({"`"}))
# Rust strings span lines; r"…" and r#"…"# are raw; a ' opens a char literal only where one ends ('a', '\n',
# '\u{1F600}'), otherwise it is a lifetime (`&'a str`).
RUST = Lexicon(*_C_COMMENTS, ('r#"', 'r"', '"'), frozenset({'r#"', 'r"', '"'}), _BRACE_CLAUSES, "{",
               raw_quotes=frozenset({'r#"', 'r"'}), quote_ends=(('r#"', '"#'),),
               atoms=r"'(?:\\(?:u\{[0-9a-fA-F_]*\}|x[0-9a-fA-F]{2}|.)|[^'\\\n])'")
C = Lexicon(*_C_COMMENTS, ('"', "'"), frozenset(), _BRACE_CLAUSES, "{")
CPP = Lexicon(*_C_COMMENTS, ('R"(', '"', "'"), frozenset({'R"('}), _BRACE_CLAUSES, "{",
              raw_quotes=frozenset({'R"('}), quote_ends=(('R"(', ')"'),))
JAVA = Lexicon(*_C_COMMENTS, ('"""', '"', "'"), frozenset({'"""'}), _BRACE_CLAUSES, "{")  # """ text blocks
# The text rules, for languages not in the table.
C_LIKE = Lexicon(*_C_COMMENTS, ('"', "'", "`"), frozenset({"`"}), frozenset({"else", "catch", "finally"}), "{")
HASH_COMMENTS = Lexicon(("#",), None, ('"', "'"), frozenset(),
                        frozenset({"else", "elif", "elsif", "rescue", "ensure"}), "{")
_HASH_LANGUAGES = frozenset({"shellscript", "bash", "sh", "ruby", "perl", "r", "yaml", "toml", "makefile",
                             "dockerfile", "elixir", "julia", "nim", "coffeescript", "powershell"})

# Python statements whose header ends in ':' and opens a block (tree-sitter-python node types).
PYTHON_COMPOUND = frozenset({
    "function_definition", "class_definition", "if_statement", "elif_clause", "else_clause", "for_statement",
    "while_statement", "with_statement", "try_statement", "except_clause", "except_group_clause", "finally_clause",
    "match_statement", "case_clause",
})


def _braces(name: str, lexicon: Lexicon, module: str, function: str = "language") -> Language:
    """A language of `{ }` blocks; a block left open is often an error to tree-sitter, so an error continues."""
    return Language(name, lexicon, (module, function), error_continues=True, confirmed=_BRACE_CONFIRMED)


LANGUAGES: dict[str, Language] = {language.name: language for language in (
    # In Python `else` may belong to the `if`, the `for` or the `try`: tree-sitter confirms every clause.
    Language("python", PYTHON, ("tree_sitter_python", "language"), PYTHON_COMPOUND,
             confirmed=PYTHON.clause_words | DECORATED_WORDS),
    _braces("javascript", JAVASCRIPT, "tree_sitter_javascript"),
    _braces("typescript", JAVASCRIPT, "tree_sitter_typescript", "language_typescript"),
    _braces("tsx", JAVASCRIPT, "tree_sitter_typescript", "language_tsx"),
    _braces("go", GO, "tree_sitter_go"),
    _braces("rust", RUST, "tree_sitter_rust"),
    _braces("c", C, "tree_sitter_c"),
    _braces("cpp", CPP, "tree_sitter_cpp"),
    _braces("java", JAVA, "tree_sitter_java"),
)}

# LSP language ids (as VS Code and Neovim send them) that are not the table's names.
LSP_IDS = {"javascriptreact": "javascript", "typescriptreact": "tsx", "c++": "cpp", "cuda": "cpp",
           "objective-c": "c", "objective-cpp": "cpp"}
# The fallback when the id says nothing (plaintext, or a client that sends none): the file's extension.
EXTENSIONS = {".py": "python", ".pyi": "python", ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript",
              ".jsx": "javascript", ".ts": "typescript", ".mts": "typescript", ".cts": "typescript", ".tsx": "tsx",
              ".go": "go", ".rs": "rust", ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp",
              ".hh": "cpp", ".hpp": "cpp", ".hxx": "cpp", ".java": "java", ".rb": "ruby", ".sh": "shellscript",
              ".lua": "lua"}


def language_of(language_id: str, uri: str = "") -> Language:
    """The language for an LSP language id, or for the extension of `uri` when the id is not one the table
    knows; the text rules otherwise."""
    language_id = (language_id or "").lower()
    name = LSP_IDS.get(language_id, language_id)
    if name not in LANGUAGES and uri:
        name = EXTENSIONS.get(PurePosixPath(unquote(urlparse(uri).path)).suffix.lower(), name)
    if name in LANGUAGES:
        return LANGUAGES[name]
    return Language(name or "plaintext", HASH_COMMENTS if name in _HASH_LANGUAGES else C_LIKE)


@lru_cache(maxsize=None)
def _grammar(module: str, function: str) -> tree_sitter.Language | None:
    import tree_sitter

    try:
        return tree_sitter.Language(getattr(importlib.import_module(module), function)())
    except (ImportError, AttributeError, ValueError) as err:  # a missing or incompatible wheel: text rules
        log.warning("tree-sitter grammar %s.%s unavailable (%s); using the text rules", module, function, err)
        return None


def parse(language: Language, source: bytes) -> tree_sitter.Tree | None:
    """The tree of `source`, or None without a grammar. A parser per call: safe across threads."""
    import tree_sitter

    grammar = _grammar(*language.grammar) if language.grammar else None
    return None if grammar is None else tree_sitter.Parser(grammar).parse(source)
