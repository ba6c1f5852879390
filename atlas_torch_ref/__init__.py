"""A PyTorch reference of the atlas_jax models, independent of atlas_jax, for parity tests."""
from atlas_torch_ref.load import grads_to_tree, load_params, params_to_tree
from atlas_torch_ref.model import RefConfig, Transformer

__all__ = ["RefConfig", "Transformer", "load_params", "grads_to_tree", "params_to_tree"]
