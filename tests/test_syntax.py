"""Syntax-aware stopping: the scope at a cursor, the streaming stop rule, and the clean-up against the suffix."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference.generate import completion_text
from inference.syntax import stop as stop_module
from inference.syntax.finish import finish, repeated_suffix
from inference.syntax.scope import cursor_context
from inference.syntax.stop import SyntaxStop
from tests.decoding import fim, greedy
from tests.fixtures import never_ending


def stream(prefix: str, suffix: str, completion: str, scope: str | None = None, language: str = "python",
           step: int = 1) -> tuple[str, int]:
    """Feed the completion to a fresh rule `step` characters at a time, as a decoder would; returns the kept text
    and how many characters had been generated when the rule stopped."""
    rule = SyntaxStop(prefix, suffix, scope, language)
    for n in range(step, len(completion) + step, step):
        text = completion[:n]
        keep = rule.cut(text)
        if keep is not None:
            return text[:keep], len(text)
    keep = rule.cut(completion)
    return (completion if keep is None else completion[:keep]), len(completion)


# --- scope -------------------------------------------------------------------------------------------------------

EMPTY_BODIES = [
    "def f(x):\n    ",
    "async def f(x):\n    ",
    "class A(Base):\n    ",
    "if x > 0:\n    ",
    "if x:\n    pass\nelif y:\n    ",
    "if x:\n    pass\nelse:\n    ",
    "for i in range(3):\n    ",
    "while True:\n    ",
    "with open(p) as f:\n    ",
    "try:\n    ",
    "try:\n    pass\nexcept ValueError as e:\n    ",
    "try:\n    pass\nfinally:\n    ",
    "@decorator\ndef f():\n    ",
    "class A:\n    def f(self):\n        ",
    "def f(\n    a,\n    b,\n) -> int:\n    ",
    "def f(x):  # todo\n    ",
    "def f(x):\n\n    ",
    "def f(x):\n",
]


@pytest.mark.parametrize("prefix", EMPTY_BODIES)
def test_scope_is_multi_on_the_blank_line_of_an_empty_body(prefix):
    assert cursor_context(prefix, "\n").scope == "multi"
    assert cursor_context(prefix, "\n\nprint(1)\n").scope == "multi"  # a dedented line after it: still empty


@pytest.mark.parametrize("prefix", ["def f(x):", "class A:", "if x:", "for x in y:", "try:", "with a as b:"])
def test_scope_is_multi_at_the_end_of_a_header_with_an_empty_body(prefix):
    assert cursor_context(prefix, "\n").scope == "multi"
    assert cursor_context(prefix, "").scope == "multi"  # cursor at the end of the file


@pytest.mark.parametrize(("prefix", "suffix"), [
    ("def f(x):\n    ", "\n    return x\n"),  # the body exists below the cursor
    ("def f(x):", "\n    return x\n"),
    ("def f(x):\n    return x\n    ", "\n"),  # a blank line at the end of a body that has code
    ("x = foo(", ")\n"),  # mid-line, text after the cursor
    ("x = ", "\n"),  # after code on the line
    ("d = {'a':", "\n"),  # a dict's colon
    ("f = lambda:", "\n"),  # a lambda's colon
    ("y = x[1:", "\n"),  # a slice
    ("# if x:", "\n"),  # inside a comment
    ("s = 'if x:", "\n"),  # inside a string
    ("if x:", " pass\n"),  # text after the cursor
    ("", ""),  # empty file
    ("import os\n", ""),  # end of file
])
def test_scope_is_single_elsewhere(prefix, suffix):
    assert cursor_context(prefix, suffix).scope == "single"


def test_scope_uses_braces_for_other_languages():
    assert cursor_context("function f() {\n    ", "\n}\n", "javascript").scope == "multi"
    assert cursor_context("function f() {", "\n}\n", "javascript").scope == "multi"
    assert cursor_context("function f() {\n    ", "\n    return 1;\n}\n", "javascript").scope == "single"
    assert cursor_context("const a = f(", ");\n", "typescript").scope == "single"


# --- multi scope: the node begun at the cursor ------------------------------------------------------------------

@pytest.mark.parametrize(("prefix", "completion", "expected"), [
    ("def f(x):\n    ", "y = x * 2\n    return y\n\n\ndef g():\n    pass\n", "y = x * 2\n    return y"),
    ("class A:\n    ", "x = 1\n\n    def f(self):\n        return self.x\n\n\nclass B:\n",
     "x = 1\n\n    def f(self):\n        return self.x"),
    ("class A:\n    def f(self):\n        ", "return 1\n\n    def g(self):\n        pass\n", "return 1"),
    ("if x:\n    ", "a = 1\nelse:\n    a = 2\n", "a = 1"),  # the block ends; the else is not the block's
    ("for i in range(3):\n    ", "print(i)\n    total += i\nprint(total)\n", "print(i)\n    total += i"),
    ("while n:\n    ", "n -= 1\nprint(n)\n", "n -= 1"),
    ("with open(p) as f:\n    ", "data = f.read()\nreturn data\n", "data = f.read()"),
    ("try:\n    ", "x = 1\nexcept E:\n    pass\n", "x = 1"),
    ("def f():\n    ", "return [\n        x * x\n        for x in range(3)\n]\ny = 1\n",  # a comprehension
     "return [\n        x * x\n        for x in range(3)\n]"),
    ("def f():\n    ", 'return """\nno dedent\nin a string\n"""\nx = 1\n', 'return """\nno dedent\nin a string\n"""'),
    ("def f():\n    ", "x = g(\na,\nb)\n    return x\ny = 2\n", "x = g(\na,\nb)\n    return x"),
    ("def f():\n    ", "return {\n'a': 1,\n}\n# done\n", "return {\n'a': 1,\n}"),
])
def test_a_block_ends_at_the_line_that_dedents_out_of_it(prefix, completion, expected):
    assert cursor_context(prefix, "\n").scope == "multi"
    assert stream(prefix, "\n", completion)[0] == expected


@pytest.mark.parametrize(("prefix", "completion", "expected"), [
    ("if x:", "\n    a = 1\nelif y:\n    a = 2\nelse:\n    a = 3\nprint(a)\n",
     "\n    a = 1\nelif y:\n    a = 2\nelse:\n    a = 3"),
    ("try:", "\n    x = 1\nexcept E:\n    pass\nfinally:\n    y()\nz = 1\n",
     "\n    x = 1\nexcept E:\n    pass\nfinally:\n    y()"),
    ("for x in y:", "\n    pass\nelse:\n    done()\nz = 1\n", "\n    pass\nelse:\n    done()"),
    ("def f(x):", "\n    return x\nelse:\n    pass\n", "\n    return x"),  # a def has no else clause
    ("class A:\n    def f(self):", "\n        return 1\n\n    @property\n    def g(self):\n",
     "\n        return 1"),
])
def test_a_header_at_the_cursor_keeps_its_clauses(prefix, completion, expected):
    assert stream(prefix, "\n", completion)[0] == expected


def test_a_decorator_continues_into_its_definition():
    completion = "\ndef f():\n    return 1\n\nx = 1\n"
    assert stream("@functools.cache", "\n", completion, "multi")[0] == "\ndef f():\n    return 1"


def test_forced_multi_mid_body_stops_after_one_statement():
    prefix = "def f():\n    a = 0\n    "
    assert cursor_context(prefix, "\n    return a\n").scope == "single"
    assert stream(prefix, "\n    return a\n", "a += 1\n    b = 2\n", "multi")[0] == "a += 1"
    completion = "for i in range(3):\n        a += i\n    print(a)\n"
    assert stream(prefix, "\n", completion, "multi")[0] == "for i in range(3):\n        a += i"


def test_closing_the_cursors_bracket_or_string_ends_a_block():
    assert stream("x = foo(", "", "\n    a,\n    b,\n)\ny = 2\n", "multi")[0] == "\n    a,\n    b,\n)"
    assert stream("x = foo(", "\n)\n", "\n    a,\n    b,\n)\ny = 2\n", "multi")[0] == "\n    a,\n    b,"
    assert stream('x = """', "", 'doc\nmore"""\nx = 1\n', "multi")[0] == 'doc\nmore"""'
    assert stream('x = """', '"""\n', 'doc\nmore"""\nx = 1\n', "multi")[0] == "doc\nmore"


def test_a_body_that_does_not_indent_is_dropped():
    assert stream("def f(x):\n", "\n", "return x\n")[0] == ""


def test_the_stop_comes_as_soon_as_the_dedented_line_shows_its_first_word():
    completion = "return 1\nvalue = compute(1, 2, 3)\n"
    kept, generated = stream("def f():\n    ", "\n", completion)
    assert kept == "return 1"
    assert generated == len("return 1\nvalue ")  # the rest of that line is never generated


def test_a_line_repeating_the_suffix_ends_a_block():
    prefix, suffix = "for x in y:\n    ", "\n\nreturn total\n"
    assert stream(prefix, suffix, "total += x\nreturn total\n")[0] == "total += x"
    forced = stream("def f():\n    a = 1\n    ", "\n    return a\n", "a += 1\n    return a\n", "multi")[0]
    assert forced == "a += 1"


def test_braces_end_a_block_in_other_languages():
    js = "javascript"
    assert stream("function f() {\n    ", "\n}\n", "return 1;\n}\n\nfoo();\n", language=js)[0] == "return 1;"
    # At the end of the file the closing brace is the completion's to write, and it ends the completion.
    assert stream("function f() {", "", "\n    return 1;\n}\nfoo();\n", language=js)[0] == "\n    return 1;\n}"
    completion = "\n    if (a) {\n        b();\n    } else {\n        c();\n    }\n}\nfoo();\n"
    assert stream("function f() {", "", completion, language=js)[0] == completion[:completion.index("\nfoo")]


# --- single scope -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("prefix", "suffix", "completion", "expected"), [
    ("x = ", "\n", "compute(1)\ny = 2\n", "compute(1)"),
    ("def f(x):\n    return x\n", "\n", "\n\nprint(f(1))\nprint(2)\n", "\n\nprint(f(1))"),  # blank lines kept
    ("x = foo(", ")\n", "a, b) + 1\n", "a, b"),  # the suffix closes the call
    ("x = foo(", ")\n", "bar(1)) + 1\n", "bar(1)"),  # its own call is not cut
    ("x = foo(", ", y)\n", "a), z\n", "a"),
    ("xs = [", "]\n", "1, 2, 3]\n", "1, 2, 3"),
    ("s = \"", "\"\n", "hello\" + x\n", "hello"),
    ("s = '", "'\n", "it\\'s'\n", "it\\'s"),  # an escaped quote does not close the string
    ("x = ", "  # the answer\n", "42  # the answer\n", "42"),
    ("if x", ":\n", " > 0:\n", " > 0"),
    ("x = ", "1\n", "21\n", "21"),  # 211 is what the model meant: a number is not split
    ("print(", "\n", "'hi')\nprint(2)\n", "'hi')"),  # nothing after the cursor: the model closes the call
    ("    ", "\n    return x\n", "return x\n", ""),  # the next line, written again
])
def test_a_single_line_stops_at_its_end_or_where_the_suffix_takes_over(prefix, suffix, completion, expected):
    assert cursor_context(prefix, suffix).scope == "single"
    assert stream(prefix, suffix, completion)[0] == expected


def test_single_line_stops_before_generating_the_suffix_closer_line():
    kept, generated = stream("x = foo(", ")\n", "a) + b(c) + d(e)\n")
    assert kept == "a" and generated == 2


@pytest.mark.parametrize(("prefix", "completion", "expected"), [
    ("value = ", "compute()\r\nnext()\r\n", "compute()"),  # CRLF
    ("def f(x):\r\n    ", "y = x\r\n    return y\r\n\r\nz = 1\r\n", "y = x\r\n    return y"),
    ("def f(x):\n\t", "y = 1\n\treturn y\nz = 2\n", "y = 1\n\treturn y"),  # tabs
    ("def grüße(name):\n    ", "return f\"Hallo {name} ✓\"\nx = 1\n", "return f\"Hallo {name} ✓\""),
    ("", "import os\nimport sys\n", "import os"),  # empty file
])
def test_line_endings_tabs_and_non_ascii(prefix, completion, expected):
    suffix = "\r\n" if "\r" in completion else ""
    assert stream(prefix, suffix, completion, step=3)[0] == expected


LINES = st.text(alphabet="ab1 :=,()[]{}'\"#\\\n\t", max_size=30)
PREFIXES = st.sampled_from(["", "x = ", "foo(", "s = '", "def f(x):\n    ", "if x:", "class A:\n    def f(self):\n\t"])


@settings(max_examples=300, deadline=None)
@given(prefix=PREFIXES, suffix=LINES, completion=LINES, step=st.integers(1, 4))
def test_any_completion_is_cut_to_a_prefix_of_itself(prefix, suffix, completion, step):
    scope = cursor_context(prefix, suffix).scope
    kept, _ = stream(prefix, suffix, completion, step=step)
    assert completion.startswith(kept)
    if scope == "single":
        code = len(kept) - len(kept.lstrip())
        assert "\n" not in kept[code:]


def test_cut_is_stable_and_restarts_on_a_changed_text():
    rule = SyntaxStop("def f():\n    ", "\n")
    assert rule.cut("return 1\nx") is None
    assert rule.cut("return 1\nx ") == len("return 1")
    assert rule.cut("return 1\nx ") == len("return 1")  # greedy_decode asks again with the same text
    assert rule.cut("return 1\nx = 2") == len("return 1")
    # A text that does not extend the last one (a multi-byte character decoded in two steps) starts over.
    assert rule.cut("return '\ufffd") is None
    assert rule.cut("return 'é'\n") is None
    assert rule.cut("return 'é'\nx ") == len("return 'é'")


def test_cut_scans_only_new_text_on_a_long_file(monkeypatch):
    """Streaming cost, counted rather than timed: the long prefix is analysed once, and each call scans only
    the characters the completion gained, so a completion costs linear, not quadratic, work."""
    prefix = "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(700)) + "def g(x):\n    "
    completion = "".join(f"value_{i} = compute(x, {i})\n    " for i in range(30)) + "return x\nz = 1\n"
    scanned, advance = [0], stop_module.advance

    def counting_advance(lex, text, state, start=0, end=None, **kwargs):
        scanned[0] += (len(text) if end is None else end) - start
        return advance(lex, text, state, start, end, **kwargs)

    cursor_context.cache_clear()
    rule = SyntaxStop(prefix, "\n")
    monkeypatch.setattr(stop_module, "advance", counting_advance)
    calls = 0
    for n in range(4, len(completion) + 4, 4):
        calls += 1
        keep = rule.cut(completion[:n])
        if keep is not None:
            break
    assert keep == len(completion) - len("\nz = 1\n")
    assert cursor_context.cache_info().misses == 1
    # each complete line once, plus the unfinished tail of the line at each call (at most a line's worth)
    longest_line = max(len(line) for line in completion.splitlines(keepends=True))
    assert scanned[0] <= len(completion) + calls * longest_line, (scanned[0], calls)


# --- finish -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("prefix", "suffix", "text", "expected"), [
    ("foo(", ")\n", "x)", "x"),
    ("xs = [", "]\n", "1, 2]", "1, 2"),
    ("s = \"", "\"\n", "abc\"", "abc"),
    ("x = foo(", ")\nbar()\n", "a)\nbar()", "a"),  # the overlap runs over lines
    ("def f():\n    ", "\n    return x\n", "y = 1\n    return x", "y = 1"),  # a suffix line written again
    ("x = ", ")\n", "f(x)", "f(x)"),  # its own closer stays
    ("na", "e = 1\n", "me", "me"),  # an overlap inside a word is not trimmed
    ("x = ", "\n", "1\n\n   \n", "1"),  # trailing blank lines
    ("foo(", ", b)\n", "a, ", "a"),  # `foo(a, , b)` otherwise
    ("foo(", "b)\n", "a, ", "a, "),  # spacing before the suffix stays
    ("foo(", ", y)\n", "a), z", "a"),  # the suffix closes the call
])
def test_finish_never_repeats_the_suffix(prefix, suffix, text, expected):
    assert finish(text, prefix, suffix) == expected


@pytest.mark.parametrize(("prefix", "suffix", "text", "expected"), [
    ("x = ", "\n", "foo(a, [b", "foo(a, [b])"),
    ("x = foo(", ")\n", "bar(1", "bar(1)"),  # the suffix's `)` is the prefix's
    ("x = ", ")\n", "foo(1", "foo(1"),  # the suffix has a closer to spare
    ("x = ", ")\n", "foo([1", "foo([1]"),  # ... for the outermost bracket
    ("x = ", "\n", "'unterminated (", "'unterminated ("),  # inside a string: nothing to close
    ("x = ", "\n", "f(1)  # note (", "f(1)  # note ("),  # inside a comment
])
def test_finish_closes_the_brackets_the_completion_opened(prefix, suffix, text, expected):
    assert finish(text, prefix, suffix) == expected


def test_repeated_suffix_names_what_finish_removes():
    assert repeated_suffix("x)", "foo(", ")\n") == ")"
    assert repeated_suffix("y = 1\n    return x", "def f():\n    ", "\n    return x\n") == "\n    return x"
    assert repeated_suffix("y = 1\n    return x", "def f():\n    ", "\n\n    return x\n") == "    return x"
    assert repeated_suffix("y = 1\nreturn x", "def f():\n    ", "\n\n    return x\n") == ""  # not that line
    assert repeated_suffix("f(x)", "x = ", ")\n") == ""  # its own closer
    assert repeated_suffix("me", "na", "e = 1\n") == ""  # inside a word


CODE = st.text(alphabet="ab1 :=,()[]{}'\"#\\\n", max_size=24)


@settings(max_examples=300, deadline=None)
@given(prefix=CODE, suffix=CODE, text=CODE)
def test_finish_leaves_nothing_of_the_suffix_and_is_stable(prefix, suffix, text):
    out = finish(text, prefix, suffix)
    assert repeated_suffix(out, prefix, suffix) == ""
    assert finish(out, prefix, suffix) == out


def test_finish_with_crlf_and_an_empty_file():
    assert finish("y = 1\r\n\r\n", "def f():\r\n    ", "\r\n") == "y = 1"
    assert finish("", "", "") == ""
    assert finish("import os\n", "", "") == "import os"


# --- decoding ---------------------------------------------------------------------------------------------------

def _first_stop(rule: SyntaxStop, tokenizer, token_ids: list[int]) -> int:
    """How many of `token_ids` a decode streaming through `rule` keeps: up to the first that completes it."""
    token_bytes, data = tokenizer.token_bytes(), b""
    for n, token in enumerate(token_ids, 1):
        data += token_bytes[token]
        if rule.cut(completion_text(data)) is not None:
            return n
    return len(token_ids)


def test_greedy_decoding_with_the_single_line_rule(tiny_model):
    """The decode stops at the first token after which the rule holds, not later (the model runs on past
    it when unconstrained), and what it keeps is one line that does not repeat the suffix."""
    prefix, suffix = "def total(values):\n    return sum(", ")\n\nprint(total([1, 2]))\n"
    tok = never_ending(tiny_model.tokenizer)
    rule = SyntaxStop(prefix, suffix)
    assert rule.scope == "single"
    prompt = fim(tok, prefix, suffix, heal=False)
    draft = greedy(tiny_model, prompt, max_tokens=24, stop=rule, tokenizer=tok).drafts[0]
    free = greedy(tiny_model, prompt, max_tokens=24, stop=None, tokenizer=tok).drafts[0]
    assert len(free.token_ids) == 24
    assert draft.token_ids == free.token_ids[:_first_stop(SyntaxStop(prefix, suffix), tok, free.token_ids)]
    text = draft.text
    assert "\n" not in text.lstrip("\r\n") and free.text.startswith(text)
    out = finish(text, prefix, suffix)
    assert not any(out.endswith(suffix[:k]) for k in range(1, len(suffix) + 1) if suffix[:k].strip())


def test_greedy_decoding_with_the_block_rule(tiny_model):
    prefix, suffix = "class Stack:\n    def push(self, item):\n        ", "\n\n    def pop(self):\n        pass\n"
    tok = never_ending(tiny_model.tokenizer)
    rule = SyntaxStop(prefix, suffix)
    assert rule.scope == "multi"
    prompt = fim(tok, prefix, suffix, heal=False)
    draft = greedy(tiny_model, prompt, max_tokens=48, stop=rule, tokenizer=tok).drafts[0]
    free = greedy(tiny_model, prompt, max_tokens=48, stop=None, tokenizer=tok).drafts[0]
    assert len(free.token_ids) == 48
    assert draft.token_ids == free.token_ids[:_first_stop(SyntaxStop(prefix, suffix), tok, free.token_ids)]
    assert free.text.startswith(draft.text)
    out = finish(draft.text, prefix, suffix)
    lines = (prefix.rsplit("\n", 1)[-1] + out).splitlines()
    # No line of the block leaves the method body, and the suffix's next line is not written again.
    assert all(len(line) - len(line.lstrip()) > 4 for line in lines if line.strip()) or out.strip() == ""
    assert "    def pop(self):" not in out.splitlines()


@pytest.mark.parametrize(("other", "text", "keep"), [
    ("a]", "a) + 1", 1),  # another draft closed a bracket the cursor did not open: this one still stops at ")"
    ("b, c", "a) + 1", 1),
    ("a) + 1", "a", None),  # a shorter, different text is not the earlier one's decision
])
def test_one_stop_rule_shared_by_several_drafts_cuts_each_as_a_fresh_one(other, text, keep):
    """Decoders of several drafts (beam, superposed, forked) ask one stop rule about texts that do not extend
    each other; what it learnt on another draft's unfinished line must not carry over."""
    shared = SyntaxStop("x = f(", ")\n", "single")
    shared.cut(other)
    assert shared.cut(text) == SyntaxStop("x = f(", ")\n", "single").cut(text) == keep


@pytest.mark.parametrize(("prefix", "suffix", "text", "keep"), [
    ("x = f(", ")\n", "a] + 1", 1),  # "]" cannot close the cursor's "(": the line ends before it
    ("x = f(", ")\n", "a} + 1", 1),
    ("x = [f(", "]\n", "a) + 1", None),  # the model closes the "(" the suffix leaves open, and goes on
    ("x = [f(", "]\n", "a)]", 2),  # ... until it writes the suffix's own closer
])
def test_a_single_line_stops_before_a_closer_that_is_not_its_own(prefix, suffix, text, keep):
    assert SyntaxStop(prefix, suffix, "single").cut(text) == keep
