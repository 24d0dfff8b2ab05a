"""render_prompt with and without a tokenizer chat template."""

from rlhf_online.engine.chat_format import render_prompt
from rlhf_online.engine.tiny_model import build_tokenizer

CONVERSATION = [("system", "Be brief."), ("user", "Hi!"), ("assistant", "Hello."), ("user", "2+2?")]


class NoTemplate:
    chat_template = None


def test_plain_transcript_without_a_template():
    assert render_prompt(NoTemplate(), CONVERSATION) == (
        "System: Be brief.\nUser: Hi!\nAssistant: Hello.\nUser: 2+2?\nAssistant:"
    )
    assert render_prompt(object(), [("user", "x")]) == "User: x\nAssistant:"


def test_the_tokenizers_template_with_the_generation_prompt():
    assert render_prompt(build_tokenizer(), CONVERSATION) == (
        "<|system|>\nBe brief.\n<|user|>\nHi!\n<|assistant|>\nHello.\n<|user|>\n2+2?\n<|assistant|>\n"
    )
