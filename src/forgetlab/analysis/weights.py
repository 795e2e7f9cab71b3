"""Every weight matrix of a causal LM, named by (layer, component), in (out, in) orientation.

Fused projections are split the way the model itself splits them: GPT-NeoX's ``query_key_value``
interleaves q, k and v *per head* (rows are ``[h0: q k v, h1: q k v, ...]``), GPT-2's ``c_attn`` is a
transposed Conv1D with ``[Q | K | V]`` column blocks. (Splitting NeoX as ``[Q; K; V]`` rows, as the
spurious-forgetting reference code does, mixes heads and components.)
The input embedding and the unembedding are both kept as stored, (vocab, hidden): their left singular
vectors, and so their angles and chance levels, live in token space, for both matrices alike. A learned
position embedding (GPT-2's ``wpe``, OPT's ``embed_positions``) is part of the embedding layer that the
paper's analysis singles out, so it is kept too, as stored (positions, hidden).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from forgetlab.models.adapter import adapt

EMBEDDING_LAYER = -1
COMPONENTS = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v",
    "o_proj": "attn_out", "out_proj": "attn_out",
    "gate_proj": "mlp_gate", "up_proj": "mlp_up", "down_proj": "mlp_down",
    "dense_h_to_4h": "mlp_in", "dense_4h_to_h": "mlp_out", "c_fc": "mlp_in", "fc_in": "mlp_in", "fc_out": "mlp_out",
}
FUSED_QKV = ("query_key_value", "c_attn")
POSITION_EMBEDDINGS = ("wpe", "embed_positions", "position_embeddings")


def check_same_model(reference: torch.nn.Module, other: torch.nn.Module, what: str) -> None:
    """One line when ``other`` has other parameter names or shapes than ``reference``: the diagnostics compare
    checkpoints of one model, and a mismatch would otherwise surface as a broadcasting error deep inside."""
    ref = {n: tuple(p.shape) for n, p in reference.named_parameters()}
    got = {n: tuple(p.shape) for n, p in other.named_parameters()}
    if ref != got:
        name = next((n for n in ref if got.get(n) != ref[n]), None) or next(n for n in got if n not in ref)
        raise ValueError(f"{what} is not a checkpoint of the same model as the first: {name} is "
                         f"{got.get(name, 'absent')} there and {ref.get(name, 'absent')} in the first; compare "
                         "checkpoints of one model")


def _oriented(module: torch.nn.Module) -> torch.Tensor:
    weight = module.weight.detach()
    return weight.t() if hasattr(module, "nf") else weight  # Conv1D stores (in, out)


def split_fused_qkv(name: str, weight: torch.Tensor, n_heads: int) -> dict[str, torch.Tensor]:
    """q, k, v blocks of a fused (3·H·d, hidden) weight in (out, in) orientation."""
    rows, cols = weight.shape
    if name == "query_key_value":  # GPT-NeoX: per head [q; k; v]
        per_head = weight.view(n_heads, 3, rows // (3 * n_heads), cols)
        return {c: per_head[:, i].reshape(rows // 3, cols) for i, c in enumerate("qkv")}
    q, k, v = weight.split(rows // 3, dim=0)  # GPT-2 c_attn: [Q; K; V]
    return {"q": q, "k": k, "v": v}


def weight_matrices(model: PreTrainedModel) -> dict[tuple[int, str], torch.Tensor]:
    """``{(layer, component): W}``; ``layer`` is -1 for the input embedding and the unembedding."""
    adapter = adapt(model)
    out: dict[tuple[int, str], torch.Tensor] = {(EMBEDDING_LAYER, "embedding"): model.get_input_embeddings().weight.detach()}
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and path.rsplit(".", 1)[-1] in POSITION_EMBEDDINGS:
            out[(EMBEDDING_LAYER, "position_embedding")] = module.weight.detach()
    for index, layer in enumerate(adapter.layers):
        for path, module in layer.named_modules():
            leaf = path.rsplit(".", 1)[-1]
            if not isinstance(getattr(module, "weight", None), torch.Tensor) or module.weight.dim() != 2:
                continue
            if leaf in FUSED_QKV:
                for comp, w in split_fused_qkv(leaf, _oriented(module), adapter.n_heads).items():
                    out[(index, comp)] = w
            elif module is adapter.o_projs[index]:
                out[(index, "attn_out")] = _oriented(module)
            elif leaf in COMPONENTS:
                out[(index, COMPONENTS[leaf])] = _oriented(module)
            elif leaf in ("dense", "c_proj"):  # MLP output under the generic names (the attention one is o_projs)
                out[(index, "mlp_out")] = _oriented(module)
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        out[(EMBEDDING_LAYER, "unembedding")] = head.weight.detach()
    return out
