"""Peak memory measured by PyTorch's profiler."""
import pytest
import torch

from detr_tutorial.profiling import peak_memory_mib

MIB = 2**18  # float32 elements in one MiB


def test_peak_counts_what_is_alive_together():
    def fn():
        a = torch.zeros(10 * MIB)
        b = torch.zeros(5 * MIB)  # 15 MiB alive here
        del a
        c = torch.zeros(2 * MIB)  # 7 MiB alive here
        return b, c

    assert peak_memory_mib(fn) == 15


def test_inputs_made_before_the_call_are_not_counted():
    x = torch.zeros(8 * MIB)
    assert peak_memory_mib(lambda: x.add_(1)) < 0.001  # in place: a few bytes for the scalar 1
    assert peak_memory_mib(lambda: x + 1) == pytest.approx(8, abs=0.001)  # the result only


def test_not_callable():
    with pytest.raises(TypeError, match="fn must be callable"):
        peak_memory_mib(torch.zeros(3))
