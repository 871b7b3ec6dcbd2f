"""minorsft: fused kernels for fine-tuning losses measured against a reference model.

Public API (SPEC.md section 3): :func:`token_logprobs`, :func:`sft_loss`,
:func:`minor_sft_loss`, :func:`minor_dpo_loss`, :func:`dpo_loss` and the modules
:class:`SFTLoss`, :class:`MinorSFTLoss`, :class:`MinorDPOLoss`, :class:`DPOLoss`;
the fused linear path (hidden states + lm_head weight, no logits): ``linear_*``
functions and ``Linear*Loss`` modules.
"""
import importlib.util as _ilu
import os as _os
import sys as _sys


def _source_tree_kernels() -> None:
    """Make ``minorsft.kernels`` importable from a source checkout.

    The repository keeps the Triton kernels in a top-level ``kernels/`` folder that
    setup.py installs as ``minorsft.kernels``. When the package is used straight from
    the checkout (PYTHONPATH, a copied working tree) there is no ``minorsft/kernels``,
    so register the sibling folder under that name. Installed copies are untouched.
    """
    here = _os.path.dirname(_os.path.abspath(__file__))
    kdir = _os.path.join(_os.path.dirname(here), "kernels")
    init = _os.path.join(kdir, "__init__.py")
    if ("minorsft.kernels" in _sys.modules or _os.path.isdir(_os.path.join(here, "kernels"))
            or not _os.path.isfile(init)):
        return
    spec = _ilu.spec_from_file_location("minorsft.kernels", init, submodule_search_locations=[kdir])
    mod = _ilu.module_from_spec(spec)
    _sys.modules["minorsft.kernels"] = mod
    spec.loader.exec_module(mod)


_source_tree_kernels()

from minorsft import losses  # noqa: E402
from minorsft.functional import (  # noqa: E402
    dpo_loss,
    lobass_learnability,
    loss_from_token_logprobs,
    minor_dpo_loss,
    minor_sft_loss,
    sft_loss,
    token_logprobs,
)
from minorsft.linear import (  # noqa: E402
    LinearDPOLoss,
    LinearMinorDPOLoss,
    LinearMinorSFTLoss,
    LinearSFTLoss,
    linear_dpo_loss,
    linear_minor_dpo_loss,
    linear_minor_sft_loss,
    linear_sft_loss,
    linear_token_logprobs,
)
from minorsft.modules import DPOLoss, MinorDPOLoss, MinorSFTLoss, SFTLoss  # noqa: E402
from minorsft.ops import select_backend  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "token_logprobs", "sft_loss", "minor_sft_loss", "minor_dpo_loss", "dpo_loss",
    "lobass_learnability", "loss_from_token_logprobs", "select_backend", "losses",
    "SFTLoss", "MinorSFTLoss", "MinorDPOLoss", "DPOLoss",
    "linear_token_logprobs", "linear_sft_loss", "linear_minor_sft_loss", "linear_minor_dpo_loss",
    "linear_dpo_loss", "LinearSFTLoss", "LinearMinorSFTLoss", "LinearMinorDPOLoss", "LinearDPOLoss",
]
