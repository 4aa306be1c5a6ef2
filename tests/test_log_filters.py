"""Importing pock_hf silences bitsandbytes' kernel notice (issue: printed by every CLI call on AVX512-BF16 CPUs)
and nothing else bitsandbytes says."""

from __future__ import annotations

import logging

import pock_hf  # noqa: F401  (installs the filter)
from pock_hf.log_filters import BITSANDBYTES_CPU_LOGGER


def test_only_the_kernel_notice_is_dropped(caplog):
    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    with caplog.at_level(logging.WARNING, logger=BITSANDBYTES_CPU_LOGGER):
        # the exact call bitsandbytes makes at import on a CPU with AVX512-BF16 when the Hub kernel is unreachable
        logger.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
            "`pip install kernels` and the kernels >= 0.11.1",
            ConnectionError("no network"),
        )
        logger.warning("some other bitsandbytes warning")
    assert [record.getMessage() for record in caplog.records] == ["some other bitsandbytes warning"]
