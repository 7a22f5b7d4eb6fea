"""``--compile-layers BACKEND``: torch.compile for the plugin's models, in fairseq-train and fairseq-generate.

TorchScript is not supported: fairseq's ``--export`` / ``torch.jit.script`` stop at the small functions our layers
hand to their method (``connection.sublayer(layer, name, x, f, norm, carry)``), because TorchScript compiles no
nested functions or closures. Those functions are what keeps each of the twelve methods one small class, and
TorchScript has been in maintenance mode since PyTorch 2.0, so we did not rewrite the layers around it.
torch.compile traces the same Python code as it runs instead.

Each encoder and decoder layer is compiled in place (``nn.Module.compile``): parameter names, state dicts and
checkpoints stay as they are, and a checkpoint decodes with or without it. Shapes follow torch's default: the
first batch compiles for its shape, the first batch of another shape recompiles with symbolic sizes (compiling
dynamic from the start took 5x longer for the same model here). ``inductor`` generates fused kernels (GPU, or
CPU with a C++ compiler, with a compile time of about a minute on the first batches); ``aot_eager`` traces without generating code, which is what
the tests use (forward, gradients and beam search equal to eager for b2t and dlcl; all twelve methods were checked
the same way once, see README; fairseq-train's real loop for the four methods whose layers end in ``x + F(...)``,
which need the contiguous layer inputs of models/stacks.py). The option is part of the model options, so a
checkpoint trained with it decodes compiled too unless ``--model-overrides "{'compile_layers': ''}"`` switches it
off.
"""
import torch

from b2t_fairseq.safety.errors import B2TConfigError


# what README recommends; torch lists aot_eager only among its "debug" backends, which list_backends() leaves out
RECOMMENDED = {"inductor": "fused kernels", "aot_eager": "tracing only"}


def _choices():
    others = [name for name in torch._dynamo.list_backends() if name not in RECOMMENDED]
    recommended = " or ".join(f"{name} ({what})" for name, what in RECOMMENDED.items())
    return (
        f"use {recommended}; torch here also offers {', '.join(others) or 'no other'} (its debugging backends: "
        "torch._dynamo.list_backends(exclude_tags=())), or drop the flag"
    )


def compile_layers(model, backend):
    """Compile every layer of ``model``'s encoder and decoder with torch.compile ``backend`` ('' leaves them)."""
    if not backend:
        return model
    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise B2TConfigError(f"--compile-layers {backend}: not a torch.compile backend here; {_choices()}")
    for stack in (getattr(model, "encoder", None), getattr(model, "decoder", None)):
        for layer in getattr(stack, "layers", None) or ():
            layer.compile(backend=backend)  # torch's automatic dynamic shapes: static first, dynamic on change
    return model
