"""Syntax-aware stopping: where a completion at the cursor should end, decided while it streams.

* `scope.cursor_context(...).scope`: one line, or a block? A block when the cursor is in an empty body (right after
  `def f():`, on a blank line below it or at the end of that line, with nothing indented below); one line elsewhere.
* `stop.SyntaxStop.cut` (the StopRule of inference/generate.py): a single line ends at its line break, or earlier
  where the rest would repeat the text after the cursor (`foo(|)` and the model writes `x)`: keep `x`). A block ends
  when the node begun at the cursor is complete: in Python, at the next line that dedents out of it, unless
  tree-sitter shows that line continues the node (`else:` after an `if`, the `def` under a decorator).
* `finish.finish`: the last clean-up against the suffix: never repeat the text after the cursor, close the brackets
  the completion left open, drop trailing blank lines.

Brackets, strings and comments are tracked by a small lexer (`lexer`) that jumps between interesting characters with
one regex, so the cost of a call does not grow with the file: the context is computed once per request from a bounded
window before the cursor, and while streaming only new lines are scanned. Tree-sitter parses the few lines of a
header when the cursor follows a `:`, and while streaming parses only the completion, and only when a line
dedented to the node's level starts with a clause word.
"""
