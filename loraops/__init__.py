"""loraops: LoRA/QLoRA fine-tuning under a data contract, a gate, a registry and DVC lineage."""

import logging


class _DropHarmlessBitsandbytesWarning(logging.Filter):
    """bitsandbytes' CPU backend warns at import that an optional hub kernel is missing, in every run
    (4-bit or not; peft imports it). Its own CPU kernels are used instead, so the line is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "gemm_4bit_forward from kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropHarmlessBitsandbytesWarning())
