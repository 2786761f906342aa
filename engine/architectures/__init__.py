"""Model families as data: what differs between Llama and Gemma 3 is declared here, not tested with
``if arch == ...`` in the forward pass (llama.cpp and mlx-lm organise their models the same way).

Each family module declares one ``Architecture``; ``engine.gguf.read_config`` looks the file's
``general.architecture`` up in ``ARCHITECTURES`` and ``engine.model`` reads the flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class Architecture:
    name: str
    # llama.cpp's converter permutes Llama's q/k rows so RoPE rotates adjacent pairs; the engine puts
    # them back in rotate-half order at load. Families converted without the permutation are left as is.
    qk_rows_permuted: bool = True
    qk_norm: bool = False  # RMSNorm over each head's q and k (attn_q_norm / attn_k_norm)
    qkv_bias: bool = False  # q, k and v projections have biases (attn_q.bias, ...)
    post_norms: bool = False  # RMSNorm on the attention and MLP outputs before the residual add
    activation: Literal["silu", "gelu_tanh"] = "silu"
    scale_embeddings: bool = False  # token embeddings multiplied by sqrt(hidden_size)
    # sliding-window attention: every ``global_every``-th layer (1-based) sees the whole context with
    # the file's RoPE base; the others see the last ``sliding_window`` tokens with ``local_rope_theta``
    global_every: int = 0  # 0: every layer is global
    local_rope_theta: float = 10_000.0
    extra_block_tensors: tuple[str, ...] = ()  # short names beyond Llama's, e.g. "attn_q_norm"
    # the family's turn format, for files without a chat template (a base model), and its end-of-turn
    # token; None: a plain transcript
    chat_template: str | None = None
    end_of_turn: str | None = None


# Gemma's own turn format (no system role: a system message opens the first user turn).
GEMMA_TEMPLATE = (
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\n\n' %}"
    "{% else %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}{{ ns.system if role == 'user' else '' }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}{% if role == 'user' %}{% set ns.system = '' %}{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# A base model's conversation as plain text: it continues the transcript.
PLAIN_TRANSCRIPT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize + ': ' + message['content'] + '\n\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


LLAMA = Architecture("llama")

GEMMA3 = Architecture(
    "gemma3",
    qk_rows_permuted=False,
    qk_norm=True,
    post_norms=True,
    activation="gelu_tanh",
    scale_embeddings=True,
    global_every=6,  # layers 5, 11, 17, ... (0-based) are global, as in llama.cpp and transformers
    local_rope_theta=10_000.0,
    extra_block_tensors=("attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm"),
    chat_template=GEMMA_TEMPLATE,
    end_of_turn="<end_of_turn>",
)

# Qwen 2 / 2.5: Llama with biases on q, k and v; rotate-half RoPE as converted (no row permutation).
QWEN2 = Architecture(
    "qwen2",
    qk_rows_permuted=False,
    qkv_bias=True,
    extra_block_tensors=("attn_q_bias", "attn_k_bias", "attn_v_bias"),
)

# Qwen 3: QK-norm instead of the biases.
QWEN3 = Architecture(
    "qwen3",
    qk_rows_permuted=False,
    qk_norm=True,
    extra_block_tensors=("attn_q_norm", "attn_k_norm"),
)

ARCHITECTURES = {a.name: a for a in (LLAMA, GEMMA3, QWEN2, QWEN3)}
