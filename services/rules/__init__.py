"""The rules service; its pure evaluator runs compiled when a current native build exists."""

from services.common.native import accelerate

NATIVE = accelerate(__name__, __path__)
