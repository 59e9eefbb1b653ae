"""What runs report: peak TFLOP/s looked up by device name (for MFU), whole words only."""

from __future__ import annotations

import pytest

from neo.train.metrics import PEAK_TFLOPS, peak_for_device


@pytest.mark.parametrize(
    "name, key",
    [
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40", "L40"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA GH200 480GB", "GH200"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA GeForce RTX 4090", "RTX 4090"),
        ("AMD Instinct MI300X", "MI300X"),
    ],
)
def test_device_names_match_whole_words(name, key):
    assert peak_for_device(name, "bf16") == PEAK_TFLOPS[key]["bf16"]


@pytest.mark.parametrize("name", ["NVIDIA L4X", "Tesla T4", "NVIDIA A1000", "NVIDIA B2000"])
def test_unknown_devices_have_no_peak(name):
    assert peak_for_device(name, "bf16") is None
