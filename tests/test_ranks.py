import pytest
from ranks import RankFileError, discover_ranks


def touch(folder, *names):
    for name in names:
        (folder / name).write_text("a prompt\n")


def test_ranks_in_numeric_order_and_gaps_allowed(tmp_path):
    touch(tmp_path, "10.in", "2.in", "0.in", "notes.txt")
    assert discover_ranks(tmp_path) == ["0", "2", "10"]


def test_names_that_are_not_ranks_are_listed(tmp_path):
    touch(tmp_path, "1.in", "x.in", "-3.in", "4.5.in")
    with pytest.raises(RankFileError) as error:
        discover_ranks(tmp_path)
    message = str(error.value)
    for name in ("x.in", "-3.in", "4.5.in"):
        assert name in message
    assert "1.in" not in message.replace("-3.in", "").replace("4.5.in", "")


def test_two_names_for_one_rank(tmp_path):
    touch(tmp_path, "7.in", "07.in", "8.in")
    with pytest.raises(RankFileError, match="07.in and 7.in"):
        discover_ranks(tmp_path)


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(RankFileError, match="has no <rank>.in files"):
        discover_ranks(tmp_path)
    with pytest.raises(RankFileError, match="does not exist"):
        discover_ranks(tmp_path / "missing")
