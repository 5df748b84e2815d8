"""What the compile report knows about each op (see benchmarks/compile_report.py).

One module per op, beside the kernels it describes: how to call the op's launcher for a
problem, and per kernel its work model (executed FLOPs, exp2 and operand bytes from the grid
and the tiles) and its exp2 tile. Adding or changing a kernel is an edit of its op's module:
a :class:`~benchmarks.compile_report.KernelSpec` in that module's ``KERNELS``.

The report runs without TRITON_INTERPRET (its command refuses it): under the interpreter the
kernel modules build the interpreter's configs, not the GPU's. The op modules import the
kernel modules inside their functions where they can.
"""

from benchmarks.compile_specs import (
    cam,
    pam_backward,
    pam_backward_fused_dv,
    pam_forward,
    pam_forward_full_width,
)

SPECS = (pam_forward.SPEC, pam_forward_full_width.SPEC, pam_backward.SPEC, pam_backward.DETERMINISTIC,
         pam_backward_fused_dv.SPEC, cam.FORWARD, cam.BACKWARD)
