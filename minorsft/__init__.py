"""minorsft: fused kernels for fine-tuning losses measured against a reference model.

Public API (SPEC.md section 3): :func:`token_logprobs`, :func:`sft_loss`,
:func:`minor_sft_loss`, :func:`minor_dpo_loss`, :func:`dpo_loss` and the modules
:class:`SFTLoss`, :class:`MinorSFTLoss`, :class:`MinorDPOLoss`, :class:`DPOLoss`;
the fused linear path (hidden states + lm_head weight, no logits): ``linear_*``
functions and ``Linear*Loss`` modules; :data:`LOSSES`, the table of losses.
"""
import importlib.util as _ilu
import os as _os
import sys as _sys


def _source_tree_kernels() -> None:
    """Make ``minorsft.kernels`` importable from a source checkout (``PYTHONPATH=.``).

    setup.py installs the repository's top-level ``kernels/`` folder as
    ``minorsft.kernels``; used straight from the checkout there is no such package, so
    register the sibling folder under that name. Installed copies are untouched.
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
    fused_loss,
    lobass_learnability,
    minor_dpo_loss,
    minor_sft_loss,
    sft_loss,
    token_logprobs,
)
from minorsft.label_errors import (  # noqa: E402
    check_label_errors,
    raise_label_errors,
    take_label_errors,
)
from minorsft.linear import (  # noqa: E402
    linear_dpo_loss,
    linear_fused_loss,
    linear_minor_dpo_loss,
    linear_minor_sft_loss,
    linear_sft_loss,
    linear_token_logprobs,
)
from minorsft.losses import LOSSES, loss_from_token_logprobs  # noqa: E402
from minorsft.modules import (  # noqa: E402
    DPOLoss,
    LinearDPOLoss,
    LinearMinorDPOLoss,
    LinearMinorSFTLoss,
    LinearSFTLoss,
    MinorDPOLoss,
    MinorSFTLoss,
    SFTLoss,
)
from minorsft.ops import BACKENDS, select_backend  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "token_logprobs", "sft_loss", "minor_sft_loss", "minor_dpo_loss", "dpo_loss",
    "fused_loss", "linear_fused_loss", "lobass_learnability", "loss_from_token_logprobs", "select_backend", "BACKENDS", "losses",
    "LOSSES", "check_label_errors", "take_label_errors", "raise_label_errors", "SFTLoss", "MinorSFTLoss", "MinorDPOLoss", "DPOLoss",
    "linear_token_logprobs", "linear_sft_loss", "linear_minor_sft_loss", "linear_minor_dpo_loss",
    "linear_dpo_loss", "LinearSFTLoss", "LinearMinorSFTLoss", "LinearMinorDPOLoss", "LinearDPOLoss",
]
