"""A file cut into chunks that each define something (a function, a class or its members, a type, a group of
top-level statements), with the names each one defines: what cross-file context picks from when the code at
the cursor uses those names.

One rule for every grammar, read from tree-sitter's node types and fields rather than a table per language: a
node whose type ends in a defining suffix (`function_definition`, `method_declaration`, `struct_item`,
`type_spec`, `variable_declarator`, `assignment`, ...) defines the first identifier under its `name`, `left`,
`declarator` or `type` field. A top-level node is a chunk; one longer than `max_chars` is cut into its header
and the members of its body (a class into its methods), recursively. Small top-level statements that define
nothing on their own (imports, expressions) are grouped. Without a grammar, blank lines cut the file into
paragraphs, and a paragraph defines the words of its first line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from inference.syntax.languages import Language, parse

if TYPE_CHECKING:
    import tree_sitter

CHUNK_CHARS = 1200  # a definition longer than this is cut into its header and its members
_DEFINES = ("definition", "declaration", "item", "spec", "specifier", "declarator", "assignment", "signature")
_NAME_FIELDS = ("name", "left", "declarator", "type")
_BODY_FIELDS = ("body", "definition", "declaration")  # where a node's members are (decorators, exports wrap)
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class CodeChunk:
    """Characters [start, stop) of a file, and the names defined there."""

    start: int
    stop: int
    names: frozenset[str]


def code_chunks(language: Language, text: str, max_chars: int = CHUNK_CHARS) -> list[CodeChunk]:
    """The file's chunks in order; they do not overlap (text between them, such as blank lines, is in none)."""
    source = text.encode("utf-8")
    tree = parse(language, source) if language.grammar else None
    if tree is None:
        return _paragraphs(text)
    chars = _char_offsets(text, source)
    chunks: list[CodeChunk] = []
    group: list[tree_sitter.Node] = []  # top-level statements that define nothing, waiting to be one chunk

    def flush() -> None:
        if group:
            chunks.append(CodeChunk(chars(group[0].start_byte), chars(group[-1].end_byte),
                                    frozenset().union(*(_defined(n) for n in group))))
            group.clear()

    for node in tree.root_node.named_children:
        if node.type.endswith("comment"):
            continue
        if _defined(node) - _plain_assignments(node):
            flush()
            chunks.extend(_split(node, chars, max_chars))
        else:
            if group and node.end_byte - group[0].start_byte > max_chars:
                flush()
            group.append(node)
    flush()
    return chunks


def _split(node: tree_sitter.Node, chars, max_chars: int) -> list[CodeChunk]:
    """One chunk for a node that fits; else its header and its members' chunks."""
    start, stop = chars(node.start_byte), chars(node.end_byte)
    body = _body(node)
    members = [] if body is None else [m for m in body.named_children if not m.type.endswith("comment")]
    if stop - start <= max_chars or not members:
        return [CodeChunk(start, stop, frozenset(_defined(node)))]
    out = [CodeChunk(start, chars(members[0].start_byte), frozenset(_own_names(node)))]
    for member in members:
        out.extend(_split(member, chars, max_chars))
    return out


def _body(node: tree_sitter.Node) -> tree_sitter.Node | None:
    """The node holding a definition's members: its body, through decorators and export wrappers."""
    for field in _BODY_FIELDS:
        child = node.child_by_field_name(field)
        if child is not None:
            return _body(child) if field != "body" else child
    return None


def _defines(node: tree_sitter.Node) -> bool:
    return node.type.endswith(_DEFINES)


def _own_names(node: tree_sitter.Node) -> set[str]:
    """The name a defining node gives (through wrappers such as decorators and exports)."""
    if not _defines(node):
        inner = next((node.child_by_field_name(f) for f in _BODY_FIELDS[1:] if node.child_by_field_name(f)), None)
        return _own_names(inner) if inner is not None else set()
    for field in _NAME_FIELDS:
        child = node.child_by_field_name(field)
        if child is not None and (name := _first_identifier(child)):
            return {name}
    return set()


def _defined(node: tree_sitter.Node, depth: int = 0) -> set[str]:
    """Names defined by a top-level node: its own, its members' (a class's methods and attributes), and those of
    defining nodes just under it (a Go `type_declaration`'s specs, an `expression_statement`'s assignment)."""
    names = _own_names(node)
    if depth >= 3:
        return names
    body = _body(node)
    children = body.named_children if body is not None and names else node.named_children
    for child in children:
        if _defines(child) or child.type in ("expression_statement", "decorated_definition", "export_statement"):
            names |= _defined(child, depth + 1)
    return names


def _plain_assignments(node: tree_sitter.Node) -> set[str]:
    """Names of a top-level `x = ...` statement (grouped with its neighbours rather than a chunk of its own)."""
    if node.type == "expression_statement" and node.named_children and node.named_children[0].type == "assignment":
        return _own_names(node.named_children[0])
    return set()


def _first_identifier(node: tree_sitter.Node) -> str | None:
    """The first identifier-typed node at or under `node` (a C declarator's name, a pattern's first binding)."""
    if node.type.endswith("identifier") or node.type == "name":
        text = node.text.decode("utf-8", "replace")
        return text if _WORD.fullmatch(text) else None
    for child in node.named_children:
        if (name := _first_identifier(child)) is not None:
            return name
    return None


def _char_offsets(text: str, source: bytes):
    """Byte offset -> character offset (the identity for ASCII text)."""
    if len(source) == len(text):
        return int
    starts = [0] * (len(source) + 1)
    at = 0
    for i, ch in enumerate(text):
        width = len(ch.encode("utf-8"))
        for b in range(width):
            starts[at + b] = i
        at += width
    starts[len(source)] = len(text)
    return starts.__getitem__


def _paragraphs(text: str) -> list[CodeChunk]:
    """Without a grammar: runs of non-blank lines, each defining the words of its first line."""
    chunks = []
    for match in re.finditer(r"(?:[^\n]*\S[^\n]*(?:\n|$))+", text):
        first = match.group().split("\n", 1)[0]
        chunks.append(CodeChunk(match.start(), match.end(), frozenset(_WORD.findall(first))))
    return chunks
