"""Peak dense bf16 tensor-core throughput of GPUs, by name (no project imports, no torch).

The roofline lower bound on a step's time is its FLOPs over this peak: no kernel mix runs faster,
so a measured time far above it says how much of the chip a step leaves idle. Values are the
vendors' data-sheet figures *without* structured sparsity (the data sheets print the sparse
figure, twice these, first). Sources, as published by NVIDIA:

* A100 (SXM and PCIe, 40 and 80 GB): "NVIDIA A100 Tensor Core GPU" data sheet, BF16 Tensor Core
  312 TFLOPS (624 with sparsity).
* H100 SXM / H100 NVL / H100 PCIe: "NVIDIA H100 Tensor Core GPU" data sheet, BF16 Tensor Core
  1,979 / 1,671 / 1,513 TFLOPS with sparsity.
* H200 SXM / H200 NVL: "NVIDIA H200 Tensor Core GPU" data sheet, BF16 Tensor Core 1,979 / 1,671
  TFLOPS with sparsity (the H100's compute with more and faster memory).
* L40S: "NVIDIA L40S GPU" data sheet, BF16 Tensor Core 362.05 TFLOPS (733 with sparsity).

Half the sparse figure is rounded down to NVIDIA's dense figure (989.4 -> 989 in the H100
architecture white paper's table). A card not listed (L4, consumer cards, ...) has no roofline:
`plan --gpu-model` names the cards it knows, `benchmarks/gpu_bench.py --peak-tflops` takes any value.
benchmarks/README.md's "~790 TFLOP/s" for the H200 came from another source; this table is the
one `plan` and `benchmarks/gpu_bench.py` use.
"""

from __future__ import annotations

# (name, dense bf16 TFLOP/s); looked up in this order, so a more specific name precedes the
# name it contains ("H100 NVL" before "H100").
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.05),
)


def peak_bf16_tflops(device_name: str) -> tuple[str, float] | None:
    """(table name, dense bf16 TFLOP/s) of the first table name contained in `device_name`
    (case-insensitive: "NVIDIA H100 80GB HBM3" -> H100), or None when no name matches."""
    name = device_name.lower()
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name:
            return key, tflops
    return None


def known() -> list[str]:
    return [key for key, _ in PEAK_BF16_TFLOPS]
