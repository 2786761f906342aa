"""A model's own defaults (its template's default system prompt, the file's sampling settings) and
Continue (a cut reply goes on from where it stopped, its prompt's K/V reused)."""

from __future__ import annotations

import pytest

from engine import GgufFile, InferenceOptions, SessionId
from engine.architectures import GEMMA_TEMPLATE
from engine.chat_template import ChatTemplate
from engine.model_defaults import model_defaults, template_system_prompt
from engine.model_pool import load_files
from engine.prompting import Continuation
from tests.fixtures.engine_helpers import make_engine, run_all, user
from tests.fixtures.tiny_model import write_tiny_gguf

SMOLLM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHATML_NO_DEFAULT = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_the_template_default_system_prompt_is_the_models_own(tiny_model_path, tiny_family):
    assert model_defaults(tiny_model_path).system_prompt == SMOLLM  # the fixture carries SmolLM2's template
    gemma = model_defaults(tiny_family["tiny-gemma"])  # a base model: no template, no prompt of its own
    assert gemma.system_prompt is None and not gemma.has_chat_template


@pytest.mark.parametrize("source", [CHATML_NO_DEFAULT, GEMMA_TEMPLATE, "{{ messages[0]['content'] }}"])
def test_templates_without_a_default_system_prompt_have_none(source):
    assert template_system_prompt(ChatTemplate(source, {})) is None


def test_sampling_defaults_come_from_the_file_and_bad_values_are_ignored(tmp_path):
    path = write_tiny_gguf(tmp_path / "s.gguf", extra_metadata={
        "general.sampling.temp": 0.6, "general.sampling.top_k": 20, "general.sampling.top_p": 7.5,
        "general.sampling.min_p": 0.05})  # fmt: skip
    assert model_defaults(path).sampling == {"temperature": pytest.approx(0.6), "top_k": 20,
                                             "min_p": pytest.approx(0.05)}  # fmt: skip


@pytest.mark.smollm2
@pytest.mark.gemma3
def test_real_models_defaults(smollm2_path, gemma3_path):
    assert model_defaults(GgufFile(smollm2_path)).system_prompt == SMOLLM
    gemma = model_defaults(GgufFile(gemma3_path))
    assert gemma.system_prompt is None and not gemma.has_chat_template  # Gemma 3 270M is a base model


# -- Continue ---------------------------------------------------------------------------------------
def continued(pair, messages, n_first: int, n_more: int):
    engine = make_engine(pair)
    session = SessionId("tab")
    greedy = InferenceOptions(temperature=0.0, max_new_tokens=n_first, stop_on_eos=False)
    (first,) = run_all(engine, [engine.submit(messages, greedy, session)])
    more = InferenceOptions(temperature=0.0, max_new_tokens=n_more, stop_on_eos=False)
    cont_messages = Continuation([*messages, {"role": "assistant", "content": first.text}])
    (second,) = run_all(engine, [engine.submit(cont_messages, more, session)])
    return first, second


def test_continue_reuses_the_cut_replys_k_v(tiny_model_path):
    pair = load_files(tiny_model_path)
    first, second = continued(pair, [user("Hello, how are you today?")], 6, 6)
    assert first.finish_reason == "length"
    prompt = pair[1].encode_messages([user("Hello, how are you today?")])
    reply = pair[1].encode(first.text, parse_special=False)
    assert second.prompt_tokens == len(prompt) + len(reply)  # the reply goes on: no end of turn
    assert second.reused_tokens >= len(prompt)  # the prompt is not recomputed
    assert second.generated_tokens == 6


def test_a_continuation_must_end_with_the_assistants_reply(tiny_model_path):
    engine = make_engine(load_files(tiny_model_path))
    with pytest.raises(ValueError, match="last message must be the assistant's"):
        engine.submit(Continuation([user("hi")]))


@pytest.mark.smollm2
def test_continue_on_smollm2_equals_one_longer_reply(smollm2):
    messages = [user("Name three colors of the rainbow.")]
    first, second = continued(smollm2, messages, 8, 8)
    engine = make_engine(smollm2)
    whole = InferenceOptions(temperature=0.0, max_new_tokens=16, stop_on_eos=False)
    (longer,) = run_all(engine, [engine.submit(messages, whole)])
    assert first.text + second.text == longer.text
    assert second.reused_tokens == second.prompt_tokens - 1  # everything but the last token's logits
