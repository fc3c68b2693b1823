"""elora-fed: EnsembleLoRA as federated learning on Flower.

Importing it silences three messages that every worker printed and that the project cannot
act on; real warnings stay:
- bitsandbytes' CPU backend asks for its optional hub kernel (``kernels-community``),
  which needs a network download, and falls back to its own kernel either way;
- importing bitsandbytes builds ``torch.utils.mkldnn``, which uses the deprecated
  ``torch.jit.script_method``;
- peft's ``get_peft_model`` reads transformers' deprecated ``is_gradient_checkpointing``.

pytest resets warning filters per test, so ``pyproject.toml`` lists the two Python warnings again.
"""

import logging
import warnings


class _DropHubKernelNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropHubKernelNotice())
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script_method` is deprecated", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
