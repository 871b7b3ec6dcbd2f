"""Triton kernels and their typed launchers (installed as ``minorsft.kernels``).

Only kernels live here: no autograd, no loss math. The folder is installed under
``minorsft.kernels`` because a top-level ``kernels`` would collide with Hugging
Face's ``kernels`` package.
"""
