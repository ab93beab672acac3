"""Interoperability with the PyTorch reference (Meta Lingua / facebookresearch/memory).

`lingua`: its YAML/JSON configs mapped onto `memjax.config.Config` and back.
`torch_checkpoint`: its consolidated checkpoints (`consolidated.pth` + `params.json`) loaded into
memjax models and written from them; needs PyTorch (`pip install memjax[torch]`), imported lazily.
`torch_reference`: an independent PyTorch implementation of its maths, the parity oracle of the
tests and the baseline of the benchmarks; imports PyTorch.
"""
