"""Loading Hugging Face models as caldpo needs them: every layer the model's own code.

transformers 5.x replaces layers (norms, MLPs, rotary embeddings, attention) with kernels
from the hub (the ``kernels`` package) unless told not to: ``from_pretrained`` turns
``use_kernels`` on by default whenever ``USE_HUB_KERNELS`` is not ``NO``. A swapped layer
computes other numbers than the model's own forward that the fused head and the tests
compare against, needs a download at run time, and may not support the training path
(FSDP2, packed layouts). So every model caldpo loads goes through ``from_pretrained``
here, which switches the replacement off (the keyword where transformers has it, and the
environment variable for the lazily loaded function kernels) and checks that it stayed off.
"""
from __future__ import annotations

import os


def no_hub_kernels() -> None:
    """Switch off transformers' hub-kernel replacement for this process and its children."""
    os.environ["USE_HUB_KERNELS"] = "NO"


def hub_kernels_supported() -> bool:
    """Whether this transformers knows hub kernels (``PreTrainedModel.set_use_kernels``, 5.x)."""
    from transformers import PreTrainedModel
    return hasattr(PreTrainedModel, "set_use_kernels")


def from_pretrained(auto_cls, path, **kwargs):
    """``auto_cls.from_pretrained(path, **kwargs)`` with hub kernels off.

    Args:
        auto_cls: a transformers class with ``from_pretrained`` (``AutoModelForCausalLM``,
            ``AutoModelForSequenceClassification``, a model class).
        path: a local folder or hub name, as transformers takes it.
        kwargs: passed through (``dtype``, ``attn_implementation``, ``config``, ...).

    Returns: the model, its layers those of its own modeling code (with ``output_loading_info=True``,
        transformers' pair: the model and its loading info, e.g. ``missing_keys``).

    Raises:
        RuntimeError: the model came back kernelized anyway (a transformers that ignores the
            switch): training it would not compute the model's own function.
    """
    no_hub_kernels()
    if hub_kernels_supported():
        kwargs["use_kernels"] = False
    model = auto_cls.from_pretrained(path, **kwargs)
    loaded = model[0] if kwargs.get("output_loading_info") else model  # (model, loading info) when asked
    if getattr(loaded, "use_kernels", False):
        raise RuntimeError(f"{path}: transformers replaced layers with hub kernels although use_kernels=False "
                           "and USE_HUB_KERNELS=NO were given; caldpo cannot train such a model")
    return model
