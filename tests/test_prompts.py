"""Unit tests for scripts/rank/prompts.py: prompt files, output records, atomic writes."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

from formats.files import write_atomic
from rank.prompts import Prompt, PromptFileError, format_record, read_prompts

SEED_PROMPTS = [
    "The most important invention of the 21st century is",
    "When humans first make contact with aliens, the conversation begins with",
    "To solve climate change, the world must",
    "The secret to a long and fulfilling life is",
]


def write(tmp_path: Path, data: bytes, name: str = "0.in") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def texts(prompts: list[Prompt]) -> list[str]:
    return [p.text for p in prompts]


# ----------------------------------------------------------------------------- read_prompts


def test_seed_example_file(tmp_path):
    path = write(tmp_path, ("\n".join(SEED_PROMPTS) + "\n").encode())
    prompts = read_prompts(path)
    assert texts(prompts) == SEED_PROMPTS
    assert [p.line for p in prompts] == [1, 2, 3, 4]


def test_blank_and_whitespace_lines_skipped_line_numbers_kept(tmp_path):
    path = write(tmp_path, b"\n  \nfirst\n\t\n \t second \n\n\nthird")
    prompts = read_prompts(path)
    assert prompts == [Prompt("first", 3), Prompt("second", 5), Prompt("third", 8)]


def test_strip_like_the_seed(tmp_path):
    # The seed does line.strip(): inner whitespace stays, outer whitespace goes.
    path = write(tmp_path, "  a  b\t c \u3000\n\u00a0x\u00a0\n".encode())
    assert texts(read_prompts(path)) == ["a  b\t c", "x"]


def test_crlf(tmp_path):
    path = write(tmp_path, b"one\r\ntwo\r\n\r\nthree\r\n")
    prompts = read_prompts(path)
    assert prompts == [Prompt("one", 1), Prompt("two", 2), Prompt("three", 4)]
    assert all("\r" not in p.text for p in prompts)


def test_lone_cr_ends_a_line_like_text_mode(tmp_path):
    # Python's text mode (what the seed uses) treats a lone "\r" as a line end.
    path = write(tmp_path, b"one\rtwo\n")
    assert read_prompts(path) == [Prompt("one", 1), Prompt("two", 2)]


def test_utf8_bom_removed(tmp_path):
    path = write(tmp_path, b"\xef\xbb\xbfHello\nWorld\n")
    prompts = read_prompts(path)
    assert texts(prompts) == ["Hello", "World"]
    assert not prompts[0].text.startswith("\ufeff")


def test_bom_on_blank_first_line(tmp_path):
    path = write(tmp_path, b"\xef\xbb\xbf\r\nHello\r\n")
    assert read_prompts(path) == [Prompt("Hello", 2)]


def test_non_ascii_kept(tmp_path):
    lines = ["naïve café", "東京の天気は", "emoji 😀 ok", "Ελληνικά"]
    path = write(tmp_path, ("\n".join(lines) + "\n").encode())
    assert texts(read_prompts(path)) == lines


def test_empty_and_blank_only_files(tmp_path):
    assert read_prompts(write(tmp_path, b"", "a.in")) == []
    assert read_prompts(write(tmp_path, b"\n \r\n\t\n", "b.in")) == []
    assert read_prompts(write(tmp_path, b"\xef\xbb\xbf", "c.in")) == []


def test_no_trailing_newline(tmp_path):
    path = write(tmp_path, b"alpha\nbeta")
    assert read_prompts(path) == [Prompt("alpha", 1), Prompt("beta", 2)]


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = write(tmp_path, b"good line\n\nbad \xff byte here\nlater\n", "7.in")
    with pytest.raises(PromptFileError) as info:
        read_prompts(path)
    message = str(info.value)
    assert str(path) in message
    assert re.search(r"\bline 3\b", message), message


def test_invalid_utf8_line_counted_with_crlf_and_bom(tmp_path):
    path = write(tmp_path, b"\xef\xbb\xbfa\r\nb\r\n\r\n\xc3\x28\r\n", "x.in")
    with pytest.raises(PromptFileError, match=r"line 4\b"):
        read_prompts(path)


def test_latin1_file_rejected(tmp_path):
    path = write(tmp_path, "café\n".encode("latin-1"), "latin.in")
    with pytest.raises(PromptFileError, match=r"latin\.in.*line 1\b"):
        read_prompts(path)


def test_missing_file_is_prompt_file_error(tmp_path):
    missing = tmp_path / "nope.in"
    with pytest.raises(PromptFileError, match="nope.in"):
        read_prompts(missing)


# ----------------------------------------------------------------------------- format_record

TRICKY = [
    "plain",
    "it's",
    'say "hi"',
    "both ' and \"",
    "back\\slash",
    "trailing backslash \\",
    "a, b, c",
    "Prompt: 'x', Generated text: 'y'",
    ", Generated text: ",
    "naïve café 東京 😀",
    "tab\tinside",
    "\x00 nul and \x7f del",
    "\u2028 line separator",
    "",
]


def test_record_exact_seed_format():
    assert (
        format_record("Hello, my name is", " Joel")
        == "Prompt: 'Hello, my name is', Generated text: ' Joel'\n\n"
    )
    assert format_record("it's", 'a "b"') == 'Prompt: "it\'s", Generated text: \'a "b"\'\n\n'
    assert format_record("a\\b", "") == "Prompt: 'a\\\\b', Generated text: ''\n\n"


@pytest.mark.parametrize("prompt", TRICKY)
@pytest.mark.parametrize("generated", ["", " text", "multi\nline\r\noutput", 'it\'s "q" \\'])
def test_record_matches_seed_fstring(prompt, generated):
    expected = f"Prompt: {prompt!r}, Generated text: {generated!r}\n\n"
    assert format_record(prompt, generated) == expected


RECORD_RE = re.compile(r"Prompt: (?P<p>.*), Generated text: (?P<g>.*)")


def parse_records(text: str) -> list[tuple[str, str]]:
    """Parse seed records back: each is one line (repr escapes newlines) + a blank line."""
    assert text.endswith("\n\n") or text == ""
    records = []
    for block in text.split("\n\n")[:-1]:
        assert "\n" not in block
        # repr() of the prompt is a Python literal; find where it ends by trying the
        # candidate split points (the prompt itself may contain ", Generated text: ").
        for match in re.finditer(", Generated text: ", block):
            head, tail = block[: match.start()], block[match.end() :]
            try:
                prompt = ast.literal_eval(head.removeprefix("Prompt: "))
                generated = ast.literal_eval(tail)
            except (ValueError, SyntaxError):
                continue
            records.append((prompt, generated))
            break
        else:
            raise AssertionError(f"unparseable record {block!r}")
    return records


def test_round_trip_with_literal_eval():
    pairs = [(p, g) for p in TRICKY for g in ["", "x, y", "multi\nline", "q'\"\\"]]
    text = "".join(format_record(p, g) for p, g in pairs)
    assert parse_records(text) == pairs


def test_every_record_is_one_line_plus_blank():
    text = "".join(format_record(p, "gen\nerated\r") for p in TRICKY)
    lines = text.split("\n")
    assert lines[-1] == ""
    assert len(lines) == 2 * len(TRICKY) + 1
    assert all(line.startswith("Prompt: ") for line in lines[0:-1:2])
    assert all(line == "" for line in lines[1::2])


def test_prompts_from_file_round_trip(tmp_path):
    lines = ['it\'s "quoted"', "back\\slash, comma", "Prompt: fake", "東京 😀"]
    path = write(tmp_path, ("\n".join(lines) + "\n").encode())
    text = "".join(format_record(p.text, p.text) for p in read_prompts(path))
    assert parse_records(text) == [(line, line) for line in lines]


# ----------------------------------------------------------------------------- write_atomic


def test_write_atomic_text_and_bytes(tmp_path):
    target = tmp_path / "out.txt"
    write_atomic(target, "héllo\n")
    assert target.read_bytes() == "héllo\n".encode()
    write_atomic(target, b"\x00\xffbytes")
    assert target.read_bytes() == b"\x00\xffbytes"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_write_atomic_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "r.out"
    target.write_text("old")
    write_atomic(target, "new")
    assert target.read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["r.out"]


def test_write_atomic_empty_content(tmp_path):
    target = tmp_path / "empty.out"
    write_atomic(target, "")
    assert target.exists() and target.read_bytes() == b""


def test_write_atomic_mode_follows_umask(tmp_path):
    target = tmp_path / "mode.out"
    old = os.umask(0o022)
    try:
        write_atomic(target, "x")
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o644


def test_write_atomic_failure_keeps_target_and_removes_temp(tmp_path, monkeypatch):
    target = tmp_path / "keep.out"
    target.write_text("original")
    seen = []

    def failing_fsync(fd):
        seen.extend(p.name for p in tmp_path.iterdir() if p.name != "keep.out")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        write_atomic(target, "new content that must not appear")
    assert seen, "the data should have gone to a temporary file first"
    assert target.read_text() == "original"
    assert sorted(os.listdir(tmp_path)) == ["keep.out"]


def test_write_atomic_failure_without_target_creates_nothing(tmp_path, monkeypatch):
    target = tmp_path / "new.out"

    def failing_replace(src, dst):
        raise KeyboardInterrupt  # not even an Exception: cleanup must still happen

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, "data")
    assert os.listdir(tmp_path) == []


def test_write_atomic_bad_content_type_leaves_nothing(tmp_path):
    target = tmp_path / "t.out"
    with pytest.raises(TypeError):
        write_atomic(target, 12345)  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []
