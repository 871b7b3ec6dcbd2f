"""Pure-PyTorch backends: the same math as the Triton kernels in ``minorsft.kernels``,
function for function and argument for argument (``torch_logprobs`` mirrors
``kernels/logprobs.py``, the fold that both the logits path and the fused linear path's
chunk driver use)."""
