"""`worldvla.ops`: every op the model and the engine use, one entry point each.

`backend="auto" | "torch" | "triton" | "native"`; see `dispatch.py`.
"""
from . import dispatch
from .attention import decode_attention, decode_attention_ref, masked_attention, masked_attention_ref
from .decoder import decoder_layer, decoder_layer_ref, resolve_decoder_layer
from .cross_entropy import linear_cross_entropy, linear_cross_entropy_ref, logits_cross_entropy
from .projection import linear, linear_ref, resolve_linear
from .sampling import constrained_sample, constrained_sample_ref
from .vq import vq_gather, vq_gather_ref, vq_quantize, vq_quantize_ref

# Load the optional backends now rather than on the first call: a first call inside a
# torch.compile trace could not import them.
dispatch._load_backends()

__all__ = ["masked_attention", "masked_attention_ref", "decode_attention", "decode_attention_ref",
           "linear", "linear_ref", "resolve_linear", "decoder_layer", "decoder_layer_ref", "resolve_decoder_layer", "vq_quantize", "vq_quantize_ref", "vq_gather", "vq_gather_ref",
           "linear_cross_entropy", "linear_cross_entropy_ref", "logits_cross_entropy", "constrained_sample", "constrained_sample_ref",
           "dispatch"]
