"""Silences exactly one import-time notice of bitsandbytes that every pock_hf command would otherwise print.

On CPUs with AVX512-BF16, importing bitsandbytes (peft and transformers import it whenever it is installed) tries
to fetch a packed-layout NF4 kernel from the Hugging Face Hub and logs "Failed to load CPU gemm_4bit_forward from
kernels-community" when it cannot, even for `pock-eval --help`. Pock never uses that packed layout
(`tuner/quantize.keep_standard_layout`), so the notice says nothing about pock_hf; every other bitsandbytes
message still shows.
"""

from __future__ import annotations

import logging

BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropKernelNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(KERNEL_NOTICE)


def silence_bitsandbytes_kernel_notice() -> None:
    """Install the filter on bitsandbytes' CPU-backend logger (idempotent; works before bitsandbytes is imported,
    since `logging.getLogger` hands out the same logger object)."""
    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    if not any(isinstance(f, _DropKernelNotice) for f in logger.filters):
        logger.addFilter(_DropKernelNotice())
