import pytest

from compiler.limits import (
    MEMORY_BUDGET_ENV,
    MemoryBudget,
    describe_tensors,
    format_size,
    memory_budget,
    parse_size,
)
from edgec.errors import OptionError, ResourceLimitError
from edgec.manifest import TensorSpec


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1000000", 1_000_000),
        ("512MiB", 512 * 2**20),
        ("8g", 8 * 2**30),
        ("1.5 GiB", 3 * 2**29),
        ("64KB", 65536),
    ],
)
def test_sizes_are_parsed_in_powers_of_1024(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1GiB", "0", "8 GiBs", "1e9"])
def test_bad_sizes_say_what_is_expected(text):
    with pytest.raises(OptionError, match="expected a size such as 512MiB"):
        parse_size(text)


def test_sizes_are_shown_in_binary_units():
    assert format_size(100) == "100 bytes"
    assert format_size(3 * 2**29) == "1.5 GiB"
    assert format_size(4 * 10**10) == "37.3 GiB"


def test_budget_comes_from_the_option_then_the_environment_then_the_machine(monkeypatch):
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "2GiB")
    assert memory_budget(2**20) == MemoryBudget(2**20, "--memory-budget")
    assert memory_budget() == MemoryBudget(2 * 2**30, MEMORY_BUDGET_ENV)
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "plenty")
    with pytest.raises(OptionError, match=f"bad {MEMORY_BUDGET_ENV} 'plenty'"):
        memory_budget()
    monkeypatch.delenv(MEMORY_BUDGET_ENV)
    derived = memory_budget()
    assert derived.origin.startswith("half the ")
    assert derived.origin.endswith(" available")
    assert derived.limit_bytes >= 1


def test_reserve_counts_what_is_held_and_refuses_past_the_limit():
    budget = MemoryBudget(100, "test")
    budget.check(100, "whole", "fix it")
    budget.reserve(60, "first", "fix it")
    with pytest.raises(ResourceLimitError) as refused:
        budget.reserve(41, "second needs 41 bytes", "fix it")
    assert str(refused.value) == (
        "second needs 41 bytes, over the memory budget of 100 bytes (test, with 60 bytes already held); "
        "fix it, or raise the budget with --memory-budget SIZE or EDGEC_MEMORY_BUDGET"
    )
    assert budget.used_bytes == 60


def test_tensors_are_described_largest_first():
    specs = [
        TensorSpec(name=n, shape=[1, size], dtype="float32")
        for n, size in zip("abcd", [1, 4, 2, 3], strict=True)
    ]
    assert (
        describe_tensors(specs)
        == "inputs 'b' [1, 4] float32, 'd' [1, 3] float32, 'c' [1, 2] float32 (largest of 4)"
    )
    assert describe_tensors(specs[:1], "output") == "output 'a' [1, 1] float32"
