"""Running a checkpoint (imports quant, hub, checkpoint, files and ground): the placement planner, the
streaming loader, ``QuantLinear`` and its kernels, and ``generate``.

The kernels register themselves with :mod:`.qlinear` when :mod:`.kernels` is imported; importing it here
means any use of ``QuantLinear`` finds them (``qlinear`` itself never imports the kernels that import it).
"""

from . import kernels  # noqa: F401  (registers the built-in kernels)
