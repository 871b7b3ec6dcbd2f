"""Pure-PyTorch backends: the same math as the Triton kernels in ``minorsft.kernels``,
file for file and function for function (``torch_logprobs`` mirrors
``kernels/logprobs.py``, ``torch_linear`` mirrors ``kernels/linear.py``)."""
