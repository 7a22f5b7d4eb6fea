"""The authors' "rescaling" initialisation (their commit of May 2023).

Every weight matrix inside a layer that is not a layer norm — q/k/v/out projections of self- and
cross-attention, fc1, fc2 — is multiplied by N^-1/2 once, after fairseq's own init, where N is the number
of layers of that stack. Biases, layer norms and embeddings are left alone.
"""
import torch


def scaled_parameter_names(layer):
    return [name for name, p in layer.named_parameters() if p.dim() >= 2 and "layer_norm" not in name]


@torch.no_grad()
def rescale_stack(layers):
    """Scale the layers of one stack by len(layers)^-1/2. Returns the factor used."""
    # nn.ModuleList's own iterator: fairseq's LayerDropModuleList.__iter__ skips layers in training mode
    modules = list(layers._modules.values())
    factor = len(modules) ** -0.5
    for layer in modules:
        names = set(scaled_parameter_names(layer))
        for name, p in layer.named_parameters():
            if name in names:
                p.mul_(factor)
    return factor
