"""Pure size helpers: formatting bytes for people and parsing sizes people type."""

from __future__ import annotations

import pytest

from mlnb.units import GB, GiB, MiB, format_bytes, format_gib, parse_bytes


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (512 * MiB, "512.0 MiB"),
        (GiB, "1.0 GiB"),
        (int(3.7 * GiB), "3.7 GiB"),
        (-2048, "-2.0 KiB"),
        (2**40, "1024.0 GiB"),
    ],
)
def test_format_bytes_uses_binary_units_with_one_decimal(n, text):
    """Binary units pick the largest that fits; the sign is kept; no TiB step."""
    assert format_bytes(n) == text


def test_format_bytes_none_is_na():
    """``None`` (a field that is not available) shows as N/A, or the given placeholder."""
    assert format_bytes(None) == "N/A"
    assert format_bytes(None, na="-") == "-"


def test_format_gib_is_a_bare_figure():
    """The one-line report's ``peak 3.7 / 4.0 GiB`` needs bare GiB figures."""
    assert format_gib(4 * GiB) == "4.0"
    assert format_gib(int(3.75 * GiB) + 1) == "3.8"
    assert format_gib(GiB // 2, digits=2) == "0.50"
    assert format_gib(None) == "N/A"


@pytest.mark.parametrize(
    "text, n",
    [
        ("4GiB", 4 * GiB),
        ("4 GB", 4 * GB),
        ("4gb", 4 * GB),
        ("512MiB", 512 * MiB),
        (" 1.5 kib ", 1536),
        ("100", 100),
        ("100b", 100),
        ("2T", 2 * 10**12),
        (10, 10),
        (2.5, 2),
    ],
)
def test_parse_bytes_reads_sizes_people_type(text, n):
    """Decimal (GB) and binary (GiB) units, any case, spaces around, plain numbers as bytes."""
    assert parse_bytes(text) == n


@pytest.mark.parametrize("text", ["", "four GB", "4 XB", "4GiB!", "-1GB", "1.2.3 GB"])
def test_parse_bytes_rejects_nonsense_with_the_accepted_forms(text):
    """An unreadable size raises ValueError naming the text and the forms that work."""
    with pytest.raises(ValueError) as info:
        parse_bytes(text)
    message = str(info.value)
    assert repr(text) in message
    assert "4GiB" in message and "512MiB" in message


def test_parse_bytes_rejects_negative_numbers():
    """A negative number of bytes is refused."""
    with pytest.raises(ValueError, match=">= 0"):
        parse_bytes(-5)


def test_format_and_parse_round_trip():
    """What ``format_bytes`` prints, ``parse_bytes`` reads back (to the printed precision)."""
    for n in (3 * MiB, 5 * GiB, 1536):
        assert parse_bytes(format_bytes(n)) == n


@pytest.mark.parametrize("value", [float("inf"), float("nan"), True, [1], None])
def test_parse_bytes_refuses_what_is_not_a_size(value):
    with pytest.raises(ValueError):
        parse_bytes(value)
