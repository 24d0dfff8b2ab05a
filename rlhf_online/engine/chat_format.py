"""Conversation -> prompt text, the same way for serving, reward scoring and PPO rollouts."""

from collections.abc import Sequence

# (role, content) pairs, role one of "system", "user", "assistant".
Messages = Sequence[tuple[str, str]]


def render_prompt(tokenizer, messages: Messages) -> str:
    """The prompt text that asks the model for the next assistant turn.

    Uses the tokenizer's chat template when it has one (with the generation prompt), else a plain
    role-prefixed transcript ending in "Assistant:".
    """
    if getattr(tokenizer, "chat_template", None):
        conversation = [{"role": role, "content": content} for role, content in messages]
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    return plain_prompt(messages)


def plain_prompt(messages: Messages) -> str:
    """For tokenizers without a chat template: `Role: content` lines, then `Assistant:`."""
    turns = [f"{role.capitalize()}: {content}\n" for role, content in messages]
    return "".join(turns) + "Assistant:"
