"""Every limit on what one API request may ask for, in one place (docs/security.md lists them).

A request over a limit is refused before any work is done, with HTTP 400 (413 for the body) and
OpenAI's error object whose ``param`` names the field, so a client learns which field to shorten.
Each limit bounds the work or memory one request can cost:

| limit | bounds |
|---|---|
| ``MAX_BODY_BYTES`` (413), ``MAX_HEADER_BYTES`` (431) | what is read and parsed at all |
| ``MAX_STOP_STRINGS``, ``MAX_STOP_CHARS`` | the stop matcher (memory linear in them) |
| ``MAX_MESSAGES``, ``MAX_CONTENT_PARTS``, ``MAX_PROMPT_CHARS`` | the chat template and the tokenizer |
|   (``MAX_PROMPT_CHARS`` also caps ``prompt`` of /v1/completions and /tokenize) | (~1.6 s at worst) |
| ``MAX_NAME_CHARS`` | ``messages[].name``, ``user`` |
| ``MAX_SESSION_ID_CHARS`` | the ``X-Session-Id`` header |
| ``max_tokens`` ≤ the server's cap (``DEFAULT_MAX_TOKENS_CAP``) and ≤ the context | the generation |
| ``MAX_TOP_K`` | (any k ≥ the vocabulary is the same as 0: off) |
| ``MAX_CHOICES`` (``n`` × prompts), ``MAX_PROMPTS`` | the rows one request adds to the batch |
| ``MAX_TOOLS``, ``MAX_LOGIT_BIAS``, ``MAX_TOP_LOGPROBS`` | the grammar, the bias and logprob work |
| ``MAX_EMBEDDING_INPUTS`` | the rows one embeddings request adds |
| schemas and tool parameters | the body size, and llguidance's own limits on grammar size |

uvicorn (h11) already refuses a header block that arrives incomplete past 16 KiB (a plain 400 or a
closed connection); one that arrives whole, up to a socket read (~256 KiB), reaches the app, which
refuses it past ``MAX_HEADER_BYTES`` with 431 in OpenAI's shape. ``best_of`` and other fields
this server does not implement are unknown fields (400).
"""

from __future__ import annotations

MAX_BODY_BYTES = 1 << 20  # 1 MiB: a long conversation is ~100 KB
MAX_HEADER_BYTES = 32 << 10  # names and values of all headers together
DEFAULT_MAX_TOKENS_CAP = 4096  # max_tokens (and the default reply length) at most this

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_CHARS = 1_000  # each stop string

MAX_MESSAGES = 2_048
MAX_CONTENT_PARTS = 64  # text parts in one message's content list
MAX_PROMPT_CHARS = 131_072  # all messages' text together, or a prompt (an 8,192-token context holds
# ~32,000 characters of English; tokenizing 131,072 of the worst kind, one run of spaces, takes ~1.6 s)
MAX_NAME_CHARS = 256  # messages[].name and user
MAX_SESSION_ID_CHARS = 256  # the X-Session-Id header
MAX_TOP_K = 1 << 20

MAX_SEED = 2**63 - 1

MAX_CHOICES = 16  # n, times the prompts of a completions request
MAX_PROMPTS = 16  # prompts of one completions request
MAX_TOOLS = 64  # tools of one request (and tool calls of one message)
MAX_LOGIT_BIAS = 300  # OpenAI's limit
MAX_TOP_LOGPROBS = 20  # OpenAI's limit (5 for completions' logprobs)
MAX_EMBEDDING_INPUTS = 64
MAX_METADATA_ITEMS = 16  # OpenAI's limit
FUNCTION_NAME = r"^[A-Za-z0-9_.-]{1,64}$"  # a function's or a schema's name
