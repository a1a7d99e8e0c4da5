import pytest

from furiosa_llm.hal import CoreRange, Device, parse_device, parse_devices
from furiosa_llm.hal.discovery import check_available


@pytest.mark.parametrize(
    "text,expected",
    [
        ("npu:0", Device("npu", 0)),
        ("npu:3:5", Device("npu", 3, CoreRange(5, 5))),
        ("npu:1:4-7", Device("npu", 1, CoreRange(4, 7))),
        ("npu:0:0-7", Device("npu", 0, CoreRange(0, 7))),
        ("npu:0:2-3", Device("npu", 0, CoreRange(2, 3))),
        ("cpu", Device("cpu")),
        ("cuda:1", Device("cuda", 1)),
    ],
)
def test_valid_devices_round_trip(text, expected):
    d = parse_device(text)
    assert d == expected
    assert str(d) == text
    assert parse_device(str(d)) == d


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("npu:0:1-2", "multiple of 2"),
        ("npu:0:0-2", "span 3"),
        ("npu:0:8", "PE index"),
        ("npu:0:3-1", "below its start"),
        ("npu:0:2-5", "multiple of 4"),
        ("gpu:0", "expected"),
        ("npu:", "expected"),
        ("npu:a", "expected"),
        ("", "expected"),
    ],
)
def test_invalid_devices_name_token_and_rule(text, fragment):
    with pytest.raises(ValueError) as e:
        parse_device(text)
    assert fragment in str(e.value)
    assert repr(text.strip()) in str(e.value)


def test_device_lists():
    ds = parse_devices("npu:0:0-3,npu:0:4-7,npu:1")
    assert [str(d) for d in ds] == ["npu:0:0-3", "npu:0:4-7", "npu:1"]
    assert sum(d.num_pes for d in ds) == 16
    with pytest.raises(ValueError, match="overlaps"):
        parse_devices("npu:0:0-3,npu:0:2-3")
    with pytest.raises(ValueError, match="mix"):
        parse_devices("cpu,npu:0")
    with pytest.raises(ValueError, match="at least one"):
        parse_devices(" , ")


def test_missing_npu_is_an_error_listing_available():
    with pytest.raises(ValueError, match=r"not available.*available: cpu"):
        check_available([parse_device("npu:0")])
