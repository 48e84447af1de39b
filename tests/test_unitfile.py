"""Unit-file encoders: ExecStart= quoting checked against a reference parser of systemd's rules.

The reference parser below follows systemd's config_parse_exec (src/core/load-fragment.c):
the line is split into words like extract_first_word(EXTRACT_UNQUOTE|EXTRACT_CUNESCAPE)
does (whitespace separates, double and single quotes group, C escapes are decoded inside and
outside quotes), an unquoted lone ';' separates commands, the first word loses its prefix
characters (- @ : + !) and must be a "safe" absolute path or file name, and every word then
has its specifiers expanded (%% → %, %h → home; any other specifier is a test failure because
the encoder must never let one through).
"""

from __future__ import annotations

import pytest

from agor_systemd.unitfile import (
    HomePath,
    UnitFile,
    UnitValueError,
    check_text,
    exec_line,
    exec_word,
    path_value,
)
from agor_systemd.verify import verify_units

HOME = "/home/tester"
WHITESPACE = " \t\n\r"
SIMPLE_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    '"': '"',
    "'": "'",
    "s": " ",
}
PREFIXES = "-@:+!"


class ParseError(ValueError):
    pass


def _unescape(line: str, i: int) -> tuple[str, int]:
    """Decode the C escape at line[i] == '\\'; returns (text, index after it)."""
    if i + 1 >= len(line):
        raise ParseError("trailing backslash")
    ch = line[i + 1]
    if ch in SIMPLE_ESCAPES:
        return SIMPLE_ESCAPES[ch], i + 2
    if ch == "x":
        digits = line[i + 2 : i + 4]
        if len(digits) != 2 or any(c not in "0123456789abcdefABCDEF" for c in digits):
            raise ParseError(f"bad \\x escape at {i}")
        value = int(digits, 16)
        if value == 0:
            raise ParseError("\\x00 is refused")
        return chr(value), i + 4
    raise ParseError(f"unknown escape \\{ch}")


def _next_word(line: str, i: int) -> tuple[str | None, int]:
    """One word from position i (extract_first_word with UNQUOTE|CUNESCAPE), or None at the end."""
    while i < len(line) and line[i] in WHITESPACE:
        i += 1
    if i == len(line):
        return None, i
    word, quote = [], None
    while i < len(line):
        ch = line[i]
        if quote is None and ch in WHITESPACE:
            break
        if ch == "\\":
            text, i = _unescape(line, i)
            word.append(text)
            continue
        if quote is None and ch in "\"'":
            quote = ch
        elif ch == quote:
            quote = None
        else:
            word.append(ch)
        i += 1
    if quote is not None:
        raise ParseError("unbalanced quoting")
    return "".join(word), i


def _specifiers(word: str) -> str:
    out, i = [], 0
    while i < len(word):
        if word[i] != "%":
            out.append(word[i])
            i += 1
            continue
        spec = word[i + 1 : i + 2]
        if spec == "%":
            out.append("%")
        elif spec == "h":
            out.append(HOME)
        else:
            raise ParseError(f"specifier %{spec} reached systemd")
        i += 2
    return "".join(out)


def _is_unquoted_semicolon(line: str, i: int) -> bool:
    while i < len(line) and line[i] in WHITESPACE:
        i += 1
    return line[i : i + 1] == ";" and (i + 1 == len(line) or line[i + 1] in WHITESPACE)


def parse_exec(line: str) -> tuple[str, list[str]]:
    """(prefix characters, argv) as systemd would run them; one command only."""
    first, i = _next_word(line, 0)
    if first is None or first == ";":
        raise ParseError("no command")
    stripped = first.lstrip(PREFIXES)
    prefixes = first[: len(first) - len(stripped)]
    path = _specifiers(stripped)
    if not path:
        raise ParseError("empty path")
    if any(ord(c) < 0x20 or ord(c) == 0x7F or c in "\\\"'" for c in path):
        raise ParseError("executable name contains special characters")
    if path.endswith("/"):
        raise ParseError("executable path specifies a directory")
    argv = [path]
    while True:
        if _is_unquoted_semicolon(line, i):
            raise ParseError("a second command follows")
        word, i = _next_word(line, i)
        if word is None:
            return prefixes, argv
        argv.append(_specifiers(word))


def expected_argv(argv: list) -> list[str]:
    return [a.expand(HOME) if isinstance(a, HomePath) else a for a in argv]


# --- the reference parser itself ------------------------------------------------------------


@pytest.mark.parametrize(
    "line, parsed",
    [
        ("/bin/echo a  b", ("", ["/bin/echo", "a", "b"])),
        ('/bin/echo "a  b" c', ("", ["/bin/echo", "a  b", "c"])),
        ("/bin/echo 'x y'", ("", ["/bin/echo", "x y"])),
        ('/bin/echo a"b c"d', ("", ["/bin/echo", "ab cd"])),
        (r'/bin/echo "\x41\n\\\""', ("", ["/bin/echo", 'A\n\\"'])),
        ("-:/bin/echo 100%%", ("-:", ["/bin/echo", "100%"])),
        ("/bin/echo %h", ("", ["/bin/echo", HOME])),
    ],
)
def test_reference_parser(line, parsed):
    assert parse_exec(line) == parsed


@pytest.mark.parametrize(
    "line",
    ['/bin/echo "open', "/bin/echo a ; /bin/true", "/bin/echo %n", r"/bin/echo \q", '"/bin/a\\"b"', r"/bin/echo \x00"],
)
def test_reference_parser_refuses(line):
    with pytest.raises(ParseError):
        parse_exec(line)


# --- exec_word / exec_line --------------------------------------------------------------------

HOSTILE_WORDS = [
    "plain",
    "two words",
    " leading",
    "trailing ",
    "tab\there",
    "new\nline",
    "cr\rlf",
    "",
    "100%",
    "%h",
    "%%",
    "%n%i",
    "$HOME",
    "${HOME}",
    "$$",
    '"',
    "'",
    '"\'"',
    "\\",
    "\\\\",
    "\\n",
    "\\x41",
    ";",
    "\\;",
    "a;b",
    "--",
    "-",
    "@",
    ":",
    "+",
    "!",
    "ünïcödé ✓ 😀",
    "\x01\x1b[31m\x1f\x7f",
    "\u0085 \u2028 nel/ls",
    "#not a comment",
    "key=value",
    "[Section]",
]


def test_exec_line_starts_with_the_no_expansion_prefix():
    line = exec_line(["/bin/echo", "$HOME"])
    assert line.startswith(':"/bin/echo"')
    prefixes, argv = parse_exec(line)
    assert prefixes == ":" and argv == ["/bin/echo", "$HOME"]


@pytest.mark.parametrize("word", HOSTILE_WORDS)
def test_hostile_word_round_trips(word):
    argv = ["/usr/bin/env", word, "after"]
    assert parse_exec(exec_line(argv)) == (":", argv)


def test_all_hostile_words_in_one_line_round_trip():
    argv = ["/usr/bin/env", *HOSTILE_WORDS]
    line = exec_line(argv)
    assert "\n" not in line and "\r" not in line
    assert parse_exec(line) == (":", argv)


@pytest.mark.parametrize("code", [*range(1, 0x20), 0x7F])  # NUL: see test_nul_is_rejected
def test_every_control_character_round_trips(code):
    argv = ["/bin/x", f"a{chr(code)}b"]
    assert parse_exec(exec_line(argv)) == (":", argv)


def test_exec_word_encodings():
    assert exec_word("a b") == '"a b"'
    assert exec_word('say "hi"') == r'"say \"hi\""'
    assert exec_word("back\\slash") == r'"back\\slash"'
    assert exec_word("50%") == '"50%%"'
    assert exec_word("l1\nl2\t") == r'"l1\nl2\x09"'
    assert exec_word("") == '""'
    assert exec_word("$X") == '"$X"'


@pytest.mark.parametrize(
    "relative, rendered, expanded",
    [
        ("", '"%h"', HOME),
        (".local/share/agor/run.mjs", '"%h/.local/share/agor/run.mjs"', HOME + "/.local/share/agor/run.mjs"),
        ('odd "dir"/50%', r'"%h/odd \"dir\"/50%%"', HOME + '/odd "dir"/50%'),
    ],
)
def test_home_path_renders_with_the_h_specifier(relative, rendered, expanded):
    assert exec_word(HomePath(relative)) == rendered
    assert parse_exec(exec_line(["/bin/x", HomePath(relative)])) == (":", ["/bin/x", expanded])


def test_home_path_as_program():
    argv = [HomePath("bin/agor runner"), "x"]
    assert parse_exec(exec_line(argv)) == (":", expected_argv(argv))


def test_home_path_str_is_the_config_spelling():
    assert str(HomePath("")) == "~"
    assert str(HomePath("a/b")) == "~/a/b"
    assert HomePath("a").expand("/root/") == "/root/a"
    assert HomePath("").expand("/root") == "/root"


def test_empty_command_line_is_rejected():
    with pytest.raises(UnitValueError, match="empty command line"):
        exec_line([])


@pytest.mark.parametrize("value", ["a\0b", "\0"])
def test_nul_is_rejected(value):
    with pytest.raises(UnitValueError, match="NUL"):
        exec_word(value)
    with pytest.raises(UnitValueError, match="argument 1 contains a NUL"):
        exec_line(["/bin/x", value])
    with pytest.raises(UnitValueError, match="NUL"):
        exec_word(HomePath(value))


@pytest.mark.parametrize("value", ["\udcff", "caf\udce9", "\ud800"])
def test_non_utf8_is_rejected(value):
    # os.fsdecode of non-UTF-8 bytes gives lone surrogates; a unit file can't carry them
    with pytest.raises(UnitValueError, match="not valid UTF-8"):
        exec_word(value)
    with pytest.raises(UnitValueError, match="not valid UTF-8"):
        exec_word(HomePath(value))
    with pytest.raises(UnitValueError, match="argument 2"):
        exec_line(["/bin/x", "ok", value])


def test_check_text_names_what():
    with pytest.raises(UnitValueError, match=r"^\[sidecar\] command argument 3 contains a NUL byte$"):
        check_text("\0", "[sidecar] command argument 3")
    check_text("fine ✓", "x")


@pytest.mark.parametrize(
    "program",
    [
        '/opt/a"b/python',  # systemd: "Executable name contains special characters" → unit not loaded
        "/opt/a\\b/python",
        "/opt/tab\there/python",
        "-/bin/true",  # quoting does not protect prefixes: systemd reads ':-' = ignore failures
        "@/bin/true",  # ... '@' = next word is argv[0]
        "+/bin/true",  # ... '+' = full privileges
        "",  # "Empty path in command line"
        "/usr/bin/",  # "Executable path specifies a directory"
    ],
)
def test_program_word_systemd_would_refuse_or_reinterpret_is_rejected(program):
    """exec_line promises text 'systemd parses back to exactly the input' or UnitValueError.

    The first word is special in systemd (prefix characters, string_is_safe), and exec_line
    does not check it: these produce units that fail to load or run something else.
    """
    argv = [program, "arg"]
    try:
        line = exec_line(argv)
    except UnitValueError:
        return
    try:
        parsed = parse_exec(line)
    except ParseError as e:
        pytest.fail(f"exec_line({argv!r}) = {line!r}, which systemd refuses: {e}")
    assert parsed == (":", argv), f"systemd would run {parsed!r}"


# --- path_value -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, rendered",
    [
        ("/", "/"),
        ("/srv/agor", "/srv/agor"),
        ("/srv/my agor", "/srv/my agor"),
        ('/srv/"quoted"', '/srv/"quoted"'),
        ("/srv/$HOME", "/srv/$HOME"),
        ("/srv/100%", "/srv/100%%"),
        ("/srv/%h", "/srv/%%h"),
        ("/srv/ünï", "/srv/ünï"),
        (HomePath(""), "%h"),
        (HomePath("agor"), "%h/agor"),
        (HomePath("a b/50%"), "%h/a b/50%%"),
    ],
)
def test_path_value_accepts(value, rendered):
    assert path_value(value, "working_directory") == rendered


@pytest.mark.parametrize(
    "value, message",
    [
        ("relative/dir", "must be an absolute path"),
        ("", "must be an absolute path"),
        ("~/x", "must be an absolute path"),
        (" /srv", "must be an absolute path"),
        ("/srv/a\nb", "control character"),
        ("/srv/a\rb", "control character"),
        ("/srv/a\tb", "control character"),
        ("/srv/\x7f", "control character"),
        ("/srv/agor ", "leading or trailing whitespace"),
        (HomePath(" agor"), "leading or trailing whitespace"),
        ("/srv/../etc", "not a normalized path"),
        ("/srv/./agor", "not a normalized path"),
        ("/srv//agor", "not a normalized path"),
        ("/srv/agor/", "not a normalized path"),
        (HomePath(".."), "not a normalized path"),
        (HomePath("a//b"), "not a normalized path"),
        ("/srv/a\0b", "NUL"),
        ("/srv/\udcff", "not valid UTF-8"),
        (HomePath("\udcff"), "not valid UTF-8"),
    ],
)
def test_path_value_rejects(value, message):
    with pytest.raises(UnitValueError, match=message) as info:
        path_value(value, "[sidecar] working_directory")
    assert str(info.value).startswith("[sidecar] working_directory ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", ["/srv/agor\\", HomePath("agor\\")])
def test_path_value_rejects_a_trailing_backslash(value):
    """A unit-file line ending in a backslash continues on the next line (see the systemd
    check below): WorkingDirectory=/srv/agor\\ swallows the following Restart=always."""
    with pytest.raises(UnitValueError):
        path_value(value, "working_directory")


# --- UnitFile ---------------------------------------------------------------------------------


def test_render_keeps_section_and_key_order_with_header():
    unit = UnitFile("x.service", header="line one\n\nline three")
    unit.add("Unit", "Description", "d")
    unit.add("Service", "ExecStart", exec_line(["/bin/true"]))
    unit.add("Unit", "After", "a.target")
    unit.add("Service", "Environment", "A=1")
    unit.add("Install", "WantedBy", "default.target")
    assert unit.render() == (
        "# line one\n#\n# line three\n\n"
        "[Unit]\nDescription=d\nAfter=a.target\n\n"
        '[Service]\nExecStart=:"/bin/true"\nEnvironment=A=1\n\n'
        "[Install]\nWantedBy=default.target\n"
    )


def test_render_without_header_starts_with_the_first_section():
    unit = UnitFile("x.service")
    unit.add("Service", "Type", "oneshot")
    assert unit.render() == "[Service]\nType=oneshot\n"


def test_value_spanning_lines_is_rejected():
    unit = UnitFile("x.service")
    with pytest.raises(UnitValueError, match=r"^x.service: value for Description= spans lines$"):
        unit.add("Unit", "Description", "one\ntwo")
    assert unit.sections == {}


def test_value_with_a_carriage_return_is_rejected():
    """systemd's line reader also ends a line at '\\r' (see the systemd check below)."""
    unit = UnitFile("x.service")
    with pytest.raises(UnitValueError):
        unit.add("Unit", "Description", "one\rExecStart=/bin/sh")


# --- what systemd itself does with such lines (systemd-analyze verify, offline) ----------------

needs_analyze = pytest.mark.skipif(
    verify_units({"probe.service": "[Service]\nExecStart=/bin/true\n"}, user=False) != [],
    reason="systemd-analyze verify is not usable here",
)


@needs_analyze
def test_systemd_continues_a_line_ending_in_backslash():
    text = "[Service]\nType=oneshot\nWorkingDirectory=/srv/agor\\\nExecStart=/bin/true\n"
    problems = verify_units({"agor-cont.service": text}, user=False)
    assert any("has no ExecStart=" in p for p in problems), problems


@needs_analyze
def test_systemd_ends_a_line_at_carriage_return():
    text = "[Unit]\nDescription=a\rInjected=yes\n[Service]\nExecStart=/bin/true\n"
    problems = verify_units({"agor-cr.service": text}, user=False)
    assert any("Unknown key 'Injected'" in p for p in problems), problems


@needs_analyze
def test_systemd_refuses_a_quote_in_the_program_path():
    # systemd: "Executable name contains special characters" even when quoted; so we refuse first
    text = '[Service]\nExecStart=:"/usr/bin/py\\"thon3" "-V"\n'
    problems = verify_units({"agor-quote.service": text}, user=False)
    assert any("special characters" in p for p in problems), problems
    with pytest.raises(UnitValueError, match="cannot be started by systemd"):
        exec_line(['/usr/bin/py"thon3', "-V"])


@needs_analyze
def test_systemd_accepts_every_hostile_argument():
    units = {
        f"agor-hostile{i}.service": f"[Service]\nType=oneshot\nExecStart={exec_line(['/bin/true', w])}\n"
        for i, w in enumerate(HOSTILE_WORDS)
    }
    assert verify_units(units, user=False) == []
