"""A chat rendered as vLLM's LLM.chat and its chat server render it: the model's chat
template (or config vllm.chat_template) applied for a reply, then tokenized without
adding special tokens again. Used by the in-process server and by per-rank engines."""

from __future__ import annotations


class ChatTemplateError(ValueError):
    """The model has no chat template and none was given."""


def chat_token_ids(tokenizer, messages: list, template: str | None, where: str) -> list[int]:
    """``messages`` as the model's chat template (or ``template``) renders them for a
    reply, in token ids: what vLLM's LLM.chat and its chat server do (render to text with
    the generation prompt, then tokenize without adding special tokens again)."""
    try:
        text = tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True, tokenize=False
        )
    except ValueError as exc:  # transformers: no template
        raise ChatTemplateError(
            f"{where}: messages need a chat template and the model has none ({exc}); "
            "set config vllm.chat_template to a template file"
        ) from None
    return list(tokenizer.encode(text, add_special_tokens=False))
